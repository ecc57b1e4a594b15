"""One process of the multi-process test (``tests/test_multiprocess.py``); not a test module.

Run as ``python -m tests.multiprocess_worker PROCESS_ID NUM_PROCESSES PORT OUTPUT STEPS`` with
``--xla_force_host_platform_device_count`` set to the number of local devices. Every process calls
``jax.distributed.initialize`` (coordinator on ``localhost:PORT``; CPU collectives by gloo, jax's
default), builds one global mesh over the devices of all processes and runs, for every optimizer of
``tests/test_sharding.py``, the same problem as that module with FSDP-sharded or replicated
parameters (alternating) and the sharded state of :mod:`kl_precond.sharding`, exactly as its
docstring tells multi-host users to. Process 0 writes ``OUTPUT`` (``.npz``): the updates of every
step, gathered from all processes, and what each process saw of the state's sharding.
"""

from __future__ import annotations

import sys
from typing import Any

import jax


def _run(name: str, mesh: Any, steps: int, fsdp: bool) -> dict[str, Any]:
  import numpy as np
  import optax
  from jax.experimental import multihost_utils

  from kl_precond import sharding as kps
  from tests import test_sharding as problem

  tx = problem._optimizer(name)
  params, param_shardings, state, state_shardings = problem._sharded_setup(
    tx, mesh, fsdp, problem._params()
  )
  before = jax.tree.map(lambda x: x.sharding, state)
  update = kps.jit_update(tx, param_shardings, state_shardings)
  gradients = jax.jit(problem._grads, static_argnums=1, out_shardings=param_shardings)
  apply = jax.jit(optax.apply_updates, out_shardings=param_shardings)
  result: dict[str, Any] = {}
  for step in range(steps):
    updates, state = update(gradients(params, step), state, params)
    params = apply(params, updates)
    gathered = multihost_utils.process_allgather(updates, tiled=True)
    for path, value in jax.tree_util.tree_leaves_with_path(gathered):
      result[f"{name}/{step}/{jax.tree_util.keystr(path)}"] = np.asarray(value)
  kept = jax.tree.map(lambda b, a: b == a.sharding, before, state)
  declared = jax.tree.map(lambda s, a: s == a.sharding, state_shardings, state)
  result[f"{name}/sharding_kept"] = np.asarray(all(jax.tree.leaves(kept)))
  result[f"{name}/sharding_declared"] = np.asarray(all(jax.tree.leaves(declared)))
  # Rows of each bucket leaf that this process's first device holds, against the global rows.
  (preconditioner,) = problem._preconditioner_states(state)
  leaves = jax.tree.leaves(preconditioner.buckets)
  result[f"{name}/global_rows"] = np.asarray([leaf.shape[0] for leaf in leaves])
  result[f"{name}/local_rows"] = np.asarray(
    [leaf.addressable_shards[0].data.shape[0] for leaf in leaves]
  )
  return result


def main(argv: list[str]) -> None:
  process_id, num_processes, port, output, steps = argv
  jax.distributed.initialize(
    coordinator_address=f"localhost:{port}",
    num_processes=int(num_processes),
    process_id=int(process_id),
  )
  import numpy as np
  from jax.sharding import AxisType

  from tests import test_sharding as problem

  mesh = jax.make_mesh((jax.device_count(),), (problem.AXIS,), axis_types=(AxisType.Explicit,))
  result: dict[str, Any] = {
    "process_count": np.asarray(jax.process_count()),
    "device_count": np.asarray(jax.device_count()),
    "local_device_count": np.asarray(jax.local_device_count()),
  }
  for i, name in enumerate(problem.OPTIMIZERS):  # FSDP and replicated parameters, alternating
    result.update(_run(name, mesh, int(steps), fsdp=i % 2 == 0))
  if jax.process_index() == 0:
    np.savez(output, **result)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1:])
