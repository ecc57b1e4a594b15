"""Small training problems: every method reduces the loss, with finite updates at every step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kl_precond as kp


def _mlp_problem(seed=0):
  """A 2-layer tanh MLP regressing a fixed random teacher network (full batch)."""
  keys = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(keys[0], (256, 16))
  teacher = jnp.tanh(x @ jax.random.normal(keys[1], (16, 32)) / 4) @ jax.random.normal(
    keys[2], (32, 4)
  )
  params = {
    "w1": jax.random.normal(keys[3], (16, 32)) / 4,
    "b1": jnp.zeros(32),
    "w2": jax.random.normal(keys[4], (32, 4)) / 6,
    "b2": jnp.zeros(4),
  }

  def loss(p):
    hidden = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.mean((hidden @ p["w2"] + p["b2"] - teacher) ** 2)

  return params, loss


def _train(tx, params, loss, steps):
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates)]))
    return optax.apply_updates(params, updates), state, value, finite

  losses = []
  for _ in range(steps):
    params, state, value, finite = step(params, state)
    assert bool(finite)
    losses.append(float(value))
  return np.asarray(losses)


# Loss must fall by this factor within STEPS steps (full batch, no grafting, no clipping).
FACTOR, STEPS = 50.0, 200


@pytest.mark.parametrize(
  "name, tx",
  [
    ("kl_shampoo", kp.kl_shampoo(3e-2, weight_decay=0.0, precondition_frequency=10)),
    ("kl_soap", kp.kl_soap(3e-2, weight_decay=0.0, precondition_frequency=10)),
    ("soap", kp.soap(3e-2, weight_decay=0.0, precondition_frequency=10)),
  ],
)
def test_methods_converge_on_an_mlp(name, tx):
  params, loss = _mlp_problem()
  losses = _train(tx, params, loss, STEPS)
  assert losses[-1] * FACTOR < losses[0], (name, losses[0], losses[-1])
