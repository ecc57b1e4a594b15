"""The Kronecker study program (fast, tiny setting) and its Colab notebook headless (slow)."""

from __future__ import annotations

import csv
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "colabs" / "kronecker_approximation.ipynb"
METHODS = {"optimal", "power", "shampoo2", "shampoo", "kl"}


def _assert_nonempty_file(path: pathlib.Path) -> None:
  assert path.is_file(), f"missing {path}"
  assert path.stat().st_size > 0, f"empty {path}"


def test_kronecker_study_main_tiny(tmp_path: pathlib.Path) -> None:
  out_dir = tmp_path / "kronecker"
  command = [
    sys.executable,
    "-m",
    "benchmarks.kronecker_study",
    "--steps=3",
    "--log_every=2",
    "--grad_batch_sizes=4",
    "--num_batches=8",
    "--noprogress",
    f"--out_dir={out_dir}",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run(
    command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "| gn | exact | 1 |" in done.stdout
  for name in ("kronecker.csv", "kronecker.md", "kronecker.png"):
    _assert_nonempty_file(out_dir / name)
  with open(out_dir / "kronecker.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert {int(r["step"]) for r in rows} == {0, 2, 3}
  assert {r["method"] for r in rows} == METHODS
  sources = {(r["target"], r["labels"], int(r["batch_size"])) for r in rows}
  assert ("gn", "exact", 1) in sources and ("gn", "sampled", 4) in sources
  assert ("ada", "real", 4) in sources and len(sources) == 7
  assert all(-1.0 - 1e-5 <= float(r["cosine"]) <= 1.0 + 1e-5 for r in rows)
  assert all(math.isfinite(float(r["train_loss"])) for r in rows)
  # The optimum of the target bounds every Kronecker product (float32 slack).
  optimal = {(r["step"], r["target"]): float(r["cosine"]) for r in rows if r["method"] == "optimal"}
  assert all(float(r["cosine"]) <= optimal[(r["step"], r["target"])] + 1e-4 for r in rows)


@pytest.mark.slow
def test_kronecker_notebook(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
  nbclient = pytest.importorskip("nbclient")
  nbformat = pytest.importorskip("nbformat")
  monkeypatch.setenv("KL_PRECOND_NOTEBOOK_STEPS", "3")
  monkeypatch.setenv("KL_PRECOND_NOTEBOOK_OUT", str(tmp_path))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
    notebook,
    timeout=600,
    kernel_name="python3",
    resources={"metadata": {"path": str(NOTEBOOK.parent)}},
  )
  client.execute()
  _assert_nonempty_file(tmp_path / "kronecker_approximation.png")
  _assert_nonempty_file(tmp_path / "kronecker" / "kronecker.png")
  _assert_nonempty_file(tmp_path / "kronecker" / "kronecker.csv")
