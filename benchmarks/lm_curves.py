"""Byte-level LM training curves: AdamW vs Shampoo, SOAP, KL-SOAP and KL-Shampoo.

Trains the small Flax NNX transformer of ``lm_model`` on Python standard-library source
(``lm_data``): a short learning-rate sweep per method, then full runs at the chosen rates.
Writes ``curves.csv``, ``summary.json`` and ``curves.png`` to ``--out_dir``.

    python -m benchmarks.lm_curves                      # all methods, sweep, default size
    python -m benchmarks.lm_curves --methods adamw,soap --no_sweep --steps 300

The logic is importable (``ExperimentConfig`` + ``run_experiment``); ``main`` maps flags to it.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

from benchmarks import lm_data, lm_model

CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def apply_cpu_workarounds() -> None:
  """XLA:CPU settings for jaxlib 0.10; must run before JAX's first computation.

  * jaxlib's batched LAPACK kernels (the preconditioners' eigh and QR) call scipy's OpenBLAS,
    whose own threads then oversubscribe the cores: a refresh step took 1-16 s instead of 0.2 s
    here. ``OPENBLAS_NUM_THREADS=1`` avoids that (XLA already spreads the batch over its pool).
  * ``CPU_SCHEDULER_FLAG``: the repository's known CPU hang workaround (env_baseline §2.2).
    The eigh deadlock that once needed a larger pool (``PJRT_NPROC``) is fixed in the chassis,
    which runs the decompositions of a step one after another (``kl_precond.tensor_ops.after``).

  Values the user already set are kept; none of this affects GPU or TPU computations.
  """
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
  xla_flags = os.environ.get("XLA_FLAGS", "")
  if "concurrency_optimized_scheduler" not in xla_flags:
    os.environ["XLA_FLAGS"] = f"{xla_flags} {CPU_SCHEDULER_FLAG}".strip()


apply_cpu_workarounds()

METHODS = ("adamw", "shampoo", "soap", "kl_soap", "kl_shampoo")
# From 200-step sweeps of the default model (AdamW best at 3e-3, the others at 1e-2).
DEFAULT_LRS = {"adamw": 3e-3, "shampoo": 1e-2, "soap": 1e-2, "kl_soap": 1e-2, "kl_shampoo": 1e-2}
DEFAULT_SWEEP_LRS = {m: (1e-3, 3e-3, 1e-2) if m == "adamw" else (3e-3, 1e-2, 3e-2) for m in METHODS}
ADAMW_B1, ADAMW_B2 = 0.9, 0.95
MAX_PRECOND_DIM = 2048
CSV_COLUMNS = ("method", "step", "train_loss", "val_loss", "wall_seconds")
Batch = tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything that defines one curves experiment (``sweep_lrs`` key ``"*"``: all methods)."""

  model: lm_model.ModelConfig = lm_model.ModelConfig()
  batch_size: int = 32
  steps: int = 1000
  methods: tuple[str, ...] = METHODS
  seed: int = 0
  sweep: bool = True
  sweep_steps: int = 200
  sweep_lrs: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)
  lrs: dict[str, float] = dataclasses.field(default_factory=dict)
  precondition_frequency: int = 10
  weight_decay: float = 0.01
  warmup_fraction: float = 0.1
  eval_every: int = 50
  num_val_batches: int = 8
  max_corpus_bytes: int = 4_000_000
  out_dir: str = "outputs/lm_curves"
  progress: bool = True


@dataclasses.dataclass
class RunResult:
  """Per-step records of one training run (``rows``: step, train_loss, val_loss, wall)."""

  method: str
  lr: float
  rows: list[dict[str, Any]]
  step_seconds: list[float]
  compile_seconds: float

  @property
  def final_val_loss(self) -> float:
    """Validation loss at the last evaluated step (NaN if there is none)."""
    vals = [r["val_loss"] for r in self.rows if r["val_loss"] is not None]
    return vals[-1] if vals else math.nan

  @property
  def median_step_ms(self) -> float:
    """Median wall time of one compiled train step in milliseconds."""
    return 1000 * float(np.median(self.step_seconds)) if self.step_seconds else math.nan

  def summary(self, sweep: dict[float, float]) -> dict[str, Any]:
    """The per-method entry of ``summary.json``."""
    return {
      "lr": self.lr,
      "final_val_loss": self.final_val_loss,
      "median_step_ms": self.median_step_ms,
      "mean_step_ms": 1000 * float(np.mean(self.step_seconds)),  # with refresh steps
      "compile_seconds": self.compile_seconds,
      "train_seconds": float(np.sum(self.step_seconds)),
      "steps_completed": len(self.step_seconds),
      "sweep": {f"{lr:g}": loss for lr, loss in sweep.items()},
    }


def make_schedule(peak_lr: float, steps: int, warmup_fraction: float = 0.1) -> optax.Schedule:
  """Linear warmup to ``peak_lr``, then cosine decay to ``peak_lr / 10`` at ``steps``."""
  warmup = max(1, int(warmup_fraction * steps))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak_lr,
    warmup_steps=warmup,
    decay_steps=max(steps, warmup + 1),
    end_value=peak_lr / 10,
  )


def kp_function(name: str) -> Callable[..., optax.GradientTransformation] | None:
  """``kl_precond.<name>``, or None while it does not exist; looked up at call time."""
  return getattr(importlib.import_module("kl_precond"), name, None)


def make_optimizer(
  name: str,
  learning_rate_schedule: optax.ScalarOrSchedule,
  weight_decay: float,
  precondition_frequency: int,
) -> optax.GradientTransformation:
  """``optax.chain(clip_by_global_norm(1.0), <method>)`` for a name in ``METHODS``.

  The kl_precond methods keep their own default ``b1``, ``b2`` and ``eps``.
  """
  if name == "adamw":
    base = optax.adamw(learning_rate_schedule, b1=ADAMW_B1, b2=ADAMW_B2, weight_decay=weight_decay)
  else:
    factory = kp_function(name)
    if name not in METHODS or factory is None:
      raise ValueError(f"Unknown or unavailable method {name!r}.")
    kwargs: dict[str, Any] = dict(
      weight_decay=weight_decay,
      precondition_frequency=precondition_frequency,
      max_precond_dim=MAX_PRECOND_DIM,
    )
    if name == "shampoo":
      kwargs["grafting_type"] = "adam"
    base = factory(learning_rate_schedule, **kwargs)
  return optax.chain(optax.clip_by_global_norm(1.0), base)


def compile_steps(
  method: str, lr: float, steps: int, config: ExperimentConfig, example: Batch
) -> tuple[nnx.State, Any, Any, float]:
  """Fresh model + optimizer state, AOT-compiled train and eval steps, compile seconds.

  The train step donates the state; compiling ahead of time guarantees exactly one compile
  (a later shape change would raise instead of silently recompiling).
  """
  model = lm_model.TransformerLM(config.model, rngs=nnx.Rngs(config.seed))
  schedule = make_schedule(lr, steps, config.warmup_fraction)
  tx = make_optimizer(method, schedule, config.weight_decay, config.precondition_frequency)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  # Fresh buffers: an optimizer state may share one array between leaves (zero counters),
  # which donation rejects.
  state = jax.tree.map(jnp.copy, state)

  def train_step(state: nnx.State, inputs: jax.Array, targets: jax.Array):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(lm_model.lm_loss)(model, inputs, targets)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  def eval_step(state: nnx.State, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    model, _ = nnx.merge(graphdef, state)
    return lm_model.lm_loss(model, inputs, targets)

  start = time.perf_counter()
  step_fn = jax.jit(train_step, donate_argnums=0).lower(state, *example).compile()
  eval_fn = jax.jit(eval_step).lower(state, *example).compile()
  return state, step_fn, eval_fn, time.perf_counter() - start


def train_run(
  method: str,
  lr: float,
  steps: int,
  corpus: lm_data.Corpus,
  val_batches: list[Batch],
  config: ExperimentConfig,
  eval_every: int | None = None,
) -> RunResult:
  """Trains a fresh model; every method sees the same initialisation and batches.

  ``wall`` in the rows is cumulative train-step time (no compile, no evaluation). The run
  stops early if the training loss becomes non-finite.
  """
  eval_every = eval_every or config.eval_every
  state, step_fn, eval_fn, compile_seconds = compile_steps(
    method, lr, steps, config, val_batches[0]
  )
  rng = np.random.default_rng(config.seed)
  rows: list[dict[str, Any]] = []
  step_seconds: list[float] = []
  bar = tqdm(
    range(1, steps + 1), desc=f"{method} lr={lr:.1e}", disable=not config.progress, mininterval=1
  )
  for step in bar:
    batch = lm_data.sample_batch(corpus.train, rng, config.batch_size, config.model.seq_len)
    start = time.perf_counter()
    state, loss = jax.block_until_ready(step_fn(state, *batch))
    step_seconds.append(time.perf_counter() - start)
    train_loss = float(loss)
    diverged = not math.isfinite(train_loss)
    val_loss = None
    if step % eval_every == 0 or step == steps or diverged:
      val_loss = float(np.mean([eval_fn(state, *b) for b in val_batches]))
      bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}", refresh=False)
    wall = (rows[-1]["wall"] if rows else 0.0) + step_seconds[-1]
    rows.append(dict(step=step, train_loss=train_loss, val_loss=val_loss, wall=wall))
    if diverged:
      break
  bar.close()
  return RunResult(method, lr, rows, step_seconds, compile_seconds)


def choose_lr(sweep_results: dict[float, float]) -> float:
  """The rate with the lowest final validation loss (non-finite losses never win)."""
  finite = {lr: v for lr, v in sweep_results.items() if math.isfinite(v)}
  return min(finite, key=finite.__getitem__) if finite else min(sweep_results)


def write_csv(results: Sequence[RunResult], path: str) -> None:
  """One row per (method, step); ``val_loss`` is empty where it was not evaluated."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS)
    for result in results:
      for r in result.rows:
        val = "" if r["val_loss"] is None else f"{r['val_loss']:.6f}"
        writer.writerow(
          [result.method, r["step"], f"{r['train_loss']:.6f}", val, f"{r['wall']:.4f}"]
        )


def plot_curves(results: Sequence[RunResult], path: str) -> Figure:
  """Validation loss vs steps (left) and vs train wall-clock seconds (right), saved to path."""
  fig = Figure(figsize=(11, 4), layout="constrained")
  FigureCanvasAgg(fig)
  ax_steps, ax_wall = fig.subplots(1, 2, sharey=True)
  for result in results:
    evals = [r for r in result.rows if r["val_loss"] is not None]
    label = f"{result.method} (lr={result.lr:.1e})"
    ax_steps.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], label=label)
    ax_wall.plot([r["wall"] for r in evals], [r["val_loss"] for r in evals], label=label)
  ax_steps.set(xlabel="step", ylabel="validation loss (nats/byte)", title="vs steps")
  ax_wall.set(xlabel="train wall-clock seconds (excl. compile)", title="vs time")
  for ax in (ax_steps, ax_wall):
    ax.grid(alpha=0.3)
  ax_steps.legend()
  fig.savefig(path, dpi=120)
  return fig


def markdown_table(summary: dict[str, Any]) -> str:
  """``method | lr | final val loss | median step ms`` as a markdown table."""
  lines = ["| method | lr | final val loss | median step ms |", "|---|---|---|---|"]
  for method, s in summary["methods"].items():
    lines.append(
      f"| {method} | {s['lr']:.1e} | {s['final_val_loss']:.4f} | {s['median_step_ms']:.1f} |"
    )
  return "\n".join(lines)


def run_experiment(config: ExperimentConfig) -> dict[str, Any]:
  """Sweep (optional), final runs, then CSV/JSON/PNG outputs. Returns the summary dict."""
  unknown = sorted(set(config.methods) - set(METHODS))
  if unknown:
    raise ValueError(f"Unknown methods {unknown}; choose from {METHODS}.")
  methods = [m for m in config.methods if m == "adamw" or kp_function(m) is not None]
  skipped = [m for m in config.methods if m not in methods]
  for method in skipped:
    print(f"Skipping {method}: kl_precond.{method} is not available.")
  corpus = lm_data.load_stdlib_corpus(config.max_corpus_bytes)
  val_batches = lm_data.fixed_batches(
    corpus.val, config.num_val_batches, config.batch_size, config.model.seq_len
  )
  sweeps: dict[str, dict[float, float]] = {}
  chosen = {m: config.lrs.get(m, DEFAULT_LRS[m]) for m in methods}
  if config.sweep:
    for m in methods:
      grid = config.sweep_lrs.get(m, config.sweep_lrs.get("*", DEFAULT_SWEEP_LRS[m]))
      sweeps[m] = {  # evaluated only at the end
        lr: train_run(
          m, lr, config.sweep_steps, corpus, val_batches, config, config.sweep_steps
        ).final_val_loss
        for lr in grid
      }
      chosen[m] = choose_lr(sweeps[m])
      losses = ", ".join(f"{lr:.1e}: {loss:.4f}" for lr, loss in sweeps[m].items())
      print(f"{m} sweep (final val loss) {losses} -> lr {chosen[m]:.1e}")
    print("Chosen learning rates: " + ", ".join(f"{m}={lr:.1e}" for m, lr in chosen.items()))

  results = [train_run(m, chosen[m], config.steps, corpus, val_batches, config) for m in methods]
  os.makedirs(config.out_dir, exist_ok=True)
  write_csv(results, os.path.join(config.out_dir, "curves.csv"))
  plot_curves(results, os.path.join(config.out_dir, "curves.png"))
  summary: dict[str, Any] = {
    "config": dataclasses.asdict(config),
    "backend": jax.default_backend(),
    "num_params": lm_model.count_params(lm_model.TransformerLM(config.model, rngs=nnx.Rngs(0))),
    "corpus": {"train_bytes": int(corpus.train.size), "val_bytes": int(corpus.val.size)},
    "skipped_methods": skipped,
    "chosen_lrs": chosen,
    "methods": {r.method: r.summary(sweeps.get(r.method, {})) for r in results},
  }
  with open(os.path.join(config.out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(markdown_table(summary))
  return summary


def parse_lr_grid(spec: str) -> dict[str, tuple[float, ...]]:
  """``"1e-3,3e-3"`` (every method) or ``"adamw=1e-3/3e-3,soap=2e-3/4e-3"`` (per method)."""
  if not spec:
    return {}
  if "=" not in spec:
    return {"*": tuple(float(v) for v in spec.split(","))}
  items = (item.split("=") for item in spec.split(","))
  return {m.strip(): tuple(float(v) for v in values.split("/")) for m, values in items}


def parse_lrs(spec: str) -> dict[str, float]:
  """``"adamw=3e-3,soap=1e-3"`` -> ``{"adamw": 0.003, "soap": 0.001}``."""
  return {m.strip(): float(v) for m, v in (item.split("=") for item in spec.split(",") if item)}


FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 1000, "Training steps of each final run.")
flags.DEFINE_string("methods", ",".join(METHODS), "Comma-separated methods to compare.")
flags.DEFINE_string("out_dir", "outputs/lm_curves", "Output directory.")
flags.DEFINE_integer("seed", 0, "Seed of the model initialisation and the training batches.")
flags.DEFINE_integer("num_layers", 2, "Transformer blocks.")
flags.DEFINE_integer("d_model", 128, "Model width.")
flags.DEFINE_integer("num_heads", 4, "Attention heads.")
flags.DEFINE_integer("seq_len", 64, "Context length in bytes.")
flags.DEFINE_integer("batch_size", 32, "Sequences per batch.")
flags.DEFINE_integer("sweep_steps", 200, "Steps of each learning-rate sweep run.")
flags.DEFINE_string("sweep_lrs", "", "Sweep grid: '1e-3,3e-3' or 'adamw=1e-3/3e-3,soap=...'.")
flags.DEFINE_bool("no_sweep", False, "Skip the sweep; use --lrs or the built-in defaults.")
flags.DEFINE_string("lrs", "", "Rates without a sweep: 'adamw=3e-3,soap=1e-3'.")
flags.DEFINE_integer("precondition_frequency", 10, "Preconditioner refresh interval (steps).")
flags.DEFINE_integer("eval_every", 50, "Validation loss every this many steps.")
flags.DEFINE_integer("num_val_batches", 8, "Fixed validation batches per evaluation.")
flags.DEFINE_float("weight_decay", 0.01, "Decoupled weight decay of every method.")
flags.DEFINE_integer("max_corpus_bytes", 4_000_000, "Cap on the corpus size in bytes.")
flags.DEFINE_bool("progress", True, "Show tqdm progress bars.")


def config_from_flags() -> ExperimentConfig:
  """An ``ExperimentConfig`` from the parsed absl flags."""
  return ExperimentConfig(
    model=lm_model.ModelConfig(
      seq_len=FLAGS.seq_len,
      d_model=FLAGS.d_model,
      num_layers=FLAGS.num_layers,
      num_heads=FLAGS.num_heads,
    ),
    batch_size=FLAGS.batch_size,
    steps=FLAGS.steps,
    methods=tuple(m.strip() for m in FLAGS.methods.split(",") if m.strip()),
    seed=FLAGS.seed,
    sweep=not FLAGS.no_sweep,
    sweep_steps=FLAGS.sweep_steps,
    sweep_lrs=parse_lr_grid(FLAGS.sweep_lrs),
    lrs=parse_lrs(FLAGS.lrs),
    precondition_frequency=FLAGS.precondition_frequency,
    weight_decay=FLAGS.weight_decay,
    eval_every=FLAGS.eval_every,
    num_val_batches=FLAGS.num_val_batches,
    max_corpus_bytes=FLAGS.max_corpus_bytes,
    out_dir=FLAGS.out_dir,
    progress=FLAGS.progress,
  )


def main(argv: Sequence[str]) -> None:
  """Entry point: flags -> ``ExperimentConfig`` -> ``run_experiment``."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  run_experiment(config_from_flags())


if __name__ == "__main__":
  app.run(main)
