"""Sharding the optimizer state over a device mesh, so that each device refreshes its share.

A :class:`~kl_precond.PreconditionerState` keeps one stack per bucket of equal-shape blocks
(:mod:`kl_precond.layout`), and all per-block work, the eigh/QR refresh included, is ``vmap``-ed
over the stack's leading axis. Sharding that axis over a mesh axis splits the refresh across the
devices (the work split of Distributed Shampoo) without any change to the optimizer: XLA
partitions the batched decompositions, and no block needs data from another device.

* :func:`state_specs` / :func:`state_shardings` give the ``PartitionSpec`` / ``NamedSharding`` of
  every leaf of an optimizer state: a full ``optax`` chain, ``optax.inject_hyperparams`` or
  ``optax.partition`` included, given the state or ``jax.eval_shape`` of it.

  - A bucket leaf whose leading (block) axis divides evenly by the mesh axis: ``P(axis, None,
    ...)``. Its blocks are split over the devices.
  - A subtree shaped like the parameters (e.g. the moments of ``optax.adam``), or a leaf with
    the shape of exactly one parameter sharding: the parameters' shardings.
  - Everything else (counters, hyperparameters, buckets of an odd size): replicated, ``P()``.
    A replicated bucket is refreshed on every device.

* :func:`fsdp_specs` / :func:`fsdp_shardings`: FSDP-style parameter shardings, the first axis
  of big tensors split over a mesh axis. The optimizer accepts parameters and gradients sharded
  this way; the stacks of blocks are re-laid out inside the step.
* :func:`with_auto_axes` runs a transform's ``update`` with the mesh's Explicit axes switched
  to Auto, as this package's own transforms do by themselves: ``jax.make_mesh`` gives Explicit
  axes by default, and there the chassis' stacks of gradient blocks (replicated) would meet the
  sharded state inside ``vmap`` (``ValueError: Mapped away dimension of inputs passed to vmap
  should be sharded the same``); under Auto axes XLA propagates the state's sharding instead.
  The outputs keep the sharding types of the inputs. Use it for other ``optax`` transforms that
  fail on Explicit meshes.
* :func:`jit_init` and :func:`jit_update`: ``jax.jit`` of ``init`` and ``update`` with these
  shardings in and out (``update`` wrapped by :func:`with_auto_axes` and traced under
  :func:`placed`).
* :func:`placement_of` and :func:`placed`: the placement of the chassis' stacks of blocks, for
  steps of one's own on Auto meshes (below).

Example (single host)::

  mesh = jax.make_mesh((jax.device_count(),), ("blocks",))
  tx = kp.soap(3e-3, precondition_frequency=10)
  param_shardings = kp.sharding.fsdp_shardings(params, mesh, "blocks")
  params = jax.device_put(params, param_shardings)
  abstract = jax.eval_shape(tx.init, params)
  state_shardings = kp.sharding.state_shardings(abstract, mesh, "blocks", params=params)
  state = kp.sharding.jit_init(tx, param_shardings, state_shardings)(params)
  update = kp.sharding.jit_update(tx, param_shardings, state_shardings)
  updates, state = update(grads, state, params)

Inside a training step of one's own, under ``jax.jit`` with these ``in_shardings`` and
``out_shardings``, call ``tx.update`` as usual, on either kind of mesh.

**Placement of the stacks.** When the gradients are replicated the chassis has each device slice
its own blocks of the gradient (no communication) and gathers each sharded bucket's update with
one all-gather (:class:`kl_precond.placement.Placement`). It learns the shardings from the
types it is called with on a mesh with Explicit axes (``jax.make_mesh``'s default), and from
:func:`jit_update` on either kind; a step of one's own on an Auto mesh traces ``tx.update``
inside ``with placed(placement_of(param_shardings, state_shardings)):``. Left to XLA, blocks
moved between devices by collective-permutes or all-to-alls and the update was assembled as an
all-reduce of zero-padded blocks (in two processes of one core each, a refresh step of 16 blocks
of 256² took 164 ms that way against 64 ms placed; ``tests/test_sharding.py`` checks the
collectives).

**Bucket sizes.** Only a bucket whose size divides by the mesh axis size can be sharded: on 8
devices, 3 matrices of one shape stay replicated (``jax`` rejects uneven shardings of stored
arrays). Choose a mesh axis that divides the common bucket sizes (e.g. the number of layers), or
pad the buckets (``LayoutConfig(bucket_multiple=...)``, where the layout supports it).

**Fake CPU devices.** With ``--xla_force_host_platform_device_count`` the devices share the
host's cores, so sharding gives correctness, not speed. On jaxlib 0.10.2 a sharded refresh can
also hang there when each device holds several large blocks (e.g. 8 blocks of 256² per device on
2 cores): a batched LAPACK call under ``lax.cond`` waits on the intra-op thread pool whose every
thread is such a call. ``benchmarks/scaling.py`` documents the cases; one block, or a few small
ones, per device ran fine.

**Multi-host.** Use JAX's own runtime; nothing here is host-specific. Call
``jax.distributed.initialize()`` once in every process, before any other JAX call, then run the
same code: ``jax.make_mesh((jax.device_count(),), ("blocks",))`` builds a global mesh over the
devices of all hosts, the helpers only read the mesh's axis sizes, and :func:`jit_init` creates
the state directly in its sharded layout, so no host ever holds the whole state. Parameters and
gradients must be global ``jax.Array`` values (from a jitted init with ``out_shardings``, or
``jax.make_array_from_process_local_data`` for per-host batches), and a result is read back with
``jax.experimental.multihost_utils.process_allgather``. ``tests/test_multiprocess.py`` runs this
recipe in two processes on one machine (2 CPU devices each, CPU collectives by gloo, jax's default
on CPU): the updates of every method equal one device's to 1e-6.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import jax
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kl_precond import placement as placement_lib
from kl_precond import preconditioner
from kl_precond.placement import Axis, axis_size, bucket_leaf_spec, placed
from kl_precond.preconditioner import PreconditionerState


def _bucket_specs(state: PreconditionerState, size: int, axis: Axis) -> PreconditionerState:
  """Splits bucket leaves on their block axis where it divides evenly; counters replicated."""

  def spec(leaf: Any) -> P:
    return bucket_leaf_spec(tuple(leaf.shape), size, axis)

  replicated: Any = P()
  return PreconditionerState(replicated, replicated, replicated, jax.tree.map(spec, state.buckets))


def _spec_of(sharding: Any) -> P:
  """A ``PartitionSpec`` from a spec, a ``NamedSharding`` or an array carrying one, else ``P()``."""
  if isinstance(sharding, P):
    return sharding
  if not isinstance(sharding, NamedSharding):
    sharding = getattr(sharding, "sharding", None)
  return sharding.spec if isinstance(sharding, NamedSharding) else P()


class _ParamMatcher:
  """Finds the subtrees and leaves of a state that are shaped like the parameters."""

  def __init__(self, params: Any, param_specs: Any) -> None:
    self.treedef = cast(Any, jax.tree.structure(params))
    self.shapes = [tuple(leaf.shape) for leaf in jax.tree.leaves(params)]
    self.specs = [_spec_of(s) for s in self.treedef.flatten_up_to(param_specs)]
    by_shape: dict[tuple[int, ...], set[P]] = {}
    for shape, spec in zip(self.shapes, self.specs, strict=True):
      by_shape.setdefault(shape, set()).add(spec)
    self.by_shape = {shape: next(iter(s)) for shape, s in by_shape.items() if len(s) == 1}

  def is_params(self, node: Any) -> bool:
    if jax.tree.structure(node) != self.treedef:
      return False
    return [tuple(leaf.shape) for leaf in jax.tree.leaves(node)] == self.shapes

  def subtree(self) -> Any:
    return self.treedef.unflatten(self.specs)

  def leaf(self, leaf: Any) -> P:
    return self.by_shape.get(tuple(leaf.shape), P())


def state_specs(
  state: Any, mesh: Mesh, axis: Axis = "blocks", *, params: Any = None, param_specs: Any = None
) -> Any:
  """The ``PartitionSpec`` of every leaf of an optimizer state (see the module docstring).

  This is what ``optax.tree.map_params(tx, f, state, param_specs, ...)`` gives for optax's own
  optimizers: ``map_params`` works here too, but a bucket's state is stacks of blocks with no
  parameter-shaped leaf, so it hands the buckets whole to ``transform_non_params``; this
  function splits them over ``axis``.

  Args:
    state: the optimizer state, or ``jax.eval_shape(tx.init, params)``; any ``optax`` state
      tree, with :class:`~kl_precond.PreconditionerState` nodes anywhere in it.
    mesh: the device mesh (only its axis sizes are read).
    axis: the mesh axis name, or tuple of names, that bucket stacks are split over.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``), to give state leaves shaped
      like them the parameters' shardings; ``None``: such leaves are replicated.
    param_specs: the parameters' specs or shardings (``PartitionSpec`` or ``NamedSharding``), a
      tree like ``params``; default: read from ``params``' own ``.sharding`` (``P()`` where there
      is none).

  Returns:
    A tree like ``state`` with a ``PartitionSpec`` per leaf.
  """
  size = axis_size(mesh, axis)
  matcher = None
  if params is not None:
    matcher = _ParamMatcher(params, params if param_specs is None else param_specs)

  def is_node(node: Any) -> bool:
    if isinstance(node, PreconditionerState):
      return True
    return matcher is not None and matcher.is_params(node)

  def spec(node: Any) -> Any:
    if isinstance(node, PreconditionerState):
      return _bucket_specs(node, size, axis)
    if matcher is None:
      return P()
    if matcher.is_params(node):
      return matcher.subtree()
    return matcher.leaf(node)

  return jax.tree.map(spec, state, is_leaf=is_node)


def state_shardings(
  state: Any, mesh: Mesh, axis: Axis = "blocks", *, params: Any = None, param_specs: Any = None
) -> Any:
  """The ``NamedSharding`` of every leaf of an optimizer state: :func:`state_specs` on ``mesh``."""
  specs = state_specs(state, mesh, axis, params=params, param_specs=param_specs)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)


def fsdp_specs(params: Any, mesh: Mesh, axis: Axis = "data", *, min_size: int = 2**16) -> Any:
  """FSDP-style specs (``PartitionSpec``): the first axis of every big tensor split over ``axis``.

  Args:
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    mesh: the device mesh.
    axis: the mesh axis name, or tuple of names, to split over.
    min_size: tensors with fewer elements stay replicated.

  Returns:
    A tree like ``params``: ``P(axis, None, ...)`` where the first axis divides evenly by the
    mesh axis size and the tensor has at least ``min_size`` elements, else ``P()``.
  """
  size = axis_size(mesh, axis)

  def spec(leaf: Any) -> P:
    shape = tuple(leaf.shape)
    if shape and shape[0] % size == 0 and math.prod(shape) >= min_size:
      return placement_lib.split_leading(len(shape), axis)
    return P()

  return jax.tree.map(spec, params)


def fsdp_shardings(params: Any, mesh: Mesh, axis: Axis = "data", *, min_size: int = 2**16) -> Any:
  """The shardings (``NamedSharding``) of :func:`fsdp_specs` on ``mesh``."""
  specs = fsdp_specs(params, mesh, axis, min_size=min_size)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)


def with_auto_axes(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` with its ``update`` run under ``jax.sharding.auto_axes`` on an Explicit mesh.

  The updates and the new state are resharded to the sharding types of the incoming updates and
  state, so the step keeps its Explicit types around the call. Without a mesh, or on a mesh
  with Auto axes only, ``update`` is called as it is. This package's own transforms do this
  already; the wrapper is for other ``optax`` transforms in the same step.

  Args:
    tx: any gradient transformation.

  Returns:
    The same transformation, usable inside ``jax.jit`` on an Explicit mesh.
  """
  return optax.GradientTransformation(tx.init, preconditioner.on_auto_axes(tx.update))


def placement_of(param_shardings: Any, state_shardings: Any) -> placement_lib.Placement | None:
  """The chassis' :class:`~kl_precond.placement.Placement` for these shardings.

  On an Explicit mesh the chassis reads it from the types it is called with; on an Auto mesh
  they carry no sharding, so a step of one's own that wants the same placement traces
  ``tx.update`` inside ``with kp.sharding.placed(kp.sharding.placement_of(...)):``
  (:func:`jit_update` does).

  Args:
    param_shardings: shardings (``NamedSharding``) of the parameters (and gradients).
    state_shardings: shardings (``NamedSharding``) of the state, e.g. from :func:`state_shardings`.

  Returns:
    The placement, or ``None`` when no leaf is a ``NamedSharding``.
  """
  named = [
    s for s in jax.tree.leaves((param_shardings, state_shardings)) if isinstance(s, NamedSharding)
  ]
  if not named:
    return None
  params = jax.tree.leaves(param_shardings)
  replicated = all(
    isinstance(s, NamedSharding) and placement_lib.is_replicated(s.spec) for s in params
  )
  return placement_lib.Placement(
    placement_lib.all_auto(named[0].mesh.abstract_mesh),
    preconditioner.block_axis(state_shardings),
    replicated,
  )


def jit_init(
  tx: optax.GradientTransformation, param_shardings: Any, state_shardings: Any
) -> Callable[[Any], Any]:
  """``jax.jit(tx.init)`` that creates the state directly in ``state_shardings``."""
  return jax.jit(tx.init, in_shardings=(param_shardings,), out_shardings=state_shardings)


def jit_update(
  tx: optax.GradientTransformation,
  param_shardings: Any,
  state_shardings: Any,
  *,
  donate_state: bool = False,
) -> Any:
  """``jax.jit`` of ``update(grads, state, params)`` with the given shardings in and out.

  Gradients and updates are sharded like the parameters. The update runs under
  :func:`with_auto_axes`, so the same call works on Explicit and Auto meshes, and under
  :func:`placed`, so that on either kind the chassis places its stacks of blocks by these
  shardings (replicated parameters: each device slices its blocks locally, one all-gather per
  sharded bucket).

  Args:
    tx: the gradient transformation.
    param_shardings: shardings (``NamedSharding``) of the parameters (and so of gradients and updates).
    state_shardings: shardings (``NamedSharding``) of the state, e.g. from :func:`state_shardings`.
    donate_state: donate the incoming state's buffers to the new state.

  Returns:
    The jitted ``update(grads, state, params) -> (updates, state)`` (``params`` is required).
  """
  update = with_auto_axes(tx).update
  placement = placement_of(param_shardings, state_shardings)

  def placed_update(updates: Any, state: Any, params: Any) -> Any:
    with placed(placement):
      return update(updates, state, params)

  return jax.jit(
    placed_update,
    in_shardings=(param_shardings, state_shardings, param_shardings),
    out_shardings=(param_shardings, state_shardings),
    donate_argnums=(1,) if donate_state else (),
  )
