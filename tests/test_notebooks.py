"""The LM curves entry point (fast) and headless execution of the Colab notebooks (slow)."""

import csv
import json
import math
import pathlib
import statistics
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
COLABS = REPO_ROOT / "colabs"
CSV_COLUMNS = ["method", "seed", "step", "train_loss", "val_loss", "wall_seconds"]
METHODS = ("adamw", "shampoo", "soap", "kl_soap", "kl_shampoo", "kl_shampoo_ref", "psgd_kron")
TINY_MODEL_FLAGS = [
  "--num_layers=1",
  "--d_model=32",
  "--num_heads=2",
  "--seq_len=16",
  "--batch_size=4",
  "--num_val_batches=2",
  "--max_corpus_bytes=300000",
]


def _assert_nonempty_file(path: pathlib.Path) -> None:
  assert path.is_file(), f"missing {path}"
  assert path.stat().st_size > 0, f"empty {path}"


def _csv_rows(path: pathlib.Path) -> list[dict]:
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    assert reader.fieldnames == CSV_COLUMNS
    return list(reader)


def _final_val_losses(rows: list[dict], method: str) -> dict[int, float]:
  """Per seed: the validation loss at the last step of that seed's final run."""
  finals = {}
  for r in rows:
    if r["method"] == method and r["val_loss"]:
      finals[int(r["seed"])] = float(r["val_loss"])  # rows are in step order
  return finals


def test_lm_curves_main_tiny(tmp_path):
  """The entry point: tuning picks the argmin, seeds differ, mean ± std from the seeds' runs."""
  out_dir = tmp_path / "lm_curves"
  cmd = [
    sys.executable,
    "-m",
    "benchmarks.lm_curves",
    "--methods=adamw",
    "--seeds=2",
    "--steps=4",
    "--tune_steps=2",
    "--lr_grid=1e-3,3e-2",
    "--hparam_grid=adamw:b2=0.95",  # one value: one compiled step serves every run
    "--eval_every=2",
    "--noprogress",
    f"--out_dir={out_dir}",
    *TINY_MODEL_FLAGS,
  ]
  proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| adamw |" in proc.stdout

  for name in ("curves.csv", "summary.json", "curves.png", "results.md"):
    _assert_nonempty_file(out_dir / name)
  rows = _csv_rows(out_dir / "curves.csv")
  assert {r["method"] for r in rows} == {"adamw"}
  for seed in (0, 1):
    seed_rows = [r for r in rows if r["seed"] == str(seed)]
    assert [int(r["step"]) for r in seed_rows] == [1, 2, 3, 4]
    assert all(math.isfinite(float(r["train_loss"])) for r in seed_rows)
    assert [int(r["step"]) for r in seed_rows if r["val_loss"]] == [2, 4]
    walls = [float(r["wall_seconds"]) for r in seed_rows]
    assert walls == sorted(walls) and walls[0] > 0
  # A seed sets the initialisation and the batches: the seeds' curves differ from step 1.
  first = {r["seed"]: float(r["train_loss"]) for r in rows if r["step"] == "1"}
  assert first["0"] != first["1"]

  summary = json.loads((out_dir / "summary.json").read_text())
  assert summary["config"]["seeds"] == [0, 1] and summary["config"]["steps"] == 4
  adamw = summary["methods"]["adamw"]
  trials = adamw["tuning"]
  assert [(t["lr"], t["b2"]) for t in trials] == [(1e-3, 0.95), (3e-2, 0.95)]
  best = min(trials, key=lambda t: t["val_loss"])
  assert adamw["setting"] == {"lr": best["lr"], "b2": best["b2"]}
  finals = _final_val_losses(rows, "adamw")
  assert adamw["final_val_losses"] == pytest.approx([finals[0], finals[1]], abs=1e-6)
  assert adamw["final_val_loss_mean"] == pytest.approx(statistics.mean(finals.values()), abs=1e-6)
  assert adamw["final_val_loss_std"] == pytest.approx(statistics.stdev(finals.values()), abs=1e-6)
  assert adamw["final_val_loss_std"] > 0
  # AdamW is the reference: it reaches its own mean final loss at its last step.
  assert summary["target"]["val_loss"] == pytest.approx(adamw["final_val_loss_mean"])
  assert adamw["steps_to_target"] == pytest.approx(4)
  walls = [float(r["wall_seconds"]) for r in rows if r["step"] == "4"]
  assert adamw["seconds_to_target"] == pytest.approx(statistics.mean(walls), rel=1e-3)
  assert adamw["median_step_ms"] > 0
  row = next(line for line in proc.stdout.splitlines() if line.startswith("| adamw |"))
  mean, std = adamw["final_val_loss_mean"], adamw["final_val_loss_std"]
  assert f"{mean:.4f} ± {std:.4f}" in row and "(lr at grid edge)" in row  # 2 rates: an edge
  assert row in (out_dir / "results.md").read_text()


def _run_notebook(path: pathlib.Path, out_dir: pathlib.Path, steps: int, monkeypatch) -> None:
  nbclient = pytest.importorskip("nbclient")
  nbformat = pytest.importorskip("nbformat")
  monkeypatch.setenv("KL_PRECOND_NOTEBOOK_STEPS", str(steps))
  monkeypatch.setenv("KL_PRECOND_NOTEBOOK_OUT", str(out_dir))
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
    notebook,
    timeout=900,
    kernel_name="python3",
    resources={"metadata": {"path": str(path.parent)}},
  )
  client.execute()


@pytest.mark.slow
def test_quickstart_notebook(tmp_path, monkeypatch):
  _run_notebook(COLABS / "quickstart.ipynb", tmp_path, steps=5, monkeypatch=monkeypatch)
  _assert_nonempty_file(tmp_path / "quickstart_loss.png")
  _assert_nonempty_file(tmp_path / "quickstart_compare.png")


@pytest.mark.slow
def test_lm_curves_notebook(tmp_path, monkeypatch):
  _run_notebook(COLABS / "lm_curves.ipynb", tmp_path, steps=4, monkeypatch=monkeypatch)
  out_dir = tmp_path / "lm_curves"
  for name in ("curves.png", "curves.csv", "summary.json", "results.md"):
    _assert_nonempty_file(out_dir / name)
  _assert_nonempty_file(tmp_path / "lm_train_loss.png")
  summary = json.loads((out_dir / "summary.json").read_text())
  rows = _csv_rows(out_dir / "curves.csv")
  table = (out_dir / "results.md").read_text()
  # Every method that is available here ran, on every seed, with its own tuning trials.
  expected = [m for m in METHODS if m not in summary["skipped_methods"]]
  assert list(summary["methods"]) == expected and "adamw" in expected
  assert len({len(s["tuning"]) for s in summary["methods"].values()}) == 1
  for method, s in summary["methods"].items():
    finals = _final_val_losses(rows, method)
    assert sorted(finals) == summary["config"]["seeds"] == s["seeds"]
    assert s["final_val_loss_mean"] == pytest.approx(statistics.mean(finals.values()), abs=1e-6)
    assert s["final_val_loss_std"] == pytest.approx(statistics.stdev(finals.values()), abs=1e-6)
    best = min(s["tuning"], key=lambda t: t["val_loss"])
    assert s["setting"] == {k: v for k, v in best.items() if k != "val_loss"}
    assert f"| {method} |" in table
