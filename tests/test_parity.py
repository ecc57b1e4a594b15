"""Replays of the authors' golden trajectories (shared/golden) through ``kl_precond.parity``.

The folder comes from ``KL_PRECOND_GOLDEN_DIR`` (default ``../shared/golden`` beside the repo).
Under CI (``CI=true``) a missing folder fails; elsewhere these tests skip with the reason.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from kl_precond import parity

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = pathlib.Path(os.environ.get("KL_PRECOND_GOLDEN_DIR", REPO.parent / "shared" / "golden"))
# Classes the parity tool maps so far; every shared file of these classes is replayed.
IMPLEMENTED = {"SOAP", "KLOpt", "AdamWBF16"}


def _golden_files() -> list[pathlib.Path]:
  if not GOLDEN.is_dir():
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(f"golden folder {GOLDEN} is missing under CI")
    pytest.skip(f"golden folder {GOLDEN} not found (set KL_PRECOND_GOLDEN_DIR)")
  files = []
  for path in sorted(GOLDEN.glob("*.npz")):
    sidecar = json.loads(path.with_suffix(".json").read_text())
    if sidecar["reference"].get("class") in IMPLEMENTED:
      files.append(path)
  assert files, f"no golden file of {IMPLEMENTED} in {GOLDEN}"
  return files


@pytest.fixture(scope="module")
def golden_files() -> list[pathlib.Path]:
  return _golden_files()


@pytest.fixture(scope="module")
def golden_records(golden_files) -> dict[pathlib.Path, dict]:
  return {path: parity.check(path) for path in golden_files}


def test_every_golden_file_replays_within_tolerance(golden_records):
  for path, records in golden_records.items():
    judged = {name: r for name, r in records.items() if r["judged"]}
    assert judged, f"{path.name}: no well-posed tensor"
    for name, record in records.items():
      assert record["finite"], f"{path.name}/{name} is not finite"
      if record["judged"]:
        assert record["error_x64_vs_linalg64"] <= parity.TOLERANCE_X64, (path.name, name, record)
        assert record["error_f32_vs_params"] <= parity.TOLERANCE_F32, (path.name, name, record)


def test_well_posedness_matches_the_sidecar(golden_files):
  """Our rank test agrees with what the sidecar says of each tensor (where it says it)."""
  for path in golden_files:
    sidecar = json.loads(path.with_suffix(".json").read_text())
    notes = sidecar.get("well_posedness", {})
    ours = parity.well_posed(path)
    for name, text in notes.items():
      if text.startswith(("well-posed", "exact")):
        assert ours[name], (path.name, name, text)
      elif text.startswith("ill-posed"):
        assert not ours[name], (path.name, name, text)


def test_injected_first_basis_replays_rank_deficient_tensor(golden_files):
  """w_16x8's 16x16 factor is rank 8 at call 1; with the reference's first basis it replays."""
  candidates = []
  for path in golden_files:
    with np.load(path) as z:
      if "q0_linalg64/w_16x8/0" in z.files:
        candidates.append(path)
  assert candidates, "no golden file stores q0 for w_16x8"
  path = min(candidates, key=lambda p: p.stat().st_size)
  ours = parity.replay(path, x64=True, inject="q0")
  with np.load(path) as z:
    error = parity.relative_errors(ours["w_16x8"], z["params_linalg64/w_16x8"])
    unaided = parity.relative_errors(
      parity.replay(path, x64=True)["w_16x8"], z["params_linalg64/w_16x8"]
    )
  assert error <= parity.TOLERANCE_X64, (path.name, error)
  assert unaided > 1e3 * error  # the injection is what makes it replay


def test_replay_layout_matches_the_file(golden_files):
  path = golden_files[0]
  ours = parity.replay(path, x64=False)
  with np.load(path) as z:
    for name, trajectory in ours.items():
      assert trajectory.shape == z[f"params/{name}"].shape
      assert trajectory.dtype == np.float32


def test_cli_exit_status_and_json(golden_files, tmp_path):
  path = min(golden_files, key=lambda p: p.stat().st_size)
  done = subprocess.run(
    [sys.executable, "-m", "kl_precond.parity", str(path), "--json"],
    capture_output=True,
    text=True,
    check=False,
    cwd=REPO,
  )
  assert done.returncode == 0, done.stderr
  assert str(path) in json.loads(done.stdout)
  # A tampered trajectory must make the tool fail.
  with np.load(path) as z:
    arrays = {k: z[k] for k in z.files}
  name = next(n for n in map(str, arrays["param_names"]) if n in ("w_10x10", "t_4x6x5"))
  for prefix in ("params", "params_linalg64"):
    if f"{prefix}/{name}" in arrays:
      arrays[f"{prefix}/{name}"] = arrays[f"{prefix}/{name}"] * 1.01
  bad = tmp_path / path.name
  np.savez(bad, **arrays)
  bad.with_suffix(".json").write_text(path.with_suffix(".json").read_text())
  done = subprocess.run(
    [sys.executable, "-m", "kl_precond.parity", str(bad)],
    capture_output=True,
    text=True,
    check=False,
    cwd=REPO,
  )
  assert done.returncode == 1, done.stdout


def test_unknown_kwarg_is_refused():
  sidecar = {"reference": {"class": "KLOpt"}, "constructor_kwargs": {"lr": 1.0, "magic": 3}}
  with pytest.raises(ValueError, match="magic"):
    parity.recipe(sidecar)


@pytest.mark.parametrize(
  "kwargs",
  [
    {
      "using_damping": True,
      "normalize_grads": True,
      "weight_decay": 0.0,
      "shampoo_beta": -1,
      "precondition_frequency": 2,
      "init_factor": 0.01,
      "max_clamp_value": 12,
    },
    {"using_clamping": False, "using_klsoap": True},
  ],
)
def test_klopt_options_map_to_our_stages(kwargs):
  rule = parity.recipe({"reference": {"class": "KLOpt"}, "constructor_kwargs": kwargs})
  assert rule.skips_first_call and rule.decay_order == "after"
  assert rule.weight_decay == kwargs.get("weight_decay", 0.01)


def test_soap_options_map_to_layout():
  rule = parity.recipe(
    {
      "reference": {"class": "SOAP", "repo": "nikhilvyas/SOAP"},
      "constructor_kwargs": {
        "merge_dims": True,
        "max_precond_dim": 64,
        "precondition_1d": True,
        "data_format": "channels_last",
      },
    }
  )
  assert rule.layout.merge_small_dims and rule.layout.precondition_1d
  assert rule.layout.channels_last and rule.layout.max_precond_dim == 64
