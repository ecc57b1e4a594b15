"""Golden files in the shared layout (``shared/golden/README.md``) made from a NumPy port, for
parity checks of Distributed Shampoo configurations the shared folder does not hold."""

from __future__ import annotations

import json

import numpy as np

SHAPES = {"w_6x5": (6, 5), "t_3x4x2": (3, 4, 2), "b_4": (4,)}
# DistributedShampoo's constructor kwargs as the shared sidecars write them, but for the
# preconditioner and grafting configs, and with a first refresh (call 5) that is not a multiple
# of the frequency.
DISTRIBUTED_SHAMPOO = {
  "lr": 0.01,
  "betas": [0.9, 0.999],
  "epsilon": 1e-12,
  "weight_decay": 0.01,
  "weight_decay_type": "WeightDecayType.DECOUPLED",
  "max_preconditioner_dim": 256,
  "precondition_frequency": 3,
  "start_preconditioning_step": 5,
  "use_bias_correction": True,
  "distributed_config": "SingleDeviceDistributedConfig(target_parameter_dimensionality=math.inf)",
  "beta3": -1.0,
}


def write(tmp_path, constructor_kwargs, port, *, seed=13, calls=12):
  """Writes ``synthetic.npz`` and its sidecar; ``port(init, grads)`` gives the trajectory
  ``[W_0, ..., W_calls]`` stored as both ``params`` and ``params_default64``. Every factor of
  these shapes is full rank from the fourth call on (so a first refresh after it is
  well-posed)."""
  rng = np.random.default_rng(seed)
  arrays = {"param_names": np.array(list(SHAPES))}
  for name, shape in SHAPES.items():
    init = rng.standard_normal(shape)
    grads = np.stack([rng.standard_normal(shape) for _ in range(calls)])
    trajectory = np.stack(port(init, list(grads)))
    arrays |= {
      f"init/{name}": init,
      f"grads/{name}": grads,
      f"params/{name}": trajectory,
      f"params_default64/{name}": trajectory,
    }
  path = tmp_path / "synthetic.npz"
  np.savez(path, **arrays)
  sidecar = {
    "reference": {
      "repo": "facebookresearch/optimizers",
      "class": "distributed_shampoo.DistributedShampoo",
    },
    "constructor_kwargs": constructor_kwargs,
  }
  path.with_suffix(".json").write_text(json.dumps(sidecar))
  return path
