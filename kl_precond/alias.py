"""The named optimizers: each a short chain of the stages in :mod:`kl_precond.preconditioner`.

| method     | estimator     | basis                       | scaling                                             |
| ---------- | ------------- | --------------------------- | --------------------------------------------------- |
| SOAP       | ``frobenius`` | ``qr_every(T, sort=True)``  | ``adam(bias_correction=True)``                      |
| KL-SOAP    | ``kl``        | ``qr_every(T, sort=False)`` | ``adam(bias_correction=False)``                     |
| KL-Shampoo | ``kl``        | ``qr_every(T, sort=False)`` | ``kronecker_eigenvalues(1/2, outside, M in basis)`` |

Every ``X(learning_rate, ...)`` is ``optax.chain(scale_by_X(...),
optax.add_decayed_weights(weight_decay, mask), optax.scale_by_learning_rate(learning_rate))``:
decoupled weight decay ``W ← W - η(U + λW)`` as in ``optax.adamw``. (The authors' code applies
``W ← (1 - ηλ)(W - ηU)`` and skips the decay on its first, update-free call; the parity tool
replays that order around ``scale_by_X``.)
"""

from __future__ import annotations

from typing import Any

import optax

from kl_precond import basis as basis_lib
from kl_precond import estimators, preconditioner, scaling
from kl_precond._validation import (
  check_beta,
  check_bool,
  check_frequency,
  check_nonnegative_or_schedule,
)
from kl_precond.layout import LayoutConfig, check_layout


def _layout(
  layout: LayoutConfig | None, max_precond_dim: int, merge_small_dims: bool, precondition_1d: bool
) -> LayoutConfig:
  """The layout from the common keyword arguments, or the explicit ``layout`` if given."""
  check_layout("layout", layout)
  if layout is None:
    return LayoutConfig(max_precond_dim, merge_small_dims, precondition_1d)
  if (max_precond_dim, merge_small_dims, precondition_1d) != (10000, False, False):
    raise ValueError(
      "Give either `layout` or max_precond_dim/merge_small_dims/precondition_1d, not both; got "
      f"layout={layout} and max_precond_dim={max_precond_dim}, "
      f"merge_small_dims={merge_small_dims}, precondition_1d={precondition_1d}."
    )
  return layout


def _check_direction(b2: Any, precondition_frequency: Any, sort_basis: Any) -> None:
  """The options the SOAP and KL methods rename or share before handing them to a stage."""
  check_beta("b2", b2)
  check_frequency("precondition_frequency", precondition_frequency)
  check_bool("sort_basis", sort_basis)


def _factor_beta(shampoo_beta: Any, b2: Any) -> Any:
  if shampoo_beta is None:
    return b2
  check_beta("shampoo_beta", shampoo_beta)
  return shampoo_beta


def _with_decay(
  transform: optax.GradientTransformation,
  learning_rate: optax.ScalarOrSchedule,
  weight_decay: Any,
  mask: Any,
) -> optax.GradientTransformation:
  check_nonnegative_or_schedule("learning_rate", learning_rate)
  check_nonnegative_or_schedule("weight_decay", weight_decay)
  return optax.chain(
    transform,
    optax.add_decayed_weights(weight_decay, mask),
    optax.scale_by_learning_rate(learning_rate),
  )


def scale_by_soap(
  b1: Any = 0.95,
  b2: Any = 0.95,
  eps: Any = 1e-8,
  *,
  shampoo_beta: Any = None,
  precondition_frequency: int = 10,
  stagger_refresh: bool = False,
  max_precond_dim: int = 10000,
  merge_small_dims: bool = False,
  precondition_1d: bool = False,
  bias_correction: bool = True,
  sort_basis: bool = True,
  normalize_grads: bool = False,
  layout: LayoutConfig | None = None,
  dtype: Any = None,
  nonfinite: str = "skip",
) -> optax.GradientTransformation:
  """SOAP: Adam in the eigenbasis of Shampoo's Frobenius factors (Vyas et al., 2024).

  .. math::

    L &\\leftarrow \\beta L + (1-\\beta) G G^\\top,\\quad
    R \\leftarrow \\beta R + (1-\\beta) G^\\top G \\\\
    \\tilde G &= Q_L^\\top G Q_R,\\quad M \\leftarrow \\beta_1 M + (1-\\beta_1)\\tilde G,\\quad
    V \\leftarrow \\beta_2 V + (1-\\beta_2)\\tilde G^2 \\\\
    U &= \\frac{\\sqrt{1-\\beta_2^t}}{1-\\beta_1^t}\\, Q_L \\frac{M}{\\sqrt V + \\epsilon} Q_R^\\top

  The direction uses the current bases; then ``G`` is folded into ``L, R``; every ``T`` steps
  the bases are refreshed by sorting their columns by ``diag(QᵀFQ)`` (permuting ``V`` to match)
  and one power step ``Q ← qr(F Q)``, and ``M`` is re-rotated. The first call only builds
  ``L, R`` and the first bases (eigh) and returns a zero update.

  Args:
    b1: first-moment EMA weight.
    b2: second-moment EMA weight; also the factor EMA weight when ``shampoo_beta`` is None.
    eps: added to ``√V`` after the square root.
    shampoo_beta: factor EMA weight ``β`` (``None``: ``b2``).
    precondition_frequency: ``T``, steps between basis refreshes (static).
    stagger_refresh: refresh about ``1/T`` of the blocks at each step, each block once every
      ``T`` steps at its own phase, instead of every block at once every ``T`` steps (see
      :func:`kl_precond.preconditioner.refresh_schedule`); the references do the latter.
    max_precond_dim: axes longer than this get no factor (identity basis) (static).
    merge_small_dims: merge neighbouring axes while their product is ``<= max_precond_dim``.
    precondition_1d: give 1-D tensors a factor instead of plain Adam.
    bias_correction: the ``√(1-β₂ᵗ)/(1-β₁ᵗ)`` step-size factor.
    sort_basis: upstream SOAP's sort before the power step (``False``: the KL-Methods copy).
    normalize_grads: divide each tensor's update by its RMS.
    layout: a full :class:`LayoutConfig` (blocking, squeeze, channels-last) instead of the three
      layout arguments above.
    dtype: storage dtype of moments, factors and bases (default: the parameter's dtype);
      decompositions always run in float32 or higher.
    nonfinite: ``"skip"`` a call whose gradient has NaN/Inf (zero update, state kept, counted in
      ``skipped``) or ``"propagate"`` it.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp, optax, kl_precond as kp
    >>> tx = kp.scale_by_soap(precondition_frequency=2)
    >>> params = {"w": jnp.ones((3, 2))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones((3, 2))}, state)

  References:
    Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam", 2024,
    https://arxiv.org/abs/2409.11321
  """
  _check_direction(b2, precondition_frequency, sort_basis)
  check_bool("stagger_refresh", stagger_refresh)
  return preconditioner.scale_by_preconditioner(
    estimators.frobenius(_factor_beta(shampoo_beta, b2), dtype=dtype),
    basis_lib.qr_every(
      precondition_frequency, sort=sort_basis, dtype=dtype, stagger=stagger_refresh
    ),
    scaling.adam(b1, b2, eps, bias_correction=bias_correction, dtype=dtype),
    layout=_layout(layout, max_precond_dim, merge_small_dims, precondition_1d),
    normalize_grads=normalize_grads,
    nonfinite=nonfinite,
  )


def soap(
  learning_rate: optax.ScalarOrSchedule = 3e-3,
  b1: Any = 0.95,
  b2: Any = 0.95,
  eps: Any = 1e-8,
  weight_decay: Any = 0.01,
  *,
  mask: Any = None,
  shampoo_beta: Any = None,
  precondition_frequency: int = 10,
  stagger_refresh: bool = False,
  max_precond_dim: int = 10000,
  merge_small_dims: bool = False,
  precondition_1d: bool = False,
  bias_correction: bool = True,
  sort_basis: bool = True,
  normalize_grads: bool = False,
  layout: LayoutConfig | None = None,
  dtype: Any = None,
  nonfinite: str = "skip",
) -> optax.GradientTransformation:
  """SOAP with decoupled weight decay: ``W ← W - η(U + λW)``, ``U`` from :func:`scale_by_soap`.

  Args:
    learning_rate: ``η``, a finite number ``>= 0`` or an optax schedule.
    weight_decay: ``λ``, a finite number ``>= 0`` or an optax schedule.
    mask: pytree (or callable) of booleans: which parameters are decayed.
    **others: as in :func:`scale_by_soap`.

  Example:
    >>> import optax, kl_precond as kp
    >>> schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 100, 1000)
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0), kp.soap(schedule))
  """
  direction = scale_by_soap(
    b1,
    b2,
    eps,
    shampoo_beta=shampoo_beta,
    precondition_frequency=precondition_frequency,
    stagger_refresh=stagger_refresh,
    max_precond_dim=max_precond_dim,
    merge_small_dims=merge_small_dims,
    precondition_1d=precondition_1d,
    bias_correction=bias_correction,
    sort_basis=sort_basis,
    normalize_grads=normalize_grads,
    layout=layout,
    dtype=dtype,
    nonfinite=nonfinite,
  )
  return _with_decay(direction, learning_rate, weight_decay, mask)


def _kl_stages(
  b2: Any,
  shampoo_beta: Any,
  precondition_frequency: int,
  eigenvalue_init: str,
  clamp: str,
  init_factor: Any,
  max_clamp_value: Any,
  damping: Any,
  sort_basis: bool,
  dtype: Any,
  stagger_refresh: bool = False,
) -> tuple[estimators.KL, basis_lib.Refresh]:
  _check_direction(b2, precondition_frequency, sort_basis)
  check_bool("stagger_refresh", stagger_refresh)
  estimator = estimators.kl(
    _factor_beta(shampoo_beta, b2),
    eigenvalue_init=eigenvalue_init,
    clamp=clamp,
    init_factor=init_factor,
    max_clamp_value=max_clamp_value,
    damping=damping,
    dtype=dtype,
  )
  return estimator, basis_lib.qr_every(
    precondition_frequency, sort=sort_basis, dtype=dtype, stagger=stagger_refresh
  )


def scale_by_kl_soap(
  b1: Any = 0.9,
  b2: Any = 0.98,
  eps: Any = 1e-8,
  *,
  shampoo_beta: Any = None,
  precondition_frequency: int = 10,
  stagger_refresh: bool = False,
  eigenvalue_init: str = "eigh",
  clamp: str = "relative",
  init_factor: Any = 0.1,
  max_clamp_value: Any = 4000.0,
  damping: Any = 0.0,
  max_precond_dim: int = 10000,
  merge_small_dims: bool = False,
  precondition_1d: bool = False,
  normalize_grads: bool = False,
  sort_basis: bool = False,
  layout: LayoutConfig | None = None,
  dtype: Any = None,
  nonfinite: str = "skip",
) -> optax.GradientTransformation:
  """KL-SOAP: Adam in the eigenbasis of the KL covariance estimate (Lin et al., 2025).

  .. math::

    L &\\leftarrow \\beta L + \\tfrac{1-\\beta}{n}\\, G \\hat S_R^{-1} G^\\top,\\quad
    R \\leftarrow \\beta R + \\tfrac{1-\\beta}{m}\\, G^\\top \\hat S_L^{-1} G \\\\
    \\tilde G &= Q_L^\\top G Q_R,\\quad M \\leftarrow \\beta_1 M + (1-\\beta_1)\\tilde G,\\quad
    V \\leftarrow \\beta_2 V + (1-\\beta_2)\\tilde G^2,\\quad
    U = Q_L \\frac{M}{\\sqrt V + \\epsilon} Q_R^\\top

  with ``Ŝ⁻¹ = Q diag(1/ℓ) Qᵀ`` from each factor's stale basis and EMA eigenvalues ``ℓ`` (see
  :func:`kl_precond.kl`). No bias correction; ``M`` re-rotated at refresh, ``V`` not.

  Args:
    b1: first-moment EMA weight.
    b2: second-moment EMA weight; the factor EMA weight when ``shampoo_beta`` is None.
    eps: added to ``√V``.
    shampoo_beta: factor and eigenvalue EMA weight ``β`` (``None``: ``b2``).
    precondition_frequency: ``T``, steps between QR refreshes (static).
    stagger_refresh: refresh about ``1/T`` of the blocks at each step, each block once every
      ``T`` steps at its own phase, instead of every block at once every ``T`` steps (see
      :func:`kl_precond.preconditioner.refresh_schedule`); the references do the latter.
    eigenvalue_init: where the eigenvalue estimates ``ℓ`` start: ``"eigh"`` (the first
      decomposition's eigenvalues of the first, isotropically whitened statistic), ``"trace"``,
      ``"debiased"``, or ``"constant"`` (``init_factor``; the authors' code). See
      :func:`kl_precond.kl`.
    clamp: ``"relative"`` (``ℓ ≥ max ℓ / κ²``) or ``"absolute"`` (``s = ℓ^(-1/2) ≤ κ``; the
      authors'), ``κ = max(10, min(d, max_clamp_value))``.
    init_factor: initial eigenvalue estimate ``ℓ_0`` of ``eigenvalue_init="constant"``.
    max_clamp_value: cap of the clamp's ``κ``; ``None``: no clamping.
    damping: trace damping strength added to the eigenvalue targets (reference: ``eps``).
    max_precond_dim: axes longer than this get no factor (static).
    merge_small_dims: merge neighbouring small axes.
    precondition_1d: give 1-D tensors a factor instead of plain Adam.
    normalize_grads: divide each tensor's update by its RMS.
    sort_basis: sort columns before the power step (not in the reference).
    layout: a full :class:`LayoutConfig` instead of the three layout arguments.
    dtype: storage dtype of all state (e.g. ``jnp.bfloat16``); decompositions run in float32.
    nonfinite: ``"skip"`` a call whose gradient has NaN/Inf (zero update, state kept, counted in
      ``skipped``) or ``"propagate"`` it.

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Lin et al., "Understanding and Improving Shampoo and SOAP via Kullback-Leibler
    Minimization", 2025, https://arxiv.org/abs/2509.03378
  """
  estimator, refresh = _kl_stages(
    b2,
    shampoo_beta,
    precondition_frequency,
    eigenvalue_init,
    clamp,
    init_factor,
    max_clamp_value,
    damping,
    sort_basis,
    dtype,
    stagger_refresh,
  )
  return preconditioner.scale_by_preconditioner(
    estimator,
    refresh,
    scaling.adam(b1, b2, eps, bias_correction=False, dtype=dtype),
    layout=_layout(layout, max_precond_dim, merge_small_dims, precondition_1d),
    normalize_grads=normalize_grads,
    nonfinite=nonfinite,
  )


def kl_soap(
  learning_rate: optax.ScalarOrSchedule = 1e-4,
  b1: Any = 0.9,
  b2: Any = 0.98,
  eps: Any = 1e-8,
  weight_decay: Any = 0.01,
  *,
  mask: Any = None,
  shampoo_beta: Any = None,
  precondition_frequency: int = 10,
  stagger_refresh: bool = False,
  eigenvalue_init: str = "eigh",
  clamp: str = "relative",
  init_factor: Any = 0.1,
  max_clamp_value: Any = 4000.0,
  damping: Any = 0.0,
  max_precond_dim: int = 10000,
  merge_small_dims: bool = False,
  precondition_1d: bool = False,
  normalize_grads: bool = False,
  sort_basis: bool = False,
  layout: LayoutConfig | None = None,
  dtype: Any = None,
  nonfinite: str = "skip",
) -> optax.GradientTransformation:
  """KL-SOAP with decoupled weight decay: ``W ← W - η(U + λW)``, ``U`` from :func:`scale_by_kl_soap`.

  Args:
    learning_rate: ``η``, a finite number ``>= 0`` or an optax schedule.
    weight_decay: ``λ``, a finite number ``>= 0`` or an optax schedule.
    mask: pytree (or callable) of booleans: which parameters are decayed.
    **others: as in :func:`scale_by_kl_soap`.
  """
  direction = scale_by_kl_soap(
    b1,
    b2,
    eps,
    shampoo_beta=shampoo_beta,
    precondition_frequency=precondition_frequency,
    stagger_refresh=stagger_refresh,
    eigenvalue_init=eigenvalue_init,
    clamp=clamp,
    init_factor=init_factor,
    max_clamp_value=max_clamp_value,
    damping=damping,
    max_precond_dim=max_precond_dim,
    merge_small_dims=merge_small_dims,
    precondition_1d=precondition_1d,
    normalize_grads=normalize_grads,
    sort_basis=sort_basis,
    layout=layout,
    dtype=dtype,
    nonfinite=nonfinite,
  )
  return _with_decay(direction, learning_rate, weight_decay, mask)


def scale_by_kl_shampoo(
  b1: Any = 0.9,
  b2: Any = 0.98,
  eps: Any = 1e-8,
  *,
  shampoo_beta: Any = None,
  precondition_frequency: int = 10,
  stagger_refresh: bool = False,
  eigenvalue_init: str = "eigh",
  clamp: str = "relative",
  init_factor: Any = 0.1,
  max_clamp_value: Any = 4000.0,
  damping: Any = 0.0,
  max_precond_dim: int = 10000,
  merge_small_dims: bool = False,
  precondition_1d: bool = False,
  normalize_grads: bool = False,
  sort_basis: bool = False,
  layout: LayoutConfig | None = None,
  dtype: Any = None,
  nonfinite: str = "skip",
) -> optax.GradientTransformation:
  """KL-Shampoo: Kronecker-factored Adam whose second moment is the KL estimate (Lin et al.).

  .. math::

    M \\leftarrow \\beta_1 M + (1-\\beta_1) G,\\qquad
    U = Q_L \\Big[(Q_L^\\top M Q_R) \\odot \\frac{1}{\\sqrt{\\ell_L \\ell_R^\\top} + \\epsilon}\\Big]
        Q_R^\\top

  i.e. ``(Ŝ_L ⊗ Ŝ_R)^{-1/2}`` applied to the momentum, with the factors, bases and EMA
  eigenvalues ``ℓ`` of :func:`kl_precond.kl`. No Adam second moment, no grafting, no bias
  correction. The state holds the momentum in the eigenbasis, ``Q_Lᵀ M Q_R``, re-rotated at each
  refresh (``kronecker_eigenvalues(momentum_in_eigenbasis=True)``): the projection of ``G`` is
  shared with the estimator, and the direction is the reference's up to rounding. Tensors with
  no factor (0-/1-D unless ``precondition_1d``) take plain Adam
  (``b1``, ``b2``, ``eps``, bias-corrected).

  Args:
    b1: momentum EMA weight.
    b2: the factor EMA weight when ``shampoo_beta`` is None, and Adam's ``b2`` for the fallback.
    eps: added to ``√(ℓ_L ℓ_R)`` (zero estimates give zero scaling).
    shampoo_beta: factor and eigenvalue EMA weight ``β`` (``None``: ``b2``).
    precondition_frequency: ``T``, steps between QR refreshes (static).
    stagger_refresh: refresh about ``1/T`` of the blocks at each step, each block once every
      ``T`` steps at its own phase, instead of every block at once every ``T`` steps (see
      :func:`kl_precond.preconditioner.refresh_schedule`); the references do the latter.
    eigenvalue_init: where the eigenvalue estimates ``ℓ`` start: ``"eigh"`` (the first
      decomposition's eigenvalues of the first, isotropically whitened statistic), ``"trace"``,
      ``"debiased"``, or ``"constant"`` (``init_factor``; the authors' code). See
      :func:`kl_precond.kl`.
    clamp: ``"relative"`` (``ℓ ≥ max ℓ / κ²``) or ``"absolute"`` (``s = ℓ^(-1/2) ≤ κ``; the
      authors'), ``κ = max(10, min(d, max_clamp_value))``.
    init_factor: initial eigenvalue estimate ``ℓ_0`` of ``eigenvalue_init="constant"``.
    max_clamp_value: cap of the clamp's ``κ``; ``None``: no clamping.
    damping: trace damping strength added to the eigenvalue targets (reference: ``eps``).
    max_precond_dim: axes longer than this get no factor (static).
    merge_small_dims: merge neighbouring small axes.
    precondition_1d: give 1-D tensors a factor instead of the Adam fallback.
    normalize_grads: divide each tensor's update by its RMS.
    sort_basis: sort columns before the power step (not in the reference).
    layout: a full :class:`LayoutConfig` instead of the three layout arguments.
    dtype: storage dtype of all state (e.g. ``jnp.bfloat16``); decompositions run in float32.
    nonfinite: ``"skip"`` a call whose gradient has NaN/Inf (zero update, state kept, counted in
      ``skipped``) or ``"propagate"`` it.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp, optax, kl_precond as kp
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0), kp.kl_shampoo(1e-3))
    >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    >>> state = tx.init(params)

  References:
    Lin et al., "Understanding and Improving Shampoo and SOAP via Kullback-Leibler
    Minimization", 2025, https://arxiv.org/abs/2509.03378
  """
  estimator, refresh = _kl_stages(
    b2,
    shampoo_beta,
    precondition_frequency,
    eigenvalue_init,
    clamp,
    init_factor,
    max_clamp_value,
    damping,
    sort_basis,
    dtype,
    stagger_refresh,
  )
  return preconditioner.scale_by_preconditioner(
    estimator,
    refresh,
    scaling.kronecker_eigenvalues(
      b1, eps, exponents=0.5, eps_placement="outside", dtype=dtype, momentum_in_eigenbasis=True
    ),
    layout=_layout(layout, max_precond_dim, merge_small_dims, precondition_1d),
    fallback=scaling.adam(b1, b2, eps, bias_correction=True, dtype=dtype),
    normalize_grads=normalize_grads,
    nonfinite=nonfinite,
  )


def kl_shampoo(
  learning_rate: optax.ScalarOrSchedule = 1e-4,
  b1: Any = 0.9,
  b2: Any = 0.98,
  eps: Any = 1e-8,
  weight_decay: Any = 0.01,
  *,
  mask: Any = None,
  shampoo_beta: Any = None,
  precondition_frequency: int = 10,
  stagger_refresh: bool = False,
  eigenvalue_init: str = "eigh",
  clamp: str = "relative",
  init_factor: Any = 0.1,
  max_clamp_value: Any = 4000.0,
  damping: Any = 0.0,
  max_precond_dim: int = 10000,
  merge_small_dims: bool = False,
  precondition_1d: bool = False,
  normalize_grads: bool = False,
  sort_basis: bool = False,
  layout: LayoutConfig | None = None,
  dtype: Any = None,
  nonfinite: str = "skip",
) -> optax.GradientTransformation:
  """KL-Shampoo with decoupled weight decay: ``W ← W - η(U + λW)``, ``U`` from :func:`scale_by_kl_shampoo`.

  Args:
    learning_rate: ``η``, a finite number ``>= 0`` or an optax schedule.
    weight_decay: ``λ``, a finite number ``>= 0`` or an optax schedule.
    mask: pytree (or callable) of booleans: which parameters are decayed.
    **others: as in :func:`scale_by_kl_shampoo`.
  """
  direction = scale_by_kl_shampoo(
    b1,
    b2,
    eps,
    shampoo_beta=shampoo_beta,
    precondition_frequency=precondition_frequency,
    stagger_refresh=stagger_refresh,
    eigenvalue_init=eigenvalue_init,
    clamp=clamp,
    init_factor=init_factor,
    max_clamp_value=max_clamp_value,
    damping=damping,
    max_precond_dim=max_precond_dim,
    merge_small_dims=merge_small_dims,
    precondition_1d=precondition_1d,
    normalize_grads=normalize_grads,
    sort_basis=sort_basis,
    layout=layout,
    dtype=dtype,
    nonfinite=nonfinite,
  )
  return _with_decay(direction, learning_rate, weight_decay, mask)
