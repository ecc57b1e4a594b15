"""Train-step time of each optimizer against ``optax.adamw``, measured in the same run.

For every task (``mlp``, ``transformer``; see ``models.py``) and every preconditioning frequency,
each method gets its own jitted step (forward, backward, ``tx.update``, ``apply_updates``;
parameters and state donated), ``--warmup`` untimed calls (call 0 builds the first bases), then
``--steps`` timed calls, each ended by ``block_until_ready``. The methods run interleaved in
chunks of ``--chunk`` calls with a rotating order, so load drifts on a shared machine hit all of
them alike; the paired ratio compares each chunk with AdamW's chunk of the same round.

    python -m benchmarks.step_time                                  # both tasks, f = 10 and 100
    python -m benchmarks.step_time --tasks=transformer --frequencies=10 --steps=40
    python -m benchmarks.step_time --smoke                          # tiny MLP, < 30 s

A method named ``<method>+stagger`` (e.g. ``soap+stagger``) runs with ``stagger_refresh=True``.
What staggering does to the refresh spike is in "heaviest phase / median": the median of the
calls at the slowest phase of the cycle (call index mod f) over the median of all calls; the
"max / median" column beside it is one call, which a shared machine's noise decides as often as
the refresh does (AdamW's own is 1.2-1.4 here). "×AdamW cycle" is the mean of the phase medians
over AdamW's: the amortised ratio by one rule with and without staggering. With at least 3
calls per phase (``--min_steps`` ≥ 3f):

    python -m benchmarks.step_time --tasks=transformer --frequencies=10 --min_steps=100 \\
      --methods=adamw,soap,soap+stagger,kl_shampoo,kl_shampoo+stagger,shampoo,shampoo+stagger

Writes ``step_time.json``, ``step_time.md`` and ``step_time.png`` to ``--out_dir``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import cpu_env

cpu_env.disable_concurrency_scheduler()  # before jax is imported (cpu_env has why)
cpu_env.one_openblas_thread()

import numpy as np
from absl import app, flags
from tqdm import tqdm

from benchmarks import models

# Targets on the transformer at frequency 10 (amortised step time / AdamW's mean step time).
TARGETS = {"soap": 1.5, "kl_shampoo": 1.6, "kl_soap": 1.7}

_TASKS = flags.DEFINE_list("tasks", ["mlp", "transformer"], "Tasks: mlp, transformer.")
_METHODS = flags.DEFINE_list("methods", list(models.METHODS), "Methods to time.")
_FREQUENCIES = flags.DEFINE_list("frequencies", ["10", "100"], "precondition_frequency values.")
_MAX_PRECOND_DIM = flags.DEFINE_integer(
  "max_precond_dim", 10000, "max_precond_dim of every method."
)
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed calls per method (call 0 builds the bases).")
_STEPS = flags.DEFINE_integer(
  "steps", 0, "Timed calls per method; 0: the least multiple of f >= max(f, --min_steps)."
)
_MIN_STEPS = flags.DEFINE_integer("min_steps", 30, "Lower bound of the automatic --steps.")
_CHUNK = flags.DEFINE_integer("chunk", 10, "Calls per method before switching to the next method.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of parameters and data.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny MLP, f=2, few steps: finishes in < 30 s.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_OUT_DIR = flags.DEFINE_string("out_dir", "outputs/benchmarks", "Output directory.")
_ISOLATE = flags.DEFINE_bool("isolate", True, "Run each (task, f) in a child process (hang retry).")
_CALL_TIMEOUT = flags.DEFINE_float("call_timeout", 600, "Seconds before one call counts as hung.")
_CONFIG_TIMEOUT = flags.DEFINE_float("config_timeout", 7200, "Seconds per (task, f) child.")
_WORKER_SPEC = flags.DEFINE_string("worker_spec", "", "Internal: run one configuration.")
_SEQUENTIAL_EIGH = flags.DEFINE_bool(
  "sequential_eigh",
  False,
  "Workaround for an XLA CPU deadlock: see models.sequential_eigh_workaround.",
)


def timed_steps(frequency: int, steps: int, min_steps: int) -> int:
  if steps > 0:
    return steps
  return frequency * math.ceil(max(frequency, min_steps) / frequency)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
  """Times ``spec["methods"]`` on one task at one frequency, in this process.

  ``spec`` holds ``task, smoke, seed, methods, frequency, max_precond_dim, warmup, steps, chunk,
  progress, call_timeout`` and optionally ``hang_report`` (see ``models.Watchdog``).
  """
  if spec.get("sequential_eigh"):
    models.sequential_eigh_workaround()
  task = models.make_task(spec["task"], smoke=spec["smoke"], seed=spec["seed"])
  frequency, warmup, steps = spec["frequency"], spec["warmup"], spec["steps"]
  print(
    f"[step_time] {task.description}, {task.num_params:,} params, f={frequency}, "
    f"{warmup} warmup + {steps} timed calls per method",
    flush=True,
  )
  runners, skipped = [], {}
  for name in spec["methods"]:
    # ``<method>+stagger``: the same optimizer with ``stagger_refresh=True`` (no refresh step
    # stands out, so its amortised time is the mean over whole cycles).
    base, stagger = models.split_name(name)
    try:
      tx = models.make_optimizer(base, frequency, spec["max_precond_dim"], stagger=stagger)
    except LookupError as error:
      skipped[name] = str(error)
      print(f"[step_time] skipping {name}: {error}", flush=True)
      continue
    runners.append(models.StepRunner(name, task, tx))
  bar = tqdm(
    total=len(runners) * (warmup + steps),
    disable=not spec["progress"],
    desc=f"{task.name} f={frequency}",
    unit="step",
  )
  watchdog = models.Watchdog(spec["call_timeout"], spec.get("hang_report"))
  models.run_interleaved(runners, warmup, steps, spec["chunk"], bar.update, watchdog)
  bar.close()
  results = {
    r.name: models.summarize(
      r, None if r.name == "adamw" else models.refresh_schedule(r, frequency), frequency
    )
    for r in runners
  }
  models.add_ratios(results, runners, spec["chunk"])
  return {
    "results": results,
    "skipped": skipped,
    "task": spec["task"],
    "description": task.description,
    "num_params": task.num_params,
    "frequency": frequency,
    "warmup": warmup,
    "steps": steps,
    "chunk": spec["chunk"],
  }


def measure_isolated(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
  """``measure`` in a child process (``models.run_isolated``: a method whose call hangs twice
  is dropped and recorded)."""
  return models.run_isolated(os.path.abspath(__file__), spec, timeout, "step_time")


def run(
  tasks: Sequence[str],
  methods: Sequence[str],
  frequencies: Sequence[int],
  *,
  max_precond_dim: int = 10000,
  warmup: int = 5,
  steps: int = 0,
  min_steps: int = 30,
  chunk: int = 10,
  seed: int = 0,
  smoke: bool = False,
  progress: bool = True,
  out_dir: str = "outputs/benchmarks",
  isolate: bool = True,
  call_timeout: float = 600.0,
  config_timeout: float = 7200.0,
  sequential_eigh: bool = False,
) -> dict[str, Any]:
  """Runs every (task, frequency) configuration and writes JSON, markdown and PNG.

  With ``isolate`` each configuration runs in a child process (see ``measure_isolated``).
  """
  started = time.perf_counter()
  report: dict[str, Any] = {"environment": models.environment(), "configs": []}
  for task_name in tasks:
    for frequency in frequencies:
      spec = {
        "task": task_name,
        "smoke": smoke,
        "seed": seed,
        "methods": list(methods),
        "frequency": frequency,
        "max_precond_dim": max_precond_dim,
        "warmup": warmup,
        "steps": timed_steps(frequency, steps, min_steps),
        "chunk": chunk,
        "progress": progress,
        "call_timeout": call_timeout,
        "sequential_eigh": sequential_eigh,
      }
      config = measure_isolated(spec, config_timeout) if isolate else measure(spec)
      report["configs"].append(config)
  report["targets"] = _check_targets(report["configs"])
  report["wall_seconds"] = time.perf_counter() - started
  report["settings"] = {
    "max_precond_dim": max_precond_dim,
    "learning_rate": models.LEARNING_RATE,
    "smoke": smoke,
    "seed": seed,
    "sequential_eigh": sequential_eigh,
  }
  _write(report, out_dir)
  return report


def _check_targets(configs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  checks = []
  for config in configs:
    if config["task"] != "transformer" or config["frequency"] != 10:
      continue
    for method, limit in TARGETS.items():
      summary = config["results"].get(method)
      if summary is None or "ratio_amortised" not in summary:
        continue
      checks.append(
        {
          "method": method,
          "limit": limit,
          "ratio_amortised": summary["ratio_amortised"],
          "ratio_median": summary["ratio_median"],
          "met": summary["ratio_amortised"] <= limit,
        }
      )
  return checks


HEADERS = (
  "task",
  "f",
  "method",
  "compile s",
  "median ms",
  "mean ms",
  "refresh ms",
  "amortised ms",
  "p90 ms",
  "max ms",
  "max / median",
  "heaviest phase / median",
  "×AdamW median",
  "×AdamW paired",
  "×AdamW amortised",
  "×AdamW cycle",
  "final loss",
)


def markdown(report: dict[str, Any]) -> str:
  rows = []
  for config in report["configs"]:
    for method, s in config["results"].items():
      rows.append(
        (
          config["task"],
          config["frequency"],
          method,
          s["compile_s"],
          s["median_ms"],
          s["mean_ms"],
          s["refresh_ms"],
          s["amortised_ms"],
          s.get("p90_ms", float("nan")),
          s.get("max_ms", float("nan")),
          s.get("max_ms", float("nan")) / s["median_ms"],
          s.get("heaviest_phase_over_median", float("nan")),
          s.get("ratio_median", float("nan")),
          s.get("ratio_paired", float("nan")),
          s.get("ratio_amortised", float("nan")),
          s.get("ratio_cycle", float("nan")),
          s["final_loss"],
        )
      )
  env = report["environment"]
  text = [
    "# Train-step time vs optax.adamw (same run)",
    "",
    f"jax {env['jax']}, optax {env['optax']}, {env['cpu_count']} CPUs, "
    f"OPENBLAS_NUM_THREADS={env.get('openblas_num_threads') or 'unset'}, load average "
    f"{env['load_average_1_5_15']} at start; wall {report['wall_seconds']:.0f} s"
    + (
      "; eigh batched as lax.map (--sequential_eigh)."
      if report["settings"]["sequential_eigh"]
      else "."
    ),
    "",
    models.markdown_table(HEADERS, rows),
    "",
  ]
  for config in report["configs"]:
    text.append(
      f"- {config['task']}: {config['description']}, {config['num_params']:,} params; "
      f"f={config['frequency']}: {config['warmup']} warmup + {config['steps']} timed "
      f"calls per method, chunks of {config['chunk']}."
    )
    for method, reason in config["skipped"].items():
      text.append(f"  - skipped {method}: {reason}")
    for method, labels in config.get("hangs", {}).items():
      text.append(f"  - hung and retried: {'; '.join(labels)} ({method})")
  if report["targets"]:
    text += ["", "Targets (transformer, f=10, amortised / AdamW mean):", ""]
    for c in report["targets"]:
      verdict = "met" if c["met"] else "MISSED"
      text.append(
        f"- {c['method']} <= {c['limit']}×: {c['ratio_amortised']:.2f}× "
        f"(median {c['ratio_median']:.2f}×) — {verdict}"
      )
  return "\n".join(text) + "\n"


def plot(report: dict[str, Any], path: str) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  configs = report["configs"]
  fig = Figure(figsize=(4.5 * max(1, len(configs)), 3.8))
  FigureCanvasAgg(fig)
  for k, config in enumerate(configs):
    ax = fig.add_subplot(1, len(configs), k + 1)
    names = list(config["results"])
    x = np.arange(len(names))
    median = [config["results"][n].get("ratio_median", np.nan) for n in names]
    amortised = [config["results"][n].get("ratio_amortised", np.nan) for n in names]
    ax.bar(x - 0.2, median, 0.4, label="median")
    ax.bar(x + 0.2, amortised, 0.4, label="amortised")
    for xi, value in zip(x, amortised, strict=True):
      ax.annotate(f"{value:.2f}", (xi + 0.2, value), ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    ax.set_title(f"{config['task']}, f={config['frequency']}", fontsize=9)
    ax.set_ylabel("step time / AdamW")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def _write(report: dict[str, Any], out_dir: str) -> None:
  models.write_outputs("step_time", report, out_dir, markdown, plot)


def main(argv: Sequence[str]) -> None:
  del argv
  if _WORKER_SPEC.value:
    models.run_worker(_WORKER_SPEC.value, measure)
    return
  smoke = _SMOKE.value
  tasks = _TASKS.value
  frequencies = [int(f) for f in _FREQUENCIES.value]
  warmup, steps, chunk = _WARMUP.value, _STEPS.value, _CHUNK.value
  if smoke:  # flags given explicitly still win over the smoke defaults
    tasks = tasks if _TASKS.present else ["mlp"]
    frequencies = frequencies if _FREQUENCIES.present else [2]
    warmup = warmup if _WARMUP.present else 2
    steps = steps if _STEPS.present else 4
    chunk = chunk if _CHUNK.present else 2
  run(
    tasks,
    _METHODS.value,
    frequencies,
    max_precond_dim=_MAX_PRECOND_DIM.value,
    warmup=warmup,
    steps=steps,
    min_steps=_MIN_STEPS.value,
    chunk=chunk,
    seed=_SEED.value,
    smoke=smoke,
    progress=_PROGRESS.value,
    out_dir=_OUT_DIR.value,
    isolate=_ISOLATE.value,
    call_timeout=_CALL_TIMEOUT.value,
    config_timeout=_CONFIG_TIMEOUT.value,
    sequential_eigh=_SEQUENTIAL_EIGH.value,
  )


if __name__ == "__main__":
  app.run(main)
