"""How the factors accumulate: Distributed Shampoo's ``betas=(β₁, 1.0)`` (its default: sums),
``drop_weighting_factor_on_gsquare``, ``use_bias_correction=False`` and ``use_trace_scaling``,
as ``scale_by_shampoo`` / ``scale_by_eigenvalue_corrected_shampoo`` options, against the
independent float64 NumPy ports of ``tests/numpy_reference.py``, directly and through the parity
tool."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kl_precond as kp
from kl_precond import parity
from tests import synthetic_golden, trajectories
from tests.numpy_reference import distributed_shampoo_reference, eigenvalue_corrected_reference


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


# (Distributed Shampoo's options as the ports name them, and ours.)
OPTIONS = {
  "sum (beta2 = 1)": (dict(b2=1.0), dict(b2=1.0)),
  "drop weighting factor": (dict(drop_weighting=True), dict(statistics_weight=1.0)),
  "no bias correction": (dict(use_bias_correction=False), dict(bias_correction=False)),
  "trace scaling": (dict(trace_scaling=0.5), dict(trace_scaling=0.5)),
  "beta3 = 0.81": (dict(beta3=0.81), dict(b3=0.81)),
  "beta3 = 0.5, no bias correction": (
    dict(beta3=0.5, use_bias_correction=False),
    dict(b3=0.5, bias_correction=False),
  ),
  "trace scaling 0.3, sum, no bias correction": (
    dict(trace_scaling=0.3, b2=1.0, use_bias_correction=False),
    dict(trace_scaling=0.3, b2=1.0, bias_correction=False),
  ),
}
METHODS = ["shampoo", "kl shampoo", "shampoo, QR roots", "eigenvalue corrected"]


def _case(method, option, graft, shape, seed, ours=True):
  """The NumPy port's trajectory and (with ``ours``) ours, for one method and option."""
  port_options, our_options = ({}, {}) if option is None else OPTIONS[option]
  port_options = dict(port_options)
  b2 = port_options.pop("b2", 0.999)
  our_options = {k: v for k, v in our_options.items() if k != "b2"}
  rng = np.random.default_rng(seed)
  init = rng.standard_normal(shape)
  grads = [rng.standard_normal(shape) * (1.0 if t < 5 else 0.1) for t in range(13)]
  common = dict(b1=0.9, b2=b2, eps=1e-3, lr=0.01, weight_decay=0.01, every=3, start=4)
  shared = dict(
    precondition_frequency=3,
    start_preconditioning_step=4,
    grafting_type=None if graft is None else "adam",
    graft_b2=0.999 if graft is None else graft[0],
    graft_eps=1e-8 if graft is None else graft[1],
    **our_options,
  )
  if method == "eigenvalue corrected":
    expected = eigenvalue_corrected_reference(init, grads, graft=graft, **common, **port_options)
    transform = kp.scale_by_eigenvalue_corrected_shampoo(0.9, b2, 1e-3, **shared)
  else:
    kl, qr = method == "kl shampoo", method == "shampoo, QR roots"
    expected = distributed_shampoo_reference(
      init, grads, graft=graft, kl=kl, refresh="qr" if qr else "eigh", **common, **port_options
    )
    transform = kp.scale_by_shampoo(
      0.9, b2, 1e-3, kl_factors=kl, refresh="qr" if qr else "eigh", **shared
    )
  if not ours:
    return np.stack(expected), None
  ours, _ = trajectories.decoupled(transform, init, grads, lr=0.01, weight_decay=0.01)
  return np.stack(expected), ours


# Every option on both transforms; on the other estimator and basis stages of Shampoo, the options
# that reach them (the factors' accumulation and scaling, the look-ahead).
CASES = [
  (method, option)
  for option in OPTIONS
  for method in METHODS
  if method in ("shampoo", "eigenvalue corrected")
  or option in ("sum (beta2 = 1)", "trace scaling", "beta3 = 0.81")
]


@pytest.mark.parametrize(("method", "option"), CASES)
def test_statistics_options_match_the_numpy_port(method, option):
  # Options that scale the factors by about a number (a sum instead of a mean, drop weighting,
  # trace scaling) change mostly the step's length, which grafting would undo: those run without
  # it, the others with it.
  graft = (0.999, 1e-8) if "bias correction" in option or "beta3" in option else None
  shape = (3, 4, 2) if method == "shampoo" else (6, 5)
  expected, ours = _case(method, option, graft, shape, seed=31)
  displacement = np.max(np.abs(expected[-1] - expected[0]))
  error = np.max(np.abs(ours - expected)) / displacement
  assert error < 1e-10, error
  # The option changes the trajectory: the port without it is far from ours.
  default, _ = _case(method, None, graft, shape, seed=31, ours=False)
  assert np.max(np.abs(ours - default)) / displacement > 1e-4


def test_a_sum_is_not_bias_corrected_and_grows():
  """``β₂ = 1`` accumulates ``Σ G Gᵀ`` (weight 1, no division by ``1 - 1ᵗ = 0``)."""
  grads = [jnp.full((3, 2), float(t + 1)) for t in range(3)]
  tx = kp.scale_by_shampoo(b2=1.0, grafting_type=None, precondition_frequency=1)
  state = tx.init({"w": jnp.zeros((3, 2))})
  for g in grads:
    _, state = tx.update({"w": g}, state)
  is_node = lambda n: isinstance(n, kp.PreconditionerState)  # noqa: E731
  (node,) = [n for n in jax.tree.leaves(state, is_leaf=is_node) if is_node(n)]
  left = np.asarray(node.buckets[0].estimator.factors[0][0])
  # Each G Gᵀ of a constant (3, 2) block of c is 2c² everywhere: 2 (1 + 4 + 9) = 28.
  np.testing.assert_allclose(left, np.full((3, 3), 28.0))


@pytest.mark.parametrize(
  "build",
  [
    lambda: kp.shampoo(b2=1.5),
    lambda: kp.shampoo(b2=-0.1),
    lambda: kp.eigenvalue_corrected_shampoo(b2=1.01),
    lambda: kp.shampoo(statistics_weight=2.0),
    lambda: kp.frobenius(0.9, weight=-1.0),
    lambda: kp.eigenvalue_corrected(0.9, 0.9, d_weight=1.5),
  ],
)
def test_bad_accumulation_options_are_refused(build):
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    build()


def _port(kwargs, options, config, graft):
  b1, b2 = kwargs["betas"]
  common = {
    "lr": float(np.float32(kwargs["lr"])),
    "b1": b1,
    "b2": b2,
    "eps": kwargs["epsilon"],
    "weight_decay": kwargs["weight_decay"],
    "every": kwargs["precondition_frequency"],
    "start": kwargs["start_preconditioning_step"],
    "graft": graft,
    **options,
  }
  if "EigenvalueCorrected" in config or config == "DefaultSOAPConfig":
    return lambda init, grads: eigenvalue_corrected_reference(init, grads, **common)
  kl = "KL" in config
  return lambda init, grads: distributed_shampoo_reference(init, grads, kl=kl, **common)


PARITY_CASES = {
  "Distributed Shampoo's default betas": (
    "RootInvShampooPreconditionerConfig()",
    {"betas": [0.9, 1.0]},
    {},
  ),
  "no bias correction, KL": (
    "RootInvKLShampooPreconditionerConfig()",
    {"use_bias_correction": False},
    dict(use_bias_correction=False),
  ),
  "drop weighting factor, SOAP": (
    "EigenvalueCorrectedShampooPreconditionerConfig(amortized_computation_config="
    "QREigendecompositionConfig(), drop_weighting_factor_on_gsquare=True)",
    {},
    dict(drop_weighting=True, refresh="qr"),
  ),
  "trace scaling": (
    "RootInvShampooPreconditionerConfig(use_trace_scaling=True, trace_scaling_exponent=0.25)",
    {
      "use_pin_memory": False,
      "shampoo_runtime_config": "ShampooRuntimeConfig(eager_nan_check=False)",
      "concurrency_config": "ConcurrencyConfig()",
    },
    dict(trace_scaling=0.25),
  ),
  "beta3 and no bias correction, eigenvalue corrected": (
    "DefaultSOAPConfig",
    {"beta3": 0.81, "use_bias_correction": False},
    dict(beta3=0.81, use_bias_correction=False, refresh="qr"),
  ),
  "classic momentum, Nesterov, dampening": (
    "RootInvShampooPreconditionerConfig()",
    {
      "iterate_averaging_config": "ClassicMomentumConfig(momentum=0.5, dampening=0.1, "
      "use_nesterov=True)"
    },
    dict(momentum=(0.5, 0.1, True)),
  ),
  # INDEPENDENT: P += (λ / peak_lr) W, the decay per step independent of the lr.
  "classic momentum, independent decay, eigenvalue corrected": (
    "DefaultSOAPConfig",
    {
      "iterate_averaging_config": "ClassicMomentumConfig(momentum=0.8)",
      "weight_decay_type": "WeightDecayType.INDEPENDENT",
    },
    dict(momentum=(0.8, 0.0, False), weight_decay=0.01 / 0.01),
  ),
  # CORRECTED: P += λ (lr_t / peak_lr) W, lr_t read back from a float32 tensor.
  "corrected decay, KL": (
    "RootInvKLShampooPreconditionerConfig()",
    {"weight_decay_type": "WeightDecayType.CORRECTED"},
    dict(weight_decay=0.01 * float(np.float32(0.01)) / 0.01),
  ),
  "trace scaling default exponent, eigenvalue corrected, sums": (
    "EigenvalueCorrectedShampooPreconditionerConfig(use_trace_scaling=True, "
    "amortized_computation_config=EighEigendecompositionConfig())",
    {"betas": [0.9, 1.0]},
    dict(trace_scaling=0.5, refresh="eigh"),
  ),
}


# In the slow job: options whose mapping another case also takes (no bias correction; classic
# momentum; trace scaling).
_SLOW_PARITY_CASES = (
  "no bias correction, KL",
  "classic momentum, independent decay, eigenvalue corrected",
  "trace scaling default exponent, eigenvalue corrected, sums",
)


@pytest.mark.parametrize(
  "case",
  [
    pytest.param(c, id=c, marks=(pytest.mark.slow,) if c in _SLOW_PARITY_CASES else ())
    for c in PARITY_CASES
  ],
)
def test_parity_maps_the_statistics_options(tmp_path, case):
  """The parity tool replays a file made by the NumPy port with each option; read without the
  option (the config and kwargs of the default), the same file does not replay."""
  config, extra, options = PARITY_CASES[case]
  # As above: grafting would hide options that scale the factors by a number.
  graft = (
    (0.999, 1e-8) if any(w in case for w in ("bias correction", "beta3", "momentum")) else None
  )
  kwargs = {
    **synthetic_golden.DISTRIBUTED_SHAMPOO,
    "preconditioner_config": config,
    "grafting_config": "None"
    if graft is None
    else "AdamPreconditionerConfig(beta2=0.999, epsilon=1e-08)",
    **extra,
  }
  path = synthetic_golden.write(tmp_path, kwargs, _port(kwargs, options, config, graft), seed=32)
  records = parity.check(path)
  assert set(records) == {"w_6x5", "t_3x4x2", "b_4"}
  for name, record in records.items():
    assert record["judged"], name
    assert record["error_x64"] < 1e-10, (name, record)
  if "EigenvalueCorrected" in config:
    decomposition = (
      "EighEigendecompositionConfig()" if "Eigh" in config else "QREigendecompositionConfig()"
    )
    default_config = f"EigenvalueCorrectedShampooPreconditionerConfig(amortized_computation_config={decomposition})"
  else:
    default_config = config if config.startswith("Default") else config.split("(")[0] + "()"
  plain = {
    **kwargs,
    "betas": [0.9, 0.999],
    "use_bias_correction": True,
    "beta3": -1.0,
    "preconditioner_config": default_config,
    "iterate_averaging_config": None,
    "weight_decay_type": "WeightDecayType.DECOUPLED",
  }
  sidecar = json.loads(path.with_suffix(".json").read_text())
  path.with_suffix(".json").write_text(json.dumps({**sidecar, "constructor_kwargs": plain}))
  best = max(r["error_x64"] for r in records.values())
  # Read without the option (float64 only): the replay is far from the file.
  arrays = np.load(path)
  worse = max(
    parity.relative_errors(trajectory, arrays[f"params_default64/{name}"])
    for name, trajectory in parity.replay(path, x64=True).items()
  )
  # CORRECTED with a constant lr differs from DECOUPLED only by float32 rounding (~1e-9 here):
  # the mapping must still replay it a hundred times closer.
  assert worse > 100 * best and (worse > 1e-6 or "corrected" in case), (best, worse)


def test_the_adam_fallback_looks_ahead_too():
  """Vectors without a factor (``precondition_1d=False``) take Adam with the same ``β₃``:
  ``(M_{t-1} + (1-β₃)(G - M_{t-1})) √(1-β₂ᵗ) / ((1-β₃β₁^{t-1}) (√V + ε))``, against NumPy."""
  rng = np.random.default_rng(33)
  grads = [rng.standard_normal(4) for _ in range(5)]
  b1, b2, b3, eps = 0.9, 0.99, 0.5, 1e-8
  tx = kp.scale_by_shampoo(
    b1, grafting_type=None, graft_b2=b2, graft_eps=eps, precondition_1d=False, b3=b3
  )
  state = tx.init({"b": jnp.zeros(4)})
  m, v = np.zeros(4), np.zeros(4)
  for t, g in enumerate(grads, start=1):
    ours, state = tx.update({"b": jnp.asarray(g)}, state)
    ahead = m + (1 - b3) * (g - m)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g**2
    expected = ahead * np.sqrt(1 - b2**t) / (1 - b3 * b1 ** (t - 1)) / (np.sqrt(v) + eps)
    np.testing.assert_allclose(np.asarray(ours["b"]), expected, rtol=1e-12)


@pytest.mark.parametrize("name", ["shampoo", "eigenvalue_corrected_shampoo"])
def test_the_new_numbers_can_be_injected(name):
  """``optax.inject_hyperparams`` with ``b2 = 1``, ``b3``, ``statistics_weight`` and
  ``trace_scaling`` as traced arrays gives the updates of the same numbers given as constants."""
  import optax

  factory = getattr(kp, name)
  numbers = dict(b2=1.0, b3=0.5, statistics_weight=1.0, trace_scaling=0.3)
  fixed = dict(precondition_frequency=2, eps=1e-6, grafting_type=None)
  injected = optax.inject_hyperparams(factory, static_args=kp.static_hyperparams(factory))(
    learning_rate=0.1, **numbers, **fixed
  )
  plain = factory(0.1, **numbers, **fixed)
  rng = np.random.default_rng(34)
  params = {"w": jnp.asarray(rng.standard_normal((5, 4))), "b": jnp.zeros(3)}
  states = injected.init(params), plain.init(params)
  injected_step, plain_step = jax.jit(injected.update), jax.jit(plain.update)
  for _ in range(5):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)
    (ours, state_a), (theirs, state_b) = (
      injected_step(grads, states[0], params),
      plain_step(grads, states[1], params),
    )
    states = state_a, state_b
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)
  assert set(numbers) <= set(states[0].hyperparams)
