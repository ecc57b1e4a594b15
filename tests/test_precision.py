"""Precision: parameter dtypes are kept, and the ``dtype=`` option sets the storage of all state.

* One pytree holding float32, bfloat16 and float16 parameters (so every dtype forms its own
  buckets in one compiled update): updates keep each parameter's dtype and shape, the state keeps
  its structure, shapes and dtypes, and everything stays finite.
* ``dtype=jnp.bfloat16`` (and ``jnp.float16``) on float32 parameters: every floating state leaf
  is stored in that dtype, the updates stay float32, and over 10 steps they track the float32-state
  run to a relative error per step of ``TRACKING_TOLERANCE``, per method and dtype (measured: at
  most 0.034 for bfloat16, AdamW-style Shampoo, and 0.0045 for float16, on tensors whose factors
  are full rank; a rank-deficient factor with ``eps=1e-12`` amplifies the rounding of the stored
  basis by up to ``eps^(-1/2)``, which is not a precision property and is covered in
  ``test_faults.py``).
* A NaN/Inf gradient is skipped with 16-bit state too (``dtype=``, or 16-bit parameters): zero
  update, state bit for bit, ``skipped`` counted.
* The scaling stages and the grafting magnitude compute in float32 whatever their storage: the
  same moments stored in 16 bits and in float32 give the same direction, and the 16-bit state
  holds the float32 result rounded once.
* State memory per ``dtype`` option, from ``x.nbytes``: 16-bit options halve every floating
  buffer; integer counters are unchanged.
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
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Per method and dtype: about twice the largest relative error per step measured over the 10 steps
# (measured at 2026-12-07, bfloat16 / float16: SOAP 0.0084 / 0.0012, KL-SOAP 0.0099 / 0.0025,
# KL-Shampoo 0.0129 / 0.0027, Shampoo 0.0049 / 0.0007, AdamW-style Shampoo 0.0341 / 0.0045,
# eigenvalue-corrected Shampoo 0.0098 / 0.0013; float16 keeps 3 more mantissa bits, ~8x less).
TRACKING_TOLERANCE = {
  "soap": {jnp.bfloat16: 0.02, jnp.float16: 0.003},
  "kl_soap": {jnp.bfloat16: 0.02, jnp.float16: 0.005},
  "kl_shampoo": {jnp.bfloat16: 0.025, jnp.float16: 0.006},
  "shampoo": {jnp.bfloat16: 0.01, jnp.float16: 0.0015},
  "adamw_shampoo": {jnp.bfloat16: 0.07, jnp.float16: 0.01},
  "eigenvalue_corrected_shampoo": {jnp.bfloat16: 0.02, jnp.float16: 0.003},
}


def _signature(tree):
  return jax.tree.structure(tree), [(x.shape, jnp.dtype(x.dtype)) for x in jax.tree.leaves(tree)]


def _finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def _floating(tree):
  return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def _eigenvalue_vectors(state):
  """Shampoo's per-factor eigenvalues: kept in float32 whatever ``dtype`` (d numbers a factor)."""
  return [
    x
    for node in _preconditioner_states(state)
    for bucket in node.buckets
    for x in jax.tree.leaves(bucket.basis.eigenvalues)
  ]


def _stored(state):
  """The floating-point state that the ``dtype`` option applies to."""
  skip = {id(x) for x in _eigenvalue_vectors(state)}
  return [x for x in _floating(state) if id(x) not in skip]


# Every dtype in one tree -------------------------------------------------------------------------

MIXED = {
  jnp.dtype(dtype).name: {"w": jnp.full((5, 3), 0.5, dtype), "b": jnp.full((3,), 0.5, dtype)}
  for dtype in DTYPES
}


def _mixed_grads(steps, seed=0):
  rng = np.random.default_rng(seed)
  return [
    jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), MIXED)
    for _ in range(steps)
  ]


@functools.cache
def _mixed_compiled(name):
  tx = METHODS[name](1e-2, weight_decay=0.0, precondition_frequency=2)
  return tx, jax.jit(tx.update)


@functools.cache
def _mixed_run(name):
  """4 calls (a refresh included) of the method on the mixed-dtype tree."""
  tx, update = _mixed_compiled(name)
  state = tx.init(MIXED)
  updates, states = [], [state]
  for g in _mixed_grads(4):
    u, state = update(g, state, MIXED)
    updates.append(u)
    states.append(state)
  return updates, states


@pytest.mark.parametrize("name", list(METHODS))
def test_updates_keep_each_parameter_dtype(name):
  updates, states = _mixed_run(name)
  for u in updates:
    for leaf, param in zip(jax.tree.leaves(u), jax.tree.leaves(MIXED), strict=True):
      assert (leaf.shape, leaf.dtype) == (param.shape, param.dtype)
  for state in states[1:]:
    assert _signature(state) == _signature(states[0])
  # With the default ``dtype=None`` each bucket's state is stored in its parameters' dtype.
  assert {jnp.dtype(x.dtype) for x in _floating(states[0])} == {jnp.dtype(d) for d in DTYPES}


@pytest.mark.parametrize("name", list(METHODS))
def test_low_precision_updates_are_finite(name):
  updates, states = _mixed_run(name)
  for t, u in enumerate(updates):
    assert _finite(u), f"call {t}: {u}"


# The ``dtype=`` option ---------------------------------------------------------------------------

PARAMS = {"w": jnp.zeros((4, 4)), "t": jnp.zeros((2, 3, 4))}  # factors full rank from call 1


def _well_posed_grads(steps, seed=0):
  """Gradients with distinct scales per axis (separated eigenvalues, so no order flips)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    grads = {}
    for key, param in PARAMS.items():
      g = rng.standard_normal(param.shape)
      for axis, size in enumerate(param.shape):
        view = [1] * param.ndim
        view[axis] = size
        g = g * np.linspace(1.0, 3.0, size).reshape(view)
      grads[key] = jnp.asarray(g, jnp.float32)
    out.append(grads)
  return out


@functools.cache
def _dtype_compiled(name, dtype):
  tx = METHODS[name](1.0, weight_decay=0.0, precondition_frequency=3, dtype=dtype)
  return tx, jax.jit(tx.update)


@functools.cache
def _dtype_run(name, dtype):
  tx, update = _dtype_compiled(name, dtype)
  state = tx.init(PARAMS)
  updates = []
  for g in _well_posed_grads(10):
    u, state = update(g, state, PARAMS)
    updates.append(u)
  return updates, state


def _preconditioner_states(state):
  is_node = lambda n: isinstance(n, kp.PreconditionerState)  # noqa: E731
  return [n for n in jax.tree.leaves(state, is_leaf=is_node) if is_node(n)]


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_dtype_option_stores_all_state_in_that_dtype(name, dtype):
  state = METHODS[name](1e-3, dtype=dtype).init(PARAMS)
  assert {jnp.dtype(x.dtype) for x in _stored(state)} == {jnp.dtype(dtype)}
  assert all(x.dtype == jnp.float32 for x in _eigenvalue_vectors(state))


def _relative_error(ours, reference):
  pairs = zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True)
  num = sum(float(jnp.sum((a - b) ** 2)) for a, b in pairs)
  den = sum(float(jnp.sum(b**2)) for b in jax.tree.leaves(reference))
  return np.sqrt(num / den)


# bfloat16 for every method; float16 (the same code, a narrower range) for Shampoo and KL-Shampoo
# in the default suite, for the other four in the slow job.
@pytest.mark.parametrize(
  ("dtype", "name"),
  [(jnp.bfloat16, name) for name in METHODS]
  + [
    (jnp.float16, name)
    if name in ("kl_shampoo", "shampoo")
    else pytest.param(jnp.float16, name, marks=pytest.mark.slow)
    for name in METHODS
  ],
)
def test_low_precision_state_tracks_the_float32_run(name, dtype):
  reference, _ = _dtype_run(name, None)
  updates, state = _dtype_run(name, dtype)
  # The preconditioner's own state is in ``dtype`` after 10 updates (grafting: see above).
  (node,) = _preconditioner_states(state)
  assert {jnp.dtype(x.dtype) for x in _stored(node)} == {jnp.dtype(dtype)}
  errors = []
  for ours, theirs in zip(updates, reference, strict=True):
    assert _signature(ours) == _signature(theirs)  # float32 updates
    assert _finite(ours)
    if any(float(jnp.max(jnp.abs(x))) > 0 for x in jax.tree.leaves(theirs)):
      errors.append(_relative_error(ours, theirs))
  assert len(errors) >= 9
  assert max(errors) < TRACKING_TOLERANCE[name][dtype], errors
  assert max(errors) > 1e-5, errors  # the option did take effect


MEMORY_PARAMS = {"w": jnp.zeros((16, 8)), "t": jnp.zeros((4, 6, 5)), "b": jnp.zeros((8,))}


def _state_bytes(name, dtype):
  state = METHODS[name](1e-3, dtype=dtype).init(MEMORY_PARAMS)
  floating = sum(x.nbytes for x in _floating(state))
  counters = sum(
    x.nbytes for x in jax.tree.leaves(state) if not jnp.issubdtype(x.dtype, jnp.floating)
  )
  elements = sum(x.size for x in _stored(state))
  eigenvalues = sum(x.size for x in _eigenvalue_vectors(state))
  return floating - 4 * eigenvalues, counters, elements


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_sixteen_bit_dtype_option_halves_state_bytes(name, dtype):
  full, full_counters, elements = _state_bytes(name, None)
  assert _state_bytes(name, jnp.float32) == (full, full_counters, elements)
  assert full == 4 * elements
  half, half_counters, half_elements = _state_bytes(name, dtype)
  assert half_elements == elements
  assert half_counters == full_counters
  assert half == 2 * elements


# The NaN/Inf skip with 16-bit state --------------------------------------------------------------


def _without_skipped(state):
  is_node = lambda n: isinstance(n, kp.PreconditionerState)  # noqa: E731
  return jax.tree.map(
    lambda n: n._replace(skipped=None) if is_node(n) else n, state, is_leaf=is_node
  )


def _assert_skipped(state, after):
  """``after`` is ``state`` bit for bit, but for the preconditioner's ``skipped`` (+1)."""
  (before_node,), (after_node,) = _preconditioner_states(state), _preconditioner_states(after)
  assert int(after_node.skipped) == int(before_node.skipped) + 1
  kept, new = _without_skipped(state), _without_skipped(after)
  assert jax.tree.structure(kept) == jax.tree.structure(new)
  for x, y in zip(jax.tree.leaves(kept), jax.tree.leaves(new), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_sixteen_bit_state_skips_a_nonfinite_gradient(name, dtype, kind):
  # dtype= on float32 parameters: 16-bit factors, moments and bases (float16 has its own path:
  # the new state is checked instead of the gradient's norm); weight_decay=0, so a skipped
  # call's update is exactly zero.
  tx, update = _dtype_compiled(name, dtype)
  state = tx.init(PARAMS)
  grads = _well_posed_grads(4)
  for g in grads[:3]:  # past the first call and a refresh (every 3 calls)
    _, state = update(g, state, PARAMS)
  bad = {**grads[3], "t": grads[3]["t"].at[1, 2, 0].set(jnp.nan if kind == "nan" else jnp.inf)}
  skipped_update, after = update(bad, state, PARAMS)
  for leaf in jax.tree.leaves(skipped_update):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  _assert_skipped(state, after)


@pytest.mark.parametrize("name", list(METHODS))
def test_sixteen_bit_parameters_skip_a_nonfinite_gradient(name):
  # dtype=None: each bucket is stored in its parameters' dtype (float32, bfloat16 and float16
  # in one tree); a NaN in the bfloat16 leaf skips the whole call.
  tx, update = _mixed_compiled(name)
  _, states = _mixed_run(name)
  state = states[3]
  grads = _mixed_grads(1, seed=5)[0]
  bad = {
    **grads,
    "bfloat16": {**grads["bfloat16"], "w": grads["bfloat16"]["w"].at[0, 1].set(jnp.nan)},
  }
  skipped_update, after = update(bad, state, MIXED)
  for leaf in jax.tree.leaves(skipped_update):
    np.testing.assert_array_equal(np.asarray(leaf, np.float32), 0.0)
  _assert_skipped(state, after)


# Arithmetic in float32 whatever the storage ----------------------------------------------------

SCALING_STAGES = {
  "adam": lambda dtype: kp.adam(0.9, 0.95, 1e-8, dtype=dtype),
  "adam, b3": lambda dtype: kp.adam(0.9, 0.95, 1e-8, dtype=dtype, b3=0.5),
  "eigenvalue_corrected": lambda dtype: kp.eigenvalue_corrected(0.9, 0.95, 1e-8, dtype=dtype),
  "kronecker_eigenvalues": lambda dtype: kp.kronecker_eigenvalues(0.9, 1e-8, dtype=dtype),
  "kronecker_eigenvalues, in eigenbasis": lambda dtype: kp.kronecker_eigenvalues(
    0.9, 1e-8, dtype=dtype, momentum_in_eigenbasis=True, bias_correction=True
  ),
}


def _same_values(state, dtype):
  """``state`` with its floating leaves cast to ``dtype`` (counters kept)."""
  return jax.tree.map(
    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state
  )


@pytest.mark.parametrize("stage_name", list(SCALING_STAGES))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_scaling_stages_compute_in_float32_whatever_the_storage(stage_name, dtype):
  # The same moment values stored in 16 bits and in float32 give the same direction (float32
  # arithmetic in both), and the 16-bit state stores the float32 result rounded once.
  shape, mask = (4, 3), (True, True)
  rng = np.random.default_rng(7)
  bases = tuple(
    jnp.asarray(np.linalg.qr(rng.standard_normal((d, d)))[0], jnp.float32) for d in shape
  )
  eigenvalues = tuple(jnp.asarray(rng.uniform(0.5, 2.0, d), jnp.float32) for d in shape)
  grad = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  narrow = SCALING_STAGES[stage_name](dtype)
  state = narrow.init(shape, mask, dtype)
  state = jax.tree.map(
    lambda x: jnp.asarray(rng.uniform(0.2, 1.0, x.shape), dtype) if x.ndim == 2 else x, state
  )
  assert {jnp.dtype(x.dtype) for x in jax.tree.leaves(state)} == {jnp.dtype(dtype)}
  wide = SCALING_STAGES[stage_name](jnp.float32)
  step = jnp.asarray(3)
  direction, new = narrow.update(grad, state, bases, eigenvalues, step)
  wide_direction, wide_new = wide.update(
    grad, _same_values(state, jnp.float32), bases, eigenvalues, step
  )
  assert direction.dtype == jnp.float32
  np.testing.assert_allclose(direction, wide_direction, rtol=1e-6, atol=0)
  for ours, rounded in zip(
    jax.tree.leaves(new), jax.tree.leaves(_same_values(wide_new, dtype)), strict=True
  ):
    assert ours.dtype == dtype
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(rounded, np.float32))


@pytest.mark.parametrize("kind", ["adam", "rmsprop", "adagrad"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_graft_magnitude_computes_in_float32_whatever_the_storage(kind, dtype):
  rng = np.random.default_rng(8)
  params = {"w": jnp.zeros((4, 3), jnp.float32)}
  grads = [{"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)} for _ in range(3)]
  narrow = kp.graft_magnitude(kind, dtype=dtype)
  wide = kp.graft_magnitude(kind, dtype=jnp.float32)
  state = narrow.init(params)
  for g in grads:
    update, new = narrow.update(g, state, params)
    wide_update, wide_new = wide.update(g, _same_values(state, jnp.float32), params)
    np.testing.assert_allclose(update["w"], wide_update["w"], rtol=1e-6, atol=0)
    for ours, rounded in zip(
      jax.tree.leaves(new), jax.tree.leaves(_same_values(wide_new, dtype)), strict=True
    ):
      np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(rounded, np.float32))
    state = new
