# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Language-model training curves: a tuned, multi-seed comparison
#
# A small byte-level transformer (Flax NNX) is trained on the Python standard library's own
# source code, a corpus present on every machine, with AdamW, Shampoo (Adam grafting), SOAP,
# KL-SOAP, KL-Shampoo, KL-Shampoo in its authors' reference setting (`kl_shampoo_ref`) and, when
# `psgd-jax` is installed, PSGD Kron. Every method gets the same tuning budget (a grid of
# learning rate × one second hyperparameter, the same number of short one-seed trials each,
# best by validation loss), then runs its tuned setting on three seeds (a seed sets the model
# initialisation and the batch order). The table reports mean ± std over the seeds and how many
# steps and seconds each method needs to reach AdamW's final validation loss. All the logic
# lives in `benchmarks/lm_curves.py`; the same experiment runs from the command line with
# `python benchmarks/lm_curves.py --preset=...`.
#
# Presets: `default` (2-layer d128 model, 225-step final runs, about 18 minutes on 2 CPU
# cores), `long` (4-layer d192, 3× the steps; about 2.5 hours on a CPU) and `gpu` (4-layer
# d256, 128-byte context, batch 64, 1,000 steps: for a Colab GPU runtime, picked automatically
# when JAX sees a GPU).
#
# Environment variables (used by the tests): `KL_PRECOND_NOTEBOOK_STEPS` sets the number of
# training steps (below 100 selects a tiny model, two seeds and a 2-trial grid),
# `KL_PRECOND_NOTEBOOK_PRESET` the preset, `KL_PRECOND_NOTEBOOK_OUT` the output directory.

# %%
# ruff: noqa: E402  (notebook: imports follow the setup cells)
import sys

if "google.colab" in sys.modules:
  # Replace the placeholder with the published repository URL.
  # !git clone -q https://github.com/YOUR_ORG/kl_precond.git
  # %cd kl_precond
  # %pip install -q -e ".[benchmarks]"
  pass

# %%
import csv
import os
from pathlib import Path

import numpy as np
from IPython.display import Image, Markdown, display

here = Path.cwd().resolve()
REPO_ROOT = next(p for p in (here, *here.parents) if (p / "benchmarks" / "lm_curves.py").exists())
sys.path.insert(0, str(REPO_ROOT))

import jax
import matplotlib.pyplot as plt

from benchmarks import lm_curves, lm_model

STEPS = os.environ.get("KL_PRECOND_NOTEBOOK_STEPS")
TINY = STEPS is not None and int(STEPS) < 100
PRESET = os.environ.get("KL_PRECOND_NOTEBOOK_PRESET") or (
  "gpu" if jax.default_backend() == "gpu" else "default"
)
OUT_DIR = Path(os.environ.get("KL_PRECOND_NOTEBOOK_OUT", "outputs/notebooks"))
print(f"JAX backend: {jax.default_backend()}, preset: {PRESET}, steps: {STEPS}, tiny: {TINY}")

# %% [markdown]
# ## Configuration
#
# `ExperimentConfig` holds every knob of the command-line flags; `lm_curves.PRESETS` the
# presets. Methods that are not available here (no `psgd-jax`, or a `kl_precond` without the
# reference options) are skipped with a message.

# %%
if TINY:  # the tests: a tiny model, 2 seeds, 2 trials per method (one compiled step each)
  config = lm_curves.preset_config(
    "default",
    model=lm_model.ModelConfig(seq_len=16, d_model=32, num_layers=1, num_heads=2),
    batch_size=8,
    steps=int(STEPS),
    tune_steps=max(1, int(STEPS) // 2),
    seeds=(0, 1),
    lr_grids={m: grid[1:] for m, grid in lm_curves.DEFAULT_LR_GRIDS.items()},
    hparam_grids={m: (n, v[:1]) for m, (n, v) in lm_curves.DEFAULT_HPARAM_GRIDS.items()},
    eval_every=max(1, int(STEPS) // 2),
    num_val_batches=2,
    max_corpus_bytes=500_000,
    out_dir=str(OUT_DIR / "lm_curves"),
  )
else:
  config = lm_curves.preset_config(
    PRESET, out_dir=str(OUT_DIR / "lm_curves"), **({"steps": int(STEPS)} if STEPS else {})
  )
print(config)

# %% [markdown]
# ## Tuning and final runs
#
# Writes `results.md`, `summary.json`, `curves.csv` and `curves.png` to `config.out_dir`.

# %%
summary = lm_curves.run_experiment(config)

# %% [markdown]
# ## Results
#
# Final validation loss (mean ± std over seeds), steps and train seconds to reach AdamW's mean
# final validation loss, median step time; then every tuning trial (the chosen one in bold).
# The plot shows the seed-mean validation curves with ±std bands against steps and seconds.

# %%
display(Markdown((Path(config.out_dir) / "results.md").read_text()))
display(Image(filename=str(Path(config.out_dir) / "curves.png")))

# %% [markdown]
# ## Training loss
#
# Per-step training loss from `curves.csv`, averaged over seeds and smoothed with an
# exponential moving average.

# %%
with open(Path(config.out_dir) / "curves.csv") as f:
  rows = list(csv.DictReader(f))


def ema(values, decay=0.95):
  out, avg = [], values[0]
  for v in values:
    avg = decay * avg + (1 - decay) * v
    out.append(avg)
  return np.array(out)


fig, ax = plt.subplots(figsize=(6, 3.5))
for method in summary["methods"]:
  per_seed = {}
  for r in rows:
    if r["method"] == method:
      per_seed.setdefault(r["seed"], []).append(float(r["train_loss"]))
  length = min(len(losses) for losses in per_seed.values())
  mean = np.mean([losses[:length] for losses in per_seed.values()], axis=0)
  ax.plot(np.arange(1, length + 1), ema(mean), label=method, color=lm_curves.method_colour(method))
ax.set(xlabel="step", ylabel="train loss (seed mean, EMA)", title="Training loss")
ax.grid(alpha=0.3)
ax.legend()
fig.savefig(OUT_DIR / "lm_train_loss.png", dpi=120, bbox_inches="tight")
plt.show()
