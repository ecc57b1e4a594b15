"""The compiled update does not grow with the depth of a model of repeated layers (issue #27).

Blocks of equal shape are stacked into buckets, so the decompositions, norms and checks of a
step are one set per bucket whatever the depth. What is left per leaf is elementwise work on
that leaf and cutting it into its bucket's rows and back. AdamW does one elementwise pass per
leaf, so its growth per added leaf is the unit: every method may add at most three AdamW
leaves' worth of instructions per leaf, for (1) an Adam-like moment update where it keeps one per
leaf (grafting's magnitude), (2) gathering the gradient's blocks into buckets and scattering the
direction back, and (3) with grafting, gathering the direction and magnitude again for the
per-block norms. A per-tree reduction copied into every leaf's fusion (XLA does that with a
chain of ``and``s over per-leaf flags) or a per-leaf decomposition grows far faster: Shampoo's
grafting did, at ~10x this bound per leaf.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

import kl_precond as kp
from tests import hlo

WIDTH = 16
# Axes above this are cut into blocks (Shampoo family) or left unrotated (SOAP, KL).
MAX_DIM = 32
SHALLOW, DEEP = 2, 8
LEAVES_PER_LAYER = 6


def _tree(layers: int) -> dict:
  w = WIDTH
  layer = {
    "qkv": (w, 3 * w),
    "o": (w, w),
    "up": (w, 4 * w),
    "down": (4 * w, w),
    "gain_1": (w,),
    "gain_2": (w,),
  }
  return {f"layer_{i}": {k: jnp.zeros(s) for k, s in layer.items()} for i in range(layers)}


def _instructions(opt: optax.GradientTransformation, layers: int) -> int:
  params = _tree(layers)
  state = jax.eval_shape(opt.init, params)
  return hlo.instruction_count(jax.jit(opt.update).lower(params, state, params).compile().as_text())


def _per_leaf(opt: optax.GradientTransformation) -> float:
  added = (DEEP - SHALLOW) * LEAVES_PER_LAYER
  return (_instructions(opt, DEEP) - _instructions(opt, SHALLOW)) / added


@pytest.fixture(scope="module")
def adamw_per_leaf() -> float:
  return _per_leaf(optax.adamw(1e-3))


slow = pytest.mark.slow
METHODS = {
  "shampoo": (kp.shampoo, {}),
  "kl_shampoo": (kp.kl_shampoo, {}),
  "shampoo_sgd_graft": (kp.shampoo, {"grafting_type": "sgd"}),
  "adamw_shampoo": (kp.adamw_shampoo, {}),
  "adamw_shampoo_one_sided": (kp.adamw_shampoo, {"exponents": (0.5, 0.0)}),
  "eigenvalue_corrected_shampoo": (kp.eigenvalue_corrected_shampoo, {}),
  "soap": (kp.soap, {}),
  "kl_soap": (kp.kl_soap, {}),
}
# The default suite compiles the one whose per-leaf work is largest (Shampoo grafts: an Adam
# moment and its own per-block norms per leaf); the slow job, every method.
DEFAULT = ("shampoo",)


@pytest.mark.parametrize(
  "name", [n if n in DEFAULT else pytest.param(n, marks=slow) for n in METHODS]
)
def test_update_size_grows_at_most_a_constant_per_leaf(name, adamw_per_leaf):
  factory, kwargs = METHODS[name]
  per_leaf = _per_leaf(factory(1e-3, max_precond_dim=MAX_DIM, **kwargs))
  assert adamw_per_leaf > 0
  assert per_leaf <= 3 * adamw_per_leaf, (name, per_leaf, adamw_per_leaf)


@slow
def test_compile_time_benchmark_smoke(tmp_path):
  """``benchmarks/compile_time.py`` (the seconds behind this module's instruction counts):
  fresh processes, medians, ratios to the first depth, the table."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  command = [sys.executable, "-m", "benchmarks.compile_time", "--smoke", "--methods=adamw"]
  done = subprocess.run(
    [*command, f"--out_dir={tmp_path}"], cwd=root, capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stderr[-2000:]
  with open(tmp_path / "compile_time.json") as f:
    report = json.load(f)
  (row,) = report["rows"]
  assert report["depths"] == [1, 2] and row["method"] == "adamw"
  assert row["ratio"]["1"] == 1.0
  assert row["ratio"]["2"] == row["compile_s"]["2"] / row["compile_s"]["1"] > 0
  # AdamW's update is elementwise per leaf: a second layer adds instructions.
  assert row["instructions"]["2"] > row["instructions"]["1"]
  table = (tmp_path / "compile_time.md").read_text()
  assert "| adamw |" in table and "2 / 1" in table
