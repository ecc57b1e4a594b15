"""Mode products on one block: projection onto Kronecker eigenbases and mode Gram matrices.

A block ``X`` of order ``k`` carries one optional orthogonal matrix per axis. ``None`` stands for
the identity (an axis with no Kronecker factor). With ``Q_i`` the basis of axis ``i``:

.. math::

  \\mathrm{proj}(X) = X \\times_1 Q_1^\\top \\cdots \\times_k Q_k^\\top, \\qquad
  \\mathrm{unproj}(X) = X \\times_1 Q_1 \\cdots \\times_k Q_k,

so that for a matrix ``proj(X) = Q_1ᵀ X Q_2`` and ``unproj(X) = Q_1 X Q_2ᵀ``. All functions act on
a single block; the chassis ``vmap``s them over the stacked blocks of a bucket.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

Bases = Sequence[jax.Array | None]


def mode_product(x: jax.Array, matrix: jax.Array, axis: int) -> jax.Array:
  """Returns ``x ×_axis matrix``: contracts ``axis`` of ``x`` with the columns of ``matrix``.

  .. math:: (X \\times_i A)_{\\dots a \\dots} = \\sum_b A_{ab} X_{\\dots b \\dots}
  """
  if axis == 0:
    # ``A X`` as such. The product moved back (below) is the same numbers, but on a lone block (a
    # bucket of one) XLA lays it out column-major, and where it leaves the refresh conditional
    # (SOAP's rotated ``M``) the other branch transposes it to match, and back, every call.
    return jnp.tensordot(matrix, x, axes=([1], [0]))
  moved = jnp.tensordot(x, matrix, axes=([axis], [1]))
  return jnp.moveaxis(moved, -1, axis)


def project(x: jax.Array, bases: Bases) -> jax.Array:
  """Rotates ``x`` into the eigenbasis: ``x ×_i Q_iᵀ`` for every axis with a basis.

  The longest axis goes first (ties in axis order). The first product, ``x ×_i Q_iᵀ`` on the raw
  ``x``, is also what the KL estimator's whitening computes, and XLA then does it once; the
  longest axis's product is the costliest (``d_i · size`` multiply-adds).
  """
  factored = [(axis, basis) for axis, basis in enumerate(bases) if basis is not None]
  for axis, basis in sorted(factored, key=lambda item: -x.shape[item[0]]):
    x = mode_product(x, basis.T, axis)
  return x


def unproject(x: jax.Array, bases: Bases) -> jax.Array:
  """Rotates ``x`` back to parameter space: ``x ×_i Q_i`` for every axis with a basis."""
  for axis, basis in enumerate(bases):
    if basis is not None:
      x = mode_product(x, basis, axis)
  return x


def mode_gram(x: jax.Array, axis: int) -> jax.Array:
  """Returns ``X_(i) X_(i)ᵀ``: the Gram matrix of the mode-``axis`` unfolding of ``x``."""
  others = [a for a in range(x.ndim) if a != axis]
  return jnp.tensordot(x, x, axes=(others, others))


def kron_outer(vectors: Sequence[jax.Array | None], shape: Sequence[int]) -> jax.Array:
  """Returns the outer product ``v_1 ∘ v_2 ∘ ... ∘ v_k`` broadcast to ``shape`` (None = ones)."""
  out = jnp.ones((), dtype=next((v.dtype for v in vectors if v is not None), jnp.float32))
  for axis, vector in enumerate(vectors):
    if vector is not None:
      view = [1] * len(shape)
      view[axis] = shape[axis]
      out = out * vector.reshape(view)
  return jnp.broadcast_to(out, tuple(shape))


def all_finite(tree: Any) -> jax.Array:
  """Whether every floating-point leaf of ``tree`` is finite (one fused reduction)."""
  return all_of(
    [
      jnp.all(jnp.isfinite(x))
      for x in jax.tree.leaves(tree)
      if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
  )


def all_of(flags: Sequence[jax.Array]) -> jax.Array:
  """Whether every one of the scalar ``flags`` holds (none: True), as one value computed once.

  ``jnp.all`` of stacked scalars would do, but XLA rewrites that reduction into a chain of
  ``and``s and copies the chain into every fusion that reads its result. With a flag per leaf
  read by every leaf's update (Shampoo's grafting), the compiled step then grows as the square
  of the number of leaves. The first of the sorted flags (a sort, which XLA neither rewrites nor
  copies) is the same value, and each reader copies only its one-element slice.
  """
  stacked = jnp.stack([jnp.asarray(f, jnp.int32) for f in flags] or [jnp.ones((), jnp.int32)])
  return jax.lax.sort(stacked)[0] > 0


def _range_limit(tree: Any) -> float:
  """The largest finite value every floating leaf of ``tree`` can hold (static; inf if none)."""
  return min(
    (
      float(jnp.finfo(x.dtype).max)
      for x in jax.tree.leaves(tree)
      if jnp.issubdtype(x.dtype, jnp.floating)
    ),
    default=float("inf"),
  )


def narrower_than_float32(tree: Any) -> bool:
  """Whether a floating leaf of ``tree`` has less range than float32 (static): float16, and
  also bfloat16, whose largest finite value (3.39e38) is just below float32's (3.40e38)."""
  return _range_limit(tree) < float(jnp.finfo(jnp.float32).max)


def within_range(blocks: jax.Array, gain: Any, tree: Any) -> jax.Array:
  """Whether ``‖G_b‖² · gain_b`` is at most the largest finite value of ``tree``'s dtypes.

  ``blocks`` is a stack of gradient blocks (leading axis: blocks) and ``gain`` a bound (one per
  block, or one number) on how much a stage can amplify ``‖G_b‖²``; NaN/Inf gradients fail.
  When this holds, no statistic derived from the gradient can overflow the state ``tree``.
  """
  dtype = jnp.promote_types(blocks.dtype, jnp.float32)
  squares = jnp.sum(jnp.square(blocks.astype(dtype)), axis=tuple(range(1, blocks.ndim)))
  limit = min(_range_limit(tree), float(jnp.finfo(dtype).max))
  bound = squares * jnp.asarray(gain, dtype)
  return jnp.all(bound <= limit)  # False for NaN


def permute_axes(x: jax.Array, permutations: Sequence[jax.Array | None]) -> jax.Array:
  """Reorders ``x`` along every axis ``i`` by the index vector ``permutations[i]`` (None: that
  axis unchanged): ``out[i_1, ..., i_k] = x[π_1(i_1), ..., π_k(i_k)]``.

  One gather over all axes (``x[ix_(π_1, ..., π_k)]``). Taking along each axis in turn
  (``jnp.take``) is the same result, but XLA lays the result of a take along the minor axis out
  column-major; where that result leaves a conditional (the refresh of SOAP's sorted basis
  permutes Adam's ``V``) the other branch then transposes ``V`` into that layout, and back after,
  on every call.
  """
  if all(p is None for p in permutations):
    return x
  indices = [jnp.arange(n) if p is None else p for n, p in zip(x.shape, permutations, strict=True)]
  return x[jnp.ix_(*indices)]


def held(hold: Any, beta: Any, weight: Any) -> tuple[Any, Any]:
  """EMA weights ``(β, w)``, or ``(1, 0)`` where the traced flag ``hold`` is set (None: never).

  With a zeroed statistic (:func:`zeroed`), ``β·x + w·s`` is then ``x`` exactly (for finite
  ``x``): a skipped call leaves an EMA in place, where XLA can update it, instead of selecting
  between a new and an old copy.
  """
  if hold is None:
    return beta, weight
  return jnp.where(hold, 1, beta), jnp.where(hold, 0, weight)


def accumulation_weight(beta: Any, weight: Any = None) -> Any:
  """The weight ``w`` of a new statistic in ``β·x + w·s``: ``weight`` if given, else ``1 - β``
  for an EMA and ``1`` where ``β = 1`` (a sum, as Distributed Shampoo accumulates with β₂ = 1)."""
  if weight is not None:
    return weight
  if isinstance(beta, (int, float)):
    return 1.0 if beta == 1 else 1 - beta
  return jnp.where(beta == 1, 1, 1 - beta)


def ema_correction(beta: Any, step: jax.Array, dtype: Any) -> jax.Array:
  """Adam's bias correction ``1 - βᵗ`` of an EMA started at zero; ``1`` where ``β = 1``."""
  beta = jnp.asarray(beta, dtype)
  return jnp.where(beta < 1, 1 - beta ** jnp.asarray(step, dtype), jnp.ones((), dtype))


def filtered_gradient(
  old: jax.Array,
  grad: jax.Array,
  b1: Any,
  step: jax.Array,
  hold: Any = None,
  *,
  b3: Any = None,
  bias_correction: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """``(M, Ḡ)``: the first moment ``M ← M + (1-β₁)(G - M)`` and the filtered gradient a
  direction is computed from, ``Ḡ = M / (1-β₁ᵗ)``.

  With ``b3`` (Distributed Shampoo's ``beta3``: a look-ahead, e.g. NAdam-like with
  ``β₃ = β₁²``), ``Ḡ = (M_{t-1} + (1-β₃)(G - M_{t-1})) / (1 - β₃β₁^{t-1})``, which is the above
  when ``β₃ = β₁``; ``b3`` is ignored when ``β₁`` is a concrete 0 (``Ḡ = G``, as there). Without
  ``bias_correction`` there is no division. ``grad`` must be zeroed where ``hold`` is set; ``M``
  then comes back unchanged.
  """
  _, weight = held(hold, b1, 1 - b1)
  mu = old + weight * (grad - old)
  moment = mu if _no_look_ahead(b1, b3) else old + (1 - jnp.asarray(b3, mu.dtype)) * (grad - old)
  if bias_correction:
    moment = moment / filtered_correction(b1, step, mu.dtype, b3=b3)
  return mu, moment


def _no_look_ahead(b1: Any, b3: Any) -> bool:
  return b3 is None or (isinstance(b1, (int, float)) and b1 == 0)


def filtered_correction(b1: Any, step: jax.Array, dtype: Any, *, b3: Any = None) -> jax.Array:
  """The bias correction of :func:`filtered_gradient`: ``1-β₁ᵗ``, or ``1-β₃β₁^{t-1}``."""
  t = jnp.asarray(step).astype(dtype)
  if _no_look_ahead(b1, b3):
    return 1 - jnp.asarray(b1, dtype) ** t
  return 1 - jnp.asarray(b3, dtype) * jnp.asarray(b1, dtype) ** (t - 1)


def zeroed(x: jax.Array, hold: Any) -> jax.Array:
  """``x``, or zeros where the traced flag ``hold`` is set (None: never), so NaN cannot leak."""
  return x if hold is None else jnp.where(hold, jnp.zeros_like(x), x)


def after(x: Any, dependency: Any) -> Any:
  """``x``, computed only once ``dependency`` is: a real data dependency that changes no value.

  The chassis runs the decompositions of a step (``eigh``/``qr`` of every factor and bucket) one
  after another with it. On CPU, jaxlib runs a batched ``eigh`` as LAPACK calls spread over
  XLA's intra-op thread pool and blocks a pool thread until they finish; two such calls running
  at once each hold a thread while waiting for work queued behind the other, and the step never
  returns (jaxlib 0.10 on 2 cores). ``jax.lax.optimization_barrier`` does not order them (XLA's
  CPU runtime orders work by buffer use, and the barrier only aliases its operands), so ``x`` is
  passed through a select on one element of the dependency, ``where(not d > inf, x, 0)``, which is
  true for every ``d``, NaN included. It costs one elementwise pass over ``x``, none of the
  parallelism within a batched decomposition.
  """
  anchors = [
    jnp.ravel(leaf)[0]
    for leaf in jax.tree.leaves(dependency)
    if jnp.issubdtype(leaf.dtype, jnp.inexact) and leaf.size
  ]
  if not anchors:
    return x
  keep = jnp.logical_not(
    jnp.stack([jnp.real(a).astype(jnp.float32) for a in anchors]).max() > jnp.inf
  )
  # Computed once: XLA would otherwise fuse the anchors' producers into every select.
  keep = jax.lax.optimization_barrier(keep)
  return jax.tree.map(lambda a: jnp.where(keep, a, jnp.zeros_like(a)), x)
