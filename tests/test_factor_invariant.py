"""The optimizers' Frobenius factors are exactly the one-step power-iteration factors.

``kp.soap`` and ``kp.shampoo`` keep ``L = Σ_t (1-β) β^(K-1-t) G_t G_tᵀ`` (EMA from zero), which is
``diagnostics.shampoo_stats(grads, ema_weights(K, β))``: Shampoo², one step of the power iteration
toward the optimal Kronecker approximation of the gradient covariance (Morwani et al.).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kl_precond as kp
from kl_precond import diagnostics


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _factors_after(tx, grads):
  params = {"w": jnp.zeros(grads.shape[1:])}
  state, step = tx.init(params), jax.jit(tx.update)
  for g in grads:
    _, state = step({"w": g}, state, params)
  return state


@pytest.mark.parametrize("shape", [(6, 4), (3, 7)])
def test_soap_factors_are_shampoo_squared_statistics(shape):
  grads = jnp.asarray(np.random.default_rng(0).standard_normal((9, *shape)))
  beta = 0.8
  state = _factors_after(kp.scale_by_soap(shampoo_beta=beta, precondition_frequency=2), grads)
  left, right = state.buckets[0].estimator.factors
  expected = diagnostics.shampoo_stats(grads, diagnostics.ema_weights(len(grads), beta))
  np.testing.assert_allclose(left[0], expected.left, rtol=1e-12)
  np.testing.assert_allclose(right[0], expected.right, rtol=1e-12)
  # ... which is one (non-alternating) power step from the identity, H never formed.
  step = diagnostics.kronecker_power_iteration(
    grads, 1, diagnostics.ema_weights(len(grads), beta), alternating=False
  )
  scale_left = np.trace(expected.left) / np.trace(step.left)
  np.testing.assert_allclose(step.left * scale_left, expected.left, rtol=1e-10)


def test_shampoo_factors_are_the_same_statistics():
  grads = jnp.asarray(np.random.default_rng(1).standard_normal((7, 5, 4)))
  tx = kp.scale_by_shampoo(b2=0.9, precondition_frequency=3, grafting_type=None)
  state = _factors_after(tx, grads)
  left, right = state.buckets[0].estimator.factors
  expected = diagnostics.shampoo_stats(grads, diagnostics.ema_weights(len(grads), 0.9))
  np.testing.assert_allclose(left[0], expected.left, rtol=1e-12)
  np.testing.assert_allclose(right[0], expected.right, rtol=1e-12)
