"""Refresh scaling over devices: the sharded eigh/QR of a stack of blocks on 1, 2, 4, 8 devices.

The parameters are ``--blocks`` matrices of ``--dim × --dim``, so the optimizer state has one
bucket of ``--blocks`` blocks, sharded over a 1-D mesh with :mod:`kl_precond.sharding`. With
``precondition_frequency=1`` every update is a refresh step; two refreshes are timed:

* ``eigh``: Frobenius factors, a full eigendecomposition of both factors of every block
  (``scale_by_preconditioner(frobenius, eigh_every(1), adam)``, Shampoo's refresh);
* ``qr``: SOAP, one power step and QR of both factors of every block.

For each device count ``n`` and method it reports:

* ``wall``: median time of one jitted, sharded update on ``n`` fake CPU devices, each count in
  its own subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count=n`` must be set before
  JAX starts);
* ``per_device``: median time of the same update on one device with ``blocks / n`` blocks: the
  work that one device does in the ``n``-device program, its share of the refresh. On ``n`` real
  devices the wall time would approach this, plus communication;
* ``local_batch``: how many blocks each device's decomposition calls take in the compiled HLO
  (``blocks / n`` when the refresh is split).

**Honest caveats.** Fake CPU devices share the machine's cores (``os.cpu_count()``), so the
``wall`` time cannot fall below the total work divided by the cores: on a 2-core machine it
stops improving after 2 devices. The ``per_device`` column is the one that falls. The workers
set ``OPENBLAS_NUM_THREADS=1``: the fake devices call LAPACK concurrently, and OpenBLAS's own
threads on top made a 2-device eigh of 16 blocks of 256² take 0.8 to 10 s instead of 0.1 s.
A sharded run can also **hang** in jaxlib 0.10.2 when there are as many fake devices as cores:
a batched LAPACK call under ``lax.cond`` (where the chassis refreshes) splits its batch over the
intra-op thread pool and waits, while every pool thread is itself blocked, in such a call or in
a collective waiting for the devices that cannot run (on 2 cores: 8 blocks of 256² per device
hung on 2 devices, 4 per device on 4 devices aborted in XLA's 40 s rendezvous check; one block
per device, or a few small ones, ran). A worker killed after ``--timeout`` is reported as
``hung``, one that died as ``aborted``. This is a fake-device artefact of the CPU runtime, not
a property of the sharding: on real devices each has its own executor.

**Processes.** The sharded wall time on separate executors is measured with processes instead:
``--processes=1,2`` launches, for each count ``n``, ``n`` processes joined by
``jax.distributed.initialize`` on localhost (CPU collectives by gloo), each with one CPU device
and pinned to one core of its own (``os.sched_setaffinity``), so that ``n`` processes are ``n``
one-core devices: the multi-host recipe of :mod:`kl_precond.sharding`. The same sharded update
is timed (``proc_wall``, process 0's median; every step ends in the collectives that assemble
the replicated update, so the processes run in lockstep). Counts above the machine's cores share
cores again and are skipped.

    python -m benchmarks.scaling                         # devices 1,2,4,8; 16 blocks of 256x256
    python -m benchmarks.scaling --blocks 8 --steps 5
    python -m benchmarks.scaling --smoke                 # tiny setting, < 30 s

Writes ``scaling.json``, ``scaling.md`` and ``scaling.png`` to ``--out_dir``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
from absl import app, flags
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

import kl_precond as kp
from kl_precond import sharding as kps

METHODS = ("eigh", "qr")
AXIS = "blocks"
RESULT_PREFIX = "SCALING_RESULT "


@dataclasses.dataclass(frozen=True)
class ScalingConfig:
  """One scaling experiment."""

  devices: tuple[int, ...] = (1, 2, 4, 8)
  blocks: int = 16
  dim: int = 256
  steps: int = 10
  methods: tuple[str, ...] = METHODS
  processes: tuple[int, ...] = (1, 2)
  timeout: float = 90.0
  out_dir: str = "outputs/benchmarks"
  progress: bool = True


SMOKE: dict[str, Any] = {"blocks": 8, "dim": 32, "steps": 3, "processes": (1, 2)}


def _optimizer(method: str) -> Any:
  if method == "qr":
    return kp.scale_by_soap(precondition_frequency=1)
  return kp.scale_by_preconditioner(kp.frobenius(0.95), kp.eigh_every(1), kp.adam(0.95, 0.95))


def _params(blocks: int, dim: int) -> dict[str, Any]:
  keys = jax.random.split(jax.random.key(0), blocks)
  return {f"w{i:02d}": jax.random.normal(k, (dim, dim)) for i, k in enumerate(keys)}


def _median_ms(update: Any, grads: Any, state: Any, params: Any, steps: int) -> float:
  """Median wall time of ``steps`` refresh steps, after two warm-up calls (compile, first call)."""
  for _ in range(2):
    _, state = jax.block_until_ready(update(grads, state, params))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    _, state = jax.block_until_ready(update(grads, state, params))
    times.append(1e3 * (time.perf_counter() - start))
  return statistics.median(times)


def _local_batches(compiled_text: str, dim: int) -> list[int]:
  # From 512 on, the basis stage pads a factor on CPU by 8 rows (QR) or rows and columns (eigh).
  sides = f"(?:{dim}|{dim + 8})"
  pattern = rf"f32\[(\d+),{sides},{sides}\][^\n]*custom_call_target=\"lapack_s(?:syevd|geqrf)"
  return sorted({int(b) for b in re.findall(pattern, compiled_text)})


def _emit(row: dict[str, Any]) -> None:
  print(RESULT_PREFIX + json.dumps(row), flush=True)


def measure_sharded(
  method: str, config: ScalingConfig, key: dict[str, Any], prefix: str = ""
) -> None:
  """Emits the HLO's local batch, then the wall time, of a sharded update on all devices (of
  every process); in several processes only process 0 emits."""
  tx = _optimizer(method)
  params = _params(config.blocks, config.dim)
  mesh = jax.make_mesh((jax.device_count(),), (AXIS,), axis_types=(AxisType.Explicit,))
  param_shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
  abstract = jax.eval_shape(tx.init, params)
  state_shardings = kps.state_shardings(abstract, mesh, AXIS, params=params)
  # jit with out_shardings makes global arrays in one process or several (each computes the
  # same values).
  params = jax.jit(lambda p: p, out_shardings=param_shardings)(params)
  grads = jax.jit(lambda p: jax.tree.map(lambda x: 0.1 * x, p), out_shardings=param_shardings)(
    params
  )
  state = kps.jit_init(tx, param_shardings, state_shardings)(params)
  update = kps.jit_update(tx, param_shardings, state_shardings)
  compiled = update.lower(grads, state, params).compile().as_text()
  wall = _median_ms(update, grads, state, params, config.steps)
  if jax.process_index() == 0:
    _emit({**key, f"{prefix}local_batch": _local_batches(compiled, config.dim)})
    _emit({**key, f"{prefix}wall_ms": wall})


def measure_per_device(method: str, num_devices: int, config: ScalingConfig) -> None:
  """Emits the time of one device's share: the update of ``blocks / n`` blocks on one device."""
  tx = _optimizer(method)
  share = _params(config.blocks // num_devices, config.dim)
  per_device = _median_ms(jax.jit(tx.update), share, tx.init(share), share, config.steps)
  _emit({"method": method, "devices": num_devices, "per_device_ms": per_device})


def _worker(kind: str, num_devices: int, config: ScalingConfig) -> None:
  """A sharded worker measures its device count; on one device it also measures every share."""
  if jax.device_count() != num_devices:
    raise RuntimeError(f"expected {num_devices} devices, got {jax.device_count()}")
  if kind == "sharded":
    for method in config.methods:
      measure_sharded(method, config, {"method": method, "devices": num_devices})
  if num_devices == 1:
    for n in config.devices:
      for method in config.methods:
        measure_per_device(method, n, config)


def _process_worker(process_id: int, num_processes: int, port: int, config: ScalingConfig) -> None:
  """One of ``num_processes`` processes (one CPU device each) timing the sharded update."""
  jax.distributed.initialize(
    coordinator_address=f"localhost:{port}", num_processes=num_processes, process_id=process_id
  )
  if jax.device_count() != num_processes:
    raise RuntimeError(f"expected {num_processes} devices, got {jax.device_count()}")
  for method in config.methods:
    measure_sharded(method, config, {"method": method, "devices": num_processes}, "proc_")
  jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return int(s.getsockname()[1])


def _run_processes(
  num_processes: int, config: ScalingConfig, errors: dict[str, str]
) -> list[dict[str, Any]]:
  """Launches ``num_processes`` pinned processes; returns process 0's rows."""
  cores = sorted(os.sched_getaffinity(0))
  env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
  env["XLA_FLAGS"] = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
  port = _free_port()
  workers = []
  for i in range(num_processes):
    command = [
      sys.executable, os.path.abspath(__file__), "--worker=process", f"--process_id={i}",
      f"--num_devices={num_processes}", f"--port={port}", f"--blocks={config.blocks}",
      f"--dim={config.dim}", f"--steps={config.steps}", f"--methods={','.join(config.methods)}",
    ]  # fmt: skip
    core = cores[i % len(cores)]
    workers.append(
      subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=functools.partial(os.sched_setaffinity, 0, {core}),
      )  # fmt: skip
    )
  outputs, outcome = [], "ok"
  try:
    for worker in workers:
      outputs.append(worker.communicate(timeout=config.timeout * len(config.methods)))
      if worker.returncode != 0:
        outcome = "aborted"
  except subprocess.TimeoutExpired:
    outcome = "hung"
    for worker in workers:
      worker.kill()
    # The workers not yet read (the one that timed out first) are read after the kill.
    outputs += [worker.communicate() for worker in workers[len(outputs) :]]
  lines = [line for line in outputs[0][0].splitlines() if line.startswith(RESULT_PREFIX)]
  rows = [json.loads(line[len(RESULT_PREFIX) :]) for line in lines]
  if outcome != "ok":
    errors[f"processes/{num_processes}"] = outcome + ": " + outputs[0][1][-2000:]
    for method in config.methods:
      if not any(r["method"] == method and "proc_wall_ms" in r for r in rows):
        rows.append({"method": method, "devices": num_processes, "proc_status": outcome})
  return rows


def _run_worker(
  kind: str, num_devices: int, methods: Sequence[str], config: ScalingConfig, timeout: float
) -> tuple[list[Any], str, str]:
  """Runs a worker subprocess for ``methods``.

  Returns:
    The result rows it printed, its outcome (``ok``, ``hung``: killed after ``timeout``,
    ``aborted``: a non-zero exit, e.g. XLA's abort after a stuck collective) and its stderr tail.
  """
  env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
  env["XLA_FLAGS"] = (
    f"--xla_force_host_platform_device_count={num_devices} "
    "--xla_cpu_enable_concurrency_optimized_scheduler=false"
  )
  command = [
    sys.executable, os.path.abspath(__file__), f"--worker={kind}",
    f"--num_devices={num_devices}", f"--devices={','.join(map(str, config.devices))}",
    f"--blocks={config.blocks}", f"--dim={config.dim}", f"--steps={config.steps}",
    f"--methods={','.join(methods)}",
  ]  # fmt: skip
  try:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    stdout, stderr = done.stdout, done.stderr
    outcome = "ok" if done.returncode == 0 else "aborted"
  except subprocess.TimeoutExpired as expired:
    stdout, stderr = _text(expired.stdout), _text(expired.stderr)
    outcome = "hung"
  lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
  return [json.loads(line[len(RESULT_PREFIX) :]) for line in lines], outcome, stderr[-2000:]


def _text(output: str | bytes | None) -> str:
  return output.decode() if isinstance(output, bytes) else output or ""


def _run_sharded(
  num_devices: int, config: ScalingConfig, errors: dict[str, str]
) -> list[dict[str, Any]]:
  """Runs the sharded worker of one device count; after a hang, again for the methods left."""
  parts: list[dict[str, Any]] = []
  remaining = list(config.methods)
  per_method = config.timeout * (1 + len(config.devices) * (num_devices == 1))
  while remaining:
    found, outcome, stderr = _run_worker(
      "sharded", num_devices, remaining, config, per_method * len(remaining)
    )
    parts.extend(found)
    timed = {p["method"] for p in found if "wall_ms" in p}
    if outcome == "ok":
      break
    stuck = next(m for m in remaining if m not in timed)
    parts.append({"method": stuck, "devices": num_devices, "wall_status": outcome})
    errors[f"sharded/{num_devices}/{stuck}"] = f"{outcome}: {stderr}"
    print(f"warning: {stuck} on {num_devices} devices {outcome}", file=sys.stderr)
    remaining = remaining[remaining.index(stuck) + 1 :]
  return parts


def _merge(parts: Sequence[dict[str, Any]], config: ScalingConfig) -> list[dict[str, Any]]:
  rows = {
    (m, n): {"method": m, "devices": n, "blocks_per_device": config.blocks // n,
             "local_batch": None, "wall_ms": None, "per_device_ms": None,
             "wall_status": "not run", "proc_local_batch": None, "proc_wall_ms": None,
             "proc_status": "not run"}
    for m in config.methods for n in sorted({*config.devices, *config.processes})
  }  # fmt: skip
  for part in parts:
    rows[part["method"], part["devices"]].update(part)
  for row in rows.values():
    if row["wall_ms"] is not None:
      row["wall_status"] = "ok"
    if row["proc_wall_ms"] is not None:
      row["proc_status"] = "ok"
  return list(rows.values())


def _cell(value: float | None, status: str = "failed") -> str:
  return status if value is None else f"{value:.1f}"


def _markdown(rows: Sequence[dict[str, Any]], config: ScalingConfig) -> str:
  lines = [
    f"Refresh step (update with precondition_frequency=1) of {config.blocks} blocks of "
    f"{config.dim}x{config.dim}, median of {config.steps}; {os.cpu_count()} CPU cores shared by "
    "all fake devices. `hung`: killed after the timeout; `aborted`: the worker died, e.g. XLA's "
    "abort after a stuck collective (see the module docstring).",
    "",
    "| method | devices | blocks/device | local batch (HLO) | wall ms | per-device ms |",
    "| --- | ---: | ---: | --- | ---: | ---: |",
  ]
  for r in rows:
    batch = "-" if r["local_batch"] is None else ",".join(str(b) for b in r["local_batch"])
    if r["devices"] in config.devices:
      lines.append(
        f"| {r['method']} | {r['devices']} | {r['blocks_per_device']} | {batch} | "
        f"{_cell(r['wall_ms'], r['wall_status'])} | {_cell(r['per_device_ms'])} |"
      )
  measured = [r for r in rows if r["devices"] in config.processes]
  if measured:
    lines += [
      "",
      "Processes joined by `jax.distributed.initialize` on localhost, one CPU device and one "
      "pinned core each (the sharded wall time on separate executors):",
      "",
      "| method | processes | blocks/process | local batch (HLO) | wall ms | speed-up |",
      "| --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in measured:
      batch = "-" if r["proc_local_batch"] is None else ",".join(map(str, r["proc_local_batch"]))
      one = next(
        (o["proc_wall_ms"] for o in measured if o["method"] == r["method"] and o["devices"] == 1),
        None,
      )
      speedup = (
        "-" if one is None or r["proc_wall_ms"] is None else f"{one / r['proc_wall_ms']:.2f}"
      )
      lines.append(
        f"| {r['method']} | {r['devices']} | {config.blocks // r['devices']} | {batch} | "
        f"{_cell(r['proc_wall_ms'], r['proc_status'])} | {speedup} |"
      )
  return "\n".join(lines) + "\n"


def _plot(rows: Sequence[dict[str, Any]], config: ScalingConfig, path: str) -> None:
  figure = Figure(figsize=(6.4, 4.2))
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  for method in config.methods:
    mine = [r for r in rows if r["method"] == method]
    for key, style, label in (
      ("wall_ms", "o-", "wall, shared cores"),
      ("per_device_ms", "s--", "per device"),
      ("proc_wall_ms", "^-", "wall, processes of one core"),
    ):
      points = [(r["devices"], r[key]) for r in mine if r[key] is not None]
      if points:
        axes.plot(*zip(*points, strict=True), style, label=f"{method}: {label}")
  axes.set_xscale("log", base=2)
  axes.set_yscale("log")
  ticks = sorted({*config.devices, *config.processes})
  axes.set_xticks(ticks, [str(d) for d in ticks])
  axes.set_xlabel("devices")
  axes.set_ylabel("refresh step (ms)")
  axes.set_title(f"{config.blocks} blocks of {config.dim}x{config.dim}, {os.cpu_count()} CPU cores")
  axes.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=120)


def run_experiment(config: ScalingConfig) -> list[dict[str, Any]]:
  """Runs the workers, writes JSON, markdown and PNG to ``config.out_dir``; returns the rows."""
  for n in (*config.devices, *config.processes):
    if config.blocks % n:
      raise ValueError(f"--blocks={config.blocks} must divide by every device count, got {n}.")
  cores = len(os.sched_getaffinity(0))
  skipped = [n for n in config.processes if n > cores]
  if skipped:
    print(f"warning: skipping --processes {skipped}: more than the {cores} cores", file=sys.stderr)
    config = dataclasses.replace(config, processes=tuple(n for n in config.processes if n <= cores))
  parts: list[dict[str, Any]] = []
  errors: dict[str, str] = {}
  for n in tqdm(config.devices, desc="device counts", disable=not config.progress):
    parts.extend(_run_sharded(n, config, errors))
  for n in tqdm(config.processes, desc="process counts", disable=not config.progress):
    parts.extend(_run_processes(n, config, errors))
  if 1 not in config.devices:
    budget = config.timeout * len(config.methods) * len(config.devices)
    found, outcome, stderr = _run_worker("per_device", 1, config.methods, config, budget)
    parts.extend(found)
    if outcome != "ok":
      errors["per_device"] = f"{outcome}: {stderr}"
  rows = _merge(parts, config)
  os.makedirs(config.out_dir, exist_ok=True)
  summary = {
    "config": dataclasses.asdict(config), "cpu_count": os.cpu_count(), "rows": rows,
    "errors": errors,
  }  # fmt: skip
  with open(os.path.join(config.out_dir, "scaling.json"), "w") as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(config.out_dir, "scaling.md"), "w") as f:
    f.write(_markdown(rows, config))
  _plot(rows, config, os.path.join(config.out_dir, "scaling.png"))
  return rows


flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Device counts, one subprocess each.")
flags.DEFINE_integer("steps", 10, "Timed refresh steps per measurement (after two warm-ups).")
flags.DEFINE_integer("blocks", 16, "Matrices of one shape, i.e. blocks in the bucket.")
flags.DEFINE_integer("dim", 256, "Side of each square matrix.")
flags.DEFINE_list("methods", list(METHODS), "Refreshes to time: eigh, qr.")
flags.DEFINE_float("timeout", 90.0, "Seconds per method before a worker counts as hung.")
flags.DEFINE_string("out_dir", "outputs/benchmarks", "Output directory.")
flags.DEFINE_bool("smoke", False, "Tiny setting (8 blocks of 32x32, 3 steps), under 30 s.")
flags.DEFINE_bool("progress", True, "Show a tqdm progress bar.")
flags.DEFINE_list(
  "processes", ["1", "2"], "Process counts (one device and one core each); empty to skip."
)
flags.DEFINE_enum(
  "worker", None, ["sharded", "per_device", "process"], "Internal: run one measurement."
)
flags.DEFINE_integer("num_devices", 1, "Internal: the device count of a --worker run.")
flags.DEFINE_integer("process_id", 0, "Internal: this process's index in a --worker=process run.")
flags.DEFINE_integer("port", 0, "Internal: the coordinator's port in a --worker=process run.")


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  for method in f.methods:
    if method not in METHODS:
      raise app.UsageError(f"--methods: unknown {method!r}; choose from {METHODS}.")
  config = ScalingConfig(
    devices=tuple(int(d) for d in f.devices), blocks=f.blocks, dim=f.dim, steps=f.steps,
    methods=tuple(f.methods), timeout=f.timeout, out_dir=f.out_dir, progress=f.progress,
    processes=tuple(int(n) for n in f.processes),
  )  # fmt: skip
  if f.smoke:
    config = dataclasses.replace(config, **SMOKE)
  if f.worker == "process":
    _process_worker(f.process_id, f.num_devices, f.port, config)
    return
  if f.worker:
    _worker(f.worker, f.num_devices, config)
    return
  print(_markdown(run_experiment(config), config), end="")


if __name__ == "__main__":
  app.run(main)
