# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Language-model training curves
#
# A small byte-level transformer (Flax NNX) is trained on the Python standard library's own
# source code, a corpus present on every machine, with AdamW, Shampoo (Adam grafting), SOAP,
# KL-SOAP and KL-Shampoo. Each method first gets a short learning-rate sweep, then a full run
# with its best rate. All the logic lives in `benchmarks/lm_curves.py`; the same experiment
# runs from the command line with `python -m benchmarks.lm_curves`.
#
# Environment variables (used by the tests): `KL_PRECOND_NOTEBOOK_STEPS` sets the number of
# training steps (below 100 selects a tiny model and skips the sweep),
# `KL_PRECOND_NOTEBOOK_OUT` the output directory. The default setting takes about 10-20
# minutes on 2 CPU cores and far less on a GPU runtime.

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

STEPS = int(os.environ.get("KL_PRECOND_NOTEBOOK_STEPS", "1000"))
OUT_DIR = Path(os.environ.get("KL_PRECOND_NOTEBOOK_OUT", "outputs/notebooks"))
TINY = STEPS < 100
print(f"JAX backend: {jax.default_backend()}, steps: {STEPS}, tiny: {TINY}")

# %% [markdown]
# ## Configuration
#
# `ExperimentConfig` holds every knob of the command-line flags. Methods whose `kl_precond`
# function is not available are skipped with a message.

# %%
if TINY:
  model_config = lm_model.ModelConfig(seq_len=16, d_model=32, num_layers=1, num_heads=2)
else:
  model_config = lm_model.ModelConfig()  # 2 layers, width 128, 4 heads, 64-byte context
config = lm_curves.ExperimentConfig(
  model=model_config,
  batch_size=8 if TINY else 32,
  steps=STEPS,
  sweep=not TINY,
  sweep_steps=max(1, STEPS // 5),
  eval_every=max(1, STEPS // 20),
  num_val_batches=2 if TINY else 8,
  max_corpus_bytes=500_000 if TINY else 4_000_000,
  out_dir=str(OUT_DIR / "lm_curves"),
)
print(config)

# %% [markdown]
# ## Sweep and final runs
#
# Writes `curves.csv`, `summary.json` and `curves.png` to `config.out_dir`.

# %%
summary = lm_curves.run_experiment(config)

# %%
display(Markdown(lm_curves.markdown_table(summary)))
display(Image(filename=str(Path(config.out_dir) / "curves.png")))

# %% [markdown]
# ## Training loss
#
# Per-step training loss from `curves.csv`, smoothed with an exponential moving average.

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
  losses = [float(r["train_loss"]) for r in rows if r["method"] == method]
  ax.plot(np.arange(1, len(losses) + 1), ema(losses), label=method)
ax.set(xlabel="step", ylabel="train loss (EMA, nats/byte)", title="Training loss")
ax.grid(alpha=0.3)
ax.legend()
fig.savefig(OUT_DIR / "lm_train_loss.png", dpi=120, bbox_inches="tight")
plt.show()
