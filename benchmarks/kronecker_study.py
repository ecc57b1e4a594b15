"""How well do Kronecker products approximate a layer's gradient covariance during training?

A scaled-down reproduction of Morwani et al. (2024), "A New Perspective on Shampoo's
Preconditioner": an MLP (64-16-16-2, tanh) is trained with Adam on sklearn's 8×8 digits, labelled
0-4 vs 5-9. Every ``--log_every`` steps, for one weight matrix (``--layer``; default the 16×16
hidden layer, so its exact ``256 × 256`` covariance is cheap), it measures the cosine similarity to
an exact target covariance ``H`` of

* ``optimal``: the best Kronecker approximation of ``H`` itself (SVD of ``𝓡(H)``, the ceiling);
* ``power``: the best Kronecker approximation of the samples' own covariance (power iteration);
* ``shampoo2``: ``A ⊗ B`` with ``A = E[G Gᵀ]``, ``B = E[Gᵀ G]`` (one power step from identity);
* ``shampoo``: ``A^{1/2} ⊗ B^{1/2}``, Shampoo's own implied covariance;
* ``kl``: ``S_L ⊗ S_R``, the fixed point of KL-Shampoo's factor updates.

Targets: ``gn``, the exact Gauss–Newton / Fisher matrix over the training set (gradients at every
label weighted by the model's probability), and ``ada``, full-matrix Adagrad's statistic
``E[g gᵀ]`` over per-example gradients with the real labels. The samples the estimates are built
from: ``exact`` (the weighted Fisher samples), or per-example (``b = 1``) and mini-batch gradients
(each ``b`` of ``--grad_batch_sizes``, ``--num_batches`` random batches) with ``real`` or
``sampled`` labels. Writes ``kronecker.csv``, ``kronecker.md`` and ``kronecker.png`` to
``--out_dir`` and prints the summary table.

    python -m benchmarks.kronecker_study                # default: about a minute on 2 CPU cores
    python -m benchmarks.kronecker_study --steps 5      # smoke run
"""

# ruff: noqa: E402  (the XLA flag must be set before jax is imported)
from __future__ import annotations

import csv
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if CPU_SCHEDULER_FLAG not in os.environ.get("XLA_FLAGS", ""):  # XLA:CPU hang workaround.
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_SCHEDULER_FLAG}".strip()

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

from kl_precond import diagnostics as dg

Params = dict[str, jax.Array]
METHODS = ("optimal", "power", "shampoo2", "shampoo", "kl")
CSV_COLUMNS = ("step", "train_loss", "target", "labels", "batch_size", "method", "cosine")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """Everything that defines one study."""

  steps: int = 400
  batch_size: int = 128  # training mini-batch
  learning_rate: float = 3e-3
  hidden: tuple[int, ...] = (16, 16)
  layer: int = 1  # index of the weight matrix whose covariance is studied
  log_every: int = 10
  grad_batch_sizes: tuple[int, ...] = (16, 128)  # mini-batch gradients for the diagnostics
  num_batches: int = 256  # random mini-batches per measurement
  power_iters: int = 5  # alternating power steps ("power")
  kl_iters: int = 10  # flip-flop steps of the KL fixed point ("kl")
  seed: int = 0
  out_dir: str = "outputs/kronecker"
  progress: bool = True


# ---------------------------------------------------------------------------------------------
# Data and model.


def load_binary_digits(seed: int) -> tuple[np.ndarray, ...]:
  """sklearn's 8×8 digits, pixels scaled to [0, 1], label 1 for digits 5-9; 80/20 split."""
  from sklearn.datasets import load_digits

  images, digits = load_digits(return_X_y=True)
  order = np.random.default_rng(seed).permutation(len(images))
  inputs, labels = (images[order] / 16.0).astype(np.float32), (digits[order] >= 5).astype(np.int32)
  split = int(0.8 * len(inputs))
  return inputs[:split], labels[:split], inputs[split:], labels[split:]


def init_mlp(key: jax.Array, sizes: Sequence[int]) -> Params:
  """Weights ``w{i}`` of shape (fan_in, fan_out), N(0, 1/fan_in); zero biases ``b{i}``."""
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
    key, sub = jax.random.split(key)
    params[f"w{i}"] = jax.random.normal(sub, (fan_in, fan_out)) / np.sqrt(fan_in)
    params[f"b{i}"] = jnp.zeros(fan_out)
  return params


def logits_fn(params: Params, x: jax.Array) -> jax.Array:
  """The MLP's logits for one example (or a batch): tanh hidden layers, linear output."""
  num_layers = len(params) // 2
  for i in range(num_layers):
    x = x @ params[f"w{i}"] + params[f"b{i}"]
    if i < num_layers - 1:
      x = jnp.tanh(x)
  return x


def loss_fn(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
  """Softmax cross-entropy ``−log p(y | x)`` of one example."""
  return -jax.nn.log_softmax(logits_fn(params, x))[y]


# ---------------------------------------------------------------------------------------------
# Measurement.


def _layer_samples(
  config: StudyConfig, params: Params, inputs: jax.Array, labels: jax.Array, key: jax.Array
) -> dict[tuple[str, int], jax.Array]:
  """Gradient samples of the studied layer for each (labels, batch size) source."""
  name = f"w{config.layer}"
  keys = iter(jax.random.split(key, 1 + 2 * len(config.grad_batch_sizes)))

  def source_labels(label_name: str, index: jax.Array) -> jax.Array:
    if label_name == "real":
      return labels[index]
    return dg.sample_labels(next(keys), logits_fn, params, inputs[index])

  everyone = jnp.arange(len(inputs))
  samples = {}
  for label_name in ("real", "sampled"):
    chosen = source_labels(label_name, everyone)
    samples[(label_name, 1)] = dg.per_example_grads(loss_fn, params, inputs, chosen)[name]
  for b in config.grad_batch_sizes:
    index = jax.random.randint(next(keys), (config.num_batches * b,), 0, len(inputs))
    for label_name in ("real", "sampled"):
      chosen = source_labels(label_name, index)
      samples[(label_name, b)] = dg.batch_grads(loss_fn, params, inputs[index], chosen, b)[name]
  return samples


def measure(
  config: StudyConfig, params: Params, inputs: jax.Array, labels: jax.Array, key: jax.Array
) -> dict[tuple[str, str, int], dict[str, jax.Array]]:
  """Cosines of every approximation, keyed by (target, labels, batch size); jit with config static.

  ``labels = "exact"`` means the estimates are built from the target's own samples.
  """
  fisher, weights = dg.fisher_grads(loss_fn, logits_fn, params, inputs)
  fisher = fisher[f"w{config.layer}"]
  samples = _layer_samples(config, params, inputs, labels, key)
  targets = {
    "gn": dg.gradient_covariance(fisher, weights),
    "ada": dg.gradient_covariance(samples[("real", 1)]),
  }
  cosines = functools.partial(
    dg.kronecker_cosines, power_iters=config.power_iters, kl_iters=config.kl_iters
  )
  results = {("gn", "exact", 1): cosines(targets["gn"], fisher, weights)}
  for (label_name, b), grads in samples.items():
    results[("gn", label_name, b)] = cosines(targets["gn"], grads)
    if label_name == "real":
      results[("ada", label_name, b)] = cosines(targets["ada"], grads)
  return results


def batch_loss(params: Params, inputs: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy over a batch."""
  return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0, 0))(params, inputs, labels))


def _to_rows(step: int, loss: float, results: dict) -> list[dict[str, float | int | str]]:
  """Flattens the output of :func:`measure` into CSV rows."""
  return [
    {
      "step": step,
      "train_loss": loss,
      "target": target,
      "labels": label_name,
      "batch_size": b,
      "method": method,
      "cosine": float(value),
    }
    for (target, label_name, b), cosines in results.items()
    for method, value in cosines.items()
  ]


def run_study(config: StudyConfig) -> list[dict[str, float | int | str]]:
  """Trains the MLP with Adam and returns one CSV row per (step, target, source, method)."""
  train_x, train_y, _, _ = load_binary_digits(config.seed)
  inputs, labels = jnp.asarray(train_x), jnp.asarray(train_y)
  key, init_key = jax.random.split(jax.random.key(config.seed))
  params = init_mlp(init_key, (inputs.shape[1], *config.hidden, 2))
  optimizer = optax.adam(config.learning_rate)
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(p: Params, state: optax.OptState, step_key: jax.Array) -> tuple[Params, Any]:
    index = jax.random.randint(step_key, (config.batch_size,), 0, len(inputs))
    grads = jax.grad(batch_loss)(p, inputs[index], labels[index])
    updates, state = optimizer.update(grads, state, p)
    return optax.apply_updates(p, updates), state

  measure_fn = jax.jit(functools.partial(measure, config))
  rows: list[dict[str, float | int | str]] = []
  for step in tqdm(range(config.steps + 1), disable=not config.progress, desc="kronecker"):
    key, step_key, measure_key = jax.random.split(key, 3)
    if step % config.log_every == 0 or step == config.steps:
      loss = float(batch_loss(params, inputs, labels))
      rows += _to_rows(step, loss, measure_fn(params, inputs, labels, measure_key))
    if step < config.steps:
      params, opt_state = train_step(params, opt_state, step_key)
  return rows


# ---------------------------------------------------------------------------------------------
# Outputs.


def summarize(rows: Sequence[dict]) -> list[dict]:
  """Per (target, labels, batch size): mean cosine of each method over the logged steps, and
  whether ``optimal ≥ shampoo2 ≥ shampoo`` held at every logged step."""
  groups: dict[tuple, dict[str, dict[int, float]]] = {}
  for row in rows:
    key = (row["target"], row["labels"], row["batch_size"])
    groups.setdefault(key, {}).setdefault(row["method"], {})[row["step"]] = row["cosine"]
  summary = []
  for (target, label_name, b), by_method in groups.items():
    steps = sorted(by_method["optimal"])
    ordered = all(
      by_method["optimal"][s] >= by_method["shampoo2"][s] - 1e-5 >= by_method["shampoo"][s] - 2e-5
      for s in steps
    )
    entry = dict(target=target, labels=label_name, batch_size=b, ordered=ordered)
    entry.update({m: float(np.mean([by_method[m][s] for s in steps])) for m in METHODS})
    entry.update({f"final_{m}": by_method[m][steps[-1]] for m in METHODS})
    summary.append(entry)
  return summary


def markdown_table(summary: Sequence[dict]) -> str:
  """The summary as a markdown table: mean (final) cosine per method."""
  header = "| target | labels | b | " + " | ".join(METHODS) + " | opt ≥ sh² ≥ sh |"
  lines = [header, "|" + " --- |" * (len(METHODS) + 4)]
  for e in summary:
    cells = " | ".join(f"{e[m]:.4f} ({e[f'final_{m}']:.4f})" for m in METHODS)
    ordered = "yes" if e["ordered"] else "no"
    lines.append(f"| {e['target']} | {e['labels']} | {e['batch_size']} | {cells} | {ordered} |")
  return "\n".join(lines)


def write_csv(rows: Sequence[dict], path: str) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)


def series(rows: Sequence[dict], target: str, labels: str, b: int, method: str) -> tuple:
  """(steps, cosines) of one method for one (target, labels, batch size) from the CSV rows."""
  chosen = [
    r for r in rows
    if (r["target"], r["labels"], r["batch_size"], r["method"]) == (target, labels, b, method)
  ]  # fmt: skip
  return [r["step"] for r in chosen], [r["cosine"] for r in chosen]


def plot(rows: Sequence[dict], path: str, grad_batch_sizes: Sequence[int]) -> None:
  """Three panels: approximations of H_GN and of H_Ada, and Shampoo² by label source and b."""
  figure = Figure(figsize=(15, 4.2))
  FigureCanvasAgg(figure)
  axes = figure.subplots(1, 3)
  panels = (("gn", "exact", "Gauss–Newton (exact factors)"), ("ada", "real", "Adagrad, b = 1"))
  for ax, (target, label_name, title) in zip(axes[:2], panels, strict=True):
    for method in ("optimal", "shampoo2", "kl", "shampoo"):
      ax.plot(*series(rows, target, label_name, 1, method), label=method)
    ax.set_title(f"{title}: cos(H, approx)")
  for b in (1, *grad_batch_sizes):
    for label_name, style in (("sampled", "-"), ("real", "--")):
      steps, values = series(rows, "gn", label_name, b, "shampoo2")
      axes[2].plot(steps, values, style, label=f"{label_name}, b={b}")
  axes[2].set_title("Shampoo² from samples vs exact H_GN")
  for ax in axes:
    ax.set(xlabel="training step", ylabel="cosine similarity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=110)


def run_and_save(config: StudyConfig) -> tuple[list[dict], list[dict]]:
  """Runs the study, writes ``kronecker.{csv,md,png}`` to ``config.out_dir``; returns both."""
  os.makedirs(config.out_dir, exist_ok=True)
  rows = run_study(config)
  summary = summarize(rows)
  write_csv(rows, os.path.join(config.out_dir, "kronecker.csv"))
  with open(os.path.join(config.out_dir, "kronecker.md"), "w") as f:
    f.write(markdown_table(summary) + "\n")
  plot(rows, os.path.join(config.out_dir, "kronecker.png"), config.grad_batch_sizes)
  return rows, summary


# ---------------------------------------------------------------------------------------------
# Command line.


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program, so importing has no effect)."""
  flags.DEFINE_integer("steps", StudyConfig.steps, "Training steps.")
  flags.DEFINE_integer("batch_size", StudyConfig.batch_size, "Training mini-batch size.")
  flags.DEFINE_string("out_dir", StudyConfig.out_dir, "Output directory.")
  flags.DEFINE_integer("seed", StudyConfig.seed, "Random seed (split, init, batches, labels).")
  flags.DEFINE_integer("log_every", StudyConfig.log_every, "Steps between measurements.")
  flags.DEFINE_integer("layer", StudyConfig.layer, "Index of the weight matrix to study.")
  flags.DEFINE_list(
    "grad_batch_sizes", [str(b) for b in StudyConfig.grad_batch_sizes], "Mini-batch sizes."
  )
  flags.DEFINE_integer("num_batches", StudyConfig.num_batches, "Random mini-batches per measure.")
  flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv: Sequence[str]) -> None:
  """Entry point: flags -> ``StudyConfig`` -> ``run_and_save``; prints the summary table."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  flag_values = flags.FLAGS
  config = StudyConfig(
    steps=flag_values.steps,
    batch_size=flag_values.batch_size,
    layer=flag_values.layer,
    log_every=flag_values.log_every,
    grad_batch_sizes=tuple(int(b) for b in flag_values.grad_batch_sizes),
    num_batches=flag_values.num_batches,
    seed=flag_values.seed,
    out_dir=flag_values.out_dir,
    progress=flag_values.progress,
  )
  start = time.perf_counter()
  _, summary = run_and_save(config)
  print("Mean (final) cosine similarity to the target covariance over the logged steps")
  print(markdown_table(summary))
  print(f"Wrote {config.out_dir}/kronecker.{{csv,md,png}} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  define_flags()
  app.run(main)
