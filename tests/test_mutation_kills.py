"""Targeted tests for the mutants the rest of the suite let survive (``tests/mutation/run.py``;
docs/reliability.md names the mutant each test kills). Each checks one stage or helper against an
expectation computed here in float64 NumPy from the definition in its docstring, or a property
that follows from it; all are unit-sized (no optimizer run)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kl_precond as kp
from kl_precond import _validation, basis, estimators, scaling, tensor_ops
from kl_precond import layout as layout_lib


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def test_kl_seed_scales_the_first_factor_and_reads_its_eigenvalues():
  """``seed``: ``k = mean(G₀²)^(-(m-1)/m)`` with ``mean(G₀²) = tr F_i / ((1-β) d_i)``; the
  factors come back as ``k F_i`` and the estimates as ``(diag(Q_iᵀ F_i Q_i) k / (1-β))^(-1/2)``
  (``"eigh"``, no clamp)."""
  rng = np.random.default_rng(0)
  beta, dims = 0.9, (4, 3)
  raw = [rng.standard_normal((d, d + 2)) for d in dims]
  factors = [r @ r.T for r in raw]
  bases = [np.linalg.qr(rng.standard_normal((d, d)))[0] for d in dims]
  est = estimators.kl(beta, eigenvalue_init="eigh", max_clamp_value=None)
  state = estimators.KLState(
    tuple(jnp.asarray(f) for f in factors), tuple(jnp.zeros((d,)) for d in dims)
  )
  out = est.seed(state, tuple(jnp.asarray(q) for q in bases))
  for f, q, new_f, new_s in zip(factors, bases, out.factors, out.inverse_roots, strict=True):
    mean_square = np.trace(f) / ((1 - beta) * f.shape[0])
    k = mean_square ** (-(2 - 1) / 2)
    np.testing.assert_allclose(new_f, k * f, rtol=1e-12)
    ell = np.diag(q.T @ f @ q) * k / (1 - beta)
    np.testing.assert_allclose(new_s, ell**-0.5, rtol=1e-12)


def test_kl_roots_scales_are_zero_where_an_eigenvalue_is_not_positive():
  """``λ^(-a)`` of the basis stage's eigenvalues, and ``0`` where ``λ <= 0`` (a PSD factor's
  rounding can give a tiny negative eigenvalue: it must not whiten with ``1`` or NaN)."""
  values = np.array([4.0, 0.5, 0.0, -1e-9, -2.0])
  scales = estimators.kl_roots(0.9, exponents=0.25)._scales((jnp.asarray(values), None), 2)
  expected = np.where(values > 0, np.where(values > 0, values, 1.0) ** -0.25, 0.0)
  np.testing.assert_allclose(scales[0], expected, rtol=1e-12)
  assert scales[1] is None


def _kl_order3_port(g, factors, roots, bases, *, beta, damping, from_data):
  """One ``KL.update`` of an order-3 block in float64 NumPy, from its docstring: the factors
  3 and 2 and ``s_3`` from the old estimates, ``s_2`` with the new ``s_3``, factor 1 and ``s_1``
  with the new ``s_2`` and the old ``s_3``; trace damping ``δ_i = damping Π_j τ_j / τ_i``,
  ``τ_j = mean(s_j²)`` of the old estimates; no clamp. With a data start an axis whose ``s`` is
  all zero is whitened by ``a^(-1/2)``, ``a³ = mean(G²)``, and takes its target as estimate."""
  shape, numel = g.shape, g.size
  p = g
  for j in range(3):
    p = np.moveaxis(np.tensordot(bases[j].T, np.moveaxis(p, j, 0), axes=1), 0, j)
  tau = [np.mean(s**2) for s in roots]
  delta = [damping * np.prod(tau) / tau[i] if tau[i] > 0 else 0.0 for i in range(3)]
  iso = np.mean(g**2) ** (-1 / 6)

  def whiten(scales):
    return [np.full(s.shape, iso) if from_data and not s.any() else s for s in scales]

  def view(v, j):
    return v.reshape([-1 if k == j else 1 for k in range(3)])

  def factor(axis, scales):
    y = g
    for j in range(3):
      if j != axis:
        y = np.moveaxis(
          np.tensordot((bases[j] * scales[j][None, :]).T, np.moveaxis(y, j, 0), 1), 0, j
        )
    unfolded = np.moveaxis(y, axis, 0).reshape(shape[axis], -1)
    return beta * factors[axis] + (1 - beta) * shape[axis] / numel * unfolded @ unfolded.T

  def root(axis, scales, own):
    scaled = p
    for j in range(3):
      if j != axis:
        scaled = scaled * view(scales[j], j)
    target = np.mean(np.moveaxis(scaled, axis, 0).reshape(shape[axis], -1) ** 2, axis=1)
    target = target + delta[axis]
    if from_data and not own.any():
      return target**-0.5
    ell = 1 / own**2
    return (ell + (1 - beta) * (target - ell)) ** -0.5

  old = list(roots)
  new_f, new_s = list(factors), list(roots)
  new_f[2] = factor(2, whiten(old))
  new_f[1] = factor(1, whiten(old))
  new_s[2] = root(2, whiten(old), old[2])
  new_s[1] = root(1, whiten([old[0], old[1], new_s[2]]), old[1])
  mixed = [old[0], new_s[1], old[2]]
  new_f[0] = factor(0, whiten(mixed))
  new_s[0] = root(0, whiten(mixed), old[0])
  return new_f, new_s


@pytest.mark.parametrize(
  ("init", "damping", "unseeded"),
  [("constant", 0.03, ()), ("trace", 0.0, (0, 1, 2)), ("trace", 0.02, (1,))],
  ids=["damped", "data-start-unseeded", "data-start-one-unseeded-damped"],
)
def test_kl_order3_update_matches_a_numpy_port(init, damping, unseeded):
  """Order 3 (the reference's sequential mode order) with trace damping, and with a data start
  whose estimates are not yet seeded (``first_call="identity"``, a zero first gradient)."""
  rng = np.random.default_rng(3)
  shape, beta = (4, 3, 5), 0.8
  g = rng.standard_normal(shape)
  factors = []
  for d in shape:
    a = rng.standard_normal((d, d))
    factors.append(a @ a.T)
  roots = [np.zeros(d) if i in unseeded else rng.uniform(0.5, 2.0, d) for i, d in enumerate(shape)]
  bases = [np.linalg.qr(rng.standard_normal((d, d)))[0] for d in shape]
  est = estimators.kl(beta, eigenvalue_init=init, max_clamp_value=None, damping=damping)
  state = estimators.KLState(
    tuple(jnp.asarray(f) for f in factors), tuple(jnp.asarray(s) for s in roots)
  )
  out = est.update(jnp.asarray(g), state, tuple(jnp.asarray(q) for q in bases), step=5)
  want_f, want_s = _kl_order3_port(
    g, factors, roots, bases, beta=beta, damping=damping, from_data=init != "constant"
  )
  for axis in range(3):
    np.testing.assert_allclose(out.factors[axis], want_f[axis], rtol=1e-10, err_msg=f"F{axis}")
    np.testing.assert_allclose(
      out.inverse_roots[axis], want_s[axis], rtol=1e-10, err_msg=f"s{axis}"
    )


def test_kl_update_held_at_the_first_fold_changes_nothing():
  """A held call (``hold`` set: a skipped gradient) leaves the state unchanged, also at the
  data start's first fold (``step == 1``, where the factors would be multiplied by ``k``)."""
  rng = np.random.default_rng(4)
  g = rng.standard_normal((4, 3))
  factors = []
  for d in (4, 3):
    a = rng.standard_normal((d, d))
    factors.append(a @ a.T)
  state = estimators.KLState(
    tuple(jnp.asarray(f) for f in factors),
    (jnp.asarray(rng.uniform(0.5, 2, 4)), jnp.asarray(rng.uniform(0.5, 2, 3))),
  )
  bases = (jnp.eye(4), jnp.eye(3))
  for init in ("trace", "eigh"):
    est = estimators.kl(0.9, eigenvalue_init=init)
    out = est.update(jnp.zeros((4, 3)), state, bases, hold=jnp.asarray(True), step=1)
    for new, old in zip(
      out.factors + out.inverse_roots, state.factors + state.inverse_roots, strict=True
    ):
      np.testing.assert_array_equal(new, old)
  del g


def test_eigenvalue_floor_shifts_the_spectrum_up_to_the_floor():
  """Distributed Shampoo's shift: if ``λ_min < floor``, ``λ ← λ - λ_min + floor``, else as is."""
  refresh = basis.eigh_every(1, eigenvalue_floor=0.25)
  for values in ([-0.5, 0.2, 3.0], [0.1, 0.2, 3.0], [0.3, 1.0, 2.0]):
    v = np.array(values)
    expected = v - v.min() + 0.25 if v.min() < 0.25 else v
    np.testing.assert_allclose(refresh._floor(jnp.asarray(v), jnp.float64), expected, rtol=1e-12)


def test_converged_is_the_off_diagonal_norm_against_the_tolerance():
  """``‖B - diag(B)‖_F <= tolerance · ‖B‖_F``, on both sides of the threshold."""
  rng = np.random.default_rng(8)
  for off in (0.05, 0.05, 1.0, 5.0):  # near-diagonal, and mostly off-diagonal (tolerance near 1)
    noise = off * rng.standard_normal((4, 4))
    noise = noise + noise.T - 2 * np.diag(np.diag(noise))
    b = np.diag(rng.uniform(0.5, 1.5, 4)) + noise
    ratio = np.linalg.norm(b - np.diag(np.diag(b))) / np.linalg.norm(b)
    for tolerance in (0.5 * ratio, 0.999 * ratio, min(1.0, 1.001 * ratio)):
      assert bool(basis._diagonal_to(jnp.asarray(b), tolerance)) == (ratio <= tolerance)


def test_relative_ridge_adds_the_largest_eigenvalue_times_the_ridge():
  """``F + ρ λ_max(F) I`` with ``relative_ridge``, ``F + ρ I`` without (also the QR algorithm's
  refresh, which has no such option)."""
  rng = np.random.default_rng(9)
  a = rng.standard_normal((5, 5))
  f = a @ a.T
  top = np.linalg.eigvalsh(f).max()
  relative = basis.eigh_every(1, ridge=0.01, relative_ridge=True)._ridged(jnp.asarray(f))
  np.testing.assert_allclose(relative, f + 0.01 * top * np.eye(5), rtol=1e-12)
  for plain in (basis.eigh_every(1, ridge=0.01), basis.qr_algorithm_every(1, ridge=0.01)):
    np.testing.assert_allclose(plain._ridged(jnp.asarray(f)), f + 0.01 * np.eye(5), rtol=1e-12)


def test_kronecker_eigenvalues_default_exponent_is_one_half():
  """``kronecker_eigenvalues()``: ``P = ⊗_i λ_i^(-1/2)`` by default (KL-Shampoo's power),
  here with ``eps=0`` so that ``"outside"`` adds nothing."""
  left, right = np.array([4.0, 0.25, 2.0]), np.array([9.0, 1.0])
  stage = scaling.kronecker_eigenvalues(eps=0.0)
  powers = stage._powers((jnp.asarray(left), jnp.asarray(right)), (3, 2))
  np.testing.assert_allclose(powers, np.outer(left**-0.5, right**-0.5), rtol=1e-12)


@pytest.mark.parametrize("name", ["soap", "kl_shampoo"])
def test_an_empty_tree_is_not_a_skipped_call(name):
  """No parameters, no gradient to be out of range: the call counts, none is skipped."""
  tx = getattr(kp, name)()
  state = tx.init({})
  for _ in range(2):
    updates, state = tx.update({}, state, {})
  assert updates == {}
  found = [s for s in jax.tree.leaves(state, is_leaf=_is_chassis) if _is_chassis(s)]
  assert len(found) == 1
  assert int(found[0].skipped) == 0 and int(found[0].count) == 2


def _is_chassis(x):
  return hasattr(x, "skipped") and hasattr(x, "count")


def test_filtered_gradient_look_ahead_matches_its_formula():
  """With ``b3``: ``Ḡ = (M_{t-1} + (1-β₃)(G - M_{t-1})) / (1 - β₃β₁^{t-1})`` and
  ``M = M_{t-1} + (1-β₁)(G - M_{t-1})``."""
  rng = np.random.default_rng(10)
  old, grad = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
  b1, b3, t = 0.9, 0.7, 4
  mu, moment = tensor_ops.filtered_gradient(
    jnp.asarray(old), jnp.asarray(grad), b1, jnp.asarray(t), b3=b3
  )
  np.testing.assert_allclose(mu, old + (1 - b1) * (grad - old), rtol=1e-12)
  expected = (old + (1 - b3) * (grad - old)) / (1 - b3 * b1 ** (t - 1))
  np.testing.assert_allclose(moment, expected, rtol=1e-12)


@pytest.mark.parametrize("value", [{2: (2,)}, {1: (1,)}, {3: (0, 3)}])
def test_an_axis_equal_to_the_order_is_refused(value):
  """``unfactored_axes``: axes of a block of order ``k`` are ``0 <= a < k``."""
  with pytest.raises(ValueError, match="unfactored_axes"):
    _validation.check_axes_per_order("unfactored_axes", value)
  _validation.check_axes_per_order("unfactored_axes", {k: (k - 1,) for k in value})


def test_layout_records_are_frozen_and_hashable():
  """``LayoutConfig`` (a static option), ``TensorLayout``, ``Block`` and ``Bucket`` are immutable values: equal
  ones hash alike (so they can be static arguments of ``jax.jit``) and none can be assigned to."""
  config = kp.LayoutConfig(8)
  assert hash(config) == hash(kp.LayoutConfig(8))
  tensor = layout_lib.tensor_layout((3, 20), config)
  tree = layout_lib.tree_layout({"w": jnp.zeros((3, 20))}, config)
  records = [config, tensor, *tensor.blocks, *tree.buckets]
  for record in records:
    assert dataclasses.is_dataclass(record)
    hash(record)
    field = dataclasses.fields(record)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
      setattr(record, field, None)


def test_first_call_precondition_builds_the_basis_once():
  """``first_call="precondition"``: the first call decomposes its factors; a later call before
  the refresh period keeps that basis (it is not a first call again)."""
  stages = (kp.frobenius(0.9), kp.qr_every(100), kp.adam(0.9, 0.99, 1e-8))
  tx = kp.scale_by_preconditioner(*stages, first_call="precondition")
  rng = np.random.default_rng(12)
  params = {"w": jnp.zeros((4, 3))}
  state = tx.init(params)
  bases = []
  for _ in range(3):
    grad = {"w": jnp.asarray(rng.standard_normal((4, 3)))}
    _, state = tx.update(grad, state, params)
    bases.append([np.asarray(b) for b in state.buckets[0].basis.bases if b is not None])
  assert int(state.count) == 3
  for later in bases[1:]:
    for first, now in zip(bases[0], later, strict=True):
      np.testing.assert_array_equal(now, first)
