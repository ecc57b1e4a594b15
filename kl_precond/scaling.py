"""The ``scaling`` stage: what happens to the gradient in the eigenbasis.

* :func:`adam` (SOAP, KL-SOAP): Adam's moments kept **in the eigenbasis**,

  .. math::

    \\tilde G = \\mathrm{proj}(G),\\quad M \\leftarrow \\beta_1 M + (1-\\beta_1)\\tilde G,\\quad
    V \\leftarrow \\beta_2 V + (1-\\beta_2)\\tilde G^2,\\quad
    U = c_t\\,\\mathrm{unproj}\\big(M / (\\sqrt V + \\epsilon)\\big),

  with ``c_t = √(1-β₂ᵗ)/(1-β₁ᵗ)`` under bias correction, else 1. At a basis refresh ``M`` is
  re-rotated exactly through parameter space; ``V`` is not rotated, only permuted by the basis
  stage's sort.

* :func:`eigenvalue_corrected` (Distributed Shampoo's SOAP): the same with ``M`` in parameter
  space, ``ε`` after the bias correction, and ``V`` (its ``D``) never rotated or permuted.

* :func:`kronecker_eigenvalues` (KL-Shampoo, Shampoo): a first moment scaled in the eigenbasis by
  a Kronecker product of per-factor eigenvalue powers,

  .. math::

    M \\leftarrow \\beta_1 M + (1-\\beta_1) G,\\quad
    U = \\mathrm{unproj}\\big(\\mathrm{proj}(\\hat M) \\odot P\\big),

  with ``P = ⊗_i (λ_i + ε)^(-a_i)`` (``eps_placement="inside"``, Shampoo) or
  ``P = 1 / (1/⊗_i λ_i^(-a_i) + ε)`` (``"outside"``, KL-Shampoo: Adam's denominator with a
  Kronecker second moment, ``1/(√(ℓ_a ℓ_b) + ε)`` for ``a_i = 1/2``). ``M`` is kept in parameter
  space (Shampoo: with ``cache_roots`` a step is one product per axis), or in the eigenbasis as
  ``proj(M)`` (KL-Shampoo, ``momentum_in_eigenbasis``: the EMA is linear, so it folds
  ``proj(G)``, which the KL estimator computes anyway, and re-rotates ``M`` at a refresh as
  :func:`adam` does; two products per axis fewer on every step, the same ``U`` up to rounding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kl_precond import tensor_ops
from kl_precond._validation import (
  check_beta,
  check_beta_or_sum,
  check_bool,
  check_choice,
  check_dtype,
  check_nonnegative,
)

Bases = Sequence[jax.Array | None]


class AdamState(NamedTuple):
  """State of :func:`adam` for one block."""

  mu: jax.Array  # block shape, moment dtype; first moment in the eigenbasis
  nu: jax.Array  # block shape, moment dtype; second moment in the eigenbasis


@dataclasses.dataclass(frozen=True)
class Adam:
  """Adam in the eigenbasis; see :func:`adam`."""

  b1: Any
  b2: Any
  eps: Any
  bias_correction: bool = True
  dtype: Any = None
  b3: Any = None

  def init(self, shape: Sequence[int], mask: Sequence[bool], dtype: Any) -> AdamState:
    del mask
    zeros = jnp.zeros(tuple(shape), self.dtype or dtype)
    return AdamState(zeros, zeros)

  def update(
    self,
    grad: jax.Array,
    state: AdamState,
    bases: Bases,
    eigenvalues: Any,
    step: jax.Array,
    hold: Any = None,
  ) -> tuple[jax.Array, AdamState]:
    """The direction and the new moments; where the traced flag ``hold`` is set the moments
    come back unchanged, whatever ``grad`` holds (the direction is then meaningless)."""
    del eigenvalues
    dtype = _compute_dtype(state.mu.dtype)
    projected = tensor_ops.zeroed(tensor_ops.project(grad.astype(dtype), bases), hold)
    b1, w1 = tensor_ops.held(hold, self.b1, 1 - self.b1)
    b2, w2 = tensor_ops.held(hold, self.b2, 1 - self.b2)
    nu = b2 * state.nu.astype(dtype) + w2 * projected**2
    if self.b3 is None:
      mu = b1 * state.mu.astype(dtype) + w1 * projected
      direction = tensor_ops.unproject(mu / (jnp.sqrt(nu) + self.eps), bases)
      if self.bias_correction:
        direction = direction * _adam_correction(self.b1, self.b2, step, direction.dtype)
    else:
      mu, moment = tensor_ops.filtered_gradient(
        state.mu.astype(dtype), projected, self.b1, step, hold, b3=self.b3, bias_correction=False
      )
      if self.bias_correction:  # c_t with the look-ahead's first-moment correction
        second = jnp.sqrt(1 - jnp.asarray(self.b2, dtype) ** step.astype(dtype))
        moment = moment * second / tensor_ops.filtered_correction(self.b1, step, dtype, b3=self.b3)
      direction = tensor_ops.unproject(moment / (jnp.sqrt(nu) + self.eps), bases)
    return direction, AdamState(mu.astype(state.mu.dtype), nu.astype(state.nu.dtype))

  def rotate(
    self,
    state: AdamState,
    old_bases: Bases,
    new_bases: Bases,
    permutations: Sequence[Any],
    eigenvalues: Any = None,
  ) -> AdamState:
    """Re-expresses ``M`` in the new basis; permutes ``V`` by the sort (no rotation)."""
    del eigenvalues
    mu = tensor_ops.project(tensor_ops.unproject(state.mu, old_bases), new_bases)
    return AdamState(mu.astype(state.mu.dtype), tensor_ops.permute_axes(state.nu, permutations))


def _compute_dtype(dtype: Any) -> Any:
  """Moments are updated in float32 at least, whatever their storage dtype."""
  return jnp.promote_types(dtype, jnp.float32)


def _adam_correction(b1: Any, b2: Any, step: jax.Array, dtype: Any) -> jax.Array:
  step = step.astype(dtype)
  return jnp.sqrt(1 - jnp.asarray(b2, dtype) ** step) / (1 - jnp.asarray(b1, dtype) ** step)


def adam(
  b1: Any = 0.95,
  b2: Any = 0.95,
  eps: Any = 1e-8,
  *,
  bias_correction: bool = True,
  dtype: Any = None,
  b3: Any = None,
) -> Adam:
  """Adam moments kept in the eigenbasis (SOAP, KL-SOAP).

  .. math::

    M \\leftarrow \\beta_1 M + (1-\\beta_1)\\tilde G,\\quad
    V \\leftarrow \\beta_2 V + (1-\\beta_2)\\tilde G^2,\\quad
    U = c_t\\,\\mathrm{unproj}(M / (\\sqrt V + \\epsilon))

  Args:
    b1: first-moment EMA weight in ``[0, 1)``.
    b2: second-moment EMA weight in ``[0, 1)``.
    eps: added to ``√V`` (after the square root, without bias correction), ``>= 0``.
    bias_correction: multiply by ``c_t = √(1-β₂ᵗ)/(1-β₁ᵗ)`` (SOAP); KL-SOAP has none.
    dtype: storage dtype of ``M`` and ``V`` (default: the parameter's dtype).
    b3: a look-ahead for the first moment, as for :func:`kronecker_eigenvalues` (the bias
      correction then divides by ``1-β₃β₁^{t-1}``).

  Returns:
    The scaling stage.
  """
  check_beta("b1", b1)
  check_beta("b2", b2)
  if b3 is not None:
    check_beta("b3", b3)
  check_nonnegative("eps", eps)
  check_bool("bias_correction", bias_correction)
  check_dtype("dtype", dtype)
  return Adam(b1, b2, eps, bias_correction, dtype, b3)


def _check_exponents(exponents: Any, name: str = "exponents") -> None:
  """Every exponent in ``exponents`` (a number, a per-axis sequence or array, or a per-order
  mapping) must be a finite number ``>= 0``; the message shows the whole option."""
  try:
    _check_exponent_values(exponents)
  except ValueError as error:
    raise ValueError(
      f"{name}: all exponents must be finite and >= 0 (a number, a per-axis sequence, or a "
      f"per-order mapping), got {exponents!r}."
    ) from error


def _check_exponent_values(exponents: Any) -> None:
  if isinstance(exponents, Mapping):
    for entry in exponents.values():
      _check_exponent_values(list(entry.values()) if isinstance(entry, Mapping) else entry)
  elif isinstance(exponents, (tuple, list)):
    for value in exponents:
      check_nonnegative("exponents", value)
  elif isinstance(exponents, (np.ndarray, jax.Array)) and not isinstance(
    exponents, jax.core.Tracer
  ):
    values = np.asarray(exponents)
    if exponents.ndim and not bool(np.all((values >= 0) & np.isfinite(values))):
      raise ValueError(f"exponents must be >= 0, got {exponents!r}.")
    if not exponents.ndim:
      check_nonnegative("exponents", exponents)
  elif exponents is not None:
    check_nonnegative("exponents", exponents)


class MomentumState(NamedTuple):
  """State of :func:`kronecker_eigenvalues` for one block."""

  # block shape, moment dtype; first moment in parameter space, or in the eigenbasis
  # (momentum_in_eigenbasis=True)
  mu: jax.Array
  # per axis with a factor: (d_i, d_i) root Q_i diag(P_i) Q_iᵀ (cache_roots=True), else ()
  roots: tuple[jax.Array | None, ...] = ()


@dataclasses.dataclass(frozen=True)
class KroneckerEigenvalues:
  """Kronecker eigenvalue scaling; see :func:`kronecker_eigenvalues`."""

  b1: Any
  eps: Any
  exponents: Any = 0.5
  eps_placement: str = "outside"
  bias_correction: bool = False
  dtype: Any = None
  cache_roots: bool = False
  momentum_in_eigenbasis: bool = False
  b3: Any = None

  def init(self, shape: Sequence[int], mask: Sequence[bool], dtype: Any) -> MomentumState:
    dtype = self.dtype or dtype
    mu = jnp.zeros(tuple(shape), dtype)
    if not self.cache_roots:
      return MomentumState(mu)
    # The roots of the basis stage's initial state: identity bases, eigenvalues of one.
    roots = tuple(
      self._root(jnp.eye(d, dtype=dtype), jnp.ones((d,), dtype), axis, len(shape)).astype(dtype)
      if m
      else None
      for axis, (d, m) in enumerate(zip(shape, mask, strict=True))
    )
    return MomentumState(mu, roots)

  def _exponent(self, axis: int, order: int) -> Any:
    return resolve_exponent(self.exponents, axis, order)

  def _axis_power(self, values: jax.Array, axis: int, order: int) -> jax.Array:
    exponent = self._exponent(axis, order)
    if self.eps_placement == "inside":
      return (values + self.eps) ** -exponent
    safe = jnp.where(values > 0, values, 1)
    return jnp.where(values > 0, safe**-exponent, 0)

  def _root(self, basis: jax.Array, values: jax.Array, axis: int, order: int) -> jax.Array:
    """``Q diag(P_axis) Qᵀ`` in float32 at least."""
    dtype = _compute_dtype(basis.dtype)
    basis = basis.astype(dtype)
    return (basis * self._axis_power(values.astype(dtype), axis, order)) @ basis.T

  def _powers(self, eigenvalues: Sequence[Any], shape: Sequence[int]) -> jax.Array:
    powers = [
      None if values is None else self._axis_power(values, axis, len(shape))
      for axis, values in enumerate(eigenvalues)
    ]
    scale = tensor_ops.kron_outer(powers, shape)
    if self.eps_placement == "outside":
      scale = scale / (1 + self.eps * scale)
    return scale

  def update(
    self,
    grad: jax.Array,
    state: MomentumState,
    bases: Bases,
    eigenvalues: Any,
    step: jax.Array,
    hold: Any = None,
  ) -> tuple[jax.Array, MomentumState]:
    """The direction and the new moment; where the traced flag ``hold`` is set the moment comes
    back unchanged, whatever ``grad`` holds (the direction is then meaningless)."""
    if any(v is None for v, b in zip(eigenvalues, bases, strict=True) if b is not None):
      raise ValueError(
        "kronecker_eigenvalues needs eigenvalue estimates for every factored axis: use the kl() "
        "estimator, or a basis stage that keeps eigenvalues (eigh_every(keep_eigenvalues=True))."
      )
    dtype = _compute_dtype(state.mu.dtype)
    old = state.mu.astype(dtype)
    grad = grad.astype(dtype)
    if self.momentum_in_eigenbasis:
      # The same projection as the estimator's (XLA computes it once for both).
      grad = tensor_ops.project(grad, bases)
    mu, moment = tensor_ops.filtered_gradient(
      old,
      tensor_ops.zeroed(grad, hold),
      self.b1,
      step,
      hold,
      b3=self.b3,
      bias_correction=self.bias_correction,
    )
    if self.cache_roots:
      # Separable scaling with eigenvalues fixed between refreshes: one product per axis with
      # the root cached at the refresh, instead of projecting and unprojecting.
      roots = [None if r is None else r.astype(dtype) for r in state.roots]
      direction = tensor_ops.unproject(moment, roots)
    else:
      values = [None if v is None else v.astype(dtype) for v in eigenvalues]
      scale = self._powers(values, mu.shape)
      if not self.momentum_in_eigenbasis:
        moment = tensor_ops.project(moment, bases)
      direction = tensor_ops.unproject(moment * scale, bases)
    return direction, state._replace(mu=mu.astype(state.mu.dtype))

  def rotate(
    self,
    state: MomentumState,
    old_bases: Bases,
    new_bases: Bases,
    permutations: Sequence[Any],
    eigenvalues: Any = None,
  ) -> MomentumState:
    """A moment in parameter space needs no rotation; one in the eigenbasis is re-expressed in
    the new basis through parameter space (the permutations are in the new bases already).
    With ``cache_roots`` the roots ``Q_i diag(P_i) Q_iᵀ`` are rebuilt from the new bases and
    eigenvalues."""
    del permutations
    if self.momentum_in_eigenbasis:
      mu = tensor_ops.project(tensor_ops.unproject(state.mu, old_bases), new_bases)
      return state._replace(mu=mu.astype(state.mu.dtype))
    if not self.cache_roots:
      return state
    order = len(new_bases)
    roots = tuple(
      None
      if root is None or basis is None or values is None
      else self._root(basis, values, axis, order).astype(root.dtype)
      for axis, (root, basis, values) in enumerate(
        zip(state.roots, new_bases, eigenvalues, strict=True)
      )
    )
    return state._replace(roots=roots)


class CorrectedState(NamedTuple):
  """State of :func:`eigenvalue_corrected` for one block."""

  mu: jax.Array  # block shape, moment dtype; first moment, in parameter space or the eigenbasis
  nu: jax.Array  # block shape, moment dtype; corrected eigenvalues D, in the eigenbasis


@dataclasses.dataclass(frozen=True)
class EigenvalueCorrected:
  """Distributed Shampoo's eigenvalue-corrected scaling; see :func:`eigenvalue_corrected`."""

  b1: Any
  b2: Any
  eps: Any
  exponent: Any = 0.5
  bias_correction: bool = True
  dtype: Any = None
  momentum_in_eigenbasis: bool = True
  d_weight: Any = None
  b3: Any = None

  def init(self, shape: Sequence[int], mask: Sequence[bool], dtype: Any) -> CorrectedState:
    del mask
    zeros = jnp.zeros(tuple(shape), self.dtype or dtype)
    return CorrectedState(zeros, zeros)

  def _exponent(self, order: int) -> Any:
    if isinstance(self.exponent, Mapping):
      return self.exponent.get(order, 0.5)
    return self.exponent

  def update(
    self,
    grad: jax.Array,
    state: CorrectedState,
    bases: Bases,
    eigenvalues: Any,
    step: jax.Array,
    hold: Any = None,
  ) -> tuple[jax.Array, CorrectedState]:
    """The direction and the new moments; where the traced flag ``hold`` is set the moments
    come back unchanged, whatever ``grad`` holds (the direction is then meaningless)."""
    del eigenvalues
    dtype = _compute_dtype(state.mu.dtype)
    grad = tensor_ops.zeroed(grad.astype(dtype), hold)
    b2, w2 = tensor_ops.held(hold, self.b2, tensor_ops.accumulation_weight(self.b2, self.d_weight))
    projected = tensor_ops.project(grad, bases)
    nu = b2 * state.nu.astype(dtype) + w2 * projected**2
    # In the eigenbasis the EMA folds the projection D needs anyway (the EMA is linear).
    mu, moment = tensor_ops.filtered_gradient(
      state.mu.astype(dtype),
      projected if self.momentum_in_eigenbasis else grad,
      self.b1,
      step,
      hold,
      b3=self.b3,
      bias_correction=self.bias_correction,
    )
    second = nu
    if self.bias_correction and self.d_weight is None:
      second = nu / tensor_ops.ema_correction(self.b2, step.astype(dtype), dtype)
    if not self.momentum_in_eigenbasis:
      moment = tensor_ops.project(moment, bases)
    scale = second ** jnp.asarray(self._exponent(grad.ndim), dtype) + self.eps
    direction = tensor_ops.unproject(moment / scale, bases)
    return direction, CorrectedState(mu.astype(state.mu.dtype), nu.astype(state.nu.dtype))

  def rotate(
    self,
    state: CorrectedState,
    old_bases: Bases,
    new_bases: Bases,
    permutations: Sequence[Any],
    eigenvalues: Any = None,
  ) -> CorrectedState:
    """``D`` is kept as it is (Distributed Shampoo neither rotates nor permutes it when the
    basis changes); ``M`` kept in the eigenbasis is re-expressed in the new one through
    parameter space, so that it stays ``proj(M)``."""
    del permutations, eigenvalues
    if not self.momentum_in_eigenbasis:
      return state
    mu = tensor_ops.project(tensor_ops.unproject(state.mu, old_bases), new_bases)
    return state._replace(mu=mu.astype(state.mu.dtype))


def eigenvalue_corrected(
  b1: Any = 0.9,
  b2: Any = 0.999,
  eps: Any = 1e-12,
  *,
  exponent: Any = 0.5,
  bias_correction: bool = True,
  dtype: Any = None,
  momentum_in_eigenbasis: bool = True,
  d_weight: Any = None,
  b3: Any = None,
) -> EigenvalueCorrected:
  """Distributed Shampoo's eigenvalue-corrected scaling (its SOAP,
  ``EigenvalueCorrectedShampooPreconditionerConfig``).

  .. math::

    D \\leftarrow \\beta_2 D + w\\,\\mathrm{proj}(G)^2,\\quad
    M \\leftarrow \\beta_1 M + (1-\\beta_1) G,\\quad
    U = \\mathrm{unproj}\\Big(\\frac{\\mathrm{proj}(\\hat M)}{\\hat D^{\\,e} + \\epsilon}\\Big)

  with ``w = 1-β₂`` (``1`` where ``β₂ = 1``: a sum), ``M̂ = M/(1-β₁ᵗ)``, ``D̂ = D/(1-β₂ᵗ)``
  under bias correction (``D̂ = D`` for a sum or an explicit ``d_weight``) and ``D`` updated in the
  basis of this step (after a refresh, in the new one). Unlike :func:`adam` (SOAP), ``ε`` is
  added after the bias correction and ``D`` is neither rotated nor permuted at a refresh.
  Distributed Shampoo keeps ``M`` in parameter space and projects it every step; by default it
  is kept here as ``proj(M)`` instead (``momentum_in_eigenbasis``): the EMA is linear, so it
  folds the ``proj(G)`` that ``D`` needs, and it is re-rotated exactly at each refresh, which
  gives the same ``U`` up to rounding with two matrix products per axis fewer on every step.

  Args:
    b1: first-moment EMA weight in ``[0, 1)``.
    b2: EMA weight of ``D`` in ``[0, 1]`` (``1``: a sum, Distributed Shampoo's ``β₂ = 1``).
    eps: ``ε``, added to ``D̂^e``, ``>= 0``.
    exponent: ``e``, a number or ``{order: e}`` (Distributed Shampoo's
      ``inverse_exponent_override`` for this config; orders it does not name take ½).
    bias_correction: divide ``M`` by ``1-β₁ᵗ`` and ``D`` by ``1-β₂ᵗ``.
    dtype: storage dtype of ``M`` and ``D`` (default: the parameter's dtype).
    momentum_in_eigenbasis: keep ``proj(M)`` (default), or ``M`` in parameter space as
      Distributed Shampoo does.
    d_weight: ``w`` instead of ``1 - β₂``, in ``[0, 1]``; ``D`` is then not bias-corrected
      (Distributed Shampoo's ``drop_weighting_factor_on_gsquare=True`` is ``d_weight=1``).
    b3: ``β₃``, a look-ahead for the direction's filtered gradient,
      ``(M_{t-1} + (1-β₃)(G - M_{t-1})) / (1 - β₃β₁^{t-1})`` (Distributed Shampoo's ``beta3``;
      ``None``: ``β₁``, i.e. ``M̂``; see :func:`kl_precond.tensor_ops.filtered_gradient`).

  Returns:
    The scaling stage.
  """
  check_beta("b1", b1)
  if b3 is not None:
    check_beta("b3", b3)
  check_beta_or_sum("b2", b2)
  if d_weight is not None:
    check_beta_or_sum("d_weight", d_weight)
  check_nonnegative("eps", eps)
  _check_exponents(exponent, "exponent")
  check_bool("bias_correction", bias_correction)
  check_bool("momentum_in_eigenbasis", momentum_in_eigenbasis)
  check_dtype("dtype", dtype)
  return EigenvalueCorrected(
    b1, b2, eps, exponent, bias_correction, dtype, bool(momentum_in_eigenbasis), d_weight, b3
  )


def resolve_exponent(exponents: Any, axis: int, order: int) -> Any:
  """The exponent ``a_axis`` of a block of the given order.

  ``exponents`` is ``None`` (``1/(2·order)``), one number, a per-axis sequence, or a mapping
  ``{order: number | sequence | {axis: number}}`` (Distributed Shampoo's
  ``inverse_exponent_override``; orders and axes it does not name take ``1/(2·order)``). A
  per-axis sequence of length ``L`` stands for ``{L: sequence}``: it sets the blocks of order
  ``L``, and blocks of other orders take ``1/(2·order)`` (as ``shampoo``'s choice of unfactored
  axes reads it), never an entry meant for another axis.
  """
  default = 1.0 / (2 * order)
  if exponents is None:
    return default
  if isinstance(exponents, Mapping):
    entry = exponents.get(order)
    if entry is None:
      return default
    if isinstance(entry, Mapping):
      return entry.get(axis, default)
    return resolve_exponent(entry, axis, order)
  if isinstance(exponents, (tuple, list)) or getattr(exponents, "ndim", 0) == 1:
    return exponents[axis] if len(exponents) == order else default
  return exponents


def kronecker_eigenvalues(
  b1: Any = 0.9,
  eps: Any = 1e-8,
  *,
  exponents: Any = 0.5,
  eps_placement: str = "outside",
  bias_correction: bool = False,
  dtype: Any = None,
  cache_roots: bool = False,
  momentum_in_eigenbasis: bool = False,
  b3: Any = None,
) -> KroneckerEigenvalues:
  """Scale the momentum by powers of the factors' eigenvalues (KL-Shampoo, Shampoo).

  .. math::

    U = \\mathrm{unproj}\\big(\\mathrm{proj}(\\hat M) \\odot P\\big),\\quad
    P = \\begin{cases}
      \\bigotimes_i (\\lambda_i + \\epsilon)^{-a_i} & \\text{inside} \\\\
      \\big(1 / \\bigotimes_i \\lambda_i^{-a_i} + \\epsilon\\big)^{-1} & \\text{outside}
    \\end{cases}

  where ``M̂ = M/(1-β₁ᵗ)`` under bias correction. With ``eps_placement="outside"`` a zero
  eigenvalue estimate gives zero scaling (the KL reference's convention).

  Args:
    b1: momentum EMA weight in ``[0, 1)``.
    eps: the regulariser, ``>= 0``; where it enters is set by ``eps_placement``.
    exponents: ``a_i``: one number for every axis, a per-axis tuple (for blocks of its
      length's order), ``None`` for ``1/(2k)`` on a block of order ``k``, or a per-order
      mapping (see :func:`resolve_exponent`).
    eps_placement: ``"outside"`` (KL-Shampoo) or ``"inside"`` (Shampoo).
    bias_correction: divide the momentum by ``1 - β₁ᵗ``.
    dtype: storage dtype of ``M`` (default: the parameter's dtype).
    momentum_in_eigenbasis: keep ``M̃ = proj(M)`` instead of ``M`` (``M̃ ← β₁M̃ + (1-β₁)proj(G)``,
      ``U = unproj(M̃ ⊙ P)``, ``M̃`` re-rotated at each refresh): the same direction, two
      products per axis fewer on a step when ``proj(G)`` is shared with the estimator (the
      ``kl`` estimator; KL-Shampoo uses it). Not with ``cache_roots``.
    cache_roots: keep the per-axis roots ``R_i = Q_i diag((λ_i + ε)^(-a_i)) Q_iᵀ`` in the
      state, rebuilt at each refresh, so that a step computes ``U = M̂ ×_i R_i`` (one product
      per axis instead of two). Needs ``eps_placement="inside"`` (a separable scaling) and
      eigenvalues that change only at refreshes (the ``frobenius`` estimator with an
      ``eigh_every`` basis: Shampoo); costs one ``d_i × d_i`` matrix per axis.
    b3: ``β₃``, a look-ahead for the direction's filtered gradient,
      ``(M_{t-1} + (1-β₃)(G - M_{t-1})) / (1 - β₃β₁^{t-1})`` (Distributed Shampoo's ``beta3``;
      ``None``: ``β₁``, i.e. ``M̂``; see :func:`kl_precond.tensor_ops.filtered_gradient`).

  Returns:
    The scaling stage.
  """
  check_beta("b1", b1)
  if b3 is not None:
    check_beta("b3", b3)
  check_nonnegative("eps", eps)
  check_choice("eps_placement", eps_placement, ("inside", "outside"))
  _check_exponents(exponents)
  check_bool("bias_correction", bias_correction)
  check_bool("cache_roots", cache_roots)
  check_bool("momentum_in_eigenbasis", momentum_in_eigenbasis)
  check_dtype("dtype", dtype)
  if cache_roots and momentum_in_eigenbasis:
    raise ValueError(
      "cache_roots and momentum_in_eigenbasis exclude each other: cached roots apply to a "
      "momentum in parameter space."
    )
  if cache_roots and eps_placement != "inside":
    raise ValueError(
      "cache_roots needs eps_placement='inside': with 'outside' the scaling is not a Kronecker "
      "product of per-axis roots."
    )
  return KroneckerEigenvalues(
    b1,
    eps,
    exponents,
    eps_placement,
    bias_correction,
    dtype,
    bool(cache_roots),
    bool(momentum_in_eigenbasis),
    b3,
  )
