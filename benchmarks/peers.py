"""Step time of peer JAX implementations and of ours, head-to-head in one process per task.

The peers break on current JAX: Google's ``distributed_shampoo``
(``precondition-opt``) calls the removed ``jax.tree_map``; ``distributed-kron`` subscripts
``PartitionSpec[str, str]``; ``psgd-jax`` imports ``optax._src.clipping``. So they run, unchanged,
in a separate venv pinned to jax 0.5.3 (``requirements-peers.txt``; created on demand at
``--peer_venv``), and kl_precond, which runs unchanged on jax 0.5.3, runs there with them.

This file is both the driver (``--role=driver``, in this repository's venv) and the worker that
the driver starts inside the peers' venv (``--role=worker``, the repository root on
``PYTHONPATH``). By default the driver starts ONE worker per task ("head-to-head"), which builds a
runner for ``optax.adamw``, every peer of ``--peers`` and every method of ours of ``--ours`` on the
same model (``models.py``, plain JAX) and times them all interleaved, exactly like
``step_time.py`` (``models.run_interleaved``: warmup, then chunks in a rotating order; a watchdog
per call). Every ratio is to the AdamW of that same process: peers and ours share the JAX version,
the process and the machine's load.

Our methods are specs: ``soap``, ``kl_soap``, ``kl_shampoo``, ``shampoo``, ``adamw_shampoo``
(``models.make_optimizer`` with ``--max_precond_dim``, default 10000 as in ``step_time.py``), or
``name@N`` for blocks of at most ``N`` (every axis longer than ``N`` split into blocks, for every
method: ``soap@256`` is SOAP in 256-blocks, ``models.make_optimizer(..., blocks=True)``). Their
summaries are amortised over whole refresh periods with the refresh schedule read from the times
(``models.refresh_schedule``), like ``step_time.py`` and the ``dist_shampoo`` peers; PSGD's
random updates have no schedule (amortised = mean). ``EQUAL_SETTINGS`` lists, for each peer, the
specs of ours at equal settings (the same block size: Google's Shampoo and distributed-kron's
Kron and PRO precondition blocks of at most 256 or 1024, PSGD's Kron whole axes up to 8192); the
verdicts compare each peer only with those, on both the amortised and the median ratio. Specs
are matched by method, effective ``max_precond_dim`` (capped at the task's longest axis, above
which the value changes nothing) and what happens to longer axes (``canonical``), so
``shampoo`` at 10000 is ``shampoo@1024`` on both tasks.

Robustness: a peer or method that raises at construction is recorded and the others run. If the
head-to-head worker fails as a whole (time limit, crash, a call caught hanging by the watchdog),
the driver falls back, for that task, to one worker per peer (AdamW, the peer, and only its
equal-settings specs of ours), then one worker for the specs of ours not measured yet, and one
alone for a method of ours that hung; a hanging peer loses only its own worker. ``--nocombined``
goes straight to that layout. Every row records its process (``process``; details under
``processes`` in the JSON) and environment (``env``). ``--ours_json`` reuses a ``step_time.json``
(this venv) instead of timing ours: those rows are marked as from another environment and their
ratios are to that run's AdamW. The driver also tries each peer package once in this venv
(jax 0.10, ``--probe_current_jax``) and records how it fails.

Workers run with ``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false``: without it
PSGD Kron's graph can deadlock XLA's CPU scheduler (a step never returns), and turning off its
concurrency-optimized scheduler avoids that; AdamW and ours in the same process run with the same
flag (as in ``step_time.py``).
``OPENBLAS_NUM_THREADS`` is 1 unless set (as in ``step_time.py``): it applies to every optimizer of
a worker alike (the peers' eigh and triangular solves call LAPACK/BLAS too).

    python -m benchmarks.peers                                  # MLP + transformer, f = 10
    python -m benchmarks.peers --tasks=transformer --peers=dist_shampoo_b256_eigh,psgd_kron_p0.1 \
        --ours=shampoo@256,soap
    python -m benchmarks.peers --smoke                          # tiny MLP, f = 2, 2 peers, 2 ours
    python -m benchmarks.peers --in_this_venv --tasks=transformer --peers=psgd_kron_p0.1  # jax 0.10

Writes ``peers.json``, ``peers.md`` and ``peers.png`` to ``--out_dir``.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from benchmarks import cpu_env

cpu_env.one_openblas_thread()  # before jax is imported; the workers inherit it

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REQUIREMENTS = os.path.join(HERE, "requirements-peers.txt")
SCHEDULER_FLAG = cpu_env.SCHEDULER_FLAG
LEARNING_RATE = 1e-4

# name: (package, settings). Shampoo: lr, block size, beta1 0.9, beta2 0.999, preconditioners
# every f steps from step 1, RMSprop grafting (its RMSPROP_NORMALIZED grafting diverges here).
# PSGD Kron's default schedule updates the preconditioner with probability 1 for the first 500
# steps (so in every timed step here), then anneals to 0.03; the "_p0.03" variants time that
# steady state, the "_p0.1" ones the same average refresh rate as our f = 10.
PEERS = {
  "dist_shampoo_b256_eigh": ("precondition-opt", "distributed_shampoo, block 256, eigh, f"),
  "dist_shampoo_b1024_eigh": ("precondition-opt", "distributed_shampoo, block 1024, eigh, f"),
  "dist_shampoo_b256_newton": ("precondition-opt", "distributed_shampoo, block 256, Newton, f"),
  "psgd_kron": ("psgd-jax", "kron, default schedule (p = 1 in the first 500 steps)"),
  "psgd_kron_p0.1": ("psgd-jax", "kron, update probability 0.1 (= our f = 10 on average)"),
  "psgd_kron_p0.03": ("psgd-jax", "kron, update probability 0.03"),
  "dk_kron": ("distributed-kron", "kron, block 256, default schedule (p = 1 at first)"),
  "dk_kron_p0.1": ("distributed-kron", "kron, block 256, update probability 0.1"),
  "dk_kron_p0.03": ("distributed-kron", "kron, block 256, update probability 0.03"),
  "dk_pro": ("distributed-kron", "pro, default settings"),
}
# One peer per package, tried in this repository's venv to record how it breaks.
PROBES = ("dist_shampoo_b256_eigh", "psgd_kron", "dk_kron", "dk_pro")
# Our methods; a spec is one of them, or "name@N" for blocks of at most N.
OURS = ("soap", "kl_soap", "kl_shampoo", "shampoo", "adamw_shampoo")
OURS_AT_256 = tuple(f"{name}@256" for name in OURS)
DEFAULT_OURS = (*OURS, *OURS_AT_256)
SMOKE_PEERS = ("dist_shampoo_b256_eigh", "dk_pro")
SMOKE_OURS = ("soap@256", "shampoo@256")  # both build on the tiny MLP; each matches a smoke peer
# The specs of ours at equal settings to each peer (the verdicts compare a peer with these only):
# the same blocks. Google's Shampoo: Shampoo in its block size. distributed-kron's Kron and PRO
# split every axis longer than 256 into blocks (``block_size=256``, their default): every method
# of ours in 256-blocks. PSGD Kron keeps whole axes up to 8192 (``max_size_triangular``): every
# method of ours with whole axes. (Equal refresh rate for the fixed-probability Krons: see
# ``update_period``.)
EQUAL_SETTINGS: dict[str, tuple[str, ...]] = {
  "dist_shampoo_b256_eigh": ("shampoo@256",),
  "dist_shampoo_b1024_eigh": ("shampoo@1024",),
  "dist_shampoo_b256_newton": ("shampoo@256",),
  **{peer: OURS for peer in PEERS if peer.startswith("psgd_kron")},
  **{peer: OURS_AT_256 for peer in PEERS if peer.startswith("dk_")},
}

_ROLE = flags.DEFINE_enum("role", "driver", ["driver", "worker"], "Driver or worker process.")
_TASKS = flags.DEFINE_list("tasks", ["mlp", "transformer"], "Tasks: mlp, transformer.")
_PEERS = flags.DEFINE_list("peers", list(PEERS), "Peers to time.")
_OURS = flags.DEFINE_list(
  "ours",
  list(DEFAULT_OURS),
  "Our methods timed with the peers (name or name@max_precond_dim; empty: none).",
)
_MAX_PRECOND_DIM = flags.DEFINE_integer(
  "max_precond_dim", 10000, "max_precond_dim of a spec of ours without @N (as step_time.py)."
)
_FREQUENCY = flags.DEFINE_integer("frequency", 10, "Preconditioner refresh period (ours, Shampoo).")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed calls per method.")
_STEPS = flags.DEFINE_integer(
  "steps", 0, "Timed calls per method; 0: max(f, --min_steps) rounded up to a multiple of f."
)
_MIN_STEPS = flags.DEFINE_integer("min_steps", 30, "Lower bound of the automatic --steps.")
_CHUNK = flags.DEFINE_integer("chunk", 10, "Calls per method before switching.")
_COMBINED = flags.DEFINE_bool(
  "combined",
  True,
  "One head-to-head worker per task (AdamW, all peers, all of ours); off: one worker per peer "
  "from the start (the fallback layout).",
)
_PEER_VENV = flags.DEFINE_string("peer_venv", "/tmp/kl_precond_peers_venv", "The peers' venv.")
_CALL_TIMEOUT = flags.DEFINE_float("call_timeout", 600, "Seconds before one call counts as hung.")
_PEER_TIMEOUT = flags.DEFINE_integer(
  "peer_timeout",
  1800,
  "Seconds a worker may take per two runners it times (AdamW and one peer: this; the "
  "head-to-head worker proportionally more) before it is killed.",
)
_IN_THIS_VENV = flags.DEFINE_bool(
  "in_this_venv",
  False,
  "Run the workers in this venv (its jax) with the peer packages installed --no-deps at "
  "<peer_venv>_current_jax on PYTHONPATH, instead of in the peers' jax 0.5.3 venv.",
)
_PROBE = flags.DEFINE_bool("probe_current_jax", True, "Try each peer package in this venv too.")
_PROBE_TIMEOUT = flags.DEFINE_integer("probe_timeout", 90, "Seconds per peer tried in this venv.")
_SEQUENTIAL_EIGH = flags.DEFINE_bool(
  "sequential_eigh", False, "Ours: the eigh deadlock workaround of step_time.py."
)
_OURS_JSON = flags.DEFINE_string("ours_json", "", "Reuse a step_time.json instead of timing ours.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny MLP, f=2, two peers, two of ours, few steps.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")
_OUT_DIR = flags.DEFINE_string("out_dir", "outputs/benchmarks", "Output directory.")
_TASK = flags.DEFINE_string("task", "mlp", "Worker: the task.")
_RESULT_JSON = flags.DEFINE_string("result_json", "", "Worker: where to write the result.")


def parse_spec(spec: str, default_dim: int) -> tuple[str, int]:
  """``"shampoo@256"`` -> ``("shampoo", 256)``; ``"soap"`` -> ``("soap", default_dim)``."""
  name, at, dim = spec.partition("@")
  if name not in OURS or (at and not (dim.isdigit() and int(dim) >= 1)):
    raise ValueError(f"Bad spec {spec!r}: expected one of {OURS}, optionally with @N (N >= 1).")
  return name, int(dim) if at else default_dim


def canonical(
  spec: str, default_dim: int, largest_axis: int, blocks: bool | None = None
) -> tuple[str, int, str]:
  """The method, its effective max_precond_dim and what happens to longer axes, on a task whose
  longest axis is given.

  Every ``max_precond_dim`` at least the longest axis gives the same optimizer (no axis is left
  unrotated or blocked: ``"whole"``), so ``shampoo`` (10000) and ``shampoo@1024`` are one setting
  when no axis is longer than 1024. Below it, longer axes are split (``"blocks"``: a ``name@N``
  spec, or a Shampoo variant) or left unrotated (``"unrotated"``: SOAP or a KL method built with
  a plain ``max_precond_dim``, as ``step_time.py`` does). ``blocks``: whether the optimizer was
  built with ``blocks=True`` (default: whether the spec has ``@N``).
  """
  from benchmarks import models

  name, dim = parse_spec(spec, default_dim)
  if dim >= largest_axis:
    return name, largest_axis, "whole"
  if blocks is None:
    blocks = "@" in spec
  split = blocks or name in models.BLOCKING_BY_DEFAULT
  return name, dim, "blocks" if split else "unrotated"


# ---------------------------------------------------------------------------------------------
# Worker (runs inside the peers' venv)
# ---------------------------------------------------------------------------------------------


def update_probability(name: str) -> float | None:
  """The fixed preconditioner-update probability of a Kron peer named ``…_p<p>``, else None."""
  return float(name.rpartition("_p")[2]) if "_p0" in name else None


def make_peer(name: str, frequency: int) -> Any:
  """The peer optimizer ``name`` (see ``PEERS``), imported only here."""
  if name.startswith("dist_shampoo"):
    from precondition import distributed_shampoo as ds

    _, _, block, solver = name.split("_")
    return ds.distributed_shampoo(
      learning_rate=LEARNING_RATE,
      block_size=int(block[1:]),
      beta1=0.9,
      beta2=0.999,
      preconditioning_compute_steps=frequency,
      start_preconditioning_step=1,
      graft_type=ds.GraftingType.RMSPROP,
      eigh=solver == "eigh",
    )
  p = update_probability(name)
  probability = {} if p is None else {"preconditioner_update_probability": p}
  if name.startswith("psgd_kron"):
    from benchmarks import psgd_compat  # psgd-jax 0.2.9 vs optax 0.2.8: optax._src.clipping

    return psgd_compat.import_kron()(learning_rate=LEARNING_RATE, **probability)
  if name.startswith("dk_kron"):
    from distributed_kron import kron

    return kron(learning_rate=LEARNING_RATE, **probability)
  if name == "dk_pro":
    from distributed_kron import pro

    return pro(learning_rate=LEARNING_RATE)
  raise ValueError(f"Unknown peer {name!r}; expected one of {sorted(PEERS)}.")


def worker(
  task_name: str,
  peers: Sequence[str],
  specs: Sequence[str],
  settings: dict[str, Any],
  result_json: str,
) -> dict[str, Any]:
  """Times ``optax.adamw``, ``peers`` and our ``specs`` interleaved on one task, in this process.

  ``settings`` holds ``frequency, warmup, steps, chunk, smoke, progress, call_timeout,
  max_precond_dim, sequential_eigh``. A peer or method that raises at construction is recorded
  under ``errors`` (ours missing from this kl_precond: ``skipped``) and the others run. A call
  that hangs ends the process after writing the error to ``result_json`` (``models.Watchdog``);
  any other failure of the run is returned as ``error`` with the runner that raised.
  """
  import optax
  from tqdm import tqdm

  from benchmarks import models

  frequency, warmup, steps = settings["frequency"], settings["warmup"], settings["steps"]
  if settings.get("sequential_eigh") and specs:
    models.sequential_eigh_workaround()
  result: dict[str, Any] = {
    "environment": models.environment(),
    "task": task_name,
    "peers": list(peers),
    "ours": list(specs),
    "errors": {},
    "skipped": {},
  }
  task = models.make_task(task_name, smoke=settings["smoke"])
  runners = [models.StepRunner("adamw", task, optax.adamw(LEARNING_RATE))]
  builders: list[tuple[str, Callable[[], Any]]] = [
    (peer, functools.partial(make_peer, peer, frequency)) for peer in peers
  ]
  for spec in specs:
    name, dim = parse_spec(spec, settings["max_precond_dim"])
    build = functools.partial(models.make_optimizer, name, frequency, dim, blocks="@" in spec)
    builders.append((spec, build))
  for name, build in builders:
    try:
      runners.append(models.StepRunner(name, task, build()))
    except Exception as error:  # recorded, not raised: the driver reports it
      if isinstance(error, LookupError) and name not in peers:  # kl_precond lacks the method
        result["skipped"][name] = str(error)
        continue
      result["errors"][name] = {
        "error": f"{type(error).__name__}: {error}",
        "traceback": traceback.format_exc()[-3000:],
      }
  bar = tqdm(
    total=len(runners) * (warmup + steps),
    disable=not settings["progress"],
    desc=f"{task_name}: {len(runners)} runners",
    unit="step",
    file=sys.stderr,
  )
  watchdog = models.Watchdog(settings["call_timeout"], result_json)
  try:
    models.run_interleaved(runners, warmup, steps, settings["chunk"], bar.update, watchdog)
  except Exception as error:
    result["error"] = f"{type(error).__name__}: {error}"
    result["traceback"] = traceback.format_exc()[-3000:]
    result["failed_runner"] = (watchdog.label or "").rpartition(" call ")[0]
    return result
  bar.close()
  # Ours and Google's Shampoo refresh every f steps (schedule found from the times); PSGD's
  # updates are random (no schedule: amortised = mean); AdamW has none.
  summaries = {}
  for r in runners:
    periodic = r.name in specs or r.name.startswith("dist_")
    schedule = models.refresh_schedule(r, frequency) if periodic else None
    summaries[r.name] = models.summarize(r, schedule, frequency)
  models.add_ratios(summaries, runners, settings["chunk"])
  result.update(results=summaries, steps=steps, warmup=warmup, frequency=frequency)
  return result


# ---------------------------------------------------------------------------------------------
# Driver (runs in this repository's venv)
# ---------------------------------------------------------------------------------------------


def _pins() -> list[str]:
  with open(REQUIREMENTS) as f:
    return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def ensure_venv(path: str) -> dict[str, Any]:
  """Creates the peers' venv with the pinned packages unless it already has exactly them."""
  python, marker = os.path.join(path, "bin", "python"), os.path.join(path, "kl_precond_pins.txt")
  pins = _pins()
  if os.path.exists(python) and os.path.exists(marker):
    with open(marker) as f:
      if f.read().split() == pins:
        return {"created": False, "seconds": 0.0, "python": python, "pins": pins}
  start = time.perf_counter()
  print(f"[peers] creating {path} with {' '.join(pins)}", flush=True)
  subprocess.run([sys.executable, "-m", "venv", "--clear", path], check=True)
  subprocess.run([python, "-m", "pip", "install", "--quiet", "-r", REQUIREMENTS], check=True)
  with open(marker, "w") as f:
    f.write("\n".join(pins))
  return {"created": True, "seconds": time.perf_counter() - start, "python": python, "pins": pins}


def ensure_current_jax_copies(path: str) -> dict[str, Any]:
  """The peer packages alone (``pip --no-deps --target``), to try them on this venv's jax."""
  packages = [p for p in _pins() if p.split("==")[0] in {v[0] for v in PEERS.values()}]
  marker = os.path.join(path, "kl_precond_pins.txt")
  if os.path.exists(marker):
    with open(marker) as f:
      if f.read().split() == packages:
        return {"path": path, "packages": packages}
  subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "install",
      "--quiet",
      "--no-deps",
      "--upgrade",
      "--target",
      path,
      *packages,
    ],
    check=True,
  )
  with open(marker, "w") as f:
    f.write("\n".join(packages))
  return {"path": path, "packages": packages}


def _tail(text: str, lines: int = 12) -> str:
  kept = [line for line in text.splitlines() if not line.startswith(("I0", "I1", "W0", "W1"))]
  return "\n".join(kept[-lines:])


_RESULT_FILES = itertools.count()


def run_worker(
  python: str,
  task: str,
  peers: Sequence[str],
  specs: Sequence[str],
  settings: dict[str, Any],
  timeout: float,
  scheduler_flag: bool = True,
  pythonpath: str = "",
) -> dict[str, Any]:
  """One worker process (AdamW, ``peers``, our ``specs``); its JSON, or why it produced none.

  The repository root goes on the worker's ``PYTHONPATH`` (after ``pythonpath``), so that
  ``kl_precond`` and ``benchmarks.models`` import from this checkout in any venv.
  """
  out = os.path.join(settings["out_dir"], f"worker_{os.getpid()}_{next(_RESULT_FILES)}.json")
  command = [
    python,
    os.path.join(HERE, "peers.py"),
    "--role=worker",
    f"--task={task}",
    f"--peers={','.join(peers)}",
    f"--ours={','.join(specs)}",
    f"--max_precond_dim={settings['max_precond_dim']}",
    f"--frequency={settings['frequency']}",
    f"--warmup={settings['warmup']}",
    f"--steps={settings['steps']}",
    f"--chunk={settings['chunk']}",
    f"--result_json={out}",
    f"--call_timeout={settings['call_timeout']}",
    f"--smoke={settings['smoke']}",
    f"--progress={settings['progress']}",
    f"--sequential_eigh={settings['sequential_eigh']}",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, ROOT, env.get("PYTHONPATH")]))
  if scheduler_flag:
    env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), SCHEDULER_FLAG]).strip()
  start = time.perf_counter()
  try:
    done = subprocess.run(command, env=env, timeout=timeout, capture_output=True, text=True)
  except subprocess.TimeoutExpired:
    if os.path.exists(out):
      os.remove(out)
    return {
      "error": f"timed out after {timeout:.0f} s (no result: hung or too slow)",
      "wall_seconds": time.perf_counter() - start,
    }
  result: dict[str, Any] = {}
  if os.path.exists(out):
    with open(out) as f:
      result = json.load(f)
    os.remove(out)
  if done.returncode != 0 and "error" not in result:
    result["error"] = f"exit code {done.returncode}: {_tail(done.stderr, 6)}"
  if done.returncode != 0:
    result["stderr_tail"] = _tail(done.stderr, 30)
  result["wall_seconds"] = time.perf_counter() - start
  return result


def _why(error: str) -> str:
  """A short reason for a known failure of a peer on current JAX."""
  known = {
    "tree_map": "uses jax.tree_map, removed in jax 0.6",
    "not subscriptable": "subscripts PartitionSpec[str, str]; PartitionSpec is not generic in "
    "jax >= 0.6",
    "clipping": "imports optax._src.clipping, moved to optax.transforms in optax 0.2.x",
    "timed out": "no result within the time limit (hang in XLA's CPU scheduler?)",
  }
  return next((why for key, why in known.items() if key in error), "")


@functools.lru_cache
def largest_axis(task: str, smoke: bool) -> int:
  """The longest axis of any parameter of the task (caps the effective max_precond_dim)."""
  import jax

  from benchmarks import models

  params = models.make_task(task, smoke=smoke).params
  return max(max(x.shape, default=1) for x in jax.tree.leaves(params))


def fallback_groups(
  peers: Sequence[str],
  specs: Sequence[str],
  culprit: str | None,
  matches: Callable[[str, str], bool],
) -> list[tuple[str, list[str]]]:
  """One worker per peer: the peer and its equal-settings specs of ours (``matches(spec,
  peer)``), without ``culprit``, the runner that hung or raised in the head-to-head worker."""
  return [(peer, [s for s in specs if s != culprit and matches(s, peer)]) for peer in peers]


def _culprit(result: dict[str, Any]) -> str | None:
  """The runner whose call hung (watchdog) or raised, if the worker said."""
  label = result.get("hung") or result.get("failed_runner") or ""
  return label.rpartition(" call ")[0] or label or None


class _Run:
  """The driver's state for one invocation: settings, processes, rows."""

  def __init__(self, settings: dict[str, Any], report: dict[str, Any], timeout: int):
    self.settings, self.report, self.timeout = settings, report, timeout

  def canonical(self, task: str, spec: str) -> tuple[str, int, str]:
    return canonical(spec, self.settings["max_precond_dim"], self.report["largest_axis"][task])

  def matches(self, task: str, spec: str, peer: str) -> bool:
    wanted = {self.canonical(task, s) for s in EQUAL_SETTINGS.get(peer, ())}
    return self.canonical(task, spec) in wanted

  def process(
    self,
    python: str,
    task: str,
    kind: str,
    peers: Sequence[str],
    specs: Sequence[str],
    where: str,
  ) -> dict[str, Any]:
    """Runs one worker, records it under ``processes`` and adds its rows; returns its result."""
    process = f"{task}/{kind}"
    limit = self.timeout * max(2, 1 + len(peers) + len(specs)) / 2
    print(
      f"[peers] {process} ({where}): adamw, {len(peers)} peer(s) {list(peers)}, "
      f"{len(specs)} of ours {list(specs)}; limit {limit:.0f} s",
      flush=True,
    )
    result = run_worker(
      python,
      task,
      peers,
      specs,
      self.settings,
      limit,
      pythonpath=self.settings.get("pythonpath", ""),
    )
    env = result.get("environment", {})
    self.report["processes"][process] = {
      "task": task,
      "kind": kind,
      "where": where,
      "python": python,
      "peers": list(peers),
      "ours": list(specs),
      "environment": env,
      "wall_seconds": result.get("wall_seconds", float("nan")),
      "ok": "results" in result,
      "error": result.get("error", ""),
      "culprit": _culprit(result) if "results" not in result else None,
      "stderr_tail": result.get("stderr_tail", ""),
    }
    if "results" in result or kind != "head-to-head":  # a failed head-to-head has no rows
      self.report["rows"].extend(
        self.rows(task, process, f"jax {env.get('jax', '?')} ({where})", result, peers, specs)
      )
    if "error" in result and "results" not in result:
      print(f"[peers] {process} failed: {result['error'][:300]}", flush=True)
    return result

  def rows(
    self,
    task: str,
    process: str,
    env: str,
    result: dict[str, Any],
    peers: Sequence[str],
    specs: Sequence[str],
  ) -> list[dict[str, Any]]:
    """AdamW's row, then a row per peer and per spec of ours (a result, or why there is none)."""
    frequency = self.settings["frequency"]
    results, errors = result.get("results", {}), result.get("errors", {})
    base = {"task": task, "process": process, "env": env}
    adamw = results.get("adamw")
    reference = (
      {"adamw_median_ms": adamw["median_ms"], "adamw_mean_ms": adamw["mean_ms"]} if adamw else {}
    )
    rows = []
    if adamw:
      rows.append(
        dict(base, method="adamw", package="optax", settings="optax.adamw", **reference, **adamw)
      )
    for name in [*peers, *specs]:
      if name in peers:
        meta = {
          "method": name,
          "package": PEERS[name][0],
          "settings": PEERS[name][1].replace(", f", f", f={frequency}"),
        }
      else:
        optimizer, dim = parse_spec(name, self.settings["max_precond_dim"])
        key = self.canonical(task, name)
        meta = {
          "method": name,
          "package": "kl_precond",
          "settings": f"f={frequency}, max_precond_dim={dim}{_SPLIT_NOTE[key[2]]}",
          "optimizer": optimizer,
          "max_precond_dim": dim,
          "canonical": list(key),
        }
      if name in results:
        rows.append(dict(base, **meta, **reference, **results[name]))
      elif name in result.get("skipped", {}):
        rows.append(dict(base, **meta, error=result["skipped"][name], why="not built"))
      else:
        failure = errors.get(name, {})
        error = failure.get("error") or result.get("error", "no result")
        text = failure.get("traceback") or result.get("traceback") or result.get("stderr_tail", "")
        rows.append(dict(base, **meta, error=error, why=_why(error), traceback=text))
    return rows

  def task(self, python: str, task: str, peers: Sequence[str], specs: Sequence[str], where: str):
    """Head-to-head for one task, falling back to one worker per peer if it fails."""
    culprit = None
    if self.settings["combined"] and (peers or specs):
      result = self.process(python, task, "head-to-head", peers, specs, where)
      if "results" in result:
        return
      culprit = _culprit(result)
      print(f"[peers] {task}: falling back to one worker per peer (culprit: {culprit})", flush=True)
    measured: set[str] = set()
    groups = fallback_groups(peers, specs, culprit, functools.partial(self.matches, task))
    for peer, mine in groups:
      result = self.process(python, task, f"fallback:{peer}", [peer], mine, where)
      measured.update(s for s in mine if s in result.get("results", {}))
    rest = [s for s in specs if s not in measured and s != culprit]
    if rest:
      self.process(python, task, "fallback:ours", [], rest, where)
    if culprit in specs:
      self.process(python, task, f"retry:{culprit}", [], [culprit], where)


def json_rows(
  step_time: dict[str, Any], tasks: Sequence[str], frequency: int, run: _Run, path: str
) -> list[dict[str, Any]]:
  """Rows of a step_time report (``--ours_json``) for the peers' tasks and frequency."""
  rows = []
  jax_version = step_time["environment"]["jax"]
  dim = step_time.get("settings", {}).get("max_precond_dim", 10000)
  env = f"jax {jax_version} (this venv, {os.path.basename(path)}: another environment)"
  for config in step_time["configs"]:
    if config["task"] not in tasks or config["frequency"] != frequency:
      continue
    results = config["results"]
    adamw = results.get("adamw", {})
    reference = {
      "adamw_median_ms": adamw.get("median_ms", float("nan")),
      "adamw_mean_ms": adamw.get("mean_ms", float("nan")),
    }
    base = {"task": config["task"], "process": "step_time.json", "env": env}
    for method in [*results, *config["skipped"]]:
      meta: dict[str, Any] = {"method": method}
      if method == "adamw":
        meta.update(package="optax", settings="optax.adamw")
      else:
        # step_time builds with a plain max_precond_dim: no blocks for SOAP and the KL methods,
        # so a row that "name@N" (blocks) would misname keeps its max_precond_dim in its name.
        key = canonical(method, dim, run.report["largest_axis"][config["task"]], blocks=False)
        if dim != run.settings["max_precond_dim"]:
          spec = f"{method}@{dim}"
          same = run.canonical(config["task"], spec) == key
          meta["method"] = spec if same else f"{method} (max_precond_dim={dim})"
        meta.update(
          package="kl_precond",
          settings=f"f={config['frequency']}, max_precond_dim={dim}{_SPLIT_NOTE[key[2]]}",
          optimizer=method,
          max_precond_dim=dim,
          canonical=list(key),
        )
      if method in results:
        rows.append(dict(base, **meta, **reference, **results[method]))
      else:
        rows.append(dict(base, **meta, error=config["skipped"][method], why="not built"))
  return rows


_SPLIT_NOTE = {"whole": "", "blocks": ", blocks", "unrotated": ", longer axes unrotated"}


def update_period(peer: str) -> int | None:
  """The mean preconditioner-update period ``round(1/p)`` of a Kron peer with a fixed update
  probability ``p`` (``dk_kron_p0.03``: 33); None for a peer on a schedule (Google's Shampoo
  refreshes every ``--frequency`` steps, like ours; Kron's default anneals from ``p = 1``)."""
  p = update_probability(peer)
  return None if p is None else round(1 / p)


def verdicts(rows: Sequence[dict[str, Any]], run: _Run) -> dict[str, Any]:
  """Each peer against its equal-settings specs of ours (``EQUAL_SETTINGS``), on both ratios.

  A fixed-probability Kron peer is at equal settings only with a run whose ``--frequency`` is
  its mean update period (``update_period``: p = 0.1 with f = 10, p = 0.03 with f = 33); its
  comparisons in a run at another frequency are kept with ``equal_rate`` False and not counted.

  For each spec the row of ours with the same ``canonical`` key (method, effective
  max_precond_dim, blocks or unrotated longer axes) is taken, from the peer's own process if
  there is one (head-to-head), else from another process (the fallback layout, ``--ours_json``;
  ``same_process`` False). A spec with no row at all is listed under ``not_compared``.
  """
  found, missing = [], []
  for peer_row in rows:
    if peer_row["package"] in ("kl_precond", "optax") or "ratio_amortised" not in peer_row:
      continue
    task, peer = peer_row["task"], peer_row["method"]
    ours = [r for r in rows if r["task"] == task and r["package"] == "kl_precond"]
    chosen: list[int] = []
    for spec in EQUAL_SETTINGS.get(peer, ()):
      key = list(run.canonical(task, spec))
      candidates = [r for r in ours if r["canonical"] == key]
      if not candidates:
        missing.append({"task": task, "peer": peer, "spec": spec})
        continue
      best = min(
        candidates,
        key=lambda r: (
          "ratio_amortised" not in r,  # measured first
          r["process"] != peer_row["process"],  # then the peer's own process
          r["env"] != peer_row["env"],  # then the same environment
          r["method"] != spec,  # then the spec as written
        ),
      )
      if id(best) in chosen:
        continue
      chosen.append(id(best))
      verdict = {
        "task": task,
        "peer": peer,
        "peer_process": peer_row["process"],
        "peer_ratio_amortised": peer_row["ratio_amortised"],
        "peer_ratio_median": peer_row["ratio_median"],
        "equal_spec": spec,
        "ours": best["method"],
        "ours_process": best["process"],
        "same_process": best["process"] == peer_row["process"],
        "same_environment": best["env"] == peer_row["env"],
        "equal_rate": update_period(peer) in (None, run.settings["frequency"]),
      }
      if "ratio_amortised" in best:
        verdict.update(
          ours_ratio_amortised=best["ratio_amortised"],
          ours_ratio_median=best["ratio_median"],
          faster_amortised=best["ratio_amortised"] < peer_row["ratio_amortised"],
          faster_median=best["ratio_median"] < peer_row["ratio_median"],
        )
      else:
        verdict["error"] = best.get("error", "no result")
      found.append(verdict)
  return {"comparisons": found, "not_compared": missing}


def driver(
  tasks: Sequence[str],
  peers: Sequence[str],
  specs: Sequence[str],
  settings: dict[str, Any],
  peer_venv: str,
  timeout: int,
  probe: bool,
  probe_timeout: int = 90,
) -> dict[str, Any]:
  started = time.perf_counter()
  os.makedirs(settings["out_dir"], exist_ok=True)
  report: dict[str, Any] = {
    "settings": dict(settings, tasks=list(tasks), peers=list(peers), ours=list(specs)),
    "equal_settings": {peer: list(EQUAL_SETTINGS[peer]) for peer in peers},
    "largest_axis": {task: largest_axis(task, settings["smoke"]) for task in tasks},
    "processes": {},
    "rows": [],
    "probes": {},
  }
  run = _Run(settings, report, timeout)
  where = "this venv" if settings.get("in_this_venv") else "peers' venv"
  try:
    if settings.get("in_this_venv"):
      copies = ensure_current_jax_copies(peer_venv + "_current_jax")
      settings["pythonpath"] = copies["path"]
      report["venv"] = {"python": sys.executable, "peer_packages": copies}
    else:
      report["venv"] = ensure_venv(peer_venv)
  except subprocess.CalledProcessError as error:
    report["venv"] = {"error": str(error)}
  timed_specs = [] if settings["ours_json"] else list(specs)
  for task in tasks:
    if "error" not in report["venv"]:
      run.task(report["venv"]["python"], task, peers, timed_specs, where)
      continue
    error = f"peers' venv unavailable: {report['venv']['error']}"
    report["rows"].extend(
      run.rows(task, f"{task}/none", "no environment", {"error": error}, peers, [])
    )
    if timed_specs:  # ours still run, in this venv, against this venv's AdamW
      run.process(sys.executable, task, "this-venv", [], timed_specs, "this venv")
  if settings["ours_json"]:
    with open(settings["ours_json"]) as f:
      report["ours_json"] = json.load(f)
    report["rows"].extend(
      json_rows(report["ours_json"], tasks, settings["frequency"], run, settings["ours_json"])
    )
  if probe:
    report["probes"] = probe_current_jax(settings, peer_venv + "_current_jax", probe_timeout)
  report["verdicts"] = verdicts(report["rows"], run)
  report["wall_seconds"] = time.perf_counter() - started
  _write(report, settings["out_dir"])
  return report


def probe_current_jax(settings: dict[str, Any], path: str, timeout: int) -> dict[str, Any]:
  """Each peer package, unchanged, on this venv's jax: 2 calls on the tiny MLP, or the error.

  No scheduler flag here, so that a hang shows (as a time-out).
  """
  try:
    copies = ensure_current_jax_copies(path)
  except subprocess.CalledProcessError as error:
    return {
      peer: {"runs": False, "error": f"install failed: {error}", "why": ""} for peer in PROBES
    }
  probe_settings = dict(settings, smoke=True, warmup=1, steps=1, chunk=1, progress=False)
  probes = {}
  for peer in PROBES:
    print(f"[peers] trying {peer} unchanged in this venv", flush=True)
    result = run_worker(
      sys.executable,
      "mlp",
      [peer],
      [],
      probe_settings,
      timeout,
      scheduler_flag=False,
      pythonpath=copies["path"],
    )
    failure = result.get("errors", {}).get(peer, {})
    error = failure.get("error") or result.get("error", "")
    probes[peer] = {
      "runs": not error,
      "error": error,
      "why": _why(error),
      "jax": result.get("environment", {}).get("jax", ""),
      "traceback": failure.get("traceback")
      or result.get("traceback", result.get("stderr_tail", "")),
    }
  return probes


HEADERS = (
  "task",
  "process",
  "method",
  "settings",
  "median ms",
  "mean ms",
  "refresh ms",
  "amortised ms",
  "AdamW median ms (same process)",
  "×AdamW median",
  "×AdamW amortised",
  "final loss",
  "status",
)
VERDICT_HEADERS = (
  "task",
  "peer",
  "peer ×AdamW amortised (median)",
  "ours",
  "ours ×AdamW amortised (median)",
  "faster amortised?",
  "faster median?",
)


def _pair(amortised: float, median: float) -> str:
  return f"{amortised:.2f} ({median:.2f})"


def _process_line(name: str, p: dict[str, Any]) -> str:
  env = p["environment"]
  where = f"jax {env['jax']}, optax {env['optax']}" if env else "no environment reported"
  what = f"adamw + {len(p['peers'])} peer(s) + {len(p['ours'])} of ours"
  status = "ok" if p["ok"] else f"FAILED: {p['error'][:200]}"
  if not p["ok"] and p["kind"] == "head-to-head":
    status += f" — fell back to one worker per peer (culprit: {p['culprit'] or 'unknown'})"
  return f"- `{name}` ({p['where']}: {where}): {what}; {p['wall_seconds']:.0f} s; {status}"


def markdown(report: dict[str, Any]) -> str:
  from benchmarks import models

  settings, rows, nan = report["settings"], [], float("nan")
  for r in report["rows"]:
    status = "ok"
    if "error" in r:
      status = f"{'skipped' if r.get('why') == 'not built' else 'FAILED'}: {r['error'][:120]}"
    rows.append(
      (
        r["task"],
        r["process"].partition("/")[2] or r["process"],
        r["method"],
        r["settings"],
        r.get("median_ms", nan),
        r.get("mean_ms", nan),
        r.get("refresh_ms", nan),
        r.get("amortised_ms", nan),
        r.get("adamw_median_ms", nan),
        r.get("ratio_median", nan),
        r.get("ratio_amortised", nan),
        r.get("final_loss", nan),
        status,
      )
    )
  layout = "one head-to-head worker per task" if settings["combined"] else "one worker per peer"
  lines = [
    "# Peers vs ours, head-to-head: step time as a ratio to optax.adamw of the same process",
    "",
    f"AdamW, the peers and ours ({layout}) "
    + (
      f"in this venv (its jax; peer packages from "
      f"`{report['venv'].get('peer_packages', {}).get('path', '?')}`, "
      "installed without their pinned dependencies), "
      if settings.get("in_this_venv")
      else f"in the jax 0.5.3 venv at `{settings['peer_venv']}` (pins in requirements-peers.txt), "
    )
    + f"`XLA_FLAGS={SCHEDULER_FLAG}`, "
    f"`OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS') or 'unset'}`, "
    "interleaved in chunks of "
    f"{settings['chunk']}: {settings['warmup']} warmup + {settings['steps']} timed calls per "
    f"method. Frequency {settings['frequency']}; ours at max_precond_dim "
    f"{settings['max_precond_dim']} unless `@N`"
    + ("; eigh batched as lax.map (--sequential_eigh)" if settings["sequential_eigh"] else "")
    + f"; wall {report['wall_seconds']:.0f} s.",
    "",
    models.markdown_table(HEADERS, rows),
    "",
    "Every ratio is to the AdamW of the row's own process (`process`); amortised = "
    "((f-1)·median(non-refresh) + median(refresh)) / f where the refresh steps are found "
    "(ours, distributed Shampoo), else the mean; ratios: amortised / AdamW mean, median / AdamW "
    "median.",
    "",
    "Processes:",
    "",
  ]
  lines += [_process_line(name, p) for name, p in report["processes"].items()]
  if settings["ours_json"]:
    lines.append(
      f"- `step_time.json`: ours from `{settings['ours_json']}` (this venv, another environment "
      "and process; ratios to that run's AdamW)"
    )
  comparisons = report["verdicts"]["comparisons"]
  if comparisons:
    table = []
    for v in comparisons:
      mark = "" if v["same_process"] else (" †" if v["same_environment"] else " ‡")
      rate = "" if v["equal_rate"] else " ◇"
      if "error" in v:
        ours, faster_amortised, faster_median = f"FAILED: {v['error'][:60]}", "–", "–"
      else:
        ours = _pair(v["ours_ratio_amortised"], v["ours_ratio_median"])
        faster_amortised = "yes" if v["faster_amortised"] else "**no**"
        faster_median = "yes" if v["faster_median"] else "**no**"
      table.append(
        (
          v["task"],
          v["peer"] + rate,
          _pair(v["peer_ratio_amortised"], v["peer_ratio_median"]),
          v["ours"] + mark,
          ours,
          faster_amortised,
          faster_median,
        )
      )
    lines += [
      "",
      "Verdicts: each peer against the specs of ours at equal settings (`EQUAL_SETTINGS`); lower "
      "is faster.",
      "",
      models.markdown_table(VERDICT_HEADERS, table),
    ]
    measured = [v for v in comparisons if "error" not in v and v["equal_rate"]]
    lines += [
      "",
      f"Ours faster in {sum(v['faster_amortised'] for v in measured)} of {len(measured)} "
      f"comparisons amortised, {sum(v['faster_median'] for v in measured)} of {len(measured)} by "
      "median.",
    ]
    if not all(v["equal_rate"] for v in comparisons):
      lines += [
        "",
        f"◇ A Kron peer with a fixed update probability p updates every 1/p steps on average, "
        f"ours every f = {settings['frequency']}: not equal settings, so not counted (run with "
        "`--frequency` = 1/p for that comparison).",
      ]
    notes = []
    if any(not v["same_process"] and v["same_environment"] for v in comparisons):
      notes.append("† ours from another process of the same venv (fallback layout)")
    if any(not v["same_environment"] for v in comparisons):
      notes.append("‡ ours from another environment (`--ours_json`)")
    if notes:
      lines += ["", "; ".join(notes) + ": each ratio is to its own process's AdamW."]
  missing = report["verdicts"]["not_compared"]
  if missing:
    lines += [
      "",
      "Not compared (no such run of ours): "
      + "; ".join(f"{m['task']} {m['peer']} ↔ {m['spec']}" for m in missing)
      + ".",
    ]
  failures = [r for r in report["rows"] if "error" in r]
  if failures:
    lines += ["", "Failures:", ""]
    lines += [
      f"- {r['task']} {r['method']} (`{r['process']}`): {r['error'][:300]}"
      + (f" — {r['why']}" if r.get("why") else "")
      for r in failures
    ]
  if report["probes"]:
    lines += ["", "Each peer package unchanged in this repository's venv:", ""]
    for peer, p in report["probes"].items():
      verdict = "runs" if p["runs"] else f"fails: {p['error'][:200]}"
      lines.append(
        f"- {PEERS[peer][0]} ({peer}): {verdict}" + (f" — {p['why']}" if p["why"] else "")
      )
  return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str) -> None:
  import numpy as np
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  tasks = list(dict.fromkeys(r["task"] for r in report["rows"]))
  fig = Figure(figsize=(5.5 * max(1, len(tasks)), 4))
  FigureCanvasAgg(fig)
  for k, task in enumerate(tasks):
    ax = fig.add_subplot(1, len(tasks), k + 1)
    rows = [r for r in report["rows"] if r["task"] == task and r["method"] != "adamw"]
    values = [r.get("ratio_amortised", np.nan) for r in rows]
    colors = ["C0" if r["package"] == "kl_precond" else "C3" for r in rows]
    labels = [r["method"] + ("" if r["process"].endswith("/head-to-head") else " †") for r in rows]
    ax.bar(np.arange(len(rows)), values, color=colors)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(rows)), labels, rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("amortised step time / AdamW (same process)")
    ax.set_title(f"{task}: ours (blue) vs peers (red); † not head-to-head", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def _write(report: dict[str, Any], out_dir: str) -> None:
  with open(os.path.join(out_dir, "peers.json"), "w") as f:
    json.dump(report, f, indent=1, default=str)
  text = markdown(report)
  with open(os.path.join(out_dir, "peers.md"), "w") as f:
    f.write(text)
  plot(report, os.path.join(out_dir, "peers.png"))
  print(text, flush=True)


def _timed_steps(frequency: int, steps: int, min_steps: int) -> int:
  if steps > 0:
    return steps
  return frequency * math.ceil(max(frequency, min_steps) / frequency)


def main(argv: Sequence[str]) -> None:
  del argv
  smoke = _SMOKE.value
  frequency = _FREQUENCY.value if (_FREQUENCY.present or not smoke) else 2
  warmup = _WARMUP.value if (_WARMUP.present or not smoke) else 2
  steps = _STEPS.value if (_STEPS.present or not smoke) else 4
  chunk = _CHUNK.value if (_CHUNK.present or not smoke) else 2
  peers = _PEERS.value if (_PEERS.present or not smoke) else list(SMOKE_PEERS)
  specs = [s for s in (_OURS.value if (_OURS.present or not smoke) else SMOKE_OURS) if s]
  unknown = [p for p in peers if p not in PEERS]
  if unknown:
    raise app.UsageError(f"Unknown peers {unknown}; expected some of {list(PEERS)}.")
  for spec in specs:
    try:
      parse_spec(spec, _MAX_PRECOND_DIM.value)
    except ValueError as error:
      raise app.UsageError(str(error)) from error
  settings = {
    "frequency": frequency,
    "warmup": warmup,
    "steps": _timed_steps(frequency, steps, _MIN_STEPS.value),
    "chunk": chunk,
    "smoke": smoke,
    "progress": _PROGRESS.value,
    "call_timeout": _CALL_TIMEOUT.value,
    "max_precond_dim": _MAX_PRECOND_DIM.value,
    "sequential_eigh": _SEQUENTIAL_EIGH.value,
  }
  if _ROLE.value == "worker":
    result = worker(_TASK.value, peers, specs, settings, _RESULT_JSON.value)
    with open(_RESULT_JSON.value, "w") as f:
      json.dump(result, f, indent=1)
    return
  settings.update(
    out_dir=os.path.abspath(_OUT_DIR.value),
    ours_json=_OURS_JSON.value,
    peer_venv=_PEER_VENV.value,
    combined=_COMBINED.value,
    in_this_venv=_IN_THIS_VENV.value,
  )
  driver(
    _TASKS.value if (_TASKS.present or not smoke) else ["mlp"],
    peers,
    specs,
    settings,
    _PEER_VENV.value,
    _PEER_TIMEOUT.value,
    _PROBE.value and not smoke,
    _PROBE_TIMEOUT.value,
  )


if __name__ == "__main__":
  app.run(main)
