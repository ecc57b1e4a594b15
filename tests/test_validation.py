"""Eager validation: every bad option raises ``ValueError`` at construction, naming the value.

STYLE rule 8. Construction only (no compilation), so the whole matrix is cheap. Options are
parametrized over the methods they apply to; the valid boundary values are checked to be accepted,
so that an over-eager check fails here too.
"""

from __future__ import annotations

import math

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
