"""Optimizer-state memory of each method, measured and by formula.

Measured: the sum of ``x.nbytes`` over ``jax.tree.leaves(tx.init(params))``. Analytic, per
parameter of ``N`` elements (float32, 4 bytes each), for an ``m×n`` matrix whose two axes both
get a factor (``<= max_precond_dim``):

| method     | elements                      | buffers                                        |
| ---------- | ----------------------------- | ---------------------------------------------- |
| AdamW      | 2N                            | M, V                                           |
| SOAP       | 2N + 2(m² + n²)               | M, V (in the basis); factors L, R; bases Q_L, Q_R |
| KL-Shampoo | N + 2(m² + n²) + (m + n)      | M; factors; bases; eigenvalue estimates ℓ_L, ℓ_R |
| KL-SOAP    | 2N + 2(m² + n²) + (m + n)     | M, V; factors; bases; eigenvalue estimates     |

An axis longer than ``max_precond_dim`` drops its ``2d²`` (and ``d``) terms. 1-D parameters take
plain Adam in every method (2N). Counters and other scalars (a few bytes) are not in the
formulas; Shampoo and AdamW-Shampoo are measured only.

    python -m benchmarks.memory                      # MLP, transformer, one 1024×4096 matrix
    python -m benchmarks.memory --m=4096 --n=4096 --max_precond_dim=2048
    python -m benchmarks.memory --smoke

Writes ``memory.json``, ``memory.md`` and ``memory.png`` to ``--out_dir``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from tqdm import tqdm

from benchmarks import models

_METHODS = flags.DEFINE_list("methods", list(models.METHODS), "Methods to measure.")
_M = flags.DEFINE_integer("m", 1024, "Rows of the single-matrix setting.")
_N = flags.DEFINE_integer("n", 4096, "Columns of the single-matrix setting.")
_MAX_PRECOND_DIM = flags.DEFINE_integer(
  "max_precond_dim", 10000, "max_precond_dim of every method."
)
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny models and a 64×32 matrix: < 30 s.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_OUT_DIR = flags.DEFINE_string("out_dir", "outputs/benchmarks", "Output directory.")


def _matrix_terms(shape: Sequence[int], max_precond_dim: int) -> tuple[int, int, int]:
  """``(N, Σ d², Σ d)`` over the factored axes of one parameter (squeezed; 1-D: none)."""
  dims = [d for d in shape if d != 1]
  size = int(np.prod(shape))
  if len(dims) < 2:
    return size, 0, 0
  factored = [d for d in dims if d <= max_precond_dim]
  return size, sum(d * d for d in factored), sum(factored)


def analytic_elements(method: str, shapes: Sequence[Sequence[int]], max_precond_dim: int) -> float:
  """State elements by the formulas of the module docstring (NaN if there is none)."""
  total = 0
  for shape in shapes:
    size, squares, lengths = _matrix_terms(shape, max_precond_dim)
    if method == "adamw" or squares == 0:
      total += 2 * size  # AdamW, and the plain-Adam fallback of 1-D parameters
    elif method == "soap":
      total += 2 * size + 2 * squares
    elif method == "kl_shampoo":
      total += size + 2 * squares + lengths
    elif method == "kl_soap":
      total += 2 * size + 2 * squares + lengths
    else:
      return float("nan")
  return float(total)


def state_bytes(tx: Any, params: Any) -> int:
  return int(sum(x.nbytes for x in jax.tree.leaves(tx.init(params))))


def settings(smoke: bool, m: int, n: int) -> list[tuple[str, str, Any]]:
  """``(name, description, params)`` of every setting."""
  out = []
  for name in ("mlp", "transformer"):
    task = models.make_task(name, smoke=smoke)
    out.append((name, task.description, task.params))
  out.append((f"matrix {m}×{n}", f"one {m}×{n} float32 matrix", {"w": jnp.zeros((m, n))}))
  return out


def run(
  methods: Sequence[str],
  m: int,
  n: int,
  *,
  max_precond_dim: int = 10000,
  smoke: bool = False,
  progress: bool = True,
  out_dir: str = "outputs/benchmarks",
) -> dict[str, Any]:
  started = time.perf_counter()
  report: dict[str, Any] = {
    "environment": models.environment(),
    "max_precond_dim": max_precond_dim,
    "settings": [],
  }
  cases = settings(smoke, m, n)
  bar = tqdm(total=len(cases) * len(methods), disable=not progress, desc="memory")
  for name, description, params in cases:
    shapes = [x.shape for x in jax.tree.leaves(params)]
    num_params = int(sum(np.prod(s) for s in shapes))
    rows, skipped = {}, {}
    for method in methods:
      bar.update(1)
      try:
        tx = models.make_optimizer(method, 10, max_precond_dim)
      except LookupError as error:
        skipped[method] = str(error)
        continue
      measured = state_bytes(tx, params)
      analytic = 4 * analytic_elements(method, shapes, max_precond_dim)
      rows[method] = {
        "measured_bytes": measured,
        "analytic_bytes": analytic,
        "measured_over_analytic": measured / analytic,
        "bytes_per_param": measured / num_params,
      }
    adamw = rows.get("adamw", {}).get("measured_bytes")
    for row in rows.values():
      row["ratio_adamw"] = row["measured_bytes"] / adamw if adamw else float("nan")
    report["settings"].append(
      {
        "name": name,
        "description": description,
        "num_params": num_params,
        "methods": rows,
        "skipped": skipped,
      }
    )
  bar.close()
  report["wall_seconds"] = time.perf_counter() - started
  _write(report, out_dir)
  return report


HEADERS = (
  "setting",
  "params",
  "method",
  "measured MB",
  "analytic MB",
  "measured − analytic B",
  "bytes / param",
  "×AdamW",
)


def markdown(report: dict[str, Any]) -> str:
  rows = []
  for setting in report["settings"]:
    for method, r in setting["methods"].items():
      difference = r["measured_bytes"] - r["analytic_bytes"]
      rows.append(
        (
          setting["name"],
          f"{setting['num_params']:,}",
          method,
          r["measured_bytes"] / 2**20,
          r["analytic_bytes"] / 2**20,
          "–" if np.isnan(difference) else f"{difference:+.0f}",
          r["bytes_per_param"],
          r["ratio_adamw"],
        )
      )
  lines = [
    "# Optimizer-state memory",
    "",
    f"max_precond_dim={report['max_precond_dim']}; MB = 2²⁰ bytes; analytic: AdamW 2N, SOAP "
    "2N+2(m²+n²), KL-Shampoo N+2(m²+n²)+(m+n), KL-SOAP 2N+2(m²+n²)+(m+n) float32 elements "
    "per m×n matrix, 2N per 1-D parameter.",
    "",
    models.markdown_table(HEADERS, rows),
    "",
  ]
  lines += [f"- {s['name']}: {s['description']}" for s in report["settings"]]
  skipped = {m: r for s in report["settings"] for m, r in s["skipped"].items()}
  lines += [f"- skipped {method}: {reason}" for method, reason in skipped.items()]
  return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(8, 3.8))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  names = [s["name"] for s in report["settings"]]
  methods = list(dict.fromkeys(m for s in report["settings"] for m in s["methods"]))
  width = 0.8 / max(1, len(methods))
  for k, method in enumerate(methods):
    values = [
      s["methods"].get(method, {}).get("bytes_per_param", np.nan) for s in report["settings"]
    ]
    ax.bar(
      np.arange(len(names)) + (k - (len(methods) - 1) / 2) * width, values, width, label=method
    )
  ax.set_xticks(np.arange(len(names)), names)
  ax.set_ylabel("state bytes per parameter")
  ax.set_title("optimizer state (measured)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def _write(report: dict[str, Any], out_dir: str) -> None:
  models.write_outputs("memory", report, out_dir, markdown, plot)


def main(argv: Sequence[str]) -> None:
  del argv
  m, n = _M.value, _N.value
  if _SMOKE.value:
    m, n = (m if _M.present else 64), (n if _N.present else 32)
  run(
    _METHODS.value,
    m,
    n,
    max_precond_dim=_MAX_PRECOND_DIM.value,
    smoke=_SMOKE.value,
    progress=_PROGRESS.value,
    out_dir=_OUT_DIR.value,
  )


if __name__ == "__main__":
  app.run(main)
