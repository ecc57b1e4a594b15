"""Acceptance tests T1.1–T1.9 (theory_features.md §1.4) for ``kl_precond.diagnostics``.

Every expected value is rebuilt independently in float64 numpy: ``H`` is summed from explicit
outer products, the rearrangement is written with index loops, and the optimum comes from
``numpy.linalg.svd``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kl_precond import diagnostics as dg

SHAPES = [(1, 5), (4, 3), (3, 4), (8, 8)]
RTOL = 1e-10

# Jitted once here: eager calls would retrace the loops op by op and dominate the test time.
power_iteration = jax.jit(
  dg.kronecker_power_iteration, static_argnames=("num_iters", "alternating")
)
kl_fixed_point = jax.jit(dg.kl_fixed_point, static_argnames=("num_iters",))
optimal_kronecker = jax.jit(dg.optimal_kronecker, static_argnames=("m", "n"))
per_example_grads = jax.jit(dg.per_example_grads, static_argnums=0)


@pytest.fixture(autouse=True)
def x64() -> Iterator[None]:
  with jax.enable_x64(True):
    yield


# ---------------------------------------------------------------------------------------------
# Independent numpy references.


def np_rearrange(h: np.ndarray, m: int, n: int) -> np.ndarray:
  """𝓡(H)_{(i,k),(j,l)} = H_{(i,j),(k,l)}, written with explicit loops."""
  out = np.empty((m * m, n * n))
  for i in range(m):
    for k in range(m):
      for j in range(n):
        for l in range(n):
          out[i * m + k, j * n + l] = h[i * n + j, k * n + l]
  return out


def np_covariance(grads: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
  weights = np.full(len(grads), 1 / len(grads)) if weights is None else weights
  return sum(w * np.outer(g.ravel(), g.ravel()) for w, g in zip(weights, grads, strict=True))


def np_cos(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def np_optimal_kron(h: np.ndarray, m: int, n: int) -> np.ndarray:
  """σ₁ u₁ ⊗ v₁ mapped back to mn × mn (Van Loan–Pitsianis)."""
  u, s, vt = np.linalg.svd(np_rearrange(h, m, n))
  return s[0] * np.kron(u[:, 0].reshape(m, m), vt[0].reshape(n, n))


def np_psd_sqrt(a: np.ndarray) -> np.ndarray:
  vals, vecs = np.linalg.eigh(a)
  return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def random_spd(rng: np.random.Generator, k: int) -> np.ndarray:
  x = rng.standard_normal((k, k))
  return x @ x.T / k + 0.1 * np.eye(k)


def random_grads(rng: np.random.Generator, m: int, n: int, family: str, k: int = 40) -> np.ndarray:
  """Non-Kronecker gradient samples: Gaussian, mixture of matrix-normals, or heavy-tailed."""
  if family == "gauss":
    return rng.standard_normal((k, m, n))
  if family == "heavy":
    return rng.standard_normal((k, m, n)) * rng.standard_exponential((k, m, n)) ** 2
  roots = [(np.linalg.cholesky(random_spd(rng, m)), np.linalg.cholesky(random_spd(rng, n)))]
  roots += [(np.linalg.cholesky(random_spd(rng, m)), np.linalg.cholesky(random_spd(rng, n)))]
  return np.stack(
    [roots[i % 2][0] @ rng.standard_normal((m, n)) @ roots[i % 2][1].T for i in range(k)]
  )


def kron_cosines(h: np.ndarray, grads: np.ndarray) -> dict[str, float]:
  fn = jax.jit(dg.kronecker_cosines, static_argnames=("power_iters", "kl_iters"))
  out = fn(jnp.asarray(h), jnp.asarray(grads), power_iters=100, kl_iters=100, kl_damping=0.0)
  return {name: float(value) for name, value in out.items()}


# ---------------------------------------------------------------------------------------------
# T1.1–T1.8.


@pytest.mark.parametrize("m,n", SHAPES)
def test_t1_1_rearrange_of_kron_is_outer_product(m: int, n: int) -> None:
  rng = np.random.default_rng(11)
  left, right = rng.standard_normal((m, m)), rng.standard_normal((n, n))
  got = dg.rearrange(jnp.kron(jnp.asarray(left), jnp.asarray(right)), m, n)
  np.testing.assert_allclose(got, np.outer(left.ravel(), right.ravel()), rtol=RTOL, atol=1e-14)
  h = rng.standard_normal((m * n, m * n))
  np.testing.assert_allclose(dg.rearrange(jnp.asarray(h), m, n), np_rearrange(h, m, n), rtol=0)
  np.testing.assert_allclose(dg.unrearrange(jnp.asarray(np_rearrange(h, m, n)), m, n), h, rtol=0)


@pytest.mark.parametrize("m,n", SHAPES)
def test_t1_2_rearranged_covariance_is_a_half_power_step(m: int, n: int) -> None:
  rng = np.random.default_rng(12)
  grads, weights = rng.standard_normal((7, m, n)), rng.uniform(0.1, 1.0, 7)
  left, right = rng.standard_normal((m, m)), rng.standard_normal((n, n))
  h_rearranged = np_rearrange(np_covariance(grads, weights), m, n)
  expected_left = sum(w * g @ right @ g.T for w, g in zip(weights, grads, strict=True))
  expected_right = sum(w * g.T @ left @ g for w, g in zip(weights, grads, strict=True))
  np.testing.assert_allclose(h_rearranged @ right.ravel(), expected_left.ravel(), rtol=RTOL)
  np.testing.assert_allclose(h_rearranged.T @ left.ravel(), expected_right.ravel(), rtol=RTOL)
  g, w = jnp.asarray(grads), jnp.asarray(weights)
  np.testing.assert_allclose(dg.left_statistic(g, jnp.asarray(right), w), expected_left, RTOL)
  np.testing.assert_allclose(dg.right_statistic(g, jnp.asarray(left), w), expected_right, RTOL)
  np.testing.assert_allclose(dg.gradient_covariance(g, w), np_covariance(grads, weights), RTOL)


def check_one_step_is_shampoo_squared(grads: np.ndarray, rtol: float, atol: float) -> None:
  _, m, n = grads.shape
  a = sum(g @ g.T for g in grads) / len(grads)
  b = sum(g.T @ g for g in grads) / len(grads)
  g = jnp.asarray(grads)
  stats = dg.shampoo_stats(g)
  np.testing.assert_allclose(stats.left, a, rtol=rtol, atol=atol)
  np.testing.assert_allclose(stats.right, b, rtol=rtol, atol=atol)
  one_step = power_iteration(g, num_iters=1, alternating=False)
  unit_left = one_step.left / jnp.linalg.norm(one_step.left)
  np.testing.assert_allclose(unit_left, a / np.linalg.norm(a), rtol=rtol, atol=atol)
  unit_right = one_step.right / jnp.linalg.norm(one_step.right)
  np.testing.assert_allclose(unit_right, b / np.linalg.norm(b), rtol=rtol, atol=atol)
  # The rank-1 Rayleigh reconstruction (uᵀ𝓡(H)v) u vᵀ of the one-step vectors, in numpy.
  u, v = a.ravel() / np.linalg.norm(a), b.ravel() / np.linalg.norm(b)
  h_rearranged = np_rearrange(np_covariance(grads.astype(np.float64)), m, n)
  rayleigh = (u @ h_rearranged @ v) * np.outer(u, v)
  shampoo_sq = dg.kronecker_product(stats)
  h = jnp.asarray(np_covariance(grads.astype(np.float64)), dtype=g.dtype)
  scaled = dg.optimal_scale(h, shampoo_sq) * shampoo_sq
  np.testing.assert_allclose(dg.rearrange(scaled, m, n), rayleigh, rtol=rtol, atol=atol)
  np.testing.assert_allclose(
    dg.rearrange(dg.kronecker_product(one_step), m, n), rayleigh, rtol=rtol, atol=atol
  )


@pytest.mark.parametrize("m,n", SHAPES)
def test_t1_3_one_power_step_from_identity_is_shampoo_squared(m: int, n: int) -> None:
  grads = random_grads(np.random.default_rng(13), m, n, "mixture", k=9)
  check_one_step_is_shampoo_squared(grads, rtol=RTOL, atol=1e-13)


def dominant_kronecker_grads(rng: np.random.Generator, m: int, n: int) -> np.ndarray:
  """Samples of a matrix-normal source plus isotropic noise: σ₁/σ₂ of 𝓡(H) well above 1.5."""
  left, right = np.linalg.cholesky(random_spd(rng, m)), np.linalg.cholesky(random_spd(rng, n))
  signal = np.stack([left @ rng.standard_normal((m, n)) @ right.T for _ in range(60)])
  return signal + 0.5 * rng.standard_normal(signal.shape)


@pytest.mark.parametrize("m,n", SHAPES)
def test_t1_4_power_iteration_converges_to_svd_optimum(m: int, n: int) -> None:
  grads = dominant_kronecker_grads(np.random.default_rng(14), m, n)
  h = np_covariance(grads)
  singular_values = np.linalg.svd(np_rearrange(h, m, n), compute_uv=False)
  assert len(singular_values) == 1 or singular_values[0] / singular_values[1] >= 1.5
  optimum = np_optimal_kron(h, m, n)
  np.testing.assert_allclose(
    dg.kronecker_product(optimal_kronecker(jnp.asarray(h), m=m, n=n)),
    optimum,
    rtol=1e-8,
    atol=1e-12,
  )
  for alternating, steps in ((True, 40), (False, 80)):
    factors = power_iteration(jnp.asarray(grads), num_iters=steps, alternating=alternating)
    approx = np.asarray(dg.kronecker_product(factors))
    assert np_cos(approx, optimum) >= 1 - 1e-10
    np.testing.assert_allclose(approx, optimum, rtol=1e-8, atol=1e-10 * np.abs(optimum).max())
  samples, weights = dg.samples_from_covariance(jnp.asarray(h), m, n)
  from_h = power_iteration(samples, num_iters=40, weights=weights)
  assert np_cos(np.asarray(dg.kronecker_product(from_h)), optimum) >= 1 - 1e-10


@settings(
  max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
  seed=st.integers(0, 2**31 - 1),
  shape=st.sampled_from(SHAPES),
  family=st.sampled_from(["gauss", "mixture", "heavy"]),
)
def test_t1_5_optimal_kronecker_dominates(seed: int, shape: tuple[int, int], family: str) -> None:
  m, n = shape
  grads = random_grads(np.random.default_rng(seed), m, n, family)
  h = np_covariance(grads)
  cosines = kron_cosines(h, grads)
  # cos(H, best Kronecker) = σ₁(𝓡(H)) / ‖H‖_F, from numpy's SVD.
  sigma_1 = np.linalg.svd(np_rearrange(h, m, n), compute_uv=False)[0]
  np.testing.assert_allclose(cosines["optimal"], sigma_1 / np.linalg.norm(h), rtol=1e-9)
  for name in ("power", "shampoo2", "shampoo", "kl"):
    assert cosines["optimal"] >= cosines[name] - 1e-9, (name, cosines)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("family", ["gauss", "mixture", "heavy"])
def test_t1_5_ordering_on_random_problems(seed: int, family: str) -> None:
  """cos(opt) ≥ cos(Shampoo²) ≥ cos(Shampoo) on these families (the second is empirical)."""
  for m, n in SHAPES:
    grads = random_grads(np.random.default_rng(100 * seed + 1), m, n, family)
    h = np_covariance(grads)
    a, b = sum(g @ g.T for g in grads), sum(g.T @ g for g in grads)
    cos_shampoo_sq, cos_shampoo = (
      np_cos(h, np.kron(a, b)),
      np_cos(h, np.kron(np_psd_sqrt(a), np_psd_sqrt(b))),
    )
    cos_optimal = np_cos(h, np_optimal_kron(h, m, n))
    assert cos_optimal >= cos_shampoo_sq - 1e-12 >= cos_shampoo - 2e-12
    cosines = kron_cosines(h, grads)
    np.testing.assert_allclose(
      [cosines["optimal"], cosines["shampoo2"], cosines["shampoo"]],
      [cos_optimal, cos_shampoo_sq, cos_shampoo],
      rtol=1e-9,
    )


@pytest.mark.parametrize("m,n", SHAPES)
def test_t1_6_kronecker_covariance_is_recovered_by_one_step(m: int, n: int) -> None:
  rng = np.random.default_rng(16)
  # Anisotropic SPD factors: D^{1/2} S D^{1/2} with D = diag(1, 2, ...).
  p = random_spd(rng, m) * np.sqrt(np.outer(np.arange(1, m + 1), np.arange(1, m + 1)))
  q = random_spd(rng, n) * np.sqrt(np.outer(np.arange(1, n + 1), np.arange(1, n + 1)))
  # G_ij = P^{1/2} E_ij Q^{1/2} over the standard basis: Σ vec(G)vec(G)ᵀ = P ⊗ Q exactly.
  p_root, q_root = np_psd_sqrt(p), np_psd_sqrt(q)
  grads = np.stack(
    [p_root @ np.outer(np.eye(m)[i], np.eye(n)[j]) @ q_root for i in range(m) for j in range(n)]
  )
  h = np.kron(p, q)
  np.testing.assert_allclose(np_covariance(grads, np.ones(m * n)), h, rtol=1e-10, atol=1e-12)
  g, w = jnp.asarray(grads), jnp.ones(m * n)
  stats = dg.shampoo_stats(g, w)
  np.testing.assert_allclose(stats.left, np.trace(q) * p, rtol=1e-10)
  assert abs(float(dg.cosine_similarity(jnp.asarray(h), dg.kronecker_product(stats))) - 1) <= 1e-12
  kl = kl_fixed_point(g, num_iters=5, weights=w, damping=0.0)
  assert abs(float(dg.cosine_similarity(jnp.asarray(h), dg.kronecker_product(kl))) - 1) <= 1e-12
  shampoo = float(dg.cosine_similarity(jnp.asarray(h), dg.kronecker_product(dg.shampoo_root(g, w))))
  assert shampoo < 1 - 1e-3
  assert shampoo == pytest.approx(
    np_cos(h, np.kron(np_psd_sqrt(np.trace(q) * p), np_psd_sqrt(np.trace(p) * q))), rel=1e-10
  )


@pytest.mark.parametrize("m,n", SHAPES)
def test_t1_7_scaled_error_is_sine_of_angle(m: int, n: int) -> None:
  rng = np.random.default_rng(17)
  h = np_covariance(random_grads(rng, m, n, "mixture"))
  approx = np.kron(random_spd(rng, m), random_spd(rng, n))
  c = np.linalg.lstsq(approx.reshape(-1, 1), h.ravel(), rcond=None)[0][0]
  expected = np.linalg.norm(h - c * approx) / np.linalg.norm(h)
  error = float(dg.scaled_frobenius_error(jnp.asarray(h), jnp.asarray(approx)))
  cosine = float(dg.cosine_similarity(jnp.asarray(h), jnp.asarray(approx)))
  assert error == pytest.approx(expected, rel=RTOL)
  assert error**2 == pytest.approx(1 - cosine**2, rel=1e-9)
  assert cosine == pytest.approx(np_cos(h, approx), rel=RTOL)


@pytest.mark.parametrize("m,n", SHAPES)
def test_t1_8_shampoo_factors_share_the_trace_of_h(m: int, n: int) -> None:
  rng = np.random.default_rng(18)
  grads, weights = random_grads(rng, m, n, "heavy"), rng.uniform(0, 1, 40)
  stats = dg.shampoo_stats(jnp.asarray(grads), jnp.asarray(weights))
  trace_h = np.trace(np_covariance(grads, weights))
  assert float(jnp.trace(stats.left)) == pytest.approx(trace_h, rel=RTOL)
  assert float(jnp.trace(stats.right)) == pytest.approx(trace_h, rel=RTOL)


# ---------------------------------------------------------------------------------------------
# T1.9: jit without recompilation, vmap over layers, float32.


def _jitted_functions(m: int, n: int) -> dict[str, tuple[Any, str]]:
  """Each public array function, jitted, with the kind of its arguments: H, (G, w) or (H, K)."""
  return {
    "rearrange": (jax.jit(functools.partial(dg.rearrange, m=m, n=n)), "h"),
    "optimal": (jax.jit(functools.partial(dg.optimal_kronecker, m=m, n=n)), "h"),
    "samples": (jax.jit(functools.partial(dg.samples_from_covariance, m=m, n=n)), "h"),
    "covariance": (jax.jit(dg.gradient_covariance), "gw"),
    "stats": (jax.jit(dg.shampoo_stats), "gw"),
    "root": (jax.jit(dg.shampoo_root), "gw"),
    "power": (jax.jit(lambda g, w: dg.kronecker_power_iteration(g, 5, w)), "gw"),
    "kl": (jax.jit(lambda g, w: dg.kl_fixed_point(g, 5, w)), "gw"),
    "cosines": (jax.jit(lambda g, w: dg.kronecker_cosines(dg.gradient_covariance(g), g, w)), "gw"),
    "cosine": (jax.jit(dg.cosine_similarity), "hk"),
    "error": (jax.jit(dg.scaled_frobenius_error), "hk"),
  }


def test_t1_9_jit_without_recompilation_and_vmap_over_layers() -> None:
  m, n, layers = 4, 3, 3
  rng = np.random.default_rng(19)
  grads = jnp.asarray(rng.standard_normal((layers, 10, m, n)))
  weights = jnp.asarray(rng.uniform(0.1, 1, (layers, 10)))
  h = jax.vmap(dg.gradient_covariance)(grads, weights)
  kron = jax.vmap(lambda g: dg.kronecker_product(dg.shampoo_stats(g)))(grads)
  arguments = {"h": (h,), "gw": (grads, weights), "hk": (h, kron)}
  for name, (fn, kind) in _jitted_functions(m, n).items():
    args = arguments[kind]
    batched = jax.vmap(fn)(*args)
    for layer in range(layers):
      single = fn(*(a[layer] for a in args))
      fn(*(a[layer] + 1.0 for a in args))  # new values, same shapes: no new compilation
      for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(single), strict=True):
        np.testing.assert_allclose(got[layer], want, rtol=1e-9, atol=1e-12, err_msg=name)
    assert fn._cache_size() == 1, name


def test_t1_9_gradient_helpers_jit_without_recompilation() -> None:
  rng = np.random.default_rng(25)
  inputs, labels = jnp.asarray(rng.standard_normal((8, 4))), jnp.asarray(rng.integers(0, 3, 8))
  helpers = {
    "per_example": jax.jit(lambda p: dg.per_example_grads(softmax_loss, p, inputs, labels)),
    "batch": jax.jit(lambda p: dg.batch_grads(softmax_loss, p, inputs, labels, 4)),
    "sampled": jax.jit(lambda p: dg.sample_labels(jax.random.key(1), linear_logits, p, inputs)),
    "fisher": jax.jit(lambda p: dg.fisher_grads(softmax_loss, linear_logits, p, inputs)),
  }
  for name, fn in helpers.items():
    for scale in (1.0, 2.0):
      fn({"w": jnp.asarray(scale * rng.standard_normal((4, 3)))})
    assert fn._cache_size() == 1, name


@pytest.mark.parametrize("m,n", SHAPES)
def test_t1_9_one_step_identity_in_float32(m: int, n: int) -> None:
  grads = random_grads(np.random.default_rng(20), m, n, "mixture", k=9).astype(np.float32)
  with jax.enable_x64(False):
    assert dg.shampoo_stats(jnp.asarray(grads)).left.dtype == jnp.float32
    check_one_step_is_shampoo_squared(grads, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# KL fixed point, EMA weights and gradient sources.


def np_kl_to_kronecker(h: np.ndarray, left: np.ndarray, right: np.ndarray) -> float:
  """min_c KL(𝒩(0, H) ‖ 𝒩(0, c·L⊗R)), the best scale c = tr(K⁻¹H)/d in closed form."""
  d = len(h)
  k = np.kron(left, right)
  c = np.trace(np.linalg.solve(k, h)) / d
  logdet_k, logdet_h = np.linalg.slogdet(c * k)[1], np.linalg.slogdet(h)[1]
  return 0.5 * (np.trace(np.linalg.solve(c * k, h)) - d + logdet_k - logdet_h)


@pytest.mark.parametrize("m,n", SHAPES)
def test_kl_fixed_point_solves_its_equations_and_minimises_kl(m: int, n: int) -> None:
  grads = random_grads(np.random.default_rng(21), m, n, "mixture", k=60)
  factors = kl_fixed_point(jnp.asarray(grads), num_iters=200, damping=0.0)
  left, right = np.asarray(factors.left), np.asarray(factors.right)
  expected_left = sum(g @ np.linalg.inv(right) @ g.T for g in grads) / (len(grads) * n)
  expected_right = sum(g.T @ np.linalg.inv(left) @ g for g in grads) / (len(grads) * m)
  np.testing.assert_allclose(left, expected_left, rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(right, expected_right, rtol=1e-8, atol=1e-12)
  h = np_covariance(grads)
  a, b = sum(g @ g.T for g in grads), sum(g.T @ g for g in grads)
  optimal = optimal_kronecker(jnp.asarray(h), m=m, n=n)
  kl_at_fixed_point = np_kl_to_kronecker(h, left, right)
  assert kl_at_fixed_point <= np_kl_to_kronecker(h, a, b) + 1e-10
  assert (
    kl_at_fixed_point
    <= np_kl_to_kronecker(h, np.asarray(optimal.left), np.asarray(optimal.right)) + 1e-10
  )


def test_ema_weights_match_the_recursion() -> None:
  rng = np.random.default_rng(22)
  grads, beta = rng.standard_normal((6, 3, 4)), 0.9
  ema = np.zeros((3, 3))
  for g in grads:
    ema = beta * ema + (1 - beta) * g @ g.T
  weights = dg.ema_weights(6, beta)
  np.testing.assert_allclose(dg.shampoo_stats(jnp.asarray(grads), weights).left, ema, rtol=RTOL)
  corrected = dg.ema_weights(6, beta, bias_correction=True)
  np.testing.assert_allclose(
    dg.shampoo_stats(jnp.asarray(grads), corrected).left, ema / (1 - beta**6), rtol=RTOL
  )


def softmax_loss(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
  return -jax.nn.log_softmax(x @ params["w"])[y]


def linear_logits(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  return x @ params["w"]


def np_softmax(z: np.ndarray) -> np.ndarray:
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_per_example_and_batch_grads_match_numpy() -> None:
  rng = np.random.default_rng(23)
  x, w, y = rng.standard_normal((12, 4)), rng.standard_normal((4, 3)), rng.integers(0, 3, 12)
  # ∇_W −log softmax(xW)_y = x (p − e_y)ᵀ.
  expected = np.einsum("ia,ic->iac", x, np_softmax(x @ w) - np.eye(3)[y])
  params = {"w": jnp.asarray(w)}
  got = per_example_grads(softmax_loss, params, jnp.asarray(x), jnp.asarray(y))["w"]
  np.testing.assert_allclose(got, expected, rtol=1e-10)
  batched = dg.batch_grads(softmax_loss, params, jnp.asarray(x), jnp.asarray(y), batch_size=5)["w"]
  np.testing.assert_allclose(batched, expected[:10].reshape(2, 5, 4, 3).mean(1), rtol=1e-10)


def test_fisher_grads_and_sampled_labels_give_the_fisher() -> None:
  rng = np.random.default_rng(24)
  x, w = rng.standard_normal((50, 3)), rng.standard_normal((3, 2))
  probs = np_softmax(x @ w)
  # Row-major vec of W (a, c): F = mean_i (x_i x_iᵀ) ⊗ (diag p_i − p_i p_iᵀ).
  fisher = (
    sum(
      np.kron(np.outer(xi, xi), np.diag(p) - np.outer(p, p)) for xi, p in zip(x, probs, strict=True)
    )
    / 50
  )
  params, inputs = {"w": jnp.asarray(w)}, jnp.asarray(x)
  grads, weights = dg.fisher_grads(softmax_loss, linear_logits, params, inputs)
  np.testing.assert_allclose(
    dg.gradient_covariance(grads["w"], weights), fisher, rtol=1e-10, atol=1e-14
  )
  repeated = jnp.tile(inputs, (400, 1))
  sampled = dg.sample_labels(jax.random.key(0), linear_logits, params, repeated)
  sampled_fisher = dg.gradient_covariance(
    per_example_grads(softmax_loss, params, repeated, sampled)["w"]
  )
  assert np_cos(np.asarray(sampled_fisher), fisher) > 0.999
  real = jnp.asarray(np.argmin(x @ w, axis=1))  # labels the model gets wrong: a poor fit
  empirical = dg.gradient_covariance(per_example_grads(softmax_loss, params, inputs, real)["w"])
  assert np_cos(np.asarray(empirical), fisher) < np_cos(np.asarray(sampled_fisher), fisher) - 0.01
