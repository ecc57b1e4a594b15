"""The optimizer update alone (jitted ``tx.update``) on a stack of square matrices.

For each size ``n`` (``--sizes``) the parameters are ``--num_matrices`` matrices of shape
``(n, n)`` (one bucket of the chassis) with a fixed random gradient. Timed, interleaved in
rounds like ``step_time.py``:

* each method's update without a refresh (``precondition_frequency`` = 10⁹) and, for the
  Kronecker methods, with a refresh on every call (``precondition_frequency=1``, QR basis);
  their difference is the cost of one refresh;
* a plain jitted ``a @ b`` of two ``n×n`` matrices: the machine's practical matmul FLOP/s;
* a bare jitted ``jnp.linalg.eigh`` and ``jnp.linalg.qr`` of one ``n×n`` matrix.

The matmul FLOPs of one non-refresh update are counted analytically from the code of
``kl_precond`` (see ``benchmarks/flop_counts.py``); dividing by the measured median gives the
achieved FLOP/s, reported as a fraction of the plain matmul's.

    python -m benchmarks.optimizer_only                          # n = 256, 512, 1024, 2048
    python -m benchmarks.optimizer_only --sizes=2048 --num_matrices=2 --steps=3
    python -m benchmarks.optimizer_only --smoke

Writes ``optimizer_only.json``, ``.md`` and ``.png`` to ``--out_dir``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import cpu_env

cpu_env.disable_concurrency_scheduler()  # before jax is imported (cpu_env has why)
cpu_env.one_openblas_thread()

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from tqdm import tqdm

from benchmarks import models
from benchmarks.flop_counts import COUNT_NOTES, FLOP_COUNTS, UNMERGED_WHITENING, update_flops

NEVER = 10**9  # a precondition_frequency that never refreshes within a benchmark


_SIZES = flags.DEFINE_list("sizes", ["256", "512", "1024", "2048"], "Matrix sizes n.")
_NUM_MATRICES = flags.DEFINE_integer("num_matrices", 4, "Matrices of shape (n, n) in the stack.")
_METHODS = flags.DEFINE_list("methods", list(models.METHODS), "Methods to time.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls per job (call 0 builds the bases).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed calls per job for n < 2048.")
_LARGE_STEPS = flags.DEFINE_integer("large_steps", 3, "Timed calls per job for n >= 2048.")
_CHUNK = flags.DEFINE_integer("chunk", 2, "Calls per job before switching to the next job.")
_REFRESH = flags.DEFINE_bool("refresh", True, "Also time refresh-every-call updates.")
_SMOKE = flags.DEFINE_bool("smoke", False, "n = 32, 2 matrices, 2 timed calls: < 30 s.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_OUT_DIR = flags.DEFINE_string("out_dir", "outputs/benchmarks", "Output directory.")
_SEQUENTIAL_EIGH = flags.DEFINE_bool(
  "sequential_eigh",
  False,
  "Workaround for an XLA CPU deadlock: see models.sequential_eigh_workaround.",
)


class Job:
  """A repeatable timed call: ``fn(carry) -> carry``; blocks on the carry after every call."""

  def __init__(self, name: str, fn: Callable[[Any], Any], carry: Any):
    self.name, self.fn, self.carry = name, fn, carry
    self.times: list[float] = []

  def run(self, calls: int, record: bool = True) -> None:
    for _ in range(calls):
      start = time.perf_counter()
      self.carry = jax.block_until_ready(self.fn(self.carry))
      if record:
        self.times.append(time.perf_counter() - start)

  @property
  def median_ms(self) -> float:
    return float(np.median(self.times) * 1e3)


def _update_job(name: str, tx: Any, params: Any, grads: Any) -> Job:
  # The gradient and parameters are arguments (a closed-over constant lets XLA fold the Gram products at
  # compile time) and the updates are returned (else the unprojection is dead code).
  state = jax.tree.map(lambda x: jnp.array(x, copy=True), tx.init(params))

  def step(state: Any, grads: Any, params: Any) -> tuple[Any, Any]:
    updates, state = tx.update(grads, state, params)
    return state, updates

  update = jax.jit(step, donate_argnums=(0,))
  return Job(name, lambda carry: update(carry[0], grads, params), (state, None))


def _linalg_jobs(n: int, key: jax.Array) -> list[Job]:
  """Plain ``a @ b``, ``eigh`` and ``qr`` of ``n×n`` matrices (fixed inputs, fresh results)."""
  a, b = jax.random.normal(key, (2, n, n))
  spd = a @ a.T / n + jnp.eye(n)
  matmul, eigh, qr = jax.jit(jnp.matmul), jax.jit(jnp.linalg.eigh), jax.jit(jnp.linalg.qr)
  return [
    Job("matmul", lambda _: matmul(a, b), None),
    Job("eigh", lambda _: eigh(spd), None),
    Job("qr", lambda _: qr(a), None),
  ]


def measure_size(
  n: int,
  num_matrices: int,
  methods: Sequence[str],
  warmup: int,
  steps: int,
  chunk: int,
  refresh: bool,
  progress: bool,
) -> dict[str, Any]:
  key = jax.random.PRNGKey(n)
  keys = jax.random.split(key, num_matrices + 1)
  params = {f"w{i}": jax.random.normal(k, (n, n)) / np.sqrt(n) for i, k in enumerate(keys[1:])}
  grads = jax.tree.map(lambda p: 1e-2 * jnp.sin(7 * p), params)
  jobs, skipped = _linalg_jobs(n, keys[0]), {}
  for method in methods:
    try:
      tx = models.make_optimizer(method, NEVER, max_precond_dim=10**6)
      jobs.append(_update_job(method, tx, params, grads))
      if refresh and method != "adamw":
        tx = models.make_optimizer(method, 1, max_precond_dim=10**6)
        jobs.append(_update_job(f"{method}@refresh", tx, params, grads))
    except LookupError as error:
      skipped[method] = str(error)
      print(f"[optimizer_only] skipping {method}: {error}", flush=True)
  bar = tqdm(total=len(jobs) * (warmup + steps), disable=not progress, desc=f"n={n}", unit="call")
  for job in jobs:  # warmup (and compile)
    job.run(warmup, record=False)
    bar.update(warmup)
  done, round_index = 0, 0
  while done < steps:
    size = min(chunk, steps - done)
    shift = round_index % len(jobs)
    for job in jobs[shift:] + jobs[:shift]:
      job.run(size)
      bar.update(size)
    done += size
    round_index += 1
  bar.close()
  return _summarize_size(n, num_matrices, jobs, skipped, steps)


def _summarize_size(
  n: int, num_matrices: int, jobs: Sequence[Job], skipped: dict[str, str], steps: int
) -> dict[str, Any]:
  by_name = {job.name: job for job in jobs}
  matmul_ms = by_name["matmul"].median_ms
  matmul_flops_per_s = 2 * n**3 / (matmul_ms / 1e3)
  methods = {}
  for name, job in by_name.items():
    if name in ("matmul", "eigh", "qr") or name.endswith("@refresh"):
      continue
    flops = num_matrices * update_flops(name, n, n)
    achieved = flops / (job.median_ms / 1e3)
    refresh_job = by_name.get(f"{name}@refresh")
    refresh_ms = refresh_job.median_ms if refresh_job else float("nan")
    methods[name] = {
      "median_ms": job.median_ms,
      "min_ms": float(np.min(job.times) * 1e3),
      "matmul_flops": flops,
      "gflops_per_s": achieved / 1e9 if flops else float("nan"),
      "fraction_of_matmul": achieved / matmul_flops_per_s if flops else float("nan"),
      "refresh_step_ms": refresh_ms,
      "refresh_extra_ms": refresh_ms - job.median_ms,
      "refresh_extra_per_block_ms": (refresh_ms - job.median_ms) / num_matrices,
      "note": COUNT_NOTES.get(name, ""),
    }
  return {
    "n": n,
    "num_matrices": num_matrices,
    "steps": steps,
    "matmul_ms": matmul_ms,
    "matmul_gflops_per_s": matmul_flops_per_s / 1e9,
    "eigh_ms": by_name["eigh"].median_ms,
    "qr_ms": by_name["qr"].median_ms,
    "methods": methods,
    "skipped": skipped,
  }


HEADERS = (
  "n",
  "method",
  "update ms",
  "matmul GFLOP",
  "GFLOP/s",
  "÷ matmul GFLOP/s",
  "refresh-step ms",
  "refresh extra ms / block",
  "eigh ms",
  "qr ms",
  "a@b ms (GFLOP/s)",
)


def markdown(report: dict[str, Any]) -> str:
  rows = []
  for size in report["sizes"]:
    for name, s in size["methods"].items():
      rows.append(
        (
          size["n"],
          name,
          s["median_ms"],
          s["matmul_flops"] / 1e9,
          s["gflops_per_s"],
          s["fraction_of_matmul"],
          s["refresh_step_ms"],
          s["refresh_extra_per_block_ms"],
          size["eigh_ms"],
          size["qr_ms"],
          f"{size['matmul_ms']:.3g} ({size['matmul_gflops_per_s']:.0f})",
        )
      )
  env = report["environment"]
  lines = [
    "# Optimizer update alone vs plain matmul throughput",
    "",
    f"Stack of {report['num_matrices']} square matrices per size; jax {env['jax']}, "
    f"{env['cpu_count']} CPUs, "
    f"OPENBLAS_NUM_THREADS={env.get('openblas_num_threads') or 'unset'}, "
    f"load average {env['load_average_1_5_15']} at start; "
    f"wall {report['wall_seconds']:.0f} s"
    + ("; eigh batched as lax.map (--sequential_eigh)." if report["sequential_eigh"] else "."),
    "",
    models.markdown_table(HEADERS, rows),
    "",
    "Matmul FLOPs per non-refresh update of an m×n block (counted from the code): "
    + ", ".join(
      f"{k} {v}·2mn(m+n)" + (" + 2mn·min(m,n)" if k in UNMERGED_WHITENING else "")
      for k, v in FLOP_COUNTS.items()
      if v
    )
    + ".",
  ]
  lines += [f"- {k}: {v}" for k, v in COUNT_NOTES.items()]
  skipped = {m: r for size in report["sizes"] for m, r in size["skipped"].items()}
  lines += [f"- skipped {method}: {reason}" for method, reason in skipped.items()]
  return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(10, 3.8))
  FigureCanvasAgg(fig)
  left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
  sizes = [s["n"] for s in report["sizes"]]
  names = sorted({m for s in report["sizes"] for m in s["methods"] if m != "adamw"})
  for name in names:
    fractions = [
      s["methods"].get(name, {}).get("fraction_of_matmul", np.nan) for s in report["sizes"]
    ]
    extra = [
      s["methods"].get(name, {}).get("refresh_extra_per_block_ms", np.nan) for s in report["sizes"]
    ]
    left.plot(sizes, fractions, "o-", label=name)
    right.plot(sizes, extra, "o-", label=f"{name} refresh")
  right.plot(sizes, [s["eigh_ms"] for s in report["sizes"]], "k--", label="eigh")
  right.plot(sizes, [s["qr_ms"] for s in report["sizes"]], "k:", label="qr")
  left.axhline(0.5, color="gray", lw=0.8)
  left.set(
    xscale="log",
    xlabel="n",
    ylabel="achieved / matmul FLOP/s",
    title="non-refresh update throughput",
  )
  right.set(
    xscale="log",
    yscale="log",
    xlabel="n",
    ylabel="ms per n×n block",
    title="refresh extra cost vs eigh / qr",
  )
  for ax in (left, right):
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def run(
  sizes: Sequence[int],
  num_matrices: int,
  methods: Sequence[str],
  *,
  warmup: int = 2,
  steps: int = 10,
  large_steps: int = 3,
  chunk: int = 2,
  refresh: bool = True,
  progress: bool = True,
  out_dir: str = "outputs/benchmarks",
) -> dict[str, Any]:
  started = time.perf_counter()
  report: dict[str, Any] = {
    "environment": models.environment(),
    "num_matrices": num_matrices,
    "sizes": [],
    "flop_counts_pairs": FLOP_COUNTS,
    "sequential_eigh": models.sequential_eigh_active(),
  }
  for n in sizes:
    count = large_steps if n >= 2048 else steps
    print(f"[optimizer_only] n={n}, {num_matrices} matrices, {count} timed calls", flush=True)
    report["sizes"].append(
      measure_size(n, num_matrices, methods, warmup, count, chunk, refresh, progress)
    )
  report["wall_seconds"] = time.perf_counter() - started
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "optimizer_only.json"), "w") as f:
    json.dump(report, f, indent=1)
  text = markdown(report)
  with open(os.path.join(out_dir, "optimizer_only.md"), "w") as f:
    f.write(text)
  plot(report, os.path.join(out_dir, "optimizer_only.png"))
  print(text, flush=True)
  return report


def main(argv: Sequence[str]) -> None:
  del argv
  if _SEQUENTIAL_EIGH.value:
    models.sequential_eigh_workaround()
  sizes = [int(s) for s in _SIZES.value]
  num_matrices, warmup, steps, chunk = (
    _NUM_MATRICES.value,
    _WARMUP.value,
    _STEPS.value,
    _CHUNK.value,
  )
  if _SMOKE.value:  # flags given explicitly still win over the smoke defaults
    sizes = sizes if _SIZES.present else [32]
    num_matrices = num_matrices if _NUM_MATRICES.present else 2
    warmup = warmup if _WARMUP.present else 1
    steps = steps if _STEPS.present else 2
  run(
    sizes,
    num_matrices,
    _METHODS.value,
    warmup=warmup,
    steps=steps,
    large_steps=_LARGE_STEPS.value,
    chunk=chunk,
    refresh=_REFRESH.value,
    progress=_PROGRESS.value,
    out_dir=_OUT_DIR.value,
  )


if __name__ == "__main__":
  app.run(main)
