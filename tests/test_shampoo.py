"""Shampoo family: the polar identity, one-sidedness, grafting and injectable numbers."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kl_precond as kp
from kl_precond import layout as layout_lib


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _preconditioner_nodes(state):
  is_node = lambda n: isinstance(n, kp.PreconditionerState)  # noqa: E731
  return [n for n in jax.tree.leaves(state, is_leaf=is_node) if is_node(n)]


def _one_step(tx, grad):
  params = {"w": jnp.zeros(grad.shape)}
  state = tx.init(params)
  update, state = jax.jit(tx.update)({"w": jnp.asarray(grad)}, state, params)
  return np.asarray(update["w"]), state


def _no_accumulation(exponents, eps=1e-12):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # a + b != 1/2 warns
    return kp.adamw_shampoo(
      1.0,
      b1=0.0,
      b2=0.0,
      eps=eps,
      weight_decay=0.0,
      exponents=exponents,
      precondition_frequency=1,
    )


# With eps -> 0 the rank-deficient side amplifies rounding in its null space by eps^(-b):
# 1e-16 * (1e-12)^(-1/2) = 1e-10 of the update's scale, hence the 1e-8 tolerance.
POLAR_TOLERANCE = 1e-8


@pytest.mark.parametrize("shape", [(5, 8), (8, 5)])
@pytest.mark.parametrize("exponents", [(0.25, 0.25), (0.5, 0.0), (0.0, 0.5), (0.1, 0.4)])
def test_polar_identity(shape, exponents):
  grad = np.random.default_rng(0).standard_normal(shape)
  u, s, vt = np.linalg.svd(grad, full_matrices=False)
  update, _ = _one_step(_no_accumulation(exponents), grad)
  # The chain scales by -learning_rate.
  np.testing.assert_allclose(-update, u @ vt, atol=POLAR_TOLERANCE)


@pytest.mark.parametrize("shape", [(5, 8), (8, 5)])
@pytest.mark.parametrize("exponents", [(0.25, 0.0), (0.5, 0.5), (0.125, 0.125)])
def test_other_exponent_sums_raise_singular_values(shape, exponents):
  grad = np.random.default_rng(1).standard_normal(shape)
  u, s, vt = np.linalg.svd(grad, full_matrices=False)
  update, _ = _one_step(_no_accumulation(exponents), grad)
  expected = (u * s ** (1 - 2 * sum(exponents))) @ vt
  np.testing.assert_allclose(-update, expected, atol=POLAR_TOLERANCE * np.abs(expected).max())


@pytest.mark.parametrize("exponents", [(0.25, 0.25), (0.5, 0.0), (0.1, 0.4)])
def test_transpose_symmetry(exponents):
  rng = np.random.default_rng(2)
  grads = [rng.standard_normal((6, 4)) for _ in range(5)]
  a, b = exponents

  def run(exps, transpose):
    tx = kp.adamw_shampoo(1.0, eps=1e-6, weight_decay=0.0, exponents=exps, precondition_frequency=2)
    shape = grads[0].T.shape if transpose else grads[0].shape
    params = {"w": jnp.zeros(shape)}
    state, step = tx.init(params), jax.jit(tx.update)
    out = []
    for g in grads:
      u, state = step({"w": jnp.asarray(g.T if transpose else g)}, state, params)
      out.append(np.asarray(u["w"]))
    return out

  for plain, flipped in zip(run((a, b), False), run((b, a), True), strict=True):
    np.testing.assert_allclose(plain, flipped.T, rtol=1e-9, atol=1e-12)


def test_one_sided_keeps_no_right_factor_and_matches_numpy():
  rng = np.random.default_rng(3)
  grads = [rng.standard_normal((6, 9)) for _ in range(3)]
  eps, b1, b2 = 1e-3, 0.9, 0.99
  tx = kp.adamw_shampoo(
    1.0, b1=b1, b2=b2, eps=eps, weight_decay=0.0, exponents=(0.5, 0.0), precondition_frequency=1
  )
  params = {"w": jnp.zeros((6, 9))}
  state = tx.init(params)
  matrices = [x.shape for x in jax.tree.leaves(state) if x.ndim == 3]
  assert (1, 9, 9) not in matrices and (1, 6, 6) in matrices
  left, m = np.zeros((6, 6)), np.zeros((6, 9))
  step = jax.jit(tx.update)
  for t, g in enumerate(grads, start=1):
    u, state = step({"w": jnp.asarray(g)}, state, params)
    left = b2 * left + (1 - b2) * g @ g.T
    m = b1 * m + (1 - b1) * g
    w, q = np.linalg.eigh(left / (1 - b2**t) + eps * np.eye(6))
    w = np.where(w.min() < eps, w - w.min() + eps, w)
    expected = q @ np.diag(w**-0.5) @ q.T @ (m / (1 - b1**t))
    np.testing.assert_allclose(-np.asarray(u["w"]), expected, rtol=1e-9)


def test_grafting_gives_each_block_the_magnitude_norm():
  layout = kp.LayoutConfig(max_precond_dim=4, blocking=True, precondition_1d=True)
  tx = kp.scale_by_shampoo(
    exponents=None,
    precondition_frequency=1,
    start_preconditioning_step=1,
    grafting_type="rmsprop",
    layout=layout,
  )
  magnitude = kp.graft_magnitude("rmsprop", 0.9, 0.999, 1e-8)
  params = {"w": jnp.zeros((10, 3)), "b": jnp.zeros(3)}
  state, m_state = tx.init(params), magnitude.init(params)
  rng = np.random.default_rng(4)
  step = jax.jit(tx.update)
  for _ in range(3):
    grads = {k: jnp.asarray(rng.standard_normal(v.shape)) for k, v in params.items()}
    update, state = step(grads, state, params)
    reference, m_state = magnitude.update(grads, m_state)
    for key in params:
      lay = layout_lib.tensor_layout(params[key].shape, layout)
      assert len(lay.blocks) == (3 if key == "w" else 1)
      for ours, theirs in zip(
        layout_lib.to_blocks(update[key], lay),
        layout_lib.to_blocks(reference[key], lay),
        strict=True,
      ):
        np.testing.assert_allclose(jnp.linalg.norm(ours), jnp.linalg.norm(theirs), rtol=1e-12)


def test_grafting_before_start_is_exactly_adam():
  params = {"w": jnp.ones((5, 4)), "b": jnp.ones(4)}
  ours = kp.shampoo(
    1e-2,
    b1=0.9,
    graft_b2=0.99,
    graft_eps=1e-7,
    weight_decay=0.0,
    start_preconditioning_step=10**9,
    grafting_type="adam",
  )
  theirs = optax.adam(1e-2, b1=0.9, b2=0.99, eps=1e-7)
  s1, s2 = ours.init(params), theirs.init(params)
  rng = np.random.default_rng(5)
  for _ in range(6):
    grads = {k: jnp.asarray(rng.standard_normal(v.shape)) for k, v in params.items()}
    u1, s1 = ours.update(grads, s1, params)
    u2, s2 = theirs.update(grads, s2, params)
    jax.tree.map(np.testing.assert_array_equal, u1, u2)


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "rmsprop", "adam"])
def test_magnitudes_match_their_formulas(kind):
  rng = np.random.default_rng(6)
  grads = [rng.standard_normal(4) for _ in range(4)]
  tx = kp.graft_magnitude(kind, 0.8, 0.9, 1e-3)
  state = tx.init(jnp.zeros(4))
  m = v = np.zeros(4)
  for t, g in enumerate(grads, start=1):
    out, state = tx.update(jnp.asarray(g), state)
    m = 0.8 * m + 0.2 * g
    v = v + g**2 if kind == "adagrad" else 0.9 * v + 0.1 * g**2
    filtered = m / (1 - 0.8**t)
    expected = {
      "sgd": filtered,
      "adagrad": filtered / (np.sqrt(v) + 1e-3),
      "rmsprop": filtered / (np.sqrt(v) + 1e-3),
      "adam": filtered / (np.sqrt(v / (1 - 0.9**t)) + 1e-3),
    }[kind]
    np.testing.assert_allclose(out, expected, rtol=1e-12)


def test_exponents_and_eps_are_injectable():
  rng = np.random.default_rng(7)
  grads = [{"w": jnp.asarray(rng.standard_normal((5, 4)))} for _ in range(4)]
  params = {"w": jnp.zeros((5, 4))}
  injected = optax.inject_hyperparams(kp.adamw_shampoo, static_args=kp.STATIC_HYPERPARAMS)(
    learning_rate=1e-2, exponents=jnp.asarray([0.1, 0.4]), eps=1e-4, precondition_frequency=1
  )
  constant = kp.adamw_shampoo(1e-2, exponents=(0.1, 0.4), eps=1e-4, precondition_frequency=1)
  s1, s2 = injected.init(params), constant.init(params)
  assert set(s1.hyperparams) >= {"exponents", "eps", "b1", "b2", "weight_decay"}
  step, constant_step = jax.jit(injected.update), jax.jit(constant.update)
  for g in grads:
    u1, s1 = step(g, s1, params)
    u2, s2 = constant_step(g, s2, params)
    np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-9)
  # A different injected epsilon changes the update (roots are recomputed every step here).
  bigger = s1._replace(hyperparams={**s1.hyperparams, "eps": jnp.asarray(1.0)})
  assert not np.allclose(step(grads[0], bigger, params)[0]["w"], step(grads[0], s1, params)[0]["w"])


def test_relative_epsilon_matches_numpy():
  rng = np.random.default_rng(8)
  g = rng.standard_normal((4, 6))
  tx = kp.scale_by_shampoo(
    0.0,
    0.0,
    1e-2,
    exponents=(0.25, 0.25),
    precondition_frequency=1,
    start_preconditioning_step=1,
    grafting_type=None,
    eps_mode="relative",
  )
  update, _ = _one_step(tx, g)

  def root(matrix):
    w, q = np.linalg.eigh(matrix)
    w = w + 1e-2 * w.max()
    return q @ np.diag(w**-0.25) @ q.T

  np.testing.assert_allclose(update, root(g @ g.T) @ g @ root(g.T @ g), rtol=1e-9)


def test_bad_options_are_refused():
  with pytest.raises(ValueError, match="grafting_type"):
    kp.shampoo(grafting_type="lion")
  with pytest.raises(ValueError, match="exponents"):
    kp.adamw_shampoo(exponents=(-0.1, 0.6))
  with pytest.raises(ValueError, match="pair"):
    kp.adamw_shampoo(exponents=(0.1, 0.2, 0.2))
  with pytest.warns(UserWarning, match="1/2"):
    kp.adamw_shampoo(exponents=(0.5, 0.5))


def test_a_per_axis_tuple_sets_only_the_blocks_of_its_order():
  """``exponents=(a, b)`` means ``{2: (a, b)}``: a 3-tensor and a vector take ``1/(2k)`` (they
  raised an IndexError, or read the matrix's entries, before), and the matrix its pair."""
  rng = np.random.default_rng(3)
  params = {"m": jnp.zeros((6, 4)), "t": jnp.zeros((3, 4, 5)), "v": jnp.zeros((7,))}
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params) for _ in range(4)]

  def run(exponents):
    tx = kp.shampoo(
      1.0, exponents=exponents, precondition_frequency=1, precondition_1d=True, grafting_type=None
    )
    state, step, out = tx.init(params), jax.jit(tx.update), []
    for g in grads:
      update, state = step(g, state, params)
      out.append(update)
    return out

  as_tuple, as_mapping, default = run((0.5, 0.0)), run({2: (0.5, 0.0)}), run(None)
  for t, m, d in zip(as_tuple, as_mapping, default, strict=True):
    for name in params:
      np.testing.assert_allclose(t[name], m[name], rtol=1e-12, atol=1e-12)
    for name in ("t", "v"):
      np.testing.assert_allclose(t[name], d[name], rtol=1e-12, atol=1e-12)
  # The first step is the polar factor whatever the pair; later ones tell (½, 0) from (¼, ¼).
  assert not np.allclose(as_tuple[-1]["m"], default[-1]["m"], rtol=1e-3)


@pytest.mark.parametrize("factory", [kp.shampoo, kp.adamw_shampoo])
def test_cache_roots_and_store_bases_give_the_same_steps(factory):
  """``store_bases=True`` (cached roots and stored bases), ``cache_roots=False`` (project,
  scale, unproject) and the default (roots only) give the same updates in float64; the last two
  hold one ``d × d`` matrix less per factor, and without stored bases the bases are
  one-element placeholders."""
  with jax.enable_x64():
    params = {"w": jnp.ones((6, 4), jnp.float64), "b": jnp.ones((4,), jnp.float64)}
    rng = np.random.default_rng(11)
    grads = [
      {k: jnp.asarray(rng.standard_normal(v.shape)) for k, v in params.items()} for _ in range(7)
    ]
    variants = [{"store_bases": True}, {"cache_roots": False}, {}]
    txs = [factory(1e-2, precondition_frequency=2, **v) for v in variants]
    states = [tx.init(params) for tx in txs]
    steps = [jax.jit(tx.update) for tx in txs]
    sizes = [sum(x.size for x in jax.tree.leaves(s)) for s in states]
    for g in grads:
      outs = [step(g, s, params) for step, s in zip(steps, states, strict=True)]
      states = [s for _, s in outs]
      for u, _ in outs[1:]:
        for a, b in zip(jax.tree.leaves(outs[0][0]), jax.tree.leaves(u), strict=True):
          np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-9, atol=1e-13)
  factor_matrices = 6 * 6 + 4 * 4
  assert sizes[0] - sizes[1] in (factor_matrices, factor_matrices + 4 * 4)  # + the bias's factor
  placeholders = sum(
    b.size
    for node in _preconditioner_nodes(states[2])
    for bucket in node.buckets
    for b in bucket.basis.bases
    if b is not None
  )
  assert sizes[2] == sizes[1] + placeholders
  bases = [
    b
    for node in _preconditioner_nodes(states[2])
    for bucket in node.buckets
    for b in bucket.basis.bases
  ]
  assert bases and all(b is None or b.shape[1:] == (1,) for b in bases)  # one zero per block
  roots = [
    r
    for node in _preconditioner_nodes(states[2])
    for bucket in node.buckets
    for r in getattr(bucket.scaling, "roots", None) or ()
    if r is not None
  ]
  assert {r.shape[-1] for r in roots} >= {6, 4}


@pytest.mark.parametrize("dtype", [None, jnp.float32])
@pytest.mark.parametrize("kind", ["sgd", "adagrad", "rmsprop", "adam"])
def test_magnitudes_hold_their_state_under_the_flag(kind, dtype):
  """``hold=True`` (a skipped call) returns the state bit for bit, even for a NaN gradient;
  ``hold=False`` is the plain update."""
  rng = np.random.default_rng(8)
  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  tx = kp.graft_magnitude(kind, 0.8, 0.9, 1e-3, dtype=dtype)
  state = tx.init(params)
  for _ in range(2):
    grads = {k: jnp.asarray(rng.standard_normal(v.shape)) for k, v in params.items()}
    _, state = tx.update(grads, state)
  nan = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads)
  _, held = jax.jit(functools.partial(tx.update, hold=jnp.asarray(True)))(nan, state)
  jax.tree.map(np.testing.assert_array_equal, held, state)
  plain = tx.update(grads, state)
  flagged = tx.update(grads, state, hold=jnp.asarray(False))
  jax.tree.map(np.testing.assert_array_equal, flagged, plain)
