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
# # kl_precond quickstart
#
# `kl_precond` provides structured second-order optimizers (Shampoo, SOAP, KL-Shampoo and
# KL-SOAP) as ordinary `optax.GradientTransformation`s. This notebook trains a small Flax NNX
# MLP on scikit-learn's bundled 8x8 digits with **KL-Shampoo**, then shows that switching to
# another optimizer is a one-line change.
#
# Environment variables (used by the tests): `KL_PRECOND_NOTEBOOK_STEPS` sets the number of
# training steps, `KL_PRECOND_NOTEBOOK_OUT` the directory where figures are saved.

# %%
# ruff: noqa: E402  (notebook: imports follow the setup cells)
import sys

if "google.colab" in sys.modules:
  # Replace the placeholder with the published repository URL.
  # %pip install -q "kl_precond[notebooks] @ git+https://github.com/YOUR_ORG/kl_precond.git"
  pass

# %%
import importlib.util
import os
from pathlib import Path

if importlib.util.find_spec("kl_precond") is None:
  # Running from a clone without installing: make the repository root importable.
  here = Path.cwd().resolve()
  sys.path.insert(0, str(next(p for p in (here, *here.parents) if (p / "kl_precond").is_dir())))

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import kl_precond as kp

STEPS = int(os.environ.get("KL_PRECOND_NOTEBOOK_STEPS", "300"))
OUT_DIR = Path(os.environ.get("KL_PRECOND_NOTEBOOK_OUT", "outputs/notebooks"))
OUT_DIR.mkdir(parents=True, exist_ok=True)
print(f"JAX backend: {jax.default_backend()}, steps: {STEPS}, figures -> {OUT_DIR}")

# %% [markdown]
# ## Data: 1,797 handwritten digits (8x8 pixels), bundled with scikit-learn

# %%
digits = load_digits()
x_all = (digits.data / 16.0).astype(np.float32)
y_all = digits.target.astype(np.int32)
perm = np.random.default_rng(0).permutation(len(x_all))
train_idx, test_idx = perm[:1500], perm[1500:]
x_train, y_train = jnp.asarray(x_all[train_idx]), jnp.asarray(y_all[train_idx])
x_test, y_test = jnp.asarray(x_all[test_idx]), jnp.asarray(y_all[test_idx])
print(x_train.shape, x_test.shape)


# %% [markdown]
# ## Model and train step
#
# A two-hidden-layer MLP. `nnx.Optimizer(model, tx, wrt=nnx.Param)` holds the optax state;
# `tx` is any optax transformation, here gradient clipping followed by KL-Shampoo with a
# warmup-cosine learning-rate schedule.


# %%
class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(64, 128, rngs=rngs)
    self.l2 = nnx.Linear(128, 128, rngs=rngs)
    self.out = nnx.Linear(128, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.l2(nnx.relu(self.l1(x)))))


def loss_fn(model, x, y):
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@nnx.jit
def train_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def accuracy(model, x, y):
  return (model(x).argmax(-1) == y).mean()


def train(tx, steps=STEPS, batch_size=128, seed=0):
  """Trains a fresh MLP with `tx`; returns (per-step losses, test accuracy)."""
  model = MLP(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  losses = []
  for _ in range(steps):
    idx = rng.integers(0, len(x_train), batch_size)
    losses.append(float(train_step(model, optimizer, x_train[idx], y_train[idx])))
  return np.array(losses), float(accuracy(model, x_test, y_test))


def schedule(peak_lr):
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak_lr,
    warmup_steps=max(1, STEPS // 10),
    decay_steps=max(STEPS, STEPS // 10 + 1),
    end_value=peak_lr / 10,
  )


# %% [markdown]
# ## Train with KL-Shampoo

# %%
tx = optax.chain(optax.clip_by_global_norm(1.0), kp.kl_shampoo(learning_rate=schedule(1e-2)))
losses, test_acc = train(tx)
print(f"final train loss {losses[-1]:.4f}, test accuracy {test_acc:.3f}")

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(losses)
ax.set(xlabel="step", ylabel="train loss", yscale="log", title="KL-Shampoo on digits")
ax.grid(alpha=0.3)
fig.savefig(OUT_DIR / "quickstart_loss.png", dpi=120, bbox_inches="tight")
plt.show()

# %% [markdown]
# ## Swapping optimizers
#
# Every method has the same optax-style signature, so comparing them is a loop. The peak
# learning rates are the ones picked by the LM benchmark's sweep (`benchmarks/lm_curves.py`),
# not tuned for this task.

# %%
optimizers = {  # name: (factory, peak learning rate)
  "kl_shampoo": (kp.kl_shampoo, 1e-2),
  "kl_soap": (kp.kl_soap, 1e-2),
  "soap": (kp.soap, 1e-2),
  "shampoo": (kp.shampoo, 1e-2),  # Adam grafting by default
  "adamw": (optax.adamw, 3e-3),
}
fig, ax = plt.subplots(figsize=(6, 3.5))
for name, (make, peak_lr) in optimizers.items():
  tx = optax.chain(optax.clip_by_global_norm(1.0), make(learning_rate=schedule(peak_lr)))
  losses, test_acc = train(tx)
  print(f"{name:>10}: final train loss {losses[-1]:.4f}, test accuracy {test_acc:.3f}")
  ax.plot(losses, label=name)
ax.set(xlabel="step", ylabel="train loss", yscale="log", title="Optimizers on digits")
ax.grid(alpha=0.3)
ax.legend()
fig.savefig(OUT_DIR / "quickstart_compare.png", dpi=120, bbox_inches="tight")
plt.show()
