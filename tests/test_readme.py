"""The README's quickstart runs as written (a few steps on random data)."""

from __future__ import annotations

import pathlib
import re

import jax
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_and_lowers_the_loss():
  text = README.read_text()
  section = text.split("## Quickstart", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  namespace: dict = {}
  exec(compile(code, "README-quickstart", "exec"), namespace)  # noqa: S102 - our own README
  x = jax.random.normal(jax.random.key(0), (64, 64))
  y = jax.random.randint(jax.random.key(1), (64,), 0, 10)
  model, optimizer, step = namespace["model"], namespace["optimizer"], namespace["train_step"]
  losses = [float(step(model, optimizer, x, y)) for _ in range(30)]
  assert np.isfinite(losses).all()
  assert losses[-1] < losses[0]
