"""Byte-level LM training curves: a tuned, multi-seed comparison of AdamW and second-order methods.

Trains the small Flax NNX transformer of ``lm_model`` on Python standard-library source
(``lm_data``) with AdamW, Shampoo (Adam grafting), SOAP, KL-SOAP, KL-Shampoo, KL-Shampoo in its
authors' reference setting (``kl_shampoo_ref``) and, when ``psgd-jax`` imports, PSGD Kron
(``psgd_kron``). The protocol is the same for every method:

1. **Tuning, equal budget.** A grid of learning rate × one second hyperparameter per method
   (``SECOND_AXES``), the same number of trials for every method (checked), each a short run
   (``tune_steps``, its own warmup-cosine schedule) on one seed (``tune_seed``, by default not
   one of the final seeds) scored by its validation loss at the end, on validation batches of
   their own (``TUNING_VAL_SEED``; the reported losses use other ones). The lowest finite loss
   wins; a rate at the edge of its grid is flagged in the table. ``--no_tune`` skips this and
   uses ``DEFAULT_SETTINGS`` (or ``--lrs`` / ``--hparams``).
2. **Final runs.** Every method runs its tuned setting on every seed of ``seeds`` (default 3);
   a seed sets both the model initialisation and the order of the training batches. Runs go
   seed by seed, every method within a seed, so slow drifts of the machine's load spread over
   all methods alike.
3. **Outputs** in ``--out_dir``: ``results.md`` (printed too) with, per method, the tuned
   hyperparameters, the final validation loss as mean ± std over seeds (sample std, ``ddof=1``),
   the steps and train seconds needed to reach AdamW's mean final validation loss, and the
   median step time; ``summary.json`` (everything, per-seed values included); ``curves.csv``
   (every step of every final run); ``curves.png`` (seed-mean validation curves with ±std bands
   against steps and against train seconds).

"Steps/seconds to AdamW": the first point where the method's seed-mean validation curve is at
or below AdamW's mean final validation loss, linearly interpolated between evaluations; the
seconds are the seed-mean cumulative train-step time (no compile, no evaluation) at that point.
AdamW itself reaches it at its last step by construction. Per-seed crossings are in the JSON.

Second axes (``SECOND_AXES``; grids in ``DEFAULT_HPARAM_GRIDS``, learning rates in
``DEFAULT_LR_GRIDS``; 3 rates × 2 values = 6 trials each by default):

* ``adamw``: ``b2``, the second-moment EMA weight.
* ``shampoo``: ``b2``, the EMA weight of the Kronecker factors (grafting Adam keeps
  ``graft_b2=0.999``); its grid (0.99, 0.999) includes the method's default.
* ``soap``, ``kl_soap``: ``b2``, the second-moment EMA weight, which is also the factor (and,
  for KL-SOAP, the eigenvalue) EMA weight since ``shampoo_beta`` stays None.
* ``kl_shampoo``, ``kl_shampoo_ref``: ``b2``, the factor and eigenvalue EMA weight.
* ``psgd_kron``: ``preconditioner_init_scale`` (30, 100), the scale of its initial
  preconditioner. Its update probability is not tuned: it is held at
  ``1 / precondition_frequency`` = 0.1, the same average refresh rate as the others'
  ``precondition_frequency=10``. At that rate the initial preconditioner lasts: with psgd-jax
  0.2.9's default scale 1, Kron starts as plain SGD on these clipped gradients (typical entry
  ~1e-3) and needed a rate of 0.1 or more to get anywhere in a 50-step tuning run (val loss 3.20
  at 0.1, still falling with the rate; AdamW 2.83 at 3e-3). A scale near ``|g|^(-1/2)`` (~30;
  later PSGD versions set it from the first gradient) makes the first updates Adam-sized: the
  best of rates 3e-4..1e-2 gave 3.05 (scale 10, lr 1e-2), 2.99 (30, 1e-3), 3.13 (100, 3e-4)
  (50-step runs, 2026-12-07). (``b1``, the momentum, was the other candidate; it matters less
  here.) The scale only enters Kron's initial state, so its two values share one compiled step.

The rate grids are ×√10 apart and centred, for every method alike, on the method's best rate in
the tuning of a full default run (40-step trials): AdamW 3e-3, Shampoo 3e-3, SOAP 1e-2, KL-SOAP
1e-2, KL-Shampoo 1e-2, KL-Shampoo (reference) 3e-2, PSGD Kron 1e-3 (scale 30). The long preset
applies the same rule on its model: AdamW's, KL-SOAP's, the reference KL-Shampoo's and Kron's
grids are one step lower there.

Every method: ``optax.chain(clip_by_global_norm(1.0), <method>)``, warmup-cosine schedule
(``warmup_fraction`` of the steps, then cosine to a tenth of the peak), decoupled weight decay
0.01 on every parameter, ``precondition_frequency=10``, ``max_precond_dim=2048``; the kl_precond
methods keep their other defaults. ``kl_shampoo_ref`` is ``kp.kl_shampoo(...,
eigenvalue_init="constant", clamp="absolute")``, the KL-Shampoo authors' setting; ``kl_shampoo``
is the library's default. ``psgd_kron`` is ``psgd_jax.kron.kron`` with the same schedule,
clipping and weight decay (decoupled, times the learning rate, as in ``optax.adamw``),
``preconditioner_update_probability=1/precondition_frequency``, its other defaults (whole
triangular factors up to 8192, diagonal ones for vectors). psgd-jax is imported through
``psgd_compat`` (an alias for a module optax moved); methods that are not available here (no
psgd-jax, or a kl_precond without the reference options) are skipped with a message.

The learning rate enters the compiled step as an argument (the schedule is evaluated ahead of
the run, ``schedule(step - 1)`` as optax counts), so one compiled step per (method, second
hyperparameter) serves every rate, run length and seed. With the same rates this gives exactly
the updates of passing the schedule to the optimizer (checked: identical parameters after six
steps of every method); the vectorised evaluation of the schedule differs from the scalar one
by float32 rounding only.

Budget of the default preset (``PRESETS["default"]``: 2-layer d128 model, 64-byte context,
batch 32; 225-step final runs, 40-step tuning runs, 6 trials) on this 2-core CPU, all seven
methods. Mean step times (refresh steps included) of a full default run at f897f71 (250-step
final runs, 50-step tuning runs; 2026-12-07), ms: adamw 96.8, shampoo 140.6, soap 130.2, kl_soap 133.3,
kl_shampoo 127.5, kl_shampoo_ref 129.2, psgd_kron 120.0; 877.6 ms for one step of every method.
Compiling took 156 s (14 train steps; Shampoo's 23 s each, AdamW's 4 s); an evaluation (8
batches) 0.15-0.2 s; each run also spends ~1 s outside its steps (fresh state, first call).

* tuning: 6 trials × 40 steps × 877.6 ms = 211 s
* final runs: 3 seeds × 225 steps × 877.6 ms = 592 s
* compiling 13 train steps (Kron's two scales share one): ≈ 144 s
* evaluations: (21 final runs × 9 + 42 tuning runs × 1) × 0.15-0.2 s ≈ 40 s
* 63 runs × ~1 s outside their steps, corpus, imports: ≈ 70 s
* total ≈ 1057 s ≈ 17.6 minutes (limit: 20). Interleaved probes of every method's step on the
  idle machine gave 795 and 871 ms for one step of each.

3 seeds of 1,000 steps would take 3 × 1000 × 877.6 ms = 44 minutes alone: longer runs are the
long preset's.

``--preset=long``: a 4-layer d192 model, 3 × the default's steps (final and tuning runs): about
2.5 hours on 2 CPU cores (mean step times ~3.5 × the default's: adamw 324 ms, kl_shampoo 441 ms,
psgd_kron 427 ms; 2745 steps per method). ``--preset=gpu``: the notebook's setting for a Colab
GPU runtime (4-layer d256, 128-byte context, batch 64, 1,000 steps; not timed here).

    python benchmarks/lm_curves.py                                # all methods, default preset
    python benchmarks/lm_curves.py --methods=adamw,soap --seeds=0,1 --steps=500
    python benchmarks/lm_curves.py --no_tune --lrs=adamw=3e-3 --hparams=adamw:b2=0.99
    python benchmarks/lm_curves.py --preset=long
    python benchmarks/lm_curves.py --merge=out/adamw,out/soap --out_dir=out/all  # one report

The logic is importable (``ExperimentConfig`` + ``run_experiment``); ``main`` maps flags to it.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import importlib
import inspect
import io
import itertools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
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

from benchmarks import lm_data, lm_model, psgd_compat

CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def apply_cpu_workarounds() -> None:
  """XLA:CPU settings for jaxlib 0.10; must run before JAX's first computation.

  * jaxlib's batched LAPACK kernels (the preconditioners' eigh and QR) call scipy's OpenBLAS,
    whose own threads then oversubscribe the cores: a refresh step took 1-16 s instead of 0.2 s
    here. ``OPENBLAS_NUM_THREADS=1`` avoids that (XLA already spreads the batch over its pool).
  * ``CPU_SCHEDULER_FLAG``: XLA's CPU scheduler can deadlock on PSGD Kron's graph (a step never
    returns); turning off its concurrency-optimized scheduler avoids it. The separate deadlock of
    batched eighs is avoided in the chassis, which runs the decompositions of a step one after
    another (``kl_precond.tensor_ops.after``).

  Values the user already set are kept; none of this affects GPU or TPU computations.
  """
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
  xla_flags = os.environ.get("XLA_FLAGS", "")
  if "concurrency_optimized_scheduler" not in xla_flags:
    os.environ["XLA_FLAGS"] = f"{xla_flags} {CPU_SCHEDULER_FLAG}".strip()


apply_cpu_workarounds()

METHODS = ("adamw", "shampoo", "soap", "kl_soap", "kl_shampoo", "kl_shampoo_ref", "psgd_kron")
# The kl_precond function behind each of our methods, and the options it is called with.
KP_FUNCTIONS = {
  "shampoo": "shampoo",
  "soap": "soap",
  "kl_soap": "kl_soap",
  "kl_shampoo": "kl_shampoo",
  "kl_shampoo_ref": "kl_shampoo",
}
KP_OPTIONS: dict[str, dict[str, Any]] = {
  "shampoo": {"grafting_type": "adam"},
  "kl_shampoo_ref": {"eigenvalue_init": "constant", "clamp": "absolute"},  # the authors' code
}
# Rates ×√10 apart, centred on each method's best rate in the tuning of a full default run at
# 60e5228 (see the module docstring).
DEFAULT_LR_GRIDS: dict[str, tuple[float, ...]] = {
  "adamw": (1e-3, 3e-3, 1e-2),
  "shampoo": (1e-3, 3e-3, 1e-2),
  "soap": (3e-3, 1e-2, 3e-2),
  "kl_soap": (3e-3, 1e-2, 3e-2),
  "kl_shampoo": (3e-3, 1e-2, 3e-2),
  "kl_shampoo_ref": (1e-2, 3e-2, 1e-1),
  "psgd_kron": (3e-4, 1e-3, 3e-3),
}
DEFAULT_HPARAM_GRIDS: dict[str, tuple[str, tuple[float, ...]]] = {
  "adamw": ("b2", (0.95, 0.99)),
  "shampoo": ("b2", (0.99, 0.999)),
  "soap": ("b2", (0.95, 0.99)),
  "kl_soap": ("b2", (0.95, 0.99)),
  "kl_shampoo": ("b2", (0.95, 0.99)),
  "kl_shampoo_ref": ("b2", (0.95, 0.99)),
  "psgd_kron": ("preconditioner_init_scale", (30.0, 100.0)),
}
# The second tuned hyperparameter of each method (the first is the learning rate).
SECOND_AXES = {method: name for method, (name, _) in DEFAULT_HPARAM_GRIDS.items()}
# Settings without tuning (``tune=False``): the tuned settings of the 60e5228 default run.
DEFAULT_SETTINGS: dict[str, dict[str, float]] = {
  "adamw": {"lr": 3e-3, "b2": 0.95},
  "shampoo": {"lr": 3e-3, "b2": 0.99},
  "soap": {"lr": 1e-2, "b2": 0.99},
  "kl_soap": {"lr": 1e-2, "b2": 0.95},
  "kl_shampoo": {"lr": 1e-2, "b2": 0.95},
  "kl_shampoo_ref": {"lr": 3e-2, "b2": 0.95},
  "psgd_kron": {"lr": 1e-3, "preconditioner_init_scale": 30.0},
}
ADAMW_B1, ADAMW_B2 = 0.9, 0.95
MAX_PRECOND_DIM = 2048
REFERENCE_METHOD = "adamw"
TUNING_VAL_SEED = 4321  # the tuning runs' validation batches (the final runs': lm_data's 1234)
CSV_COLUMNS = ("method", "seed", "step", "train_loss", "val_loss", "wall_seconds")
Batch = tuple[np.ndarray, np.ndarray]
Setting = dict[str, float]  # {"lr": ..., <second axis>: ...}


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything that defines one curves experiment.

  ``lr_grids`` / ``hparam_grids`` override ``DEFAULT_LR_GRIDS`` / ``DEFAULT_HPARAM_GRIDS`` per
  method (``lr_grids`` key ``"*"``: every method); ``hparam_grids`` values are
  ``(name, values)``. ``lrs`` / ``hparams`` override ``DEFAULT_SETTINGS`` when ``tune`` is off.
  ``kron_update_probability`` None means ``1 / precondition_frequency``.
  """

  model: lm_model.ModelConfig = lm_model.ModelConfig()
  batch_size: int = 32
  steps: int = 225
  methods: tuple[str, ...] = METHODS
  seeds: tuple[int, ...] = (0, 1, 2)
  tune: bool = True
  tune_steps: int = 40
  tune_seed: int = 100
  lr_grids: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)
  hparam_grids: dict[str, tuple[str, tuple[float, ...]]] = dataclasses.field(default_factory=dict)
  lrs: dict[str, float] = dataclasses.field(default_factory=dict)
  hparams: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
  precondition_frequency: int = 10
  kron_update_probability: float | None = None
  weight_decay: float = 0.01
  warmup_fraction: float = 0.1
  eval_every: int = 25
  num_val_batches: int = 8
  max_corpus_bytes: int = 4_000_000
  out_dir: str = "outputs/lm_curves"
  progress: bool = True


# Presets: ExperimentConfig fields. "long": 3x the default's steps on a larger model (hours on
# 2 CPU cores); "gpu": the notebook's setting for a Colab GPU runtime.
PRESETS: dict[str, dict[str, Any]] = {
  "default": {},
  "long": dict(
    model=lm_model.ModelConfig(d_model=192, num_layers=4, num_heads=6),
    steps=3 * ExperimentConfig.steps,
    tune_steps=3 * ExperimentConfig.tune_steps,
    eval_every=50,
    # The default grids' rule, each centred on its own method's pick on this model: AdamW's,
    # KL-SOAP's, the authors' KL-Shampoo's and Kron's are one step lower than the default's.
    lr_grids={
      "adamw": (3e-4, 1e-3, 3e-3),
      "kl_soap": (1e-3, 3e-3, 1e-2),
      "kl_shampoo_ref": (3e-3, 1e-2, 3e-2),
      "psgd_kron": (1e-4, 3e-4, 1e-3),
    },
  ),
  "gpu": dict(
    model=lm_model.ModelConfig(seq_len=128, d_model=256, num_layers=4, num_heads=8),
    batch_size=64,
    steps=1000,
    tune_steps=200,
    eval_every=50,
    max_corpus_bytes=12_000_000,
  ),
}


def preset_config(name: str = "default", **overrides: Any) -> ExperimentConfig:
  """The ``ExperimentConfig`` of a preset in ``PRESETS``, with field overrides."""
  if name not in PRESETS:
    raise ValueError(f"Unknown preset {name!r}; choose from {sorted(PRESETS)}.")
  return ExperimentConfig(**{**PRESETS[name], **overrides})


@dataclasses.dataclass
class RunResult:
  """Per-step records of one training run (``rows``: step, train_loss, val_loss, wall)."""

  method: str
  setting: Setting
  seed: int
  rows: list[dict[str, Any]]
  step_seconds: list[float]
  compile_seconds: float

  @property
  def final_val_loss(self) -> float:
    """Validation loss at the last evaluated step (NaN if there is none)."""
    vals = [r["val_loss"] for r in self.rows if r["val_loss"] is not None]
    return vals[-1] if vals else math.nan

  @property
  def diverged(self) -> bool:
    """Whether the run stopped at a non-finite training loss."""
    return bool(self.rows) and not math.isfinite(self.rows[-1]["train_loss"])

  def evals(self) -> list[dict[str, Any]]:
    """The rows with a validation loss."""
    return [r for r in self.rows if r["val_loss"] is not None]


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


def learning_rates(peak_lr: float, steps: int, warmup_fraction: float = 0.1) -> np.ndarray:
  """float32 ``[steps]``: the rate of step ``k`` (1-based) at index ``k - 1``, as optax counts."""
  schedule = make_schedule(peak_lr, steps, warmup_fraction)
  return np.asarray(jax.vmap(schedule)(jnp.arange(steps)), dtype=np.float32)


def kp_function(name: str) -> Callable[..., optax.GradientTransformation] | None:
  """``kl_precond.<name>``, or None while it does not exist; looked up at call time."""
  return getattr(importlib.import_module("kl_precond"), name, None)


def unavailable_reason(method: str) -> str | None:
  """None if ``method`` can be built here, else why not."""
  if method not in METHODS:
    return f"unknown method {method!r}"
  if method == "adamw":
    return None
  if method == "psgd_kron":
    reason = psgd_compat.kron_unavailable()
    return reason and f"psgd-jax does not import ({reason})"
  factory = kp_function(KP_FUNCTIONS[method])
  if factory is None:
    return f"kl_precond.{KP_FUNCTIONS[method]} does not exist"
  missing = set(KP_OPTIONS.get(method, {})) - set(inspect.signature(factory).parameters)
  if missing:
    return f"kl_precond.{KP_FUNCTIONS[method]} has no option {sorted(missing)} yet"
  return None


def make_optimizer(
  name: str,
  learning_rate: optax.ScalarOrSchedule,
  hparams: Mapping[str, float] | None = None,
  *,
  weight_decay: float = 0.01,
  precondition_frequency: int = 10,
  kron_update_probability: float | None = None,
) -> optax.GradientTransformation:
  """``optax.chain(clip_by_global_norm(1.0), <method>)`` for a name in ``METHODS``.

  ``hparams`` (e.g. ``{"b2": 0.99}``) are keyword arguments of the method's factory. The
  kl_precond methods keep their other defaults; ``psgd_kron`` updates its preconditioner with
  probability ``kron_update_probability`` (None: ``1 / precondition_frequency``).
  """
  hparams = dict(hparams or {})
  reason = unavailable_reason(name)
  if reason:
    raise ValueError(f"Unknown or unavailable method {name!r}: {reason}.")
  if name == "adamw":
    kwargs = {"b1": ADAMW_B1, "b2": ADAMW_B2, "weight_decay": weight_decay, **hparams}
    base = optax.adamw(learning_rate, **kwargs)
  elif name == "psgd_kron":
    p = kron_update_probability or 1 / precondition_frequency
    kwargs = {"weight_decay": weight_decay, "preconditioner_update_probability": p, **hparams}
    base = psgd_compat.import_kron()(learning_rate, **kwargs)
  else:
    kwargs = {
      "weight_decay": weight_decay,
      "precondition_frequency": precondition_frequency,
      "max_precond_dim": MAX_PRECOND_DIM,
      **KP_OPTIONS.get(name, {}),
      **hparams,
    }
    base = kp_function(KP_FUNCTIONS[name])(learning_rate, **kwargs)
  return optax.chain(optax.clip_by_global_norm(1.0), base)


class Trainer:
  """Compiled steps for one model and batch shape, shared by every run of an experiment.

  The train step takes ``(state, inputs, targets, learning_rate)``, state = (params, optimizer
  state), and donates the state. One step is compiled ahead of time per (method, hyperparameters
  other than the rate) and reused for every rate, run length and seed; settings whose lowered
  programs are identical share one compilation (PSGD Kron's initial scale only enters its
  state). The eval step (params only) is compiled once.
  """

  def __init__(self, config: ExperimentConfig, example: Batch):
    self.config = config
    self.example = example
    abstract = nnx.eval_shape(lambda: lm_model.TransformerLM(config.model, rngs=nnx.Rngs(0)))
    self.graphdef, _ = nnx.split(abstract)
    self._train: dict[tuple[str, tuple[tuple[str, float], ...]], Any] = {}
    self._by_program: dict[str, Any] = {}  # sha256 of the lowered program -> compiled step
    self.compile_seconds: dict[str, float] = {}  # per method, over all its compiled steps
    self.eval_fn = None
    # The model's initialisation, compiled once (eagerly, each of its ops would compile alone).
    self._init_params = jax.jit(
      lambda seed: nnx.state(
        lm_model.TransformerLM(config.model, rngs=nnx.Rngs(jax.random.key(seed)))
      )
    )

  def optimizer(self, method: str, learning_rate: Any, hparams: Mapping[str, float]):
    """The method's optimizer with this experiment's common settings."""
    return make_optimizer(
      method,
      learning_rate,
      hparams,
      weight_decay=self.config.weight_decay,
      precondition_frequency=self.config.precondition_frequency,
      kron_update_probability=self.config.kron_update_probability,
    )

  def init_state(self, method: str, hparams: Mapping[str, float], seed: int) -> Any:
    """Fresh (params, optimizer state) for a seed; the rate does not enter the state."""
    params = self._init_params(np.int32(seed))
    with contextlib.redirect_stdout(io.StringIO()):  # psgd-jax prints its state sizes
      opt_state = self.optimizer(method, 0.0, hparams).init(params)
    # Fresh buffers: an optimizer state may share one array between leaves, which donation
    # rejects.
    return jax.tree.map(jnp.copy, (params, opt_state))

  def loss(self, params: Any, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-byte cross-entropy of the model with these parameters."""
    return lm_model.lm_loss(nnx.merge(self.graphdef, params), inputs, targets)

  def compiled(self, method: str, hparams: Mapping[str, float], state: Any) -> tuple[Any, float]:
    """(train step, seconds spent compiling now: 0 when it was compiled before)."""
    key = (method, tuple(sorted(hparams.items())))
    if key in self._train:
      return self._train[key], 0.0

    def train_step(state: Any, inputs: jax.Array, targets: jax.Array, learning_rate: jax.Array):
      params, opt_state = state
      loss, grads = jax.value_and_grad(self.loss)(params, inputs, targets)
      tx = self.optimizer(method, learning_rate, hparams)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    start = time.perf_counter()
    lr = np.float32(0.0)
    lowered = jax.jit(train_step, donate_argnums=0).lower(state, *self.example, lr)
    # The StableHLO text without source locations (the bytecode has them, so it differs by call
    # site); constants are printed in full.
    program = hashlib.sha256(lowered.as_text(debug_info=False).encode()).hexdigest()
    if program in self._by_program:
      self._train[key] = self._by_program[program]
      return self._train[key], 0.0
    self._train[key] = self._by_program[program] = lowered.compile()
    seconds = time.perf_counter() - start
    self.compile_seconds[method] = self.compile_seconds.get(method, 0.0) + seconds
    if self.eval_fn is None:
      self.eval_fn = jax.jit(self.loss).lower(state[0], *self.example).compile()
    return self._train[key], seconds

  def val_loss(self, params: Any, val_batches: Sequence[Batch]) -> float:
    """Mean loss over the fixed validation batches."""
    return float(np.mean([self.eval_fn(params, *b) for b in val_batches]))


def train_run(
  trainer: Trainer,
  method: str,
  setting: Setting,
  steps: int,
  seed: int,
  corpus: lm_data.Corpus,
  val_batches: list[Batch],
  eval_every: int | None = None,
) -> RunResult:
  """Trains a fresh model; the seed sets the initialisation and the batch order.

  ``setting`` is ``{"lr": peak rate, **other hyperparameters}``. ``wall`` in the rows is
  cumulative train-step time (no compile, no evaluation). Validation every ``eval_every`` steps
  (default: the config's) and at the last step. The run stops early if the training loss becomes
  non-finite.
  """
  config = trainer.config
  eval_every = eval_every or config.eval_every
  hparams = {k: v for k, v in setting.items() if k != "lr"}
  state = trainer.init_state(method, hparams, seed)
  step_fn, compile_seconds = trainer.compiled(method, hparams, state)
  rates = learning_rates(setting["lr"], steps, config.warmup_fraction)
  rng = np.random.default_rng(seed)
  rows: list[dict[str, Any]] = []
  step_seconds: list[float] = []
  label = " ".join(f"{k}={v:g}" for k, v in setting.items())
  bar = tqdm(
    range(1, steps + 1),
    desc=f"{method} {label} seed={seed}",
    disable=not config.progress,
    mininterval=1,
  )
  for step in bar:
    batch = lm_data.sample_batch(corpus.train, rng, config.batch_size, config.model.seq_len)
    start = time.perf_counter()
    state, loss = jax.block_until_ready(step_fn(state, *batch, rates[step - 1]))
    step_seconds.append(time.perf_counter() - start)
    train_loss = float(loss)
    diverged = not math.isfinite(train_loss)
    val_loss = None
    if step % eval_every == 0 or step == steps or diverged:
      val_loss = trainer.val_loss(state[0], val_batches)
      bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}", refresh=False)
    wall = (rows[-1]["wall"] if rows else 0.0) + step_seconds[-1]
    rows.append(dict(step=step, train_loss=train_loss, val_loss=val_loss, wall=wall))
    if diverged:
      break
  bar.close()
  return RunResult(method, dict(setting), seed, rows, step_seconds, compile_seconds)


def tuning_grid(method: str, config: ExperimentConfig) -> list[Setting]:
  """The (learning rate × second hyperparameter) trials of a method."""
  lrs = config.lr_grids.get(method, config.lr_grids.get("*", DEFAULT_LR_GRIDS[method]))
  name, values = config.hparam_grids.get(method, DEFAULT_HPARAM_GRIDS[method])
  return [{"lr": lr, name: value} for lr, value in itertools.product(lrs, values)]


def choose_setting(trials: Sequence[tuple[Setting, float]]) -> Setting:
  """The setting with the lowest validation loss; non-finite losses never win.

  If every trial failed, the smallest learning rate (first trial among equals).
  """
  finite = [(setting, loss) for setting, loss in trials if math.isfinite(loss)]
  if finite:
    return min(finite, key=lambda t: t[1])[0]
  return min((setting for setting, _ in trials), key=lambda s: s["lr"])


def default_setting(method: str, config: ExperimentConfig) -> Setting:
  """The untuned setting: ``DEFAULT_SETTINGS`` with ``config.lrs`` / ``config.hparams``."""
  setting = dict(DEFAULT_SETTINGS[method])
  if method in config.lrs:
    setting["lr"] = config.lrs[method]
  setting.update(config.hparams.get(method, {}))
  return setting


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (``ddof=1``; 0 for a single value)."""
  array = np.asarray(values, dtype=np.float64)
  std = float(np.std(array, ddof=1)) if array.size > 1 else 0.0
  return float(np.mean(array)), std


def seed_curves(runs: Sequence[RunResult]) -> dict[str, np.ndarray]:
  """Validation curves of a method's seeds on a common step grid.

  Returns ``steps [E]``, ``val [S, E]`` and ``wall [S, E]``; a run that stopped early (diverged)
  is padded with NaN, so the seed-mean is NaN from there on.
  """
  longest = max(runs, key=lambda r: len(r.evals()))
  steps = np.array([r["step"] for r in longest.evals()], dtype=np.float64)
  val = np.full((len(runs), steps.size), np.nan)
  wall = np.full((len(runs), steps.size), np.nan)
  for i, run in enumerate(runs):
    by_step = {r["step"]: r for r in run.evals()}
    for j, step in enumerate(steps):
      if step in by_step:
        val[i, j] = by_step[step]["val_loss"]
        wall[i, j] = by_step[step]["wall"]
  return {"steps": steps, "val": val, "wall": wall}


def first_crossing(x: np.ndarray, y: np.ndarray, target: float) -> float | None:
  """The first ``x`` at which ``y`` falls to ``target`` (linear between points), else None."""
  tolerance = 1e-9 * abs(target)
  for j in range(len(y)):
    if y[j] <= target + tolerance:
      if j == 0 or y[j - 1] == y[j]:
        return float(x[j])
      fraction = (y[j - 1] - target) / (y[j - 1] - y[j])
      return float(x[j - 1] + min(max(fraction, 0.0), 1.0) * (x[j] - x[j - 1]))
  return None


def crossing_point(curves: Mapping[str, np.ndarray], val: np.ndarray, target: float):
  """(steps, seconds) where the validation curve ``val [E]`` reaches target, or (None, None).

  The seconds are the seed-mean wall at the same interpolated position.
  """
  steps = curves["steps"]
  at = first_crossing(np.arange(steps.size, dtype=np.float64), val, target)
  if at is None:
    return None, None
  wall = np.nanmean(curves["wall"], axis=0)
  lo = int(math.floor(at))
  hi = min(lo + 1, steps.size - 1)
  frac = at - lo
  return (
    float(steps[lo] + frac * (steps[hi] - steps[lo])),
    float(wall[lo] + frac * (wall[hi] - wall[lo])),
  )


def reference_target(runs: Mapping[str, Sequence[RunResult]]) -> dict[str, Any] | None:
  """``{"method", "val_loss"}``: AdamW's mean final loss over its seeds, or None without it."""
  if REFERENCE_METHOD not in runs:
    return None
  reference = mean_std([r.final_val_loss for r in runs[REFERENCE_METHOD]])[0]
  return {"method": REFERENCE_METHOD, "val_loss": reference} if math.isfinite(reference) else None


def target_crossings(
  runs: Sequence[RunResult], target: float | None
) -> tuple[float | None, float | None, list[float | None]]:
  """Steps and seconds at which the seed-mean curve reaches ``target``, and each seed's steps."""
  if target is None:
    return None, None, []
  curves = seed_curves(runs)
  steps_to, seconds_to = crossing_point(curves, np.mean(curves["val"], axis=0), target)
  per_seed = []
  for i in range(len(runs)):
    one = {"steps": curves["steps"], "wall": curves["wall"][i : i + 1]}
    per_seed.append(crossing_point(one, curves["val"][i], target)[0])
  return steps_to, seconds_to, per_seed


def method_summary(
  runs: Sequence[RunResult], trials: Sequence[tuple[Setting, float]], target: float | None
) -> dict[str, Any]:
  """The per-method entry of ``summary.json``: tuned setting, per-seed and mean ± std results."""
  finals = [r.final_val_loss if not r.diverged else math.nan for r in runs]
  mean, std = mean_std(finals)
  curves = seed_curves(runs)
  steps_to, seconds_to, per_seed = target_crossings(runs, target)
  step_seconds = np.concatenate([r.step_seconds for r in runs])
  return {
    "setting": dict(runs[0].setting),
    "seeds": [r.seed for r in runs],
    "final_val_losses": finals,
    "final_val_loss_mean": mean,
    "final_val_loss_std": std,
    "diverged_seeds": [r.seed for r in runs if r.diverged],
    "steps_to_target": steps_to,
    "seconds_to_target": seconds_to,
    "steps_to_target_per_seed": per_seed,
    "median_step_ms": 1000 * float(np.median(step_seconds)),
    "mean_step_ms": 1000 * float(np.mean(step_seconds)),  # with refresh steps
    "train_seconds_per_seed": [float(np.sum(r.step_seconds)) for r in runs],
    "tuning": [{**setting, "val_loss": loss} for setting, loss in trials],
    "lr_at_grid_edge": lr_at_grid_edge(runs[0].setting["lr"], trials),
    "mean_curve": {
      "steps": curves["steps"].tolist(),
      "val_mean": np.mean(curves["val"], axis=0).tolist(),
      "val_std": np.std(curves["val"], axis=0, ddof=1 if len(runs) > 1 else 0).tolist(),
      "wall_mean": np.mean(curves["wall"], axis=0).tolist(),
    },
  }


def lr_at_grid_edge(lr: float, trials: Sequence[tuple[Setting, float]]) -> bool:
  """Whether ``lr`` is the smallest or largest of several rates tried (the optimum may be
  outside the grid)."""
  rates = {setting["lr"] for setting, _ in trials}
  return len(rates) > 1 and lr in (min(rates), max(rates))


def write_csv(results: Sequence[RunResult], path: str) -> None:
  """One row per (method, seed, step); ``val_loss`` is empty where it was not evaluated."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS)
    for result in results:
      for r in result.rows:
        val = "" if r["val_loss"] is None else f"{r['val_loss']:.6f}"
        writer.writerow(
          [
            result.method,
            result.seed,
            r["step"],
            f"{r['train_loss']:.6f}",
            val,
            f"{r['wall']:.6f}",
          ]
        )


def method_colour(method: str) -> str:
  """A fixed colour per method (the same in every plot)."""
  return f"C{METHODS.index(method) % 10}" if method in METHODS else "k"


def format_setting(setting: Mapping[str, float]) -> str:
  """``lr=3.0e-03, b2=0.95``."""
  return ", ".join(f"{k}={v:.1e}" if k == "lr" else f"{k}={v:g}" for k, v in setting.items())


def plot_curves(summary: Mapping[str, Any], path: str) -> Figure:
  """Seed-mean validation loss ± std against steps (left) and train seconds (right)."""
  fig = Figure(figsize=(12, 4.5), layout="constrained")
  FigureCanvasAgg(fig)
  ax_steps, ax_wall = fig.subplots(1, 2, sharey=True)
  for method, s in summary["methods"].items():
    curve = s["mean_curve"]
    steps, wall = np.array(curve["steps"]), np.array(curve["wall_mean"])
    mean, std = np.array(curve["val_mean"]), np.array(curve["val_std"])
    colour = method_colour(method)
    label = f"{method} ({format_setting(s['setting'])})"
    for ax, x in ((ax_steps, steps), (ax_wall, wall)):
      ax.plot(x, mean, color=colour, label=label)
      ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.2, linewidth=0)
  target = summary.get("target")
  if target:
    for ax in (ax_steps, ax_wall):
      ax.axhline(target["val_loss"], color="k", linestyle=":", linewidth=1)
  seeds = len(summary["config"]["seeds"])
  ax_steps.set(
    xlabel="step",
    ylabel="validation loss (nats/byte)",
    title=f"vs steps (mean ± std over {_count(seeds, 'seed')})",
  )
  ax_wall.set(xlabel="train wall-clock seconds (seed mean, excl. compile/eval)", title="vs time")
  for ax in (ax_steps, ax_wall):
    ax.grid(alpha=0.3)
  finite = [v for s in summary["methods"].values() for v in s["mean_curve"]["val_mean"]]
  finite = [v for v in finite if v is not None and math.isfinite(v)]
  if finite:  # the early steps (byte-level loss ~5.5) would squash the interesting range
    low = min(finite)
    final = [s["final_val_loss_mean"] for s in summary["methods"].values()]
    high = max([v for v in final if math.isfinite(v)] or [low])
    ax_steps.set_ylim(low - 0.05, high + 0.6 * (high - low) + 0.3)
  ax_steps.legend(fontsize=8)
  fig.savefig(path, dpi=120)
  return fig


def _count(n: int, noun: str) -> str:
  return f"{n} {noun}" + ("" if n == 1 else "s")


def _fmt(value: float | None, spec: str, missing: str = "not reached") -> str:
  return missing if value is None or not math.isfinite(value) else format(value, spec)


def markdown_table(summary: Mapping[str, Any]) -> str:
  """The results table: one row per method (values over the final runs' seeds)."""
  target = summary.get("target")
  ref = f"{target['method']}'s {target['val_loss']:.4f}" if target else "n/a"
  seeds = len(summary["config"]["seeds"])
  lines = [
    f"| method | tuned | final val loss (mean ± std, {_count(seeds, 'seed')}) | steps to {ref} "
    f"| seconds to {ref} | median step ms |",
    "|---|---|---|---|---|---|",
  ]
  for method, s in summary["methods"].items():
    final = f"{s['final_val_loss_mean']:.4f} ± {s['final_val_loss_std']:.4f}"
    if s["diverged_seeds"]:
      final += f" (diverged: seeds {s['diverged_seeds']})"
    missing = "not reached" if target else "n/a"
    edge = " (lr at grid edge)" if s.get("lr_at_grid_edge") else ""
    lines.append(
      f"| {method} | {format_setting(s['setting'])}{edge} | {final} "
      f"| {_fmt(s['steps_to_target'], '.0f', missing)} "
      f"| {_fmt(s['seconds_to_target'], '.1f', missing)} | {s['median_step_ms']:.1f} |"
    )
  return "\n".join(lines)


def tuning_table(summary: Mapping[str, Any]) -> str:
  """Tuning trials per method (validation loss at the end of each short run; best in bold)."""
  lines = ["| method | trials: setting → val loss |", "|---|---|"]
  for method, s in summary["methods"].items():
    if not s["tuning"]:
      continue
    cells = []
    for trial in s["tuning"]:
      setting = {k: v for k, v in trial.items() if k != "val_loss"}
      text = f"{format_setting(setting)} → {trial['val_loss']:.4f}"
      cells.append(f"**{text}**" if setting == s["setting"] else text)
    lines.append(f"| {method} | {'; '.join(cells)} |")
  return "\n".join(lines) if len(lines) > 2 else ""


def run_experiment(config: ExperimentConfig) -> dict[str, Any]:
  """Tuning (optional), final runs on every seed, then CSV/JSON/markdown/PNG outputs.

  Returns the summary dict (also written to ``summary.json``).
  """
  start = time.perf_counter()
  unknown = sorted(set(config.methods) - set(METHODS))
  if unknown:
    raise ValueError(f"Unknown methods {unknown}; choose from {METHODS}.")
  if not config.seeds:
    raise ValueError("At least one seed is needed.")
  skipped = {m: unavailable_reason(m) for m in config.methods}
  skipped = {m: reason for m, reason in skipped.items() if reason}
  for method, reason in skipped.items():
    print(f"Skipping {method}: {reason}.")
  methods = [m for m in config.methods if m not in skipped]
  if not methods:
    raise ValueError(f"No method of {config.methods} is available here.")
  grids = {m: tuning_grid(m, config) for m in methods}
  if config.tune and len({len(g) for g in grids.values()}) > 1:
    sizes = {m: len(g) for m, g in grids.items()}
    raise ValueError(f"Every method needs the same number of tuning trials; got {sizes}.")
  trials_each = len(grids[methods[0]]) if config.tune and methods else 0
  seeds = _count(len(config.seeds), "seed")
  print(
    f"Plan: {_count(len(methods), 'method')}; tuning {trials_each} trials x {config.tune_steps} "
    f"steps (seed {config.tune_seed}) each; final runs {seeds} x {config.steps} steps each; "
    f"{config.model}, batch {config.batch_size}."
  )
  corpus = lm_data.load_stdlib_corpus(config.max_corpus_bytes)
  val_batches = lm_data.fixed_batches(
    corpus.val, config.num_val_batches, config.batch_size, config.model.seq_len
  )
  tune_val_batches = lm_data.fixed_batches(
    corpus.val, config.num_val_batches, config.batch_size, config.model.seq_len, TUNING_VAL_SEED
  )
  trainer = Trainer(config, val_batches[0])
  trials: dict[str, list[tuple[Setting, float]]] = {m: [] for m in methods}
  chosen: dict[str, Setting] = {}
  for m in methods:
    if not config.tune:
      chosen[m] = default_setting(m, config)
      continue
    for setting in grids[m]:
      run = train_run(
        trainer, m, setting, config.tune_steps, config.tune_seed, corpus, tune_val_batches,
        eval_every=config.tune_steps,
      )  # fmt: skip
      trials[m].append((setting, run.final_val_loss if not run.diverged else math.nan))
    chosen[m] = choose_setting(trials[m])
    losses = "; ".join(f"{format_setting(s)}: {loss:.4f}" for s, loss in trials[m])
    print(f"{m} tuning (val loss after {config.tune_steps} steps) {losses}")
    print(f"  -> {format_setting(chosen[m])}")
  tuning_seconds = time.perf_counter() - start

  results = [
    train_run(trainer, m, chosen[m], config.steps, seed, corpus, val_batches)
    for seed in config.seeds
    for m in methods
  ]
  by_method = {m: [r for r in results if r.method == m] for m in methods}
  target = reference_target(by_method)
  target_loss = target["val_loss"] if target else None
  summary: dict[str, Any] = {
    "config": dataclasses.asdict(config),
    "backend": jax.default_backend(),
    "num_params": lm_model.count_params(lm_model.TransformerLM(config.model, rngs=nnx.Rngs(0))),
    "corpus": {"train_bytes": int(corpus.train.size), "val_bytes": int(corpus.val.size)},
    "skipped_methods": skipped,
    "target": target,
    "methods": {
      m: method_summary(by_method[m], trials[m], target_loss) for m in methods if by_method[m]
    },
    "wall_seconds": {"tuning": tuning_seconds, "total": time.perf_counter() - start},
  }
  for m, s in summary["methods"].items():
    s["compile_seconds"] = trainer.compile_seconds.get(m, 0.0)  # tuning included
  os.makedirs(config.out_dir, exist_ok=True)
  write_csv(results, os.path.join(config.out_dir, "curves.csv"))
  plot_curves(summary, os.path.join(config.out_dir, "curves.png"))
  report = "\n\n".join(t for t in (markdown_table(summary), tuning_table(summary)) if t)
  with open(os.path.join(config.out_dir, "results.md"), "w") as f:
    f.write(report + "\n")
  summary["wall_seconds"]["total"] = time.perf_counter() - start
  with open(os.path.join(config.out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(report)
  print(f"Total wall time {summary['wall_seconds']['total']:.0f} s.")
  return summary


# Config fields that may differ between runs merged into one report: per-method tuning inputs
# and where the run wrote.
_MERGE_FREE = {"methods", "lr_grids", "hparam_grids", "lrs", "hparams", "out_dir", "progress"}


def read_runs(out_dir: str) -> dict[str, list[RunResult]]:
  """The final runs recorded in ``out_dir/curves.csv``, per method (rows only: no timings)."""
  rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
  with open(os.path.join(out_dir, "curves.csv"), newline="") as f:
    for r in csv.DictReader(f):
      val = float(r["val_loss"]) if r["val_loss"] else None
      rows.setdefault((r["method"], int(r["seed"])), []).append(
        {
          "step": int(r["step"]),
          "train_loss": float(r["train_loss"]),
          "val_loss": val,
          "wall": float(r["wall_seconds"]),
        }
      )
  runs: dict[str, list[RunResult]] = {}
  for (method, seed), method_rows in rows.items():
    runs.setdefault(method, []).append(RunResult(method, {}, seed, method_rows, [], 0.0))
  return runs


def merge_outputs(out_dirs: Sequence[str], out_dir: str) -> dict[str, Any]:
  """One report from runs made by separate processes (e.g. one ``--methods=M`` each).

  Each directory holds a ``run_experiment`` output (``summary.json``, ``curves.csv``); their
  configs must agree except in ``_MERGE_FREE`` fields, and no method may appear twice. The
  target (AdamW's mean final loss) and every method's steps and seconds to it are recomputed
  from the merged runs, as one process running every method would; the rest of each method's
  entry (tuning, timings) is its own run's. Writes ``summary.json``, ``results.md`` and
  ``curves.png`` (no CSV: the inputs keep theirs) to ``out_dir``.
  """
  summaries, runs = [], {}
  for d in out_dirs:
    with open(os.path.join(d, "summary.json")) as f:
      summaries.append(json.load(f))
    for method, method_runs in read_runs(d).items():
      if method in runs:
        raise ValueError(f"{method} appears in more than one of {list(out_dirs)}.")
      runs[method] = method_runs
  base = {k: v for k, v in summaries[0]["config"].items() if k not in _MERGE_FREE}
  for d, summary in zip(out_dirs, summaries, strict=True):
    config = {k: v for k, v in summary["config"].items() if k not in _MERGE_FREE}
    if config != base:
      differ = sorted(k for k in config if config[k] != base.get(k))
      raise ValueError(f"{d} was run with another configuration ({differ}).")
  target = reference_target(runs)
  methods: dict[str, Any] = {}
  for method in [m for m in METHODS if m in runs]:
    entry = dict(next(s["methods"][method] for s in summaries if method in s["methods"]))
    crossings = target_crossings(runs[method], target["val_loss"] if target else None)
    keys = ("steps_to_target", "seconds_to_target", "steps_to_target_per_seed")
    entry.update(zip(keys, crossings, strict=True))
    methods[method] = entry
  merged = {
    **{k: v for k, v in summaries[0].items() if k not in ("methods", "target", "wall_seconds")},
    "config": {**summaries[0]["config"], "methods": list(methods), "out_dir": out_dir},
    "target": target,
    "methods": methods,
    "merged_from": list(out_dirs),
    "wall_seconds": {"total": sum(s["wall_seconds"]["total"] for s in summaries)},
  }
  os.makedirs(out_dir, exist_ok=True)
  plot_curves(merged, os.path.join(out_dir, "curves.png"))
  report = "\n\n".join(t for t in (markdown_table(merged), tuning_table(merged)) if t)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(report + "\n")
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(merged, f, indent=2)
  print(report)
  return merged


def parse_lr_grid(spec: str) -> dict[str, tuple[float, ...]]:
  """``"1e-3,3e-3"`` (every method) or ``"adamw=1e-3/3e-3,soap=2e-3/4e-3"`` (per method)."""
  if not spec:
    return {}
  if "=" not in spec:
    return {"*": tuple(float(v) for v in spec.split(","))}
  items = (item.split("=") for item in spec.split(","))
  return {m.strip(): tuple(float(v) for v in values.split("/")) for m, values in items}


def parse_hparam_grid(spec: str) -> dict[str, tuple[str, tuple[float, ...]]]:
  """``"adamw:b2=0.95/0.99,psgd_kron:b1=0.9/0.95"`` -> ``{method: (name, values)}``."""
  grids = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    method, _, rest = item.partition(":")
    name, _, values = rest.partition("=")
    grids[method.strip()] = (name.strip(), tuple(float(v) for v in values.split("/")))
  return grids


def parse_lrs(spec: str) -> dict[str, float]:
  """``"adamw=3e-3,soap=1e-3"`` -> ``{"adamw": 0.003, "soap": 0.001}``."""
  return {m.strip(): float(v) for m, v in (item.split("=") for item in spec.split(",") if item)}


def parse_hparams(spec: str) -> dict[str, dict[str, float]]:
  """``"adamw:b2=0.99,psgd_kron:b1=0.95"`` -> ``{"adamw": {"b2": 0.99}, ...}``."""
  out: dict[str, dict[str, float]] = {}
  for method, (name, values) in parse_hparam_grid(spec).items():
    out.setdefault(method, {})[name] = values[0]
  return out


def parse_seeds(spec: str) -> tuple[int, ...]:
  """``"3"`` -> ``(0, 1, 2)``; ``"0,1,2"`` or ``"7,"`` -> those seeds."""
  if "," not in spec:
    return tuple(range(int(spec)))
  return tuple(int(s) for s in spec.split(",") if s.strip())


_DEFAULTS = ExperimentConfig()
# Flags of the experiment's size: None means "the preset's value".
_SIZE_FLAGS = ("batch_size", "steps", "tune_steps", "eval_every", "num_val_batches")
_MODEL_FLAGS = ("seq_len", "d_model", "num_layers", "num_heads")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the command-line flags (on ``flag_values``; tests pass a fresh ``FlagValues``)."""
  fv = {"flag_values": flag_values}
  flags.DEFINE_enum(
    "preset", "default", list(PRESETS), "Size preset; the flags below override it.", **fv
  )
  flags.DEFINE_string("methods", ",".join(METHODS), "Comma-separated methods to compare.", **fv)
  flags.DEFINE_string(
    "seeds", "3", "Final-run seeds: N (seeds 0..N-1) or a list: '0,1,2' ('7,': seed 7).", **fv
  )
  flags.DEFINE_integer(
    "steps", None, f"Steps of each final run (default preset: {_DEFAULTS.steps}).", **fv
  )
  flags.DEFINE_bool("no_tune", False, "Skip tuning: --lrs/--hparams or DEFAULT_SETTINGS.", **fv)
  flags.DEFINE_integer(
    "tune_steps", None, f"Steps of each tuning run (default preset: {_DEFAULTS.tune_steps}).", **fv
  )
  flags.DEFINE_integer("tune_seed", _DEFAULTS.tune_seed, "Seed of the tuning runs.", **fv)
  flags.DEFINE_string(
    "lr_grid", "", "Learning rates to tune: '1e-3,3e-3' (all) or 'adamw=1e-3/3e-3,soap=...'.", **fv
  )
  flags.DEFINE_string(
    "hparam_grid",
    "",
    "Second axis to tune, per method: 'adamw:b2=0.95/0.99,psgd_kron:b1=0.9/0.95'.",
    **fv,
  )
  flags.DEFINE_string("lrs", "", "Rates without tuning: 'adamw=3e-3,soap=1e-3'.", **fv)
  flags.DEFINE_string("hparams", "", "Second axis without tuning: 'adamw:b2=0.99'.", **fv)
  flags.DEFINE_integer("num_layers", None, "Transformer blocks (default preset: 2).", **fv)
  flags.DEFINE_integer("d_model", None, "Model width (default preset: 128).", **fv)
  flags.DEFINE_integer("num_heads", None, "Attention heads (default preset: 4).", **fv)
  flags.DEFINE_integer("seq_len", None, "Context length in bytes (default preset: 64).", **fv)
  flags.DEFINE_integer("batch_size", None, "Sequences per batch (default preset: 32).", **fv)
  flags.DEFINE_integer(
    "precondition_frequency",
    _DEFAULTS.precondition_frequency,
    "Preconditioner refresh interval (steps).",
    **fv,
  )
  flags.DEFINE_float(
    "kron_update_probability",
    None,
    "PSGD Kron's preconditioner update probability (default: 1 / precondition_frequency).",
    **fv,
  )
  flags.DEFINE_float("weight_decay", _DEFAULTS.weight_decay, "Decoupled weight decay.", **fv)
  flags.DEFINE_integer(
    "eval_every",
    None,
    f"Validation every this many steps (default preset: {_DEFAULTS.eval_every}).",
    **fv,
  )
  flags.DEFINE_integer("num_val_batches", None, "Fixed validation batches per evaluation.", **fv)
  flags.DEFINE_integer("max_corpus_bytes", None, "Cap on the corpus size in bytes.", **fv)
  flags.DEFINE_string("out_dir", _DEFAULTS.out_dir, "Output directory.", **fv)
  flags.DEFINE_string(
    "merge",
    "",
    "Comma-separated output directories of earlier runs (e.g. one --methods=M each) to merge "
    "into one report in --out_dir instead of training.",
    **fv,
  )
  flags.DEFINE_bool("progress", True, "Show tqdm progress bars.", **fv)


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> ExperimentConfig:
  """An ``ExperimentConfig``: the ``--preset``, then every size flag that was given."""
  fv = flag_values
  base = preset_config(fv.preset)
  model = {name: fv[name].value for name in _MODEL_FLAGS if fv[name].value is not None}
  sizes = {name: fv[name].value for name in _SIZE_FLAGS if fv[name].value is not None}
  if fv.max_corpus_bytes is not None:
    sizes["max_corpus_bytes"] = fv.max_corpus_bytes
  return dataclasses.replace(
    base,
    model=dataclasses.replace(base.model, **model),
    methods=tuple(m.strip() for m in fv.methods.split(",") if m.strip()),
    seeds=parse_seeds(fv.seeds),
    tune=not fv.no_tune,
    tune_seed=fv.tune_seed,
    lr_grids={**base.lr_grids, **parse_lr_grid(fv.lr_grid)},
    hparam_grids={**base.hparam_grids, **parse_hparam_grid(fv.hparam_grid)},
    lrs=parse_lrs(fv.lrs),
    hparams=parse_hparams(fv.hparams),
    precondition_frequency=fv.precondition_frequency,
    kron_update_probability=fv.kron_update_probability,
    weight_decay=fv.weight_decay,
    out_dir=fv.out_dir,
    progress=fv.progress,
    **sizes,
  )


def main(argv: Sequence[str]) -> None:
  """Entry point: flags -> ``ExperimentConfig`` -> ``run_experiment``."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  if flags.FLAGS.merge:
    merge_outputs([d for d in flags.FLAGS.merge.split(",") if d], flags.FLAGS.out_dir)
    return
  run_experiment(config_from_flags())


if __name__ == "__main__":
  define_flags()
  app.run(main)
