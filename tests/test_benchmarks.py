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

import numpy as np
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


# The benchmarks run with one OpenBLAS thread unless the caller set a number (see step_time.py).
OPENBLAS_THREADS = os.environ.get("OPENBLAS_NUM_THREADS", "1")


def _finite(*values: float) -> bool:
  return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


# The two longest smoke runs (30-50 s each on 2 cores) run in CI's slow job, which gates too.
@pytest.mark.slow
def test_step_time_smoke(tmp_path):
  report = _run("step_time", str(tmp_path))
  assert report["environment"]["openblas_num_threads"] == OPENBLAS_THREADS
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


@pytest.mark.slow  # ~20 s on 2 cores; the default suite keeps the memory and step-time smokes
def test_optimizer_only_smoke(tmp_path):
  report = _run("optimizer_only", str(tmp_path))
  assert report["environment"]["openblas_num_threads"] == OPENBLAS_THREADS
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
def test_scaling_smoke(tmp_path):
  """Fake devices 1-8, and 1 and 2 processes joined by ``jax.distributed`` (one core each)."""
  report = _run("scaling", str(tmp_path))
  blocks = report["config"]["blocks"]
  rows = {(r["method"], r["devices"]): r for r in report["rows"]}
  assert not report["errors"], report["errors"]
  for method in ("eigh", "qr"):
    for n in (1, 2, 4, 8):
      row = rows[method, n]
      assert row["wall_status"] == "ok" and _finite(row["wall_ms"], row["per_device_ms"]), row
      assert row["local_batch"] == [blocks // n], row  # each device decomposes its share
    for n in [n for n in (1, 2) if n <= len(os.sched_getaffinity(0))]:  # a core per process
      row = rows[method, n]
      assert row["proc_status"] == "ok" and _finite(row["proc_wall_ms"]), row
      assert row["proc_local_batch"] == [blocks // n], row


def test_scaling_reports_processes_that_hang():
  """Workers killed at the timeout are reported as ``hung`` (in a subprocess: the module's absl
  flags would clash with other benchmarks' in this one)."""
  code = (
    "import dataclasses, json\n"
    "from benchmarks import scaling as sc\n"
    "config = dataclasses.replace(sc.ScalingConfig(**sc.SMOKE), timeout=0.5, methods=('qr',))\n"
    "errors = {}\n"
    "print(json.dumps([sc._run_processes(2, config, errors), sorted(errors)]))\n"
  )
  done = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert done.returncode == 0, done.stderr[-3000:]
  rows, errors = json.loads(done.stdout.strip().splitlines()[-1])
  assert rows == [{"method": "qr", "devices": 2, "proc_status": "hung"}]
  assert errors == ["processes/2"]


@pytest.mark.slow
def test_peers_smoke(tmp_path):
  """Creates (or reuses) the peers' venv from PyPI; minutes on a cold machine.

  The smoke setting times AdamW, two peers and two of ours in one head-to-head process.
  """
  report = _run("peers", str(tmp_path), timeout=1200)
  rows = report["rows"]
  assert all("error" not in r for r in rows), [r for r in rows if "error" in r]
  peer_rows = [r for r in rows if r["package"] not in ("kl_precond", "optax")]
  our_rows = [r for r in rows if r["package"] == "kl_precond"]
  assert [r["method"] for r in peer_rows] == ["dist_shampoo_b256_eigh", "dk_pro"]
  assert [r["method"] for r in our_rows] == ["soap@256", "shampoo@256"]
  # One worker process in the peers' venv: every row's ratio is to that process's AdamW.
  assert list(report["processes"]) == ["mlp/head-to-head"]
  process = report["processes"]["mlp/head-to-head"]
  assert process["ok"] and process["environment"]["jax"] == "0.5.3"
  assert process["environment"]["openblas_num_threads"] == OPENBLAS_THREADS  # the worker inherits
  (adamw,) = [r for r in rows if r["method"] == "adamw"]
  for row in peer_rows + our_rows:
    assert row["process"] == adamw["process"] == "mlp/head-to-head"
    assert row["env"] == adamw["env"] == "jax 0.5.3 (peers' venv)"
    assert _finite(row["median_ms"], row["amortised_ms"], row["ratio_amortised"], row["final_loss"])
    assert math.isclose(row["ratio_amortised"], row["amortised_ms"] / adamw["mean_ms"])
    assert math.isclose(row["ratio_median"], row["median_ms"] / adamw["median_ms"])
    assert row["adamw_median_ms"] == adamw["median_ms"] and row["steps_timed"] == 4
  # Verdicts: each peer against its equal-settings specs of ours, from the same process.
  verdicts = report["verdicts"]["comparisons"]
  assert {(v["peer"], v["ours"]) for v in verdicts} == {
    ("dist_shampoo_b256_eigh", "shampoo@256"),
    ("dk_pro", "soap@256"),
    ("dk_pro", "shampoo@256"),
  }
  by_method = {r["method"]: r for r in rows}
  for v in verdicts:
    assert v["same_process"] and v["ours_process"] == v["peer_process"] == "mlp/head-to-head"
    peer, ours = by_method[v["peer"]], by_method[v["ours"]]
    assert v["ours_ratio_amortised"] == ours["ratio_amortised"]
    assert v["faster_amortised"] == (ours["ratio_amortised"] < peer["ratio_amortised"])
    assert v["faster_median"] == (ours["ratio_median"] < peer["ratio_median"])
  with open(tmp_path / "peers.md") as f:
    text = f.read()
  assert "| task | peer | peer ×AdamW amortised (median) | ours |" in text
  assert "| mlp | dk_pro |" in text


def test_peers_specs_and_equal_settings():
  from benchmarks import peers

  assert set(peers.EQUAL_SETTINGS) == set(peers.PEERS)
  assert peers.EQUAL_SETTINGS["dist_shampoo_b1024_eigh"] == ("shampoo@1024",)
  # The same blocks: distributed-kron's 256-blocks against ours in 256-blocks, PSGD's whole axes
  # against ours with whole axes.
  for peer in ("dk_pro", "dk_kron", "dk_kron_p0.1"):
    assert set(peers.EQUAL_SETTINGS[peer]) == {f"{m}@256" for m in peers.OURS}
  assert set(peers.EQUAL_SETTINGS["psgd_kron_p0.1"]) == set(peers.OURS)
  # The default run times every spec some peer is compared with (shampoo@1024 is shampoo here).
  timed = {peers.canonical(s, 10000, 1024) for s in peers.DEFAULT_OURS}
  wanted = {peers.canonical(s, 10000, 1024) for s in set().union(*peers.EQUAL_SETTINGS.values())}
  assert wanted == timed
  assert peers.parse_spec("shampoo@256", 10000) == ("shampoo", 256)
  assert peers.parse_spec("kl_soap", 10000) == ("kl_soap", 10000)
  for bad in ("adamw", "shampoo@", "shampoo@0", "soap@x", "muon"):
    with pytest.raises(ValueError):
      peers.parse_spec(bad, 10000)
  # A max_precond_dim at least the longest axis is one setting; below it, not.
  assert peers.canonical("shampoo", 10000, 1024) == peers.canonical("shampoo@1024", 10000, 1024)
  assert peers.canonical("soap", 10000, 1024) == peers.canonical("soap@1024", 10000, 1024)
  assert peers.canonical("shampoo@256", 10000, 1024) == ("shampoo", 256, "blocks")
  # SOAP at a plain max_precond_dim (step_time.json) leaves longer axes unrotated: not soap@256.
  assert peers.canonical("soap@256", 10000, 1024) == ("soap", 256, "blocks")
  assert peers.canonical("soap", 256, 1024, blocks=False) == ("soap", 256, "unrotated")
  assert peers.canonical("shampoo", 256, 1024, blocks=False) == ("shampoo", 256, "blocks")


@pytest.mark.parametrize("method", ["soap", "kl_soap", "kl_shampoo", "shampoo", "adamw_shampoo"])
def test_make_optimizer_blocks_split_every_method_into_blocks(method):
  """``blocks=True`` gives every method 256×256 factors on a 1024×512 matrix (8 blocks, two
  factors each); without it SOAP and the KL methods leave both axes unrotated (no factor at all),
  the Shampoo variants block. Factors are read from the estimators' states (the blocked Adam
  moments are square too)."""
  import jax
  import jax.numpy as jnp

  import kl_precond as kp
  from benchmarks import models

  params = {"w": jnp.zeros((1024, 512))}

  def factor_shapes(tx):
    is_node = lambda n: isinstance(n, (kp.FrobeniusState, kp.KLState))  # noqa: E731
    state = jax.eval_shape(tx.init, params)
    nodes = [n for n in jax.tree.leaves(state, is_leaf=is_node) if is_node(n)]
    return sorted(f.shape for n in nodes for f in n.factors if f is not None)

  blocked = factor_shapes(models.make_optimizer(method, 10, 256, blocks=True))
  assert blocked == [(8, 256, 256), (8, 256, 256)]
  plain = factor_shapes(models.make_optimizer(method, 10, 256))
  assert plain == (blocked if method in models.BLOCKING_BY_DEFAULT else [])


@pytest.mark.parametrize("method", [m for m in METHODS if m != "adamw"])
def test_optimizer_only_flop_counts_are_the_compiled_products(method):
  """``optimizer_only``'s FLOP count of a non-refresh update (``benchmarks/flop_counts.py``)
  equals the matrix products that the compiled update runs on every call (refresh branches
  excluded), each 2n³ on a square block."""
  import jax
  import jax.numpy as jnp

  from benchmarks import flop_counts, models
  from tests import hlo

  n = 32
  params = {"a": jnp.ones((n, n)), "b": jnp.ones((n, n))}  # one bucket of two blocks
  tx = models.make_optimizer(method, 10, max_precond_dim=10**6)
  text = jax.jit(tx.update).lower(params, tx.init(params), params).compile().as_text()
  assert hlo.dots_on_every_call(text) * 2 * n**3 == flop_counts.update_flops(method, n, n)


def test_peers_json_rows_from_step_time_keep_unrotated_soap_apart():
  """A step_time.json at max_precond_dim=256 built SOAP with its longer axes unrotated: its row
  is not named, keyed or matched as ``soap@256`` (256-blocks); its Shampoo row (blocks) is."""
  from benchmarks import peers

  summary = _fake_summary(1.5, 1.0)
  step_time = {
    "environment": {"jax": "0.10.2"},
    "settings": {"max_precond_dim": 256},
    "configs": [
      {
        "task": "transformer",
        "frequency": 10,
        "results": {"adamw": summary, "soap": summary, "shampoo": summary},
        "skipped": {},
      }
    ],
  }
  run = peers._Run(
    {"frequency": 10, "max_precond_dim": 10000}, {"largest_axis": {"transformer": 1024}}, 1
  )
  rows = {r["method"]: r for r in peers.json_rows(step_time, ["transformer"], 10, run, "s.json")}
  assert set(rows) == {"adamw", "soap (max_precond_dim=256)", "shampoo@256"}
  assert rows["soap (max_precond_dim=256)"]["canonical"] == ["soap", 256, "unrotated"]
  assert rows["shampoo@256"]["canonical"] == list(run.canonical("transformer", "shampoo@256"))
  # Against dk_pro (256-blocks) the unrotated SOAP row is not taken; the Shampoo row is.
  peer = dict(rows["adamw"], method="dk_pro", package="distributed-kron", process="p")
  result = peers.verdicts([*rows.values(), peer], run)
  assert {v["ours"] for v in result["comparisons"]} == {"shampoo@256"}
  assert {m["spec"] for m in result["not_compared"]} == set(peers.OURS_AT_256) - {"shampoo@256"}


def _fake_summary(ms: float, adamw_ms: float) -> dict:
  return {
    "median_ms": ms,
    "mean_ms": ms,
    "amortised_ms": ms,
    "refresh_ms": float("nan"),
    "final_loss": 2.0,
    "ratio_median": ms / adamw_ms,
    "ratio_amortised": ms / adamw_ms,
  }


def test_peers_fixed_probability_kron_counts_only_at_its_update_period():
  """Kron with p = 0.03 updates every 33 steps on average: against ours at f = 10 it is listed
  but not counted; at f = 33 it is counted, and p = 0.1 is counted at f = 10 only."""
  from benchmarks import peers

  assert peers.update_period("dk_kron_p0.1") == peers.update_period("psgd_kron_p0.1") == 10
  assert peers.update_period("dk_kron_p0.03") == 33
  assert peers.update_period("dk_kron") is peers.update_period("dist_shampoo_b256_eigh") is None

  def row(method, package, ratio):
    out = {"task": "transformer", "method": method, "package": package, "process": "p", "env": "e"}
    out.update(ratio_amortised=ratio, ratio_median=ratio)
    if package == "kl_precond":
      out["canonical"] = list(peers.canonical(method, 10000, 1024))
    return out

  rows = [
    row("dk_kron_p0.1", "distributed-kron", 1.1),
    row("dk_kron_p0.03", "distributed-kron", 1.05),
    row("dk_kron", "distributed-kron", 1.5),
    row("shampoo@256", "kl_precond", 1.08),
  ]
  for frequency, counted in ((10, {"dk_kron_p0.1", "dk_kron"}), (33, {"dk_kron_p0.03", "dk_kron"})):
    run = peers._Run(
      {"frequency": frequency, "max_precond_dim": 10000}, {"largest_axis": {"transformer": 1024}}, 1
    )
    comparisons = peers.verdicts(rows, run)["comparisons"]
    assert {v["peer"] for v in comparisons} == {"dk_kron_p0.1", "dk_kron_p0.03", "dk_kron"}
    assert {v["peer"] for v in comparisons if v["equal_rate"]} == counted


def _driver_settings(tmp_path, **overrides) -> dict:
  """The settings ``peers.driver`` takes, for a driver test with a fake worker."""
  settings = {
    "warmup": 1,
    "steps": 2,
    "chunk": 1,
    "progress": False,
    "call_timeout": 60.0,
    "max_precond_dim": 10000,
    "sequential_eigh": False,
    "out_dir": str(tmp_path),
    "ours_json": "",
    "peer_venv": "unused",
    "combined": True,
  }
  return dict(settings, **overrides)


def test_peers_fallback_when_head_to_head_hangs(tmp_path, monkeypatch):
  """The head-to-head worker hangs in one of ours: one worker per peer (with only its
  equal-settings specs, without the method that hung), then that method alone; the verdicts
  take ours from the peer's own process where they can."""
  from benchmarks import peers

  times = {"adamw": 1.0, "dist_shampoo_b256_eigh": 2.0, "dk_pro": 3.0, "soap@256": 1.5}
  times["shampoo@256"] = 2.5
  calls = []

  def fake_worker(python, task, peer_names, specs, settings, timeout, **kwargs):
    calls.append((list(peer_names), list(specs)))
    if len(calls) == 1:
      return {"hung": "soap@256 call 3", "error": "soap@256 call 3: no result", "wall_seconds": 1.0}
    names = ["adamw", *peer_names, *specs]
    return {
      "environment": {"jax": "0.5.3", "optax": "0.2.8"},
      "results": {n: _fake_summary(times[n], times["adamw"]) for n in names},
      "wall_seconds": 1.0,
    }

  monkeypatch.setattr(peers, "run_worker", fake_worker)
  monkeypatch.setattr(peers, "ensure_venv", lambda path: {"python": "python"})
  settings = _driver_settings(tmp_path, frequency=2, smoke=True)
  specs = ["soap@256", "shampoo@256"]
  report = peers.driver(
    ["mlp"], ["dist_shampoo_b256_eigh", "dk_pro"], specs, settings, "", 10, False
  )
  assert calls == [
    (["dist_shampoo_b256_eigh", "dk_pro"], ["soap@256", "shampoo@256"]),
    (["dist_shampoo_b256_eigh"], ["shampoo@256"]),
    (["dk_pro"], ["shampoo@256"]),
    ([], ["soap@256"]),
  ]
  failed = report["processes"]["mlp/head-to-head"]
  assert not failed["ok"] and failed["culprit"] == "soap@256"
  assert all(r["process"] != "mlp/head-to-head" for r in report["rows"])
  verdicts = {(v["peer"], v["ours"]): v for v in report["verdicts"]["comparisons"]}
  assert set(verdicts) == {
    ("dist_shampoo_b256_eigh", "shampoo@256"),
    ("dk_pro", "shampoo@256"),
    ("dk_pro", "soap@256"),
  }
  assert verdicts["dk_pro", "shampoo@256"]["same_process"]
  assert verdicts["dk_pro", "soap@256"]["ours_process"] == "mlp/retry:soap@256"
  assert not verdicts["dk_pro", "soap@256"]["same_process"]
  slower = verdicts["dist_shampoo_b256_eigh", "shampoo@256"]
  assert not slower["faster_amortised"] and not slower["faster_median"]
  assert (
    verdicts["dk_pro", "soap@256"]["faster_amortised"]
    and verdicts["dk_pro", "soap@256"]["faster_median"]
  )
  text = (tmp_path / "peers.md").read_text()
  assert "| mlp | dk_pro | 3.00 (3.00) | soap@256 † | 1.50 (1.50) | yes | yes |" in text
  assert "fell back to one worker per peer (culprit: soap@256)" in text


def test_peers_in_this_venv_runs_workers_here_with_the_peer_copies(tmp_path, monkeypatch):
  """``--in_this_venv``: no peers' venv is made; every worker is this interpreter with the peer
  packages' copies on its PYTHONPATH, and the rows and table say so."""
  import sys

  from benchmarks import peers

  calls = []

  def fake_worker(python, task, peer_names, specs, settings, timeout, **kwargs):
    calls.append((python, kwargs.get("pythonpath")))
    names = ["adamw", *peer_names, *specs]
    times = {"adamw": 1.0, "psgd_kron_p0.1": 1.2, "soap": 1.3}
    return {
      "environment": {"jax": "0.10.2", "optax": "0.2.8"},
      "results": {n: _fake_summary(times[n], 1.0) for n in names},
      "wall_seconds": 1.0,
    }

  def no_venv(path):
    raise AssertionError("the peers' venv must not be made with --in_this_venv")

  monkeypatch.setattr(peers, "run_worker", fake_worker)
  monkeypatch.setattr(peers, "ensure_venv", no_venv)
  copies = str(tmp_path / "copies")
  monkeypatch.setattr(
    peers, "ensure_current_jax_copies", lambda path: {"path": copies, "packages": ["x==1"]}
  )
  settings = _driver_settings(
    tmp_path, frequency=10, smoke=False, peer_venv=str(tmp_path / "venv"), in_this_venv=True
  )
  report = peers.driver(["transformer"], ["psgd_kron_p0.1"], ["soap"], settings, "v", 10, False)
  assert calls == [(sys.executable, copies)]
  assert {r["env"] for r in report["rows"]} == {"jax 0.10.2 (this venv)"}
  (verdict,) = report["verdicts"]["comparisons"]
  assert verdict["peer"] == "psgd_kron_p0.1" and not verdict["faster_amortised"]
  text = (tmp_path / "peers.md").read_text()
  assert f"in this venv (its jax; peer packages from `{copies}`" in text
  assert "jax 0.5.3 venv" not in text


@pytest.mark.parametrize("name", ["shampoo"])
def test_make_optimizer_variants_are_the_options_they_name(name):
  """``+qr`` and ``+kl`` give the same updates as the factory with ``refresh="qr"`` and
  ``kl_factors=True``, and differ from the plain method; unknown variants are refused."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from benchmarks import models

  params = {"w": jnp.ones((6, 4)) * 0.1}
  grads = [{"w": jnp.asarray(np.random.default_rng(t).standard_normal((6, 4)))} for t in range(4)]

  def run(tx):
    state, step, out = tx.init(params), jax.jit(tx.update), None
    for g in grads:
      out, state = step(g, state, params)
    return np.asarray(out["w"])

  factory = getattr(kp, name)
  kwargs = {"grafting_type": "adam"} if name == "shampoo" else {}
  plain = run(models.make_optimizer(name, 2, 64))
  for variant, option in (("qr", {"refresh": "qr"}), ("kl", {"kl_factors": True})):
    ours = run(models.make_optimizer(f"{name}+{variant}", 2, 64))
    expected = run(
      factory(
        models.LEARNING_RATE, precondition_frequency=2, max_precond_dim=64, **option, **kwargs
      )
    )
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    assert np.max(np.abs(ours - plain)) > 1e-6 * np.max(np.abs(plain))
  with pytest.raises(LookupError, match="variant"):
    models.make_optimizer(f"{name}+bogus", 2, 64)
  with pytest.raises(LookupError, match="variant"):
    models.make_optimizer("soap+kl", 2, 64)


# ---------------------------------------------------------------------------------------------
# The main job, benchmarks/lm_curves.py: its bookkeeping, without training (the entry point
# itself runs in tests/test_notebooks.py::test_lm_curves_main_tiny).
# ---------------------------------------------------------------------------------------------


def _lm_run(method: str, seed: int, vals: list[float], lr: float = 1e-2, diverge: bool = False):
  """A fake ``lm_curves.RunResult``: validation every 10 steps, 5 ms per step."""
  from benchmarks import lm_curves

  rows = []
  for step in range(1, 10 * len(vals) + 1):
    val = vals[step // 10 - 1] if step % 10 == 0 else None
    train = math.nan if diverge and step == 10 * len(vals) else 2.0
    rows.append(dict(step=step, train_loss=train, val_loss=val, wall=0.005 * step))
  setting = {"lr": lr, "b2": 0.95}
  return lm_curves.RunResult(method, setting, seed, rows, [0.005] * len(rows), 1.0)


def test_lm_curves_table_rows_are_seed_means_and_crossings():
  """One row per method; mean ± std (sample std) from the per-seed final losses; steps and
  seconds to AdamW's mean final loss on the seed-mean curve, interpolated; "not reached"."""
  import statistics

  from benchmarks import lm_curves

  runs = {
    "adamw": [_lm_run("adamw", 0, [3.0, 2.0, 1.6]), _lm_run("adamw", 1, [3.0, 2.2, 1.8])],
    "soap": [_lm_run("soap", 0, [2.5, 1.5, 1.2]), _lm_run("soap", 1, [2.7, 1.7, 1.4])],
    "kl_soap": [_lm_run("kl_soap", 0, [3.5, 3.0, 2.9]), _lm_run("kl_soap", 1, [3.4, 3.1, 2.8])],
  }
  target = statistics.mean([1.6, 1.8])
  summary = {
    "config": {"seeds": [0, 1]},
    "target": {"method": "adamw", "val_loss": target},
    "methods": {m: lm_curves.method_summary(r, [], target) for m, r in runs.items()},
  }
  for method, method_runs in runs.items():
    s = summary["methods"][method]
    finals = [r.evals()[-1]["val_loss"] for r in method_runs]
    assert s["final_val_losses"] == finals
    assert s["final_val_loss_mean"] == pytest.approx(statistics.mean(finals))
    assert s["final_val_loss_std"] == pytest.approx(statistics.stdev(finals))
    assert s["median_step_ms"] == pytest.approx(5.0)
  adamw, soap, kl_soap = (summary["methods"][m] for m in ("adamw", "soap", "kl_soap"))
  assert adamw["steps_to_target"] == pytest.approx(30)
  assert adamw["seconds_to_target"] == pytest.approx(0.15)
  # SOAP's mean curve 2.6, 1.6, 1.3 crosses 1.7 a tenth of the way from step 20 back to 10.
  assert soap["steps_to_target"] == pytest.approx(19)
  assert soap["seconds_to_target"] == pytest.approx(0.095)
  # Seed 0 (2.5, 1.5) crosses at 18; seed 1 reaches 1.7 exactly at step 20.
  assert soap["steps_to_target_per_seed"] == pytest.approx([18, 20])
  assert kl_soap["steps_to_target"] is None and kl_soap["steps_to_target_per_seed"] == [None] * 2
  table = lm_curves.markdown_table(summary).splitlines()
  assert len(table) == 2 + 3
  for line, method in zip(table[2:], runs, strict=True):
    s = summary["methods"][method]
    assert line.startswith(f"| {method} | lr=1.0e-02, b2=0.95 |")
    assert f"| {s['final_val_loss_mean']:.4f} ± {s['final_val_loss_std']:.4f} |" in line
  assert f"| 19 | {0.095:.1f} |" in table[3] and "| not reached | not reached |" in table[4]


def test_lm_curves_diverged_seed_makes_the_mean_nan():
  from benchmarks import lm_curves

  runs = [_lm_run("soap", 0, [2.0, 1.5]), _lm_run("soap", 1, [2.0, math.nan], diverge=True)]
  s = lm_curves.method_summary(runs, [], None)
  assert s["diverged_seeds"] == [1] and math.isnan(s["final_val_loss_mean"])
  assert "diverged" in lm_curves.markdown_table(
    {"config": {"seeds": [0, 1]}, "methods": {"soap": s}}
  )


def test_lm_curves_tuning_picks_the_argmin_of_an_equal_grid():
  from benchmarks import lm_curves

  trials = [({"lr": 1e-3, "b2": 0.95}, 2.0), ({"lr": 1e-2, "b2": 0.99}, 1.5)]
  trials += [({"lr": 3e-2, "b2": 0.95}, math.nan), ({"lr": 1e-2, "b2": 0.95}, 1.7)]
  assert lm_curves.choose_setting(trials) == {"lr": 1e-2, "b2": 0.99}
  assert not lm_curves.lr_at_grid_edge(1e-2, trials)  # flagged in the table when it is
  assert lm_curves.lr_at_grid_edge(3e-2, trials) and lm_curves.lr_at_grid_edge(1e-3, trials)
  failed = [({"lr": 1e-2, "b2": 0.9}, math.inf), ({"lr": 1e-3, "b2": 0.9}, math.nan)]
  assert lm_curves.choose_setting(failed) == {"lr": 1e-3, "b2": 0.9}
  config = lm_curves.ExperimentConfig()
  grids = {m: lm_curves.tuning_grid(m, config) for m in lm_curves.METHODS}
  assert len({len(g) for g in grids.values()}) == 1 and len(grids["adamw"]) == 6
  for method, grid in grids.items():
    assert {tuple(s) for s in grid} == {("lr", lm_curves.SECOND_AXES[method])}
  assert grids["psgd_kron"][0] == {"lr": 3e-4, "preconditioner_init_scale": 30.0}
  unequal = lm_curves.ExperimentConfig(
    methods=("adamw", "soap"), lr_grids={"adamw": (1e-3,)}, out_dir="/nonexistent"
  )
  with pytest.raises(ValueError, match="same number of tuning trials"):
    lm_curves.run_experiment(unequal)


def test_lm_curves_flags_presets_and_seeds():
  """``--preset`` sets the sizes, explicit flags override them; ``--seeds`` N or a list."""
  from absl import flags

  from benchmarks import lm_curves

  def parse(*argv):
    flag_values = flags.FlagValues()
    lm_curves.define_flags(flag_values)
    flag_values(["lm_curves", *argv])
    return lm_curves.config_from_flags(flag_values)

  default, long = parse(), parse("--preset=long")
  assert default == lm_curves.preset_config("default") and default.seeds == (0, 1, 2)
  assert long == lm_curves.preset_config("long")  # the preset's own grids survive the flags
  assert long.steps >= 3 * default.steps and long.tune_steps > default.tune_steps
  merged = parse("--preset=long", "--lr_grid=soap=1e-3/2e-3")
  assert {
    m: [t["lr"] for t in lm_curves.tuning_grid(m, merged)][::2] for m in ("soap", "adamw")
  } == {
    "soap": [1e-3, 2e-3],
    "adamw": list(lm_curves.PRESETS["long"]["lr_grids"]["adamw"]),
  }
  assert long.model.num_layers > default.model.num_layers
  assert long.model.d_model > default.model.d_model
  custom = parse("--preset=long", "--steps=7", "--d_model=96", "--seeds=0,5", "--no_tune")
  assert (custom.steps, custom.model.d_model, custom.model.num_layers) == (7, 96, 4)
  assert custom.seeds == (0, 5) and not custom.tune and custom.tune_steps == long.tune_steps
  assert lm_curves.parse_seeds("7,") == (7,) and lm_curves.parse_seeds("1") == (0,)
  grid = parse("--hparam_grid=psgd_kron:preconditioner_lr=0.05/0.1", "--lr_grid=adamw=1e-3/2e-3")
  assert grid.hparam_grids == {"psgd_kron": ("preconditioner_lr", (0.05, 0.1))}
  assert lm_curves.tuning_grid("adamw", grid) == [
    {"lr": lr, "b2": b2} for lr in (1e-3, 2e-3) for b2 in (0.95, 0.99)
  ]
  assert "gpu" in lm_curves.PRESETS


def test_lm_curves_kl_shampoo_ref_is_the_authors_setting(monkeypatch):
  """``kl_shampoo_ref`` passes ``eigenvalue_init="constant", clamp="absolute"``; it is skipped
  while ``kp.kl_shampoo`` has no such options."""
  from benchmarks import lm_curves

  calls = []

  def fake_kl_shampoo(learning_rate, *, eigenvalue_init="eigh", clamp="relative", **kwargs):
    calls.append(dict(eigenvalue_init=eigenvalue_init, clamp=clamp, **kwargs))
    return kp.soap(learning_rate)

  monkeypatch.setattr(kp, "kl_shampoo", fake_kl_shampoo)
  lm_curves.make_optimizer("kl_shampoo_ref", 1e-3, {"b2": 0.99})
  lm_curves.make_optimizer("kl_shampoo", 1e-3, {"b2": 0.99})
  ref, default = calls
  assert (ref["eigenvalue_init"], ref["clamp"], ref["b2"]) == ("constant", "absolute", 0.99)
  assert (default["eigenvalue_init"], default["clamp"]) == ("eigh", "relative")
  assert ref["precondition_frequency"] == 10 and ref["weight_decay"] == 0.01

  monkeypatch.setattr(kp, "kl_shampoo", lambda learning_rate, **kwargs: None)
  assert "eigenvalue_init" in lm_curves.unavailable_reason("kl_shampoo_ref")
  assert lm_curves.unavailable_reason("kl_shampoo") is None


def test_lm_curves_psgd_kron_settings(monkeypatch):
  """Kron gets the common weight decay and update probability 1 / precondition_frequency."""
  import optax

  from benchmarks import lm_curves, psgd_compat

  calls = []

  def fake_kron(learning_rate, **kwargs):
    calls.append(kwargs)
    return optax.identity()

  monkeypatch.setattr(psgd_compat, "import_kron", lambda: fake_kron)
  monkeypatch.setattr(psgd_compat, "kron_unavailable", lambda: None)
  lm_curves.make_optimizer("psgd_kron", 1e-3, {"b1": 0.95}, weight_decay=0.02)
  lm_curves.make_optimizer("psgd_kron", 1e-3, precondition_frequency=4)
  assert calls[0] == dict(weight_decay=0.02, preconditioner_update_probability=0.1, b1=0.95)
  assert calls[1]["preconditioner_update_probability"] == 0.25


def test_lm_curves_psgd_kron_imports_on_this_optax():
  """psgd-jax 0.2.9 imports ``optax._src.clipping``; the shim makes it import unchanged."""
  import importlib.util

  from benchmarks import lm_curves, psgd_compat

  if importlib.util.find_spec("psgd_jax") is None:
    pytest.skip("psgd-jax is not installed")
  assert psgd_compat.kron_unavailable() is None
  assert lm_curves.unavailable_reason("psgd_kron") is None
  import jax.numpy as jnp

  tx = lm_curves.make_optimizer("psgd_kron", 1e-3, {"b1": 0.9})
  state = tx.init({"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))})
  assert "Qs_preconditioners" in state[1][0]  # clip_by_global_norm, then kron's own state


@pytest.mark.slow  # compiles a train step (~6 s)
def test_lm_curves_settings_with_the_same_program_share_one_compilation():
  """``Trainer.compiled``: one compilation per distinct lowered program (here ``b1=0.9`` is
  AdamW's default, so both settings lower to the same program)."""
  import numpy as np

  from benchmarks import lm_curves, lm_data, lm_model

  config = lm_curves.ExperimentConfig(
    model=lm_model.ModelConfig(seq_len=8, d_model=16, num_layers=1, num_heads=2), batch_size=2
  )
  data = (np.arange(2000) % 251).astype(np.uint8)
  example = lm_data.sample_batch(data, np.random.default_rng(0), 2, 8)
  trainer = lm_curves.Trainer(config, example)
  first = {"b2": 0.95}
  step, seconds = trainer.compiled("adamw", first, trainer.init_state("adamw", first, 0))
  same = {"b2": 0.95, "b1": 0.9}
  again, no_seconds = trainer.compiled("adamw", same, trainer.init_state("adamw", same, 1))
  assert seconds > 0 and no_seconds == 0.0 and again is step
  assert list(trainer.compile_seconds) == ["adamw"]
  state = trainer.init_state("adamw", first, 0)
  (params, _), loss = step(state, *example, np.float32(1e-3))
  assert math.isfinite(float(loss)) and math.isfinite(trainer.val_loss(params, [example]))


def test_lm_curves_merge_recomputes_the_target_from_the_merged_runs(tmp_path):
  """Runs made by separate processes merge into one report: AdamW's mean final loss is the
  target, and each method's steps to it come from its own curves (linear between evaluations)."""
  from benchmarks import lm_curves

  config = {"seeds": [0, 1], "steps": 20, "model": {"d_model": 8}, "methods": [], "out_dir": ""}
  curves = {  # (method, seed) -> val loss at steps 10 and 20
    ("adamw", 0): (2.6, 2.0),
    ("adamw", 1): (2.7, 2.2),
    ("soap", 0): (2.5, 1.9),
    ("soap", 1): (2.2, 2.0),
    ("kl_soap", 0): (2.4, 1.8),
    ("kl_soap", 1): (2.4, 1.8),
  }

  def write(method, **config_changes):
    out = tmp_path / method
    out.mkdir()
    with open(out / "curves.csv", "w") as f:
      f.write(",".join(lm_curves.CSV_COLUMNS) + "\n")
      for (m, seed), vals in curves.items():
        if m == method:
          for step, val in zip((10, 20), vals, strict=True):
            f.write(f"{m},{seed},{step},{val},{val},{step / 10}\n")
    finals = [curves[(method, s)][1] for s in (0, 1)]
    entry = {
      "setting": {"lr": 1e-3},
      "tuning": [{"lr": 1e-3, "val_loss": 3.0}],
      "final_val_loss_mean": float(np.mean(finals)),
      "final_val_loss_std": float(np.std(finals, ddof=1)),
      "diverged_seeds": [],
      "median_step_ms": 1.0,
      "lr_at_grid_edge": False,
      "steps_to_target": None,  # as a run without AdamW writes it
      "seconds_to_target": None,
      "steps_to_target_per_seed": [],
      "mean_curve": {
        "steps": [10.0, 20.0],
        "val_mean": [float(v) for v in np.mean([curves[(method, s)] for s in (0, 1)], axis=0)],
        "val_std": [0.1, 0.1],
        "wall_mean": [1.0, 2.0],
      },
    }
    summary = {
      "config": {**config, **config_changes, "methods": [method], "out_dir": str(out)},
      "target": None,
      "methods": {method: entry},
      "wall_seconds": {"total": 1.0},
    }
    (out / "summary.json").write_text(json.dumps(summary))
    return str(out)

  adamw, soap = write("adamw"), write("soap")
  merged = lm_curves.merge_outputs([soap, adamw], str(tmp_path / "all"))
  assert merged["target"] == {"method": "adamw", "val_loss": pytest.approx(2.1)}
  assert list(merged["methods"]) == ["adamw", "soap"]  # METHODS order
  s = merged["methods"]["soap"]
  # Seed 0: 2.5 -> 1.9 reaches 2.1 at 10 + 10 * 0.4 / 0.6; seed 1: 2.2 -> 2.0 at 10 + 10 * 0.5;
  # the seed mean 2.35 -> 1.95 at 10 + 10 * 0.25 / 0.4, at 1 + 0.625 seconds.
  assert s["steps_to_target_per_seed"] == pytest.approx([10 + 10 * 0.4 / 0.6, 15.0])
  assert s["steps_to_target"] == pytest.approx(16.25)
  assert s["seconds_to_target"] == pytest.approx(1.625)
  assert merged["methods"]["adamw"]["steps_to_target"] == pytest.approx(20.0)
  assert {p.name for p in (tmp_path / "all").iterdir()} == {
    "summary.json",
    "results.md",
    "curves.png",
  }
  assert "16" in (tmp_path / "all" / "results.md").read_text()
  with pytest.raises(ValueError, match="more than one"):
    lm_curves.merge_outputs([soap, soap], str(tmp_path / "twice"))
  other = write("kl_soap", steps=40)
  with pytest.raises(ValueError, match="another configuration"):
    lm_curves.merge_outputs([adamw, other], str(tmp_path / "mixed"))


def _smoke_param_shapes(width: int) -> list[tuple[int, ...]]:
  """The parameter shapes of width_scaling's smoke LM (vocabulary 64, 16 positions, one block)."""
  import jax

  from benchmarks import models

  config = models.TransformerConfig(vocab=64, seq_len=16, width=width, layers=1, heads=2)
  params = jax.eval_shape(lambda: models.transformer_init(jax.random.PRNGKey(0), config))
  return [tuple(x.shape) for x in jax.tree.leaves(params)]


# 231 s on 2 cores shared with other jobs (load 7-9): the 12 compilations of its 4 groups.
@pytest.mark.slow
def test_width_scaling_smoke(tmp_path):
  report = _run("width_scaling", str(tmp_path), timeout=900)
  settings = report["settings"]
  assert settings["widths"] == [32, 64] and settings["blocks"] == ["whole", "128", "16"]
  assert settings["methods"] == ["soap"]
  variants = settings["stagger_variants"]
  assert variants in ([False, True], [False])  # [False]: this kl_precond has no stagger_refresh
  assert bool(report["notes"]) == (variants == [False])
  # Whole axes only at width 32, where blocks of 128 (its longest axis, the MLP's 4·32) are the
  # whole-axes layout and are not run; at 64 they are blocks.
  groups = {(g["width"], g["layout"]): g for g in report["groups"]}
  assert list(groups) == [(32, "whole"), (32, "16"), (64, "128"), (64, "16")]
  skipped = {(s["width"], s["layout"]): s["reason"] for s in report["skipped_layouts"]}
  assert set(skipped) == {(32, "128"), (64, "whole")}
  assert "same as whole" in skipped[32, "128"] and "only up to width 32" in skipped[64, "whole"]
  runners = ["adamw"] + ["soap+stagger" if s else "soap" for s in variants]
  for (width, _), group in groups.items():
    shapes = _smoke_param_shapes(width)
    num_params = sum(math.prod(s) for s in shapes)
    assert group["num_params"] == num_params and group["largest_axis"] == 4 * width
    assert group["model_flops"] == 6 * num_params * 32  # 16 positions × 2 sequences
    assert list(group["results"]) == runners and not group["skipped"]
    adamw = group["results"]["adamw"]
    # optax.adamw: mu and nu in float32 (8 bytes per parameter) and one int32 count.
    assert adamw["state_bytes"] == 8 * num_params + 4
    assert adamw["ratio_median"] == 1.0 and adamw["update_flops"] == 0
    for name, s in group["results"].items():
      assert s["steps_timed"] == group["steps"] == 4, name
      assert 0 < s["median_ms"] <= s["p90_ms"] <= s["max_ms"], (name, s)
      assert s["max_over_p50"] == pytest.approx(s["max_ms"] / s["median_ms"])
      assert s["bytes_per_param"] == pytest.approx(s["state_bytes"] / num_params)
      ratios = (s["ratio_median"], s["ratio_paired"], s["ratio_amortised"])
      assert _finite(*ratios, s["final_loss"]) and min(ratios) > 0, (name, s)
      assert s["ratio_amortised"] == pytest.approx(s["amortised_ms"] / adamw["mean_ms"])
      if s["stagger"]:  # refreshes spread over the cycle: the mean over whole cycles
        assert s["amortised_ms"] == pytest.approx(s["mean_ms"])
      if name != "adamw":
        assert s["bytes_per_param"] > 8 and s["update_flops"] > 0, name
    if True in variants:  # staggering changes when, not what, is stored or computed
      on, off = group["results"]["soap+stagger"], group["results"]["soap"]
      assert on["state_bytes"] == off["state_bytes"]
      assert on["update_flops"] == off["update_flops"]
  # SOAP's state in blocks of 16: M and V (2 per parameter) and, per 16×16 block, two factors
  # and two bases of 16² (4 per parameter of a matrix); 1-D parameters Adam's 2; plus counters.
  for width in (32, 64):
    shapes = _smoke_param_shapes(width)
    matrix = sum(math.prod(s) for s in shapes if len(s) == 2)
    vector = sum(math.prod(s) for s in shapes if len(s) == 1)
    measured = groups[width, "16"]["results"]["soap"]["state_bytes"]
    assert 0 <= measured - 4 * (6 * matrix + 2 * vector) <= 64, (width, measured)
    # Its update: 3 units of 2mn(m + n) per 16×16 block, 192 FLOPs per matrix parameter.
    assert groups[width, "16"]["results"]["soap"]["update_flops"] == 192 * matrix
  # Larger blocks, more FLOPs per step (whole axes at 32: 4·32, 3·32, 64 > 16).
  for width, big in ((32, "whole"), (64, "128")):
    for key in ("update_flops", "refresh_flops_per_step", "decomposition_flops_per_step"):
      assert (
        groups[width, big]["results"]["soap"][key] > groups[width, "16"]["results"]["soap"][key]
      )
  # The pick at each width is the lowest ×AdamW amortised over its layouts and staggering.
  picks = {(r["width"], r["method"]): r for r in report["recommendations"]}
  assert set(picks) == {(32, "soap"), (64, "soap")}
  for (width, method), pick in picks.items():
    rows = [
      (s["ratio_amortised"], g["layout"], s["stagger"])
      for g in report["groups"]
      if g["width"] == width
      for s in g["results"].values()
      if s["method"] == method
    ]
    assert (pick["ratio_amortised"], pick["layout"], pick["stagger"]) == min(rows)
  text = (tmp_path / "width_scaling.md").read_text()
  assert "| 32 |  | 128 | (all) | not run: same as whole" in text
  assert "## Block size on CPU" in text and "## FLOPs: what changes on an accelerator" in text
  for (width, method), pick in picks.items():
    layout = "whole axes" if pick["layout"] == "whole" else f"blocks of {pick['layout']}"
    assert f"- d={width}: {method} → {layout}" in text
    assert f"- d={width} {method}: " in text.split("## FLOPs")[1]
  assert f"Commit: {report['provenance']['commit']}" in text


@pytest.mark.parametrize("method", ["soap", "kl_shampoo", "shampoo"])
@pytest.mark.parametrize("block", [None, 16])
def test_width_scaling_flop_blocks_are_the_optimizer_factors(method, block):
  """The blocks over which width_scaling counts FLOPs (``models.layout_config`` through
  ``kl_precond``'s layout) have the factors that the optimizer ``models.make_optimizer`` builds
  keeps in its state: the same sizes, as many."""
  import jax

  from benchmarks import flop_counts, models

  shapes = _smoke_param_shapes(64)
  params = [jax.ShapeDtypeStruct(s, np.float32) for s in shapes]
  size = block or 10000
  tx = models.make_optimizer(method, 10, size, blocks=block is not None)
  is_node = lambda n: isinstance(n, (kp.FrobeniusState, kp.KLState))  # noqa: E731
  state = jax.eval_shape(tx.init, params)
  nodes = [n for n in jax.tree.leaves(state, is_leaf=is_node) if is_node(n)]
  in_state = sorted(
    f.shape[-1] for n in nodes for f in n.factors if f is not None for _ in range(f.shape[0])
  )
  blocks = flop_counts.layout_blocks(shapes, models.layout_config(method, size, block is not None))
  counted = sorted([m for m, _, left, _ in blocks if left] + [n for _, n, _, r in blocks if r])
  assert counted == in_state and counted


def test_width_scaling_resume_keeps_groups_across_runs(tmp_path):
  """``--resume`` runs only the (width, layout) groups the JSON lacks, and keeps the groups a run
  does not use for a later one. ``measure`` is replaced by a fake (in a subprocess: the module's
  absl flags would clash with other benchmarks' in this one)."""
  code = f"""
import json
from benchmarks import width_scaling as ws

calls = []

def fake(spec):
  calls.append((spec["width"], spec["layout"]))
  results = {{}}
  for name in spec["methods"]:
    method, stagger = ws.models.split_name(name)
    ratio = 1.0 if method == "adamw" else 2.0 + int(spec["layout"] != "whole")
    results[name] = dict(method=method, stagger=stagger, median_ms=1.0, p90_ms=1.0, max_ms=1.0,
      max_over_p50=1.0, ratio_median=ratio, ratio_paired=ratio, ratio_amortised=ratio,
      bytes_per_param=8.0, update_flops=0.0, refresh_flops_per_step=0.0, update_over_model=0.0,
      refresh_over_model=0.0, decomposition_over_model=0.0, final_loss=1.0)
  return dict(width=spec["width"], layout=spec["layout"], results=results, skipped={{}},
    description="fake", num_params=1, environment={{"load_average_1_5_15": [0.0]}})

ws.measure = fake
def run(widths):
  calls.clear()
  report = ws.run(widths, ["whole", "16"], ["soap"], "off", [2], frequency=2, smoke=True,
    whole_max_width=64, resume=True, progress=False, out_dir={str(tmp_path)!r}, isolate=False)
  return [list(c) for c in calls], [[g["width"], g["layout"]] for g in report["groups"]]

out = [run([32]), run([64]), run([32, 64])]
with open({str(tmp_path / "width_scaling.json")!r}) as f:
  final = json.load(f)
print(json.dumps([out, len(final["other_groups"]), final["recommendations"]]))
"""
  done = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stderr[-3000:]
  out, others, picks = json.loads(done.stdout.strip().splitlines()[-1])
  d32, d64 = [[32, "whole"], [32, "16"]], [[64, "whole"], [64, "16"]]
  assert out[0] == [d32, d32]  # (groups run, groups in the report)
  assert out[1] == [d64, d64]  # the width-32 groups are kept aside, not rerun
  assert out[2] == [[], d32 + d64]  # everything from the JSON, nothing run
  assert others == 0
  assert [(p["width"], p["layout"], p["ratio_amortised"]) for p in picks] == [
    (32, "whole", 2.0),
    (64, "whole", 2.0),
  ]


def test_phase_statistics_see_the_refresh_spike_and_not_one_slow_call():
  """``heaviest_phase_over_median`` is the slowest phase's median over the median, and
  ``cycle_ms`` the mean of the phase medians: a refresh every f calls moves both, one slow call
  at another phase (the noise of a shared machine) moves neither, while it decides max / median.
  Expected values are worked out by hand from the planted times."""
  import types

  from benchmarks import models

  f, calls = 10, 30
  times = [0.1] * calls
  for i in range(calls):
    if i % f == 3:
      times[i] = 0.25  # the refresh phase: 2.5 x
  times[15] = 0.9  # one slow call at phase 5
  runner = types.SimpleNamespace(
    name="m", times=times, indices=list(range(calls)), compile_seconds=0.0, last_loss=0.0
  )
  summary = models.summarize(runner, None, f)
  assert summary["phase_medians_ms"][3] == pytest.approx(250.0)
  assert summary["phase_medians_ms"][5] == pytest.approx(100.0)
  assert summary["heaviest_phase_over_median"] == pytest.approx(2.5)
  assert summary["cycle_ms"] == pytest.approx((9 * 100.0 + 250.0) / 10)
  assert summary["max_ms"] / summary["median_ms"] == pytest.approx(9.0)

  # The same 30 calls, but a phase seen twice only: no phase statistics.
  few = types.SimpleNamespace(**{**vars(runner), "indices": list(range(calls))[:19]})
  few.times = times[:19]
  assert models.phase_medians(few.times, few.indices, f) == []
  assert math.isnan(models.summarize(few, None, f)["heaviest_phase_over_median"])

  # ratio_cycle: cycle over AdamW's cycle (AdamW here: 0.1 s every call).
  adamw = types.SimpleNamespace(**{**vars(runner), "name": "adamw", "times": [0.1] * calls})
  results = {"adamw": models.summarize(adamw, None, f), "m": summary}
  models.add_ratios(results, [adamw, runner], 5)
  assert results["m"]["ratio_cycle"] == pytest.approx(1.15)
  assert results["adamw"]["ratio_cycle"] == pytest.approx(1.0)
