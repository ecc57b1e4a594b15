"""Invariances of the chassis and the optax/Flax integration, for every method."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import kl_precond as kp
from kl_precond import layout as layout_lib
from kl_precond import tensor_ops
from tests import hlo

SCALE_BY = {
  "soap": kp.scale_by_soap,
  "kl_soap": kp.scale_by_kl_soap,
  "kl_shampoo": kp.scale_by_kl_shampoo,
}
OPTIMIZERS = {"soap": kp.soap, "kl_soap": kp.kl_soap, "kl_shampoo": kp.kl_shampoo}


def _grads(params, steps, seed=0):
  keys = jax.random.split(jax.random.key(seed), steps)
  out = []
  for key in keys:
    leaves, treedef = jax.tree.flatten(params)
    subkeys = jax.random.split(key, len(leaves))
    out.append(
      treedef.unflatten(
        [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(subkeys, leaves, strict=True)]
      )
    )
  return out


def _run(tx, params, grads):
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for g in grads:
    u, state = update(g, state, params)
    out.append(u)
  return out, state


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize("name", sorted(SCALE_BY))
def test_stacked_tree_equals_per_tensor_runs(name, x64):
  del x64
  params = {
    "a": jnp.zeros((6, 6)),
    "b": jnp.zeros((6, 6)),
    "c": jnp.zeros((3, 4, 5)),
    "d": jnp.zeros((7,)),
    "e": jnp.zeros((20, 6)),
  }
  grads = _grads(params, 8)
  tx = SCALE_BY[name](precondition_frequency=3, max_precond_dim=10)
  joint, _ = _run(tx, params, grads)
  for key in params:
    alone, _ = _run(tx, {key: params[key]}, [{key: g[key]} for g in grads])
    for t in range(len(grads)):
      np.testing.assert_allclose(joint[t][key], alone[t][key], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", sorted(SCALE_BY))
def test_nested_pytree_equals_single_array(name):
  w = jnp.zeros((5, 4))
  grads = _grads(w, 6, seed=1)
  tx = SCALE_BY[name](precondition_frequency=2)
  single, _ = _run(tx, w, grads)
  nested, _ = _run(tx, {"x": {"y": [w]}}, [{"x": {"y": [g]}} for g in grads])
  for a, b in zip(single, nested, strict=True):
    np.testing.assert_array_equal(a, b["x"]["y"][0])


def _hand_built(scaling, estimator, basis, fallback=None, lr=1e-2, wd=0.01):
  return optax.chain(
    kp.scale_by_preconditioner(estimator, basis, scaling, fallback=fallback),
    optax.add_decayed_weights(wd),
    optax.scale_by_learning_rate(lr),
  )


def _assert_same_trajectory(tx_a, tx_b, params, steps=7):
  grads = _grads(params, steps, seed=2)
  a, _ = _run(tx_a, params, grads)
  b, _ = _run(tx_b, params, grads)
  for x, y in zip(a, b, strict=True):
    jax.tree.map(np.testing.assert_array_equal, x, y)


PARAMS = {"w": jnp.ones((6, 4)), "b": jnp.ones((4,)), "t": jnp.ones((2, 3, 4))}


def test_soap_equals_its_hand_built_chain():
  tx = kp.soap(1e-2, 0.9, 0.95, 1e-8, 0.01, precondition_frequency=3)
  hand = _hand_built(kp.adam(0.9, 0.95, 1e-8), kp.frobenius(0.95), kp.qr_every(3, sort=True))
  _assert_same_trajectory(tx, hand, PARAMS)


def test_kl_soap_equals_its_hand_built_chain():
  tx = kp.kl_soap(1e-2, 0.9, 0.95, 1e-8, 0.01, precondition_frequency=3)
  hand = _hand_built(
    kp.adam(0.9, 0.95, 1e-8, bias_correction=False), kp.kl(0.95), kp.qr_every(3, sort=False)
  )
  _assert_same_trajectory(tx, hand, PARAMS)


def test_kl_shampoo_differs_from_kl_soap_only_in_scaling():
  tx = kp.kl_shampoo(1e-2, 0.9, 0.95, 1e-8, 0.01, precondition_frequency=3)
  hand = _hand_built(
    kp.kronecker_eigenvalues(
      0.9, 1e-8, exponents=0.5, eps_placement="outside", momentum_in_eigenbasis=True
    ),
    kp.kl(0.95),
    kp.qr_every(3, sort=False),
    fallback=kp.adam(0.9, 0.95, 1e-8),
  )
  _assert_same_trajectory(tx, hand, PARAMS)
  soap_like = _hand_built(
    kp.adam(0.9, 0.95, 1e-8, bias_correction=False), kp.kl(0.95), kp.qr_every(3, sort=False)
  )
  grads = _grads(PARAMS, 3, seed=2)
  a, _ = _run(tx, PARAMS, grads)
  b, _ = _run(soap_like, PARAMS, grads)
  assert not np.allclose(a[-1]["w"], b[-1]["w"])  # the scaling stage matters


def test_shampoo_equals_its_hand_built_chain():
  layout = kp.LayoutConfig(max_precond_dim=1024, blocking=True, precondition_1d=True)
  tx = kp.shampoo(1e-2, 0.9, 0.999, 1e-12, 0.01, precondition_frequency=3)
  direction = kp.scale_by_preconditioner(
    kp.frobenius(0.999, bias_correction=True),
    kp.eigh_every(3, start=3, ridge=1e-12, eigenvalue_floor=1e-12),
    kp.kronecker_eigenvalues(
      0.9, 0.0, exponents=None, eps_placement="inside", bias_correction=True, cache_roots=True
    ),
    layout=layout,
    first_call="identity",
    statistics_first=True,
  )
  grafted = kp.graft(
    direction,
    kp.graft_magnitude("adam", 0.9, 0.999, 1e-8),
    layout=layout,
    start_preconditioning_step=3,
  )
  hand = optax.chain(grafted, optax.add_decayed_weights(0.01), optax.scale_by_learning_rate(1e-2))
  _assert_same_trajectory(tx, hand, PARAMS)


@pytest.mark.parametrize("name", sorted(SCALE_BY))
def test_factors_do_not_depend_on_frequency_and_bases_change_only_on_refresh(name):
  params = {"w": jnp.zeros((5, 5))}
  grads = _grads(params, 9, seed=3)
  states = {}
  for every in (1, 4):
    tx = SCALE_BY[name](precondition_frequency=every)
    state, step = tx.init(params), jax.jit(tx.update)
    history = []
    for g in grads:
      _, state = step(g, state)
      history.append(state)
    states[every] = history
  if name == "soap":  # Frobenius factors ignore the bases entirely
    for s1, s4 in zip(states[1], states[4], strict=True):
      jax.tree.map(
        np.testing.assert_array_equal,
        s1.buckets[0].estimator.factors,
        s4.buckets[0].estimator.factors,
      )
  bases = [np.asarray(s.buckets[0].basis.bases[0][0]) for s in states[4]]
  for call in range(1, len(grads)):  # call c (0-based) runs step t = c; refresh when t % 4 == 0
    changed = not np.array_equal(bases[call], bases[call - 1])
    assert changed == (call % 4 == 0), call


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_jit_does_not_recompile(name):
  traces = []
  tx = OPTIMIZERS[name](1e-3, precondition_frequency=2)

  def step(grads, state, params):
    traces.append(1)
    return tx.update(grads, state, params)

  jitted = jax.jit(step)
  state = tx.init(PARAMS)
  for g in _grads(PARAMS, 5):
    _, state = jitted(g, state, PARAMS)
  assert len(traces) == 1


# Slow job: tests/test_ecosystem.py (a schedule and every injected number, every method) and
# tests/test_optax_contrib.py (optax's inject and schedule tests) cover it in the default suite.
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_inject_hyperparams_with_a_schedule(name):
  schedule = optax.linear_schedule(1e-2, 1e-3, 5)
  tx = optax.inject_hyperparams(OPTIMIZERS[name], static_args=kp.STATIC_HYPERPARAMS)(
    learning_rate=schedule, b1=0.9, eps=1e-8
  )
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  for g in _grads(PARAMS, 4):
    u, state = update(g, state, PARAMS)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
  # the hyperparameters in the state are those used by the last (4th, count 3) call
  np.testing.assert_allclose(state.hyperparams["learning_rate"], schedule(3), rtol=1e-6)
  # The injected value is used: changing b1 changes the update.
  state2 = state._replace(hyperparams={**state.hyperparams, "b1": jnp.asarray(0.1)})
  g = _grads(PARAMS, 1, seed=9)[0]
  u1, _ = update(g, state, PARAMS)
  u2, _ = update(g, state2, PARAMS)
  assert not np.allclose(u1["w"], u2["w"])


class _MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(8, 16, rngs=rngs)
    self.out = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.tanh(self.hidden(x)))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_flax_nnx_model_trains(name):
  model = _MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, OPTIMIZERS[name](3e-2, precondition_frequency=5), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (64, 8))
  y = jnp.sin(x[:, :1]) + 0.5 * x[:, 1:2]

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(60)]
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.3 * losses[0], losses[::10]


MIXED = {
  "scalar": jnp.asarray(0.5),
  "bias": jnp.ones((16,)),
  "dense": jnp.ones((16, 8)),
  "three": jnp.ones((4, 6, 5)),
  "conv": jnp.ones((3, 3, 8, 16)),
  "row": jnp.ones((1, 12)),
  "tall": jnp.ones((5000, 3)),
}


# Blocked KL-SOAP and KL-Shampoo run in the slow job (~12 s each on 2 cores): blocking is the
# layout's, shared by every method, and blocked SOAP stays in the default suite.
_SLOW = pytest.mark.slow


@pytest.mark.parametrize(
  ("name", "blocking"),
  [
    ("kl_shampoo", False),
    pytest.param("kl_shampoo", True, marks=_SLOW),
    ("kl_soap", False),
    pytest.param("kl_soap", True, marks=_SLOW),
    ("soap", False),
    ("soap", True),
  ],
)
def test_mixed_pytree_gives_finite_updates(name, blocking):
  layout = kp.LayoutConfig(max_precond_dim=128, blocking=blocking)
  tx = OPTIMIZERS[name](1e-3, precondition_frequency=2, layout=layout)
  updates, state = _run(tx, MIXED, _grads(MIXED, 4))
  for u in updates:
    for key, value in u.items():
      assert value.shape == MIXED[key].shape and value.dtype == MIXED[key].dtype, key
      assert bool(jnp.all(jnp.isfinite(value))), key
  assert any(float(jnp.abs(v).max()) > 0 for v in updates[-1].values())


def test_blocked_tensor_equals_its_blocks_run_separately(x64):
  del x64
  layout = kp.LayoutConfig(max_precond_dim=4, blocking=True)
  tx = kp.scale_by_kl_soap(precondition_frequency=2, layout=layout)
  whole = {"w": jnp.zeros((10, 4))}
  grads = _grads(whole, 6, seed=4)
  joint, _ = _run(tx, whole, grads)
  for start, stop in ((0, 4), (4, 8), (8, 10)):
    part, _ = _run(tx, {"w": whole["w"][start:stop]}, [{"w": g["w"][start:stop]} for g in grads])
    for t in range(len(grads)):
      np.testing.assert_allclose(joint[t]["w"][start:stop], part[t]["w"], rtol=1e-12, atol=1e-15)


def test_layout_rules():
  assert layout_lib.merge_dims((4, 6, 5), 64) == (24, 5)
  assert layout_lib.merge_dims((300, 5), 256) == (300, 5)
  assert layout_lib.merge_dims((2, 3, 4), 100) == (24,)
  cfg = kp.LayoutConfig(max_precond_dim=256, blocking=True)
  lay = layout_lib.tensor_layout((300, 5), cfg)
  assert [b.shape for b in lay.blocks] == [(256, 5), (44, 5)]
  assert layout_lib.tensor_layout((1, 12), kp.LayoutConfig()).blocks[0].preconditioned == (False,)
  assert layout_lib.tensor_layout((1, 12), kp.LayoutConfig(squeeze=False)).blocks[
    0
  ].preconditioned == (True, True)
  assert layout_lib.tensor_layout((12,), kp.LayoutConfig(precondition_1d=True)).blocks[
    0
  ].preconditioned == (True,)
  last = layout_lib.tensor_layout((2, 3, 3, 5), kp.LayoutConfig(channels_last=True))
  assert last.work_shape == (2, 5, 3, 3)


def test_layout_boundaries_are_inclusive():
  # Upstream SOAP's rules: merge while the product is <= max_dim; an axis of exactly
  # max_precond_dim gets a factor (and, with blocking, is one block).
  assert layout_lib.merge_dims((4, 6), 24) == (24,)
  assert layout_lib.merge_dims((4, 6, 2), 24) == (24, 2)
  assert layout_lib.merge_dims((4, 6), 23) == (4, 6)
  assert layout_lib.tensor_layout((6, 5), kp.LayoutConfig(6)).blocks[0].preconditioned == (
    True,
    True,
  )
  assert layout_lib.tensor_layout((6, 5), kp.LayoutConfig(5)).blocks[0].preconditioned == (
    False,
    True,
  )
  blocked = layout_lib.tensor_layout((6, 5), kp.LayoutConfig(6, blocking=True))
  assert [b.shape for b in blocked.blocks] == [(6, 5)]
  merged = layout_lib.tensor_layout((4, 6, 2), kp.LayoutConfig(24, merge_small_dims=True))
  assert merged.work_shape == (24, 2)
  assert merged.blocks[0].preconditioned == (True, True)


@pytest.mark.parametrize("shape", [(7, 3), (2, 3, 4, 5), (1, 9), ()])
@pytest.mark.parametrize(
  "cfg",
  [
    kp.LayoutConfig(max_precond_dim=3, blocking=True),
    kp.LayoutConfig(merge_small_dims=True, max_precond_dim=12),
    kp.LayoutConfig(channels_last=True),
  ],
)
def test_blocks_round_trip(shape, cfg):
  x = jnp.arange(int(np.prod(shape)), dtype=jnp.float32).reshape(shape)
  lay = layout_lib.tensor_layout(shape, cfg)
  np.testing.assert_array_equal(layout_lib.from_blocks(layout_lib.to_blocks(x, lay), lay), x)


def _assert_close_and_moving(updates_a, updates_b):
  """Two float64 update trajectories agree to 1e-9 (relative), and are not all zero."""
  moved = 0.0
  for x, y in zip(updates_a, updates_b, strict=True):
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)
      moved = max(moved, float(np.max(np.abs(np.asarray(a)))))
  assert moved > 0


_EXPONENTS = [None, 0.25, {2: (0.1, 0.4)}, {2: (0.5, 0.0)}, {2: {0: 0.3}, 3: (0.2, 0.1, 0.3)}]


# Every exponent with the ridge; the relative ridge (only λ_max differs) with the default exponent,
# the others in the slow job.
@pytest.mark.parametrize(
  ("eps_mode", "exponents"),
  [("ridge", e) for e in _EXPONENTS]
  + [("relative", None)]
  + [pytest.param("relative", e, marks=pytest.mark.slow) for e in _EXPONENTS[1:]],
)
def test_cached_roots_equal_projecting_scaling_and_unprojecting(eps_mode, exponents):
  """Shampoo's ``cache_roots`` (``U = M̂ ×_i Q_i diag(P_i) Q_iᵀ``, roots rebuilt at refreshes)
  against the uncached ``unproj(proj(M̂) ⊙ ⊗P_i)``, float64, 9 steps over 3 refreshes."""
  with jax.enable_x64():
    params = jax.tree.map(lambda x: x.astype(jnp.float64), PARAMS)
    layout = kp.LayoutConfig(max_precond_dim=5, blocking=True)

    def chain(cache_roots):
      return kp.scale_by_preconditioner(
        kp.frobenius(0.99, bias_correction=True),
        kp.eigh_every(3, start=2, ridge=1e-6, relative_ridge=eps_mode == "relative"),
        kp.kronecker_eigenvalues(
          0.9,
          1e-3,
          exponents=exponents,
          eps_placement="inside",
          bias_correction=True,
          cache_roots=cache_roots,
        ),
        layout=layout,
        first_call="identity",
        statistics_first=True,
      )

    grads = _grads(params, 9, seed=4)
    cached, _ = _run(chain(True), params, grads)
    plain, _ = _run(chain(False), params, grads)
    _assert_close_and_moving(cached, plain)


@pytest.mark.parametrize(
  "estimator, refresh, first_call, bias_correction",
  [
    ("kl", "qr", "init_only", False),  # KL-Shampoo
    # Sorted refreshes permute the basis columns (slow job: ~20 s; the unsorted KL case stays).
    pytest.param("kl", "qr_sorted", "precondition", True, marks=pytest.mark.slow),
    ("frobenius", "eigh", "identity", True),
  ],
)
def test_momentum_in_eigenbasis_equals_momentum_in_parameter_space(
  estimator, refresh, first_call, bias_correction
):
  """``M̃ = proj(M)`` folded from ``proj(G)`` and re-rotated at refreshes against ``M`` in
  parameter space projected on every step: float64, 10 steps over 3 refreshes, matrices, a 3-D
  tensor and a 1-D fallback, with ``max_precond_dim=5`` (longer axes get no factor) and with
  blocks of at most 5."""
  with jax.enable_x64():
    params = {
      "w": jnp.ones((6, 4)),
      "t": jnp.ones((2, 3, 4)),
      "long": jnp.ones((3, 7)),  # unblocked: axis 1 has no factor; blocked: 5 + 2
      "b": jnp.ones((4,)),
    }
    stats = kp.kl(0.95) if estimator == "kl" else kp.frobenius(0.95, bias_correction=True)
    basis = {
      "qr": kp.qr_every(3, sort=False),
      "qr_sorted": kp.qr_every(3, sort=True),
      "eigh": kp.eigh_every(3, ridge=1e-6, keep_eigenvalues=True),
    }[refresh]

    def chain(in_basis, layout):
      return kp.scale_by_preconditioner(
        stats,
        basis,
        kp.kronecker_eigenvalues(
          0.9,
          1e-3,
          exponents=0.5,
          eps_placement="outside",
          bias_correction=bias_correction,
          momentum_in_eigenbasis=in_basis,
        ),
        layout=layout,
        fallback=kp.adam(0.9, 0.95, 1e-8),
        first_call=first_call,
      )

    grads = _grads(params, 10, seed=5)
    for lay in (kp.LayoutConfig(max_precond_dim=5), kp.LayoutConfig(5, blocking=True)):
      rotated, rotated_state = _run(chain(True, lay), params, grads)
      plain, plain_state = _run(chain(False, lay), params, grads)
      _assert_close_and_moving(rotated, plain)
      # The stored moments differ (one is in the basis) and agree once rotated back.
      checked = 0
      for r, q in zip(rotated_state.buckets, plain_state.buckets, strict=True):
        if not any(b is not None for b in r.basis.bases):
          continue
        back = jax.vmap(tensor_ops.unproject)(r.scaling.mu, r.basis.bases)
        np.testing.assert_allclose(back, q.scaling.mu, rtol=1e-9, atol=1e-12)
        assert not np.allclose(r.scaling.mu, q.scaling.mu)
        checked += 1
      assert checked


def test_kl_shampoo_shares_the_projection_of_the_gradient():
  """The compiled update of KL-Shampoo with its momentum in the eigenbasis runs two matrix
  products fewer on every call than with the momentum in parameter space (the projection of
  ``G`` is the estimator's; ``proj(M)`` is gone); the refresh branches are not counted."""

  def dots(in_basis):
    tx = kp.scale_by_preconditioner(
      kp.kl(0.95),
      kp.qr_every(3, sort=False),
      kp.kronecker_eigenvalues(
        0.9, 1e-8, exponents=0.5, eps_placement="outside", momentum_in_eigenbasis=in_basis
      ),
      fallback=kp.adam(0.9, 0.95, 1e-8),
    )
    params = {"w": jnp.ones((24, 16))}
    return hlo.dots_on_every_call(
      jax.jit(tx.update).lower(params, tx.init(params)).compile().as_text()
    )

  plain = dots(False)
  # Two grams, the whitening, proj(G) and proj(M) (two each), the unprojection (two).
  assert plain == 9
  assert dots(True) == plain - 2


def test_momentum_in_eigenbasis_excludes_cached_roots():
  with pytest.raises(ValueError, match="exclude each other"):
    kp.kronecker_eigenvalues(
      0.9, 1e-8, eps_placement="inside", cache_roots=True, momentum_in_eigenbasis=True
    )


def test_cache_roots_is_rejected_where_it_would_be_wrong():
  with pytest.raises(ValueError, match="eps_placement='inside'"):
    kp.kronecker_eigenvalues(0.9, 1e-8, eps_placement="outside", cache_roots=True)
  with pytest.raises(ValueError, match="change only at refreshes"):
    kp.scale_by_preconditioner(
      kp.kl(0.9),
      kp.qr_every(3),
      kp.kronecker_eigenvalues(0.9, 1e-8, eps_placement="inside", cache_roots=True),
    )


def test_dropping_the_bases_needs_an_eigh_refresh_and_cached_roots():
  with pytest.raises(ValueError, match="keep_bases=False needs method='eigh'"):
    kp.basis.Refresh(3, "qr", keep_bases=False)
  with pytest.raises(ValueError, match="cache_roots=True"):
    kp.scale_by_preconditioner(
      kp.frobenius(0.9),
      kp.eigh_every(3, keep_bases=False),
      kp.kronecker_eigenvalues(0.9, 1e-8, eps_placement="inside", cache_roots=False),
    )
  with pytest.raises(ValueError, match="cache_roots=True"):
    kp.scale_by_preconditioner(
      kp.frobenius(0.9), kp.eigh_every(3, keep_bases=False), kp.adam(0.9, 0.99, 1e-8)
    )


def _numpy_blocks(x: np.ndarray, lay) -> list[np.ndarray]:
  """The blocks by their definition: permute, reshape to the working shape, slice."""
  if lay.permutation is not None:
    x = np.transpose(x, lay.permutation)
  x = x.reshape(lay.work_shape)
  return [
    x[tuple(slice(s, s + d) for s, d in zip(b.start, b.shape, strict=True))] for b in lay.blocks
  ]


@settings(max_examples=60, deadline=None)
@given(
  shapes=st.lists(
    st.lists(st.integers(1, 9), min_size=0, max_size=4).map(tuple), min_size=1, max_size=4
  ),
  max_dim=st.integers(1, 10),
  blocking=st.booleans(),
  merge=st.booleans(),
  channels_last=st.booleans(),
  multiple=st.integers(1, 3),
)
def test_gather_and_scatter_match_the_blocks_definition(
  shapes, max_dim, blocking, merge, channels_last, multiple
):
  """Buckets hold exactly the sliced blocks (regular tilings go through one transpose,
  others block by block), zero padding after them, and scatter inverts gather."""
  cfg = kp.LayoutConfig(
    max_precond_dim=max_dim,
    blocking=blocking,
    merge_small_dims=merge,
    channels_last=channels_last,
    bucket_multiple=multiple,
  )
  rng = np.random.default_rng(0)
  tree = {f"p{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
  tree_layout = layout_lib.tree_layout(tree, cfg)
  stacks = layout_lib.gather(jax.tree.map(jnp.asarray, tree), tree_layout)
  leaves = jax.tree.leaves(tree)
  blocks = [_numpy_blocks(x, lay) for x, lay in zip(leaves, tree_layout.leaves, strict=True)]
  for bucket, stack in zip(tree_layout.buckets, stacks, strict=True):
    expected = [blocks[i][j] for i, j in bucket.members]
    expected += [np.zeros(bucket.shape, np.float32)] * bucket.padding
    np.testing.assert_array_equal(np.asarray(stack), np.stack(expected))
  back = layout_lib.scatter(stacks, tree_layout)
  for key, x in tree.items():
    np.testing.assert_array_equal(np.asarray(back[key]), x)
