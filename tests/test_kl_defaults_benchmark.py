"""benchmarks/kl_defaults.py in a tiny setting: its tables agree with its own per-run records and
its scale table's ``c = 1`` column with a plain training loop written here."""

from __future__ import annotations

import json
import math
import statistics

import jax
import jax.numpy as jnp
import optax
import pytest

from benchmarks import kl_defaults as kd

# 25-40 s of compilation (one program per candidate, and a plain loop): the slow job.
pytestmark = pytest.mark.slow
# The reference KL-Shampoo (not scale-invariant) and one candidate of the data starts.
CANDIDATES = ("kl_shampoo_ref", "kl_soap_trace_rel")
CONFIG = kd.Config(
  tasks=("regression",),
  candidates=CANDIDATES,
  steps=12,
  lr_min=1e-3,
  lr_max=3e-2,
  num_lrs=3,
  tuning_seeds=2,
  eval_seeds=3,
  scales=(1e-2, 1.0, 1e2),
  progress=False,
)


def plain_run(name: str, config: kd.Config, lr: float, seed: int) -> float:
  """The benchmark's run as a Python loop of jitted steps: the final training MSE."""
  init_key, data_key = jax.random.split(jax.random.key(seed))
  _, set_key = jax.random.split(data_key)
  x, y, _, _ = kd.regression_data(set_key)
  params = kd.init_mlp(init_key, kd.REGRESSION_STUDENT)
  warmup = round(config.warmup * config.steps)

  def schedule(count: jax.Array) -> jax.Array:
    ramp = count / warmup
    cosine = 0.5 * (1 + jnp.cos(jnp.pi * (count - warmup) / (config.steps - warmup)))
    return lr * jnp.where(count < warmup, ramp, cosine)

  tx = kd.factory_of(name)(schedule, weight_decay=0.0, **kd.CANDIDATES[name][1])

  def loss(p: kd.Params) -> jax.Array:
    return jnp.mean((kd.mlp(p, x)[:, 0] - y) ** 2)

  @jax.jit
  def step(p: kd.Params, state: optax.OptState) -> tuple[kd.Params, optax.OptState]:
    updates, state = tx.update(jax.grad(loss)(p), state, p)
    return optax.apply_updates(p, updates), state

  state = tx.init(params)
  for _ in range(config.steps):
    params, state = step(params, state)
  return float(loss(params))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out_dir = str(tmp_path_factory.mktemp("kl_defaults"))
  config = kd.Config(**{**CONFIG.__dict__, "out_dir": out_dir})
  report = kd.run_and_save(config)
  with open(f"{out_dir}/kl_defaults.json") as f:
    written = json.load(f)
  with open(f"{out_dir}/kl_defaults.md") as f:
    markdown = f.read()
  return report, written, markdown


def test_tables_have_a_row_per_candidate(report):
  report, written, markdown = report
  assert written["skipped"] == {}
  assert set(written["tasks"]["regression"]["summary"]) == set(CANDIDATES)
  assert set(written["scales"]["table"]) == set(CANDIDATES)
  for name in CANDIDATES:  # the task table and the scale table
    assert markdown.count(f"| {name} |") == 2, name
  assert "eps is left at" in markdown
  assert written["tasks"]["regression"]["summary"] == report["tasks"]["regression"]["summary"]


def test_tuned_lr_is_the_sweeps_argmin(report):
  result = report[1]["tasks"]["regression"]
  lrs = CONFIG.learning_rates
  assert result["learning_rates"] == list(lrs) and len(set(lrs)) == CONFIG.num_lrs
  for name in CANDIDATES:
    means = {}
    for lr in lrs:
      runs = [r for r in result["sweep"] if r["candidate"] == name and r["lr"] == lr]
      assert sorted(r["seed"] for r in runs) == list(range(CONFIG.tuning_seeds))
      losses = [math.inf if r["train_loss"] is None else r["train_loss"] for r in runs]
      means[lr] = statistics.mean(losses)
    assert result["summary"][name]["tuned_lr"] == min(means, key=means.get), (name, means)
    assert result["summary"][name]["sweep"] == pytest.approx([means[lr] for lr in lrs])


def test_mean_and_std_come_from_the_seeds(report):
  result = report[1]["tasks"]["regression"]
  for name in CANDIDATES:
    summary = result["summary"][name]
    runs = [r for r in result["final"] if r["candidate"] == name]
    assert {r["lr"] for r in runs} == {summary["tuned_lr"]}
    assert sorted(r["seed"] for r in runs) == [100 + s for s in range(CONFIG.eval_seeds)]
    losses = [r["train_loss"] for r in runs]
    assert summary["mean"] == pytest.approx(statistics.mean(losses), rel=1e-9)
    assert summary["std"] == pytest.approx(statistics.stdev(losses), rel=1e-9)
    assert summary["std"] > 0  # the seeds differ
  best = result["best"]["all"]
  assert best["best"] == min(CANDIDATES, key=lambda n: result["summary"][n]["mean"])


def test_scale_table_at_c_1_is_a_plain_run(report):
  result, scales = report[1]["tasks"]["regression"], report[1]["scales"]
  for name in CANDIDATES:
    row = scales["table"][name]
    assert row["lr"] == result["summary"][name]["tuned_lr"]
    assert set(row["losses"]) == {str(c) for c in CONFIG.scales}
    same_run = [r for r in result["final"] if r["candidate"] == name and r["seed"] == 100]
    assert row["losses"]["1.0"] == same_run[0]["train_loss"]
  # A separate program only for KL-Shampoo: in (KL-)SOAP, Adam's elementwise scaling reads the
  # eigenbasis of the output layer's first, rank-one factor, whose null space XLA's rounding
  # orients differently in the two programs (a 5% change after 12 steps).
  lr = scales["table"]["kl_shampoo_ref"]["lr"]
  plain = plain_run("kl_shampoo_ref", CONFIG, lr, 100)
  assert scales["table"]["kl_shampoo_ref"]["losses"]["1.0"] == pytest.approx(plain, rel=1e-4)
  # Scaling the gradients reaches the optimizer: the reference KL-Shampoo is not invariant.
  losses = scales["table"]["kl_shampoo_ref"]["losses"]
  assert losses["0.01"] != pytest.approx(losses["1.0"], rel=1e-3)
