"""KL-Shampoo's and KL-SOAP's defaults, picked by measurement (issue #25), and a gradient-scale table.

The question: which ``eigenvalue_init`` (``"constant"``, ``"trace"``, ``"eigh"``,
``"debiased"``) and ``clamp`` (``"absolute"``, ``"relative"``, or none) should ``kp.kl_shampoo``
and ``kp.kl_soap`` use by default? The reference (``"constant"``, ``"absolute"``) depends on the
loss's scale. Every candidate of ``CANDIDATES`` (five per KL method, plus ``adamw``, ``soap`` and
``shampoo`` as baselines, each factory at its defaults otherwise; a candidate whose options this
version of kl_precond lacks is skipped and listed) is trained on two small tasks with the same
tuning budget:

* ``digits``: sklearn's 8×8 digits (10 classes, pixels / 16), a fixed 80/20 train/val split, an
  MLP 64-128-128-10 (tanh), softmax cross-entropy, minibatches of 256 drawn without replacement;
  metric: the final validation loss (validation accuracy alongside).
* ``regression``: 16-D Gaussian inputs, targets from a fixed random teacher MLP 16-64-64-1 (tanh,
  weights N(0, 4/fan_in)) plus N(0, 0.1²) noise, 4096 training points, full batch; student MLP
  16-32-32-1 (tanh), MSE; metric: the final training loss (this task measures optimisation; the
  validation loss, on 4096 fresh points, is in the JSON).

Protocol. Every candidate gets the same log-spaced learning-rate grid (``--lr_min`` …
``--lr_max``, ``--num_lrs`` values; default 3.16e-4 … 1, 8 values: runs on 1e-4 … 0.1 and
3.16e-4 … 0.316 put several tuned lrs on the grid's top edge); the tuned lr is the one with the
lowest mean metric over the tuning seeds ``0 … --tuning_seeds-1`` (a diverged run counts as
+inf); the candidate is then run
at that lr with the evaluation seeds ``100 … 100+--eval_seeds-1``, disjoint from the tuning seeds,
and reported as mean ± sample std (ddof = 1). A seed sets the initialisation and the data order
(digits) or the data and noise (regression). Every run: ``--steps`` steps of a warmup-cosine
schedule (linear warmup over ``--warmup`` of the steps from 0 to the lr, cosine decay to 0),
each factory's own defaults except ``weight_decay`` (``--weight_decay``, 0 for every method) and
no gradient clipping (``--clip=0``: clipping is not scale-invariant, and the scale table needs it
off; the tuning runs use the same setting so that one compiled program serves both).

Gradient-scale table: on ``--scale_task``, each candidate at its tuned lr there (or ``--scale_lr``)
and the first evaluation seed, every gradient multiplied by ``c`` (``--scales``) before the
optimizer's update; the final metric per ``c``. ``eps`` is left at each factory's default (1e-8
for adamw, soap and the KL methods; Shampoo's ``eps=1e-12`` with ``graft_eps=1e-8``), as a user
would see it, so at small ``c`` even Adam is not exactly invariant. Nor are the Adam-in-eigenbasis
methods (SOAP, KL-SOAP) exactly reproducible under any change of rounding: the output layer's
first factor has rank one, XLA's rounding orients the eigenbasis of its null space, and Adam's
elementwise scaling depends on it (a few percent after a few steps); compare a row's spread over
``c`` with its ``seed std`` column.

One program per (task, candidate) is compiled (``jax.jit`` of the whole run as a ``lax.scan``;
lr, seed and ``c`` are traced arguments) and called once per run. The runs are not batched with
``vmap``: the skip-on-non-finite test makes kl_precond's refresh predicate data-dependent, and a
batched ``lax.cond`` computes the refresh at every step.

Runtime (2 cores): 13 candidates × 2 tasks × (8 lrs × 2 tuning seeds + 5 eval seeds) = 546
runs, plus 13 × 5 scale runs = 611 runs of 300 steps, and 26 compilations. Measured (report's
``timing``; the machine shared with other jobs, load average 4-5): compilations 247 s (5-12 s
each), digits runs 0.92 s × 273 = 251 s, regression runs 0.37 s × 273 = 101 s, scale runs 24 s:
622 s in all, 10.4 minutes with the imports. ``--num_lrs``, ``--eval_seeds`` and ``--steps``
scale the run part (≈ 60% of it) linearly.

    python -m benchmarks.kl_defaults                          # the full measurement
    python -m benchmarks.kl_defaults --smoke                  # a few seconds per candidate
    python -m benchmarks.kl_defaults --candidates=adamw,kl_soap_ref --tasks=regression

Writes ``kl_defaults.json`` (every run, the settings and the environment) and ``kl_defaults.md``
(the tables, also printed) to ``--out_dir``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import cpu_env

cpu_env.disable_concurrency_scheduler()  # before jax is imported (cpu_env has why)
cpu_env.one_openblas_thread()

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from tqdm import tqdm

import kl_precond as kp
from benchmarks.kronecker_study import Params, init_mlp
from benchmarks.kronecker_study import logits_fn as mlp  # tanh hidden layers, linear output

# name -> (factory, keyword arguments). The factory is ``optax.<name>`` for ``adamw`` and
# ``kp.<name>`` otherwise.
_KL_VARIANTS = {
  "ref": {"eigenvalue_init": "constant", "clamp": "absolute"},
  "trace_rel": {"eigenvalue_init": "trace", "clamp": "relative"},
  "eigh_rel": {"eigenvalue_init": "eigh", "clamp": "relative"},
  "trace_noclamp": {"eigenvalue_init": "trace", "max_clamp_value": None},
  # eigh's start with Adam's bias-corrected eigenvalue EMA (where kl_precond has it).
  "debiased_rel": {"eigenvalue_init": "debiased", "clamp": "relative"},
}
CANDIDATES: dict[str, tuple[str, dict[str, Any]]] = {
  **{f"kl_shampoo_{v}": ("kl_shampoo", dict(kw)) for v, kw in _KL_VARIANTS.items()},
  **{f"kl_soap_{v}": ("kl_soap", dict(kw)) for v, kw in _KL_VARIANTS.items()},
  "adamw": ("adamw", {}),
  "soap": ("soap", {}),
  "shampoo": ("shampoo", {}),
}
# The reference values of the new keyword arguments: a factory without the keyword behaves so.
REFERENCE = {"eigenvalue_init": "constant", "clamp": "absolute"}
FAMILIES = {"KL-Shampoo": "kl_shampoo_", "KL-SOAP": "kl_soap_"}
TASKS = ("digits", "regression")
EVAL_SEED_OFFSET = 100
EPS_NOTE = (
  "eps is left at each factory's default (1e-8 for adamw, soap, kl_shampoo, kl_soap; shampoo: "
  "eps=1e-12, graft_eps=1e-8), as a user would see it; no gradient clipping."
)


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that defines one measurement."""

  tasks: tuple[str, ...] = TASKS
  candidates: tuple[str, ...] = tuple(CANDIDATES)
  steps: int = 300
  lr_min: float = 10**-3.5
  lr_max: float = 1.0
  num_lrs: int = 8
  tuning_seeds: int = 2
  eval_seeds: int = 5
  scales: tuple[float, ...] = (1e-4, 1e-2, 1.0, 1e2, 1e4)
  scale_task: str = "regression"
  scale_lr: float = 0.0  # 0: each candidate's tuned lr on scale_task
  warmup: float = 0.1  # fraction of the steps
  weight_decay: float = 0.0
  clip: float = 0.0  # global-norm clipping threshold; 0: none
  out_dir: str = "outputs/kl_defaults"
  progress: bool = True

  @property
  def learning_rates(self) -> tuple[float, ...]:
    """The log-spaced grid, rounded to 3 significant digits (so that it prints as it is used)."""
    grid = np.geomspace(self.lr_min, self.lr_max, self.num_lrs)
    return tuple(float(f"{lr:.3g}") for lr in grid)


SMOKE = dict(
  steps=20,
  num_lrs=2,
  lr_min=1e-3,
  lr_max=1e-2,
  tuning_seeds=1,
  eval_seeds=2,
  scales=(1e-2, 1.0, 1e2),
)


# ---------------------------------------------------------------------------------------------
# Tasks.


def cross_entropy(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(mlp(params, x), y))


def squared_error(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean((mlp(params, x)[:, 0] - y) ** 2)


@functools.cache
def digits_split() -> tuple[np.ndarray, ...]:
  """sklearn's digits, pixels / 16, one fixed 80/20 split (permutation seed 0)."""
  from sklearn.datasets import load_digits

  images, labels = load_digits(return_X_y=True)
  order = np.random.default_rng(0).permutation(len(images))
  inputs, labels = (images[order] / 16.0).astype(np.float32), labels[order].astype(np.int32)
  split = int(0.8 * len(inputs))
  return inputs[:split], labels[:split], inputs[split:], labels[split:]


DIGITS_SIZES = (64, 128, 128, 10)
DIGITS_BATCH = 256
# The student (1,633 parameters) cannot interpolate the 4,096 points, and the teacher (weights of
# gain 2, targets of variance ≈ 2.5) is nonlinear enough that 300 steps do not reach the floor.
# (A first version, student 16-64-64-1 on 1,024 points of a gain-1 teacher 16-32-1, interpolated
# the noise: final training losses of 1e-11, differences set by float32 rounding.)
REGRESSION_STUDENT = (16, 32, 32, 1)
REGRESSION_TEACHER = (16, 64, 64, 1)
REGRESSION_POINTS = 4096
REGRESSION_NOISE = 0.1
REGRESSION_TEACHER_GAIN = 2.0  # teacher weights N(0, gain²/fan_in)


def regression_data(key: jax.Array) -> tuple[jax.Array, ...]:
  """Train and validation sets from a fixed teacher; ``key`` draws inputs and noise."""
  teacher = init_mlp(jax.random.key(1234), REGRESSION_TEACHER)
  teacher = {k: REGRESSION_TEACHER_GAIN * v for k, v in teacher.items()}
  keys = jax.random.split(key, 4)
  sets = []
  for x_key, noise_key in ((keys[0], keys[1]), (keys[2], keys[3])):
    x = jax.random.normal(x_key, (REGRESSION_POINTS, REGRESSION_TEACHER[0]))
    noise = REGRESSION_NOISE * jax.random.normal(noise_key, (REGRESSION_POINTS,))
    sets += [x, mlp(teacher, x)[:, 0] + noise]
  return tuple(sets)


def metric_name(task: str) -> str:
  return {"digits": "val_loss", "regression": "train_loss"}[task]


# ---------------------------------------------------------------------------------------------
# Candidates.


def factory_of(name: str) -> Callable[..., optax.GradientTransformation]:
  factory_name = CANDIDATES[name][0]
  return optax.adamw if factory_name == "adamw" else getattr(kp, factory_name)


def candidate_kwargs(name: str) -> dict[str, Any]:
  """The candidate's keyword arguments for this version of kl_precond; ``LookupError`` if the
  factory lacks one that is not at its reference value (a factory without the keyword behaves as
  the reference) or rejects a value."""
  factory_name, kwargs = CANDIDATES[name]
  accepted = inspect.signature(factory_of(name)).parameters
  used = {}
  for key, value in kwargs.items():
    if key in accepted:
      used[key] = value
    elif REFERENCE.get(key) != value:
      raise LookupError(f"kp.{factory_name} has no `{key}` (needed: {key}={value!r})")
  try:
    factory_of(name)(1e-3, **used)
  except ValueError as error:
    raise LookupError(f"kp.{factory_name} rejects {used}: {error}") from error
  return used


def make_optimizer(
  name: str, learning_rate: optax.ScalarOrSchedule, config: Config
) -> optax.GradientTransformation:
  tx = factory_of(name)(learning_rate, weight_decay=config.weight_decay, **candidate_kwargs(name))
  if config.clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.clip), tx)
  return tx


# ---------------------------------------------------------------------------------------------
# One run.


def _train(
  task: str, name: str, config: Config, lr: jax.Array, seed: jax.Array, scale: jax.Array
) -> dict[str, jax.Array]:
  """Trains one model; returns the final losses (and digits' validation accuracy)."""
  init_key, data_key = jax.random.split(jax.random.key(seed))
  warmup = max(1, int(round(config.warmup * config.steps)))
  shape = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, max(config.steps, warmup + 1))
  tx = make_optimizer(name, lambda count: lr * shape(count), config)

  if task == "digits":
    train_x, train_y, val_x, val_y = (jnp.asarray(a) for a in digits_split())
    params = init_mlp(init_key, DIGITS_SIZES)
    loss_fn = cross_entropy

    def batch(key: jax.Array) -> tuple[jax.Array, jax.Array]:
      index = jax.random.choice(key, len(train_x), (DIGITS_BATCH,), replace=False)
      return train_x[index], train_y[index]
  else:
    data_key, set_key = jax.random.split(data_key)
    train_x, train_y, val_x, val_y = regression_data(set_key)
    params = init_mlp(init_key, REGRESSION_STUDENT)
    loss_fn = squared_error

    def batch(key: jax.Array) -> tuple[jax.Array, jax.Array]:
      del key
      return train_x, train_y

  def step(carry: tuple[Params, Any], key: jax.Array) -> tuple[tuple[Params, Any], None]:
    params, state = carry
    grads = jax.grad(loss_fn)(params, *batch(key))
    grads = jax.tree.map(lambda g: g * scale, grads)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  keys = jax.random.split(data_key, config.steps)
  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), keys)
  results = {
    "train_loss": loss_fn(params, train_x, train_y),
    "val_loss": loss_fn(params, val_x, val_y),
  }
  if task == "digits":
    results["val_accuracy"] = jnp.mean(jnp.argmax(mlp(params, val_x), -1) == val_y)
  return results


@functools.cache
def compiled_run(task: str, name: str, config: Config) -> Callable[..., dict[str, jax.Array]]:
  """``run(lr, seed, scale)``: one jitted program per (task, candidate, config)."""
  return jax.jit(functools.partial(_train, task, name, config))


def train_once(
  task: str, name: str, config: Config, lr: float, seed: int, scale: float = 1.0
) -> dict[str, float]:
  """One run; final metrics as Python floats (NaN if it diverged)."""
  results = compiled_run(task, name, config)(jnp.float32(lr), jnp.int32(seed), jnp.float32(scale))
  return {k: float(v) for k, v in jax.device_get(results).items()}


# ---------------------------------------------------------------------------------------------
# The protocol.


def _loss_or_inf(value: float | None) -> float:
  return math.inf if value is None or not math.isfinite(value) else value


def sweep_means(records: Sequence[dict], name: str, lrs: Sequence[float], metric: str) -> list:
  """Per lr, the mean metric of ``name`` over the tuning seeds (+inf if any run diverged)."""
  means = []
  for lr in lrs:
    values = [_loss_or_inf(r[metric]) for r in records if r["candidate"] == name and r["lr"] == lr]
    means.append(float(np.mean(values)) if values else math.inf)
  return means


def mean_std(values: Sequence[float | None]) -> tuple[float, float, int]:
  """Mean, sample std (ddof = 1; 0 for one value) and the number of diverged runs."""
  finite = [v for v in values if v is not None and math.isfinite(v)]
  diverged = len(values) - len(finite)
  if diverged:
    return math.inf, math.nan, diverged
  std = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
  return float(np.mean(finite)), std, 0


def _record(task: str, name: str, lr: float, seed: int, scale: float, results: dict) -> dict:
  clean = {k: (v if math.isfinite(v) else None) for k, v in results.items()}
  return dict(candidate=name, lr=lr, seed=seed, scale=scale, **clean)


def gap_in_stds(summary: dict[str, dict], better: str, worse: str) -> tuple[float, float]:
  """``mean(worse) - mean(better)`` and that gap over the larger of the two stds."""
  gap = summary[worse]["mean"] - summary[better]["mean"]
  spread = max(summary[better]["std"], summary[worse]["std"])
  if not math.isfinite(gap):
    return gap, gap
  return gap, gap / spread if spread > 0 else math.copysign(math.inf, gap) if gap else 0.0


def best_line(
  summary: dict[str, dict], names: Sequence[str], reference: str | None = None
) -> dict[str, Any] | None:
  """The lowest-mean candidate among ``names``, the runner-up and the gap in units of the larger
  of their two stds (``beats`` if that is more than 1); the same against ``reference``."""
  ranked = sorted((summary[n]["mean"], n) for n in names if n in summary)
  if not ranked:
    return None
  best = ranked[0][1]
  entry: dict[str, Any] = {"best": best, "mean": summary[best]["mean"]}
  if len(ranked) > 1:
    second = ranked[1][1]
    gap, stds = gap_in_stds(summary, best, second)
    entry.update(second=second, gap=gap, gap_stds=stds, beats=stds > 1.0)
  if reference in summary and reference != best:
    gap, stds = gap_in_stds(summary, best, reference)
    entry.update(reference=reference, ref_gap=gap, ref_gap_stds=stds)
  return entry


def run_task(
  task: str, names: Sequence[str], config: Config, timing: dict[str, dict]
) -> dict[str, Any]:
  """Tunes every candidate on ``task`` and evaluates it at its tuned lr."""
  metric, lrs = metric_name(task), config.learning_rates
  tuning_seeds = list(range(config.tuning_seeds))
  eval_seeds = [EVAL_SEED_OFFSET + s for s in range(config.eval_seeds)]
  sweep, final, summary = [], [], {}
  bar = tqdm(
    total=len(names) * (len(lrs) * len(tuning_seeds) + len(eval_seeds)),
    disable=not config.progress,
    desc=task,
    unit="run",
  )
  for name in names:
    start = time.perf_counter()
    compiled_run(task, name, config).lower(jnp.float32(0), jnp.int32(0), jnp.float32(1)).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for lr in lrs:
      for seed in tuning_seeds:
        sweep.append(_record(task, name, lr, seed, 1.0, train_once(task, name, config, lr, seed)))
        bar.update()
    means = sweep_means(sweep, name, lrs, metric)
    tuned = lrs[int(np.argmin(means))]
    runs = []
    for seed in eval_seeds:
      runs.append(
        _record(task, name, tuned, seed, 1.0, train_once(task, name, config, tuned, seed))
      )
      bar.update()
    final += runs
    mean, std, diverged = mean_std([r[metric] for r in runs])
    summary[name] = dict(
      tuned_lr=tuned, mean=mean, std=std, diverged=diverged, n=len(runs), sweep=means
    )
    if task == "digits":
      accuracy = [r["val_accuracy"] or 0.0 for r in runs]
      summary[name]["accuracy_mean"] = float(np.mean(accuracy))
      summary[name]["accuracy_std"] = float(np.std(accuracy, ddof=1)) if len(runs) > 1 else 0.0
    runs_done = len(lrs) * len(tuning_seeds) + len(eval_seeds)
    timing[f"{task}/{name}"] = dict(
      compile_s=compile_s, run_s=(time.perf_counter() - start) / runs_done
    )
  bar.close()
  best = {"all": best_line(summary, names)}
  for family, prefix in FAMILIES.items():
    members = [n for n in names if n.startswith(prefix)]
    best[family] = best_line(summary, members, f"{prefix}ref")
  return dict(
    metric=metric,
    learning_rates=list(lrs),
    tuning_seeds=tuning_seeds,
    eval_seeds=eval_seeds,
    sweep=sweep,
    final=final,
    summary=summary,
    best=best,
  )


def run_scales(
  names: Sequence[str],
  config: Config,
  tuned: dict[str, float],
  seed_std: dict[str, float | None],
  timing: dict[str, dict],
) -> dict[str, Any]:
  """The final metric of each candidate on ``config.scale_task`` with gradients times ``c``;
  ``seed_std`` (the std over the evaluation seeds at ``c = 1``) is copied into the table."""
  task, seed = config.scale_task, EVAL_SEED_OFFSET
  rows = []
  bar = tqdm(
    total=len(names) * len(config.scales), disable=not config.progress, desc="scales", unit="run"
  )
  for name in names:
    lr = config.scale_lr or tuned[name]
    start = time.perf_counter()
    for c in config.scales:
      rows.append(_record(task, name, lr, seed, c, train_once(task, name, config, lr, seed, c)))
      bar.update()
    timing[f"scales/{name}"] = dict(run_s=(time.perf_counter() - start) / len(config.scales))
  bar.close()
  metric = metric_name(task)
  table = {}
  for name in names:
    values = {str(r["scale"]): r[metric] for r in rows if r["candidate"] == name}
    finite = [v for v in values.values() if v is not None]
    spread = max(finite) / min(finite) if len(finite) == len(values) and min(finite) > 0 else None
    table[name] = dict(
      lr=config.scale_lr or tuned[name], losses=values, spread=spread, seed_std=seed_std[name]
    )
  return dict(
    task=task, metric=metric, seed=seed, scales=list(config.scales), rows=rows, table=table
  )


def source_state() -> dict[str, str | None]:
  """The repository's commit and a hash of kl_precond's uncommitted changes (None if clean)."""
  import hashlib
  import subprocess

  root = os.path.dirname(os.path.dirname(os.path.abspath(kp.__file__)))

  def git(*args: str) -> str | None:
    try:
      done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
      return None
    return done.stdout if done.returncode == 0 else None

  head, diff = git("rev-parse", "HEAD"), git("diff", "HEAD", "--", "kl_precond")
  return dict(
    commit=head.strip() if head else None,
    kl_precond_diff_sha1=hashlib.sha1(diff.encode()).hexdigest() if diff else None,
  )


def run_benchmark(config: Config) -> dict[str, Any]:
  """The whole measurement: tuning and evaluation per task, then the scale table."""
  start = time.perf_counter()
  names, skipped = [], {}
  for name in config.candidates:
    try:
      candidate_kwargs(name)
      names.append(name)
    except LookupError as error:
      skipped[name] = str(error)
      print(f"[kl_defaults] skipping {name}: {error}", flush=True)
  timing: dict[str, dict] = {}
  tasks = {task: run_task(task, names, config, timing) for task in config.tasks}
  scales = None
  if config.scales:
    seed_std: dict[str, float | None] = dict.fromkeys(names)
    if config.scale_task in tasks:
      summary = tasks[config.scale_task]["summary"]
      tuned = {n: s["tuned_lr"] for n, s in summary.items()}
      if not config.scale_lr:
        seed_std = {n: s["std"] if math.isfinite(s["std"]) else None for n, s in summary.items()}
    elif config.scale_lr > 0:
      tuned = dict.fromkeys(names, config.scale_lr)
    else:
      raise ValueError("--scale_task must be among --tasks unless --scale_lr is given")
    scales = run_scales(names, config, tuned, seed_std, timing)
  return dict(
    config={**dataclasses.asdict(config), "learning_rates": list(config.learning_rates)},
    candidates={n: {"factory": CANDIDATES[n][0], "kwargs": candidate_kwargs(n)} for n in names},
    skipped=skipped,
    tasks=tasks,
    scales=scales,
    notes=[EPS_NOTE],
    environment=dict(
      jax=jax.__version__,
      optax=optax.__version__,
      kl_precond=kp.__version__,
      python=platform.python_version(),
      cpu_count=os.cpu_count(),
      openblas_num_threads=os.environ.get("OPENBLAS_NUM_THREADS"),
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      **source_state(),
    ),
    timing=timing,
    wall_time_s=time.perf_counter() - start,
  )


# ---------------------------------------------------------------------------------------------
# Outputs.


def _fmt(value: float | None, digits: int = 4) -> str:
  if value is None or not math.isfinite(value):
    return "div"
  return f"{value:.{digits}g}"


def _mean_std(entry: dict) -> str:
  if entry["diverged"]:
    return f"div ({entry['diverged']}/{entry['n']})"
  return f"{entry['mean']:.4g} ± {entry['std']:.2g}"


def task_table(task: str, result: dict) -> str:
  """Per candidate: tuned lr, mean ± std over the evaluation seeds, the lr sweep."""
  lrs = result["learning_rates"]
  accuracy = task == "digits"
  head = ["candidate", "tuned lr", f"{result['metric']} (n={len(result['eval_seeds'])})"]
  head += ["val acc"] if accuracy else []
  head += [f"lr={lr:g}" for lr in lrs]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for name, s in result["summary"].items():
    edge = "*" if s["tuned_lr"] in (lrs[0], lrs[-1]) else ""
    cells = [name, f"{s['tuned_lr']:g}{edge}", _mean_std(s)]
    if accuracy:
      cells.append(f"{s['accuracy_mean']:.4f} ± {s['accuracy_std']:.4f}")
    cells += [_fmt(v) for v in s["sweep"]]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def best_text(task: str, result: dict) -> str:
  lines = []
  for group, entry in result["best"].items():
    if entry is None:
      continue
    text = f"- {task}, {'all candidates' if group == 'all' else group}: **{entry['best']}**"
    text += f" ({_fmt(entry['mean'])})"
    if "second" in entry:
      verdict = "more" if entry["beats"] else "not more"
      text += (
        f"; next {entry['second']} by {_fmt(entry['gap'], 3)} = {_fmt(entry['gap_stds'], 3)} std"
        f" ({verdict} than one std)"
      )
    if "reference" in entry:
      text += (
        f"; the reference {entry['reference']} by {_fmt(entry['ref_gap'], 3)} = "
        f"{_fmt(entry['ref_gap_stds'], 3)} std"
      )
    lines.append(text)
  return "\n".join(lines)


def scale_table(scales: dict) -> str:
  """Final metric per gradient scale ``c``; max / min over ``c``; the seeds' std at ``c = 1``."""
  head = ["candidate", "lr", *[f"c={c:g}" for c in scales["scales"]], "max/min", "seed std"]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for name, row in scales["table"].items():
    cells = [name, f"{row['lr']:g}", *[_fmt(row["losses"][str(c)]) for c in scales["scales"]]]
    cells += [_fmt(row["spread"], 3), _fmt(row["seed_std"], 3)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def markdown_report(report: dict) -> str:
  config = report["config"]
  parts = [
    f"# KL defaults ({config['steps']} steps, warmup-cosine, {config['tuning_seeds']} tuning "
    f"seeds, {config['eval_seeds']} evaluation seeds, lr grid "
    f"{', '.join(f'{lr:g}' for lr in config['learning_rates'])})",
  ]
  for task, result in report["tasks"].items():
    parts += [
      f"## {task}: final {result['metric']}, mean ± std over seeds {result['eval_seeds']}; "
      f"lr sweep: mean over seeds {result['tuning_seeds']}",
      task_table(task, result),
      "`*`: the tuned lr is at an edge of the grid.",
      best_text(task, result),
    ]
  if report["scales"]:
    scales = report["scales"]
    parts += [
      f"## Gradient scale: {scales['task']}, final {scales['metric']}, gradients × c, seed "
      f"{scales['seed']}, "
      + (f"lr {config['scale_lr']:g}" if config["scale_lr"] else "each candidate at its tuned lr"),
      scale_table(scales),
      f"Note: {EPS_NOTE} `max/min`: the largest final loss over c divided by the smallest; "
      "`seed std`: the std of the final loss over the evaluation seeds at c = 1 (the task "
      "table's), the scale of a change that seeds alone make.",
    ]
  if report["skipped"]:
    parts.append("Skipped: " + "; ".join(f"{n} ({why})" for n, why in report["skipped"].items()))
  parts.append(f"Wall time: {report['wall_time_s']:.0f} s.")
  return "\n\n".join(parts) + "\n"


def run_and_save(config: Config) -> dict[str, Any]:
  """Runs the measurement and writes ``kl_defaults.{json,md}`` to ``config.out_dir``."""
  report = run_benchmark(config)
  os.makedirs(config.out_dir, exist_ok=True)
  with open(os.path.join(config.out_dir, "kl_defaults.json"), "w") as f:
    json.dump(report, f, indent=1, allow_nan=False, default=_json_default)
  with open(os.path.join(config.out_dir, "kl_defaults.md"), "w") as f:
    f.write(markdown_report(report))
  return report


def _json_default(value: Any) -> Any:
  raise TypeError(f"not JSON serializable: {value!r}")


# ---------------------------------------------------------------------------------------------
# Command line.


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program, so importing has no effect)."""
  flags.DEFINE_list("tasks", list(TASKS), "Tasks: digits, regression.")
  flags.DEFINE_list("candidates", list(CANDIDATES), "Candidates (see CANDIDATES).")
  flags.DEFINE_integer("steps", Config.steps, "Training steps per run.")
  flags.DEFINE_float("lr_min", Config.lr_min, "Smallest learning rate of the grid.")
  flags.DEFINE_float("lr_max", Config.lr_max, "Largest learning rate of the grid.")
  flags.DEFINE_integer("num_lrs", Config.num_lrs, "Log-spaced learning rates in the grid.")
  flags.DEFINE_integer("tuning_seeds", Config.tuning_seeds, "Seeds per lr of the grid.")
  flags.DEFINE_integer("eval_seeds", Config.eval_seeds, "Seeds at the tuned lr.")
  flags.DEFINE_list(
    "scales", [f"{c:g}" for c in Config.scales], "Gradient multipliers c; empty: no scale table."
  )
  flags.DEFINE_string("scale_task", Config.scale_task, "Task of the scale table.")
  flags.DEFINE_float("scale_lr", Config.scale_lr, "lr of the scale table; 0: each tuned lr.")
  flags.DEFINE_float("warmup", Config.warmup, "Warmup, as a fraction of the steps.")
  flags.DEFINE_float("weight_decay", Config.weight_decay, "Weight decay of every candidate.")
  flags.DEFINE_float("clip", Config.clip, "clip_by_global_norm threshold; 0: no clipping.")
  flags.DEFINE_string("out_dir", Config.out_dir, "Output directory.")
  flags.DEFINE_bool("progress", True, "Show progress bars.")
  flags.DEFINE_bool(
    "smoke", False, "20 steps, 2 lrs, 1 tuning + 2 eval seeds, c in {1e-2, 1, 1e2}."
  )


def config_from_flags() -> Config:
  """The flags as a ``Config``; with ``--smoke``, flags not given explicitly take SMOKE's values."""
  f = flags.FLAGS
  values: dict[str, Any] = dict(
    tasks=tuple(f.tasks),
    candidates=tuple(f.candidates),
    steps=f.steps,
    lr_min=f.lr_min,
    lr_max=f.lr_max,
    num_lrs=f.num_lrs,
    tuning_seeds=f.tuning_seeds,
    eval_seeds=f.eval_seeds,
    scales=tuple(float(c) for c in f.scales),
    scale_task=f.scale_task,
    scale_lr=f.scale_lr,
    warmup=f.warmup,
    weight_decay=f.weight_decay,
    clip=f.clip,
    out_dir=f.out_dir,
    progress=f.progress,
  )
  if f.smoke:
    for key, value in SMOKE.items():
      if not f[key].present:
        values[key] = value
  unknown = [n for n in values["candidates"] if n not in CANDIDATES]
  if unknown:
    raise app.UsageError(f"Unknown candidates {unknown}; known: {list(CANDIDATES)}")
  if any(t not in TASKS for t in values["tasks"]):
    raise app.UsageError(f"--tasks must be among {TASKS}")
  return Config(**values)


def main(argv: Sequence[str]) -> None:
  """Entry point: flags -> ``Config`` -> ``run_and_save``; prints the tables."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = config_from_flags()
  report = run_and_save(config)
  print(markdown_report(report))
  print(f"Wrote {config.out_dir}/kl_defaults.{{json,md}}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
