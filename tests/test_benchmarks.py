"""The benchmark programs run in their ``--smoke`` settings and write sane outputs.

Each program runs as a subprocess, as a user would run it, into a temporary ``--out_dir``; the
tests check that the JSON, markdown and PNG exist and that every method this version of
kl_precond provides has finite numbers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

import kl_precond as kp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("adamw", "soap", "kl_soap", "kl_shampoo", "shampoo", "adamw_shampoo")
AVAILABLE = tuple(m for m in METHODS if m == "adamw" or hasattr(kp, m))


def _run(module: str, out_dir: str, *flags: str, timeout: int = 500) -> dict:
  command = [
    sys.executable,
    "-m",
    f"benchmarks.{module}",
    "--smoke",
    "--noprogress",
    f"--out_dir={out_dir}",
    *flags,
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  assert done.returncode == 0, done.stderr[-3000:]
  name = "peers" if module == "peers" else module
  for extension in ("json", "md", "png"):
    path = os.path.join(out_dir, f"{name}.{extension}")
    assert os.path.getsize(path) > 0, path
  with open(os.path.join(out_dir, f"{name}.json")) as f:
    return json.load(f)


def _finite(*values: float) -> bool:
  return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_step_time_smoke(tmp_path):
  report = _run("step_time", str(tmp_path))
  (config,) = report["configs"]
  assert set(config["results"]) == set(AVAILABLE)
  for method, s in config["results"].items():
    assert _finite(
      s["median_ms"],
      s["mean_ms"],
      s["amortised_ms"],
      s["compile_s"],
      s["ratio_median"],
      s["ratio_paired"],
      s["ratio_amortised"],
      s["final_loss"],
    ), (method, s)
    assert s["median_ms"] > 0 and s["steps_timed"] == config["steps"]
  assert config["results"]["adamw"]["ratio_median"] == 1.0
  assert set(config["skipped"]) == set(METHODS) - set(AVAILABLE)
  with open(tmp_path / "step_time.md") as f:
    table = f.read()
  assert all(f"| {m} |" in table for m in AVAILABLE)


def test_optimizer_only_smoke(tmp_path):
  report = _run("optimizer_only", str(tmp_path))
  (size,) = report["sizes"]
  assert set(size["methods"]) == set(AVAILABLE)
  assert _finite(size["matmul_ms"], size["matmul_gflops_per_s"], size["eigh_ms"], size["qr_ms"])
  for method, s in size["methods"].items():
    assert _finite(s["median_ms"]) and s["median_ms"] > 0, method
    if method != "adamw":
      assert s["matmul_flops"] > 0
      assert _finite(s["gflops_per_s"], s["fraction_of_matmul"], s["refresh_step_ms"]), (method, s)


def test_memory_smoke(tmp_path):
  report = _run("memory", str(tmp_path))
  assert [s["name"] for s in report["settings"]] == ["mlp", "transformer", "matrix 64×32"]
  for setting in report["settings"]:
    assert set(setting["methods"]) == set(AVAILABLE)
    for method, r in setting["methods"].items():
      assert r["measured_bytes"] > 0 and _finite(r["bytes_per_param"], r["ratio_adamw"])
      if method in ("adamw", "soap", "kl_soap", "kl_shampoo"):
        # The formulas leave out only the int32 counters.
        assert 0 <= r["measured_bytes"] - r["analytic_bytes"] <= 64, (setting["name"], method)


@pytest.mark.slow
def test_peers_smoke(tmp_path):
  """Creates (or reuses) the peers' venv from PyPI; minutes on a cold machine."""
  report = _run("peers", str(tmp_path), "--ours=soap", timeout=1200)
  peer_rows = [r for r in report["rows"] if "(peers)" in r["env"]]
  assert peer_rows and all("error" not in r for r in peer_rows), peer_rows
  for row in peer_rows:
    assert _finite(row["median_ms"], row["ratio_amortised"])
