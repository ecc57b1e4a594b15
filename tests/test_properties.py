"""Property tests: random pytrees and random valid hyperparameters, every method.

Over three calls of ``update`` on a random pytree (0-D to 4-D leaves, axes of size one, axes above
``max_precond_dim``, float32 and bfloat16 leaves, nested dicts) with random hyperparameters in
their valid ranges:

* every update is finite and has its parameter's shape and dtype;
* the state's tree structure, shapes and dtypes are those of ``init``.

``max_precond_dim`` is 6 so that axes above it (size 8: an identity axis for SOAP/KL, two blocks
for Shampoo) appear in tiny tensors. Hypothesis is derandomized and keeps no database, so CI runs
the same examples every time; each example costs one compilation, so shapes stay tiny.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kl_precond as kp

pytestmark = pytest.mark.timeout(180)

MAX_PRECOND_DIM = 6
METHODS = {
  "soap": kp.soap,
  "kl_soap": kp.kl_soap,
  "kl_shampoo": kp.kl_shampoo,
  "shampoo": kp.shampoo,
  "adamw_shampoo": kp.adamw_shampoo,
  "eigenvalue_corrected_shampoo": kp.eigenvalue_corrected_shampoo,
}
PROFILE = settings(
  max_examples=10,
  deadline=None,
  derandomize=True,
  database=None,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Pytrees -----------------------------------------------------------------------------------------

_SIZES = st.sampled_from([1, 2, 3, 5, 8])
_DTYPES = st.sampled_from(["float32", "bfloat16"])


def _shapes(orders, sizes=_SIZES):
  """Shapes of an order drawn from ``orders`` (so 0-D leaves are as rare as the list makes
  them), at most 96 elements."""
  return (
    st.sampled_from(orders)
    .flatmap(lambda n: st.lists(sizes, min_size=n, max_size=n))
    .map(tuple)
    .filter(lambda s: math.prod(s) <= 96)
  )


_LEAVES = st.tuples(_shapes([0, 1, 2, 2, 3, 3, 4]), _DTYPES)
# Every tree has a 3-D or 4-D leaf whose axes are all short enough for a factor (<= 6).
_HIGH_ORDER = st.tuples(_shapes([3, 4], st.sampled_from([2, 3, 5])), _DTYPES)
_KEYS = st.sampled_from(["a", "b", "c"])
_TREES = st.tuples(
  _HIGH_ORDER,
  st.dictionaries(
    _KEYS,
    st.one_of(_LEAVES, st.dictionaries(_KEYS, _LEAVES, min_size=1, max_size=2)),
    min_size=0,
    max_size=2,
  ),
).map(lambda parts: {"high": parts[0], **parts[1]})


def _params(spec):
  return jax.tree.map(
    lambda leaf: jnp.full(leaf[0], 0.5, leaf[1]), spec, is_leaf=lambda x: isinstance(x, tuple)
  )


# Hyperparameters, each within its valid range ----------------------------------------------------

_BETA = st.floats(0.0, 0.99)
_EPS = st.floats(-12, -3).map(lambda e: 10.0**e)
_COMMON = {
  "b1": _BETA,
  "b2": st.floats(0.0, 0.999),
  "eps": _EPS,
  "weight_decay": st.floats(0.0, 0.1),
  "precondition_frequency": st.integers(1, 3),
}
_SOAP_AND_KL = {
  "shampoo_beta": st.none() | _BETA,
  "merge_small_dims": st.booleans(),
  "precondition_1d": st.booleans(),
  "normalize_grads": st.booleans(),
  "sort_basis": st.booleans(),
}
_KL = {
  "init_factor": st.floats(0.01, 1.0),
  "max_clamp_value": st.none() | st.floats(1.0, 4000.0),
  "damping": st.floats(0.0, 1e-2),
}
_EPS_MODE = {"eps_mode": st.sampled_from(["ridge", "relative"])}
OPTIONS = {
  "soap": {**_COMMON, **_SOAP_AND_KL, "bias_correction": st.booleans()},
  "kl_soap": {**_COMMON, **_SOAP_AND_KL, **_KL},
  "kl_shampoo": {**_COMMON, **_SOAP_AND_KL, **_KL},
  "shampoo": {
    **_COMMON,
    **_EPS_MODE,
    "exponents": st.sampled_from([None, 0.25, 0.5]),
    "start_preconditioning_step": st.none() | st.integers(0, 3),
    "grafting_type": st.sampled_from([None, "adam", "rmsprop", "adagrad", "sgd"]),
    "graft_b2": _BETA,
    "graft_eps": _EPS,
  },
  "adamw_shampoo": {
    **_COMMON,
    **_EPS_MODE,
    "exponents": st.sampled_from([(0.25, 0.25), (0.5, 0.0), (0.0, 0.5), (0.1, 0.4)]),
  },
  "eigenvalue_corrected_shampoo": {
    **_COMMON,
    "exponent": st.sampled_from([0.5, 0.25, {2: 0.25}]),
    "refresh": st.sampled_from(["qr", "eigh"]),
    "qr_iterations": st.integers(1, 3),
    "tolerance": st.sampled_from([0.0, 0.1]),
    "start_preconditioning_step": st.none() | st.integers(0, 3),
    "grafting_type": st.sampled_from([None, "adam", "rmsprop", "adagrad", "sgd"]),
    "graft_b2": _BETA,
    "graft_eps": _EPS,
    "precondition_1d": st.booleans(),
  },
}


def _signature(tree):
  return jax.tree.structure(tree), [(x.shape, jnp.dtype(x.dtype)) for x in jax.tree.leaves(tree)]


def _check(name, spec, options, seed):
  params = _params(spec)
  tx = METHODS[name](1e-2, max_precond_dim=MAX_PRECOND_DIM, **options)
  state = tx.init(params)
  initial = _signature(state)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(seed)
  for call in range(3):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    updates, state = update(grads, state, params)
    assert _signature(state) == initial, f"call {call}: state signature changed"
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
      assert (u.shape, u.dtype) == (p.shape, p.dtype), f"call {call}"
      assert bool(jnp.all(jnp.isfinite(u))), f"call {call}: {u}"


# Each example compiles a new tree (~2.5 s): 5 per method in the default suite, 15 in the slow job
# (with a longer timeout).
@pytest.mark.parametrize(
  ("name", "examples"),
  [pytest.param(name, 5, id=name) for name in METHODS]
  + [
    pytest.param(name, 15, id=f"{name}-15", marks=(pytest.mark.slow, pytest.mark.timeout(600)))
    for name in METHODS
  ],
)
def test_random_trees_and_hyperparameters_give_finite_updates(name, examples):
  @settings(PROFILE, max_examples=examples)
  @given(spec=_TREES, options=st.fixed_dictionaries(OPTIONS[name]), seed=st.integers(0, 2**16))
  def check(spec, options, seed):
    _check(name, spec, options, seed)

  check()
