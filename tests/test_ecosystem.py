"""The optimizers in the JAX ecosystem: optax combinators, abstract init, Flax, orbax.

For every method: ``optax.inject_hyperparams`` over every numeric hyperparameter (a schedule as
learning rate); ``optax.MultiSteps`` accumulates; ``optax.masked`` and ``optax.partition`` route
subtrees; ``jax.eval_shape(tx.init, ...)`` on ``jax.ShapeDtypeStruct`` leaves matches the concrete
init; Flax NNX ``nnx.Optimizer`` and linen ``TrainState`` train a tiny model; an orbax checkpoint
restored in a fresh process continues the trajectory bit for bit.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

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
REPO = pathlib.Path(__file__).resolve().parents[1]
# Factors of full rank from the first gradient: a rank-deficient first basis is arbitrary in its
# null space, so two runs that differ only by rounding (a traced vs a constant beta, a running vs a
# plain mean) would diverge. The Shampoo family also gives the vector a factor, rank-deficient for
# its first calls; with eps=1e-12 its null space amplifies rounding by up to 1e6 (test_faults.py),
# so here it uses eps=1e-3.
PARAMS = {"w": jnp.full((4, 4), 0.5), "b": jnp.full((3,), 0.5)}
EPS = {"shampoo": 1e-3, "adamw_shampoo": 1e-3}


def _grads(steps, seed=0, params=PARAMS):
  rng = np.random.default_rng(seed)
  return [
    jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    for _ in range(steps)
  ]


def _run(tx, grads, params=PARAMS):
  state = tx.init(params)
  update = jax.jit(tx.update)
  updates = []
  for g in grads:
    u, state = update(g, state, params)
    updates.append(u)
  return updates, state


def _assert_close(ours, theirs, rtol=1e-5):
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.max(np.abs(b)) or 1.0))


def _nonzero(tree):
  return any(float(jnp.max(jnp.abs(x))) > 0 for x in jax.tree.leaves(tree))


# optax.inject_hyperparams ------------------------------------------------------------------------

# Per method: every numeric hyperparameter, the value it is built with and the value then written
# into ``state.hyperparams``. The injected run must equal a plain run built with the second values.
_COMMON = {"b1": (0.8, 0.85), "b2": (0.9, 0.97), "eps": (1e-6, 1e-7), "weight_decay": (0.1, 0.05)}
_KL = {
  "shampoo_beta": (0.9, 0.8),
  # Read at init only, and only by eigenvalue_init="constant" (see the test below).
  "init_factor": (0.5, 0.5),
  "max_clamp_value": (20.0, 50.0),
  "damping": (1e-3, 1e-2),
}
HYPERPARAMS = {
  "soap": {**_COMMON, "shampoo_beta": (0.9, 0.8)},
  "kl_soap": {**_COMMON, **_KL},
  "kl_shampoo": {**_COMMON, **_KL},
  "shampoo": {
    **_COMMON,
    "eps": (1e-3, 1e-2),
    "graft_b2": (0.99, 0.9),
    "graft_eps": (1e-6, 1e-3),
    "exponents": (0.3, 0.2),
    "tolerance": (0.01, 0.02),
  },
  "adamw_shampoo": {
    **_COMMON,
    "eps": (1e-3, 1e-2),
    "exponents": (jnp.asarray([0.25, 0.25]), jnp.asarray([0.4, 0.1])),
    "tolerance": (0.01, 0.02),
  },
  "eigenvalue_corrected_shampoo": {
    **_COMMON,
    "eps": (1e-3, 1e-2),
    "exponent": (0.5, 0.4),
    "tolerance": (0.01, 0.02),
    "graft_b2": (0.99, 0.9),
    "graft_eps": (1e-6, 1e-3),
  },
}
SCHEDULE = optax.linear_schedule(3e-2, 1e-3, 5)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_numeric_hyperparameter_is_injectable(name):
  factory, values = METHODS[name], HYPERPARAMS[name]
  numeric = {
    p.name
    for p in inspect.signature(factory).parameters.values()
    if isinstance(p.default, float) or p.name in ("shampoo_beta", "exponents")
  }
  assert numeric - {"learning_rate"} <= set(values)  # HYPERPARAMS covers the whole signature
  injected = optax.inject_hyperparams(factory, static_args=kp.STATIC_HYPERPARAMS)(
    learning_rate=SCHEDULE, precondition_frequency=2, **{k: a for k, (a, _) in values.items()}
  )
  state = injected.init(PARAMS)
  assert set(state.hyperparams) == set(values) | {"learning_rate"}
  second = {k: jnp.asarray(b, jnp.float32) for k, (_, b) in values.items()}
  state = state._replace(hyperparams={**state.hyperparams, **second})
  plain = factory(SCHEDULE, precondition_frequency=2, **{k: b for k, (_, b) in values.items()})
  update = jax.jit(injected.update)
  expected, _ = _run(plain, _grads(5))
  for t, (g, theirs) in enumerate(zip(_grads(5), expected, strict=True)):
    ours, state = update(g, state, PARAMS)
    _assert_close(ours, theirs, rtol=2e-4)
    np.testing.assert_allclose(state.hyperparams["learning_rate"], SCHEDULE(t), rtol=1e-6)
  assert _nonzero(expected[-1])


def _differs(a, b, rtol=1e-3):
  return any(
    not np.allclose(x, y, rtol=rtol, atol=rtol * float(np.max(np.abs(y)) or 1.0))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def test_start_preconditioning_step_can_be_given_under_inject_hyperparams():
  assert "start_preconditioning_step" in kp.static_hyperparams(kp.shampoo)
  options = dict(precondition_frequency=2, eps=1e-3)
  tx = optax.inject_hyperparams(kp.shampoo, static_args=kp.static_hyperparams(kp.shampoo))(
    learning_rate=1e-2, start_preconditioning_step=3, **options
  )
  grads = _grads(5)
  injected, _ = _run(tx, grads)
  expected, _ = _run(kp.shampoo(1e-2, start_preconditioning_step=3, **options), grads)
  other, _ = _run(kp.shampoo(1e-2, start_preconditioning_step=1, **options), grads)
  for ours, theirs in zip(injected, expected, strict=True):
    _assert_close(ours, theirs)
  # Calls 1 and 2 are grafting alone under start=3, preconditioned under start=1.
  assert _differs(expected[1], other[1])


@pytest.mark.parametrize("name", ["kl_soap", "kl_shampoo"])
def test_init_factor_is_read_at_init_under_inject_hyperparams(name):
  # With the authors' constant start, init_factor is the first eigenvalue estimate: a value
  # given to inject_hyperparams reaches init (a later write to state.hyperparams cannot: it is
  # read once).
  factory = METHODS[name]
  options = dict(precondition_frequency=2, eigenvalue_init="constant", clamp="absolute")
  tx = optax.inject_hyperparams(factory, static_args=kp.STATIC_HYPERPARAMS)(
    learning_rate=1e-2, init_factor=0.5, **options
  )
  grads = _grads(5)
  injected, _ = _run(tx, grads)
  expected, _ = _run(factory(1e-2, init_factor=0.5, **options), grads)
  default, _ = _run(factory(1e-2, **options), grads)
  for ours, theirs in zip(injected, expected, strict=True):
    _assert_close(ours, theirs)
  assert _differs(expected[-1], default[-1])


# optax.tree.map_params ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(METHODS))
def test_optax_map_params_maps_the_parameter_shaped_leaves(name):
  tx = _make(name)
  state = tx.init(PARAMS)
  same = optax.tree.map_params(tx, lambda p: p, state)
  assert jax.tree.structure(same) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(state), strict=True):
    assert a is b
  # The dtype use case: f reaches every parameter-shaped leaf (Shampoo's grafting moments; the
  # buckets' stacks of blocks have none: map_params hands them whole to transform_non_params).
  whole = []
  cast = optax.tree.map_params(
    tx,
    lambda p: p.astype(jnp.bfloat16),
    state,
    transform_non_params=lambda x: whole.append(x) or x,
  )
  is_node = lambda n: isinstance(n, kp.PreconditionerState)  # noqa: E731
  (node,) = [n for n in jax.tree.leaves(state, is_leaf=is_node) if is_node(n)]
  assert any(x is node.buckets for x in whole)
  narrowed = [
    (a.shape, b.dtype)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(cast), strict=True)
    if a.dtype != b.dtype
  ]
  magnitude = state[0].magnitude if name == "shampoo" else ()
  expected = [(x.shape, jnp.dtype(jnp.bfloat16)) for x in jax.tree.leaves(magnitude) if x.ndim]
  assert narrowed == expected
  assert (name == "shampoo") == bool(expected)


# optax.MultiSteps, optax.masked, optax.partition -------------------------------------------------


def _make(name):
  return METHODS[name](1e-2, precondition_frequency=2, eps=EPS.get(name, 1e-8))


@pytest.mark.parametrize("name", list(METHODS))
def test_multi_steps_accumulates_three_micro_batches(name):
  micro = _grads(9)
  updates, state = _run(optax.MultiSteps(_make(name), every_k_schedule=3), micro)
  means = [jax.tree.map(lambda *g: sum(g) / 3, *micro[i : i + 3]) for i in (0, 3, 6)]
  expected, _ = _run(_make(name), means)
  for i, u in enumerate(updates):
    if i % 3 != 2:
      for leaf in jax.tree.leaves(u):
        np.testing.assert_array_equal(leaf, 0.0)
    else:
      _assert_close(u, expected[i // 3], rtol=1e-4)
  assert _nonzero(updates[-1])
  assert int(state.gradient_step) == 3


def _is_matrix(x):
  return x.ndim >= 2


@functools.cache
def _reference(name):
  """The method alone on the tensors of order >= 2, and AdamW alone on the rest."""
  grads = _grads(5)
  split = lambda tree, keep: {k: v for k, v in tree.items() if _is_matrix(PARAMS[k]) == keep}  # noqa: E731
  matrices, _ = _run(_make(name), [split(g, True) for g in grads], split(PARAMS, True))
  rest, _ = _run(optax.adamw(1e-2), [split(g, False) for g in grads], split(PARAMS, False))
  return [{**m, **r} for m, r in zip(matrices, rest, strict=True)]


@pytest.mark.parametrize("name", list(METHODS))
def test_masked_applies_the_method_to_matrices_only(name):
  mask = jax.tree.map(_is_matrix, PARAMS)
  grads = _grads(5)
  updates, _ = _run(optax.masked(_make(name), mask), grads)
  for u, g, ref in zip(updates, grads, _reference(name), strict=True):
    for key in PARAMS:
      if mask[key]:
        np.testing.assert_array_equal(u[key], ref[key])
      else:
        np.testing.assert_array_equal(u[key], g[key])  # masked out: passed through
  assert _nonzero(updates[-1]["w"])


@pytest.mark.parametrize("name", list(METHODS))
def test_partition_routes_matrices_to_the_method_and_the_rest_to_adamw(name):
  labels = jax.tree.map(lambda x: "kp" if _is_matrix(x) else "adamw", PARAMS)
  tx = optax.partition({"kp": _make(name), "adamw": optax.adamw(1e-2)}, labels)
  updates, _ = _run(tx, _grads(5))
  for u, ref in zip(updates, _reference(name), strict=True):
    _assert_close(u, ref, rtol=1e-6)


# Abstract init -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_init_on_shape_dtype_structs_matches_concrete_init(name, dtype):
  params = {**PARAMS, "h": jnp.ones((3, 2), jnp.bfloat16), "long": jnp.ones((40, 2))}
  tx = METHODS[name](1e-2, dtype=dtype, max_precond_dim=16)
  specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  abstract = jax.eval_shape(tx.init, specs)
  concrete = tx.init(params)
  assert jax.tree.structure(abstract) == jax.tree.structure(concrete)
  for a, c in zip(jax.tree.leaves(abstract), jax.tree.leaves(concrete), strict=True):
    assert isinstance(a, jax.ShapeDtypeStruct)
    assert (a.shape, a.dtype) == (c.shape, c.dtype)


# Flax --------------------------------------------------------------------------------------------

# adamw_shampoo preconditions vectors with Adam by default: with full factors, stale roots and no
# grafting a bias's rank-deficient factor scales new directions by up to eps^(-1/2).
FLAX_CASES = [
  pytest.param("soap", 5),
  pytest.param("kl_soap", 5),
  pytest.param("kl_shampoo", 5),
  pytest.param("shampoo", 5),
  pytest.param("adamw_shampoo", 1),
  pytest.param("adamw_shampoo", 5),
]
STEPS = 40


def _data():
  x = jax.random.normal(jax.random.key(1), (64, 6))
  return x, jnp.sin(x[:, :1]) + 0.5 * x[:, 1:2]


def _trains(losses):
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.3 * losses[0], losses[::5]


class _NnxMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(6, 12, rngs=rngs)
    self.out = nnx.Linear(12, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.tanh(self.hidden(x)))


@pytest.mark.parametrize(("name", "frequency"), FLAX_CASES)
def test_flax_nnx_optimizer_trains(name, frequency):
  model = _NnxMLP(nnx.Rngs(0))
  tx = METHODS[name](3e-2, precondition_frequency=frequency)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x, y = _data()

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  _trains([float(step(model, optimizer)) for _ in range(STEPS)])
  assert int(optimizer.step[...]) == STEPS


class _LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(jnp.tanh(nn.Dense(12)(x)))


@pytest.mark.parametrize(("name", "frequency"), FLAX_CASES)
def test_flax_linen_train_state_trains(name, frequency):
  model = _LinenMLP()
  x, y = _data()
  tx = METHODS[name](3e-2, precondition_frequency=frequency)
  state = train_state.TrainState.create(
    apply_fn=model.apply, params=model.init(jax.random.key(0), x)["params"], tx=tx
  )

  @jax.jit
  def step(state):
    def loss_fn(params):
      return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  losses = []
  for _ in range(STEPS):
    state, loss = step(state)
    losses.append(float(loss))
  _trains(losses)
  assert int(state.step) == STEPS


# orbax: save at step 3, restore in a fresh process, continue to step 6 ---------------------------

RESUME_SCRIPT = '''"""Generated by tests/test_ecosystem.py: train, checkpoint, resume in a fresh process."""

import functools
import pathlib
import sys

import jax

jax.config.update("jax_enable_x64", False)

import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import kl_precond as kp

METHODS = {
  "soap": kp.soap,
  "kl_soap": kp.kl_soap,
  "kl_shampoo": kp.kl_shampoo,
  "shampoo": kp.shampoo,
  "adamw_shampoo": kp.adamw_shampoo,
  "eigenvalue_corrected_shampoo": kp.eigenvalue_corrected_shampoo,
}
SAVE_AT, STOP = 3, 6


def make(name):
  return METHODS[name](1e-2, precondition_frequency=2)


def init_params():
  rng = np.random.default_rng(0)
  shapes = {"w": (5, 3), "b": (3,)}
  return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


def loss(params, t):
  rng = np.random.default_rng(100 + t)
  x, y = rng.standard_normal((8, 5)), rng.standard_normal((8, 3))
  h = jnp.tanh(jnp.asarray(x, jnp.float32) @ params["w"] + params["b"])
  return jnp.mean((h - jnp.asarray(y, jnp.float32)) ** 2)


@functools.cache
def compiled_step(name):
  tx = make(name)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def train(name, params, state, start, stop):
  """Steps ``start + 1 .. stop``; returns the parameters after each one and the final state."""
  step = compiled_step(name)
  trajectory = []
  for t in range(start, stop):
    params, state = step(params, state, jax.grad(loss)(params, t))
    trajectory.append(params)
  return trajectory, state


def resume(root, out):
  results = {}
  for name in METHODS:
    tx = make(name)
    abstract = jax.eval_shape(lambda: {"params": init_params(), "opt_state": tx.init(init_params())})
    restored = ocp.StandardCheckpointer().restore(pathlib.Path(root) / name, abstract)
    trajectory, _ = train(name, restored["params"], restored["opt_state"], SAVE_AT, STOP)
    for t, params in enumerate(trajectory, start=SAVE_AT + 1):
      for key, value in params.items():
        results[f"{name}/{t}/{key}"] = np.asarray(value)
  np.savez(out, **results)


if __name__ == "__main__":
  resume(sys.argv[1], sys.argv[2])
'''


def _load(path):
  spec = importlib.util.spec_from_file_location("resume_script", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_orbax_checkpoint_resumes_bit_for_bit_in_a_fresh_process(tmp_path):
  import orbax.checkpoint as ocp

  script = tmp_path / "resume.py"
  script.write_text(RESUME_SCRIPT)
  module = _load(script)
  checkpoints = tmp_path / "checkpoints"
  uninterrupted = {}
  for name in METHODS:
    tx, params = module.make(name), module.init_params()
    first, state = module.train(name, params, tx.init(params), 0, module.SAVE_AT)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(checkpoints / name, {"params": first[-1], "opt_state": state})
    checkpointer.wait_until_finished()
    rest, _ = module.train(name, first[-1], state, module.SAVE_AT, module.STOP)
    uninterrupted[name] = rest
  out = tmp_path / "resumed.npz"
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  result = subprocess.run(
    [sys.executable, str(script), str(checkpoints), str(out)],
    env=env,
    capture_output=True,
    text=True,
    timeout=100,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  resumed = np.load(out)
  for name, trajectory in uninterrupted.items():
    for t, params in enumerate(trajectory, start=module.SAVE_AT + 1):
      for key, value in params.items():
        np.testing.assert_array_equal(resumed[f"{name}/{t}/{key}"], value, err_msg=f"{name} {t}")
    assert not np.array_equal(trajectory[-1]["w"], trajectory[0]["w"])  # it did move
