"""Eager checks of constructor options: bad values raise ``ValueError`` with the value.

Traced values (under ``optax.inject_hyperparams`` or ``jax.jit``) cannot be checked eagerly and
are let through; concrete Python and NumPy numbers are checked.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _concrete(value: Any) -> float | None:
  """Returns ``value`` as a float when it is a concrete number, else ``None``."""
  if isinstance(value, bool):
    return None
  if isinstance(value, (int, float, np.number)):
    return float(value)
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return float(value)
  try:
    import jax

    if isinstance(value, jax.Array) and value.ndim == 0 and not isinstance(value, jax.core.Tracer):
      return float(value)
  except (TypeError, AttributeError):  # pragma: no cover - defensive
    return None
  return None


def check_beta(name: str, value: Any) -> None:
  """``value`` must lie in ``[0, 1)``."""
  number = _concrete(value)
  if number is not None and not 0.0 <= number < 1.0:
    raise ValueError(f"{name} must be in [0, 1), got {value!r}.")


def check_beta_or_sum(name: str, value: Any) -> None:
  """``value`` must lie in ``[0, 1]`` (``1``: a sum instead of an EMA)."""
  number = _concrete(value)
  if number is not None and not 0.0 <= number <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {value!r}.")


def check_positive(name: str, value: Any) -> None:
  """``value`` must be ``> 0``."""
  number = _concrete(value)
  if number is not None and not 0.0 < number < float("inf"):
    raise ValueError(f"{name} must be finite and > 0, got {value!r}.")


def check_nonnegative(name: str, value: Any) -> None:
  """``value`` must be ``>= 0``."""
  number = _concrete(value)
  if number is not None and not 0.0 <= number < float("inf"):
    raise ValueError(f"{name} must be finite and >= 0, got {value!r}.")


def check_frequency(name: str, value: Any) -> None:
  """``value`` must be a Python integer ``>= 1`` (it is static)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(
      f"{name} must be a Python integer >= 1, got {value!r} (it is static: under "
      f"optax.inject_hyperparams pass static_args=kl_precond.STATIC_HYPERPARAMS)."
    )


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
  """``value`` must be one of ``choices``."""
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}.")
