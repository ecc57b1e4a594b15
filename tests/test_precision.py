"""Precision: parameter dtypes are kept, and the ``dtype=`` option sets the storage of all state.

* One pytree holding float32, bfloat16 and float16 parameters (so every dtype forms its own
  buckets in one compiled update): updates keep each parameter's dtype and shape, the state keeps
  its structure, shapes and dtypes, and everything stays finite.
* ``dtype=jnp.bfloat16`` (and ``jnp.float16``) on float32 parameters: every floating state leaf
  is stored in that dtype, the updates stay float32, and over 10 steps they track the float32-state
  run to a relative error per step of ``TRACKING_TOLERANCE`` (measured: at most 0.02 for
  bfloat16, 0.004 for float16, on tensors whose factors are full rank; a rank-deficient factor with
  ``eps=1e-12`` amplifies the rounding of the stored basis by up to ``eps^(-1/2)``, which is not a
  precision property and is covered in ``test_faults.py``).
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
TRACKING_TOLERANCE = {jnp.bfloat16: 0.05, jnp.float16: 0.01}


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
def _mixed_run(name):
  """4 calls (a refresh included) of the method on the mixed-dtype tree."""
  tx = METHODS[name](1e-2, precondition_frequency=2)
  state = tx.init(MIXED)
  update = jax.jit(tx.update)
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
def _dtype_run(name, dtype):
  tx = METHODS[name](1.0, weight_decay=0.0, precondition_frequency=3, dtype=dtype)
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
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


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
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
  assert max(errors) < TRACKING_TOLERANCE[dtype], errors
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
