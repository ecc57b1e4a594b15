"""Step time of peer JAX implementations, as a ratio to ``optax.adamw`` in their own environment.

The peers break on current JAX (env_baseline §2): Google's ``distributed_shampoo``
(``precondition-opt``) calls the removed ``jax.tree_map``; ``distributed-kron`` subscripts
``PartitionSpec[str, str]``; ``psgd-jax`` imports ``optax._src.clipping``. So they run, unchanged,
in a separate venv pinned to jax 0.5.3 (``requirements-peers.txt``; created on demand at
``--peer_venv``). This file is both the driver (``--role=driver``, in this repository's venv) and
the worker that the driver starts inside the peers' venv (``--role=worker``), one process per
(task, peer), with a time limit. Each worker times ``optax.adamw`` and the peer on the same model
(``models.py``, plain JAX), interleaved exactly like ``step_time.py``. Our methods are timed by
``step_time.py`` in this venv in the same run, and every method is compared by its ratio to the
AdamW of its own environment. The driver also tries each peer package once in this venv (jax
0.10) and records how it fails.

Workers run with ``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false``: without it
PSGD Kron's graph can deadlock in XLA's CPU scheduler (env_baseline §2.2); AdamW in the same
process runs with the same flag.

    python -m benchmarks.peers                                  # MLP + transformer, f = 10
    python -m benchmarks.peers --tasks=transformer --peers=dist_shampoo_b256_eigh,psgd_kron
    python -m benchmarks.peers --smoke

Writes ``peers.json``, ``peers.md`` and ``peers.png`` to ``--out_dir``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIREMENTS = os.path.join(HERE, "requirements-peers.txt")
SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
LEARNING_RATE = 1e-4

# name: (package, settings). Shampoo: lr, block size, beta1 0.9, beta2 0.999, preconditioners
# every f steps from step 1, RMSprop grafting (RMSPROP_NORMALIZED diverges, env_baseline §2.1).
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
OURS = ("soap", "kl_soap", "kl_shampoo", "shampoo", "adamw_shampoo")

_ROLE = flags.DEFINE_enum("role", "driver", ["driver", "worker"], "Driver or worker process.")
_TASKS = flags.DEFINE_list("tasks", ["mlp", "transformer"], "Tasks: mlp, transformer.")
_PEERS = flags.DEFINE_list("peers", list(PEERS), "Peers to time.")
_OURS = flags.DEFINE_list("ours", list(OURS), "Our methods to time alongside (empty: none).")
_FREQUENCY = flags.DEFINE_integer("frequency", 10, "Preconditioner refresh period (ours, Shampoo).")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed calls per method.")
_STEPS = flags.DEFINE_integer(
  "steps", 0, "Timed calls per method; 0: max(f, --min_steps) rounded up to a multiple of f."
)
_MIN_STEPS = flags.DEFINE_integer("min_steps", 30, "Lower bound of the automatic --steps.")
_CHUNK = flags.DEFINE_integer("chunk", 10, "Calls per method before switching.")
_PEER_VENV = flags.DEFINE_string("peer_venv", "/tmp/kl_precond_peers_venv", "The peers' venv.")
_CALL_TIMEOUT = flags.DEFINE_float("call_timeout", 600, "Seconds before one call counts as hung.")
_PEER_TIMEOUT = flags.DEFINE_integer("peer_timeout", 1800, "Seconds before a worker is killed.")
_PROBE = flags.DEFINE_bool("probe_current_jax", True, "Try each peer package in this venv too.")
_PROBE_TIMEOUT = flags.DEFINE_integer("probe_timeout", 90, "Seconds per peer tried in this venv.")
_SEQUENTIAL_EIGH = flags.DEFINE_bool(
  "sequential_eigh", False, "Ours: the eigh deadlock workaround of step_time.py."
)
_OURS_JSON = flags.DEFINE_string("ours_json", "", "Reuse a step_time.json instead of timing ours.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny MLP, f=2, two peers, few steps.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")
_OUT_DIR = flags.DEFINE_string("out_dir", "outputs/benchmarks", "Output directory.")
_TASK = flags.DEFINE_string("task", "mlp", "Worker: the task.")
_PEER = flags.DEFINE_string("peer", "", "Worker: the peer.")
_RESULT_JSON = flags.DEFINE_string("result_json", "", "Worker: where to write the result.")


# ---------------------------------------------------------------------------------------------
# Worker (runs inside the peers' venv)
# ---------------------------------------------------------------------------------------------


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
  suffix = name.rpartition("_p")[2] if "_p0" in name else ""
  probability = {"preconditioner_update_probability": float(suffix)} if suffix else {}
  if name.startswith("psgd_kron"):
    import optax.transforms._clipping as clipping

    sys.modules.setdefault("optax._src.clipping", clipping)  # psgd-jax 0.2.9 vs optax 0.2.8
    from psgd_jax.kron import kron

    return kron(learning_rate=LEARNING_RATE, **probability)
  if name.startswith("dk_kron"):
    from distributed_kron import kron

    return kron(learning_rate=LEARNING_RATE, **probability)
  if name == "dk_pro":
    from distributed_kron import pro

    return pro(learning_rate=LEARNING_RATE)
  raise ValueError(f"Unknown peer {name!r}; expected one of {sorted(PEERS)}.")


def worker(
  task_name: str,
  peer: str,
  frequency: int,
  warmup: int,
  steps: int,
  chunk: int,
  smoke: bool,
  progress: bool,
  call_timeout: float,
  result_json: str,
) -> dict[str, Any]:
  """Times ``optax.adamw`` and ``peer`` interleaved on one task; returns their summaries.

  A call that hangs ends the process after writing the error to ``result_json``.
  """
  import optax
  from tqdm import tqdm

  from benchmarks import models

  result: dict[str, Any] = {"environment": models.environment(), "peer": peer, "task": task_name}
  task = models.make_task(task_name, smoke=smoke)
  runners = [models.StepRunner("adamw", task, optax.adamw(LEARNING_RATE))]
  try:
    runners.append(models.StepRunner(peer, task, make_peer(peer, frequency)))
  except Exception as error:  # recorded, not raised: the driver reports it
    result["error"] = f"{type(error).__name__}: {error}"
    result["traceback"] = traceback.format_exc()[-3000:]
  bar = tqdm(
    total=len(runners) * (warmup + steps),
    disable=not progress,
    desc=f"{task_name} {peer}",
    unit="step",
    file=sys.stderr,
  )
  try:
    watchdog = models.Watchdog(call_timeout, result_json)
    models.run_interleaved(runners, warmup, steps, chunk, bar.update, watchdog)
  except Exception as error:
    result["error"] = f"{type(error).__name__}: {error}"
    result["traceback"] = traceback.format_exc()[-3000:]
    return result
  bar.close()
  # Only Shampoo refreshes periodically; PSGD's updates are random (no schedule to find).
  summaries = {
    r.name: models.summarize(
      r,
      models.refresh_schedule(r, frequency) if r.name.startswith("dist_") else None,
      frequency,
    )
    for r in runners
  }
  for summary in summaries.values():
    summary["ratio_median"] = summary["median_ms"] / summaries["adamw"]["median_ms"]
    summary["ratio_amortised"] = summary["amortised_ms"] / summaries["adamw"]["mean_ms"]
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


def run_worker(
  python: str,
  task: str,
  peer: str,
  settings: dict[str, Any],
  timeout: int,
  scheduler_flag: bool = True,
  pythonpath: str = "",
) -> dict[str, Any]:
  """One worker process; its JSON, or the reason it produced none."""
  out = os.path.join(settings["out_dir"], f"peer_{task}_{peer}_{os.getpid()}.json")
  command = [
    python,
    os.path.join(HERE, "peers.py"),
    "--role=worker",
    f"--task={task}",
    f"--peer={peer}",
    f"--frequency={settings['frequency']}",
    f"--warmup={settings['warmup']}",
    f"--steps={settings['steps']}",
    f"--chunk={settings['chunk']}",
    f"--result_json={out}",
    f"--call_timeout={settings['call_timeout']}",
    f"--smoke={settings['smoke']}",
    f"--progress={settings['progress']}",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if pythonpath:
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
  if scheduler_flag:
    env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), SCHEDULER_FLAG]).strip()
  start = time.perf_counter()
  try:
    done = subprocess.run(command, env=env, timeout=timeout, capture_output=True, text=True)
  except subprocess.TimeoutExpired:
    return {
      "error": f"timed out after {timeout} s (no result: hung or too slow)",
      "wall_seconds": time.perf_counter() - start,
    }
  result: dict[str, Any] = {}
  if os.path.exists(out):
    with open(out) as f:
      result = json.load(f)
    os.remove(out)
  if done.returncode != 0 and "error" not in result:
    result["error"] = f"exit code {done.returncode}: {_tail(done.stderr, 6)}"
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


def ours(tasks: Sequence[str], methods: Sequence[str], settings: dict[str, Any]) -> dict[str, Any]:
  """Our methods and AdamW in this venv, by ``step_time.py`` (or from ``--ours_json``)."""
  if settings["ours_json"]:
    with open(settings["ours_json"]) as f:
      return json.load(f)
  out_dir = os.path.join(settings["out_dir"], "peers_ours")
  command = [
    sys.executable,
    os.path.join(HERE, "step_time.py"),
    f"--tasks={','.join(tasks)}",
    f"--methods={','.join(['adamw', *methods])}",
    f"--frequencies={settings['frequency']}",
    f"--warmup={settings['warmup']}",
    f"--steps={settings['steps']}",
    f"--chunk={settings['chunk']}",
    f"--smoke={settings['smoke']}",
    f"--progress={settings['progress']}",
    f"--out_dir={out_dir}",
    f"--sequential_eigh={settings['sequential_eigh']}",
  ]
  subprocess.run(command, check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  with open(os.path.join(out_dir, "step_time.json")) as f:
    return json.load(f)


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
      peer,
      probe_settings,
      timeout,
      scheduler_flag=False,
      pythonpath=copies["path"],
    )
    error = result.get("error", "")
    probes[peer] = {
      "runs": not error,
      "error": error,
      "why": _why(error),
      "jax": result.get("environment", {}).get("jax", ""),
      "traceback": result.get("traceback", result.get("stderr_tail", "")),
    }
  return probes


def driver(
  tasks: Sequence[str],
  peers: Sequence[str],
  our_methods: Sequence[str],
  settings: dict[str, Any],
  peer_venv: str,
  timeout: int,
  probe: bool,
  probe_timeout: int = 90,
) -> dict[str, Any]:
  started = time.perf_counter()
  os.makedirs(settings["out_dir"], exist_ok=True)
  report: dict[str, Any] = {"settings": settings, "rows": [], "probes": {}}
  try:
    report["venv"] = ensure_venv(peer_venv)
  except subprocess.CalledProcessError as error:
    report["venv"] = {"error": str(error)}
  for task in tasks:
    for peer in peers:
      if "error" in report["venv"]:
        result = {"error": f"peers' venv unavailable: {report['venv']['error']}"}
      else:
        print(f"[peers] {task}: {peer} (jax 0.5.3 venv)", flush=True)
        result = run_worker(report["venv"]["python"], task, peer, settings, timeout)
      report["rows"].extend(_peer_rows(task, peer, result, settings["frequency"]))
  if probe:
    report["probes"] = probe_current_jax(settings, peer_venv + "_current_jax", probe_timeout)
  if our_methods:
    report["ours"] = ours(tasks, our_methods, settings)
    report["rows"].extend(_our_rows(report["ours"], tasks, settings["frequency"]))
  report["verdicts"] = _verdicts(report["rows"])
  report["wall_seconds"] = time.perf_counter() - started
  _write(report, settings["out_dir"])
  return report


def _peer_rows(
  task: str, peer: str, result: dict[str, Any], frequency: int
) -> list[dict[str, Any]]:
  """The worker's AdamW row, then the peer's row (or its failure)."""
  env = result.get("environment", {})
  base = {
    "task": task,
    "env": f"jax {env.get('jax', '?')} (peers)",
    "package": PEERS[peer][0],
    "settings": PEERS[peer][1].replace(", f", f", f={frequency}"),
    "wall_seconds": result.get("wall_seconds", float("nan")),
  }
  results = result.get("results", {})
  rows = []
  if "adamw" in results:
    adamw = results["adamw"]["median_ms"]
    rows.append(
      dict(
        base,
        method="adamw",
        package="optax",
        settings=f"optax.adamw, with {peer}",
        adamw_median_ms=adamw,
        **results["adamw"],
      )
    )
  if "error" in result or peer not in results:
    error = result.get("error", "no result")
    traceback_text = result.get("traceback", result.get("stderr_tail", ""))
    rows.append(dict(base, method=peer, error=error, why=_why(error), traceback=traceback_text))
  else:
    rows.append(dict(base, method=peer, adamw_median_ms=adamw, **results[peer]))
  return rows


def _our_rows(report: dict[str, Any], tasks: Sequence[str], frequency: int) -> list[dict[str, Any]]:
  """Rows of our step_time report for the peers' tasks and frequency."""
  rows = []
  for config in report["configs"]:
    if config["task"] not in tasks or config["frequency"] != frequency:
      continue
    jax_version = report["environment"]["jax"]
    adamw = config["results"].get("adamw", {}).get("median_ms", float("nan"))
    for method, summary in config["results"].items():
      rows.append(
        dict(
          summary,
          task=config["task"],
          env=f"jax {jax_version} (ours)",
          adamw_median_ms=adamw,
          method=method,
          package="kl_precond" if method != "adamw" else "optax",
          settings=f"f={config['frequency']}",
        )
      )
    for method, reason in config["skipped"].items():
      rows.append(
        {
          "task": config["task"],
          "env": f"jax {jax_version} (ours)",
          "method": method,
          "package": "kl_precond",
          "settings": "",
          "error": reason,
          "why": "not built",
        }
      )
  return rows


def _verdicts(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """For each task, each of our methods against each peer: amortised ratio, lower is faster."""
  verdicts = []
  for task in dict.fromkeys(r["task"] for r in rows):
    mine = [
      r
      for r in rows
      if r["task"] == task and r["package"] == "kl_precond" and "ratio_amortised" in r
    ]
    theirs = [
      r
      for r in rows
      if r["task"] == task
      and r["package"] not in ("kl_precond", "optax")
      and "ratio_amortised" in r
    ]
    for m in mine:
      for p in theirs:
        verdicts.append(
          {
            "task": task,
            "ours": m["method"],
            "peer": p["method"],
            "ours_ratio": m["ratio_amortised"],
            "peer_ratio": p["ratio_amortised"],
            "faster": m["ratio_amortised"] < p["ratio_amortised"],
          }
        )
  return verdicts


HEADERS = (
  "task",
  "environment",
  "method",
  "settings",
  "median ms",
  "mean ms",
  "amortised ms",
  "AdamW median ms (same env)",
  "×AdamW median",
  "×AdamW amortised",
  "final loss",
  "status",
)


def markdown(report: dict[str, Any]) -> str:
  from benchmarks import models

  rows, nan = [], float("nan")
  for r in report["rows"]:
    status = "ok"
    if "error" in r:
      status = f"{'skipped' if r.get('why') == 'not built' else 'FAILED'}: {r['error'][:120]}"
    rows.append(
      (
        r["task"],
        r["env"],
        r["method"],
        r["settings"],
        r.get("median_ms", nan),
        r.get("mean_ms", nan),
        r.get("amortised_ms", nan),
        r.get("adamw_median_ms", nan),
        r.get("ratio_median", nan),
        r.get("ratio_amortised", nan),
        r.get("final_loss", nan),
        status,
      )
    )
  lines = [
    "# Peers vs ours: step time as a ratio to optax.adamw in the same environment",
    "",
    f"Peers: jax 0.5.3 venv at `{report['settings']['peer_venv']}` (pins in "
    f"requirements-peers.txt), workers with `XLA_FLAGS={SCHEDULER_FLAG}`; ours: this venv. "
    f"Frequency {report['settings']['frequency']}; wall {report['wall_seconds']:.0f} s.",
    "",
    models.markdown_table(HEADERS, rows),
    "",
    "Every peer row's AdamW is the one measured in the same worker process (interleaved); "
    "amortised = mean over whole refresh periods (refresh steps included).",
  ]
  failures = [r for r in report["rows"] if "error" in r]
  if failures:
    lines += ["", "Failures:", ""]
    lines += [
      f"- {r['task']} {r['method']}: {r['error'][:300]}"
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
  if report["verdicts"]:
    lines += ["", "Ours faster than the peer (amortised ratio to AdamW, lower is faster):", ""]
    for task in dict.fromkeys(v["task"] for v in report["verdicts"]):
      for v in (v for v in report["verdicts"] if v["task"] == task):
        lines.append(
          f"- {task}: {v['ours']} {v['ours_ratio']:.2f}× vs {v['peer']} "
          f"{v['peer_ratio']:.2f}×: {'faster' if v['faster'] else 'NOT faster'}"
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
    ax.bar(np.arange(len(rows)), values, color=colors)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(
      np.arange(len(rows)), [r["method"] for r in rows], rotation=40, ha="right", fontsize=7
    )
    ax.set_ylabel("amortised step time / AdamW (own env)")
    ax.set_title(f"{task}: ours (blue) vs peers (red)", fontsize=9)
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
  if _ROLE.value == "worker":
    result = worker(
      _TASK.value,
      _PEER.value,
      frequency,
      warmup,
      steps,
      chunk,
      smoke,
      _PROGRESS.value,
      _CALL_TIMEOUT.value,
      _RESULT_JSON.value,
    )
    with open(_RESULT_JSON.value, "w") as f:
      json.dump(result, f, indent=1)
    return
  settings = {
    "frequency": frequency,
    "warmup": warmup,
    "steps": _timed_steps(frequency, steps, _MIN_STEPS.value),
    "chunk": chunk,
    "smoke": smoke,
    "progress": _PROGRESS.value,
    "out_dir": os.path.abspath(_OUT_DIR.value),
    "ours_json": _OURS_JSON.value,
    "sequential_eigh": _SEQUENTIAL_EIGH.value,
    "call_timeout": _CALL_TIMEOUT.value,
    "peer_venv": _PEER_VENV.value,
  }
  tasks = _TASKS.value if (_TASKS.present or not smoke) else ["mlp"]
  peers = _PEERS.value if (_PEERS.present or not smoke) else ["dist_shampoo_b256_eigh", "dk_pro"]
  our_methods = [m for m in _OURS.value if m]
  driver(
    tasks,
    peers,
    our_methods,
    settings,
    _PEER_VENV.value,
    _PEER_TIMEOUT.value,
    _PROBE.value and not smoke,
    _PROBE_TIMEOUT.value,
  )


if __name__ == "__main__":
  app.run(main)
