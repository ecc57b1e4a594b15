"""Compile time of the optimizer update against model depth.

The update alone (``tx.update``, jitted, lowered and compiled; no model) on a width-``--width``
transformer-shaped tree: per layer ``qkv`` (d × 3d), ``o`` (d × d), ``up`` (d × 4d), ``down``
(4d × d) and two gains (d). Each (method, depth) compiles in a fresh process, ``--repeats``
times, and the median is kept, so that no cache is shared. Equal-shape blocks are stacked into
buckets, so a deeper model should cost almost nothing more to compile.

    python -m benchmarks.compile_time                           # 2 and 12 layers, width 512
    python -m benchmarks.compile_time --layers=2,4,8,12 --repeats=3
    python -m benchmarks.compile_time --smoke                   # width 32, 1 and 2 layers

Writes ``compile_time.json`` and ``compile_time.md`` to ``--out_dir``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from absl import app, flags

METHODS = ("adamw", "soap", "kl_soap", "kl_shampoo", "shampoo", "adamw_shampoo")

_WORKER = """
import json, sys, time
import jax, jax.numpy as jnp, optax
import kl_precond as kp
spec = json.loads(sys.argv[1])
d, layers, method = spec["width"], spec["layers"], spec["method"]
shapes = {"qkv": (d, 3 * d), "o": (d, d), "up": (d, 4 * d), "down": (4 * d, d),
          "gain_1": (d,), "gain_2": (d,)}
params = {f"layer_{i}": {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
          for i in range(layers)}
tx = optax.adamw(1e-3) if method == "adamw" else getattr(kp, method)(1e-3)
state = jax.eval_shape(tx.init, params)
start = time.perf_counter()
lowered = jax.jit(tx.update).lower(params, state, params)
lowered_at = time.perf_counter()
compiled = lowered.compile()
done = time.perf_counter()
text = compiled.as_text()
print(json.dumps({"lower_s": lowered_at - start, "compile_s": done - lowered_at,
                  "instructions": sum(1 for line in text.splitlines() if " = " in line)}))
"""

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_list("methods", list(METHODS), "Optimizers (optax.adamw or kl_precond names).")
  flags.DEFINE_list("layers", ["2", "12"], "Depths; ratios are to the first.")
  flags.DEFINE_integer("width", 512, "Model width d.")
  flags.DEFINE_integer("repeats", 3, "Fresh processes per (method, depth); the median is kept.")
  flags.DEFINE_bool("smoke", False, "Width 32, depths 1 and 2, one repeat.")
  flags.DEFINE_string("out_dir", "outputs/benchmarks", "Output directory.")


def compile_once(method: str, layers: int, width: int) -> dict[str, Any]:
  """One fresh process: seconds to lower and to compile, and the compiled instruction count."""
  spec = json.dumps({"method": method, "layers": layers, "width": width})
  out = subprocess.run(
    [sys.executable, "-c", _WORKER, spec], check=True, capture_output=True, text=True
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def run(methods: Sequence[str], depths: Sequence[int], width: int, repeats: int) -> dict:
  rows = []
  for method in methods:
    runs = {depth: [compile_once(method, depth, width) for _ in range(repeats)] for depth in depths}
    medians = {d: float(np.median([r["compile_s"] for r in runs[d]])) for d in depths}
    rows.append(
      {
        "method": method,
        "compile_s": medians,
        "instructions": {d: runs[d][0]["instructions"] for d in depths},
        "ratio": {d: medians[d] / medians[depths[0]] for d in depths},
      }
    )
  return {"width": width, "depths": list(depths), "repeats": repeats, "rows": rows}


def markdown(report: dict) -> str:
  depths = report["depths"]
  head = ["method"] + [f"{d} layers (s)" for d in depths]
  head += [f"{d} / {depths[0]}" for d in depths[1:]] + [f"instructions at {d}" for d in depths]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for row in report["rows"]:
    cells = [row["method"]] + [f"{row['compile_s'][d]:.2f}" for d in depths]
    cells += [f"{row['ratio'][d]:.2f}" for d in depths[1:]]
    cells += [str(row["instructions"][d]) for d in depths]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
  del argv
  depths = [int(d) for d in FLAGS.layers]
  width, repeats = FLAGS.width, FLAGS.repeats
  if FLAGS.smoke:
    depths, width, repeats = [1, 2], 32, 1
  start = time.perf_counter()
  report = run(FLAGS.methods, depths, width, repeats)
  report["wall_s"] = time.perf_counter() - start
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  with open(os.path.join(FLAGS.out_dir, "compile_time.json"), "w") as f:
    json.dump(report, f, indent=1)
  text = markdown(report)
  with open(os.path.join(FLAGS.out_dir, "compile_time.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  define_flags()
  app.run(main)
