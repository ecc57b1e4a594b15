"""The worker of ``peers.py``: times AdamW, peers and ours interleaved in one process.

``peers.py --role=worker`` calls ``worker`` inside the peers' venv (jax 0.5.3; the repository
root on ``PYTHONPATH``), or in this venv with ``--in_this_venv`` and for the probes. That venv
holds only the pins of ``requirements-peers.txt`` and what they pull in, so this module imports
only the standard library and ``peers_specs`` at load, and optax, tqdm and ``models`` (plain JAX)
inside ``worker``.

The runners are built on the same model (``models.py``) and timed exactly like ``step_time.py``
(``models.run_interleaved``: warmup, then chunks in a rotating order; a watchdog per call). Our
summaries are amortised over whole refresh periods with the refresh schedule read from the times
(``models.refresh_schedule``), like ``step_time.py`` and the ``dist_shampoo`` peers; PSGD's
random updates have no schedule (amortised = mean). Every ratio is to the AdamW of the same
process.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.peers_specs import LEARNING_RATE, make_peer, parse_spec


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
