"""Faults: non-finite gradients, failed basis refreshes and degenerate gradients, every method.

* A NaN/Inf gradient under the default ``nonfinite="skip"`` gives a zero update, leaves every state
  leaf but ``skipped`` bit-for-bit unchanged, and the run then continues exactly as one that never
  saw it; ``nonfinite="propagate"`` lets the NaN through.
* A finite gradient whose square overflows the statistics (1e25, 1e30 in float32) would poison
  the state: it is skipped like a NaN one, and the run recovers.
* A refresh whose factors are not finite (set to NaN in the state) keeps the previous basis,
  counts one failure per block in ``basis_failures`` and the update stays finite.
* The skip test is made before the step: ``‖G_b‖²`` times the estimator's gain within the state
  dtype's range (checked against numpy, and KL's gain against the statistics it bounds); a
  direction that is non-finite from finite state is zeroed and counted.
* Zero, tiny (1e-30), huge (1e30), rank-1 (fixed or a new direction each call) and
  ill-conditioned gradients, and factors with eigenvalue ratio 1e12, give finite updates.

All runs are float32 with ``weight_decay=0`` (so a skipped call's update is exactly zero) and
``precondition_frequency=2``; one compiled ``update`` per method and option set is shared.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kl_precond as kp

pytestmark = pytest.mark.timeout(120)

METHODS = {
  "soap": kp.soap,
  "kl_soap": kp.kl_soap,
  "kl_shampoo": kp.kl_shampoo,
  "shampoo": kp.shampoo,
  "adamw_shampoo": kp.adamw_shampoo,
  "eigenvalue_corrected_shampoo": kp.eigenvalue_corrected_shampoo,
}
PARAMS = {"w": jnp.full((5, 3), 0.5), "b": jnp.full((3,), 0.5)}
STEPS = 6


@functools.cache
def _compiled(name, **options):
  options = {"weight_decay": 0.0, "precondition_frequency": 2, **options}
  tx = METHODS[name](1.0, **options)
  return tx, jax.jit(tx.update)


def _stream(steps=STEPS, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  return [
    {k: jnp.asarray(scale * rng.standard_normal(v.shape), jnp.float32) for k, v in PARAMS.items()}
    for _ in range(steps)
  ]


def _run(update, state, grads):
  updates = []
  for g in grads:
    u, state = update(g, state, PARAMS)
    updates.append(u)
  return updates, state


def _preconditioner_states(state):
  is_node = lambda n: isinstance(n, kp.PreconditionerState)  # noqa: E731
  return [n for n in jax.tree.leaves(state, is_leaf=is_node) if is_node(n)]


def _map_preconditioner(state, fn):
  is_node = lambda n: isinstance(n, kp.PreconditionerState)  # noqa: E731
  return jax.tree.map(lambda n: fn(n) if is_node(n) else n, state, is_leaf=is_node)


def _without_skipped(state):
  return _map_preconditioner(state, lambda n: n._replace(skipped=None))


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def _bad(grad, kind):
  if kind == "nan":
    return {**grad, "w": grad["w"].at[1, 2].set(jnp.nan)}
  return {**grad, "b": grad["b"].at[0].set(-jnp.inf)}


# (a) non-finite gradients ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("name", list(METHODS))
def test_nonfinite_gradient_is_skipped_and_forgotten(name, kind):
  tx, update = _compiled(name)
  grads = _stream()
  clean_updates, clean_state = _run(update, tx.init(PARAMS), grads)
  # The very first call (before the first basis), then calls on and off the refresh schedule
  # (every 2 calls; the counters of "init_only" and "identity" methods are one apart).
  for position in (0, 1, 2, 3):
    _, state = _run(update, tx.init(PARAMS), grads[:position])
    bad_update, after = update(_bad(grads[position], kind), state, PARAMS)
    for leaf in jax.tree.leaves(bad_update):
      np.testing.assert_array_equal(leaf, 0.0)
    (before_node,), (after_node,) = _preconditioner_states(state), _preconditioner_states(after)
    assert int(after_node.skipped) == int(before_node.skipped) + 1
    _assert_trees_equal(_without_skipped(after), _without_skipped(state))
    # The rest of the run is the uninterrupted run, bit for bit.
    later_updates, final = _run(update, after, grads[position:])
    for ours, clean in zip(later_updates, clean_updates[position:], strict=True):
      _assert_trees_equal(ours, clean)
    _assert_trees_equal(_without_skipped(final), _without_skipped(clean_state))
    assert int(_preconditioner_states(final)[0].skipped) == 1


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("name", list(METHODS))
def test_propagate_lets_nonfinite_values_through(name, kind):
  tx, update = _compiled(name, nonfinite="propagate")
  grads = _stream()
  _, state = _run(update, tx.init(PARAMS), grads[:3])
  bad_update, state = update(_bad(grads[3], kind), state, PARAMS)
  leaf = bad_update["w" if kind == "nan" else "b"]
  if kind == "nan":
    assert np.isnan(leaf).any()
  else:
    assert not np.isfinite(leaf).all()
  (node,) = _preconditioner_states(state)
  assert int(node.skipped) == 0
  assert int(node.count) == 4


# (b) failed basis refresh ------------------------------------------------------------------------


def _factored_blocks(node):
  """Blocks with at least one Kronecker factor (the bucket's leading axis)."""
  sizes = [
    next(b for b in bucket.basis.bases if b is not None).shape[0]
    for bucket in node.buckets
    if any(b is not None for b in bucket.basis.bases)
  ]
  return sum(sizes)


def _set_factors(state, make):
  """Replaces every Kronecker factor ``(batch, d, d)`` of the state by ``make(factor)``."""

  def replace(node):
    buckets = tuple(
      bucket._replace(
        estimator=bucket.estimator._replace(
          factors=tuple(None if f is None else make(f) for f in bucket.estimator.factors)
        )
      )
      for bucket in node.buckets
    )
    return node._replace(buckets=buckets)

  return _map_preconditioner(state, replace)


def _bases(node):
  """What a refresh decides: the basis state, and the roots Shampoo caches from it (stored
  instead of the bases, so a failed refresh must keep the previous roots)."""
  return [(bucket.basis, getattr(bucket.scaling, "roots", None)) for bucket in node.buckets]


def _failed_refresh_keeps_the_state(name, **options):
  # Every call after the first refreshes (``T = 1``), so the next call is a refresh.
  tx, update = _compiled(name, precondition_frequency=1, **options)
  grads = _stream()
  _, state = _run(update, tx.init(PARAMS), grads[:2])
  state = _set_factors(state, lambda f: jnp.full_like(f, jnp.nan))
  (before,) = _preconditioner_states(state)
  blocks = _factored_blocks(before)
  assert blocks >= 1
  for step in range(2, 5):
    out, state = update(grads[step], state, PARAMS)
    (after,) = _preconditioner_states(state)
    assert _finite(out)
    assert any(float(jnp.max(jnp.abs(x))) > 0 for x in jax.tree.leaves(out))
    _assert_trees_equal(_bases(after), _bases(before))  # the previous (finite) basis is kept
    assert int(after.basis_failures) == int(before.basis_failures) + blocks
    assert int(after.skipped) == 0
    assert int(after.count) == int(before.count) + 1
    before = after


@pytest.mark.parametrize("name", list(METHODS))
def test_nonfinite_refresh_keeps_the_basis_and_is_counted(name):
  _failed_refresh_keeps_the_state(name)


@pytest.mark.parametrize("name", ["shampoo", "adamw_shampoo"])
def test_nonfinite_refresh_with_stored_bases_keeps_them(name):
  """``store_bases=True``: the bases are restored and the roots rebuilt from them."""
  _failed_refresh_keeps_the_state(name, store_bases=True)


OVERFLOW = 1e25  # g² overflows float32 (max 3.4e38) in every factor entry


@pytest.mark.parametrize("name", list(METHODS))
def test_overflowing_gradient_is_skipped_like_a_nonfinite_one(name):
  """A finite gradient whose square overflows the factors would poison the state: skipped."""
  tx, update = _compiled(name, precondition_frequency=1)
  grads = _stream()
  _, state = _run(update, tx.init(PARAMS), grads[:3])
  (before,) = _preconditioner_states(state)
  huge = jax.tree.map(lambda g: g * OVERFLOW, grads[3])
  out, state = update(huge, state, PARAMS)
  (after,) = _preconditioner_states(state)
  for leaf in jax.tree.leaves(out):
    np.testing.assert_array_equal(leaf, 0.0)
  _assert_trees_equal(after.buckets, before.buckets)
  assert int(after.basis_failures) == int(before.basis_failures)
  assert int(after.skipped) == int(before.skipped) + 1
  assert int(after.count) == int(before.count)


@pytest.mark.parametrize("name", list(METHODS))
def test_state_recovers_after_one_overflowing_gradient(name):
  tx, update = _compiled(name)
  grads = _stream(steps=9)
  grads[3] = jax.tree.map(lambda g: g * OVERFLOW, grads[3])
  updates, state = _run(update, tx.init(PARAMS), grads)
  (node,) = _preconditioner_states(state)
  failures = int(node.basis_failures)
  more, state = _run(update, state, _stream(steps=2, seed=5))
  (node,) = _preconditioner_states(state)
  assert int(node.basis_failures) == failures  # the refreshes succeed again
  assert all(float(jnp.max(jnp.abs(leaf))) > 0 for leaf in jax.tree.leaves(more[-1]))
  assert all(float(jnp.max(jnp.abs(leaf))) < 1e3 for leaf in jax.tree.leaves(more[-1]))


# (c) degenerate gradients and ill-conditioned factors --------------------------------------------


def _rank_one(steps=STEPS):
  rng = np.random.default_rng(1)
  left, right = rng.standard_normal(5), rng.standard_normal(3)
  return [
    {
      "w": jnp.asarray(np.outer(left, right) * (1 + 0.2 * t), jnp.float32),
      "b": jnp.asarray(right * (1 - 0.1 * t), jnp.float32),
    }
    for t in range(steps)
  ]


def _random_rank_one(steps=STEPS):
  """A new rank-1 direction every call: each one leaves the span of the last refresh's factor."""
  rng = np.random.default_rng(3)
  return [
    {
      "w": jnp.asarray(np.outer(rng.standard_normal(5), rng.standard_normal(3)), jnp.float32),
      "b": jnp.asarray(rng.standard_normal(3), jnp.float32),
    }
    for _ in range(steps)
  ]


def _ill_conditioned(steps=STEPS):
  """``G = U diag(1, 1e-3, 1e-6) Vᵀ + tiny noise``: both factors have eigenvalue ratio ≥ 1e12."""
  rng = np.random.default_rng(2)
  left = np.linalg.qr(rng.standard_normal((5, 3)))[0]
  right = np.linalg.qr(rng.standard_normal((3, 3)))[0]
  singular = np.array([1.0, 1e-3, 1e-6])
  out = []
  for _ in range(steps):
    jitter = 1 + 0.1 * rng.standard_normal(3)
    w = left @ np.diag(singular * jitter) @ right.T
    out.append({"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(singular, jnp.float32)})
  return out


STREAMS = {
  "zero": lambda: [jax.tree.map(jnp.zeros_like, PARAMS)] * STEPS,
  "tiny_1e-30": lambda: _stream(scale=1e-30),
  "huge_1e30": lambda: _stream(scale=1e30),
  "rank_one": _rank_one,
  "random_rank_one": _random_rank_one,
  "ill_conditioned_1e12": _ill_conditioned,
}


@pytest.mark.parametrize("case", list(STREAMS))
@pytest.mark.parametrize("name", list(METHODS))
def test_degenerate_gradients_give_finite_updates(name, case):
  tx, update = _compiled(name)
  updates, state = _run(update, tx.init(PARAMS), STREAMS[case]())
  for t, u in enumerate(updates):
    assert _finite(u), f"call {t}: {u}"
  (node,) = _preconditioner_states(state)
  if case == "huge_1e30":
    # g² overflows float32: every call would poison the factors, so every call is skipped.
    assert int(node.skipped) == len(updates)
    for leaf in jax.tree.leaves(updates):
      np.testing.assert_array_equal(leaf, 0.0)
  else:
    assert int(node.skipped) == 0
  if case == "zero":
    for leaf in jax.tree.leaves(updates):
      np.testing.assert_array_equal(leaf, 0.0)
  if case in ("rank_one", "random_rank_one", "ill_conditioned_1e12"):
    assert int(node.basis_failures) == 0
    assert float(jnp.max(jnp.abs(updates[-1]["w"]))) > 0


def _spectrum_factor(factor):
  """A symmetric factor with eigenvalues ``logspace(0, -12)`` in a random basis (ratio 1e12)."""
  batch, dim = factor.shape[0], factor.shape[-1]
  rng = np.random.default_rng(dim)
  out = []
  for _ in range(batch):
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    values = np.logspace(0, -12, dim) if dim > 1 else np.ones(1)
    out.append((basis * values) @ basis.T)
  return jnp.asarray(np.stack(out), factor.dtype)


@pytest.mark.parametrize("name", list(METHODS))
def test_factor_with_eigenvalue_ratio_1e12_gives_finite_updates(name):
  tx, update = _compiled(name, precondition_frequency=1)
  grads = _stream()
  _, state = _run(update, tx.init(PARAMS), grads[:2])
  state = _set_factors(state, _spectrum_factor)
  for step in range(2, STEPS):
    out, state = update(grads[step], state, PARAMS)
    assert _finite(out), f"call {step}: {out}"
  (node,) = _preconditioner_states(state)
  assert int(node.basis_failures) == 0
  assert _finite([bucket.basis for bucket in node.buckets])


# (d) the range test that decides "skip" before the step ------------------------------------------

F32_MAX = float(np.finfo(np.float32).max)


@pytest.mark.parametrize(
  ("blocks", "gain", "expected"),
  [
    (np.ones((2, 3, 4)), 1.0, True),
    (np.full((1, 2, 2), 1e19), 1.0, False),  # ‖G‖² = 4e38 > float32 max, each g² = 1e38 is not
    (np.full((1, 2, 2), 9e18), 1.0, True),  # ‖G‖² = 3.24e38
    (np.full((2, 2, 2), 1e17), np.array([1.0, 1e5]), False),  # 4e34 · 1e5 for block 1
    (np.full((2, 2, 2), 1e17), np.array([1.0, 1e3]), True),
    (np.array([[[np.nan]]]), 1.0, False),
    (np.array([[[-np.inf]]]), 1.0, False),
  ],
)
def test_within_range_bounds_the_squared_norm_times_the_gain(blocks, gain, expected):
  """Against float64 numpy: ``‖G_b‖² · gain_b <= float32 max`` for every block."""
  ok = kp.tensor_ops.within_range(jnp.asarray(blocks, jnp.float32), gain, jnp.zeros(2))
  squares = np.sum(np.asarray(blocks, np.float64) ** 2, axis=(1, 2)) * np.asarray(gain)
  assert bool(ok) == expected == bool(np.all(squares <= F32_MAX))


def test_within_range_uses_the_narrowest_state_dtype():
  blocks = jnp.full((1, 2, 2), 200.0)  # ‖G‖² = 1.6e5 > float16 max 65504
  assert bool(kp.tensor_ops.within_range(blocks, 1.0, jnp.zeros(2, jnp.float32)))
  assert not bool(kp.tensor_ops.within_range(blocks, 1.0, jnp.zeros(2, jnp.float16)))


@pytest.mark.parametrize(
  "options",
  [
    {"eigenvalue_init": "constant", "clamp": "absolute", "init_factor": 1e-4},  # s = 100
    {"eigenvalue_init": "constant", "clamp": "relative", "init_factor": 1e-4},
    {},  # the default data start: no estimate before the first call, isotropic whitening
  ],
)
def test_kl_gain_bounds_every_statistic_of_an_update(options):
  """From the initial state, every factor entry and eigenvalue estimate written by one update
  is at most ``gain · ‖G‖²`` (checked in float64 after random warm-up steps)."""
  with jax.enable_x64():
    estimator = kp.kl(0.9, **options)
    rng = np.random.default_rng(3)
    shape, mask = (6, 4), (True, True)
    state = estimator.init(shape, mask, jnp.float64)
    bases = (jnp.eye(6, dtype=jnp.float64), jnp.eye(4, dtype=jnp.float64))
    for _ in range(4):
      grad = jnp.asarray(rng.standard_normal(shape))
      gain = float(estimator.gain(state))
      new = estimator.update(grad, state, bases)
      norm = float(np.sum(np.asarray(grad) ** 2))
      written = [
        np.asarray(f) - 0.9 * np.asarray(o) for f, o in zip(new.factors, state.factors, strict=True)
      ]
      # The estimates' EMA increments, ℓ_new - βℓ_old (ℓ = 0 where s = 0: no estimate yet).
      old, now = (
        [np.where(r != 0, 1 / np.where(r != 0, r, 1) ** 2, 0) for r in map(np.asarray, roots)]
        for roots in (state.inverse_roots, new.inverse_roots)
      )
      written += [n - 0.9 * o for n, o in zip(now, old, strict=True)]
      assert max(float(np.max(np.abs(w))) for w in written) <= gain * norm
      state = new


@pytest.mark.parametrize("name", ["kl_soap", "kl_shampoo"])
def test_kl_skips_a_gradient_its_whitening_could_overflow(name):
  """‖G‖² = 1.6e35 fits float32, but the authors' setting's gain (absolute clamp ceiling 10 per
  axis here: 1e4) does not: skipped, where SOAP (statistics at most ‖G‖²) accepts it. The
  default's gain comes from its estimates (``s ≈ 1`` after these gradients), so it accepts it
  too, and stays finite."""
  grads = _stream()
  big = {"w": jnp.full((5, 3), 1e17, jnp.float32), "b": jnp.zeros((3,), jnp.float32)}
  authors = {"eigenvalue_init": "constant", "clamp": "absolute"}
  for method, options, skipped in ((name, authors, 1), (name, {}, 0), ("soap", {}, 0)):
    tx, update = _compiled(method, precondition_frequency=1, **options)
    _, state = _run(update, tx.init(PARAMS), grads[:3])
    out, state = update(big, state, PARAMS)
    (node,) = _preconditioner_states(state)
    assert int(node.skipped) == skipped, method
    assert _finite(out) and _finite(state), method


@pytest.mark.parametrize("name", ["soap", "kl_soap"])
def test_a_nonfinite_direction_from_finite_state_is_zeroed_and_counted(name):
  """``eps = 0`` and a zero gradient: ``M / √V = 0/0``. The update is zero and counted in
  ``skipped``; the gradient itself was finite, so the statistics and the counter advance."""
  tx, update = _compiled(name, eps=0.0)
  state = tx.init(PARAMS)
  zeros = jax.tree.map(jnp.zeros_like, PARAMS)
  updates, state = _run(update, state, [zeros, zeros])
  (node,) = _preconditioner_states(state)
  for leaf in jax.tree.leaves(updates[-1]):
    np.testing.assert_array_equal(leaf, 0.0)
  assert int(node.skipped) == 1  # the first call is init-only: its update is zero anyway
  assert int(node.count) == 2


@pytest.mark.parametrize("name", ["kl_soap", "kl_shampoo"])
def test_a_data_start_with_zero_first_gradients_learns_from_the_first_nonzero_one(name):
  """A zero first gradient (a zero-initialised layer) leaves the default's estimates empty
  (``s = 0``: zero scaling); the first nonzero gradient is then taken as the estimate, and the
  steps after it move the matrix. The authors' constant start needs no such rule."""
  tx, update = _compiled(name)
  zeros = jax.tree.map(jnp.zeros_like, PARAMS)
  grads = [zeros, zeros, *_stream(4)]
  updates, state = _run(update, tx.init(PARAMS), grads)
  (node,) = _preconditioner_states(state)
  assert _finite(updates) and _finite(state)
  for out in updates[:2]:
    np.testing.assert_array_equal(out["w"], 0.0)
  assert all(float(jnp.max(jnp.abs(out["w"]))) > 0 for out in updates[3:])
  estimates = [r for b in node.buckets for r in b.estimator.inverse_roots if r is not None]
  assert estimates and all(bool(jnp.all(r > 0)) for r in estimates)
