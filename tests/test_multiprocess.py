"""Multi-host, for real: two processes joined by ``jax.distributed.initialize`` on this machine.

Two worker processes (``tests/multiprocess_worker.py``), each with 2 CPU devices, form one global
4-device mesh (CPU collectives by gloo over localhost) and run every optimizer on the problem of
``tests/test_sharding.py``: FSDP-sharded or replicated parameters (alternating between the
optimizers), the optimizer state sharded by :mod:`kl_precond.sharding`, 7 steps with a refresh every
3. The updates, gathered from both processes, must equal this process's single-device run to 1e-6;
the state must keep its declared shardings; and the bucket of 8 blocks must be split, 2 blocks per
device, across the processes. This is the multi-host recipe of the :mod:`kl_precond.sharding`
docstring, run as written.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
from typing import Any

import jax
import numpy as np
import pytest

from tests import test_sharding as problem

# Two fresh processes compile every optimizer (2-3 minutes): in the slow job (README, .ci/run).
pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

PROCESSES = 2
LOCAL_DEVICES = 2
STEPS = 7  # refreshes at steps 3 and 6 (FREQUENCY = 3), besides the first call
WORKER_TIMEOUT = 420.0
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return int(s.getsockname()[1])


def _launch(output: pathlib.Path) -> None:
  """Runs the workers to completion; fails with their output if any of them fails or hangs."""
  env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(ROOT))
  env["XLA_FLAGS"] = (
    f"--xla_force_host_platform_device_count={LOCAL_DEVICES} "
    "--xla_cpu_enable_concurrency_optimized_scheduler=false"
  )
  port = _free_port()
  workers = [
    subprocess.Popen(
      [sys.executable, "-m", "tests.multiprocess_worker", str(i), str(PROCESSES), str(port),
       str(output), str(STEPS)],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    for i in range(PROCESSES)
  ]  # fmt: skip
  logs = []
  try:
    for worker in workers:
      logs.append(worker.communicate(timeout=WORKER_TIMEOUT)[0])
  except subprocess.TimeoutExpired:
    for worker in workers:
      worker.kill()
    pytest.fail(f"a worker did not finish in {WORKER_TIMEOUT:.0f} s")
  failed = [
    (i, worker.returncode, log[-3000:])
    for i, (worker, log) in enumerate(zip(workers, logs, strict=True))
    if worker.returncode != 0
  ]
  assert not failed, failed


@pytest.fixture(scope="module")
def gathered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
  output = tmp_path_factory.mktemp("multiprocess") / "result.npz"
  _launch(output)
  with np.load(output) as data:
    return dict(data)


def test_the_workers_formed_one_mesh(gathered: dict[str, np.ndarray]) -> None:
  assert int(gathered["process_count"]) == PROCESSES
  assert int(gathered["local_device_count"]) == LOCAL_DEVICES
  assert int(gathered["device_count"]) == PROCESSES * LOCAL_DEVICES


@pytest.mark.parametrize("name", problem.OPTIMIZERS)
def test_two_processes_equal_one_device(name: str, gathered: dict[str, np.ndarray]) -> None:
  expected_history, _ = problem._reference(name)
  compared = 0
  for step, expected in enumerate(expected_history[:STEPS]):
    for path, value in jax.tree_util.tree_leaves_with_path(expected):
      actual = gathered[f"{name}/{step}/{jax.tree_util.keystr(path)}"]
      np.testing.assert_allclose(
        actual, value, rtol=problem.TOLERANCE, atol=problem.TOLERANCE, err_msg=f"step {step}"
      )
      compared += 1
  assert compared == STEPS * len(jax.tree.leaves(expected_history[0]))


@pytest.mark.parametrize("name", problem.OPTIMIZERS)
def test_state_sharding_is_kept_and_split_across_processes(
  name: str, gathered: dict[str, Any]
) -> None:
  assert bool(gathered[f"{name}/sharding_kept"])
  assert bool(gathered[f"{name}/sharding_declared"])
  devices = PROCESSES * LOCAL_DEVICES
  global_rows, local_rows = gathered[f"{name}/global_rows"], gathered[f"{name}/local_rows"]
  split = global_rows % devices == 0
  assert split.any() and (~split).any()  # the bucket of 8 blocks, and those of 1 or 3
  np.testing.assert_array_equal(local_rows[split], global_rows[split] // devices)
  np.testing.assert_array_equal(local_rows[~split], global_rows[~split])
