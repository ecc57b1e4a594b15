"""Process settings the timing benchmarks need on CPU; call before jax is imported.

Imports nothing but the standard library, so a benchmark can call it ahead of its jax import.
"""

from __future__ import annotations

import os

SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def disable_concurrency_scheduler() -> None:
  """Adds ``SCHEDULER_FLAG`` to ``XLA_FLAGS`` unless ``KL_PRECOND_BENCH_XLA_SCHEDULER=default``.

  XLA's CPU scheduler in jaxlib 0.10 can deadlock (a step never returns from
  ``block_until_ready``; seen with kl_precond's first SOAP step on the transformer).
  """
  if os.environ.get("KL_PRECOND_BENCH_XLA_SCHEDULER") == "default":
    return
  flags = dict.fromkeys([*os.environ.get("XLA_FLAGS", "").split(), SCHEDULER_FLAG])
  os.environ["XLA_FLAGS"] = " ".join(flags)


def one_openblas_thread() -> None:
  """``OPENBLAS_NUM_THREADS=1`` unless the caller set it (``=2`` on 2 cores times the default).

  jaxlib's CPU QR and eigh call scipy's OpenBLAS while XLA spreads a batched decomposition over
  its own pool, so OpenBLAS's threads oversubscribe the cores: a transformer SOAP refresh step
  took 1421 ms with them, 1256 ms without (2026-12-05). Eighs do not gain (README, "Performance").
  Child processes inherit the setting.
  """
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
