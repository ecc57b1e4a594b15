"""Where ``peers.py`` runs its workers: the peers' venv, the peer copies for this venv's JAX, and
one worker process (``run_worker``).

The peers break on current JAX (``peers_specs``), so they run, unchanged, in a separate venv
pinned to jax 0.5.3 (``requirements-peers.txt``; created on demand at ``--peer_venv`` by
``ensure_venv``), and kl_precond, which runs unchanged on jax 0.5.3, runs there with them.
``ensure_current_jax_copies`` installs the peer packages alone next to it, to try them on this
venv's JAX (``--probe_current_jax``, ``--in_this_venv``).

Workers run with ``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false``: without it
PSGD Kron's graph can deadlock XLA's CPU scheduler (a step never returns), and turning off its
concurrency-optimized scheduler avoids that; AdamW and ours in the same process run with the same
flag (as in ``step_time.py``).
``OPENBLAS_NUM_THREADS`` is 1 unless set (as in ``step_time.py``; ``peers.py`` sets it, the
workers inherit it): it applies to every optimizer of a worker alike (the peers' eigh and
triangular solves call LAPACK/BLAS too).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import cpu_env
from benchmarks.peers_specs import PEERS

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REQUIREMENTS = os.path.join(HERE, "requirements-peers.txt")
SCHEDULER_FLAG = cpu_env.SCHEDULER_FLAG
# The program a worker runs (``--role=worker``): the driver's own file.
PROGRAM = os.path.join(HERE, "peers.py")


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
    PROGRAM,
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
