"""The ``basis`` stage: when and how the Kronecker eigenbases are refreshed.

The first basis of every factor is its eigendecomposition, columns by **descending** eigenvalue.
After that, every ``every`` steps, the basis is refreshed either by a new eigendecomposition
(:func:`eigh_every`) or by one step of subspace (power) iteration followed by QR
(:func:`qr_every`), optionally after sorting the previous basis's columns by the estimated
eigenvalues ``diag(Qᵀ F Q)`` (upstream SOAP):

.. math::

  \\pi = \\mathrm{argsort}_{\\downarrow}\\, \\mathrm{diag}(Q^\\top F Q), \\qquad
  Q \\leftarrow \\mathrm{qr}(F\\, Q_{:, \\pi}).Q .

The permutation ``π`` is returned so that the scaling stage can permute buffers that live in
the eigenbasis and are not rotated (SOAP's second moment). :func:`qr_algorithm_every` is
Distributed Shampoo's variant (its ``DefaultSOAPConfig``): bases start as the identity, a refresh
is a QR-algorithm step ``Q ← Q qr(Qᵀ(F + ρI)Q).Q`` warm-started from them, and the columns are
sorted afterwards, ascending, without telling the scaling stage. Decompositions run in float32 at
least (float64 when the factor is float64) and are cast back. A refresh that yields a
non-finite basis keeps the previous one; the chassis counts such failures. On CPU, factors of
512 and up are decomposed with 8 appended rows (and, for ``eigh``, columns), which LAPACK
handles faster than a power-of-two leading dimension and which change no result beyond
rounding (:func:`_qr_q`, :func:`_eigh`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kl_precond import tensor_ops
from kl_precond._validation import (
  check_at_most,
  check_bool,
  check_dtype,
  check_frequency,
  check_integer,
  check_nonnegative,
)

Matrices = tuple[jax.Array | None, ...]


class BasisState(NamedTuple):
  """State of the basis stage for one block."""

  bases: Matrices  # per axis: (d_i, d_i) orthogonal, or None (identity)
  eigenvalues: tuple[jax.Array | None, ...]  # per axis: (d_i,) kept by eigh refreshes, or None


def _compute_dtype(dtype: Any) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


# LAPACK's QR and eigh on CPU are slower when the matrix's leading dimension is a power of two
# (cache-set conflicts of the column-major storage; QR with scipy and one OpenBLAS thread: 1024²
# 50 ms against 35 ms for 1032×1024, 2048² 333 against 243 ms; jnp.linalg.eigh of 1024² 109
# against 89 ms with 8 rows and columns appended). Appending rows (and, for eigh, a separate
# diagonal block) changes the leading dimension and none of the results: see :func:`_qr_q` and
# :func:`_eigh`. Only on CPU, from n = 512 (smaller matrices gain nothing measurable).
_PAD_FROM = 512
_PAD_ROWS = 8


def _padded_on_cpu(matrix: jax.Array, padded: Any, plain: Any) -> Any:
  """``padded(matrix)`` on CPU for n >= ``_PAD_FROM``, else ``plain(matrix)``."""
  if matrix.shape[-1] < _PAD_FROM:
    return plain(matrix)
  return jax.lax.platform_dependent(matrix, cpu=padded, default=plain)


def _qr_q(matrix: jax.Array) -> jax.Array:
  """``qr(matrix).Q`` of square matrices ``(..., n, n)``; on CPU with n >= 512 computed as the
  first n rows of the Q of ``[matrix; 0]`` (8 zero rows), which LAPACK factors faster."""
  n = matrix.shape[-1]

  def plain(m: jax.Array) -> jax.Array:
    return jnp.linalg.qr(m)[0]

  def padded(m: jax.Array) -> jax.Array:
    zeros = jnp.zeros((*m.shape[:-2], _PAD_ROWS, n), m.dtype)
    return jnp.linalg.qr(jnp.concatenate([m, zeros], axis=-2))[0][..., :n, :]

  return _padded_on_cpu(matrix, padded, plain)


def _eigh(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``eigh`` of a symmetric ``(n, n)`` matrix, ascending; on CPU with n >= 512 computed on
  ``diag(matrix, c I)`` (8 extra rows and columns, the same leading-dimension effect as
  :func:`_qr_q`) with ``c`` below every eigenvalue (Gershgorin), whose eigenpairs come first and
  are dropped. The coupling blocks are exactly zero, so the tridiagonal reduction never mixes the
  two blocks."""
  n = matrix.shape[-1]

  def plain(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    values, vectors = jnp.linalg.eigh(m, symmetrize_input=True)
    return values, vectors

  def padded(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    p = _PAD_ROWS
    sym = (m + m.T) / 2  # what symmetrize_input=True does, before the padding
    bound = jnp.max(jnp.sum(jnp.abs(sym), axis=-1))  # Gershgorin: no eigenvalue below -bound
    below = -1.0 - 2.0 * bound
    # Entries near the dtype's range overflow the bound; LAPACK rescales a matrix whose norm is
    # out of range, so the most negative finite value still sorts first.
    below = jnp.where(jnp.isfinite(below), below, -jnp.finfo(m.dtype).max)
    big = jnp.zeros((n + p, n + p), m.dtype).at[:n, :n].set(sym)
    big = big.at[n:, n:].set(below * jnp.eye(p, dtype=m.dtype))
    values, vectors = jnp.linalg.eigh(big, symmetrize_input=False)
    return values[p:], vectors[:n, p:]

  return _padded_on_cpu(matrix, padded, plain)


def _eigh_descending(factor: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eigenvalues and eigenvectors of a symmetric factor, by descending eigenvalue."""
  matrix = factor.astype(_compute_dtype(factor.dtype))
  values, vectors = _eigh(matrix)
  return values[::-1], vectors[:, ::-1]


@dataclasses.dataclass(frozen=True)
class Refresh:
  """Basis refresh policy; see :func:`eigh_every` and :func:`qr_every`."""

  every: int
  method: str = "qr"
  sort: bool = True
  keep_eigenvalues: bool = False
  eigenvalue_floor: Any = None
  dtype: Any = None
  start: int = 0
  ridge: Any = 0.0
  relative_ridge: bool = False
  keep_bases: bool = True
  ascending: bool = False
  iterations: int = 1
  tolerance: Any = 0.0
  stagger: bool = False

  def __post_init__(self) -> None:
    if not self.keep_bases and self.method != "eigh":
      raise ValueError(
        "keep_bases=False needs method='eigh': a QR refresh iterates on the previous basis."
      )
    if not self.keep_bases and not _is_zero(self.tolerance):
      raise ValueError("tolerance > 0 compares with the previous basis: it needs keep_bases=True.")

  def init(self, shape: Sequence[int], mask: Sequence[bool], dtype: Any) -> BasisState:
    dtype = self.dtype or dtype
    bases = tuple(
      (jnp.eye(d, dtype=dtype) if self.keep_bases else _placeholder(dtype)) if m else None
      for d, m in zip(shape, mask, strict=True)
    )
    # Eigenvalues (d numbers per factor) stay float32 at least: a floor such as 1e-12 underflows
    # float16, and their negative powers overflow it.
    values = tuple(
      jnp.ones((d,), _compute_dtype(dtype)) if m and self.keep_eigenvalues else None
      for d, m in zip(shape, mask, strict=True)
    )
    return BasisState(bases, values)

  def _decompose(self, factors: Matrices, state: BasisState) -> BasisState:
    bases: list[jax.Array | None] = []
    values: list[jax.Array | None] = []
    for factor, old_basis, old_values in zip(factors, state.bases, state.eigenvalues, strict=True):
      if factor is None or old_basis is None:
        bases.append(None)
        values.append(None)
        continue
      factor = tensor_ops.after(factor, bases)  # one decomposition at a time (tensor_ops.after)
      if self.relative_ridge:
        eigenvalues, basis = _eigh_descending(factor)
        eigenvalues = eigenvalues + self.ridge * jnp.max(eigenvalues)
      else:
        eigenvalues, basis = _eigh_descending(factor + self.ridge * jnp.eye(factor.shape[0]))
      if self.ascending:
        eigenvalues, basis = eigenvalues[::-1], basis[:, ::-1]
      if not _is_zero(self.tolerance):
        # Distributed Shampoo's adaptive refresh: keep the previous basis (and its Rayleigh
        # quotients) where it already diagonalises the factor to the tolerance.
        ridged = self._ridged(factor)
        previous = old_basis.astype(ridged.dtype)
        estimate = previous.T @ ridged @ previous
        converged = _diagonal_to(estimate, self.tolerance)
        basis = jnp.where(converged, previous, basis)
        eigenvalues = jnp.where(converged, jnp.diagonal(estimate), eigenvalues)
      bases.append(basis.astype(old_basis.dtype))
      values.append(None if old_values is None else self._floor(eigenvalues, old_values.dtype))
    return BasisState(tuple(bases), tuple(values))

  def _ridged(self, factor: jax.Array) -> jax.Array:
    """``F + ρI`` in the decompositions' dtype (``ρ λ_max I`` with ``relative_ridge``)."""
    matrix = factor.astype(_compute_dtype(factor.dtype))
    ridge = self.ridge
    if self.relative_ridge:
      ridge = ridge * jnp.max(jnp.linalg.eigvalsh(matrix))
    return matrix + ridge * jnp.eye(matrix.shape[0], dtype=matrix.dtype)

  def _floor(self, eigenvalues: jax.Array, dtype: Any) -> jax.Array:
    """Distributed Shampoo's shift: if ``λ_min < floor``, ``λ ← λ - λ_min + floor``."""
    if self.eigenvalue_floor is None:
      return eigenvalues.astype(dtype)
    smallest = jnp.min(eigenvalues)
    shifted = jnp.where(
      smallest < self.eigenvalue_floor, eigenvalues - smallest + self.eigenvalue_floor, eigenvalues
    )
    return shifted.astype(dtype)

  def first(self, factors: Matrices, state: BasisState) -> BasisState:
    """The first basis: eigendecomposition, columns by descending eigenvalue."""
    return self._keep_if_failed(self._decompose(factors, state), state)[0]

  def stored(self, state: BasisState) -> BasisState:
    """What the state keeps between refreshes: with ``keep_bases=False``, the bases of a
    decomposition (used by the scaling stage's ``rotate``) are dropped for placeholders."""
    if self.keep_bases:
      return state
    bases = tuple(None if b is None else _placeholder(b.dtype, b.shape[:-2]) for b in state.bases)
    return state._replace(bases=bases)

  def refresh(
    self, factors: Matrices, state: BasisState
  ) -> tuple[BasisState, tuple[Any, ...], Any]:
    """A periodic refresh. Returns the new state, per-axis permutations and a failure flag."""
    if self.method == "eigh":
      new_state, permutations = self._decompose(factors, state), (None,) * len(factors)
    elif self.method == "qr_algorithm":
      new_state, permutations = self._qr_algorithm(factors, state), (None,) * len(factors)
    else:
      new_state, permutations = self._power_qr(factors, state)
    kept, failed = self._keep_if_failed(new_state, state)
    return kept, permutations, failed

  def _power_qr(self, factors: Matrices, state: BasisState) -> tuple[BasisState, tuple[Any, ...]]:
    bases: list[jax.Array | None] = []
    permutations: list[jax.Array | None] = []
    for factor, basis in zip(factors, state.bases, strict=True):
      if factor is None or basis is None:
        bases.append(None)
        permutations.append(None)
        continue
      factor = tensor_ops.after(factor, bases)  # one decomposition at a time (tensor_ops.after)
      dtype = _compute_dtype(factor.dtype)
      matrix, current = factor.astype(dtype), basis.astype(dtype)
      # One product F Q serves both the sort (diag(QᵀFQ) = column sums of Q ⊙ FQ) and the
      # power step (F Q_π = (F Q)_π).
      power = matrix @ current
      order = None
      if self.sort:
        estimates = jnp.sum(current * power, axis=0)
        order = jnp.argsort(-estimates, stable=True)
        power = power[:, order]
      new_basis = _qr_q(power)
      bases.append(new_basis.astype(basis.dtype))
      permutations.append(order)
    return BasisState(tuple(bases), state.eigenvalues), tuple(permutations)

  def _qr_algorithm(self, factors: Matrices, state: BasisState) -> BasisState:
    """Steps of the QR algorithm warm-started from the previous basis (Distributed Shampoo's
    ``QREigendecompositionConfig``): ``B = Qᵀ(F + ρI)Q``; while ``B`` is not diagonal to the
    tolerance, ``Q_B R = qr(B)``, ``B ← R Q_B``, ``Q ← Q Q_B`` (at most ``iterations`` times);
    then the columns sorted by ``diag(B)``, ascending (stable) unless ``ascending=False``.

    Computed as orthogonal iteration: with ``A = F + ρI``, ``AQ = Q B = (Q Q_B) R``, so
    ``Q Q_B = qr(AQ).Q`` (up to column signs, which no scaling sees) and ``diag(B)`` after the
    step is ``diag(Q_newᵀ A Q_new)``. Two products and one (padded) QR per step, instead of
    four products and an unpadded QR; ``B`` itself is formed only for a nonzero tolerance (with
    tolerance 0 the test only passes for an exactly diagonal ``B``, whose step changes signs
    only).
    """
    bases: list[jax.Array | None] = []
    values: list[jax.Array | None] = []
    for factor, basis, old_values in zip(factors, state.bases, state.eigenvalues, strict=True):
      if factor is None or basis is None:
        bases.append(None)
        values.append(None)
        continue
      factor = tensor_ops.after(factor, bases)  # one decomposition at a time (tensor_ops.after)
      ridged = self._ridged(factor)
      current = basis.astype(ridged.dtype)
      power = ridged @ current
      for _ in range(self.iterations):
        stepped = _qr_q(power)
        stepped_power = ridged @ stepped
        if _is_zero(self.tolerance):
          current, power = stepped, stepped_power
        else:
          converged = _diagonal_to(current.T @ power, self.tolerance)
          current = jnp.where(converged, current, stepped)
          power = jnp.where(converged, power, stepped_power)
      estimates = jnp.sum(current * power, axis=0)  # diag(QᵀAQ)
      order = jnp.argsort(estimates if self.ascending else -estimates, stable=True)
      bases.append(current[:, order].astype(basis.dtype))
      values.append(None if old_values is None else self._floor(estimates[order], old_values.dtype))
    return BasisState(tuple(bases), tuple(values))

  def _keep_if_failed(self, new: BasisState, old: BasisState) -> tuple[BasisState, jax.Array]:
    """The previous state where the new one is not finite. Without stored bases only the
    eigenvalues can be restored; the chassis then keeps the scaling's previous state."""
    ok = tensor_ops.all_finite(new)
    if self.keep_bases:
      return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old), jnp.logical_not(ok)
    values = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new.eigenvalues, old.eigenvalues)
    return new._replace(eigenvalues=values), jnp.logical_not(ok)


def _is_zero(value: Any) -> bool:
  """A concrete zero (a traced value is taken as nonzero)."""
  return isinstance(value, (int, float)) and value == 0


def _diagonal_to(estimate: jax.Array, tolerance: Any) -> jax.Array:
  """``‖B - diag(B)‖_F <= tolerance · ‖B‖_F`` (computed as Distributed Shampoo does)."""
  norm = jnp.linalg.norm(estimate)
  diagonal = jnp.linalg.norm(jnp.diagonal(estimate))
  # A negative difference (rounding) gives NaN, which compares False: not converged, as there.
  return jnp.sqrt(norm**2 - diagonal**2) <= tolerance * norm


def _placeholder(dtype: Any, batch: tuple[int, ...] = ()) -> jax.Array:
  """Stands for a basis that is not stored (``keep_bases=False``): one zero per block, not an
  empty array (checkpointers such as orbax refuse to save arrays of size zero)."""
  return jnp.zeros((*batch, 1), dtype)


def qr_every(
  every: int, *, sort: bool = True, start: int = 0, dtype: Any = None, stagger: bool = False
) -> Refresh:
  """Refresh by one power-iteration step and QR every ``every`` steps (SOAP, KL methods).

  .. math:: Q \\leftarrow \\mathrm{qr}(F Q_{:,\\pi}).Q,
     \\quad \\pi = \\mathrm{argsort}_{\\downarrow}\\,\\mathrm{diag}(Q^\\top F Q)\\ \\text{if sort}

  Args:
    every: refresh period ``T >= 1`` (static).
    sort: sort the columns before the power step and return the permutation (upstream SOAP);
      ``False`` is the KL-Methods behaviour.
    start: also refresh at step ``start``, and only after it (0: from the first step).
    dtype: storage dtype of the bases (default: the parameter's dtype).
    stagger: refresh about ``1/T`` of a bucket's blocks at each step, each block once every
      ``T`` steps at its own phase (all of them at ``start``); see
      :func:`kl_precond.preconditioner.refresh_schedule`. False: every block at once.

  Returns:
    The basis stage.
  """
  check_frequency("every", every)
  _check_start(start)
  check_bool("sort", sort)
  check_dtype("dtype", dtype)
  check_bool("stagger", stagger)
  return Refresh(every, "qr", sort, dtype=dtype, start=start, stagger=stagger)


def _check_start(start: int) -> None:
  check_integer("start", start, 0)


def eigh_every(
  every: int,
  *,
  start: int = 0,
  ridge: Any = 0.0,
  relative_ridge: bool = False,
  eigenvalue_floor: Any = None,
  keep_eigenvalues: bool = True,
  keep_bases: bool = True,
  ascending: bool = False,
  tolerance: Any = 0.0,
  dtype: Any = None,
  stagger: bool = False,
) -> Refresh:
  """Refresh by a full eigendecomposition every ``every`` steps (Shampoo).

  .. math:: Q\\,\\mathrm{diag}(\\lambda)\\,Q^\\top = F + \\rho I, \\qquad
     \\lambda \\leftarrow \\lambda - \\lambda_{\\min} + \\epsilon_f \\ \\text{if}\\ \\lambda_{\\min} < \\epsilon_f

  Args:
    every: refresh period ``T >= 1`` (static).
    start: also refresh at step ``start``, and only after it (Distributed Shampoo's
      ``start_preconditioning_step``; 0: from the first step).
    ridge: ``ρ``, added to the factor's diagonal before the decomposition (``ε`` inside the
      root, Distributed Shampoo).
    relative_ridge: add ``ρ · λ_max(F)`` instead of ``ρ`` (google-research/precondition's
      ``relative_matrix_epsilon``).
    keep_eigenvalues: store the eigenvalues, for scalings that use them (Shampoo's roots).
    keep_bases: store the bases between refreshes. ``False`` (Shampoo with cached roots): an
      eigendecomposition needs no previous basis, so the bases live only inside the refresh,
      where the scaling stage builds what it keeps from them; the state holds a one-element
      placeholder per factor. Needs a scaling that caches its roots
      (``kronecker_eigenvalues(cache_roots=True)``); a failed refresh then keeps the
      scaling's previous roots.
    eigenvalue_floor: if the smallest eigenvalue is below this, shift all of them so that it
      equals the floor (Distributed Shampoo's ``λ - λ_min + ε``); ``None`` for no shift.
    ascending: columns by ascending eigenvalue (Distributed Shampoo's eigenvalue-corrected
      preconditioner, whose second moment is tied to the column order); default descending.
    tolerance: keep a block's previous basis, with the diagonal of ``B = Qᵀ(F + ρI)Q`` as
      eigenvalues, where ``‖B - diag B‖_F <= tolerance · ‖B‖_F`` (Distributed Shampoo's
      ``EighEigendecompositionConfig(tolerance)``); 0: never. The same numbers as skipping the
      decomposition, but not its savings: the eigh still runs (a select, not a branch, as
      everything batched over blocks here).
    dtype: storage dtype of bases and eigenvalues (default: the parameter's dtype).
    stagger: refresh about ``1/T`` of a bucket's blocks at each step, each block once every
      ``T`` steps at its own phase (all of them at ``start``); see
      :func:`kl_precond.preconditioner.refresh_schedule`. False: every block at once.

  Returns:
    The basis stage.
  """
  check_frequency("every", every)
  _check_start(start)
  check_nonnegative("ridge", ridge)
  _check_tolerance(tolerance)
  if eigenvalue_floor is not None:
    check_nonnegative("eigenvalue_floor", eigenvalue_floor)
  for name, flag in (
    ("relative_ridge", relative_ridge),
    ("keep_eigenvalues", keep_eigenvalues),
    ("keep_bases", keep_bases),
    ("ascending", ascending),
  ):
    check_bool(name, flag)
  check_dtype("dtype", dtype)
  check_bool("stagger", stagger)
  return Refresh(
    every,
    "eigh",
    False,
    keep_eigenvalues,
    eigenvalue_floor,
    dtype,
    start,
    ridge,
    relative_ridge,
    keep_bases,
    bool(ascending),
    1,
    tolerance,
    stagger=stagger,
  )


def _check_tolerance(tolerance: Any) -> None:
  check_nonnegative("tolerance", tolerance)
  check_at_most("tolerance", tolerance, 1.0)


def qr_algorithm_every(
  every: int,
  *,
  start: int = 0,
  ridge: Any = 0.0,
  iterations: int = 1,
  tolerance: Any = 0.0,
  ascending: bool = True,
  keep_eigenvalues: bool = False,
  eigenvalue_floor: Any = None,
  dtype: Any = None,
  stagger: bool = False,
) -> Refresh:
  """Refresh by steps of the QR algorithm warm-started from the previous basis, every ``every``
  steps (Distributed Shampoo's ``QREigendecompositionConfig``, its ``DefaultSOAPConfig``).

  .. math::

    B = Q^\\top (F + \\rho I)\\, Q,\\qquad Q_B R = \\mathrm{qr}(B),\\quad
    B \\leftarrow R\\, Q_B,\\quad Q \\leftarrow Q\\, Q_B

  repeated at most ``iterations`` times while ``‖B - diag B‖_F > tolerance · ‖B‖_F``, then the
  columns sorted by ``diag(B)``. One step is one step of orthogonal (subspace) iteration,
  ``Q Q_B = qr((F + ρI) Q).Q`` up to signs, as :func:`qr_every`; the sort comes after it and is
  not handed to the scaling stage (Distributed Shampoo does not permute its second moment).
  The bases start as the identity, so the first refresh is one step from the identity, not an
  eigendecomposition.

  Args:
    every: refresh period ``T >= 1`` (static).
    start: also refresh at step ``start``, and only after it (0: from the first step).
    ridge: ``ρ`` added to the factor's diagonal (Distributed Shampoo's ``ε``).
    iterations: the most QR steps per refresh, ``>= 1`` (static).
    tolerance: stop when the estimate is diagonal to this relative tolerance (0: run them all
      unless ``B`` is exactly diagonal), in ``[0, 1]``.
    ascending: sort the columns by ascending estimate (Distributed Shampoo); else descending.
    keep_eigenvalues: store ``diag(B)`` (of the ridged factor) as the eigenvalues, for scalings
      that use them (Distributed Shampoo's ``EigendecomposedShampooPreconditionerConfig`` with
      ``QREigendecompositionConfig``: Shampoo's roots from the estimates).
    eigenvalue_floor: as in :func:`eigh_every`, on the stored estimates.
    dtype: storage dtype of the bases (default: the parameter's dtype).
    stagger: refresh about ``1/T`` of a bucket's blocks at each step, each block once every
      ``T`` steps at its own phase (all of them at ``start``); see
      :func:`kl_precond.preconditioner.refresh_schedule`. False: every block at once.

  Returns:
    The basis stage.
  """
  check_frequency("every", every)
  _check_start(start)
  check_nonnegative("ridge", ridge)
  _check_tolerance(tolerance)
  check_integer("iterations", iterations, 1)
  if eigenvalue_floor is not None:
    check_nonnegative("eigenvalue_floor", eigenvalue_floor)
  check_bool("ascending", ascending)
  check_bool("keep_eigenvalues", keep_eigenvalues)
  check_dtype("dtype", dtype)
  check_bool("stagger", stagger)
  return Refresh(
    every,
    "qr_algorithm",
    False,
    keep_eigenvalues=bool(keep_eigenvalues),
    eigenvalue_floor=eigenvalue_floor,
    dtype=dtype,
    start=start,
    ridge=ridge,
    ascending=bool(ascending),
    iterations=int(iterations),
    tolerance=tolerance,
    stagger=stagger,
  )
