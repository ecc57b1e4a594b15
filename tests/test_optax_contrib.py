"""optax's own contrib test matrix (``optax/contrib/_common_test.py``), run on every optimizer here.

The test bodies are optax's, taken from the installed optax (``__wrapped__`` of each generated
case of ``ContribTest``), parameterised with this package's optimizers instead of optax's
contrib list. They check, per optimizer:

* extra ``update`` arguments are accepted, and the second call does not recompile;
* 30,000 steps reach the optimum (``rtol = atol = 3e-2``) of a parabola, the Rosenbrock
  function, a matrix parabola and a mixed 1-D/2-D target; ``optax.tree.map_params`` works;
* ``optax.inject_hyperparams`` gives the same updates and states as the plain optimizer;
* updates keep the parameters' dtype (bfloat16, float32), ``optax.MultiSteps`` works;
* state shapes and dtypes are stable under ``lax.cond`` (float16 to float64);
* a learning-rate schedule gives the same steps as the constant it equals.

Two things are adapted, and both are what a user does anyway:

* optax's inject test treats as static only the names on its own list (``warmup_steps``,
  ``rank``, ...). Our size and period hyperparameters (``kp.static_hyperparams(factory)``:
  ``precondition_frequency``, ``max_precond_dim``, ...) shape the computation and cannot be
  traced, so the factory under test hides them from its signature, bound at their values: the
  same as ``optax.inject_hyperparams(f, static_args=kp.static_hyperparams(f))``.
* Our modules use ``from __future__ import annotations``, so ``inspect.signature`` shows the
  string ``'optax.ScalarOrSchedule'``; optax's schedule test compares the annotation object and
  would skip. The factory's signature carries the evaluated annotations.

Learning rates are chosen per optimizer so that 30,000 steps converge on all four targets; the
methods are scale-free (Adam-like), so one rate per method serves every target.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import jax.numpy as jnp
import pytest
from absl.testing import parameterized

import kl_precond as kp

common = pytest.importorskip("optax.contrib._common_test")

# (name in the test ids, factory, keyword arguments). Names are looked up by ``_factory``.
_OPTIMIZERS: dict[str, tuple[Any, dict[str, Any]]] = {
  "shampoo": (kp.shampoo, {"learning_rate": 1e-2}),
  # optax's inject test steps once with all-ones gradients: every factor has rank 1 and the ridge
  # ε is its other eigenvalues. The rounding the matrix product leaves in that null space is
  # amplified by (λ_max/ε)^p in the update, so two programs (plain and injected) that round
  # differently differ by that much: at the authors' ε = 1e-12 by ~1 %. The ridges here bring
  # it under optax's rtol 1e-5; the one-sided root (p = 1/2) needs a relative ridge.
  "adamw_shampoo": (kp.adamw_shampoo, {"learning_rate": 1e-2, "eps": 1e-8}),
  "adamw_shampoo_one_sided": (
    kp.adamw_shampoo,
    {"learning_rate": 1e-2, "eps": 1e-4, "eps_mode": "relative", "exponents": (0.5, 0.0)},
  ),
  "eigenvalue_corrected_shampoo": (kp.eigenvalue_corrected_shampoo, {"learning_rate": 1e-2}),
  "soap": (kp.soap, {"learning_rate": 1e-2}),
  "kl_shampoo": (kp.kl_shampoo, {"learning_rate": 1e-2}),
  "kl_soap": (kp.kl_soap, {"learning_rate": 1e-2}),
}


def _factory(name: str) -> Any:
  """``name``'s factory, with its static hyperparameters bound and evaluated annotations.

  Keyword arguments of the table that are static (``exponents`` of the one-sided entry) are
  bound too; the rest stay in the signature, so ``inject_hyperparams`` injects them.
  """
  factory, kwargs = _OPTIMIZERS[name]
  static = set(kp.static_hyperparams(factory)) | {
    k for k in kwargs if k not in ("learning_rate", "b1", "b2", "eps", "weight_decay")
  }
  bound = {k: v for k, v in kwargs.items() if k in static}
  signature = inspect.signature(factory, eval_str=True)
  params = [p for n, p in signature.parameters.items() if n not in static]

  @functools.wraps(factory)
  def make(*args: Any, **kw: Any) -> Any:
    return factory(*args, **bound, **kw)

  del make.__wrapped__  # inspect.signature must read __signature__, not the wrapped factory's
  make.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
  return make


def _cases() -> list[dict[str, Any]]:
  cases = []
  for name, (_, kwargs) in _OPTIMIZERS.items():
    dynamic = {k: v for k, v in kwargs.items() if k in ("learning_rate", "b1", "b2", "eps")}
    cases.append(
      {"opt_name": name, "opt_kwargs": dynamic, "wrapper_name": None, "wrapper_kwargs": None}
    )
  return cases


_CASES = _cases()
_MAIN = [{k: v for k, v in c.items() if k in ("opt_name", "opt_kwargs")} for c in _CASES]


@pytest.fixture(autouse=True)
def _our_factories(monkeypatch):
  """optax's test bodies find their factories through ``_get_opt_factory``: point it at ours."""
  original = common._get_opt_factory
  monkeypatch.setattr(
    common, "_get_opt_factory", lambda n: _factory(n) if n in _OPTIMIZERS else original(n)
  )


def _body(name: str) -> Any:
  """The undecorated body of optax's ``ContribTest.<name>`` (from its first generated case)."""
  generated = getattr(common.ContribTest, f"{name}0")
  return generated.__wrapped__


class KlPrecondContribTest(parameterized.TestCase):
  """optax's ``ContribTest`` bodies over this package's optimizers; see the module docstring."""

  test_optimizers_accept_extra_args = parameterized.product(_CASES, wrap=[True, False])(
    _body("test_optimizers_accept_extra_args")
  )
  test_optimizers = parameterized.product(
    _CASES,
    target=(
      common._setup_parabola,
      common._setup_rosenbrock,
      common._setup_matrix_parabola,
      common._setup_mixed_tensor_target,
    ),
    dtype=("float32",),
  )(_body("test_optimizers"))
  test_optimizers_can_be_wrapped_in_inject_hyperparams = parameterized.product(_MAIN)(
    _body("test_optimizers_can_be_wrapped_in_inject_hyperparams")
  )
  test_preserve_dtype = parameterized.product(_MAIN, dtype=("bfloat16", "float32"))(
    _body("test_preserve_dtype")
  )
  test_gradient_accumulation = parameterized.product(_MAIN, dtype=("bfloat16", "float32"))(
    _body("test_gradient_accumulation")
  )
  test_state_shape_dtype_shard_stability = parameterized.product(
    _CASES, dtype=(jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)
  )(_body("test_state_shape_dtype_shard_stability"))
  test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such = parameterized.product(
    _CASES
  )(_body("test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such"))


def test_every_body_of_optax_is_run():
  """A new test in optax's ``ContribTest`` must be added here, not silently left out."""
  theirs = {n.rstrip("0123456789") for n in vars(common.ContribTest) if n.startswith("test")}
  ours = {n.rstrip("0123456789") for n in vars(KlPrecondContribTest) if n.startswith("test")}
  assert theirs <= ours, sorted(theirs - ours)


def test_every_public_optimizer_is_in_the_matrix():
  """Every public optimizer (a factory that takes a ``learning_rate``) is in ``_OPTIMIZERS``."""
  public = {
    getattr(kp, n)
    for n in kp.__all__
    if inspect.isfunction(getattr(kp, n))
    and "learning_rate" in inspect.signature(getattr(kp, n)).parameters
  }
  assert len(public) >= 6 and public <= {factory for factory, _ in _OPTIMIZERS.values()}
