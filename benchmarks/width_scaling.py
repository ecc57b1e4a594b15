"""Train-step time, state bytes and FLOPs of SOAP, KL-Shampoo and Shampoo as the width grows.

A decoder LM (``models.transformer_task``: ``--layers`` pre-LayerNorm blocks, heads of 64, MLP
``4d``, vocabulary 256) at widths ``d`` in ``--widths``, ``--seq_len × --batch`` tokens per step
(128 × 16 = 2,048). At each width, each layout in ``--blocks``: ``whole`` (every axis one factor,
widths up to ``--whole_max_width``) and blocks of ``b`` (``LayoutConfig(b, blocking=True)``; a
block at least the longest axis is the whole-axes layout and is skipped where that runs). Each
(width, layout) runs in its own child process (``models.run_isolated``): AdamW and every method,
with and without ``stagger_refresh`` (``--stagger``), interleaved as in ``step_time.py``
(``models.run_interleaved``: chunks of ``--chunk`` calls, the order rotating), so every ratio is
to the AdamW of the same process.

Per row: p50, p90 and max step time; p50 / AdamW p50, the paired ratio, and the amortised ratio
(without staggering ``((f-1)·median + refresh)/f``, as ``step_time.py``; with staggering, whose
refresh is spread over the cycle, the mean over whole cycles), each over AdamW's mean; max / p50;
the optimizer state's bytes per parameter (``Σ nbytes`` of the state's leaves / parameters); the
update's matmul FLOPs per step and the refresh's per step (÷ f), from ``flop_counts.py`` over the
blocks of ``kl_precond``'s layout, against the model's forward + backward ``6 · params · tokens``.

    python -m benchmarks.width_scaling                       # widths 256-2048, hours on 2 cores
    python -m benchmarks.width_scaling --widths=256,512 --stagger=off
    python -m benchmarks.width_scaling --resume              # run only what the JSON lacks
    python -m benchmarks.width_scaling --smoke               # widths 32 and 64, tiny LM

Writes ``width_scaling.json`` (after each group too), ``width_scaling.md`` and
``width_scaling.png`` to ``--out_dir``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import cpu_env

cpu_env.disable_concurrency_scheduler()  # before jax is imported (cpu_env has why)
cpu_env.one_openblas_thread()

import jax
import numpy as np
from absl import app, flags
from tqdm import tqdm

from benchmarks import flop_counts, models

METHODS = ("soap", "kl_shampoo", "shampoo")
WHOLE = "whole"

_WIDTHS = flags.DEFINE_list("widths", ["256", "512", "1024", "2048"], "Model widths d.")
_BLOCKS = flags.DEFINE_list(
  "blocks", [WHOLE, "1024", "512", "256"], "Layouts: `whole` and block sizes."
)
_METHODS = flags.DEFINE_list("methods", list(METHODS), "Methods (AdamW is always timed).")
_STAGGER = flags.DEFINE_enum(
  "stagger", "both", ["both", "on", "off"], "Time each method with stagger_refresh, without, both."
)
_FREQUENCY = flags.DEFINE_integer("frequency", 10, "precondition_frequency f.")
_LAYERS = flags.DEFINE_integer("layers", 1, "Transformer blocks.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Sequence length.")
_BATCH = flags.DEFINE_integer("batch", 16, "Sequences per step.")
_WHOLE_MAX_WIDTH = flags.DEFINE_integer(
  "whole_max_width", 1024, "Largest width that gets the whole-axes layout."
)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls per runner (call 0 builds the bases).")
_STEPS = flags.DEFINE_list(
  "steps",
  ["40", "30", "20", "20"],
  "Timed calls per runner: one value, or one per width; rounded up to a multiple of f.",
)
_CHUNK = flags.DEFINE_integer("chunk", 5, "Calls per runner before switching to the next.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of parameters and data.")
_SMOKE = flags.DEFINE_bool(
  "smoke", False, "Widths 32 and 64, a 32-token LM, f=2, 4 timed calls: under a minute."
)
_RESUME = flags.DEFINE_bool(
  "resume", False, "Keep the groups of an existing width_scaling.json run with the same settings."
)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_OUT_DIR = flags.DEFINE_string("out_dir", "outputs/benchmarks", "Output directory.")
_ISOLATE = flags.DEFINE_bool("isolate", True, "Run each (width, layout) in a child process.")
_CALL_TIMEOUT = flags.DEFINE_float("call_timeout", 600, "Seconds before one call counts as hung.")
_GROUP_TIMEOUT = flags.DEFINE_float("group_timeout", 14400, "Seconds per (width, layout) child.")
_WORKER_SPEC = flags.DEFINE_string("worker_spec", "", "Internal: run one (width, layout).")

# The smoke setting's defaults (flags given explicitly still win): a 32-token LM at widths 32
# and 64, whole axes at 32 only, blocks of 128 (the whole-axes layout at 32: skipped there) and
# 16; SOAP with and without staggering. Its time is the 12 compilations' (seconds each; a
# whole-axes layout's many factor shapes are separate code); every method adds 8.
SMOKE = {
  "methods": ["soap"],
  "widths": [32, 64],
  "blocks": [WHOLE, "128", "16"],
  "whole_max_width": 32,
  "frequency": 2,
  "warmup": 1,
  "steps": [4],
  "chunk": 2,
  "seq_len": 16,
  "batch": 2,
}


# ---------------------------------------------------------------------------------------------
# Model, layouts, runners
# ---------------------------------------------------------------------------------------------


def model_config(width: int, layers: int, seq_len: int, smoke: bool) -> models.TransformerConfig:
  if smoke:
    return models.TransformerConfig(vocab=64, seq_len=seq_len, width=width, layers=1, heads=2)
  return models.TransformerConfig(
    seq_len=seq_len, width=width, layers=layers, heads=max(1, width // 64)
  )


def parameter_shapes(config: models.TransformerConfig) -> list[tuple[int, ...]]:
  params = jax.eval_shape(lambda: models.transformer_init(jax.random.PRNGKey(0), config))
  return [tuple(x.shape) for x in jax.tree.leaves(params)]


def largest_axis(shapes: Sequence[Sequence[int]]) -> int:
  return max(max(shape) for shape in shapes)


def layout_size(layout: str, shapes: Sequence[Sequence[int]]) -> int:
  """``max_precond_dim`` of a layout: the block size, or for ``whole`` at least every axis."""
  return max(10000, largest_axis(shapes)) if layout == WHOLE else int(layout)


def runner_names(methods: Sequence[str], stagger: Sequence[bool]) -> list[str]:
  return ["adamw"] + [m + (models.STAGGER_SUFFIX if s else "") for s in stagger for m in methods]


def make_optimizer(name: str, layout: str, shapes: Sequence[Sequence[int]], frequency: int) -> Any:
  method, stagger = models.split_name(name)
  size = layout_size(layout, shapes)
  return models.make_optimizer(method, frequency, size, blocks=layout != WHOLE, stagger=stagger)


def stagger_supported(methods: Sequence[str]) -> bool:
  """Whether every method's constructor takes ``stagger_refresh`` in this kl_precond."""
  import inspect

  import kl_precond as kp

  return all("stagger_refresh" in inspect.signature(getattr(kp, m)).parameters for m in methods)


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


def optimizer_flops(
  method: str, layout: str, shapes: Sequence[Sequence[int]], frequency: int
) -> dict[str, float]:
  """``flop_counts.layout_flops`` over the blocks of the method's layout (``models.layout_config``,
  the layout ``models.make_optimizer`` gives it)."""
  if method == "adamw":
    return flop_counts.layout_flops(method, shapes, None, frequency)
  config = models.layout_config(method, layout_size(layout, shapes), blocks=layout != WHOLE)
  return flop_counts.layout_flops(method, shapes, config, frequency)


# ---------------------------------------------------------------------------------------------
# One (width, layout): measured in this process
# ---------------------------------------------------------------------------------------------


def measure(spec: dict[str, Any]) -> dict[str, Any]:
  """Times ``spec["methods"]`` (runner names) at one width and layout, in this process."""
  config = model_config(spec["width"], spec["layers"], spec["seq_len"], spec["smoke"])
  task = models.transformer_task(config, spec["batch"], spec["seed"], name=f"d{spec['width']}")
  shapes = [tuple(x.shape) for x in jax.tree.leaves(task.params)]
  frequency, warmup, steps, layout = (
    spec["frequency"],
    spec["warmup"],
    spec["steps"],
    spec["layout"],
  )
  print(
    f"[width_scaling] {task.description}, {task.num_params:,} params, layout {layout}, "
    f"f={frequency}, {warmup} warmup + {steps} timed calls per runner",
    flush=True,
  )
  runners, skipped, state_bytes = [], {}, {}
  for name in spec["methods"]:
    try:
      tx = make_optimizer(name, layout, shapes, frequency)
    except LookupError as error:
      skipped[name] = str(error)
      print(f"[width_scaling] skipping {name}: {error}", flush=True)
      continue
    runner = models.StepRunner(name, task, tx)
    state_bytes[name] = int(sum(x.nbytes for x in jax.tree.leaves(runner.state)))
    runners.append(runner)
  bar = tqdm(
    total=len(runners) * (warmup + steps),
    disable=not spec["progress"],
    desc=f"d={spec['width']} {layout}",
    unit="step",
  )
  watchdog = models.Watchdog(spec["call_timeout"], spec.get("hang_report"))
  models.run_interleaved(runners, warmup, steps, spec["chunk"], bar.update, watchdog)
  bar.close()
  model_flops = 6.0 * task.num_params * spec["batch"] * config.seq_len
  results = {}
  for runner in runners:
    method, stagger = models.split_name(runner.name)
    # One refresh step per cycle without staggering; spread over the cycle with it (the
    # amortised time is then the mean over the whole cycles timed).
    schedule = None if method == "adamw" or stagger else models.refresh_schedule(runner, frequency)
    summary = models.summarize(runner, schedule, frequency)
    flops = optimizer_flops(method, layout, shapes, frequency)
    summary.update(
      method=method,
      stagger=stagger,
      state_bytes=state_bytes[runner.name],
      bytes_per_param=state_bytes[runner.name] / task.num_params,
      max_over_p50=summary["max_ms"] / summary["median_ms"],
      update_flops=flops["update"],
      refresh_flops_per_step=flops["refresh"],
      decomposition_flops_per_step=flops["decomposition"],
      update_over_model=flops["update"] / model_flops,
      refresh_over_model=flops["refresh"] / model_flops,
      decomposition_over_model=flops["decomposition"] / model_flops,
    )
    results[runner.name] = summary
  models.add_ratios(results, runners, spec["chunk"])
  return {
    "width": spec["width"],
    "layout": layout,
    "results": results,
    "skipped": skipped,
    "description": task.description,
    "num_params": task.num_params,
    "largest_axis": largest_axis(shapes),
    "model_flops": model_flops,
    "tokens": spec["batch"] * config.seq_len,
    "frequency": frequency,
    "warmup": warmup,
    "steps": steps,
    "chunk": spec["chunk"],
    "environment": models.environment(),
  }


# ---------------------------------------------------------------------------------------------
# The plan, the run, resuming
# ---------------------------------------------------------------------------------------------


def plan(
  widths: Sequence[int],
  blocks: Sequence[str],
  whole_max_width: int,
  layers: int,
  seq_len: int,
  smoke: bool,
) -> tuple[list[tuple[int, str]], list[dict[str, Any]]]:
  """``(groups, skipped)``: the (width, layout) pairs to run, and the ones left out and why."""
  groups, skipped = [], []
  for width in widths:
    axis = largest_axis(parameter_shapes(model_config(width, layers, seq_len, smoke)))
    whole = WHOLE in blocks and width <= whole_max_width
    for layout in blocks:
      if layout == WHOLE and not whole:
        reason = f"whole axes only up to width {whole_max_width}"
      elif layout != WHOLE and whole and int(layout) >= axis:
        reason = f"same as whole (largest axis {axis} <= {layout})"
      else:
        groups.append((width, layout))
        continue
      skipped.append({"width": width, "layout": layout, "reason": reason})
  return groups, skipped


def group_signature(spec: dict[str, Any]) -> dict[str, Any]:
  """What a group's numbers depend on among the settings (for ``--resume``)."""
  keys = (
    "width",
    "layout",
    "methods",
    "frequency",
    "warmup",
    "steps",
    "chunk",
    "seed",
    "smoke",
    "layers",
    "seq_len",
    "batch",
  )
  return {k: spec[k] for k in keys}


def git_commit() -> str:
  """``HEAD``'s short hash, ``+dirty`` if kl_precond or benchmarks have uncommitted changes."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""

  head = git("rev-parse", "--short", "HEAD") or "unknown"
  dirty = git("status", "--porcelain", "--", "kl_precond", "benchmarks")
  return head + ("+dirty" if dirty else "")


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def run(
  widths: Sequence[int],
  blocks: Sequence[str],
  methods: Sequence[str],
  stagger: str,
  steps: Sequence[int],
  *,
  frequency: int = 10,
  layers: int = 1,
  seq_len: int = 128,
  batch: int = 16,
  whole_max_width: int = 1024,
  warmup: int = 2,
  chunk: int = 5,
  seed: int = 0,
  smoke: bool = False,
  resume: bool = False,
  progress: bool = True,
  out_dir: str = "outputs/benchmarks",
  isolate: bool = True,
  call_timeout: float = 600.0,
  group_timeout: float = 14400.0,
  command: str = "",
) -> dict[str, Any]:
  """Runs every (width, layout) group and writes JSON (also after each group), markdown, PNG."""
  started = time.perf_counter()
  variants = {"both": [False, True], "on": [True], "off": [False]}[stagger]
  notes = []
  if True in variants and not stagger_supported(methods):
    if stagger == "on":
      raise ValueError("--stagger=on: this kl_precond's constructors have no stagger_refresh")
    variants = [False]
    notes.append("stagger_refresh is not in this kl_precond: timed without staggering only.")
    print(f"[width_scaling] WARNING: {notes[-1]}", flush=True)
  if len(steps) not in (1, len(widths)):
    raise ValueError(f"--steps takes one value or one per width, got {steps} for {widths}")
  per_width = dict(
    zip(widths, list(steps) * len(widths) if len(steps) == 1 else steps, strict=True)
  )
  groups, skipped = plan(widths, blocks, whole_max_width, layers, seq_len, smoke)
  path = os.path.join(out_dir, "width_scaling.json")
  # --resume: the groups of the existing JSON, this run's and those it keeps for other runs,
  # by their settings; the ones this run does not use stay in the JSON as `other_groups`.
  previous = {}
  if resume and os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    for group in old.get("groups", []) + old.get("other_groups", []):
      previous[json.dumps(group["signature"], sort_keys=True)] = group
  report: dict[str, Any] = {
    "environment": models.environment(),
    "provenance": {"command": command, "commit": git_commit(), "cpu": cpu_model()},
    "settings": {
      "widths": list(widths),
      "blocks": list(blocks),
      "methods": list(methods),
      "stagger": stagger,
      "stagger_variants": variants,
      "frequency": frequency,
      "layers": layers,
      "seq_len": seq_len,
      "batch": batch,
      "whole_max_width": whole_max_width,
      "warmup": warmup,
      "steps": {str(w): s for w, s in per_width.items()},
      "chunk": chunk,
      "seed": seed,
      "smoke": smoke,
      "learning_rate": models.LEARNING_RATE,
    },
    "notes": notes,
    "skipped_layouts": skipped,
    "groups": [],
    "other_groups": list(previous.values()),
  }
  os.makedirs(out_dir, exist_ok=True)
  for width, layout in groups:
    spec = {
      "width": width,
      "layout": layout,
      "methods": runner_names(methods, variants),
      "frequency": frequency,
      "warmup": warmup,
      "steps": frequency * math.ceil(per_width[width] / frequency),
      "chunk": chunk,
      "seed": seed,
      "smoke": smoke,
      "layers": layers,
      "seq_len": seq_len,
      "batch": batch,
      "progress": progress,
      "call_timeout": call_timeout,
    }
    signature = group_signature(spec)
    group = previous.pop(json.dumps(signature, sort_keys=True), None)
    if group is None:
      if isolate:
        group = models.run_isolated(os.path.abspath(__file__), spec, group_timeout, "width_scaling")
      else:
        group = measure(spec)
      group.update(signature=signature, commit=report["provenance"]["commit"])
    else:
      print(f"[width_scaling] d={width} {layout}: kept from {path}", flush=True)
    report["groups"].append(group)
    report["other_groups"] = list(previous.values())
    with open(path, "w") as f:
      json.dump(report, f, indent=1)
  report["recommendations"] = recommendations(report["groups"])
  report["wall_seconds"] = time.perf_counter() - started
  _write(report, out_dir)
  return report


def recommendations(groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per width and method: the layout (and staggering) of the lowest ×AdamW amortised."""
  best: dict[tuple[int, str], dict[str, Any]] = {}
  for group in groups:
    for s in group["results"].values():
      if s["method"] == "adamw" or "ratio_amortised" not in s:
        continue
      key = (group["width"], s["method"])
      if key not in best or s["ratio_amortised"] < best[key]["ratio_amortised"]:
        best[key] = {
          "width": group["width"],
          "method": s["method"],
          "layout": group["layout"],
          "stagger": s["stagger"],
          "ratio_amortised": s["ratio_amortised"],
          "max_over_p50": s["max_over_p50"],
        }
  return sorted(best.values(), key=lambda r: (r["width"], _method_order(r["method"])))


def _method_order(method: str) -> int:
  return METHODS.index(method) if method in METHODS else len(METHODS)


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

HEADERS = (
  "width",
  "params",
  "layout",
  "method",
  "stagger",
  "p50 ms",
  "p90 ms",
  "max ms",
  "max/p50",
  "×AdamW p50",
  "×AdamW paired",
  "×AdamW amortised",
  "state B/param",
  "update GFLOP",
  "refresh GFLOP/step",
  "update ÷ model",
  "refresh ÷ model",
  "QR/eigh ÷ model",
  "final loss",
)


def _rows(report: dict[str, Any]) -> list[tuple[Any, ...]]:
  rows: list[tuple[Any, ...]] = []
  dash = "–"
  for group in report["groups"]:
    for s in group["results"].values():
      rows.append(
        (
          group["width"],
          f"{group['num_params']:,}",
          group["layout"],
          s["method"],
          "on" if s["stagger"] else "off",
          s["median_ms"],
          s["p90_ms"],
          s["max_ms"],
          s["max_over_p50"],
          s.get("ratio_median", float("nan")),
          s.get("ratio_paired", float("nan")),
          s.get("ratio_amortised", float("nan")),
          s["bytes_per_param"],
          s["update_flops"] / 1e9,
          s["refresh_flops_per_step"] / 1e9,
          s["update_over_model"],
          s["refresh_over_model"],
          s["decomposition_over_model"],
          s["final_loss"],
        )
      )
    for name, reason in group["skipped"].items():
      rows.append((group["width"], "", group["layout"], name, f"skipped: {reason}", *[dash] * 14))
  for skip in report["skipped_layouts"]:
    rows.append(
      (skip["width"], "", skip["layout"], "(all)", f"not run: {skip['reason']}", *[dash] * 14)
    )
  order = {layout: k for k, layout in enumerate(report["settings"]["blocks"])}
  rows.sort(key=lambda r: (r[0], order.get(r[2], len(order))))  # stable: AdamW first per group
  return rows


def markdown(report: dict[str, Any]) -> str:
  env, prov, settings = report["environment"], report["provenance"], report["settings"]
  commits = sorted({g.get("commit", prov["commit"]) for g in report["groups"]})
  loads = ", ".join(
    f"d={g['width']} {g['layout']}: {g['environment']['load_average_1_5_15'][0]}"
    for g in report["groups"]
  )
  steps = ", ".join(f"d={w}: {s}" for w, s in settings["steps"].items())
  text = [
    "# Width scaling: train step against optax.adamw (same process), state, FLOPs",
    "",
    f"Command: `{prov['command'] or 'python -m benchmarks.width_scaling'}`. Commit: "
    f"{', '.join(commits)}. Machine: {prov['cpu']}, {env['cpu_count']} CPUs, jax {env['jax']}, "
    f"optax {env['optax']}, OPENBLAS_NUM_THREADS={env.get('openblas_num_threads') or 'unset'}; "
    f"1-min load average at each group's start ({loads}); wall {report['wall_seconds']:.0f} s.",
    "",
    f"Models: {'; '.join(dict.fromkeys(g['description'] for g in report['groups']))} "
    f"(MLP 4d, vocabulary V). f = {settings['frequency']}; warmup calls: {settings['warmup']}; "
    f"timed calls per runner: {steps}, chunks of {settings['chunk']}, the order rotating. "
    "Ratios are to the AdamW of the same (width, layout) process: ×AdamW p50 = p50 / AdamW p50; "
    "paired = median over rounds of chunk medians' ratios; amortised = (stagger off: "
    "((f-1)·median + refresh)/f; on: mean over whole cycles) / AdamW mean. State B/param = Σ "
    "nbytes of the state's leaves / parameters. FLOPs per step: update = the non-refresh "
    "update's matmuls; refresh = one refresh ÷ f (QR/eigh: its decompositions); model = "
    "6 · params · tokens (forward + backward).",
    "",
    models.markdown_table(HEADERS, _rows(report)),
    "",
  ]
  text += [f"- {note}" for note in report["notes"]]
  for group in report["groups"]:
    for labels in group.get("hangs", {}).values():
      text.append(f"- d={group['width']} {group['layout']}: hung and retried {'; '.join(labels)}")
  text += ["", "## Block size on CPU (lowest ×AdamW amortised at each width)", ""]
  by_width: dict[int, list[dict[str, Any]]] = {}
  for r in report["recommendations"]:
    by_width.setdefault(r["width"], []).append(r)
  for width, picks in by_width.items():
    parts = [
      f"{r['method']} → {_layout_name(r['layout'])}"
      f"{' with staggering' if r['stagger'] else ''} ({r['ratio_amortised']:.2f}×)"
      for r in picks
    ]
    text.append(f"- d={width}: " + "; ".join(parts) + ".")
  text += ["", "## FLOPs: what changes on an accelerator", ""]
  text += flop_lines(report)
  return "\n".join(text) + "\n"


def _layout_name(layout: str) -> str:
  return "whole axes" if layout == WHOLE else f"blocks of {layout}"


def flop_lines(report: dict[str, Any]) -> list[str]:
  """Per width and method and layout: the step's FLOPs over the model's, against the ratio
  measured on CPU (without staggering, unless only staggered runs were made)."""
  table: dict[tuple[int, str], list[str]] = {}
  for group in report["groups"]:
    for s in group["results"].values():
      if s["method"] == "adamw" or s["stagger"] != _only_on(report):
        continue
      flops = 1 + s["update_over_model"] + s["refresh_over_model"]
      table.setdefault((group["width"], s["method"]), []).append(
        f"{group['layout']} {flops:.2f} [{s['decomposition_over_model']:.3f}] "
        f"(CPU {s.get('ratio_amortised', float('nan')):.2f}×)"
      )
  lines = [
    "Per width and method, by layout: 1 + (update + refresh FLOPs) ÷ model FLOPs, the step "
    "ratio to AdamW if every FLOP ran at the model's rate, [the QR/eigh part of it], and "
    "(the ×AdamW amortised measured here):",
    "",
  ]
  lines += [f"- d={w} {method}: {'; '.join(cells)}." for (w, method), cells in table.items()]
  lines += [
    "",
    "On an accelerator the update's products and the refresh's F·Q, rotations and roots are "
    "GEMMs that run near the model's own rate, so the step ratio approaches the FLOP ratio "
    "above; CPU overheads (many small blocks, dispatch) that the measured column includes "
    "shrink. The QR/eigh of the refresh run far below the matmul rate on accelerators "
    "(panel factorizations, LAPACK-style), so their share of the step is larger there than "
    "their FLOPs: the bracketed part is a lower bound of their cost. Per parameter, both the "
    "update and a refresh of a k×k block cost O(k) FLOPs (O(k³) for k² parameters), so smaller "
    "blocks cut them in proportion, and staggering (the refresh spread over the f steps) "
    "removes the slow step whose length the QR/eigh set.",
  ]
  return lines


def _only_on(report: dict[str, Any]) -> bool:
  return report["settings"]["stagger_variants"] == [True]


def plot(report: dict[str, Any], path: str) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(15, 4.2))
  FigureCanvasAgg(fig)
  axes = [fig.add_subplot(1, 3, k + 1) for k in range(3)]
  colors = {m: f"C{k}" for k, m in enumerate(report["settings"]["methods"])}
  markers = dict(zip(report["settings"]["blocks"], "os^vDP", strict=False))
  series: dict[tuple[str, str, bool], list[tuple[int, dict[str, Any]]]] = {}
  for group in report["groups"]:
    for s in group["results"].values():
      if s["method"] != "adamw":
        key = (s["method"], group["layout"], s["stagger"])
        series.setdefault(key, []).append((group["width"], s))
  for (method, layout, stagger), points in sorted(series.items()):
    points.sort(key=lambda p: p[0])
    widths = [w for w, _ in points]
    style = {
      "color": colors.get(method, "k"),
      "marker": markers.get(layout, "x"),
      "linestyle": "--" if stagger else "-",
      "label": f"{method} {layout}{' stagger' if stagger else ''}",
    }
    axes[0].plot(widths, [s.get("ratio_amortised", np.nan) for _, s in points], **style)
    axes[1].plot(widths, [s["max_over_p50"] for _, s in points], **style)
    if not stagger or _only_on(report):
      axes[2].plot(widths, [s["bytes_per_param"] for _, s in points], **style)
  titles = ("step time ×AdamW, amortised", "max / p50 step time", "state bytes per parameter")
  widths = sorted({g["width"] for g in report["groups"]})
  for ax, title in zip(axes, titles, strict=True):
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.minorticks_off()
    ax.set_xlabel("width d")
    ax.set_title(title, fontsize=9)
  axes[0].axhline(1.0, color="k", lw=0.8)
  axes[2].axhline(8.0, color="k", lw=0.8, ls=":", label="AdamW (8)")
  axes[0].legend(fontsize=6, ncol=2)
  axes[2].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def _write(report: dict[str, Any], out_dir: str) -> None:
  models.write_outputs("width_scaling", report, out_dir, markdown, plot)


def main(argv: Sequence[str]) -> None:
  del argv
  if _WORKER_SPEC.value:
    models.run_worker(_WORKER_SPEC.value, measure)
    return
  smoke = _SMOKE.value

  def value(flag: Any, key: str, parse: Any = None) -> Any:
    if smoke and not flag.present:
      return SMOKE[key]
    return parse(flag.value) if parse else flag.value

  ints = lambda values: [int(v) for v in values]  # noqa: E731
  run(
    value(_WIDTHS, "widths", ints),
    value(_BLOCKS, "blocks"),
    value(_METHODS, "methods"),
    _STAGGER.value,
    value(_STEPS, "steps", ints),
    frequency=value(_FREQUENCY, "frequency"),
    layers=_LAYERS.value,
    seq_len=value(_SEQ_LEN, "seq_len"),
    batch=value(_BATCH, "batch"),
    whole_max_width=value(_WHOLE_MAX_WIDTH, "whole_max_width"),
    warmup=value(_WARMUP, "warmup"),
    chunk=value(_CHUNK, "chunk"),
    seed=_SEED.value,
    smoke=smoke,
    resume=_RESUME.value,
    progress=_PROGRESS.value,
    out_dir=_OUT_DIR.value,
    isolate=_ISOLATE.value,
    call_timeout=_CALL_TIMEOUT.value,
    group_timeout=_GROUP_TIMEOUT.value,
    command=shlex.join(["python", "-m", "benchmarks.width_scaling", *sys.argv[1:]]),
  )


if __name__ == "__main__":
  app.run(main)
