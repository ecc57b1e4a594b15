"""SOAP, KL-SOAP and KL-Shampoo against the independent float64 NumPy reference, stage by stage."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kl_precond as kp
from kl_precond import basis as basis_lib
from kl_precond import estimators, tensor_ops
from tests import numpy_reference as ref


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _stream(shape, steps, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(shape) * (1 + 0.3 * t) for t in range(steps)]


def _run(tx, grads):
  state = tx.init({"w": jnp.zeros(grads[0].shape)})
  update = jax.jit(tx.update)
  out = []
  for g in grads:
    u, state = update({"w": jnp.asarray(g)}, state)
    out.append(np.asarray(u["w"]))
  return out, state


def _assert_close(ours, theirs, rtol=1e-9):
  scale = max(np.max(np.abs(t)) for t in theirs)
  for t, (a, b) in enumerate(zip(ours, theirs, strict=True)):
    np.testing.assert_allclose(a, b, atol=rtol * scale, rtol=0, err_msg=f"call {t}")


@pytest.mark.parametrize("shape", [(6, 6), (3, 4, 5)])
@pytest.mark.parametrize("sort", [True, False])
def test_soap_matches_numpy(shape, sort):
  grads = _stream(shape, 12)
  settings = dict(b1=0.9, b2=0.95, eps=1e-8, every=3)
  tx = kp.scale_by_soap(
    0.9, 0.95, 1e-8, shampoo_beta=0.8, precondition_frequency=3, sort_basis=sort
  )
  ours, _ = _run(tx, grads)
  theirs = ref.soap_reference(grads, beta=0.8, sort=sort, **settings)
  _assert_close(ours, theirs)


def test_soap_identity_axis_and_no_bias_correction_match_numpy():
  grads = _stream((20, 4), 10, seed=1)
  tx = kp.scale_by_soap(
    0.9, 0.99, 1e-6, precondition_frequency=2, max_precond_dim=10, bias_correction=False
  )
  ours, _ = _run(tx, grads)
  theirs = ref.soap_reference(
    grads,
    b1=0.9,
    b2=0.99,
    eps=1e-6,
    beta=0.99,
    every=2,
    sort=True,
    bias_correction=False,
    factored=[False, True],
  )
  _assert_close(ours, theirs)


@pytest.mark.parametrize(
  ("shape", "max_dim", "merge", "work", "factored"),
  [((6, 5), 6, False, (6, 5), None), ((2, 3, 10), 6, True, (6, 10), [True, False])],
)
def test_soap_at_max_precond_dim_matches_numpy(shape, max_dim, merge, work, factored):
  # An axis (or merged product: 2·3 = 6) of exactly max_precond_dim is rotated, as upstream SOAP
  # does; the 10-axis is longer and is not. (Factors of full rank from the first call, up to a
  # one-dimensional null space, whose basis is unique up to a sign that Adam does not see.)
  grads = _stream(shape, 7, seed=4)
  tx = kp.scale_by_soap(
    0.9, 0.95, 1e-8, precondition_frequency=3, max_precond_dim=max_dim, merge_small_dims=merge
  )
  ours, _ = _run(tx, grads)
  theirs = ref.soap_reference(
    [g.reshape(work) for g in grads],
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    beta=0.95,
    every=3,
    sort=True,
    factored=factored,
  )
  _assert_close(ours, [t.reshape(shape) for t in theirs])


def test_soap_1d_is_adam_after_the_first_call():
  grads = _stream((7,), 6, seed=2)
  ours, _ = _run(kp.scale_by_soap(0.9, 0.99, 1e-8), grads)
  m = v = np.zeros(7)
  np.testing.assert_array_equal(ours[0], 0)
  for t, g in enumerate(grads[1:], start=1):
    m, v = 0.9 * m + 0.1 * g, 0.99 * v + 0.01 * g**2
    expected = m / (np.sqrt(v) + 1e-8) * np.sqrt(1 - 0.99**t) / (1 - 0.9**t)
    np.testing.assert_allclose(ours[t], expected, rtol=1e-12)


# (eigenvalue_init, clamp): the authors' setting and the defaults in the default suite; the
# other starts, and the data start under the absolute clamp, in the slow job.
KL_SETTINGS = [
  ("constant", "absolute"),
  ("eigh", "relative"),
  pytest.param("trace", "relative", marks=pytest.mark.slow),
  pytest.param("debiased", "relative", marks=pytest.mark.slow),
  pytest.param("eigh", "absolute", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("shape", [(6, 6), (3, 4, 5)])
@pytest.mark.parametrize("klsoap", [True, False])
@pytest.mark.parametrize("start, clamp", KL_SETTINGS)
def test_kl_methods_match_numpy(shape, klsoap, start, clamp):
  grads = _stream(shape, 12, seed=3)
  factory = kp.scale_by_kl_soap if klsoap else kp.scale_by_kl_shampoo
  tx = factory(
    0.9,
    0.95,
    1e-3,
    shampoo_beta=0.85,
    precondition_frequency=3,
    max_clamp_value=50.0,
    eigenvalue_init=start,
    clamp=clamp,
  )
  ours, _ = _run(tx, grads)
  theirs = ref.kl_reference(
    grads,
    b1=0.9,
    b2=0.95,
    eps=1e-3,
    beta=0.85,
    every=3,
    klsoap=klsoap,
    cap=50.0,
    start=start,
    clamp=clamp,
  )
  _assert_close(ours, theirs)


def test_kl_defaults_are_the_data_start_and_relative_clamp():
  grads = _stream((5, 4), 8, seed=12)
  ours, _ = _run(kp.scale_by_kl_shampoo(precondition_frequency=2), grads)
  theirs = ref.kl_reference(
    grads, b1=0.9, b2=0.98, eps=1e-8, beta=0.98, every=2, klsoap=False, start="eigh",
    clamp="relative",
  )  # fmt: skip
  _assert_close(ours, theirs)


def test_kl_clamping_is_active_and_matches_numpy():
  # Tiny gradients drive the eigenvalue estimates down, so s = ℓ^(-1/2) hits the clamp.
  grads = [g * 1e-3 for g in _stream((6, 6), 10, seed=4)]
  tx = kp.scale_by_kl_shampoo(
    0.9,
    0.95,
    1e-8,
    shampoo_beta=0.5,
    precondition_frequency=2,
    max_clamp_value=100.0,
    eigenvalue_init="constant",
    clamp="absolute",
  )
  ours, state = _run(tx, grads)
  theirs = ref.kl_reference(
    grads, b1=0.9, b2=0.95, eps=1e-8, beta=0.5, every=2, klsoap=False, cap=100.0
  )
  _assert_close(ours, theirs)
  roots = state.buckets[0].estimator.inverse_roots
  assert max(float(jnp.max(r)) for r in roots) == pytest.approx(10.0)  # max(10, min(6, 100))


def test_kl_relative_clamp_is_active_and_matches_numpy():
  # One direction of the gradients is 1e-4 times the others: its estimate hits the floor
  # max ℓ / κ², so s_max / s_min = κ = max(10, min(6, 100)) on that axis.
  rng = np.random.default_rng(13)
  grads = [np.diag([1, 1, 1, 1, 1, 1e-4]) @ rng.standard_normal((6, 6)) for _ in range(10)]
  tx = kp.scale_by_kl_shampoo(
    0.9, 0.95, 1e-8, shampoo_beta=0.5, precondition_frequency=2, max_clamp_value=100.0
  )
  ours, state = _run(tx, grads)
  theirs = ref.kl_reference(
    grads, b1=0.9, b2=0.95, eps=1e-8, beta=0.5, every=2, klsoap=False, cap=100.0,
    start="eigh", clamp="relative",
  )  # fmt: skip
  _assert_close(ours, theirs)
  left = np.asarray(state.buckets[0].estimator.inverse_roots[0])
  assert np.max(left) / np.min(left) == pytest.approx(10.0)


def test_frobenius_stage_matches_numpy():
  rng = np.random.default_rng(5)
  g, f0 = rng.standard_normal((3, 4, 5)), rng.standard_normal((4, 4))
  est = estimators.frobenius(0.7)
  state = est.init((3, 4, 5), (False, True, True), jnp.float64)
  state = state._replace(factors=(None, jnp.asarray(f0), state.factors[2]))
  new = est.update(jnp.asarray(g), state, (None, None, None))
  np.testing.assert_allclose(
    new.factors[1], 0.7 * f0 + 0.3 * ref.unfold(g, 1) @ ref.unfold(g, 1).T, rtol=1e-12
  )
  np.testing.assert_allclose(
    new.factors[2], 0.3 * ref.unfold(g, 2) @ ref.unfold(g, 2).T, rtol=1e-12
  )
  assert new.factors[0] is None


def test_kl_stage_2d_matches_formula():
  rng = np.random.default_rng(6)
  m, n, beta = 5, 4, 0.9
  g = rng.standard_normal((m, n))
  q_left = np.linalg.qr(rng.standard_normal((m, m)))[0]
  q_right = np.linalg.qr(rng.standard_normal((n, n)))[0]
  s_left, s_right = rng.uniform(0.5, 2, m), rng.uniform(0.5, 2, n)
  est = estimators.kl(beta, max_clamp_value=None)
  state = estimators.KLState((jnp.eye(m), jnp.eye(n)), (jnp.asarray(s_left), jnp.asarray(s_right)))
  new = est.update(jnp.asarray(g), state, (jnp.asarray(q_left), jnp.asarray(q_right)))
  inv_right = q_right @ np.diag(s_right**2) @ q_right.T
  inv_left = q_left @ np.diag(s_left**2) @ q_left.T
  delta_left = g @ inv_right @ g.T / n
  delta_right = g.T @ inv_left @ g / m
  np.testing.assert_allclose(new.factors[0], beta * np.eye(m) + (1 - beta) * delta_left, rtol=1e-12)
  np.testing.assert_allclose(
    new.factors[1], beta * np.eye(n) + (1 - beta) * delta_right, rtol=1e-12
  )
  ell_left = beta / s_left**2 + (1 - beta) * np.diag(q_left.T @ delta_left @ q_left)
  ell_right = beta / s_right**2 + (1 - beta) * np.diag(q_right.T @ delta_right @ q_right)
  np.testing.assert_allclose(new.inverse_roots[0], ell_left**-0.5, rtol=1e-12)
  np.testing.assert_allclose(new.inverse_roots[1], ell_right**-0.5, rtol=1e-12)


def test_kl_damping_adds_trace_term():
  rng = np.random.default_rng(7)
  g = rng.standard_normal((4, 3))
  s = (jnp.asarray(rng.uniform(0.5, 2, 4)), jnp.asarray(rng.uniform(0.5, 2, 3)))
  state = estimators.KLState((jnp.eye(4), jnp.eye(3)), s)
  bases = (jnp.eye(4), jnp.eye(3))
  plain = estimators.kl(0.9, max_clamp_value=None).update(jnp.asarray(g), state, bases)
  damped = estimators.kl(0.9, max_clamp_value=None, damping=0.01).update(
    jnp.asarray(g), state, bases
  )
  for axis in range(2):
    other = float(jnp.mean(s[1 - axis] ** 2))
    ell_plain = 1 / np.asarray(plain.inverse_roots[axis]) ** 2
    ell_damped = 1 / np.asarray(damped.inverse_roots[axis]) ** 2
    np.testing.assert_allclose(ell_damped - ell_plain, 0.1 * 0.01 * other, rtol=1e-9)


def test_qr_refresh_sorts_and_reports_the_permutation():
  rng = np.random.default_rng(8)
  a = rng.standard_normal((5, 5))
  factor = a @ a.T
  basis = np.linalg.qr(rng.standard_normal((5, 5)))[0]
  stage = basis_lib.qr_every(1, sort=True)
  state = basis_lib.BasisState((jnp.asarray(basis),), (None,))
  new, perms, failed = stage.refresh((jnp.asarray(factor),), state)
  order = np.argsort(-np.diag(basis.T @ factor @ basis), kind="stable")
  np.testing.assert_array_equal(perms[0], order)
  expected = np.linalg.qr(factor @ basis[:, order])[0]
  np.testing.assert_allclose(np.abs(new.bases[0]), np.abs(expected), atol=1e-12)
  assert not bool(failed)


def test_eigh_refresh_is_descending_and_keeps_eigenvalues():
  rng = np.random.default_rng(9)
  a = rng.standard_normal((6, 6))
  factor = a @ a.T
  stage = basis_lib.eigh_every(2)
  new = stage.first((jnp.asarray(factor),), stage.init((6,), (True,), jnp.float64))
  values = np.linalg.eigvalsh(factor)[::-1]
  np.testing.assert_allclose(new.eigenvalues[0], values, rtol=1e-10)
  q = np.asarray(new.bases[0])
  np.testing.assert_allclose(q.T @ factor @ q, np.diag(values), atol=1e-9)


def test_refresh_with_nonfinite_factor_keeps_old_basis():
  stage = basis_lib.qr_every(1)
  old = basis_lib.BasisState((jnp.eye(3),), (None,))
  bad = jnp.full((3, 3), jnp.nan)
  new, _, failed = stage.refresh((bad,), old)
  np.testing.assert_array_equal(new.bases[0], np.eye(3))
  assert bool(failed)


def test_adam_stage_rotation_round_trips_the_first_moment():
  rng = np.random.default_rng(10)
  mu = jnp.asarray(rng.standard_normal((4, 3)))
  old = (jnp.asarray(np.linalg.qr(rng.standard_normal((4, 4)))[0]), None)
  new = (jnp.asarray(np.linalg.qr(rng.standard_normal((4, 4)))[0]), None)
  stage = kp.adam()
  state = stage.rotate(kp.AdamState(mu, mu**2), old, new, (jnp.asarray([3, 2, 1, 0]), None))
  in_param_space = tensor_ops.unproject(mu, old)
  np.testing.assert_allclose(tensor_ops.unproject(state.mu, new), in_param_space, atol=1e-12)
  np.testing.assert_array_equal(state.nu, (mu**2)[::-1])


def test_kronecker_scaling_inside_matches_matrix_roots():
  rng = np.random.default_rng(11)
  g = rng.standard_normal((4, 3))
  left, right = rng.standard_normal((4, 4)), rng.standard_normal((3, 3))
  left, right = left @ left.T, right @ right.T
  wl, ql = np.linalg.eigh(left)
  wr, qr = np.linalg.eigh(right)
  stage = kp.kronecker_eigenvalues(0.0, 1e-3, exponents=(0.25, 0.25), eps_placement="inside")
  u, _ = stage.update(
    jnp.asarray(g),
    stage.init((4, 3), (True, True), jnp.float64),
    (jnp.asarray(ql), jnp.asarray(qr)),
    (jnp.asarray(wl), jnp.asarray(wr)),
    jnp.asarray(1),
  )

  def root(m, w, q):
    return q @ np.diag((w + 1e-3) ** -0.25) @ q.T

  np.testing.assert_allclose(u, root(left, wl, ql) @ g @ root(right, wr, qr), rtol=1e-10)


@pytest.mark.parametrize("name", ["soap", "kl_shampoo"])
def test_normalize_grads_divides_each_tensor_by_its_own_rms(name):
  # SOAP's option: ``u / (1e-30 + mean(u²)^½)`` per tensor, written here from its definition.
  factory = {"soap": kp.scale_by_soap, "kl_shampoo": kp.scale_by_kl_shampoo}[name]
  rng = np.random.default_rng(12)
  params = {"w": jnp.zeros((6, 5)), "v": jnp.zeros((3, 4))}
  stream = [
    {
      "w": jnp.asarray(rng.standard_normal((6, 5))),
      "v": jnp.asarray(5 * rng.standard_normal((3, 4))),
    }
    for _ in range(7)
  ]

  def run(normalize):
    tx = factory(0.9, 0.95, 1e-8, precondition_frequency=3, normalize_grads=normalize)
    state, update, out = tx.init(params), jax.jit(tx.update), []
    for g in stream:
      u, state = update(g, state)
      out.append({k: np.asarray(x) for k, x in u.items()})
    return out

  plain, normalized = run(False), run(True)
  rms = [np.sqrt(np.mean(u[k] ** 2)) for u in plain for k in u]
  assert max(abs(r - 1) for r in rms) > 0.5  # the option has something to do
  for t, (ours, raw) in enumerate(zip(normalized, plain, strict=True)):
    for key in raw:
      expected = raw[key] / (1e-30 + np.sqrt(np.mean(raw[key] ** 2)))
      np.testing.assert_allclose(ours[key], expected, rtol=1e-12, atol=0, err_msg=f"{t} {key}")
