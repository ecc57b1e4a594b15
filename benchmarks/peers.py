"""Step time of peer JAX implementations and of ours, head-to-head in one process per task.

The peers break on current JAX (``peers_specs``), so they run, unchanged, in a separate venv
pinned to jax 0.5.3 (``requirements-peers.txt``; created on demand at ``--peer_venv``), and
kl_precond, which runs unchanged on jax 0.5.3, runs there with them (``peers_venv``).

This file is both the driver (``--role=driver``, in this repository's venv) and the worker that
the driver starts inside the peers' venv (``--role=worker``, the repository root on
``PYTHONPATH``; ``peers_worker``). By default the driver starts ONE worker per task
("head-to-head"), which builds a runner for ``optax.adamw``, every peer of ``--peers`` and every
method of ours of ``--ours`` on the same model (``models.py``, plain JAX) and times them all
interleaved, exactly like ``step_time.py``. Every ratio is to the AdamW of that same process:
peers and ours share the JAX version, the process and the machine's load.

Our methods are specs (``peers_specs``): ``soap``, ``kl_soap``, ``kl_shampoo``, ``shampoo``,
``adamw_shampoo`` at ``--max_precond_dim``, or ``name@N`` for blocks of at most ``N``.
``EQUAL_SETTINGS`` lists, for each peer, the specs of ours at equal settings (the same block
size); the verdicts (``peers_rows``) compare each peer only with those, on both the amortised and
the median ratio.

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

Workers run with ``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false`` and
``OPENBLAS_NUM_THREADS=1`` unless set (why: ``peers_venv``).

    python -m benchmarks.peers                                  # MLP + transformer, f = 10
    python -m benchmarks.peers --tasks=transformer --peers=dist_shampoo_b256_eigh,psgd_kron_p0.1 \
        --ours=shampoo@256,soap
    python -m benchmarks.peers --smoke                          # tiny MLP, f = 2, 2 peers, 2 ours
    python -m benchmarks.peers --in_this_venv --tasks=transformer --peers=psgd_kron_p0.1  # jax 0.10

Writes ``peers.json``, ``peers.md`` and ``peers.png`` to ``--out_dir`` (``peers_report``).

Modules, each importing only those before it: ``peers_specs`` (the peers, our specs, equal
settings), ``peers_worker`` (the worker), ``peers_venv`` (the venvs, one worker process),
``peers_rows`` (rows and verdicts), ``peers_report`` (markdown, plot), and this file (flags, the
driver, the fallback layout, the probes). Only the standard library is imported at load (and
absl here), so the peers' venv imports this file as the worker.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from benchmarks import cpu_env

cpu_env.one_openblas_thread()  # before jax is imported; the workers inherit it

# Everything this file defined before it was split stays importable from it (tests, docs).
from benchmarks.peers_report import HEADERS, VERDICT_HEADERS, markdown, plot, write  # noqa: F401
from benchmarks.peers_rows import RowMaker, json_rows, largest_axis, verdicts
from benchmarks.peers_specs import (  # noqa: F401
  DEFAULT_OURS,
  EQUAL_SETTINGS,
  LEARNING_RATE,
  OURS,
  OURS_AT_256,
  PEERS,
  PROBES,
  SMOKE_OURS,
  SMOKE_PEERS,
  canonical,
  failure_reason,
  make_peer,
  parse_spec,
  update_period,
  update_probability,
)
from benchmarks.peers_venv import (  # noqa: F401
  HERE,
  REQUIREMENTS,
  ROOT,
  SCHEDULER_FLAG,
  ensure_current_jax_copies,
  ensure_venv,
  run_worker,
)
from benchmarks.peers_worker import worker

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


class _Run(RowMaker):
  """The driver's state for one invocation: settings, processes, rows."""

  def __init__(self, settings: dict[str, Any], report: dict[str, Any], timeout: int):
    super().__init__(settings, report)
    self.timeout = timeout

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
  write(report, settings["out_dir"])
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
      "why": failure_reason(error),
      "jax": result.get("environment", {}).get("jax", ""),
      "traceback": failure.get("traceback")
      or result.get("traceback", result.get("stderr_tail", "")),
    }
  return probes


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
