"""The ``estimator`` stage: how the Kronecker factors are updated from a gradient block.

Two estimators of the gradient covariance ``E[vec(G) vec(G)ᵀ] ≈ F_1 ⊗ ... ⊗ F_k``:

* :func:`frobenius` (Shampoo, SOAP): each factor is an EMA of the mode Gram matrix,

  .. math:: F_i \\leftarrow \\beta F_i + (1-\\beta)\\, G_{(i)} G_{(i)}^\\top .

* :func:`kl` (KL-Shampoo, KL-SOAP): each factor is an EMA of the gradient whitened by the
  other factors' current inverses,

  .. math::

    F_i \\leftarrow \\beta F_i + \\frac{1-\\beta}{N/d_i}\\,
      G_{(i)} \\Big(\\bigotimes_{j\\ne i} \\hat S_j^{-1}\\Big) G_{(i)}^\\top,
    \\qquad \\hat S_j^{-1} = Q_j\\,\\mathrm{diag}(s_j^2)\\,Q_j^\\top,

  where ``Q_j`` is factor ``j``'s (stale) eigenbasis and ``s_j = ℓ_j^{-1/2}`` its EMA eigenvalue
  estimates, ``ℓ_i ← β ℓ_i + (1-β) diag(Q_iᵀ Δ_i Q_i)`` with ``Δ_i`` the whitened statistic above.

* :func:`kl_roots` (Distributed Shampoo's ``RootInvKLShampooPreconditionerConfig``, a simplified
  KL-Shampoo): Frobenius factors of the gradient whitened by the other factors' current inverse
  *roots* (those the Shampoo scaling preconditions with), with no ``1/d`` normalisation and no
  eigenvalue EMA,

  .. math::

    F_i \\leftarrow \\beta F_i + (1-\\beta)\\, \\tilde G_{(i)} \\tilde G_{(i)}^\\top,\\qquad
    \\tilde G = G \\textstyle\\prod_{j \\ne i} \\times_j Q_j\\,\\mathrm{diag}(\\lambda_j^{-a_j})\\,Q_j^\\top,

  with ``Q_j, λ_j`` the eigenbasis and (ridged, floored) eigenvalues of factor ``j`` from the
  last refresh (the identity and ones before the first) and ``a_j`` its root's exponent.

All act on one block (the chassis ``vmap``s them). An axis with no factor (``None``) is treated
as carrying the identity: it is neither rotated nor whitened. All numbers (``beta``,
``init_factor``, ``max_clamp_value``, ``damping``) may be traced arrays, so the estimators work
under ``optax.inject_hyperparams``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kl_precond import scaling, tensor_ops
from kl_precond._validation import (
  check_beta,
  check_beta_or_sum,
  check_bool,
  check_choice,
  check_dtype,
  check_nonnegative,
  check_positive,
)

Factors = tuple[jax.Array | None, ...]
Scales = Sequence[jax.Array | None]


def _zero_factors(shape: Sequence[int], mask: Sequence[bool], dtype: Any) -> Factors:
  return tuple(jnp.zeros((d, d), dtype) if m else None for d, m in zip(shape, mask, strict=True))


def _whitened(grad: jax.Array, bases: Scales, scales: Scales, axis: int) -> jax.Array:
  """``G ×_j (Q_j diag s_j)ᵀ`` on every factored axis ``j ≠ axis``, as ``G ×_j Q_jᵀ`` scaled by
  ``s_j`` along axis ``j`` (the Gram matrix of ``axis`` is that of ``G`` whitened by
  ``Q_j diag(s_j²) Q_jᵀ``). For a matrix, one of the two whitenings then starts with the same
  product as ``tensor_ops.project(G)`` (its longest axis first), and XLA computes it once for
  both."""
  for other, (basis, scale) in enumerate(zip(bases, scales, strict=True)):
    if other != axis and basis is not None and scale is not None:
      along = [scale if j == other else None for j in range(grad.ndim)]
      grad = tensor_ops.mode_product(grad, basis.T, other) * tensor_ops.kron_outer(
        along, grad.shape
      )
  return grad


class FrobeniusState(NamedTuple):
  """State of :func:`frobenius` for one block."""

  factors: Factors  # per axis: (d_i, d_i) factor dtype, or None for an unfactored axis


@dataclasses.dataclass(frozen=True)
class Frobenius:
  """Frobenius (Shampoo/SOAP) factor statistics; see :func:`frobenius`."""

  beta: Any
  bias_correction: bool = False
  dtype: Any = None
  weight: Any = None
  trace_scaling: Any = None
  trace_floor: Any = 0.0

  def init(self, shape: Sequence[int], mask: Sequence[bool], dtype: Any) -> FrobeniusState:
    return FrobeniusState(_zero_factors(shape, mask, self.dtype or dtype))

  def first(self, grad: jax.Array, state: FrobeniusState) -> FrobeniusState:
    """Builds the factors from the first gradient: ``F_i = (1-β) G_(i) G_(i)ᵀ``."""
    return self.update(grad, state, (None,) * grad.ndim)

  def update(
    self,
    grad: jax.Array,
    state: FrobeniusState,
    bases: Scales,
    initial: Any = None,
    hold: Any = None,
    eigenvalues: Any = None,
    step: Any = None,
  ) -> FrobeniusState:
    """Folds one gradient block into the factors; ``bases`` and ``eigenvalues`` (the basis
    stage's) are unused.

    ``initial`` (a flag, possibly traced) marks the first call; from the zero initial state the
    update already equals :meth:`first`, so it is unused too. Where the traced flag ``hold`` is
    set the factors come back unchanged, whatever ``grad`` holds.
    """
    del bases, initial, eigenvalues, step
    return self._fold(state, lambda axis: grad, hold)

  def _fold(self, state: FrobeniusState, source: Any, hold: Any) -> FrobeniusState:
    """``F_i ← β F_i + (1-β) X_(i) X_(i)ᵀ`` with ``X = source(i)`` (the gradient block, or a
    whitened one)."""
    # 1-β in the factors' arithmetic, as it is when β is a traced array (inject_hyperparams):
    # a rank-deficient factor's null-space basis changes with the last bit of the factor.
    dtype = jnp.result_type(jnp.float32, *(f for f in state.factors if f is not None))
    beta, weight = tensor_ops.held(
      hold, self.beta, tensor_ops.accumulation_weight(jnp.asarray(self.beta, dtype), self.weight)
    )
    factors = tuple(
      None
      if factor is None
      else (
        beta * factor + weight * tensor_ops.zeroed(tensor_ops.mode_gram(source(axis), axis), hold)
      ).astype(factor.dtype)
      for axis, factor in enumerate(state.factors)
    )
    return FrobeniusState(factors)

  # Its eigenvalue estimates are those an eigh refresh keeps (see ``eigenvalues``).
  eigenvalues_fixed_between_refreshes = True

  def gain(self, state: FrobeniusState, basis_state: Any = None) -> jax.Array:
    """Bound on ``|entry| / ‖G‖²`` of the statistics an update writes: ``|(GGᵀ)_ij| ≤ ‖G‖²``."""
    del state, basis_state
    return jnp.ones(())

  def factors(self, state: FrobeniusState, step: jax.Array) -> Factors:
    """The factors the basis is computed from: divided by ``1 - βᵗ`` with bias correction (an
    EMA only: not with an explicit ``weight`` or ``β = 1``), then, with ``trace_scaling = e``,
    multiplied by ``max(tr F, trace_floor)^(-e)``."""
    factors = state.factors
    if self.bias_correction and self.weight is None:
      correction = tensor_ops.ema_correction(self.beta, step, jnp.result_type(float))
      factors = tuple(None if f is None else f / correction.astype(f.dtype) for f in factors)
    if self.trace_scaling is not None:
      factors = tuple(None if f is None else self._trace_scaled(f) for f in factors)
    return factors

  def _trace_scaled(self, factor: jax.Array) -> jax.Array:
    trace = jnp.maximum(jnp.trace(factor), jnp.asarray(self.trace_floor, factor.dtype))
    return factor * trace ** -jnp.asarray(self.trace_scaling, factor.dtype)

  def eigenvalues(self, state: FrobeniusState, basis_state: Any) -> tuple[Any, ...]:
    """Eigenvalue estimates in the current basis: those the basis stage kept at its refresh."""
    del state
    return tuple(basis_state.eigenvalues)


def frobenius(
  beta: Any,
  *,
  bias_correction: bool = False,
  dtype: Any = None,
  weight: Any = None,
  trace_scaling: Any = None,
  trace_floor: Any = 0.0,
) -> Frobenius:
  """Frobenius factor statistics of Shampoo and SOAP.

  .. math:: F_i \\leftarrow \\beta F_i + w\\, G_{(i)} G_{(i)}^\\top,\\qquad w = 1-\\beta

  Args:
    beta: EMA weight of the factors, in ``[0, 1]``; ``1`` accumulates a sum (``w = 1``, the
      original Shampoo's and Distributed Shampoo's default ``β₂ = 1``).
    bias_correction: hand ``F_i / (1 - βᵗ)`` to the basis stage (Distributed Shampoo); only for
      an EMA (not with ``β = 1`` or an explicit ``weight``, as there).
    dtype: storage dtype of the factors (default: the parameter's dtype).
    weight: ``w`` instead of ``1 - β`` (Distributed Shampoo's
      ``drop_weighting_factor_on_gsquare=True`` is ``weight=1``).
    trace_scaling: ``e``: hand ``F_i · max(tr F_i, trace_floor)^(-e)`` to the basis stage
      (after the bias correction; Distributed Shampoo's ``use_trace_scaling`` with
      ``trace_scaling_exponent``), a finite ``e >= 0``. ``None``: off.
    trace_floor: the smallest trace used by ``trace_scaling`` (Distributed Shampoo: its ``ε``),
      ``>= 0``.

  Returns:
    The estimator stage.
  """
  check_beta_or_sum("beta", beta)
  if weight is not None:
    check_beta_or_sum("weight", weight)
  check_nonnegative("trace_floor", trace_floor)
  if trace_scaling is not None:
    check_nonnegative("trace_scaling", trace_scaling)
  check_bool("bias_correction", bias_correction)
  check_dtype("dtype", dtype)
  return Frobenius(beta, bias_correction, dtype, weight, trace_scaling, trace_floor)


@dataclasses.dataclass(frozen=True)
class KLRoots(Frobenius):
  """Factors of the gradient whitened by the other factors' inverse roots; see :func:`kl_roots`."""

  exponents: Any = None

  def _scales(self, eigenvalues: Any, order: int) -> list[jax.Array | None]:
    """``λ_j^(-a_j)`` per axis (``None`` where there is no factor or no eigenvalue)."""
    scales: list[jax.Array | None] = []
    for axis, values in enumerate(eigenvalues):
      if values is None:
        scales.append(None)
        continue
      exponent = scaling.resolve_exponent(self.exponents, axis, order)
      safe = jnp.where(values > 0, values, 1)
      scales.append(jnp.where(values > 0, safe ** -jnp.asarray(exponent, safe.dtype), 0))
    return scales

  def update(
    self,
    grad: jax.Array,
    state: FrobeniusState,
    bases: Scales,
    initial: Any = None,
    hold: Any = None,
    eigenvalues: Any = None,
    step: Any = None,
  ) -> FrobeniusState:
    """Folds one gradient block, whitened on every other factored axis ``j`` by the inverse root
    ``Q_j diag(λ_j^(-a_j)) Q_jᵀ`` of the basis stage's last refresh (``bases``, ``eigenvalues``).

    As the Gram matrix of axis ``i`` is unchanged by an orthogonal map on the other axes, the
    whitened gradient is taken as ``G ×_j (Q_j diag λ_j^(-a_j))ᵀ``: one product per other axis
    (``_whitened``, as :func:`kl`). Without bases or eigenvalues (the first call) this is
    :func:`frobenius`'s update; ``initial`` and ``step`` are unused (the initial bases are the
    identity and the eigenvalues one).
    """
    del initial, step
    if eigenvalues is None or all(b is None for b in bases):
      return self._fold(state, lambda axis: grad, hold)
    if any(b is not None and b.ndim != 2 for b in bases):
      raise ValueError(
        "kl_roots needs the basis stage's bases: use eigh_every(keep_bases=True) "
        "(scale_by_shampoo(kl_factors=True) does)."
      )
    dtype = jnp.promote_types(grad.dtype, jnp.float32)
    work = grad.astype(dtype)
    scales = [None if s is None else s.astype(dtype) for s in self._scales(eigenvalues, grad.ndim)]
    matrices = [None if b is None else b.astype(dtype) for b in bases]

    return self._fold(state, lambda axis: _whitened(work, matrices, scales, axis), hold)

  def gain(self, state: FrobeniusState, basis_state: Any = None) -> jax.Array:
    """Bound on ``|entry| / ‖G‖²``: ``Π_j max(1, max_i λ_ji^(-a_j))²`` over the factored axes
    (the whitening's largest singular values, from the basis stage's eigenvalues)."""
    gain = jnp.ones((), jnp.float32)
    if basis_state is None:
      return gain
    for scale in self._scales(basis_state.eigenvalues, len(state.factors)):
      if scale is not None:
        gain = gain * jnp.maximum(1.0, jnp.max(scale.astype(jnp.float32))) ** 2
    return jnp.where(jnp.isfinite(gain), gain, jnp.finfo(jnp.float32).max)


def kl_roots(
  beta: Any,
  *,
  exponents: Any = None,
  bias_correction: bool = True,
  dtype: Any = None,
  weight: Any = None,
  trace_scaling: Any = None,
  trace_floor: Any = 0.0,
) -> KLRoots:
  """Distributed Shampoo's simplified KL-Shampoo factors (``RootInvKLShampooPreconditionerConfig``).

  .. math::

    F_i \\leftarrow \\beta F_i + (1-\\beta)\\, \\tilde G_{(i)} \\tilde G_{(i)}^\\top,\\qquad
    \\tilde G = G \\textstyle\\prod_{j \\ne i} \\times_j
      Q_j\\,\\mathrm{diag}(\\lambda_j^{-a_j})\\,Q_j^\\top

  where ``Q_j diag(λ_j^(-a_j)) Q_jᵀ`` is the inverse root of factor ``j`` that Shampoo
  preconditions with, as of the last refresh (the identity before the first). For a matrix with
  the default exponents, ``L ← β L + (1-β) G R̂^(-1/2) Gᵀ``. Unlike :func:`kl` (the KL-Shampoo
  authors' estimator) there is no ``1/d`` normalisation, no eigenvalue EMA and no clamping; the
  roots come from an eigh basis stage that keeps bases and eigenvalues
  (``eigh_every(keep_bases=True)``, which ``scale_by_shampoo(kl_factors=True)`` uses).

  Args:
    beta: EMA weight of the factors, in ``[0, 1]`` (``1``: a sum, as :func:`frobenius`).
    exponents: the roots' exponents ``a_j``, as for :func:`kl_precond.kronecker_eigenvalues`
      (``None``: ``1/(2k)`` on an order-``k`` block).
    bias_correction: hand ``F_i / (1 - βᵗ)`` to the basis stage (Distributed Shampoo).
    dtype: storage dtype of the factors (default: the parameter's dtype).
    weight, trace_scaling, trace_floor: as for :func:`frobenius`.

  Returns:
    The estimator stage.

  References:
    facebookresearch/optimizers, ``RootInvKLShampooPreconditionerList`` (Distributed Shampoo);
    Lin et al., "Understanding and Improving Shampoo and SOAP via Kullback-Leibler
    Minimization", 2025, https://arxiv.org/abs/2509.03378
  """
  check_beta_or_sum("beta", beta)
  if weight is not None:
    check_beta_or_sum("weight", weight)
  check_nonnegative("trace_floor", trace_floor)
  if trace_scaling is not None:
    check_nonnegative("trace_scaling", trace_scaling)
  check_bool("bias_correction", bias_correction)
  check_dtype("dtype", dtype)
  scaling._check_exponents(exponents)
  return KLRoots(
    beta,
    bias_correction,
    dtype,
    weight=weight,
    trace_scaling=trace_scaling,
    trace_floor=trace_floor,
    exponents=exponents,
  )


class KLState(NamedTuple):
  """State of :func:`kl` for one block."""

  factors: Factors  # per axis: (d_i, d_i) factor dtype, or None
  inverse_roots: tuple[jax.Array | None, ...]  # per axis: (d_i,) s_i = ℓ_i^(-1/2), or None


def _inverse_sqrt(x: jax.Array) -> jax.Array:
  """``1/√x`` with ``±inf`` and NaN mapped to zero (the reference's ``nan_to_num``)."""
  y = 1 / jnp.sqrt(x)
  return jnp.where(jnp.isfinite(y), y, 0)


EIGENVALUE_INITS = ("constant", "trace", "eigh", "debiased")
CLAMPS = ("absolute", "relative")


@dataclasses.dataclass(frozen=True)
class KL:
  """KL factor statistics (KL-Shampoo/KL-SOAP); see :func:`kl`."""

  beta: Any
  init_factor: Any = 0.1
  max_clamp_value: Any = 4000.0
  damping: Any = 0.0
  dtype: Any = None
  eigenvalue_init: str = "constant"
  clamp: str = "absolute"

  @property
  def from_data(self) -> bool:
    """The eigenvalue estimates start from the first gradient (not from ``init_factor``)."""
    return self.eigenvalue_init != "constant"

  # The chassis calls ``seed`` after the first basis is built (see ``estimates``).
  @property
  def seeds(self) -> bool:
    return self.from_data

  def init(self, shape: Sequence[int], mask: Sequence[bool], dtype: Any) -> KLState:
    dtype = self.dtype or dtype
    roots = tuple(
      (
        jnp.zeros((d,), dtype)
        if self.from_data
        else jnp.full((d,), self.init_factor, dtype) ** -0.5
      )
      if m
      else None
      for d, m in zip(shape, mask, strict=True)
    )
    return KLState(_zero_factors(shape, mask, dtype), roots)

  def _isotropic(self, grad: jax.Array, factored: int) -> jax.Array:
    """``s = a^(-1/2)`` of the isotropic KL fixed point ``S_j = a I`` on the ``m`` factored axes,
    ``a^m = mean(G²)`` (zero for a zero gradient)."""
    mean_square = jnp.mean(jnp.square(grad))
    safe = jnp.where(mean_square > 0, mean_square, 1)
    return jnp.where(mean_square > 0, safe ** (-0.5 / max(factored, 1)), 0)

  def first(self, grad: jax.Array, state: KLState) -> KLState:
    """First gradient: ``F_i = (1-β) (d_i/N) G_(i) G_(i)ᵀ`` (other factors taken as identity).

    With a data start, :meth:`seed` then multiplies it by ``k``, after the first bases are
    computed from it (see :meth:`_first_fold_scale`)."""
    factors = tuple(
      None if f is None else self._fold(f, tensor_ops.mode_gram(grad, axis), grad, axis)
      for axis, f in enumerate(state.factors)
    )
    return KLState(factors, state.inverse_roots)

  def _isotropic_roots(self, grad: jax.Array, roots: Scales) -> list[Any]:
    """``a^(-1/2)`` on every factored axis: the whitening of an axis with no estimate yet."""
    iso = self._isotropic(grad, sum(r is not None for r in roots))
    return [None if r is None else jnp.full(r.shape, iso, grad.dtype) for r in roots]

  def _first_fold_scale(self, factor: jax.Array, order: int) -> jax.Array:
    """``k = mean(G₀²)^(-(m-1)/m)``, read from ``tr F_i = (1-β) d_i mean(G₀²)`` of the first
    call's factor (``m`` factored axes; ``1`` where the trace is zero).

    The first factor, folded with the other axes taken as the identity, times ``k`` is what it
    would be with them taken as the isotropic fixed point ``a I``, ``a^m = mean(G₀²)``. A data
    start applies ``k`` after the first bases are computed from the unscaled factor, so that
    they are the authors' first bases, bit for bit: a rank-deficient first factor's null-space
    columns are whatever the decomposition's rounding makes them, and a scalar multiple of its
    input would change them.
    """
    dtype = jnp.promote_types(factor.dtype, jnp.float32)
    mean_square = jnp.trace(factor.astype(dtype)) / (
      (1 - jnp.asarray(self.beta, dtype)) * factor.shape[0]
    )
    safe = jnp.where(mean_square > 0, mean_square, 1)
    return jnp.where(mean_square > 0, safe ** (-(order - 1) / order), 1)

  def _fold(
    self, factor: jax.Array, gram: jax.Array, grad: jax.Array, axis: int, hold: Any = None
  ) -> jax.Array:
    dtype = jnp.promote_types(factor.dtype, jnp.float32)  # 1-β as a traced β computes it
    weight = (1 - jnp.asarray(self.beta, dtype)) / (math.prod(grad.shape) / grad.shape[axis])
    beta, weight = tensor_ops.held(hold, self.beta, weight)
    return (factor * beta + weight * tensor_ops.zeroed(gram, hold)).astype(factor.dtype)

  def _update_factor(
    self,
    grad: jax.Array,
    factor: jax.Array,
    bases: Scales,
    roots: Scales,
    axis: int,
    hold: Any = None,
  ) -> jax.Array:
    whitened = _whitened(grad, bases, roots, axis)
    return self._fold(factor, tensor_ops.mode_gram(whitened, axis), grad, axis, hold)

  def _ceiling(self, dim: int) -> jax.Array:
    """``κ = max(10, min(d, max_clamp_value))``."""
    return jnp.maximum(10.0, jnp.minimum(float(dim), self.max_clamp_value))

  def _clamped(self, eigenvalue: jax.Array) -> jax.Array:
    """``s = ℓ^(-1/2)`` under the clamp: ``s ≤ κ`` (absolute) or ``ℓ ≥ max ℓ / κ²``
    (relative: ``s ≤ κ min s``, the absolute clamp in units of the largest estimate)."""
    if self.max_clamp_value is None:
      return _inverse_sqrt(eigenvalue)
    ceiling = self._ceiling(eigenvalue.shape[-1])
    if self.clamp == "relative":
      largest = jnp.max(jnp.where(jnp.isfinite(eigenvalue), eigenvalue, 0))
      return _inverse_sqrt(jnp.maximum(eigenvalue, largest / ceiling**2))
    return jnp.minimum(_inverse_sqrt(eigenvalue), ceiling)

  def _rate(self, step: Any) -> Any:
    """The eigenvalue EMA's weight on the new target: ``1-β``, or with ``"debiased"`` Adam's
    bias-corrected ``(1-β)/(1-β^(t+1))`` (the seed counted as the observation of step 0)."""
    if self.eigenvalue_init != "debiased" or step is None:
      return 1 - self.beta
    dtype = jnp.result_type(float)
    return (1 - jnp.asarray(self.beta, dtype)) / tensor_ops.ema_correction(
      self.beta, jnp.asarray(step, dtype) + 1, dtype
    )

  def _update_root(
    self, projected: jax.Array, roots: Scales, axis: int, damping: jax.Array, step: Any = None
  ) -> jax.Array:
    """EMA of the eigenvalue estimate of axis ``axis``, returned as a clamped ``ℓ^(-1/2)``. An
    axis with no estimate yet (all ``s = 0``, a data start not yet seeded) takes the target."""
    scaled = projected * tensor_ops.kron_outer(
      [None if j == axis else r for j, r in enumerate(roots)], projected.shape
    )
    others = tuple(j for j in range(projected.ndim) if j != axis)
    target = jnp.mean(scaled**2, axis=others) + damping
    root = roots[axis]
    assert root is not None
    eigenvalue = jnp.where(root != 0, 1 / root**2, 0)
    eigenvalue = eigenvalue + self._rate(step) * (target - eigenvalue)
    if self.from_data:
      eigenvalue = jnp.where(jnp.all(root == 0), target, eigenvalue)
    return self._clamped(eigenvalue).astype(root.dtype)

  def _dampings(self, roots: Scales) -> list[jax.Array]:
    """Trace damping ``δ_i = damping · Π_j τ_j / τ_i`` with ``τ_j = mean(s_j²)`` (old ``s``;
    ``δ_i = 0`` where ``τ_i = 0``, an axis with no estimate yet)."""
    traces = [jnp.ones(()) if r is None else jnp.mean(r**2) for r in roots]
    total = self.damping * math.prod(traces)
    return [jnp.where(tau > 0, total / jnp.where(tau > 0, tau, 1), 0) for tau in traces]

  def update(
    self,
    grad: jax.Array,
    state: KLState,
    bases: Scales,
    initial: Any = None,
    hold: Any = None,
    eigenvalues: Any = None,
    step: Any = None,
  ) -> KLState:
    """Folds one gradient block into the factors and the eigenvalue estimates.

    Order 3 follows the reference's sequential mode order exactly (factor 3, factor 2, ``s_3``,
    ``s_2`` with the new ``s_3``, factor 1 with the new ``s_2`` and old ``s_3``, ``s_1``). Every
    other order uses only the old estimates on the right-hand sides (Jacobi), which is what the
    reference does for matrices.

    Where the flag ``initial`` (possibly traced) is set, this is :meth:`first` instead (the
    state must be the initial one, whose bases are the identity): the factors fold the raw
    gradient (no whitening) and the eigenvalue estimates are left as they are (the chassis then
    calls :meth:`seed`). Selecting the whitening scales, not the branch, keeps the projection of
    ``G`` shared with the direction. With a data start, the fold at ``step == 1`` first
    multiplies the factors by :meth:`_first_fold_scale`'s ``k``, and an axis with no estimate
    yet (``s = 0``: ``first_call="identity"``, or a zero first gradient) whitens the others by
    the isotropic ``a^(-1/2)`` of the current gradient and takes its target as its estimate.
    Where the traced flag ``hold`` is set, the state comes back unchanged, whatever ``grad``
    holds. ``eigenvalues`` (the basis stage's) is unused: the estimates are this stage's own.
    ``step`` (the chassis' ``t``) sets the rate of ``eigenvalue_init="debiased"``.
    """
    del eigenvalues
    factors, roots = list(state.factors), list(state.inverse_roots)
    dtype = jnp.promote_types(grad.dtype, jnp.float32)
    grad = grad.astype(dtype)
    roots = [None if r is None else r.astype(dtype) for r in roots]
    isotropic = self._isotropic_roots(grad, roots) if self.from_data else None

    def whitening(scales: list[Any]) -> list[Any]:
      out = []
      for axis, r in enumerate(scales):
        if r is not None and isotropic is not None:
          r = jnp.where(jnp.all(r == 0), isotropic[axis], r)
        if r is not None and initial is not None:
          r = jnp.where(initial, jnp.ones_like(r), r)
        out.append(r)
      return out

    projected = tensor_ops.project(grad, bases)
    dampings = self._dampings(roots)
    active = [axis for axis, f in enumerate(factors) if f is not None]
    if self.from_data and step is not None:
      # The first fold after the first call multiplies that call's factors by ``k``.
      first_fold = jnp.asarray(step) == 1
      for flag in (initial, hold):
        if flag is not None:
          first_fold = first_fold & ~flag
      for axis in active:
        factor = factors[axis]
        assert factor is not None
        scale = jnp.where(first_fold, self._first_fold_scale(factor, len(active)), 1)
        factors[axis] = (factor * scale.astype(factor.dtype)).astype(factor.dtype)
    if grad.ndim == 3:
      old = list(roots)
      for axis in (2, 1):
        factor = factors[axis]
        if factor is not None:
          factors[axis] = self._update_factor(grad, factor, bases, whitening(old), axis, hold)
      for axis in (2, 1):
        if roots[axis] is not None:
          mixed = [old[0], roots[1], roots[2]]
          roots[axis] = self._update_root(
            projected, self._with_own(whitening(mixed), mixed, axis), axis, dampings[axis], step
          )
      first_factor = factors[0]
      if first_factor is not None:
        mixed = [old[0], roots[1], old[2]]
        factors[0] = self._update_factor(grad, first_factor, bases, whitening(mixed), 0, hold)
        roots[0] = self._update_root(
          projected, self._with_own(whitening(mixed), mixed, 0), 0, dampings[0], step
        )
    else:
      old = list(roots)
      for axis in active:
        factor = factors[axis]
        assert factor is not None
        factors[axis] = self._update_factor(grad, factor, bases, whitening(old), axis, hold)
        roots[axis] = self._update_root(
          projected, self._with_own(whitening(old), old, axis), axis, dampings[axis], step
        )
    keep = initial if hold is None else hold if initial is None else initial | hold
    if keep is not None:  # one select on a vector per axis
      roots = [
        None if r is None or o is None else jnp.where(keep, o.astype(r.dtype), r)
        for r, o in zip(roots, state.inverse_roots, strict=True)
      ]
    stored = tuple(
      None if r is None or s is None else r.astype(s.dtype)
      for r, s in zip(roots, state.inverse_roots, strict=True)
    )
    return KLState(tuple(factors), stored)

  def _with_own(self, whitened: list[Any], raw: list[Any], axis: int) -> list[Any]:
    """The scales an eigenvalue target of ``axis`` uses: the whitening of the other axes, and
    the axis' own (unsubstituted) estimate, which the EMA starts from."""
    if not self.from_data:
      return raw
    return [raw[j] if j == axis else w for j, w in enumerate(whitened)]

  def seed(self, state: KLState, bases: Scales) -> KLState:
    """The eigenvalue estimates a data start takes from the first call's factors
    ``F_i = (1-β)(d_i/N) G_(i)G_(i)ᵀ`` and the first ``bases``.

    With ``k`` of :meth:`_first_fold_scale` and ``Δ_i = k F_i/(1-β)`` the first statistic
    whitened by the isotropic fixed point: ``ℓ_i = tr(Δ_i)/d_i = a`` (``"trace"``) or
    ``diag(Q_iᵀ Δ_i Q_i)`` (``"eigh"``, ``"debiased"``: the first decomposition's eigenvalues),
    clamped. The returned factors are ``k F_i``. When the first call is a branch of the refresh
    switch (``first_call="init_only"``) the chassis keeps only the estimates, and the fold at
    ``step == 1`` scales the factors instead.
    """
    if not self.from_data:
      return state
    order = sum(f is not None for f in state.factors)
    roots: list[jax.Array | None] = []
    factors: list[jax.Array | None] = []
    for factor, basis, root in zip(state.factors, bases, state.inverse_roots, strict=True):
      if factor is None or root is None:
        roots.append(root)
        factors.append(factor)
        continue
      matrix = factor.astype(jnp.promote_types(factor.dtype, jnp.float32))
      scale = self._first_fold_scale(matrix, order).astype(matrix.dtype)
      if self.eigenvalue_init == "trace" or basis is None:
        values = jnp.full(root.shape, jnp.trace(matrix) / root.shape[0], matrix.dtype)
      else:
        rotation = basis.astype(matrix.dtype)
        values = jnp.sum(rotation * (matrix @ rotation), axis=0)
      values = jnp.maximum(values, 0) * scale / (1 - jnp.asarray(self.beta, matrix.dtype))
      roots.append(self._clamped(values).astype(root.dtype))
      factors.append((matrix * scale).astype(factor.dtype))
    return KLState(tuple(factors), tuple(roots))

  def estimates(self, state: KLState) -> tuple[jax.Array | None, ...]:
    """The part of the state :meth:`seed` sets (the chassis passes only it through the first
    call's conditional)."""
    return state.inverse_roots

  def with_estimates(self, state: KLState, estimates: Any) -> KLState:
    return state._replace(inverse_roots=tuple(estimates))

  eigenvalues_fixed_between_refreshes = False  # ``ℓ_i`` are updated every step

  def gain(self, state: KLState, basis_state: Any = None) -> jax.Array:
    """Bound on ``|entry| / ‖G‖²`` of the statistics an update writes.

    The whitened gradient is ``G ×_j (Q_j diag s_j)ᵀ``, so every factor entry and eigenvalue
    target is at most ``‖G‖² Π_j max(1, max s_j)²``. With the absolute clamp, ``s_j`` (old or
    new) never exceeds the clamp ceiling of its axis, a bound that needs no state; otherwise
    the largest stored ``s_j``, over ``β`` for the new ones an order-3 block whitens with
    (``ℓ_new ≥ β ℓ_old``). A data start's isotropic whitening (an axis with no estimate) is
    ``mean(G²)^(-1/(2m))`` per axis, so its entries are at
    most ``max(N, ‖G‖²)``. ``basis_state`` is unused.
    """
    del basis_state
    gain = jnp.ones((), jnp.float32)
    order = len(state.inverse_roots)
    for root in state.inverse_roots:
      if root is None:
        continue
      if self.max_clamp_value is not None and self.clamp == "absolute":
        peak = self._ceiling(root.shape[0])
      else:
        peak = jnp.max(jnp.abs(root.astype(jnp.float32)))
        if order == 3:
          peak = peak / jnp.sqrt(jnp.asarray(self.beta, jnp.float32))
      gain = gain * jnp.maximum(1.0, peak) ** 2
    return jnp.where(jnp.isfinite(gain), gain, 1.0)

  def factors(self, state: KLState, step: jax.Array) -> Factors:
    del step
    return state.factors

  def eigenvalues(self, state: KLState, basis_state: Any) -> tuple[Any, ...]:
    """The EMA eigenvalue estimates ``ℓ_i = 1/s_i²`` (zero where ``s_i = 0``)."""
    del basis_state
    return tuple(None if r is None else jnp.where(r != 0, 1 / r**2, 0) for r in state.inverse_roots)


def kl(
  beta: Any,
  *,
  eigenvalue_init: str = "eigh",
  clamp: str = "relative",
  init_factor: Any = 0.1,
  max_clamp_value: Any = 4000.0,
  damping: Any = 0.0,
  dtype: Any = None,
) -> KL:
  """KL covariance estimate of KL-Shampoo and KL-SOAP (Lin et al., 2025).

  .. math::

    F_i &\\leftarrow \\beta F_i + \\frac{1-\\beta}{N/d_i}\\,
      G_{(i)} \\Big(\\bigotimes_{j\\ne i} Q_j \\mathrm{diag}(s_j^2) Q_j^\\top\\Big) G_{(i)}^\\top \\\\
    \\ell_i &\\leftarrow \\beta \\ell_i + (1-\\beta)\\,
      \\big(\\mathrm{mean}_{j \\ne i}\\,(\\tilde G \\textstyle\\prod_{j\\ne i} s_j)^2 + \\delta_i\\big),
    \\qquad s_i = \\ell_i^{-1/2}\\ \\text{(clamped)}

  with ``G̃ = proj(G)`` in the current bases and ``δ_i = damping · Π_j mean(s_j²) / mean(s_i²)``.
  The first gradient only builds the factors and the first bases.

  **Scale.** If every gradient is multiplied by ``c > 0``, the fixed point of these equations
  has ``ℓ_i ∝ c^(2/m)`` on the ``m`` factored axes (``Π_i ℓ_i ∝ c²``), so KL-Shampoo's
  ``(⊗ ℓ_i)^(-1/2)`` and KL-SOAP's bases are unchanged. Whether a run is, depends on where ``ℓ``
  starts and on the clamp:

  * ``eigenvalue_init="constant"`` (the authors' code): ``ℓ_i`` starts at ``init_factor`` and the
    first call whitens by the identity. Until the EMA forgets that start (about
    ``ln(init_factor/ℓ_data)/(1-β)`` steps) the step size is set by ``init_factor``, not by the
    gradients: an implicit warm-up whose length depends on the loss's scale.
  * A data start: the first statistic is the gradient whitened by the isotropic fixed point
    ``S_j = a I`` with ``a^m = mean(G²)`` (exact for isotropic gradients), i.e. the authors'
    first factor times ``a^(-(m-1))`` (applied after the first bases are computed from the
    authors' factor, so the bases are theirs), and ``ℓ_i`` starts at what that statistic
    ``Δ_i`` says: ``tr(Δ_i)/d_i = a`` on every direction (``"trace"``), or
    ``diag(Q_iᵀ Δ_i Q_i)``, the first decomposition's eigenvalues (``"eigh"``). ``"debiased"``
    is ``"eigh"`` followed by Adam's bias-corrected EMA, i.e. a zero start with
    ``ℓ̂ = ℓ/(1-β^(t+1))`` where the first call is observation 0: its weight decays as
    ``(1-β)β^t/(1-β^(t+1))`` instead of ``β^t``. Each of these scales as ``c^(2/m)``.
  * ``clamp="absolute"`` (the authors'): ``s_i ≤ κ_i = max(10, min(d_i, max_clamp_value))``, in
    absolute units: with small gradients it binds on every direction and the step becomes
    SGD-like. ``clamp="relative"``: ``ℓ_i ≥ max(ℓ_i)/κ_i²``, i.e. ``s_i ≤ κ_i min(s_i)``, the
    same bound measured in units of the factor's largest estimate (equal to the absolute one
    where ``max ℓ_i = 1``), which is scale-free.

  So with a data start and the relative clamp (or none) the whole trajectory is invariant under
  ``G → cG`` when ``eps`` (added to ``√(ℓ_L ℓ_R)`` or ``√V``) is scaled by ``c`` too, or is
  negligible; ``damping`` is not scale-free (keep it ``0``). A data start whose first gradient
  is zero (or that never had a first call) keeps ``s = 0`` (zero scaling) and takes its first
  nonzero target as its estimate.

  Args:
    beta: EMA weight of the factors and of the eigenvalue estimates, in ``[0, 1)``.
    eigenvalue_init: where ``ℓ`` starts: ``"eigh"`` (default), ``"trace"``, ``"debiased"`` or
      ``"constant"`` (``init_factor``; the authors' code).
    clamp: ``"relative"`` (default) or ``"absolute"`` (the authors'); ``max_clamp_value=None``
      turns either off.
    init_factor: ``ℓ_0 > 0`` of ``eigenvalue_init="constant"``.
    max_clamp_value: cap of the clamp's ``κ_i``; ``None`` turns clamping off.
    damping: trace damping strength (``0`` = off; the reference uses its ``eps``).
    dtype: storage dtype of factors and estimates (default: the parameter's dtype).

  Returns:
    The estimator stage.

  Example:
    >>> import kl_precond as kp
    >>> authors = kp.kl(0.98, eigenvalue_init="constant", clamp="absolute")
    >>> scale_free = kp.kl(0.98)

  References:
    Lin et al., "Understanding and Improving Shampoo and SOAP via Kullback-Leibler
    Minimization", 2025, https://arxiv.org/abs/2509.03378
  """
  check_beta("beta", beta)
  check_choice("eigenvalue_init", eigenvalue_init, EIGENVALUE_INITS)
  check_choice("clamp", clamp, CLAMPS)
  check_positive("init_factor", init_factor)
  if max_clamp_value is not None:
    check_positive("max_clamp_value", max_clamp_value)
  check_nonnegative("damping", damping)
  check_dtype("dtype", dtype)
  return KL(beta, init_factor, max_clamp_value, damping, dtype, eigenvalue_init, clamp)
