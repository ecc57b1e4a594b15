"""Kronecker-approximation diagnostics for a layer's gradient covariance.

Morwani et al. (2024) read Shampoo as an approximation of a gradient covariance ``H`` by a
Kronecker product ``L ⊗ R``. The Frobenius-optimal such product is the top singular pair of the
rearranged matrix ``𝓡(H)``, and Shampoo's squared preconditioner is one step of the power iteration
that computes it. This module builds ``H``, its optimal Kronecker approximation (by SVD or by an
alternating power iteration that never forms ``H``), Shampoo's one-step factors and their square
roots, the KL (matrix-normal maximum likelihood) factors of KL-Shampoo, and the metrics that
compare them. Everything is a pure function that works under ``jax.jit`` and ``jax.vmap``.

**Vec convention.** A layer gradient ``G`` is an ``m × n`` matrix and ``g = vec(G) =
G.reshape(-1)`` is its *row-major* flattening, index ``(i, j) ↦ i·n + j``. Then ``jnp.kron(L, R)``
has entries

.. math::

  (L \\otimes R)_{(i,j),(k,l)} = L_{ik} R_{jl}, \\qquad (L \\otimes R)\\,\\mathrm{vec}(G) =
  \\mathrm{vec}(L G R^\\top),

so the ``m × m`` factor ``L`` acts on the rows of ``G`` and the ``n × n`` factor ``R`` on its
columns.

**Expectations.** Gradient samples are stacked as ``grads`` of shape ``(K, m, n)`` with optional
non-negative ``weights`` of shape ``(K,)``; ``E[f(G)] = Σ_k w_k f(G_k)``, with ``w_k = 1/K`` when
``weights`` is None (EMA weights: :func:`ema_weights`; the model's predictive probabilities:
:func:`fisher_grads`). The covariance is the uncentred second moment ``H = E[g gᵀ]``.

References:
  Morwani et al., `A New Perspective on Shampoo's Preconditioner
  <https://arxiv.org/abs/2406.17748>`_, ICLR 2025.
  Van Loan and Pitsianis, `Approximation with Kronecker Products
  <https://doi.org/10.1007/978-94-015-8196-7_17>`_, 1993.
  Lin et al., `Understanding and Improving Shampoo and SOAP via Kullback-Leibler Minimization
  <https://arxiv.org/abs/2509.03378>`_, 2025.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any
LossFn = Callable[[PyTree, Array, Array], Array]
LogitsFn = Callable[[PyTree, Array], Array]


class KroneckerFactors(NamedTuple):
  """A Kronecker-structured approximation ``left ⊗ right`` of an ``mn × mn`` covariance."""

  left: Array  # (m, m), acts on the rows of G
  right: Array  # (n, n), acts on the columns of G


def kronecker_product(factors: KroneckerFactors) -> Array:
  """Returns the ``mn × mn`` matrix ``left ⊗ right`` (``jnp.kron``, row-major vec)."""
  return jnp.kron(factors.left, factors.right)


# ----------------------------------------------------------------------------------------------
# Rearrangement and covariance statistics.


def rearrange(covariance: Array, m: int, n: int) -> Array:
  """Van Loan's rearrangement ``𝓡(H)`` of an ``mn × mn`` matrix into an ``m² × n²`` matrix.

  .. math::

    \\mathcal{R}(H)_{(i,k),(j,l)} = H_{(i,j),(k,l)}, \\qquad
    \\mathcal{R}(L \\otimes R) = \\mathrm{vec}(L)\\,\\mathrm{vec}(R)^\\top,

  so ``‖H − L⊗R‖_F = ‖𝓡(H) − vec(L) vec(R)ᵀ‖_F``: Kronecker approximation is rank-1
  approximation of ``𝓡(H)``.

  Args:
    covariance: an ``(mn, mn)`` matrix.
    m: number of rows of the layer gradient (static).
    n: number of columns of the layer gradient (static).

  Returns:
    The ``(m·m, n·n)`` matrix ``𝓡(H)``.

  Example:
    >>> rearrange(jnp.kron(jnp.eye(2), jnp.eye(3)), 2, 3).shape
    (4, 9)
  """
  return covariance.reshape(m, n, m, n).transpose(0, 2, 1, 3).reshape(m * m, n * n)


def unrearrange(rearranged: Array, m: int, n: int) -> Array:
  """Inverse of :func:`rearrange`: maps an ``(m², n²)`` matrix back to ``(mn, mn)``."""
  return rearranged.reshape(m, m, n, n).transpose(0, 2, 1, 3).reshape(m * n, m * n)


def _weights(grads: Array, weights: Array | None) -> Array:
  """Returns ``weights``, or the uniform weights ``1/K`` for a stack of ``K`` samples."""
  if weights is None:
    return jnp.full(grads.shape[:1], 1.0 / grads.shape[0], dtype=grads.dtype)
  return weights.astype(grads.dtype)


def ema_weights(num_samples: int, beta: float | Array, bias_correction: bool = False) -> Array:
  """Weights that turn ``E[·]`` into an exponential moving average started at zero.

  .. math:: w_k = (1 - \\beta)\\,\\beta^{K-1-k}, \\quad k = 0, \\dots, K-1,

  divided by ``1 − β^K`` when ``bias_correction`` is True (then ``Σ_k w_k = 1``). The last sample
  has the largest weight, as in an optimizer's factor EMA ``L ← βL + (1−β) G Gᵀ``.
  """
  powers = jnp.asarray(beta) ** jnp.arange(num_samples - 1, -1, -1)
  weights = (1.0 - beta) * powers
  if bias_correction:
    weights = weights / (1.0 - jnp.asarray(beta) ** num_samples)
  return weights


def gradient_covariance(grads: Array, weights: Array | None = None) -> Array:
  """The ``mn × mn`` gradient covariance ``H = E[vec(G) vec(G)ᵀ]`` (row-major vec).

  Args:
    grads: gradient samples, shape ``(K, m, n)``.
    weights: optional sample weights, shape ``(K,)``; uniform ``1/K`` if None.

  Returns:
    ``H = Σ_k w_k g_k g_kᵀ``, shape ``(mn, mn)``.
  """
  flat = grads.reshape(grads.shape[0], -1)
  return jnp.einsum("s,si,sj->ij", _weights(grads, weights), flat, flat)


def left_statistic(grads: Array, right: Array, weights: Array | None = None) -> Array:
  """Returns ``E[G R Gᵀ]`` (``m × m``), which equals ``mat(𝓡(H) vec(R))``.

  .. math:: \\mathcal{R}(H)\\,\\mathrm{vec}(R) = \\mathrm{vec}\\,\\mathbb{E}[G R G^\\top]

  This is half a step of power iteration on ``𝓡(H)``; ``H`` is never formed.

  Args:
    grads: gradient samples, shape ``(K, m, n)``.
    right: an ``n × n`` matrix ``R``.
    weights: optional sample weights, shape ``(K,)``; uniform ``1/K`` if None.
  """
  return jnp.einsum("s,sil,skl->ik", _weights(grads, weights), grads @ right, grads)


def right_statistic(grads: Array, left: Array, weights: Array | None = None) -> Array:
  """Returns ``E[Gᵀ L G]`` (``n × n``), which equals ``mat(𝓡(H)ᵀ vec(L))``.

  .. math:: \\mathcal{R}(H)^\\top \\mathrm{vec}(L) = \\mathrm{vec}\\,\\mathbb{E}[G^\\top L G]

  Args:
    grads: gradient samples, shape ``(K, m, n)``.
    left: an ``m × m`` matrix ``L``.
    weights: optional sample weights, shape ``(K,)``; uniform ``1/K`` if None.
  """
  return jnp.einsum("s,sij,sil->jl", _weights(grads, weights), grads, left @ grads)


def shampoo_stats(grads: Array, weights: Array | None = None) -> KroneckerFactors:
  """Shampoo's factors ``A = E[G Gᵀ]`` and ``B = E[Gᵀ G]``; ``A ⊗ B`` is "Shampoo²".

  .. math:: A = \\mathbb{E}[G G^\\top], \\qquad B = \\mathbb{E}[G^\\top G], \\qquad
    \\operatorname{tr} A = \\operatorname{tr} B = \\operatorname{tr} H.

  ``A ⊗ B`` is one step of the power iteration of :func:`kronecker_power_iteration` from
  ``(I_m, I_n)`` (up to scale): ``A = mat(𝓡(H) vec(I_n))``, ``B = mat(𝓡(H)ᵀ vec(I_m))``.

  Args:
    grads: gradient samples, shape ``(K, m, n)``.
    weights: optional sample weights (e.g. :func:`ema_weights`), shape ``(K,)``.

  Returns:
    ``KroneckerFactors(A, B)``.

  Example:
    >>> stats = shampoo_stats(jnp.ones((5, 3, 2)))
    >>> round(float(jnp.trace(stats.left)), 4), round(float(jnp.trace(stats.right)), 4)
    (6.0, 6.0)
  """
  w = _weights(grads, weights)
  left = jnp.einsum("s,sij,skj->ik", w, grads, grads)
  right = jnp.einsum("s,sij,sil->jl", w, grads, grads)
  return KroneckerFactors(left, right)


def _psd_power(matrix: Array, power: float, damping: float | Array = 0.0) -> Array:
  """Returns ``(S + δ·(tr S / d)·I)^p`` of a symmetric PSD ``S`` by ``eigh``, eigenvalues ≥ 0."""
  eigenvalues, eigenvectors = jnp.linalg.eigh(matrix)
  eigenvalues = jnp.maximum(eigenvalues, 0.0)
  eigenvalues = eigenvalues + damping * jnp.mean(eigenvalues)
  return (eigenvectors * eigenvalues**power) @ eigenvectors.T


def shampoo_root(grads: Array, weights: Array | None = None) -> KroneckerFactors:
  """Shampoo's own implied covariance ``A^{1/2} ⊗ B^{1/2}``.

  Shampoo updates with ``A^{-1/4} G B^{-1/4} = mat(H_sh^{-1/2} g)``, so

  .. math:: H_{\\mathrm{sh}} = A^{1/2} \\otimes B^{1/2}, \\qquad H_{\\mathrm{sh}}^2 = A \\otimes B.

  Returns:
    ``KroneckerFactors(A^{1/2}, B^{1/2})`` with ``A, B`` from :func:`shampoo_stats`.
  """
  stats = shampoo_stats(grads, weights)
  return KroneckerFactors(_psd_power(stats.left, 0.5), _psd_power(stats.right, 0.5))


# ----------------------------------------------------------------------------------------------
# Optimal Kronecker approximation.


def optimal_kronecker(covariance: Array, m: int, n: int) -> KroneckerFactors:
  """The Frobenius-optimal Kronecker approximation of ``H``, from the SVD of ``𝓡(H)``.

  .. math::

    (L^\\star, R^\\star) = \\arg\\min_{L, R} \\|H - L \\otimes R\\|_F, \\qquad
    L^\\star = \\sqrt{\\sigma_1}\\,\\mathrm{mat}(u_1), \\quad R^\\star = \\sqrt{\\sigma_1}\\,
    \\mathrm{mat}(v_1),

  with ``(σ₁, u₁, v₁)`` the top singular triple of ``𝓡(H)``. The sign is fixed so that
  ``tr L* ≥ 0`` (for a PSD ``H`` both factors are then PSD).

  Args:
    covariance: the ``(mn, mn)`` matrix ``H``.
    m: number of rows of the layer gradient (static).
    n: number of columns of the layer gradient (static).

  Returns:
    ``KroneckerFactors(L*, R*)``.
  """
  left_vectors, singular_values, right_vectors_t = jnp.linalg.svd(rearrange(covariance, m, n))
  root = jnp.sqrt(singular_values[0])
  left = left_vectors[:, 0].reshape(m, m)
  sign = jnp.where(jnp.trace(left) < 0, -1.0, 1.0).astype(covariance.dtype)
  return KroneckerFactors(sign * root * left, sign * root * right_vectors_t[0].reshape(n, n))


def _unit(matrix: Array) -> Array:
  """Returns ``matrix / ‖matrix‖_F`` (a zero matrix stays zero)."""
  norm = jnp.linalg.norm(matrix)
  return matrix / jnp.maximum(norm, jnp.finfo(matrix.dtype).tiny)


def kronecker_power_iteration(
  grads: Array,
  num_iters: int,
  weights: Array | None = None,
  init: KroneckerFactors | None = None,
  alternating: bool = True,
) -> KroneckerFactors:
  """Power iteration for the top singular pair of ``𝓡(H)``, from gradient samples only.

  .. math::

    L_{t+1} \\propto \\mathbb{E}[G R_t G^\\top], \\qquad
    R_{t+1} \\propto \\mathbb{E}[G^\\top L_{t+1} G] \\ \\text{(alternating)}
    \\quad\\text{or}\\quad \\mathbb{E}[G^\\top L_t G] \\ \\text{(simultaneous)},

  each factor normalised to unit Frobenius norm. Finally both are scaled by ``√|c|`` (the sign
  goes to ``L``), with ``c = vec(L)ᵀ 𝓡(H) vec(R) = ⟨L, E[G R Gᵀ]⟩`` the Rayleigh quotient, the
  optimal scale of ``L ⊗ R``. One simultaneous step from ``(I_m, I_n)`` gives ``(A/‖A‖, B/‖B‖)``
  of :func:`shampoo_stats`: the optimally scaled Shampoo². The alternating form converges twice
  as fast, at the rate ``(σ₂/σ₁)²`` per step.

  Args:
    grads: gradient samples, shape ``(K, m, n)``; ``H = E[g gᵀ]`` is never formed.
    num_iters: number of power steps.
    weights: optional sample weights, shape ``(K,)``.
    init: starting factors; ``(I_m, I_n)`` if None.
    alternating: use the new ``L`` for the ``R`` step (True) or the old one (False).

  Returns:
    ``KroneckerFactors(L, R)`` with ``L ⊗ R`` the Rayleigh-scaled approximation of ``H``.

  Example:
    >>> grads = jax.random.normal(jax.random.key(0), (64, 3, 2))
    >>> factors = kronecker_power_iteration(grads, num_iters=20)
    >>> factors.left.shape, factors.right.shape
    ((3, 3), (2, 2))
  """
  _, m, n = grads.shape
  if init is None:
    init = KroneckerFactors(jnp.eye(m, dtype=grads.dtype), jnp.eye(n, dtype=grads.dtype))

  def step(_: int, factors: KroneckerFactors) -> KroneckerFactors:
    left = _unit(left_statistic(grads, factors.right, weights))
    source = left if alternating else factors.left
    return KroneckerFactors(left, _unit(right_statistic(grads, source, weights)))

  factors = jax.lax.fori_loop(0, num_iters, step, init)
  left, right = _unit(factors.left), _unit(factors.right)
  rayleigh = jnp.vdot(left, left_statistic(grads, right, weights))
  root = jnp.sqrt(jnp.abs(rayleigh))
  return KroneckerFactors(jnp.sign(rayleigh) * root * left, root * right)


def samples_from_covariance(covariance: Array, m: int, n: int) -> tuple[Array, Array]:
  """Gradient samples with ``E[g gᵀ] = H`` exactly, to run sample-based estimators on a PSD ``H``.

  .. math:: H = \\sum_i \\lambda_i u_i u_i^\\top \\;\\Rightarrow\\; G_i = \\mathrm{mat}(u_i),
    \\quad w_i = \\max(\\lambda_i, 0).

  Returns:
    ``(grads, weights)`` of shapes ``(mn, m, n)`` and ``(mn,)``.
  """
  eigenvalues, eigenvectors = jnp.linalg.eigh(covariance)
  return eigenvectors.T.reshape(m * n, m, n), jnp.maximum(eigenvalues, 0.0)


# ----------------------------------------------------------------------------------------------
# KL-Shampoo's covariance estimate.


def kl_fixed_point(
  grads: Array,
  num_iters: int = 30,
  weights: Array | None = None,
  damping: float | Array = 1e-6,
) -> KroneckerFactors:
  """The KL-optimal Kronecker covariance ``S_L ⊗ S_R``: the fixed point of KL-Shampoo's factors.

  KL-Shampoo's factors are EMAs of ``G Ŝ_R⁻¹ Gᵀ / n`` and ``Gᵀ Ŝ_L⁻¹ G / m``; on a stationary
  gradient source they settle at the fixed point of

  .. math::

    S_L = \\tfrac{1}{n}\\,\\mathbb{E}[G S_R^{-1} G^\\top], \\qquad
    S_R = \\tfrac{1}{m}\\,\\mathbb{E}[G^\\top S_L^{-1} G],

  which are the stationarity conditions of
  ``min KL(𝒩(0, H) ‖ 𝒩(0, S_L ⊗ S_R))`` (the matrix-normal maximum likelihood). This function
  runs that alternating ("flip-flop") iteration from ``S_R = I_n``. The pair is defined up to
  ``(c S_L, S_R / c)``; the product ``S_L ⊗ S_R`` is unique.

  Args:
    grads: gradient samples, shape ``(K, m, n)``.
    num_iters: number of alternating updates of the pair.
    weights: optional sample weights, shape ``(K,)``.
    damping: ``δ`` in the inverses ``(S + δ·(tr S / d)·I)⁻¹``, relative to the mean eigenvalue,
      so that rank-deficient samples stay finite; 0 gives the exact equations.

  Returns:
    ``KroneckerFactors(S_L, S_R)``.
  """
  _, m, n = grads.shape

  def step(_: int, factors: KroneckerFactors) -> KroneckerFactors:
    left = left_statistic(grads, _psd_power(factors.right, -1.0, damping), weights) / n
    right = right_statistic(grads, _psd_power(left, -1.0, damping), weights) / m
    return KroneckerFactors(left, right)

  init = KroneckerFactors(jnp.eye(m, dtype=grads.dtype), jnp.eye(n, dtype=grads.dtype))
  return jax.lax.fori_loop(0, num_iters, step, init)


# ----------------------------------------------------------------------------------------------
# Metrics.


def cosine_similarity(target: Array, approx: Array) -> Array:
  """Frobenius cosine ``⟨H, K⟩_F / (‖H‖_F ‖K‖_F)`` of two equally shaped matrices.

  Scale-free: for the best scalar ``c``, ``min_c ‖H − cK‖_F² = ‖H‖_F² (1 − cos²(H, K))``, so over
  Kronecker products the Frobenius-optimal approximation is the cosine maximiser.
  """
  inner = jnp.vdot(target, approx)
  return inner / (jnp.linalg.norm(target) * jnp.linalg.norm(approx))


def optimal_scale(target: Array, approx: Array) -> Array:
  """The scalar ``c = ⟨H, K⟩_F / ‖K‖_F²`` that minimises ``‖H − cK‖_F``."""
  return jnp.vdot(target, approx) / jnp.vdot(approx, approx)


def scaled_frobenius_error(target: Array, approx: Array) -> Array:
  """Relative error after optimal scaling, ``min_c ‖H − cK‖_F / ‖H‖_F = √(1 − cos²(H, K))``."""
  residual = target - optimal_scale(target, approx) * approx
  return jnp.linalg.norm(residual) / jnp.linalg.norm(target)


def kronecker_cosines(
  target: Array,
  grads: Array,
  weights: Array | None = None,
  power_iters: int = 10,
  kl_iters: int = 30,
  kl_damping: float | Array = 1e-6,
) -> dict[str, Array]:
  """Cosine similarity to ``target`` of every Kronecker approximation in this module.

  Args:
    target: the reference covariance ``H``, shape ``(mn, mn)``.
    grads: gradient samples ``(K, m, n)`` from which the estimates are built (their covariance
      may differ from ``target``, e.g. batch gradients or real labels against a Fisher target).
    weights: optional sample weights, shape ``(K,)``.
    power_iters: alternating power steps for ``"power"``.
    kl_iters: flip-flop steps for ``"kl"``.
    kl_damping: relative damping ``δ`` of :func:`kl_fixed_point`.

  Returns:
    A dict of scalar cosines: ``"optimal"`` (SVD of ``𝓡(target)``, the ceiling), ``"power"``
    (optimal Kronecker factors of the samples' own covariance), ``"shampoo2"`` (``A ⊗ B``),
    ``"shampoo"`` (``A^{1/2} ⊗ B^{1/2}``) and ``"kl"`` (``S_L ⊗ S_R``).

  Example:
    >>> grads = jax.random.normal(jax.random.key(0), (64, 3, 2))
    >>> cosines = kronecker_cosines(gradient_covariance(grads), grads)
    >>> sorted(cosines)
    ['kl', 'optimal', 'power', 'shampoo', 'shampoo2']
  """
  _, m, n = grads.shape
  approximations = {
    "optimal": optimal_kronecker(target, m, n),
    "power": kronecker_power_iteration(grads, power_iters, weights),
    "shampoo2": shampoo_stats(grads, weights),
    "shampoo": shampoo_root(grads, weights),
    "kl": kl_fixed_point(grads, kl_iters, weights, kl_damping),
  }
  return {
    name: cosine_similarity(target, kronecker_product(factors))
    for name, factors in approximations.items()
  }


# ----------------------------------------------------------------------------------------------
# Gradient sources.


def per_example_grads(loss_fn: LossFn, params: PyTree, inputs: Array, labels: Array) -> PyTree:
  """Per-example gradients ``∇_θ ℓ(θ; x_i, y_i)``, stacked on a new leading axis.

  Args:
    loss_fn: ``loss_fn(params, x, y) -> scalar`` for a single example.
    params: the parameter pytree ``θ``.
    inputs: examples ``x_i``, leading axis ``N``.
    labels: labels ``y_i`` (the dataset's, or :func:`sample_labels`), leading axis ``N``.

  Returns:
    A pytree like ``params`` with a leading axis of length ``N``.
  """
  return jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, 0))(params, inputs, labels)


def batch_grads(
  loss_fn: LossFn, params: PyTree, inputs: Array, labels: Array, batch_size: int
) -> PyTree:
  """Mini-batch gradients ``Ḡ_b = (1/B) Σ_{i∈b} ∇_θ ℓ(θ; x_i, y_i)`` over consecutive groups.

  ``E[Ḡ Ḡᵀ]`` mixes the per-example covariance (scaled by ``1/B``) with the outer product of
  the mean gradient, which is why Shampoo's statistics depend on the batch size.

  Args:
    loss_fn: ``loss_fn(params, x, y) -> scalar`` for a single example.
    params: the parameter pytree ``θ``.
    inputs: examples, leading axis ``N``; the last ``N mod B`` are dropped.
    labels: labels, leading axis ``N``.
    batch_size: ``B`` (static).

  Returns:
    A pytree like ``params`` with a leading axis of length ``N // B``.
  """
  num_batches = inputs.shape[0] // batch_size

  def group(x: Array) -> Array:
    return x[: num_batches * batch_size].reshape(num_batches, batch_size, *x.shape[1:])

  def mean_loss(p: PyTree, xs: Array, ys: Array) -> Array:
    return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0, 0))(p, xs, ys))

  return jax.vmap(jax.grad(mean_loss), in_axes=(None, 0, 0))(params, group(inputs), group(labels))


def sample_labels(key: Array, logits_fn: LogitsFn, params: PyTree, inputs: Array) -> Array:
  """Labels drawn from the model's predictive distribution, ``y_i ~ softmax(f_θ(x_i))``.

  Per-example gradients at sampled labels estimate the Fisher (the Gauss–Newton matrix for
  softmax cross-entropy) without bias; the dataset's labels give the empirical Fisher instead.

  Args:
    key: a PRNG key.
    logits_fn: ``logits_fn(params, x) -> (C,)`` logits for a single example.
    params: the parameter pytree ``θ``.
    inputs: examples, leading axis ``N``.

  Returns:
    Integer labels, shape ``(N,)``.
  """
  logits = jax.vmap(logits_fn, in_axes=(None, 0))(params, inputs)
  return jax.random.categorical(key, logits, axis=-1)


def fisher_grads(
  loss_fn: LossFn, logits_fn: LogitsFn, params: PyTree, inputs: Array
) -> tuple[PyTree, Array]:
  """Gradients at every label, weighted by the predictive probability: the exact Fisher.

  .. math:: F = \\frac{1}{N} \\sum_i \\sum_{c=1}^{C} p_\\theta(c \\mid x_i)\\, g_{ic} g_{ic}^\\top,
    \\qquad g_{ic} = \\nabla_\\theta \\ell(\\theta; x_i, c),

  which for ``ℓ = −log softmax(f_θ(x))_y`` is the Gauss–Newton matrix. Pass the result to any
  estimator of this module as ``(grads, weights)``.

  Args:
    loss_fn: ``loss_fn(params, x, y) -> scalar``, the negative log-likelihood of one example.
    logits_fn: ``logits_fn(params, x) -> (C,)`` logits for a single example.
    params: the parameter pytree ``θ``.
    inputs: examples, leading axis ``N``.

  Returns:
    ``(grads, weights)``: a pytree with leading axis ``N·C`` (example-major) and ``(N·C,)``.
  """
  logits = jax.vmap(logits_fn, in_axes=(None, 0))(params, inputs)
  num_examples, num_classes = logits.shape
  repeated = jnp.repeat(inputs, num_classes, axis=0)
  labels = jnp.tile(jnp.arange(num_classes), num_examples)
  grads = per_example_grads(loss_fn, params, repeated, labels)
  return grads, jax.nn.softmax(logits, axis=-1).reshape(-1) / num_examples
