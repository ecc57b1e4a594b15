"""Shampoo and AdamW-style Shampoo, as chains of the same stages as SOAP and the KL methods.

| method               | estimator                | basis                         | scaling                          |
| -------------------- | ------------------------ | ----------------------------- | -------------------------------- |
| Shampoo              | ``frobenius`` (bias-corr.) | ``eigh_every(T, ridge=ε)``  | ``kronecker_eigenvalues(inside)`` |
| AdamW-style Shampoo  | same                     | same                          | exponents ``(a, b)``, ``a+b=½``   |
| ``kl_factors=True``  | ``kl_roots`` (bias-corr.) | same, bases kept             | as above                         |
| ``refresh="qr"``     | as above                 | ``qr_algorithm_every`` + estimates | as above                    |
| eigenvalue-corrected | ``frobenius`` (bias-corr.) | ``qr_algorithm_every``, or eigh ascending | ``eigenvalue_corrected`` |

The order within a step follows Distributed Shampoo (facebookresearch/optimizers, the AlgoPerf
winner): fold ``G`` into the factors, refresh the roots on due steps, then precondition the
bias-corrected filtered gradient; the bases are the identity until the first refresh.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import optax

from kl_precond import basis as basis_lib
from kl_precond import estimators, grafting, preconditioner, scaling
from kl_precond._validation import (
  check_axes_per_order,
  check_beta,
  check_beta_or_sum,
  check_bool,
  check_choice,
  check_frequency,
  check_integer,
  check_nonnegative,
)
from kl_precond.alias import _with_decay
from kl_precond.layout import LayoutConfig, check_layout


def _checked_start(
  grafting_type: str | None, graft_b2: Any, graft_eps: Any, frequency: int, start: int | None
) -> int:
  """Validates the grafting and refresh options; the first refresh (``None``: ``T``)."""
  check_choice("grafting_type", grafting_type, (None, "adam", "rmsprop", "adagrad", "sgd"))
  check_frequency("precondition_frequency", frequency)
  check_beta("graft_b2", graft_b2)
  check_nonnegative("graft_eps", graft_eps)
  if start is not None:
    check_integer("start_preconditioning_step", start, 0)
  return int(frequency) if start is None else start


def _check_common(
  b2: Any,
  eps: Any,
  qr_iterations: Any,
  max_precond_dim: Any,
  precondition_1d: Any,
  layout: Any,
  statistics_weight: Any = None,
  **flags: Any,
) -> None:
  """The options of the Shampoo family that not every configuration hands on to a stage."""
  check_beta_or_sum("b2", b2)
  check_nonnegative("eps", eps)
  check_integer("max_precond_dim", max_precond_dim, 1)
  if qr_iterations is not None:
    check_integer("qr_iterations", qr_iterations, 1)
  check_bool("precondition_1d", precondition_1d)
  check_layout("layout", layout)
  if statistics_weight is not None:
    check_beta_or_sum("statistics_weight", statistics_weight)
  for name, flag in flags.items():
    check_bool(name, flag)


def _grafted(
  direction: optax.GradientTransformation,
  grafting_type: str | None,
  b1: Any,
  graft_b2: Any,
  graft_eps: Any,
  dtype: Any,
  layout: LayoutConfig,
  start: int,
  nonfinite: str,
  bias_correction: bool = True,
  b3: Any = None,
) -> optax.GradientTransformation:
  """``direction`` rescaled per block to the grafting optimizer's step norm (none: as is)."""
  if grafting_type is None:
    return direction
  magnitude = grafting.graft_magnitude(
    grafting_type,
    b1,
    graft_b2,
    graft_eps,
    dtype=dtype,
    debias_first_moment=bias_correction,
    b3=b3,
  )
  return grafting.graft(
    direction, magnitude, layout=layout, start_preconditioning_step=start, nonfinite=nonfinite
  )


def _factor_statistics(
  b2: Any,
  eps: Any,
  dtype: Any,
  bias_correction: bool,
  statistics_weight: Any,
  trace_scaling: Any,
  kl_exponents: Any = None,
  kl: bool = False,
) -> estimators.Frobenius:
  """The factor estimator of the Distributed Shampoo variants: Frobenius, or with ``kl`` the
  factors whitened by the other factors' roots (``kl_exponents``), with its accumulation
  options; trace scaling is floored at ``ε``, as there."""
  options = dict(
    bias_correction=bias_correction,
    dtype=dtype,
    weight=statistics_weight,
    trace_scaling=trace_scaling,
    trace_floor=eps,
  )
  if kl:
    return estimators.kl_roots(b2, exponents=kl_exponents, **options)
  return estimators.frobenius(b2, **options)


def _is_zero(value: Any) -> bool:
  return isinstance(value, (int, float)) and value == 0


def _unfactored_axes(exponents: Any) -> tuple[tuple[int, tuple[int, ...]], ...]:
  """Axes whose (concrete) exponent is zero get no factor at all; traced values keep them."""
  per_order: dict[int, Any] = {}
  if isinstance(exponents, Mapping):
    per_order = dict(exponents)
  elif isinstance(exponents, (tuple, list)):
    per_order = {len(exponents): exponents}
  result = []
  for order, entry in sorted(per_order.items()):
    items = entry.items() if isinstance(entry, Mapping) else enumerate(entry)
    if isinstance(entry, (int, float)):
      items = enumerate([entry] * order)
    zeros = tuple(axis for axis, value in items if isinstance(value, (int, float)) and value == 0)
    if zeros:
      result.append((order, zeros))
  return tuple(result)


def scale_by_shampoo(
  b1: Any = 0.9,
  b2: Any = 0.999,
  eps: Any = 1e-12,
  *,
  exponents: Any = None,
  precondition_frequency: int = 10,
  stagger_refresh: bool = False,
  start_preconditioning_step: int | None = None,
  grafting_type: str | None = "adam",
  graft_b2: Any = 0.999,
  graft_eps: Any = 1e-8,
  eps_mode: str = "ridge",
  max_precond_dim: int = 1024,
  precondition_1d: bool = True,
  layout: LayoutConfig | None = None,
  dtype: Any = None,
  nonfinite: str = "skip",
  cache_roots: bool = True,
  store_bases: bool = False,
  kl_factors: bool = False,
  refresh: str = "eigh",
  qr_iterations: int | None = None,
  tolerance: Any = 0.0,
  bias_correction: bool = True,
  statistics_weight: Any = None,
  trace_scaling: Any = None,
  b3: Any = None,
) -> optax.GradientTransformation:
  """Shampoo with inverse roots from eigh and optional grafting (Gupta et al. 2018; Shi et al.).

  .. math::

    L &\\leftarrow \\beta_2 L + w\\, G G^\\top,\\quad
    R \\leftarrow \\beta_2 R + w\\, G^\\top G,\\quad
    \\hat L = L / (1-\\beta_2^t),\\quad w = 1-\\beta_2 \\\\
    D &= (\\hat L + \\epsilon I)^{-a}\\, \\bar G\\, (\\hat R + \\epsilon I)^{-b},\\qquad
    \\bar G = \\frac{M}{1-\\beta_1^t},\\ M \\leftarrow \\beta_1 M + (1-\\beta_1) G

  The roots (an eigh of each factor) are recomputed at ``start_preconditioning_step`` and every
  ``T`` steps after it; before the first one they are the identity. If an eigenvalue of
  ``L̂ + εI`` is below ``ε`` all are shifted up so that the smallest is ``ε``. With grafting,
  ``D`` is rescaled per block to the norm of the grafting optimizer's step, which is used alone
  before ``start_preconditioning_step``.

  Args:
    b1: EMA weight of the filtered gradient ``M``.
    b2: EMA weight of the factors, in ``[0, 1]`` (``1``: a sum, as the original Shampoo and
      Distributed Shampoo's default ``betas=(0.9, 1.0)``).
    eps: ``ε``: the ridge added inside the root, and the eigenvalue floor.
    exponents: ``a, b, …``: ``None`` for ``1/(2k)`` on an order-``k`` block, a number, a
      per-axis tuple (for the blocks of its length's order; others take ``1/(2k)``), or
      ``{order: {axis: exponent}}`` (Distributed Shampoo's ``inverse_exponent_override``). A
      concrete ``0`` gives that axis no factor at all.
    precondition_frequency: ``T``, steps between root recomputations (static).
    stagger_refresh: refresh about ``1/T`` of the blocks at each step, each block once every
      ``T`` steps at its own phase, instead of every block at once every ``T`` steps (see
      :func:`kl_precond.preconditioner.refresh_schedule`); the references do the latter.
    start_preconditioning_step: first step with roots (``None``: ``T``) (static).
    grafting_type: ``"adam"``, ``"rmsprop"``, ``"adagrad"``, ``"sgd"`` or ``None``.
    graft_b2: second-moment EMA weight of the grafting optimizer.
    graft_eps: epsilon of the grafting optimizer.
    eps_mode: ``"ridge"`` (``L̂ + εI``) or ``"relative"`` (``L̂ + ε λ_max(L̂) I``).
    max_precond_dim: axes longer than this are split into blocks of this size (static).
    precondition_1d: give vectors a full factor (Distributed Shampoo); otherwise they take
      Adam (``b1``, ``graft_b2``, ``graft_eps``).
    layout: a full :class:`LayoutConfig` instead of the default (blocking on).
    dtype: storage dtype of all state; eigh runs in float32 or higher.
    nonfinite: ``"skip"`` or ``"propagate"`` calls with NaN/Inf gradients.
    cache_roots: keep the roots ``Q diag((λ+ε)^(-a)) Qᵀ`` from each refresh, so that a step is
      one product per side (faster; the roots take the place of the bases in the state unless
      ``store_bases``). ``False``: store the bases; project, scale and unproject every step.
    store_bases: also keep the eigenbases between refreshes. ``False`` (default, with
      ``cache_roots``): the state holds the roots instead (an eigendecomposition needs no
      previous basis: ``eigh_every(keep_bases=False)``), one ``d × d`` matrix less per factor.
      ``True`` can step faster at large blocks: keeping a failed block's previous roots makes XLA
      copy them through the refresh conditional (update alone on 4 blocks of 1024²: 155-162 ms
      without the bases, 145-149 ms with them; no difference at 256-blocks on a 3.3 M-parameter
      transformer). ``cache_roots=False`` needs the bases.
    kl_factors: Distributed Shampoo's simplified KL-Shampoo
      (``RootInvKLShampooPreconditionerConfig``): each factor folds the gradient whitened on the
      other axes by their current roots, ``L ← β₂L + (1-β₂) G R̂^(-2b) Gᵀ`` for a matrix
      (:func:`kl_precond.kl_roots`); everything else as above. Stores the bases (the whitening
      uses them). For the KL-Shampoo authors' method, use :func:`kl_precond.kl_shampoo`.
    refresh: ``"eigh"`` (default), or ``"qr"``: the roots from the QR algorithm warm-started
      from the previous bases, ``qr_iterations`` steps per refresh, with the Rayleigh quotients
      ``diag(Qᵀ(L̂+εI)Q)`` as eigenvalues (Distributed Shampoo's
      ``EigendecomposedShampooPreconditionerConfig(amortized_computation_config=
      QREigendecompositionConfig())``). Approximate roots; each refresh costs a QR and two
      products per factor instead of an eigh. Stores the bases.
    qr_iterations: the most QR steps per refresh (``None``: 1) (static).
    tolerance: keep a block's basis (eigh) or stop iterating (QR) where ``Qᵀ(L̂+εI)Q`` is
      diagonal to this relative tolerance (``EigendecompositionConfig.tolerance``); stores the
      bases when nonzero.
    bias_correction: divide the factors by ``1-β₂ᵗ`` (only for an EMA: not with ``β₂ = 1`` or a
      ``statistics_weight``) and ``M`` by ``1-β₁ᵗ``, in the direction and in the grafting
      optimizer's ``Ḡ`` (Distributed Shampoo's ``use_bias_correction``).
    statistics_weight: ``w``, the weight of each new outer product, instead of ``1-β₂``
      (``1`` where ``β₂ = 1``: a sum); given, it turns their bias correction off (Distributed
      Shampoo's ``drop_weighting_factor_on_gsquare=True`` is ``1``).
    trace_scaling: ``e``: each factor handed to the refresh is multiplied by
      ``max(tr L̂, ε)^(-e)`` (Distributed Shampoo's ``use_trace_scaling`` with
      ``trace_scaling_exponent``), a finite ``e >= 0``; ``None``: off.
    b3: ``β₃``: the filtered gradient looks ahead,
      ``Ḡ = (M_{t-1} + (1-β₃)(G - M_{t-1})) / (1 - β₃β₁^{t-1})``, in the direction and the
      grafting (Distributed Shampoo's ``beta3``; ``β₃ = β₁²`` is NAdam-like); ``None``: ``β₁``.

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Gupta, Koren, Singer, "Shampoo: Preconditioned Stochastic Tensor Optimization", 2018;
    Shi et al., "A Distributed Data-Parallel PyTorch Implementation of the Distributed Shampoo
    Optimizer", 2023, https://arxiv.org/abs/2309.06497
  """
  check_choice("eps_mode", eps_mode, ("ridge", "relative"))
  check_choice("refresh", refresh, ("eigh", "qr"))
  _check_common(
    b2,
    eps,
    qr_iterations,
    max_precond_dim,
    precondition_1d,
    layout,
    statistics_weight,
    cache_roots=cache_roots,
    store_bases=store_bases,
    kl_factors=kl_factors,
  )
  check_bool("stagger_refresh", stagger_refresh)
  start = _checked_start(
    grafting_type, graft_b2, graft_eps, precondition_frequency, start_preconditioning_step
  )
  if layout is None:
    layout = LayoutConfig(max_precond_dim, blocking=True, precondition_1d=precondition_1d)
  unfactored = _unfactored_axes(exponents)
  if unfactored:
    layout = dataclasses.replace(layout, unfactored_axes=unfactored)
  if refresh == "qr":
    if eps_mode == "relative":
      raise ValueError("refresh='qr' takes eps_mode='ridge' (a relative ridge needs λ_max).")
    basis = basis_lib.qr_algorithm_every(
      precondition_frequency,
      start=start,
      stagger=stagger_refresh,
      ridge=eps,
      iterations=1 if qr_iterations is None else qr_iterations,
      tolerance=tolerance,
      keep_eigenvalues=True,
      eigenvalue_floor=eps,
      dtype=dtype,
    )
  else:
    basis = basis_lib.eigh_every(
      precondition_frequency,
      start=start,
      stagger=stagger_refresh,
      ridge=eps,
      relative_ridge=eps_mode == "relative",
      eigenvalue_floor=eps,
      keep_bases=store_bases or not cache_roots or kl_factors or not _is_zero(tolerance),
      tolerance=tolerance,
      dtype=dtype,
    )
  direction = preconditioner.scale_by_preconditioner(
    _factor_statistics(
      b2, eps, dtype, bias_correction, statistics_weight, trace_scaling, exponents, kl_factors
    ),
    basis,
    scaling.kronecker_eigenvalues(
      b1,
      0.0,
      exponents=exponents,
      eps_placement="inside",
      bias_correction=bias_correction,
      dtype=dtype,
      cache_roots=cache_roots,
      b3=b3,
    ),
    layout=layout,
    fallback=scaling.adam(
      b1, graft_b2, graft_eps, bias_correction=bias_correction, dtype=dtype, b3=b3
    ),
    first_call="identity",
    statistics_first=True,
    nonfinite=nonfinite,
  )
  return _grafted(
    direction,
    grafting_type,
    b1,
    graft_b2,
    graft_eps,
    dtype,
    layout,
    start,
    nonfinite,
    bias_correction,
    b3,
  )


def scale_by_eigenvalue_corrected_shampoo(
  b1: Any = 0.9,
  b2: Any = 0.999,
  eps: Any = 1e-8,
  *,
  exponent: Any = 0.5,
  precondition_frequency: int = 10,
  stagger_refresh: bool = False,
  start_preconditioning_step: int | None = None,
  refresh: str = "qr",
  qr_iterations: int | None = None,
  tolerance: Any = 0.0,
  unrotated_axes: Mapping[int, Any] | None = None,
  grafting_type: str | None = None,
  graft_b2: Any = 0.999,
  graft_eps: Any = 1e-8,
  max_precond_dim: int = 1024,
  precondition_1d: bool = True,
  layout: LayoutConfig | None = None,
  dtype: Any = None,
  nonfinite: str = "skip",
  bias_correction: bool = True,
  statistics_weight: Any = None,
  trace_scaling: Any = None,
  b3: Any = None,
) -> optax.GradientTransformation:
  """Distributed Shampoo's eigenvalue-corrected Shampoo (its SOAP: ``DefaultSOAPConfig``,
  ``EigenvalueCorrectedShampooPreconditionerConfig``).

  .. math::

    L &\\leftarrow \\beta_2 L + w\\, G G^\\top,\\quad
    Q_L \\leftarrow \\text{refresh}(L / (1-\\beta_2^t) + \\epsilon I)
      \\ \\text{every}\\ T\\ \\text{steps} \\\\
    D &\\leftarrow \\beta_2 D + w\\, (Q_L^\\top G Q_R)^2,\\qquad w = 1-\\beta_2,\\qquad
    U = Q_L \\frac{Q_L^\\top \\hat M Q_R}{\\hat D^{\\,e} + \\epsilon} Q_R^\\top

  in that order within a step (statistics, refresh, then ``D`` and the direction in the new
  basis), with ``M̂``, ``D̂`` bias-corrected. The bases start as the identity (Adam in
  coordinates until ``start_preconditioning_step``); a refresh is one QR-algorithm step from the
  previous basis (``refresh="qr"``, :func:`kl_precond.qr_algorithm_every`) or an eigh
  (``"eigh"``), columns ascending. ``D`` is neither rotated nor permuted when the basis changes.
  For the SOAP authors' algorithm (first basis by eigh, descending sort with ``V`` permuted,
  ``M`` kept in the basis) use :func:`kl_precond.soap`.

  Args:
    b1: EMA weight of the first moment ``M`` (parameter space).
    b2: EMA weight of the factors and of ``D``, in ``[0, 1]`` (``1``: sums).
    eps: ``ε``: the ridge of the refreshes and the term added to ``D̂^e``.
    exponent: ``e`` (½), or ``{order: e}`` (Distributed Shampoo's ``inverse_exponent_override``
      for this config).
    precondition_frequency: ``T``, steps between refreshes (static).
    stagger_refresh: refresh about ``1/T`` of the blocks at each step, each block once every
      ``T`` steps at its own phase, instead of every block at once every ``T`` steps (see
      :func:`kl_precond.preconditioner.refresh_schedule`); the references do the latter.
    start_preconditioning_step: first refresh (``None``: ``T``) (static).
    refresh: ``"qr"`` (QR algorithm, warm-started) or ``"eigh"``.
    qr_iterations: the most QR steps per refresh (``QREigendecompositionConfig.max_iterations``;
      ``None``: 1) (static).
    tolerance: skip (eigh) or stop (QR) where ``Qᵀ(L̂ + εI)Q`` is diagonal to this relative
      tolerance (``EigendecompositionConfig.tolerance``).
    unrotated_axes: ``{order: [axes]}``: axes of blocks of that order that keep the identity
      basis (``ignored_basis_change_dims``). The order is a block's number of axes, so each
      axis must satisfy ``0 <= axis < order`` (``{2: (5,)}`` names no axis of a matrix and
      raises ``ValueError`` at construction).
    grafting_type: ``None``, ``"adam"``, ``"rmsprop"``, ``"adagrad"`` or ``"sgd"``.
    graft_b2: second-moment EMA weight of the grafting optimizer.
    graft_eps: epsilon of the grafting optimizer.
    max_precond_dim: axes longer than this are split into blocks of this size (static).
    precondition_1d: give vectors a factor (Distributed Shampoo); otherwise they keep the
      identity basis (this scaling in coordinates).
    layout: a full :class:`LayoutConfig` instead of the default (blocking on).
    dtype: storage dtype of all state; decompositions run in float32 or higher.
    nonfinite: ``"skip"`` or ``"propagate"`` calls with NaN/Inf gradients.
    bias_correction: divide the factors and ``D`` by ``1-β₂ᵗ`` (only for an EMA: not with ``β₂ = 1`` or a
      ``statistics_weight``) and ``M`` by ``1-β₁ᵗ``, in the direction and in the grafting
      optimizer's ``Ḡ`` (Distributed Shampoo's ``use_bias_correction``).
    statistics_weight: ``w``, the weight of each new outer product and of ``D``, instead of ``1-β₂``
      (``1`` where ``β₂ = 1``: a sum); given, it turns their bias correction off (Distributed
      Shampoo's ``drop_weighting_factor_on_gsquare=True`` is ``1``).
    trace_scaling: ``e``: each factor handed to the refresh is multiplied by
      ``max(tr L̂, ε)^(-e)`` (Distributed Shampoo's ``use_trace_scaling`` with
      ``trace_scaling_exponent``), a finite ``e >= 0``; ``None``: off.
    b3: ``β₃``: the filtered gradient looks ahead,
      ``Ḡ = (M_{t-1} + (1-β₃)(G - M_{t-1})) / (1 - β₃β₁^{t-1})``, in the direction and the
      grafting (Distributed Shampoo's ``beta3``; ``β₃ = β₁²`` is NAdam-like); ``None``: ``β₁``.

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam", 2024,
    https://arxiv.org/abs/2409.11321; George et al., "Fast Approximate Natural Gradient Descent
    in a Kronecker-factored Eigenbasis", 2018; facebookresearch/optimizers
    (``EigenvalueCorrectedShampooPreconditionerList``).
  """
  check_choice("refresh", refresh, ("qr", "eigh"))
  _check_common(b2, eps, qr_iterations, max_precond_dim, precondition_1d, layout, statistics_weight)
  if unrotated_axes is not None:
    check_axes_per_order("unrotated_axes", unrotated_axes)
  check_bool("stagger_refresh", stagger_refresh)
  start = _checked_start(
    grafting_type, graft_b2, graft_eps, precondition_frequency, start_preconditioning_step
  )
  if layout is None:
    layout = LayoutConfig(max_precond_dim, blocking=True, precondition_1d=precondition_1d)
  if unrotated_axes:
    unrotated = tuple((int(o), tuple(int(a) for a in axes)) for o, axes in unrotated_axes.items())
    layout = dataclasses.replace(layout, unfactored_axes=unrotated)
  if refresh == "qr":
    basis = basis_lib.qr_algorithm_every(
      precondition_frequency,
      start=start,
      stagger=stagger_refresh,
      ridge=eps,
      iterations=1 if qr_iterations is None else qr_iterations,
      tolerance=tolerance,
      dtype=dtype,
    )
  else:
    basis = basis_lib.eigh_every(
      precondition_frequency,
      start=start,
      stagger=stagger_refresh,
      ridge=eps,
      keep_eigenvalues=False,
      ascending=True,
      tolerance=tolerance,
      dtype=dtype,
    )
  direction = preconditioner.scale_by_preconditioner(
    _factor_statistics(b2, eps, dtype, bias_correction, statistics_weight, trace_scaling),
    basis,
    scaling.eigenvalue_corrected(
      b1,
      b2,
      eps,
      exponent=exponent,
      bias_correction=bias_correction,
      dtype=dtype,
      d_weight=statistics_weight,
      b3=b3,
    ),
    layout=layout,
    first_call="identity",
    statistics_first=True,
    nonfinite=nonfinite,
  )
  return _grafted(
    direction,
    grafting_type,
    b1,
    graft_b2,
    graft_eps,
    dtype,
    layout,
    start,
    nonfinite,
    bias_correction,
    b3,
  )


def eigenvalue_corrected_shampoo(
  learning_rate: optax.ScalarOrSchedule = 1e-3,
  b1: Any = 0.9,
  b2: Any = 0.999,
  eps: Any = 1e-8,
  weight_decay: Any = 0.0,
  *,
  mask: Any = None,
  exponent: Any = 0.5,
  precondition_frequency: int = 10,
  stagger_refresh: bool = False,
  start_preconditioning_step: int | None = None,
  refresh: str = "qr",
  qr_iterations: int | None = None,
  tolerance: Any = 0.0,
  unrotated_axes: Mapping[int, Any] | None = None,
  grafting_type: str | None = None,
  graft_b2: Any = 0.999,
  graft_eps: Any = 1e-8,
  max_precond_dim: int = 1024,
  precondition_1d: bool = True,
  layout: LayoutConfig | None = None,
  dtype: Any = None,
  nonfinite: str = "skip",
  bias_correction: bool = True,
  statistics_weight: Any = None,
  trace_scaling: Any = None,
  b3: Any = None,
) -> optax.GradientTransformation:
  """Distributed Shampoo's eigenvalue-corrected Shampoo with decoupled weight decay:
  ``W ← W - η(P + λW)``, ``P`` from :func:`scale_by_eigenvalue_corrected_shampoo` (after
  grafting, as in Distributed Shampoo).

  Args:
    learning_rate: ``η``, a finite number ``>= 0`` or an optax schedule.
    weight_decay: ``λ``, a finite number ``>= 0`` or an optax schedule.
    mask: which parameters are decayed.
    **others: as in :func:`scale_by_eigenvalue_corrected_shampoo`.
  """
  direction = scale_by_eigenvalue_corrected_shampoo(
    b1,
    b2,
    eps,
    exponent=exponent,
    precondition_frequency=precondition_frequency,
    stagger_refresh=stagger_refresh,
    start_preconditioning_step=start_preconditioning_step,
    refresh=refresh,
    qr_iterations=qr_iterations,
    tolerance=tolerance,
    unrotated_axes=unrotated_axes,
    grafting_type=grafting_type,
    graft_b2=graft_b2,
    graft_eps=graft_eps,
    max_precond_dim=max_precond_dim,
    precondition_1d=precondition_1d,
    layout=layout,
    dtype=dtype,
    nonfinite=nonfinite,
    bias_correction=bias_correction,
    statistics_weight=statistics_weight,
    trace_scaling=trace_scaling,
    b3=b3,
  )
  return _with_decay(direction, learning_rate, weight_decay, mask)


def shampoo(
  learning_rate: optax.ScalarOrSchedule = 1e-3,
  b1: Any = 0.9,
  b2: Any = 0.999,
  eps: Any = 1e-12,
  weight_decay: Any = 0.0,
  *,
  mask: Any = None,
  exponents: Any = None,
  precondition_frequency: int = 10,
  stagger_refresh: bool = False,
  start_preconditioning_step: int | None = None,
  grafting_type: str | None = "adam",
  graft_b2: Any = 0.999,
  graft_eps: Any = 1e-8,
  eps_mode: str = "ridge",
  max_precond_dim: int = 1024,
  precondition_1d: bool = True,
  layout: LayoutConfig | None = None,
  dtype: Any = None,
  nonfinite: str = "skip",
  cache_roots: bool = True,
  store_bases: bool = False,
  kl_factors: bool = False,
  refresh: str = "eigh",
  qr_iterations: int | None = None,
  tolerance: Any = 0.0,
  bias_correction: bool = True,
  statistics_weight: Any = None,
  trace_scaling: Any = None,
  b3: Any = None,
) -> optax.GradientTransformation:
  """Shampoo with decoupled weight decay: ``W ← W - η(P + λW)``, ``P`` from
  :func:`scale_by_shampoo` (after grafting, as in Distributed Shampoo).

  Args:
    learning_rate: ``η``, a finite number ``>= 0`` or an optax schedule.
    weight_decay: ``λ``, a finite number ``>= 0`` or an optax schedule.
    mask: which parameters are decayed.
    **others: as in :func:`scale_by_shampoo`.
  """
  direction = scale_by_shampoo(
    b1,
    b2,
    eps,
    exponents=exponents,
    precondition_frequency=precondition_frequency,
    stagger_refresh=stagger_refresh,
    start_preconditioning_step=start_preconditioning_step,
    grafting_type=grafting_type,
    graft_b2=graft_b2,
    graft_eps=graft_eps,
    eps_mode=eps_mode,
    max_precond_dim=max_precond_dim,
    precondition_1d=precondition_1d,
    layout=layout,
    dtype=dtype,
    nonfinite=nonfinite,
    cache_roots=cache_roots,
    store_bases=store_bases,
    kl_factors=kl_factors,
    refresh=refresh,
    qr_iterations=qr_iterations,
    tolerance=tolerance,
    bias_correction=bias_correction,
    statistics_weight=statistics_weight,
    trace_scaling=trace_scaling,
    b3=b3,
  )
  return _with_decay(direction, learning_rate, weight_decay, mask)


def adamw_shampoo(
  learning_rate: optax.ScalarOrSchedule = 1e-3,
  b1: Any = 0.9,
  b2: Any = 0.999,
  eps: Any = 1e-12,
  weight_decay: Any = 0.01,
  *,
  mask: Any = None,
  exponents: Any = (0.25, 0.25),
  precondition_frequency: int = 10,
  stagger_refresh: bool = False,
  eps_mode: str = "ridge",
  max_precond_dim: int = 1024,
  precondition_1d: bool = False,
  layout: LayoutConfig | None = None,
  dtype: Any = None,
  nonfinite: str = "skip",
  cache_roots: bool = True,
  store_bases: bool = False,
  kl_factors: bool = False,
  refresh: str = "eigh",
  qr_iterations: int | None = None,
  tolerance: Any = 0.0,
) -> optax.GradientTransformation:
  """AdamW-style Shampoo: exponents ``(a, b)`` with ``a + b = 1/2``, decoupled weight decay.

  .. math::

    D = (\\hat L + \\epsilon I)^{-a}\\, \\hat M\\, (\\hat R + \\epsilon I)^{-b},\\qquad
    W \\leftarrow W - \\eta (D + \\lambda W)

  With no accumulation and ``ε → 0``, ``(GGᵀ)^(-a) G (GᵀG)^(-b) = U Σ^(1-2(a+b)) Vᵀ``: the polar
  factor ``U Vᵀ`` whenever ``a + b = 1/2``, however it is split. ``(0.5, 0)`` is one-sided
  Shampoo and allocates no right factor (and ``(0, 0.5)`` no left one). Matrices use
  ``exponents``; other orders ``1/(2k)``. No grafting; roots from the first step on.

  Args:
    learning_rate: ``η``, a finite number ``>= 0`` or an optax schedule.
    b1: EMA weight of the (bias-corrected) first moment ``M``.
    b2: EMA weight of the (bias-corrected) factors.
    eps: the ridge ``ε`` inside the roots.
    weight_decay: ``λ``, a finite number ``>= 0`` or an optax schedule (decoupled, its own
      transform).
    mask: which parameters are decayed.
    exponents: ``(a, b)`` for matrices (a pair, or a length-2 array to inject it); a warning is
      issued when ``a + b ≠ 1/2``.
    precondition_frequency: ``T``, steps between root recomputations (static).
    stagger_refresh: refresh about ``1/T`` of the blocks at each step, each block once every
      ``T`` steps at its own phase, instead of every block at once every ``T`` steps (see
      :func:`kl_precond.preconditioner.refresh_schedule`); the references do the latter.
    eps_mode: ``"ridge"`` or ``"relative"``.
    max_precond_dim: axes longer than this are split into blocks (static).
    precondition_1d: give vectors a full factor (``(L̂ + εI)^(-1/2)``); off by default: with
      stale roots and no grafting, a bias's rank-deficient factor scales new directions by up
      to ``ε^(-1/2)``. Vectors then take Adam (``b1``, ``b2``, ``eps = 1e-8``).
    layout: a full :class:`LayoutConfig`.
    dtype: storage dtype of all state.
    nonfinite: ``"skip"`` or ``"propagate"`` calls with NaN/Inf gradients.
    cache_roots: as in :func:`scale_by_shampoo`.
    store_bases: as in :func:`scale_by_shampoo`.
    kl_factors: as in :func:`scale_by_shampoo`.
    refresh: as in :func:`scale_by_shampoo`.
    qr_iterations: as in :func:`scale_by_shampoo`.
    tolerance: as in :func:`scale_by_shampoo`.

  Returns:
    An ``optax.GradientTransformation``.

  References:
    "Convergence rate of AdamW-style Shampoo: unifying one-sided and two-sided
    preconditioning", 2025.
  """
  if isinstance(exponents, (tuple, list)) and len(exponents) != 2:
    raise ValueError(f"exponents must be a pair (a, b) for matrices, got {exponents!r}.")
  check_frequency("precondition_frequency", precondition_frequency)
  if isinstance(exponents, (tuple, list)) and all(isinstance(e, (int, float)) for e in exponents):
    if abs(sum(exponents) - 0.5) > 1e-12:
      warnings.warn(
        f"adamw_shampoo exponents {exponents} do not sum to 1/2 (the analysed family).",
        stacklevel=2,
      )
  # Matrices use ``exponents``; other orders keep 1/(2k). An array (e.g. injected by
  # ``optax.inject_hyperparams``) is traced: its zeros scale by 1 instead of dropping a factor.
  per_order = exponents if isinstance(exponents, Mapping) else {2: exponents}
  direction = scale_by_shampoo(
    b1,
    b2,
    eps,
    exponents=per_order,
    precondition_frequency=precondition_frequency,
    stagger_refresh=stagger_refresh,
    start_preconditioning_step=1,
    grafting_type=None,
    eps_mode=eps_mode,
    max_precond_dim=max_precond_dim,
    precondition_1d=precondition_1d,
    layout=layout,
    dtype=dtype,
    nonfinite=nonfinite,
    cache_roots=cache_roots,
    store_bases=store_bases,
    kl_factors=kl_factors,
    refresh=refresh,
    qr_iterations=qr_iterations,
    tolerance=tolerance,
  )
  return _with_decay(direction, learning_rate, weight_decay, mask)
