"""The LM curves entry point (fast) and headless execution of the Colab notebooks (slow)."""

import csv
import json
import math
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
COLABS = REPO_ROOT / "colabs"
CSV_COLUMNS = ["method", "step", "train_loss", "val_loss", "wall_seconds"]
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


def test_lm_curves_main_tiny(tmp_path):
  out_dir = tmp_path / "lm_curves"
  cmd = [
    sys.executable,
    "-m",
    "benchmarks.lm_curves",
    "--steps=3",
    "--methods=adamw",
    "--no_sweep",
    "--eval_every=2",
    "--noprogress",
    f"--out_dir={out_dir}",
    *TINY_MODEL_FLAGS,
  ]
  proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| adamw |" in proc.stdout

  for name in ("curves.csv", "summary.json", "curves.png"):
    _assert_nonempty_file(out_dir / name)

  with open(out_dir / "curves.csv", newline="") as f:
    reader = csv.DictReader(f)
    assert reader.fieldnames == CSV_COLUMNS
    rows = list(reader)
  assert [int(r["step"]) for r in rows] == [1, 2, 3]
  assert {r["method"] for r in rows} == {"adamw"}
  assert all(math.isfinite(float(r["train_loss"])) for r in rows)
  val_losses = [float(r["val_loss"]) for r in rows if r["val_loss"]]
  assert len(val_losses) == 2  # steps 2 and 3 (eval_every=2, plus the final step)
  assert all(math.isfinite(v) for v in val_losses)
  walls = [float(r["wall_seconds"]) for r in rows]
  assert walls == sorted(walls) and walls[0] > 0

  summary = json.loads((out_dir / "summary.json").read_text())
  adamw = summary["methods"]["adamw"]
  assert adamw["lr"] == pytest.approx(3e-3)
  assert math.isfinite(adamw["final_val_loss"])
  assert adamw["median_step_ms"] > 0
  assert summary["config"]["steps"] == 3


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
  for name in ("curves.png", "curves.csv", "summary.json"):
    _assert_nonempty_file(tmp_path / "lm_curves" / name)
  _assert_nonempty_file(tmp_path / "lm_train_loss.png")
