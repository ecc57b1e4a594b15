# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # How good is Shampoo's Kronecker approximation?
#
# Full-matrix Adagrad and the Gauss–Newton method precondition a layer with its `mn × mn`
# gradient covariance `H`. Shampoo, SOAP and KL-Shampoo replace it by a Kronecker product
# `L ⊗ R` of an `m × m` and an `n × n` factor. Morwani et al. (ICLR 2025, "A New Perspective on
# Shampoo's Preconditioner") showed that
#
# * the best such product (in Frobenius norm) is the top singular pair of the rearranged matrix
#   `𝓡(H)`, which power iteration finds with `L ∝ E[G R Gᵀ]`, `R ∝ E[Gᵀ L G]`;
# * one step of that iteration from the identity gives `E[G Gᵀ] ⊗ E[Gᵀ G]`, the *square* of
#   Shampoo's preconditioner ("Shampoo²"), and it is already close to the optimum;
# * mini-batch gradients with the dataset's labels (the empirical Fisher) can spoil it.
#
# This notebook checks these claims with `kl_precond.diagnostics` on an MLP trained on binary
# digits, and adds the KL estimate `S_L ⊗ S_R` of KL-Shampoo. The experiment lives in
# `benchmarks/kronecker_study.py` (`python -m benchmarks.kronecker_study` runs it from the
# command line). Environment variables used by the tests: `KL_PRECOND_NOTEBOOK_STEPS` (training
# steps, default 400) and `KL_PRECOND_NOTEBOOK_OUT` (output directory, default
# `outputs/notebooks`). The default setting takes about a minute on 2 CPU cores.

# %%
# ruff: noqa: E402  (notebook: imports follow the setup cells)
import sys

if "google.colab" in sys.modules:
  # Replace the placeholder with the published repository URL.
  # !git clone -q https://github.com/YOUR_ORG/kl_precond.git
  # %cd kl_precond
  # %pip install -q -e ".[benchmarks,notebooks]"
  pass

# %%
import os
from pathlib import Path

here = Path.cwd().resolve()
REPO_ROOT = next(
  p for p in (here, *here.parents) if (p / "benchmarks" / "kronecker_study.py").exists()
)
sys.path.insert(0, str(REPO_ROOT))

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, Markdown, display

from benchmarks import kronecker_study
from kl_precond import diagnostics as dg

STEPS = int(os.environ.get("KL_PRECOND_NOTEBOOK_STEPS", "400"))
OUT_DIR = Path(os.environ.get("KL_PRECOND_NOTEBOOK_OUT", "outputs/notebooks"))
OUT_DIR.mkdir(parents=True, exist_ok=True)
TINY = STEPS < 20
print(f"JAX backend: {jax.default_backend()}, steps: {STEPS}, tiny: {TINY}")

# %% [markdown]
# ## A covariance that is exactly Kronecker
#
# If `vec(G) ~ 𝒩(0, P ⊗ Q)` then `E[G Gᵀ] = tr(Q) P` and `E[Gᵀ G] = tr(P) Q`: one power step
# recovers `H` exactly (cosine 1), whereas Shampoo's own `A^{1/2} ⊗ B^{1/2}` does not. The
# vec convention is row-major (`G.reshape(-1)`), so `jnp.kron(L, R)` matches `vec(L G Rᵀ)`.

# %%
key_p, key_q = jax.random.split(jax.random.key(0))
m, n = 6, 4
p_root = jax.random.normal(key_p, (m, m)) / np.sqrt(m)
q_root = jax.random.normal(key_q, (n, n)) / np.sqrt(n)
exact_h = jnp.kron(p_root @ p_root.T, q_root @ q_root.T)
# Gradient samples whose weighted second moment is exactly H (from its eigendecomposition).
grads, weights = dg.samples_from_covariance(exact_h, m, n)
synthetic = {
  name: float(dg.cosine_similarity(exact_h, dg.kronecker_product(factors)))
  for name, factors in {
    "optimal (SVD)": dg.optimal_kronecker(exact_h, m, n),
    "Shampoo² (A ⊗ B)": dg.shampoo_stats(grads, weights),
    "Shampoo (A½ ⊗ B½)": dg.shampoo_root(grads, weights),
    "KL (S_L ⊗ S_R)": dg.kl_fixed_point(grads, weights=weights),
  }.items()
}
display(Markdown("\n".join(f"- {k}: cosine {v:.4f}" for k, v in synthetic.items())))

# %% [markdown]
# ## Over training: an MLP on binary digits
#
# `StudyConfig` holds every knob of the command-line flags. The study layer is the 16×16 hidden
# weight matrix. The targets are the exact Gauss–Newton matrix `H_GN` over the training set and
# Adagrad's `H_Ada = E[g gᵀ]` with the real labels; the estimates are built from per-example
# (`b = 1`) or mini-batch gradients, with real or sampled labels.

# %%
config = kronecker_study.StudyConfig(
  steps=STEPS,
  log_every=max(1, STEPS // 40),
  grad_batch_sizes=(4, 16) if TINY else (16, 128),
  num_batches=16 if TINY else 256,
  out_dir=str(OUT_DIR / "kronecker"),
  progress=False,
)
rows, summary = kronecker_study.run_and_save(config)
display(Markdown(kronecker_study.markdown_table(summary)))
display(Image(filename=str(Path(config.out_dir) / "kronecker.png")))

# %% [markdown]
# ## The gap to the optimum
#
# `1 − cos` on a log scale separates the curves that overlap above: Shampoo² sits on top of the
# optimum, KL slightly below it, Shampoo's square root an order of magnitude further away.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
for ax, (target, labels, title) in zip(
  axes, [("gn", "exact", "Gauss–Newton"), ("ada", "real", "Adagrad (real labels)")], strict=True
):
  for method in ("optimal", "shampoo2", "kl", "shampoo"):
    steps, cosines = kronecker_study.series(rows, target, labels, 1, method)
    ax.semilogy(steps, np.maximum(1.0 - np.asarray(cosines), 1e-7), label=method)
  ax.set(title=title, xlabel="training step", ylabel="1 − cosine similarity")
  ax.grid(alpha=0.3, which="both")
  ax.legend()
fig.tight_layout()
fig.savefig(OUT_DIR / "kronecker_approximation.png", dpi=110)
plt.show()
