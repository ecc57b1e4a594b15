"""Benchmark models and the step-timing harness shared by the benchmark programs.

Plain JAX (no Flax), so that the same code runs in this repository's environment (jax 0.10) and in
the peers' environment (jax 0.5.3, see ``peers.py``):

* ``mlp``: 784-512-512-10 ReLU MLP, softmax cross-entropy, batch 128 (669,706 parameters).
* ``transformer``: decoder-only LM, 4 pre-LayerNorm blocks, width 256, 4 heads, MLP 1024, fused
  QKV, learned positions, untied output head, sequence 128, batch 16 (2,048 tokens per step),
  vocabulary 256 (3,323,648 parameters).

Data is one fixed random batch (timing only). The harness jits ``loss + grad + tx.update +
apply_updates`` with donated parameters and state, times each call to ``block_until_ready``, and
interleaves the methods in chunks so that the machine's load drifts affect all of them alike.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def _dense(key: jax.Array, d_in: int, d_out: int, std: float = 0.02) -> dict[str, jax.Array]:
  return {"w": std * jax.random.normal(key, (d_in, d_out)), "b": jnp.zeros((d_out,))}


def mlp_init(key: jax.Array, sizes: Sequence[int]) -> dict[str, Any]:
  keys = jax.random.split(key, len(sizes) - 1)
  return {
    f"dense{i}": _dense(k, a, b, std=1 / math.sqrt(a))
    for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))
  }


def mlp_loss(params: dict[str, Any], batch: tuple[jax.Array, jax.Array]) -> jax.Array:
  x, labels = batch
  layers = [params[f"dense{i}"] for i in range(len(params))]
  for layer in layers[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  logits = x @ layers[-1]["w"] + layers[-1]["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  vocab: int = 256
  seq_len: int = 128
  width: int = 256
  layers: int = 4
  heads: int = 4
  mlp_ratio: int = 4


def _layer_norm_params(width: int) -> dict[str, jax.Array]:
  return {"scale": jnp.ones((width,)), "bias": jnp.zeros((width,))}


def transformer_init(key: jax.Array, config: TransformerConfig) -> dict[str, Any]:
  width, hidden = config.width, config.mlp_ratio * config.width
  keys = iter(jax.random.split(key, 3 + 4 * config.layers))
  params: dict[str, Any] = {
    "embed": 0.02 * jax.random.normal(next(keys), (config.vocab, width)),
    "position": 0.02 * jax.random.normal(next(keys), (config.seq_len, width)),
  }
  for i in range(config.layers):
    params[f"block{i}"] = {
      "ln1": _layer_norm_params(width),
      "qkv": _dense(next(keys), width, 3 * width),
      "out": _dense(next(keys), width, width),
      "ln2": _layer_norm_params(width),
      "up": _dense(next(keys), width, hidden),
      "down": _dense(next(keys), hidden, width),
    }
  params["ln_final"] = _layer_norm_params(width)
  params["head"] = _dense(next(keys), width, config.vocab)
  return params


def _layer_norm(x: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-6) * p["scale"] + p["bias"]


def _attention(x: jax.Array, p: dict[str, Any], heads: int) -> jax.Array:
  batch, length, width = x.shape
  qkv = x @ p["qkv"]["w"] + p["qkv"]["b"]
  q, k, v = (t.reshape(batch, length, heads, width // heads) for t in jnp.split(qkv, 3, -1))
  scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(width // heads)
  causal = jnp.tril(jnp.ones((length, length), bool))
  weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
  y = jnp.einsum("bhts,bshd->bthd", weights, v).reshape(batch, length, width)
  return y @ p["out"]["w"] + p["out"]["b"]


def transformer_loss(
  params: dict[str, Any], batch: jax.Array, config: TransformerConfig
) -> jax.Array:
  inputs, targets = batch[:, :-1], batch[:, 1:]
  x = params["embed"][inputs] + params["position"][: inputs.shape[1]]
  for i in range(config.layers):
    p = params[f"block{i}"]
    x = x + _attention(_layer_norm(x, p["ln1"]), p, config.heads)
    h = jax.nn.gelu(_layer_norm(x, p["ln2"]) @ p["up"]["w"] + p["up"]["b"])
    x = x + h @ p["down"]["w"] + p["down"]["b"]
  logits = _layer_norm(x, params["ln_final"]) @ params["head"]["w"] + params["head"]["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@dataclasses.dataclass(frozen=True)
class Task:
  """A model, its parameters and one fixed batch."""

  name: str
  description: str
  params: Any
  batch: Any
  loss: Callable[[Any, Any], jax.Array]

  @property
  def num_params(self) -> int:
    return int(sum(x.size for x in jax.tree.leaves(self.params)))


def make_task(name: str, smoke: bool = False, seed: int = 0) -> Task:
  """``mlp`` or ``transformer`` at full size, or a tiny version with ``smoke=True``."""
  init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
  if name == "mlp":
    sizes, batch = ((64, 32, 10), 16) if smoke else ((784, 512, 512, 10), 128)
    x_key, y_key = jax.random.split(data_key)
    data = (
      jax.random.normal(x_key, (batch, sizes[0])),
      jax.random.randint(y_key, (batch,), 0, sizes[-1]),
    )
    description = f"MLP {'-'.join(map(str, sizes))}, batch {batch}"
    return Task(name, description, mlp_init(init_key, sizes), data, mlp_loss)
  if name == "transformer":
    if smoke:
      config, batch = TransformerConfig(vocab=64, seq_len=16, width=32, layers=1, heads=2), 2
    else:
      config, batch = TransformerConfig(), 16
    return transformer_task(config, batch, seed)
  raise ValueError(f"Unknown task {name!r}; expected 'mlp' or 'transformer'.")


def transformer_task(
  config: TransformerConfig, batch: int, seed: int = 0, name: str = "transformer"
) -> Task:
  """The decoder LM of ``config`` with one fixed batch of ``batch`` random token sequences."""
  init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
  tokens = jax.random.randint(data_key, (batch, config.seq_len + 1), 0, config.vocab)
  description = (
    f"decoder LM L{config.layers} d{config.width} H{config.heads} T{config.seq_len} "
    f"B{batch} V{config.vocab} ({batch * config.seq_len} tokens/step)"
  )

  def loss(params: Any, data: jax.Array) -> jax.Array:
    return transformer_loss(params, data, config)

  return Task(name, description, transformer_init(init_key, config), tokens, loss)


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------

METHODS = ("adamw", "soap", "kl_soap", "kl_shampoo", "shampoo", "adamw_shampoo")
LEARNING_RATE = 1e-4  # small enough that no run diverges (kl_precond skips non-finite gradients)


# Methods whose axes longer than max_precond_dim are split into blocks by default; the others
# (SOAP, the KL methods, as upstream SOAP) leave such an axis unrotated unless ``blocks=True``.
BLOCKING_BY_DEFAULT = ("shampoo", "adamw_shampoo", "eigenvalue_corrected_shampoo")


STAGGER_SUFFIX = "+stagger"


def split_name(name: str) -> tuple[str, bool]:
  """A runner's name as (method, staggered): ``soap+stagger`` -> ``("soap", True)``, any other
  name -> ``(name, False)``. ``<method>+stagger`` is the method with ``stagger_refresh=True``."""
  return name.removesuffix(STAGGER_SUFFIX), name.endswith(STAGGER_SUFFIX)


def make_optimizer(
  name: str,
  frequency: int,
  max_precond_dim: int,
  learning_rate: float = LEARNING_RATE,
  blocks: bool = False,
  stagger: bool = False,
) -> optax.GradientTransformation:
  """The named optimizer; ``LookupError`` if this version of kl_precond lacks it. ``shampoo+qr``
  and ``adamw_shampoo+qr`` take ``refresh="qr"``, ``shampoo+kl`` and ``adamw_shampoo+kl``
  ``kl_factors=True`` (Distributed Shampoo's KL-Shampoo).

  ``blocks=True``: every axis longer than ``max_precond_dim`` is split into blocks of at most
  that size, for every method (the Shampoo variants do this anyway; SOAP and the KL methods get
  ``layout=LayoutConfig(max_precond_dim, blocking=True)``; ``layout_config`` returns the layout
  either way). ``stagger=True`` passes ``stagger_refresh=True`` (``LookupError`` if this version's
  constructor has no such keyword). kl_precond is imported here, not at the top, so that the
  peers' environment (which does not have it) can import this module.
  """
  if name == "adamw":
    return optax.adamw(learning_rate)
  import kl_precond as kp

  options: dict[str, Any] = {"precondition_frequency": frequency}
  # ``shampoo+qr``: the Shampoo variants with roots from the warm-started QR algorithm;
  # ``shampoo+kl``: with factors of the gradient whitened by the other factors' roots.
  name, _, variant = name.partition("+")
  variants = {"qr": {"refresh": "qr"}, "kl": {"kl_factors": True}}
  if variant:
    if variant not in variants or name not in ("shampoo", "adamw_shampoo"):
      raise LookupError(
        f"no variant `{variant}` of `{name}` (known: shampoo+qr, shampoo+kl and the same of "
        "adamw_shampoo)"
      )
    options.update(variants[variant])
  if blocks and name not in BLOCKING_BY_DEFAULT:
    options["layout"] = kp.LayoutConfig(max_precond_dim, blocking=True)
  else:
    options["max_precond_dim"] = max_precond_dim
  factory = getattr(kp, name, None)
  if factory is None:
    raise LookupError(f"kl_precond {kp.__version__} has no `{name}`")
  if name == "shampoo":  # Adam grafting, whatever the keyword is called in this version
    keyword = (
      "grafting_type" if "grafting_type" in inspect.signature(factory).parameters else "grafting"
    )
    options[keyword] = "adam"
  if stagger:
    if "stagger_refresh" not in inspect.signature(factory).parameters:
      raise LookupError(f"kl_precond {kp.__version__}'s `{name}` has no `stagger_refresh`")
    options["stagger_refresh"] = True
  return factory(learning_rate, **options)


def layout_config(name: str, max_precond_dim: int, blocks: bool = False) -> Any:
  """The ``kl_precond.LayoutConfig`` of ``make_optimizer(name, f, max_precond_dim, blocks=...)``:
  the Shampoo variants block at ``max_precond_dim`` with their own ``precondition_1d`` default
  (Shampoo's is True: 1-D parameters get a factor); the others block only with ``blocks=True``
  and give 1-D parameters none."""
  import kl_precond as kp

  base = name.partition("+")[0]
  if base in BLOCKING_BY_DEFAULT:
    factor_1d = inspect.signature(getattr(kp, base)).parameters["precondition_1d"].default
    return kp.LayoutConfig(max_precond_dim, blocking=True, precondition_1d=factor_1d)
  return kp.LayoutConfig(max_precond_dim, blocking=blocks)


def sequential_eigh_workaround() -> bool:
  """Makes kl_precond run its batched eigendecompositions one block at a time (``lax.map``).

  A workaround, off by default, for a deadlock of jaxlib 0.10's CPU runtime: two batched
  ``eigh`` calls (LAPACK ``syevd`` via ``ParallelBatchMap``) run at once on the two threads of
  XLA's intra-op pool, each waiting for batch items queued on that same pool; the step never
  returns. Seen at kl_precond's first call (all methods) and at Shampoo's eigh refreshes. Wraps
  ``kl_precond.basis._eigh_descending`` (its body unchanged) in a ``custom_vmap`` whose batching
  rule is ``lax.map``. Returns False if this version of kl_precond has no such function.
  """
  from kl_precond import basis

  original = getattr(basis, "_eigh_descending", None)
  if original is None or getattr(original, "sequential", False):
    return original is not None

  @jax.custom_batching.custom_vmap
  def eigh_descending(factor: jax.Array) -> tuple[jax.Array, jax.Array]:
    return original(factor)

  @eigh_descending.def_vmap
  def _batched(axis_size: int, in_batched: Any, factor: jax.Array) -> tuple[Any, Any]:
    del axis_size, in_batched
    return jax.lax.map(eigh_descending, factor), (True, True)

  eigh_descending.sequential = True
  basis._eigh_descending = eigh_descending
  return True


def sequential_eigh_active() -> bool:
  from kl_precond import basis

  return bool(getattr(getattr(basis, "_eigh_descending", None), "sequential", False))


# ---------------------------------------------------------------------------------------------
# Step-timing harness
# ---------------------------------------------------------------------------------------------


def train_step(loss: Callable[[Any, Any], jax.Array], tx: optax.GradientTransformation):
  """``(params, opt_state, batch) -> (params, opt_state, loss)``: forward, backward, update."""

  def step(params: Any, opt_state: Any, batch: Any) -> tuple[Any, Any, jax.Array]:
    value, grads = jax.value_and_grad(loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  return step


HANG_EXIT_CODE = 75


class Watchdog:
  """Ends the process if one call runs longer than ``seconds``.

  XLA's CPU runtime (jaxlib 0.10) sometimes deadlocks: a call never returns from
  ``block_until_ready`` and cannot be cancelled. The watchdog writes ``{"hung": label}`` to
  ``report_path`` (if given) and exits with ``HANG_EXIT_CODE``, so that a parent process can
  record the hang and retry.
  """

  def __init__(self, seconds: float, report_path: str | None = None):
    self.seconds, self.report_path = seconds, report_path
    self.label: str | None = None
    self.deadline: float | None = None
    threading.Thread(target=self._watch, daemon=True).start()

  def arm(self, label: str) -> None:
    self.label, self.deadline = label, time.monotonic() + self.seconds

  def disarm(self) -> None:
    self.deadline = None

  def _watch(self) -> None:
    while True:
      time.sleep(1.0)
      if self.deadline is not None and time.monotonic() > self.deadline:
        message = f"{self.label}: no result after {self.seconds:.0f} s (XLA CPU deadlock?)"
        print(f"[watchdog] {message}", file=sys.stderr, flush=True)
        if self.report_path:
          with open(self.report_path, "w") as f:
            json.dump({"hung": self.label, "error": message}, f)
        os._exit(HANG_EXIT_CODE)


def run_isolated(script: str, spec: dict[str, Any], timeout: float, tag: str) -> dict[str, Any]:
  """Runs ``python script --worker_spec=...`` on ``spec`` in a child process (``run_worker``) and
  returns its result; a method whose call hangs twice is dropped and recorded.

  A hang (``Watchdog``) ends the child; the configuration is then run again, without the method
  if it had already hung once. ``spec["methods"]`` names the runners (a watchdog label's first
  word); the result gets ``skipped`` (updated with the dropped methods) and ``hangs``.
  """
  spec = dict(spec)
  hangs: dict[str, list[str]] = {}
  dropped: dict[str, str] = {}
  with tempfile.TemporaryDirectory() as scratch:
    spec_path, result_path = os.path.join(scratch, "spec.json"), os.path.join(scratch, "out.json")
    spec.update(hang_report=os.path.join(scratch, "hang.json"), result=result_path)
    for _ in range(2 * len(spec["methods"]) + 1):
      with open(spec_path, "w") as f:
        json.dump(spec, f)
      command = [sys.executable, script, f"--worker_spec={spec_path}"]
      done = subprocess.run(command, timeout=timeout)
      if done.returncode == 0:
        with open(result_path) as f:
          config = json.load(f)
        config["skipped"].update(dropped)
        config["hangs"] = hangs
        return config
      if done.returncode != HANG_EXIT_CODE:
        raise RuntimeError(f"{tag} worker failed with exit code {done.returncode}")
      with open(spec["hang_report"]) as f:
        label = json.load(f)["hung"]
      method = label.split()[0]
      hangs.setdefault(method, []).append(label)
      print(f"[{tag}] {label} hung; {len(hangs[method])} hang(s) of {method}", flush=True)
      if len(hangs[method]) >= 2:
        dropped[method] = f"hung twice ({'; '.join(hangs[method])}): XLA CPU deadlock"
        spec["methods"] = [m for m in spec["methods"] if m != method]
  raise RuntimeError(f"{tag}: too many hangs: {hangs}")


def run_worker(spec_path: str, measure: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
  """The child's side of ``run_isolated``: ``measure`` the spec, write the result JSON."""
  with open(spec_path) as f:
    spec = json.load(f)
  config = measure(spec)
  with open(spec["result"], "w") as f:
    json.dump(config, f)


class StepRunner:
  """One method on one task: its compiled step, its own parameters and state, its timings.

  ``times[i]`` is the wall time of call ``indices[i]`` (0-based calls since ``init``), so that a
  caller knowing the refresh schedule can pick out refresh steps.
  """

  def __init__(self, name: str, task: Task, tx: optax.GradientTransformation):
    self.name = name
    self.params = jax.tree.map(jnp.array, task.params)  # a private copy: it is donated
    self.batch = task.batch
    # Copy every leaf: an ``init`` may return one array in several leaves (kl_precond's three
    # int32 counters share one zero), which donation rejects ("donate the same buffer twice").
    self.state = jax.tree.map(lambda x: jnp.array(x, copy=True), tx.init(self.params))
    start = time.perf_counter()
    lowered = jax.jit(train_step(task.loss, tx), donate_argnums=(0, 1)).lower(
      self.params, self.state, self.batch
    )
    self.compiled = lowered.compile()
    self.compile_seconds = time.perf_counter() - start
    self.calls = 0
    self.times: list[float] = []
    self.indices: list[int] = []
    self.last_loss = float("nan")

  def run(self, steps: int, record: bool = True, watchdog: Watchdog | None = None) -> None:
    for _ in range(steps):
      if watchdog:
        watchdog.arm(f"{self.name} call {self.calls}")
      start = time.perf_counter()
      self.params, self.state, loss = self.compiled(self.params, self.state, self.batch)
      jax.block_until_ready((self.params, self.state, loss))
      elapsed = time.perf_counter() - start
      if watchdog:
        watchdog.disarm()
      if record:
        self.times.append(elapsed)
        self.indices.append(self.calls)
      self.calls += 1
    self.last_loss = float(loss) if steps else self.last_loss


def run_interleaved(
  runners: Sequence[StepRunner],
  warmup: int,
  steps: int,
  chunk: int,
  progress: Callable[[int], None] | None = None,
  watchdog: Watchdog | None = None,
) -> None:
  """Warms every runner up, then times ``steps`` calls of each in chunks of ``chunk`` calls.

  The order of the runners rotates from one round to the next, so no method always runs right
  after another (or first after a pause).
  """
  for runner in runners:
    runner.run(warmup, record=False, watchdog=watchdog)
    if progress:
      progress(warmup)
  done, round_index = 0, 0
  while done < steps:
    size = min(chunk, steps - done)
    shift = round_index % len(runners)
    for runner in list(runners[shift:]) + list(runners[:shift]):
      runner.run(size, watchdog=watchdog)
      if progress:
        progress(size)
    done += size
    round_index += 1


def chunk_medians(runner: StepRunner, chunk: int) -> np.ndarray:
  """The median step time of each timed chunk (for paired, same-round ratios)."""
  times = np.asarray(runner.times)
  return np.asarray([np.median(times[i : i + chunk]) for i in range(0, len(times), chunk)])


def add_ratios(results: dict[str, Any], runners: Sequence[StepRunner], chunk: int) -> None:
  """Ratios to AdamW of the same run: of medians, paired per round, and of amortised to mean."""
  base = next((r for r in runners if r.name == "adamw"), None)
  if base is None:
    return
  base_chunks = chunk_medians(base, chunk)
  adamw = results["adamw"]
  for runner in runners:
    summary = results[runner.name]
    summary["ratio_median"] = summary["median_ms"] / adamw["median_ms"]
    summary["ratio_paired"] = float(np.median(chunk_medians(runner, chunk) / base_chunks))
    summary["ratio_amortised"] = summary["amortised_ms"] / adamw["mean_ms"]
    summary["ratio_cycle"] = summary.get("cycle_ms", np.nan) / adamw.get("cycle_ms", np.nan)


def refresh_schedule(
  runner: StepRunner, frequency: int, threshold: float = 1.3
) -> Callable[[int], bool] | None:
  """The refresh calls, read from the times: ``i % f == r`` for the residue ``r`` of the slowest
  median, if that median is at least ``threshold`` × the median of the other calls, else None.

  Methods count steps differently (kl_precond's SOAP and KL methods refresh at calls
  ``i % f == 0``, its Shampoo at ``(i + 1) % f == 0``), so the schedule is found, not assumed.
  """
  indices, times = np.asarray(runner.indices), np.asarray(runner.times)
  if frequency < 2 or len(times) == 0:
    return None
  medians = {r: np.median(times[indices % frequency == r]) for r in set(indices % frequency)}
  phase = max(medians, key=lambda r: medians[r])
  others = times[indices % frequency != phase]
  if len(others) == 0 or medians[phase] < threshold * np.median(others):
    return None
  return lambda i: i % frequency == phase


def phase_medians(
  times: Any, indices: Sequence[int], frequency: int | None, least: int = 3
) -> list[float]:
  """The median time of the calls at each phase ``i mod f`` of the refresh cycle, phases
  ``0 … f-1`` in order; empty unless every phase has at least ``least`` calls."""
  if not frequency or frequency < 2:
    return []
  times, phase = np.asarray(times, float), np.asarray(indices) % frequency
  counts = [int(np.sum(phase == r)) for r in range(frequency)]
  if len(times) != len(phase) or min(counts) < least:
    return []
  return [float(np.median(times[phase == r])) for r in range(frequency)]


def summarize(
  runner: StepRunner,
  is_refresh: Callable[[int], bool] | None,
  frequency: int | None,
) -> dict[str, Any]:
  """Median / mean / refresh / amortised step time in milliseconds.

  ``amortised_ms = ((f-1)·median(non-refresh) + median(refresh)) / f`` when the refresh steps are
  known (``is_refresh``), else the measured mean. ``slow_ms`` is the median of the slowest 10% of
  the steps (the refresh cost when refreshes are every 10 steps and the schedule is unknown).

  By phase (call index mod ``f``; see :func:`phase_medians`): ``heaviest_phase_over_median``, the
  slowest phase's median over the median of all calls (a refresh spike, which one slow call of
  a shared machine does not move as it moves ``max / median``), and ``cycle_ms``, the mean of
  the phase medians (the amortised time by one rule for staggered and unstaggered refreshes).
  """
  times = np.asarray(runner.times) * 1e3
  flags = np.asarray([bool(is_refresh and is_refresh(i)) for i in runner.indices])
  plain = times[~flags] if (~flags).any() else times
  refresh = float(np.median(times[flags])) if flags.any() else float("nan")
  amortised = float(np.mean(times))
  if flags.any() and frequency:
    amortised = ((frequency - 1) * float(np.median(plain)) + refresh) / frequency
  slowest = np.sort(times)[-max(1, len(times) // 10) :]
  phases = phase_medians(times, runner.indices, frequency)
  return {
    "median_ms": float(np.median(times)),
    "mean_ms": float(np.mean(times)),
    "median_nonrefresh_ms": float(np.median(plain)),
    "refresh_ms": refresh,
    "num_refresh_steps": int(flags.sum()),
    "amortised_ms": amortised,
    "slow_ms": float(np.median(slowest)),
    "min_ms": float(np.min(times)),
    "p90_ms": float(np.percentile(times, 90)),
    "max_ms": float(np.max(times)),
    "compile_s": runner.compile_seconds,
    "steps_timed": len(times),
    "final_loss": runner.last_loss,
    "refresh_phase": next(
      (
        i % frequency
        for i in runner.indices
        if flags.any() and frequency and is_refresh and is_refresh(i)
      ),
      None,
    ),
    "phase_medians_ms": phases,
    "heaviest_phase_over_median": max(phases) / float(np.median(times)) if phases else np.nan,
    "cycle_ms": float(np.mean(phases)) if phases else np.nan,
    "times_ms": [round(float(t), 3) for t in times],
    "call_indices": list(runner.indices),
  }


def environment() -> dict[str, Any]:
  """What the numbers depend on: versions, CPU count, load, XLA flags."""
  try:
    load = os.getloadavg()
  except OSError:
    load = (float("nan"),) * 3
  return {
    "jax": jax.__version__,
    "optax": optax.__version__,
    "numpy": np.__version__,
    "python": platform.python_version(),
    "backend": jax.default_backend(),
    "cpu_count": os.cpu_count(),
    "load_average_1_5_15": [round(x, 2) for x in load],
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS", ""),
    "time": time.strftime("%Y-%m-%d %H:%M:%S"),
  }


def write_outputs(
  name: str,
  report: dict[str, Any],
  out_dir: str,
  markdown: Callable[[dict[str, Any]], str],
  plot: Callable[[dict[str, Any], str], None],
) -> None:
  """Writes ``name.json`` (the report), ``name.md`` (``markdown(report)``, also printed) and
  ``name.png`` (``plot``) to ``out_dir``."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump(report, f, indent=1)
  text = markdown(report)
  with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
    f.write(text)
  plot(report, os.path.join(out_dir, f"{name}.png"))
  print(text, flush=True)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  def cell(value: Any) -> str:
    if isinstance(value, float):
      if math.isnan(value):
        return "–"
      return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)

  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)
