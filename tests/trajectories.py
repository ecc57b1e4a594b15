"""Our trajectories for comparison with the NumPy ports (``tests/numpy_reference.py``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def decoupled(transform, init, grads, *, lr, weight_decay):
  """Trajectory ``[W_0, W_1, ...]`` of ``W ← W - lr (P + λW)`` with ``P`` from ``transform``
  (one tensor ``w``), and the final state."""
  w = jnp.asarray(init)
  state = transform.init({"w": w})
  update = jax.jit(transform.update)
  trajectory = [np.asarray(w)]
  for g in grads:
    direction, state = update({"w": jnp.asarray(g)}, state, {"w": w})
    w = w - lr * (direction["w"] + weight_decay * w)
    trajectory.append(np.asarray(w))
  return np.stack(trajectory), state
