"""Imports PSGD Kron from ``psgd-jax`` on current optax (shared by the benchmarks).

psgd-jax 0.2.9 imports ``optax._src.clipping``, which optax 0.2.8 moved to
``optax.transforms._clipping``. ``alias_optax_clipping`` registers the new module under the old
name before the import; the package's own code is not modified. Nothing here imports psgd-jax
at module load, so callers can probe for it cheaply.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from typing import Any


def alias_optax_clipping() -> None:
  """Makes ``optax._src.clipping`` importable when this optax no longer has it."""
  if "optax._src.clipping" in sys.modules:
    return
  try:
    if importlib.util.find_spec("optax._src.clipping") is not None:
      return  # an optax that still has the module: nothing to do
  except ModuleNotFoundError:
    pass
  clipping = importlib.import_module("optax.transforms._clipping")
  sys.modules["optax._src.clipping"] = clipping


def import_kron() -> Callable[..., Any]:
  """``psgd_jax.kron.kron``; raises ``ImportError`` if psgd-jax is not installed."""
  alias_optax_clipping()
  from psgd_jax.kron import kron

  return kron


def kron_unavailable() -> str | None:
  """None if ``import_kron`` works here, else the reason (the import error)."""
  try:
    import_kron()
  except Exception as error:  # noqa: BLE001  (any failure means: not available here)
    return f"{type(error).__name__}: {error}"
  return None
