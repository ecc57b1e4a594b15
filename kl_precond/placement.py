"""Where the chassis places its stacks of blocks on a mesh: :class:`Placement` and its pinning.

When the gradients are replicated, the chassis (:mod:`kl_precond.preconditioner`) has each
device slice its own blocks of the gradient stacks (no communication) and assembles each
sharded bucket's update with one all-gather. The shardings it places them by arrive as a
:class:`Placement`: read from the types on a mesh with Explicit axes
(:func:`kl_precond.preconditioner.on_auto_axes`), or set by :func:`placed` (as
:func:`kl_precond.sharding.jit_update` does, on any mesh).

This module imports neither the chassis nor :mod:`kl_precond.sharding`; both import it, and
:mod:`kl_precond.sharding` re-exports :func:`placed`, :func:`axis_size` and
:func:`bucket_leaf_spec`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

Axis = str | tuple[str, ...]


def axis_size(mesh: Any, axis: Axis) -> int:
  """Number of devices along a mesh axis name or tuple of names."""
  names = (axis,) if isinstance(axis, str) else tuple(axis)
  return math.prod(mesh.shape[name] for name in names)


def split_leading(ndim: int, axis: Axis) -> P:
  """``P(axis, None, ...)`` for an array of ``ndim`` axes."""
  return P(axis, *([None] * (ndim - 1)))


def bucket_leaf_spec(shape: tuple[int, ...], size: int, axis: Axis) -> P:
  """A bucket leaf is split on its block (leading) axis where that divides evenly by ``size``,
  else replicated. The chassis places its stacks of blocks by the same rule
  (:class:`Placement`)."""
  return split_leading(len(shape), axis) if shape and shape[0] % size == 0 else P()


def all_auto(mesh: Any) -> Any:
  """``mesh`` with every axis Auto (what ``with_sharding_constraint`` takes inside
  ``auto_axes``)."""
  return mesh.update_axis_types({name: jax.sharding.AxisType.Auto for name in mesh.axis_names})


def is_replicated(spec: P) -> bool:
  """No axis of ``spec`` is sharded."""
  return all(entry is None for entry in spec)


@dataclasses.dataclass(frozen=True)
class Placement:
  """What the chassis knows of the shardings it is called with: read from the types on a mesh
  with Explicit axes (:func:`kl_precond.preconditioner.on_auto_axes`), or given by
  :func:`placed` (as :func:`kl_precond.sharding.jit_update` does, on any mesh).

  Attributes:
    mesh: the mesh, with every axis switched to Auto (as inside ``auto_axes``).
    axis: the mesh axis (or axes) the buckets' leading axis is sharded on; ``None`` if no
      bucket is sharded.
    replicated: every incoming gradient leaf is replicated.
  """

  mesh: Any
  axis: Any
  replicated: bool

  def blocks(self, stack: jax.Array) -> jax.sharding.NamedSharding | None:
    """The sharding of a stack's blocks, as :func:`kl_precond.sharding.state_specs` gives the
    state: split over ``axis`` when the number of blocks divides by its size; else ``None``."""
    if self.axis is None:
      return None
    spec = bucket_leaf_spec(stack.shape, axis_size(self.mesh, self.axis), self.axis)
    return None if spec == P() else jax.sharding.NamedSharding(self.mesh, spec)

  def replicated_sharding(self) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh, P())


_PLACEMENT: contextvars.ContextVar[Placement | None] = contextvars.ContextVar(
  "kl_precond_placement", default=None
)


@contextlib.contextmanager
def placed(placement: Placement | None) -> Iterator[None]:
  """Within this context (while tracing), the chassis places its stacks by ``placement``."""
  token = _PLACEMENT.set(placement)
  try:
    yield
  finally:
    _PLACEMENT.reset(token)


def current() -> Placement | None:
  """The placement set by the innermost :func:`placed`, or ``None``."""
  return _PLACEMENT.get()


def pin_gradients(grads: tuple[jax.Array, ...], placement: Placement | None) -> Any:
  """Replicated gradients: each device takes its blocks of the stack locally."""
  if placement is None or not placement.replicated:
    return grads
  pinned = []
  for stack in grads:
    blocks = placement.blocks(stack)
    if blocks is not None:
      stack = jax.lax.with_sharding_constraint(stack, placement.replicated_sharding())
      stack = jax.lax.with_sharding_constraint(stack, blocks)
    pinned.append(stack)
  return tuple(pinned)


def pin_directions(directions: tuple[jax.Array, ...], placement: Placement | None) -> Any:
  """Replicated gradients: the update is assembled by one all-gather per sharded bucket."""
  if placement is None or not placement.replicated:
    return directions
  return tuple(
    d if placement.blocks(d) is None
    else jax.lax.with_sharding_constraint(d, placement.replicated_sharding())
    for d in directions
  )  # fmt: skip
