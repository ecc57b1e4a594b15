"""Eager checks of constructor options: bad values raise ``ValueError`` with the value.

Traced values (under ``optax.inject_hyperparams`` or ``jax.jit``) cannot be checked eagerly and
are let through; concrete Python and NumPy numbers are checked.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _concrete(name: str, value: Any, domain: str) -> float | None:
  """``value`` as a float when it is a concrete number; ``None`` when it is traced (or an array
  of more than one number, which is let through as before). Anything else (a string, a bool,
  ``None``, a container) is not a number: ``ValueError`` naming ``domain``."""
  import jax

  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, (bool, np.bool_)):
    pass
  elif isinstance(value, (int, float, np.number)):
    return float(value)
  elif isinstance(value, (np.ndarray, jax.Array)):
    if value.ndim == 0 and value.dtype != np.bool_:
      return float(value)
    if value.ndim:
      return None
  raise ValueError(f"{name} must be a number {domain}, got {value!r}.")


def check_beta(name: str, value: Any) -> None:
  """``value`` must lie in ``[0, 1)``."""
  number = _concrete(name, value, "in [0, 1)")
  if number is not None and not 0.0 <= number < 1.0:
    raise ValueError(f"{name} must be in [0, 1), got {value!r}.")


def check_beta_or_sum(name: str, value: Any) -> None:
  """``value`` must lie in ``[0, 1]`` (``1``: a sum instead of an EMA)."""
  number = _concrete(name, value, "in [0, 1]")
  if number is not None and not 0.0 <= number <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {value!r}.")


def check_positive(name: str, value: Any) -> None:
  """``value`` must be ``> 0``."""
  number = _concrete(name, value, "> 0")
  if number is not None and not 0.0 < number < float("inf"):
    raise ValueError(f"{name} must be finite and > 0, got {value!r}.")


def check_nonnegative(name: str, value: Any) -> None:
  """``value`` must be ``>= 0``."""
  number = _concrete(name, value, ">= 0")
  if number is not None and not 0.0 <= number < float("inf"):
    raise ValueError(f"{name} must be finite and >= 0, got {value!r}.")


def check_at_most(name: str, value: Any, bound: float) -> None:
  """A concrete ``value`` must be ``<= bound`` (combine with another check for the rest)."""
  number = _concrete(name, value, f"<= {bound}")
  if number is not None and not number <= bound:
    raise ValueError(f"{name} must be <= {bound}, got {value!r}.")


def check_nonnegative_or_schedule(name: str, value: Any) -> None:
  """``value`` must be ``>= 0`` or a schedule (a callable of the step, as optax takes)."""
  if not callable(value):
    check_nonnegative(name, value)


def check_frequency(name: str, value: Any) -> None:
  """``value`` must be a Python integer ``>= 1`` (it is static)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(
      f"{name} must be a Python integer >= 1, got {value!r} (it is static: under "
      f"optax.inject_hyperparams pass static_args=kl_precond.STATIC_HYPERPARAMS)."
    )


def check_integer(name: str, value: Any, minimum: int) -> None:
  """``value`` must be a (static) integer ``>= minimum``; a bool is not one."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
  if value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def check_bool(name: str, value: Any) -> None:
  """``value`` must be a Python or NumPy bool (it is static: ``1``, ``"yes"`` or ``None`` are
  not)."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be True or False, got {value!r}.")


def check_dtype(name: str, value: Any) -> None:
  """``value`` must be ``None`` or a floating-point dtype that ``jnp.dtype`` accepts (e.g.
  ``jnp.bfloat16``, ``"float32"``)."""
  if value is None:
    return
  import jax.numpy as jnp

  try:
    dtype = jnp.dtype(value)
  except (TypeError, ValueError):
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} must be None or a floating-point dtype, got {value!r}.")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
  """``value`` must be one of ``choices``."""
  if isinstance(value, (bool, np.bool_)) or value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


def check_stage(name: str, value: Any, methods: tuple[str, ...]) -> None:
  """``value`` must have the callable ``methods`` of its kind of stage (or transformation)."""
  missing = [m for m in methods if not callable(getattr(value, m, None))]
  if missing:
    raise ValueError(
      f"{name} must have the methods {', '.join(methods)} (missing {', '.join(missing)}), "
      f"got {value!r}."
    )


def check_axes_per_order(name: str, value: Any) -> None:
  """``value`` must map block orders ``k >= 1`` to sequences of distinct axes ``0 <= a < k``
  (``{order: (axis, ...)}``, or the pairs of such a mapping)."""
  from collections.abc import Mapping

  def is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))

  def valid() -> bool:
    pairs = value.items() if isinstance(value, Mapping) else value
    if isinstance(value, (str, bytes)) or not isinstance(value, (Mapping, tuple, list)):
      return False
    for pair in pairs:
      if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        return False
      order, axes = pair
      if not is_int(order) or order < 1 or not isinstance(axes, (tuple, list)):
        return False
      if not all(is_int(a) and 0 <= a < order for a in axes) or len(set(axes)) != len(axes):
        return False
    return True

  if not valid():
    raise ValueError(
      f"{name} must be {{order: (axis, ...)}} with orders >= 1 and distinct axes "
      f"0 <= axis < order, got {value!r}."
    )
