"""The chassis: ``scale_by_preconditioner`` composes layout, estimator, basis and scaling.

One step, per bucket of equal-shape blocks (all ``vmap``ed over the stacked blocks):

1. **direction** with the current basis: ``U, scaling_state = scaling.update(G, ...)``;
2. **statistics**: ``estimator.update(G, ..., bases, ..., eigenvalues)`` folds the gradient into
   the factors (the basis stage's current bases and eigenvalues, for estimators that whiten);
3. **refresh** every ``T`` steps (under ``jax.lax.cond`` on the step counter):
   ``basis.refresh(factors)``, then ``scaling.rotate`` re-expresses buffers kept in the basis.

So the gradient of a step never enters the basis that preconditions it. With
``statistics_first=True`` (Distributed Shampoo's order) steps 2 and 3 run before step 1.

The first call (``first_call``):

* ``"init_only"`` (the authors' SOAP and KL code): only builds the factors and the first basis
  (eigendecomposition, descending columns) and returns a zero update; the step counter ``t``
  starts after it. An estimator whose ``seeds`` is true (the ``kl`` estimator's data starts)
  then sets its eigenvalue estimates from the first basis (``estimator.seed``).
* ``"precondition"``: builds the basis from the first gradient, then preconditions that gradient.
* ``"identity"`` (Distributed Shampoo): nothing special; the bases are the identity until the
  first refresh.

Refreshes happen at steps ``t`` with ``t % every == 0 and t > start`` or ``t == start``, where
``every`` and ``start`` belong to the basis stage (``start = 0`` by default).

A bucket's state may be sharded on its leading (block) axis (:mod:`kl_precond.sharding`); the
``vmap``ed refresh is then split across the devices. On a mesh with Explicit axes the update runs
under ``jax.sharding.auto_axes`` and returns updates and state with their input shardings. There the
shardings it was called with are read before the switch (a
:class:`~kl_precond.placement.Placement`; on any mesh, :func:`kl_precond.sharding.jit_update` sets
them) and, when the gradients are replicated, pin the stacks of blocks: each device slices its
blocks of the gradient locally and the update is assembled by one all-gather per bucket. Left to
XLA's propagation, the stacking became one all-to-all per tensor and the assembly a sum of
zero-padded blocks (an all-reduce); in two processes joined by ``jax.distributed`` (gloo, one core
each) a refresh step of 16 blocks of 256² took 164 ms that way and 64 ms pinned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, cast

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from kl_precond import layout as layout_lib
from kl_precond import placement as placement_lib
from kl_precond import tensor_ops
from kl_precond._validation import check_bool, check_choice, check_stage

# The placement of the stacks of blocks lives in ``kl_precond.placement`` (which imports neither
# this module nor ``kl_precond.sharding``); these names are also found here, as before.
from kl_precond.placement import Placement, all_auto, is_replicated, placed

# The stages, as the chassis calls them: one block at a time (the chassis ``vmap``s every method
# over a bucket's stacked blocks). Each stage has its own state type (``Any`` here); ``bases``
# are per axis a (d, d) matrix or None, ``step`` a traced int32 scalar, ``hold`` and ``initial``
# traced flags or None. The parameters are positional-only: the chassis passes them by position.
# Members the chassis reads with ``getattr`` (a default when absent) are optional, so they are
# not part of these protocols; each protocol's docstring lists them.


class Estimator(Protocol):
  """The factor statistics (:func:`kl_precond.frobenius`, :func:`kl_precond.kl`,
  :func:`kl_precond.kl_roots`).

  Optional (read with ``getattr``): ``seeds`` (default False; when true, the methods of
  :class:`SeedingEstimator` are called) and ``eigenvalues_fixed_between_refreshes`` (default
  False; a scaling with ``cache_roots=True`` needs it true).
  """

  def init(self, shape: Sequence[int], mask: Sequence[bool], dtype: Any, /) -> Any: ...

  def first(self, grad: jax.Array, state: Any, /) -> Any:
    """The factors from the first gradient (called with ``first_call="precondition"``)."""
    ...

  def update(
    self,
    grad: jax.Array,
    state: Any,
    bases: Sequence[jax.Array | None],
    initial: Any,
    hold: Any,
    eigenvalues: Any,
    step: Any,
    /,
  ) -> Any:
    """Folds the gradient into the factors (on the ``initial`` call, as ``first``)."""
    ...

  def factors(self, state: Any, step: Any, /) -> Any:
    """The factors the basis stage decomposes."""
    ...

  def eigenvalues(self, state: Any, basis_state: Any, /) -> Any:
    """The eigenvalue estimates in the current basis, per axis (or None)."""
    ...

  def gain(self, state: Any, basis_state: Any, /) -> Any:
    """Bound on ``|entry| / ‖G‖²`` of what an update writes (called with
    ``nonfinite="skip"``)."""
    ...


class SeedingEstimator(Estimator, Protocol):
  """An estimator with ``seeds`` true: it sets its eigenvalue estimates from the first basis.
  Optional: the chassis calls these methods only when ``getattr(estimator, "seeds", False)``."""

  def seed(self, state: Any, bases: Any, /) -> Any: ...

  def estimates(self, state: Any, /) -> Any:
    """The part of the state ``seed`` sets."""
    ...

  def with_estimates(self, state: Any, estimates: Any, /) -> Any: ...


class BasisStage(Protocol):
  """The refresh policy (:func:`kl_precond.qr_every`, :func:`kl_precond.eigh_every`,
  :func:`kl_precond.qr_algorithm_every`). Its state has ``bases`` and ``eigenvalues`` (per
  axis).

  Optional (read with ``getattr``): ``keep_bases`` (default True); when false, the chassis
  calls ``stored(state)`` (the state kept between refreshes) after each decomposition.
  ``stagger`` (default False): spread the refresh of the blocks over the ``T`` steps of a cycle
  (:func:`refresh_schedule`).
  """

  @property
  def every(self) -> Any:
    """The refresh period ``T``."""
    ...

  @property
  def start(self) -> Any:
    """The step of the first refresh."""
    ...

  def init(self, shape: Sequence[int], mask: Sequence[bool], dtype: Any, /) -> Any: ...

  def first(self, factors: Any, state: Any, /) -> Any:
    """The first basis (an eigendecomposition)."""
    ...

  def refresh(self, factors: Any, state: Any, /) -> tuple[Any, Any, Any]:
    """A periodic refresh: the new state, per-axis permutations (or None) and a failure flag."""
    ...


class ScalingStage(Protocol):
  """What is done in the eigenbasis (:func:`kl_precond.adam`,
  :func:`kl_precond.kronecker_eigenvalues`, :func:`kl_precond.eigenvalue_corrected`).

  Optional (read with ``getattr``): ``cache_roots`` (default False).
  """

  def init(self, shape: Sequence[int], mask: Sequence[bool], dtype: Any, /) -> Any: ...

  def update(
    self,
    grad: jax.Array,
    state: Any,
    bases: Sequence[jax.Array | None],
    eigenvalues: Any,
    step: Any,
    hold: Any,
    /,
  ) -> tuple[jax.Array, Any]:
    """The direction and the new state."""
    ...

  def rotate(
    self,
    state: Any,
    old_bases: Sequence[jax.Array | None],
    new_bases: Sequence[jax.Array | None],
    permutations: Sequence[Any],
    eigenvalues: Any,
    /,
  ) -> Any:
    """Re-expresses the state after a basis change."""
    ...


class BucketState(NamedTuple):
  """The state of one bucket; every leaf has a leading axis of the bucket's size."""

  estimator: Any  # the estimator's state, e.g. FrobeniusState or KLState
  basis: Any  # BasisState
  scaling: Any  # e.g. AdamState or MomentumState


class PreconditionerState(NamedTuple):
  """State of :func:`scale_by_preconditioner`."""

  count: jax.Array  # type: ignore[assignment]  # (), int32: accepted update calls so far
  skipped: jax.Array  # (), int32: calls skipped because the gradient was not finite
  basis_failures: jax.Array  # (), int32: blocks whose refresh gave a non-finite basis (kept old)
  buckets: tuple[BucketState, ...]


@dataclasses.dataclass(frozen=True)
class _Stages:
  estimator: Estimator
  basis: BasisStage
  scaling: ScalingStage
  fallback: ScalingStage | None

  def scaling_for(self, bucket: layout_lib.Bucket) -> ScalingStage:
    if self.fallback is not None and not any(bucket.preconditioned):
      return self.fallback
    return self.scaling


def _stack(tree: Any, size: int) -> Any:
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (size, *x.shape)), tree)


class _BucketsWithoutParams:
  """What ``init`` returns for the buckets of ``optax.tree.map_params``' shapeless placeholder:
  one leaf, so that map_params passes the whole bucket tuple (stacks of blocks, no
  parameter-shaped leaf) to its ``transform_non_params``. Their shardings come from
  :func:`kl_precond.sharding.state_specs`."""

  def __repr__(self) -> str:
    return "<kl_precond buckets: no parameter-shaped leaves>"


def _is_map_params_placeholder(params: Any) -> bool:
  """Whether ``params`` is the placeholder that ``optax.tree.map_params`` initialises with."""
  return type(params).__name__ == "_ParamsPlaceholder" and not jax.tree.leaves(params)


def _init_bucket(stages: _Stages, bucket: layout_lib.Bucket) -> BucketState:
  args = (bucket.shape, bucket.preconditioned, bucket.dtype)
  state = BucketState(
    stages.estimator.init(*args), stages.basis.init(*args), stages.scaling_for(bucket).init(*args)
  )
  return _stack(state, bucket.size)


def _first(
  stages: _Stages,
  bucket: layout_lib.Bucket,
  grads: jax.Array,
  state: BucketState,
  step: Any,
  after: Any = None,
  hold: Any = None,
) -> BucketState:
  """First call: factors from the gradient, then the first (eigh) basis, once ``after`` is done.
  Where the traced flag ``hold`` is set (a skipped call) the state is left as it was."""
  if not any(bucket.preconditioned):
    return state
  estimator = jax.vmap(stages.estimator.first)(grads, state.estimator)
  factors = jax.vmap(stages.estimator.factors, in_axes=(0, None))(estimator, step)
  factors = tensor_ops.after(factors, after)
  basis = jax.vmap(stages.basis.first)(factors, state.basis)
  if _seeds(stages):
    estimator = jax.vmap(_seeder(stages).seed)(estimator, basis.bases)
  scaling = _rotate(
    stages, stages.scaling_for(bucket), estimator, state.scaling, state.basis, basis, None
  )
  basis, scaling = _settle(stages, basis, scaling, state.scaling)
  new = state._replace(estimator=estimator, basis=basis, scaling=scaling)
  return new if hold is None else _select(hold, state, new)


def _seeds(stages: _Stages) -> bool:
  """The estimator sets its eigenvalue estimates from the first basis (``estimator.seed``)."""
  return bool(getattr(stages.estimator, "seeds", False))


def _seeder(stages: _Stages) -> SeedingEstimator:
  """The estimator as a :class:`SeedingEstimator` (only where :func:`_seeds` is true)."""
  return cast(SeedingEstimator, stages.estimator)


def _select(flag: Any, old: Any, new: Any) -> Any:
  """``old`` where the traced flag is set, else ``new``, leaf by leaf."""
  if flag is None:
    return new
  return jax.tree.map(lambda n, o: jnp.where(flag, o, n), new, old)


def _rotate(
  stages: _Stages,
  scaling: ScalingStage,
  estimator: Any,
  scaling_state: Any,
  old: Any,
  new: Any,
  permutations: Any,
) -> Any:
  """``scaling.rotate`` after a basis change, with the eigenvalue estimates of the new basis."""
  if permutations is None:
    permutations = (None,) * len(new.bases)
  eigenvalues = jax.vmap(stages.estimator.eigenvalues)(estimator, new)
  return jax.vmap(scaling.rotate)(scaling_state, old.bases, new.bases, permutations, eigenvalues)


def _settle(stages: _Stages, new: Any, rotated: Any, old_scaling: Any) -> tuple[Any, Any]:
  """What a decomposition leaves in the state. A basis stage that does not store its bases
  (``eigh_every(keep_bases=False)``) could not restore the previous ones after a failed
  decomposition, so such a block keeps its previous scaling state (the roots built from its
  previous bases) instead, and the new bases are dropped once the scaling has used them."""
  if getattr(stages.basis, "keep_bases", True):
    return new, rotated
  failed = jax.vmap(lambda bases: jnp.logical_not(tensor_ops.all_finite(bases)))(new.bases)

  def keep_failed(n: jax.Array, o: jax.Array) -> jax.Array:
    return jnp.where(failed.reshape(failed.shape + (1,) * (n.ndim - 1)), o, n)

  # ``stored`` is optional (BasisStage): only a stage with ``keep_bases=False`` has it.
  stored = cast(Any, stages.basis).stored(new)
  return stored, jax.tree.map(keep_failed, rotated, old_scaling)


def _direction(
  stages: _Stages,
  bucket: layout_lib.Bucket,
  grads: jax.Array,
  state: BucketState,
  step: Any,
  hold: Any = None,
) -> tuple[jax.Array, BucketState]:
  """The scaling stage's direction; where the traced flag ``hold`` is set (the first call of
  ``first_call="init_only"``, or a skipped call) the direction is zero and the scaling state is
  left as it was."""
  scaling = stages.scaling_for(bucket)
  if any(bucket.preconditioned):
    eigenvalues = jax.vmap(stages.estimator.eigenvalues)(state.estimator, state.basis)
  else:
    eigenvalues = (None,) * len(bucket.shape)
  # The flag holds the moments through the stage's EMA weights (1, 0): no select of new against
  # old state, which would make XLA copy the moments every call.
  direction, scaling_state = jax.vmap(scaling.update, in_axes=(0, 0, 0, 0, None, None))(
    grads, state.scaling, state.basis.bases, eigenvalues, step, hold
  )
  direction = tensor_ops.zeroed(direction, hold)
  return direction, state._replace(scaling=scaling_state)


@dataclasses.dataclass(frozen=True)
class Stagger:
  """Which blocks of a bucket a staggered refresh takes at each step (:func:`refresh_schedule`).

  The bucket's ``devices · rows`` blocks are viewed as ``devices`` runs of ``rows`` (the runs a
  block-sharded bucket puts on each device). Group ``k < groups`` is rows
  ``[k·size, (k+1)·size)`` of every run (the last group ends at ``rows``); it is refreshed at
  the steps ``t > start`` with ``(t - offset) mod T = k``, and every group at ``t = start``.
  """

  devices: int
  rows: int
  size: int
  groups: int
  offset: int

  def phase(self, row: int, every: int) -> int:
    """The phase ``φ`` (``t ≡ φ mod T``) at which block ``row`` of the stack is refreshed."""
    return (self.offset + (row % self.rows) // self.size) % every


def refresh_schedule(
  tree: layout_lib.TreeLayout, every: int, devices: int = 1
) -> tuple[Stagger | None, ...]:
  """The staggered refresh of every bucket of ``tree`` with a factor (None: no factor).

  Each bucket's blocks are split into at most ``T = every`` groups of ``⌈rows/T⌉`` blocks, so
  that each block is refreshed once every ``T`` steps at its own phase, and each step takes
  about ``1/T`` of every bucket. ``devices`` (the layout's ``bucket_multiple``, the size of the
  mesh axis a bucket is sharded over) makes each group take the same number of blocks from
  every device's share, so each device refreshes its share of the blocks due. Buckets are then
  placed, largest groups first, at the phase offset that keeps the heaviest step lightest, a
  block's cost taken as ``Σ_axis d³`` (eigh and QR of a ``d × d`` factor).
  """
  load = [0.0] * every
  schedule: list[Stagger | None] = [None] * len(tree.buckets)
  plans = []
  for index, bucket in enumerate(tree.buckets):
    if not any(bucket.preconditioned):
      continue
    split = devices if devices > 1 and bucket.size % devices == 0 else 1
    rows = bucket.size // split
    size = -(-rows // every)
    groups = -(-rows // size)
    cost = (
      split
      * size
      * sum(d**3 for d, m in zip(bucket.shape, bucket.preconditioned, strict=True) if m)
    )
    plans.append((-cost * groups, -cost, index, split, rows, size, groups, cost))
  for *_, index, split, rows, size, groups, cost in sorted(plans):

    def peak(offset: int, groups: int = groups, cost: float = cost) -> tuple[float, int]:
      added = [load[i] + (cost if (i - offset) % every < groups else 0) for i in range(every)]
      return max(added), offset

    offset = min(peak(o) for o in range(every))[1]
    for k in range(groups):
      load[(offset + k) % every] += cost
    schedule[index] = Stagger(split, rows, size, groups, offset)
  return tuple(schedule)


def _statistics(
  stages: _Stages,
  bucket: layout_lib.Bucket,
  grads: jax.Array,
  state: BucketState,
  step: Any,
  after: Any = None,
  initial: Any = None,
  hold: Any = None,
  stagger: Stagger | None = None,
) -> tuple[BucketState, jax.Array]:
  """Folds the gradient into the factors, then refreshes the basis on refresh steps (the
  decompositions wait for ``after``: see ``tensor_ops.after``); with ``stagger``, one group of
  blocks at each step (:class:`Stagger`).

  Where the traced flag ``initial`` is set (the first call of ``first_call="init_only"``), the
  estimator's ``update`` acts as its ``first`` and the first basis comes from ``basis.first``:
  one more branch of the same switch, so the first call costs nothing on later steps. Where the
  traced flag ``hold`` is set (a skipped call) the statistics are left as they were and nothing
  is refreshed.
  """
  if not any(bucket.preconditioned):
    return state, jnp.zeros((), jnp.int32)
  scaling = stages.scaling_for(bucket)

  # On the first call ``update`` acts as ``first`` (the estimator selects, elementwise): a
  # conditional here would hide the gradient's projection from the direction's (no sharing).
  fold = jax.vmap(stages.estimator.update, in_axes=(0, 0, 0, None, None, 0, None))
  state = state._replace(
    estimator=fold(
      grads, state.estimator, state.basis.bases, initial, hold, state.basis.eigenvalues, step
    )
  )
  # An estimator that seeds its eigenvalue estimates from the first basis gets them back from
  # the first call's branch; only those vectors pass through the conditional.
  seeding = _seeds(stages)

  def estimates(estimator: Any) -> Any:
    return _seeder(stages).estimates(estimator) if seeding else ()

  # The branches return only what a refresh changes: state passed through a conditional is
  # copied on every call, so the (read-only) factors are not.
  def factors(estimator: Any) -> Any:
    values = jax.vmap(stages.estimator.factors, in_axes=(0, None))(estimator, step)
    return tensor_ops.after(values, after)

  Branch = tuple[Any, Any, jax.Array, Any]

  def keep(estimator: Any, basis: Any, scaling_state: Any) -> Branch:
    return basis, scaling_state, jnp.zeros((), jnp.int32), estimates(estimator)

  def refresh_blocks(estimator: Any, basis: Any, scaling_state: Any) -> tuple[Any, Any, Any]:
    new, permutations, failed = jax.vmap(stages.basis.refresh)(factors(estimator), basis)
    rotated = _rotate(stages, scaling, estimator, scaling_state, basis, new, permutations)
    new, rotated = _settle(stages, new, rotated, scaling_state)
    return new, rotated, failed

  def refresh(estimator: Any, basis: Any, scaling_state: Any) -> Branch:
    new, rotated, failed = refresh_blocks(estimator, basis, scaling_state)
    return new, rotated, jnp.sum(failed, dtype=jnp.int32), estimates(estimator)

  def build(estimator: Any, basis: Any, scaling_state: Any) -> Branch:
    new = jax.vmap(stages.basis.first)(factors(estimator), basis)
    if seeding:  # only its estimates leave the branch (see ``estimator.seed``)
      estimator = jax.vmap(_seeder(stages).seed)(estimator, new.bases)
    rotated = _rotate(stages, scaling, estimator, scaling_state, basis, new, None)
    new, rotated = _settle(stages, new, rotated, scaling_state)
    return new, rotated, jnp.zeros((), jnp.int32), estimates(estimator)

  every, start = stages.basis.every, stages.basis.start
  if stagger is None:
    due = (step % every == 0) & (step > start) | (step == start)
  else:
    # Group ``k`` at the steps ``t > start`` with ``(t - offset) mod T = k``; all at ``start``.
    phase = (step - stagger.offset) % every
    due = (step > start) & (phase < stagger.groups) | (step == start)
    first = jnp.where(step == start, 0, phase)
    stop = jnp.where(step == start, stagger.groups, phase + 1)
    refresh = _staggered(refresh_blocks, stagger, first, stop, estimates)
  if hold is not None:
    due = due & ~hold
    initial = None if initial is None else initial & ~hold
  operands = (state.estimator, state.basis, state.scaling)
  if initial is None:
    basis, scaling_state, failed, values = jax.lax.cond(due, refresh, keep, *operands)
  else:
    index = jnp.where(initial, 2, due.astype(jnp.int32))
    branches = (keep, refresh, build)
    basis, scaling_state, failed, values = jax.lax.switch(index, branches, *operands)
  if seeding:
    state = state._replace(estimator=_seeder(stages).with_estimates(state.estimator, values))
  return state._replace(basis=basis, scaling=scaling_state), failed


def _staggered(refresh_blocks: Any, stagger: Stagger, first: Any, stop: Any, estimates: Any) -> Any:
  """The refresh branch of a staggered bucket: groups ``first ≤ k < stop`` (traced), one after
  another, each through ``refresh_blocks`` on its rows only."""
  devices, rows, size = stagger.devices, stagger.rows, stagger.size

  def take(x: jax.Array, row: Any) -> jax.Array:
    runs = x.reshape(devices, rows, *x.shape[1:])
    return jax.lax.dynamic_slice_in_dim(runs, row, size, axis=1).reshape(-1, *x.shape[1:])

  def put(x: jax.Array, part: jax.Array, row: Any) -> jax.Array:
    runs = x.reshape(devices, rows, *x.shape[1:])
    part = part.reshape(devices, size, *x.shape[1:])
    return jax.lax.dynamic_update_slice_in_dim(runs, part, row, axis=1).reshape(x.shape)

  def branch(estimator: Any, basis: Any, scaling_state: Any) -> Any:
    def group(k: Any, carry: Any) -> Any:
      basis, scaling_state, failures = carry
      # The last group may be shorter: its slice starts earlier, and the rows before the group
      # keep their state.
      row = jnp.minimum(k * size, rows - size)
      mine = jnp.tile(row + jnp.arange(size) >= k * size, devices)

      def keep(new: jax.Array, old: jax.Array) -> jax.Array:
        return jnp.where(mine.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

      old = jax.tree.map(lambda x: take(x, row), (basis, scaling_state))
      part = jax.tree.map(lambda x: take(x, row), estimator)
      new_basis, new_scaling, failed = refresh_blocks(part, *old)
      new = jax.tree.map(keep, (new_basis, new_scaling), old)
      basis, scaling_state = jax.tree.map(lambda x, y: put(x, y, row), (basis, scaling_state), new)
      return basis, scaling_state, failures + jnp.sum(failed & mine, dtype=jnp.int32)

    carry = (basis, scaling_state, jnp.zeros((), jnp.int32))
    basis, scaling_state, failures = jax.lax.fori_loop(first, stop, group, carry)
    return basis, scaling_state, failures, estimates(estimator)

  return branch


def _within_range(
  stages: _Stages, tree: layout_lib.TreeLayout, grads: Any, buckets: tuple[BucketState, ...]
) -> jax.Array:
  """The ``nonfinite="skip"`` test: for every block, ``‖G_b‖²`` times the estimator's ``gain``
  is finite and within the range of the state's dtypes (``tensor_ops.within_range``).

  Under it no factor, eigenvalue estimate or moment can overflow: Frobenius entries and
  projected second moments are at most ``‖G_b‖²`` (orthogonal bases), KL's whitened ones at
  most ``gain · ‖G_b‖²``. A conservative bound: a gradient near the limit may be skipped
  although its statistics would just have fit.
  """
  flags = []
  for bucket, grad, state in zip(tree.buckets, grads, buckets, strict=True):
    gain: Any = 1.0
    if any(bucket.preconditioned):
      gain = jax.vmap(stages.estimator.gain)(state.estimator, state.basis)
    flags.append(tensor_ops.within_range(grad, gain, (state.estimator, state.scaling)))
  return tensor_ops.all_of(flags)


def block_axis(specs: Any) -> Any:
  """The mesh axis of the first bucket whose leading axis is sharded, or ``None``.

  Args:
    specs: an optimizer state, or a tree of its ``PartitionSpec``s (or ``NamedSharding``s).
  """
  nodes = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, (PreconditionerState, P)))
  for node in nodes:
    if isinstance(node, PreconditionerState):
      for leaf in jax.tree.leaves(node.buckets, is_leaf=lambda x: isinstance(x, P)):
        spec = _spec(leaf)
        if len(spec) and spec[0] is not None:
          return spec[0]
  return None


def _spec(x: Any) -> P:
  """The ``PartitionSpec`` of a spec, a ``NamedSharding`` or an array (its type's)."""
  if isinstance(x, P):
    return x
  if isinstance(x, jax.sharding.NamedSharding):
    return x.spec
  return jax.typeof(x).sharding.spec


def _explicit_mesh(tree: Any) -> Any:
  """The context mesh, or else the mesh ``tree`` is typed on, if it has Explicit axes; or None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    meshes = (jax.typeof(leaf).sharding.mesh for leaf in jax.tree.leaves(tree))
    mesh = next((m for m in meshes if not m.empty), mesh)
  return None if mesh.empty or not mesh.explicit_axes else mesh


def on_auto_axes(update_fn: Any) -> Any:
  """Wraps an optax ``update_fn`` to run with the Explicit axes of a mesh switched to Auto.

  On an Explicit mesh (``jax.make_mesh``'s default) the stacked blocks, Gram matrices, eigh and
  QR would each need a sharding annotation. Under ``jax.sharding.auto_axes`` XLA propagates the
  state's block sharding instead, so a bucket sharded on its leading axis is still refreshed
  block-parallel. The outputs get back the sharding types of the incoming updates and state.
  Without a mesh, or on Auto axes only, ``update_fn`` is called as it is. The shardings read
  here are handed to the chassis as a :class:`Placement` (a context variable, so that it also
  reaches a chassis inside a chain wrapped as a whole, as :func:`kl_precond.sharding.jit_update`
  does).
  """

  def wrapped(updates: Any, state: Any, params: Any = None) -> Any:
    mesh = _explicit_mesh((updates, state, params))
    if mesh is None:
      return update_fn(updates, state, params)

    def sharding_type(x: Any) -> jax.sharding.NamedSharding:
      sharding = jax.typeof(x).sharding
      return jax.sharding.NamedSharding(mesh, sharding.spec if sharding.mesh == mesh else P())

    types = jax.tree.map(sharding_type, (updates, state))
    placement = Placement(
      all_auto(mesh),
      block_axis(state),
      all(is_replicated(t.spec) for t in jax.tree.leaves(types[0])),
    )
    with placed(placement):
      return jax.sharding.auto_axes(update_fn, out_sharding=types)(updates, state, params)

  return wrapped


def scale_by_preconditioner(
  estimator: Estimator,
  basis: BasisStage,
  scaling: ScalingStage,
  *,
  layout: layout_lib.LayoutConfig | None = None,
  fallback: ScalingStage | None = None,
  first_call: str = "init_only",
  statistics_first: bool = False,
  normalize_grads: bool = False,
  nonfinite: str = "skip",
) -> optax.GradientTransformation:
  """Kronecker-factored preconditioning assembled from stages.

  Every named optimizer of this package is this transform with a choice of stages, e.g.
  KL-SOAP is ``scale_by_preconditioner(kl(β), qr_every(T, sort=False), adam(b1, b2, eps,
  bias_correction=False))``.

  Args:
    estimator: the factor statistics (an :class:`Estimator`), :func:`kl_precond.frobenius`,
      :func:`kl_precond.kl` or :func:`kl_precond.kl_roots`.
    basis: the refresh policy (a :class:`BasisStage`), :func:`kl_precond.qr_every`,
      :func:`kl_precond.eigh_every` or :func:`kl_precond.qr_algorithm_every`.
    scaling: what is done in the eigenbasis (a :class:`ScalingStage`),
      :func:`kl_precond.adam`, :func:`kl_precond.kronecker_eigenvalues` or
      :func:`kl_precond.eigenvalue_corrected`.
    layout: the static block layout (:class:`kl_precond.LayoutConfig`).
    fallback: scaling for blocks with no factor at all (0-/1-D tensors); default ``scaling``.
    first_call: ``"init_only"``, ``"precondition"`` or ``"identity"`` (module docstring).
    statistics_first: fold the gradient and refresh before computing the direction.
    normalize_grads: divide each tensor's update by its RMS (``+1e-30``).
    nonfinite: what a non-finite call does. ``"skip"`` (default): a call whose gradient has NaN
      or Inf, or could overflow the state (some block's ``‖G_b‖²`` times the estimator's
      ``gain`` exceeds the largest value of the state's dtypes; e.g. 1e25 entries in float32),
      returns a zero update, leaves the state untouched (the step counter too) and counts the
      call in ``skipped``. The test is made from the gradient before the step, so the state is
      updated in place (a float16 state is checked after the step instead). A direction that
      is still not finite (e.g. ``eps = 0`` and a zero second moment) is returned as zeros and
      counted in ``skipped`` too; its finite statistics are kept. ``"propagate"``: the values
      flow through, as in the references.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`PreconditionerState`.
  """
  check_stage("estimator", estimator, ("init", "update", "factors", "eigenvalues"))
  check_stage("basis", basis, ("init", "refresh", "first"))
  check_stage("scaling", scaling, ("init", "update", "rotate"))
  if fallback is not None:
    check_stage("fallback", fallback, ("init", "update", "rotate"))
  layout_lib.check_layout("layout", layout)
  check_choice("first_call", first_call, ("init_only", "precondition", "identity"))
  check_bool("statistics_first", statistics_first)
  check_bool("normalize_grads", normalize_grads)
  check_choice("nonfinite", nonfinite, ("skip", "propagate"))
  if getattr(scaling, "cache_roots", False) and not getattr(
    estimator, "eigenvalues_fixed_between_refreshes", False
  ):
    raise ValueError(
      "A scaling with cache_roots=True needs an estimator whose eigenvalue estimates change "
      "only at refreshes (frobenius with an eigh_every basis), not one that updates them every "
      f"step ({type(estimator).__name__})."
    )
  if not getattr(basis, "keep_bases", True) and not getattr(scaling, "cache_roots", False):
    raise ValueError(
      "A basis stage with keep_bases=False stores no bases between refreshes, so the scaling "
      "must keep what it needs from each decomposition (kronecker_eigenvalues(cache_roots=True))"
      f"; got {type(scaling).__name__} with cache_roots=False."
    )
  stages = _Stages(estimator, basis, scaling, fallback)
  config = layout or layout_lib.LayoutConfig()

  def init_fn(params: Any) -> PreconditionerState:
    # Three distinct buffers, so that donating the state (jit donate_argnums) works.
    count, skipped, failures = (jnp.zeros((), jnp.int32) for _ in range(3))
    if _is_map_params_placeholder(params):
      return PreconditionerState(count, skipped, failures, cast(Any, _BucketsWithoutParams()))
    tree = layout_lib.tree_layout(params, config)
    buckets = tuple(_init_bucket(stages, bucket) for bucket in tree.buckets)
    return PreconditionerState(count, skipped, failures, buckets)

  def step_fn(
    grads: tuple[jax.Array, ...],
    buckets: tuple[BucketState, ...],
    step: Any,
    tree: layout_lib.TreeLayout,
    first: Any,
    hold: Any,
  ) -> tuple[Any, Any, jax.Array]:
    """One call. ``first``: ``True``/``False`` (static: the branches of ``"precondition"``'s
    first-call conditional), or a traced flag (``"init_only"``: see ``_statistics``). ``hold``:
    a traced flag (a skipped call: zero directions, state unchanged) or None."""
    initial = None if isinstance(first, bool) else first
    # The direction is zero, and the scaling state kept, on the first call or a skipped one.
    frozen = initial if hold is None else hold if initial is None else initial | hold
    directions: list[jax.Array] = []
    new_buckets: list[BucketState] = []
    failures = jnp.zeros((), jnp.int32)
    # Buckets decompose their factors one after another (see tensor_ops.after): each waits for
    # the basis of the last bucket that has one, which waited for its predecessor.
    previous: Any = None
    schedule: tuple[Stagger | None, ...] = (None,) * len(tree.buckets)
    if getattr(stages.basis, "stagger", False):
      # A bucket padded to a multiple of the mesh axis (``bucket_multiple``) and sharded over it:
      # each group takes the same rows of every device's run, so each device refreshes its share
      # of the blocks due. The schedule depends on the layout only: sharded runs equal one device.
      schedule = refresh_schedule(tree, stages.basis.every, config.bucket_multiple)
    for bucket, grad, state, stagger in zip(tree.buckets, grads, buckets, schedule, strict=True):
      statistics = (previous, initial, hold, stagger)
      if first is True:
        state = _first(stages, bucket, grad, state, step, previous, hold)
      elif statistics_first:
        state, failed = _statistics(stages, bucket, grad, state, step, *statistics)
        failures += failed
      direction, state = _direction(stages, bucket, grad, state, step, frozen)
      if first is not True and not statistics_first:
        state, failed = _statistics(stages, bucket, grad, state, step, *statistics)
        failures += failed
      directions.append(direction.astype(grad.dtype))
      new_buckets.append(state)
      if jax.tree.leaves(state.basis):
        previous = state.basis
    return tuple(directions), tuple(new_buckets), failures

  def update_fn(
    updates: Any, state: PreconditionerState, params: Any = None
  ) -> tuple[Any, PreconditionerState]:
    del params
    tree = layout_lib.tree_layout(updates, config)
    placement = placement_lib.current()
    grads = placement_lib.pin_gradients(layout_lib.gather(updates, tree), placement)
    # ``t``: the step counter of the stages (bias corrections, refresh schedule).
    step = state.count if first_call == "init_only" else state.count + 1

    def accept(state: PreconditionerState, hold: Any = None) -> tuple[Any, PreconditionerState]:
      """The step; where the traced flag ``hold`` is set, zeros and the state unchanged."""
      if first_call == "identity":
        directions, buckets, failures = step_fn(grads, state.buckets, step, tree, False, hold)
      elif first_call == "init_only":
        # No conditional around the whole step (XLA would copy the state through it): the first
        # call is a branch of each bucket's refresh switch, and its direction is masked.
        initial = state.count == 0
        directions, buckets, failures = step_fn(
          grads, state.buckets, jnp.maximum(step, 1), tree, initial, hold
        )
      else:
        directions, buckets, failures = jax.lax.cond(
          state.count == 0,
          lambda b: step_fn(grads, b, jnp.maximum(step, 1), tree, True, hold),
          lambda b: step_fn(grads, b, step, tree, False, hold),
          state.buckets,
        )
      count, skipped = optax.safe_increment(state.count), state.skipped
      if hold is not None:
        count = jnp.where(hold, state.count, count)
        skipped = jnp.where(hold, optax.safe_increment(skipped), skipped)
      failures = state.basis_failures + failures
      return directions, PreconditionerState(count, skipped, failures, buckets)

    if nonfinite == "skip" and tensor_ops.narrower_than_float32(state.buckets):
      # A 16-bit state: bounds on ‖G‖² would skip too much, so the new state is checked
      # instead (unless it was not finite before this call: then the basis stage's guard
      # handles it), and the old one is read only when the new one is not finite.
      new = accept(state)
      ok = tensor_ops.all_finite(grads) & jax.lax.cond(
        tensor_ops.all_finite((new[0], new[1].buckets)),
        lambda: jnp.asarray(True),
        lambda: ~tensor_ops.all_finite(state.buckets),
      )
      zeros = tuple(jnp.zeros_like(g) for g in grads)
      kept = state._replace(skipped=optax.safe_increment(state.skipped))
      new = jax.lax.cond(ok, lambda: new, lambda: (zeros, kept))
    elif nonfinite == "skip":
      # Decided before the step, from the gradient alone. A skipped call then gives every
      # stage the flag ``hold`` (its EMAs take the weights (1, 0) and a zeroed statistic, so
      # the state is rewritten in place, unchanged) and refreshes nothing. A conditional
      # around the step instead made XLA copy the state through it on every call (20 ms of
      # Shampoo's 88 ms update on the benchmark transformer); so did selecting the new state
      # against the old one, in jax 0.5.
      ok = _within_range(stages, tree, grads, state.buckets)
      new = accept(state, ~ok)
      # Only reachable through the direction itself (e.g. eps = 0 with a zero second moment):
      # the update is zeroed and counted; the (finite) statistics are kept.
      finite = tensor_ops.all_finite(new[0])
      zeroed = tuple(jnp.where(finite, d, jnp.zeros_like(d)) for d in new[0])
      skipped = jnp.where(finite, new[1].skipped, optax.safe_increment(new[1].skipped))
      new = (zeroed, new[1]._replace(skipped=skipped))
    else:
      new = accept(state)
    directions, state = new
    updates = layout_lib.scatter(placement_lib.pin_directions(directions, placement), tree)
    if normalize_grads:
      updates = jax.tree.map(lambda u: u / (1e-30 + jnp.sqrt(jnp.mean(u**2))), updates)
    return updates, state

  return optax.GradientTransformation(init_fn, on_auto_axes(update_fn))
