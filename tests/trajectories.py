"""Our trajectories for comparison with the NumPy ports (``tests/numpy_reference.py``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _trajectory(transform, init, grads, apply):
  """``[W_0, W_1, ...]`` of ``W ← apply(W, out)`` with ``out`` from ``transform`` (one tensor
  ``w``, jitted), and the final state."""
  w = jnp.asarray(init)
  state = transform.init({"w": w})
  update = jax.jit(transform.update)
  trajectory = [np.asarray(w)]
  for g in grads:
    out, state = update({"w": jnp.asarray(g)}, state, {"w": w})
    w = apply(w, out["w"])
    trajectory.append(np.asarray(w))
  return np.stack(trajectory), state


def decoupled(transform, init, grads, *, lr, weight_decay):
  """Trajectory ``[W_0, W_1, ...]`` of ``W ← W - lr (P + λW)`` with ``P`` from ``transform``
  (one tensor ``w``), and the final state."""
  return _trajectory(transform, init, grads, lambda w, p: w - lr * (p + weight_decay * w))


def applied(optimizer, init, grads):
  """Trajectory of ``W ← W + U`` with ``U`` from a whole optimizer, and the final state."""
  return _trajectory(optimizer, init, grads, lambda w, u: w + u)
