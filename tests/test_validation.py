"""Eager validation: every bad option raises ``ValueError`` at construction, naming the value.

STYLE rule 8. Construction only (no compilation), so the whole matrix is cheap. Options are
parametrized over the methods they apply to; the valid boundary values are checked to be accepted,
so that an over-eager check fails here too. The second half covers every option of every public
factory (``kp.__all__``) from a table keyed by option name; ``test_every_option_has_cases`` fails
for an option with no cases and no reason in ``UNCHECKED``.
"""

from __future__ import annotations

import inspect
import math
import re

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kl_precond as kp

pytestmark = pytest.mark.timeout(60)

METHODS = {
  "soap": kp.soap,
  "kl_soap": kp.kl_soap,
  "kl_shampoo": kp.kl_shampoo,
  "shampoo": kp.shampoo,
  "adamw_shampoo": kp.adamw_shampoo,
  "eigenvalue_corrected_shampoo": kp.eigenvalue_corrected_shampoo,
}
SCALE_BY = {
  "soap": kp.scale_by_soap,
  "kl_soap": kp.scale_by_kl_soap,
  "kl_shampoo": kp.scale_by_kl_shampoo,
  "shampoo": kp.scale_by_shampoo,
  "eigenvalue_corrected_shampoo": kp.scale_by_eigenvalue_corrected_shampoo,
}
ALL = tuple(METHODS)
SOAP_AND_KL = ("soap", "kl_soap", "kl_shampoo")
KL = ("kl_soap", "kl_shampoo")
SHAMPOO = ("shampoo", "adamw_shampoo")

BAD_BETAS = (-0.1, 1.0, 1.5, math.nan, np.float32(1.0), jnp.asarray(-0.5))
# The Shampoo family's b2 may be 1 (a sum, as Distributed Shampoo's default).
BAD_SUM_BETAS = (-0.1, 1.5, math.nan, np.float32(1.001), jnp.asarray(-0.5))
SUMS = ("shampoo", "adamw_shampoo", "eigenvalue_corrected_shampoo")
BAD_FREQUENCIES = (0, -1, 2.0, 2.5, "2", None, True, np.int64(0))


def _cases(option, methods, values, marks=(), shown=None):
  """``shown``: the text the message must contain (default: the value itself)."""
  return [
    pytest.param(name, option, value, shown, id=f"{name}-{option}={value!r}", marks=marks)
    for name in methods
    for value in values
  ]


REJECTED = (
  _cases("b1", ALL, BAD_BETAS)
  + _cases("b2", [m for m in ALL if m not in SUMS], BAD_BETAS)
  + _cases("b2", SUMS, BAD_SUM_BETAS)
  + _cases("shampoo_beta", SOAP_AND_KL, BAD_BETAS)
  + _cases("graft_b2", ["shampoo", "eigenvalue_corrected_shampoo"], BAD_BETAS)
  + _cases("eps", ALL, (-1e-8, -1.0, math.nan))
  + _cases("graft_eps", ["shampoo"], (-1e-8,))
  + _cases("precondition_frequency", ALL, BAD_FREQUENCIES)
  + _cases("exponents", ["shampoo"], (-0.25, np.asarray(-0.5)))
  + _cases("exponents", ["shampoo"], ((-0.25, 0.75), {2: {0: -0.25}}), shown="-0.25")
  + _cases("exponents", ["adamw_shampoo"], ((-0.25, 0.75), {2: (0.75, -0.25)}), shown="-0.25")
  + _cases(
    "exponents",
    SHAMPOO,
    (np.asarray([-0.25, 0.75]), jnp.asarray([0.75, -0.25])),
  )
  + _cases("exponents", ["adamw_shampoo"], ((0.25, 0.25, 0.0),))
  + _cases("grafting_type", ["shampoo"], ("Adam", "shampoo", 0))
  + _cases("grafting_type", ["shampoo"], ("",), shown="got ''")
  + _cases("eps_mode", SHAMPOO, ("absolute", "Ridge", None))
  + _cases("nonfinite", ALL, ("raise", "Skip", None))
  + _cases("max_precond_dim", ALL, (0, -3, 2.5))
  + _cases("init_factor", KL, (0.0, -0.1))
  + _cases("max_clamp_value", KL, (0.0, -1.0))
  + _cases("damping", KL, (-1e-3,))
  + _cases(
    "start_preconditioning_step", ["shampoo", "eigenvalue_corrected_shampoo"], (-1, 1.5, True)
  )
  + _cases("refresh", ["eigenvalue_corrected_shampoo", *SHAMPOO], ("QR", "power", None))
  + _cases("tolerance", SHAMPOO, (-0.1, 1.5))
  + _cases("qr_iterations", ["eigenvalue_corrected_shampoo"], (0, 1.5, True))
  + _cases("tolerance", ["eigenvalue_corrected_shampoo"], (-0.1, 1.5, math.nan))
  + _cases("exponent", ["eigenvalue_corrected_shampoo"], (-0.5,))
)


def _assert_rejected(factory, option, value, shown=None):
  with pytest.raises(ValueError) as info:
    factory(**{option: value})
  message = str(info.value)
  expected = (shown,) if shown else _shown(value)
  assert any(text in message for text in expected), message


def _shown(value):
  """The texts of which one must be in the message: ``repr`` or ``str`` of the value, never
  empty (``str("")`` is in every message)."""
  texts = tuple(text for text in (repr(value), str(value)) if text.strip())
  assert texts, f"no text shows {value!r}: give shown="
  return texts


@pytest.mark.parametrize(("name", "option", "value", "shown"), REJECTED)
def test_bad_option_raises_with_the_value(name, option, value, shown):
  _assert_rejected(METHODS[name], option, value, shown)


@pytest.mark.parametrize("name", sorted(SCALE_BY))
@pytest.mark.parametrize(
  ("option", "value"),
  [("b1", 1.0), ("b2", -0.1), ("eps", -1.0), ("precondition_frequency", 0), ("nonfinite", "x")],
)
def test_scale_by_factories_validate_too(name, option, value):
  _assert_rejected(SCALE_BY[name], option, value)


@pytest.mark.parametrize("grafting_type", ["adam", "rmsprop", "adagrad", "sgd"])
@pytest.mark.parametrize(("option", "value"), [("graft_b2", 1.0), ("graft_eps", -1.0)])
def test_graft_options_are_checked_for_every_grafting_type(grafting_type, option, value):
  _assert_rejected(lambda **kw: kp.shampoo(grafting_type=grafting_type, **kw), option, value)


@pytest.mark.parametrize(("option", "value"), [("graft_b2", 1.5), ("graft_eps", -1.0)])
def test_graft_options_are_checked_without_grafting(option, value):
  _assert_rejected(lambda **kw: kp.shampoo(grafting_type=None, **kw), option, value)


@pytest.mark.parametrize("value", ["bogus", None, "identity "])
def test_first_call_is_checked(value):
  stages = (kp.frobenius(0.9), kp.qr_every(2), kp.adam())
  _assert_rejected(lambda **kw: kp.scale_by_preconditioner(*stages, **kw), "first_call", value)


def test_layout_and_layout_arguments_are_exclusive():
  with pytest.raises(ValueError, match="max_precond_dim=7"):
    kp.soap(layout=kp.LayoutConfig(8), max_precond_dim=7)


ACCEPTED = (
  _cases("b1", ALL, (0.0, 0.999, np.float32(0.5)))
  + _cases("b2", ALL, (0.0, 0.999))
  + _cases("shampoo_beta", SOAP_AND_KL, (0.0, 0.5))
  + _cases("eps", ALL, (0.0, 1e-30))
  + _cases("precondition_frequency", ALL, (1,))
  + _cases("precondition_frequency", ALL, (np.int64(3),))
  + _cases("max_precond_dim", ALL, (1,))
  + _cases("nonfinite", ALL, ("skip", "propagate"))
  + _cases("init_factor", KL, (1e-12,))
  + _cases("damping", KL, (0.0,))
  + _cases("max_clamp_value", KL, (None,))
  + _cases("start_preconditioning_step", ["shampoo"], (0, 1, None))
  + _cases("grafting_type", ["shampoo"], (None, "adam", "rmsprop", "adagrad", "sgd"))
  + _cases("eps_mode", SHAMPOO, ("ridge", "relative"))
  + _cases("exponents", ["shampoo"], (None, 0.0, (0.5, 0.0)))
  + _cases("exponents", ["adamw_shampoo"], ((0.5, 0.0), (0.0, 0.5), jnp.asarray([0.2, 0.3])))
)


@pytest.mark.parametrize(("name", "option", "value", "shown"), ACCEPTED)
def test_valid_boundary_values_are_accepted(name, option, value, shown):
  del shown
  assert isinstance(METHODS[name](**{option: value}), optax.GradientTransformation)


# --- Every option of every public factory ----------------------------------------------------
#
# Bad values are keyed by option name (one name, one domain), with per-(factory, option)
# overrides where a name means different things in different factories. Each checked option also
# has valid boundary values, so that an over-eager check fails too. ``UNCHECKED`` lists the
# options no value of which is bad, with the reason; a new option with neither a case nor an
# exemption fails ``test_every_option_has_cases``.

INF = math.inf
BETA = (math.nan, -0.1, 1.5, "0.9", True)
SUM = (math.nan, -0.1, 1.5, "1", True)  # a weight in [0, 1]; 1 is a sum
NONNEGATIVE = (math.nan, -1.0, INF, "1e-8", True)
POSITIVE = (math.nan, 0.0, -1.0, INF, "0.1")
BOOLEAN = ("yes", 2, 1, None)
DTYPE = ("float17", "int32", jnp.int8, 3)
CHOICE = ("bogus", "", None)
FREQUENCY = (0, -1, 2.5, True, "2", None)
START = (-1, 1.5, True, "2")
STAGE = ("bogus", None, optax.identity())

BAD = {
  "learning_rate": (math.nan, -1.0, INF, "1e-3", None),
  "weight_decay": (math.nan, -1.0, INF, "0.01", None),
  "b1": BETA,
  "b2": BETA,
  "b3": BETA,
  "beta": SUM,
  "shampoo_beta": BETA,
  "graft_b2": BETA,
  "weight": SUM,
  "statistics_weight": SUM,
  "d_weight": SUM,
  "eps": NONNEGATIVE,
  "graft_eps": NONNEGATIVE,
  "ridge": NONNEGATIVE,
  "damping": NONNEGATIVE,
  "trace_floor": NONNEGATIVE,
  "trace_scaling": NONNEGATIVE,
  "eigenvalue_floor": NONNEGATIVE,
  "init_factor": POSITIVE,
  "max_clamp_value": POSITIVE,
  "tolerance": (math.nan, -0.1, 1.5, np.float32(1.5), "0", True),
  "exponents": (math.nan, -0.25, INF, "bogus", (-0.25, 0.75), {2: {0: -0.25}}),
  "exponent": (math.nan, -0.5, INF, "bogus", {2: -0.5}),
  "precondition_frequency": FREQUENCY,
  "every": FREQUENCY,
  "max_precond_dim": (0, -3, 2.5, True, None),
  "bucket_multiple": (0, 2.5, True, None),
  "iterations": (0, 1.5, True, None),
  "qr_iterations": (0, 1.5, True, "2"),
  "start": START,
  "start_preconditioning_step": START,
  "unrotated_axes": ({2: (5,)}, {2: (-1,)}, {0: (0,)}, {2: 1}, "bogus"),
  "unfactored_axes": (((2, (5,)),), ((2, 1),), "bogus"),
  "dtype": DTYPE,
  "layout": ("big", {}, 10000),
  "nonfinite": CHOICE,
  "eps_mode": CHOICE,
  "eps_placement": CHOICE,
  "refresh": CHOICE,
  "first_call": CHOICE,
  "eigenvalue_init": CHOICE,
  "clamp": CHOICE,
  "kind": CHOICE,
  "grafting_type": ("bogus", "", "Adam"),
  "direction": ("bogus", None),
  "magnitude": ("bogus", None),
  "estimator": STAGE,
  "basis": STAGE,
  "scaling": STAGE,
  "fallback": ("bogus", optax.identity()),
  "factory": ("bogus", None),
  **dict.fromkeys(
    (
      "bias_correction",
      "merge_small_dims",
      "precondition_1d",
      "normalize_grads",
      "sort_basis",
      "stagger_refresh",
      "stagger",
      "cache_roots",
      "store_bases",
      "kl_factors",
      "sort",
      "relative_ridge",
      "keep_eigenvalues",
      "keep_bases",
      "ascending",
      "momentum_in_eigenbasis",
      "debias_first_moment",
      "statistics_first",
      "blocking",
      "squeeze",
      "channels_last",
    ),
    BOOLEAN,
  ),
}
SHAMPOO_FAMILY = (
  "shampoo",
  "scale_by_shampoo",
  "adamw_shampoo",
  "eigenvalue_corrected_shampoo",
  "scale_by_eigenvalue_corrected_shampoo",
  "eigenvalue_corrected",
)
BAD_OVERRIDES = {
  # b2 is a sum at 1 for the Shampoo family (Distributed Shampoo's default betas=(0.9, 1.0)).
  **{(name, "b2"): SUM for name in SHAMPOO_FAMILY},
  # kl's beta also weighs the eigenvalue EMA: a sum is not allowed.
  ("kl", "beta"): BETA,
  # adamw_shampoo's exponents are the matrices' pair (a, b).
  ("adamw_shampoo", "exponents"): (
    (-0.25, 0.75),
    (0.25, 0.25, 0.0),
    (math.nan, 0.5),
    (0.25, "0.25"),
    {2: (0.75, -0.25)},
  ),
  ("graft", "start_preconditioning_step"): (*START, None),
}

UNCHECKED = {
  **{
    (name, "mask"): "any pytree or callable is a valid mask in optax.add_decayed_weights"
    for name in ("soap", "kl_soap", "kl_shampoo", "shampoo", "adamw_shampoo")
  },
  ("eigenvalue_corrected_shampoo", "mask"): (
    "any pytree or callable is a valid mask in optax.add_decayed_weights"
  ),
}

BOOL_GOOD = (True, False, np.bool_(True))
GOOD = {
  "learning_rate": (0.0, 1e-3, np.float32(1e-3), optax.constant_schedule(1e-3)),
  "weight_decay": (0.0, 0.01, optax.constant_schedule(0.01)),
  "b1": (0.0, 0.999, np.float32(0.5)),
  "b2": (0.0, 0.999),
  "b3": (None, 0.0, 0.81),
  "beta": (0.0, 0.999, 1.0),
  "shampoo_beta": (None, 0.0, 0.999),
  "graft_b2": (0.0, 0.999),
  "weight": (None, 0.0, 1.0),
  "statistics_weight": (None, 0.5, 1.0),
  "d_weight": (None, 0.5, 1.0),
  "eps": (0.0, 1e-30),
  "graft_eps": (0.0, 1e-30),
  "ridge": (0.0, 1e-6),
  "damping": (0.0, 1e-3),
  "trace_floor": (0.0, 1e-12),
  "trace_scaling": (None, 0.0, 0.5, 1.0),
  "eigenvalue_floor": (None, 0.0, 1e-12),
  "init_factor": (1e-12, 1.0),
  "max_clamp_value": (None, 1e-3, 4000),
  "tolerance": (0.0, 1.0, np.float32(0.5)),
  "exponents": (None, 0.0, 0.5, (0.5, 0.0), {2: {0: 0.25}}, jnp.asarray([0.2, 0.3])),
  "exponent": (0.0, 0.5, {2: 0.25}),
  "precondition_frequency": (1, np.int64(3)),
  "every": (1, np.int64(3)),
  "max_precond_dim": (1, 10000),
  "bucket_multiple": (1, 8),
  "iterations": (1, 5),
  "qr_iterations": (None, 1, 5),
  "start": (0, 1, np.int64(2)),
  "start_preconditioning_step": (0, 1, np.int64(2)),
  "unrotated_axes": (None, {}, {2: (1,)}, {2: [0, 1], 3: (2,)}),
  "unfactored_axes": ((), ((2, (1,)),), ((1, (0,)), (3, (0, 2)))),
  "dtype": (None, "bfloat16", jnp.float16, np.float32, jnp.dtype("float32")),
  "layout": (None, kp.LayoutConfig(), kp.LayoutConfig(8, blocking=True)),
  "nonfinite": ("skip", "propagate"),
  "eps_mode": ("ridge", "relative"),
  "eps_placement": ("inside", "outside"),
  "refresh": ("eigh", "qr"),
  "first_call": ("init_only", "precondition", "identity"),
  "eigenvalue_init": ("eigh", "trace", "debiased", "constant"),
  "clamp": ("relative", "absolute"),
  "kind": ("sgd", "adagrad", "rmsprop", "adam"),
  "grafting_type": (None, "adam", "rmsprop", "adagrad", "sgd"),
  "direction": (optax.identity(),),
  "magnitude": (optax.identity(), kp.graft_magnitude("sgd")),
  "estimator": (kp.frobenius(0.9), kp.kl(0.9)),
  "basis": (kp.qr_every(2), kp.eigh_every(2)),
  "scaling": (kp.adam(), kp.eigenvalue_corrected()),
  "fallback": (None, kp.adam()),
  "factory": (kp.soap, kp.shampoo),
  **{name: BOOL_GOOD for name, bad in BAD.items() if bad is BOOLEAN},
}
GOOD_OVERRIDES = {
  ("shampoo", "start_preconditioning_step"): (None, 0, 1),
  ("scale_by_shampoo", "start_preconditioning_step"): (None, 0, 1),
  ("eigenvalue_corrected_shampoo", "start_preconditioning_step"): (None, 0, 1),
  ("scale_by_eigenvalue_corrected_shampoo", "start_preconditioning_step"): (None, 0, 1),
  **{(name, "b2"): (0.0, 0.999, 1.0) for name in SHAMPOO_FAMILY},
  ("kl", "beta"): (0.0, 0.999),
  ("adamw_shampoo", "exponents"): ((0.5, 0.0), (0.0, 0.5), jnp.asarray([0.2, 0.3])),
  # cache_roots needs eps_placement="inside" (kronecker_eigenvalues' default is "outside").
  ("kronecker_eigenvalues", "cache_roots"): (False, np.bool_(False)),
}

# The arguments a factory cannot be called without.
REQUIRED = {
  "frobenius": {"beta": 0.9},
  "kl": {"beta": 0.9},
  "kl_roots": {"beta": 0.9},
  "eigh_every": {"every": 2},
  "qr_every": {"every": 2},
  "qr_algorithm_every": {"every": 2},
  "graft": {"direction": optax.identity(), "magnitude": kp.graft_magnitude()},
  "scale_by_preconditioner": {
    "estimator": kp.frobenius(0.9),
    "basis": kp.qr_every(2),
    "scaling": kp.adam(),
  },
  "static_hyperparams": {"factory": kp.soap},
}


def _factories():
  """Every public callable of ``kp.__all__`` that takes options: functions, and LayoutConfig."""
  result = {}
  for name in kp.__all__:
    obj = getattr(kp, name)
    if callable(obj) and (not inspect.isclass(obj) or obj is kp.LayoutConfig):
      result[name] = obj
  return result


FACTORIES = _factories()


def _options():
  return [
    (name, option)
    for name, factory in FACTORIES.items()
    for option in inspect.signature(factory).parameters
  ]


def _label(value):
  """``repr`` without memory addresses, so that every xdist worker collects the same ids."""
  return re.sub(r" at 0x[0-9a-f]+", "", repr(value))


def _table_cases(table, overrides):
  cases = []
  for name, option in _options():
    if (name, option) in UNCHECKED:
      continue
    for value in overrides.get((name, option), table.get(option, ())):
      cases.append(pytest.param(name, option, value, id=f"{name}-{option}={_label(value)}"))
  return cases


def test_every_option_has_cases():
  """A new option needs bad and good values here, or an exemption in ``UNCHECKED``."""
  missing_bad, missing_good = [], []
  for name, option in _options():
    if (name, option) in UNCHECKED:
      continue
    if not BAD_OVERRIDES.get((name, option), BAD.get(option)):
      missing_bad.append((name, option))
    if not GOOD_OVERRIDES.get((name, option), GOOD.get(option)):
      missing_good.append((name, option))
  assert not missing_bad, f"options with no bad values and no UNCHECKED reason: {missing_bad}"
  assert not missing_good, f"options with no valid values: {missing_good}"
  known = set(_options())
  stale = [key for key in (*UNCHECKED, *BAD_OVERRIDES, *GOOD_OVERRIDES) if key not in known]
  assert not stale, f"entries for options that do not exist: {stale}"
  assert all(reason.strip() for reason in UNCHECKED.values())
  # Sanity of the enumeration itself: the factories the issue names are all here.
  for expected in ("soap", "adam", "graft", "static_hyperparams", "LayoutConfig", "kl_roots"):
    assert expected in FACTORIES


def _call(name, option, value):
  return FACTORIES[name](**{**REQUIRED.get(name, {}), option: value})


@pytest.mark.parametrize(("name", "option", "value"), _table_cases(BAD, BAD_OVERRIDES))
def test_every_bad_option_raises_with_the_value(name, option, value):
  with pytest.raises(ValueError) as info:
    _call(name, option, value)
  message = str(info.value)
  assert option in message, message
  assert any(text in message for text in _shown(value)), message


@pytest.mark.parametrize(("name", "option", "value"), _table_cases(GOOD, GOOD_OVERRIDES))
def test_every_valid_option_is_accepted(name, option, value):
  _call(name, option, value)


@pytest.mark.parametrize(
  ("name", "option", "value"),
  [
    ("shampoo", "weight_decay", math.nan),
    ("shampoo", "trace_scaling", math.nan),
    ("shampoo", "trace_scaling", -1),
    ("eigenvalue_corrected_shampoo", "trace_scaling", -1),
    ("eigenvalue_corrected_shampoo", "unrotated_axes", {2: (5,)}),
    ("soap", "dtype", "float17"),
    ("kl_shampoo", "layout", "big"),
    ("soap", "sort_basis", "yes"),
    ("kl_soap", "sort_basis", "yes"),
  ],
)
def test_the_options_issue_28_found_accepted_are_refused(name, option, value):
  """The values an audit found accepted at construction (issue #28), kept whatever the table."""
  _assert_rejected(FACTORIES[name], option, value)
