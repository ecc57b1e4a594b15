"""The basis stage's LAPACK calls on CPU (``kl_precond.basis._qr_q`` and ``_eigh``): square
matrices of 512 and up are decomposed with 8 rows (QR) or 8 rows and columns (eigh) appended,
because LAPACK is faster at a leading dimension that is not a power of two. The results must be
those of the square matrix: checked against float64 numpy, and on the compiled HLO that the padded
path is the one taken exactly from 512.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kl_precond import basis

pytestmark = pytest.mark.timeout(120)


def _numpy_q(matrix: np.ndarray) -> np.ndarray:
  """Householder Q in float64 with R's diagonal made positive (the unique QR)."""
  q, r = np.linalg.qr(matrix.astype(np.float64))
  return q * np.sign(np.diag(r))


@pytest.mark.parametrize("n", [256, 512, 640])
def test_qr_q_is_the_q_of_the_square_matrix(n):
  rng = np.random.default_rng(n)
  matrix = rng.standard_normal((n, n)).astype(np.float32)
  q = np.asarray(jax.jit(basis._qr_q)(jnp.asarray(matrix)), np.float64)
  assert q.shape == (n, n)
  assert np.abs(q.T @ q - np.eye(n)).max() < 1e-5
  expected = _numpy_q(matrix)
  signs = np.sign(np.sum(q * expected, axis=0))  # LAPACK's R may have negative diagonal entries
  assert np.all(signs != 0)
  assert np.abs(q * signs - expected).max() < 1e-4
  # The same algorithm as the unpadded call: the same column signs, the same Q to rounding.
  plain = np.asarray(jnp.linalg.qr(jnp.asarray(matrix))[0], np.float64)
  assert np.abs(q - plain).max() < 1e-4


@pytest.mark.parametrize("n, padded", [(256, False), (511, False), (512, True), (1024, True)])
def test_qr_q_pads_on_cpu_from_512(n, padded):
  """The compiled program factors an (n + 8) × n matrix exactly when n >= 512."""
  assert jax.default_backend() == "cpu"
  text = jax.jit(basis._qr_q).lower(jax.ShapeDtypeStruct((3, n, n), jnp.float32)).compile()
  hlo = text.as_text()
  assert (f"f32[3,{n + 8},{n}]" in hlo) == padded
  assert f"f32[3,{n},{n}]" in hlo  # input and output keep their shape


def test_qr_q_keeps_nonfinite_values_visible():
  """A NaN in the input gives a non-finite Q (the refresh's failure check must see it)."""
  matrix = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)
  matrix = jnp.asarray(matrix).at[3, 7].set(jnp.nan)
  assert not bool(jnp.all(jnp.isfinite(basis._qr_q(matrix))))


def _rank_deficient_psd(n: int, rank: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  g = rng.standard_normal((n, rank)) * np.logspace(0, -3, rank)
  return (g @ g.T).astype(np.float32)


@pytest.mark.parametrize(
  "n, kind", [(256, "psd"), (512, "psd"), (512, "rank_deficient"), (600, "indefinite")]
)
def test_eigh_matches_a_float64_numpy_eigh(n, kind):
  """Eigenvalues to float32 accuracy; eigenvectors span the right invariant subspaces: the
  residual ``F V - V Λ`` is at rounding level and ``V`` is orthonormal (with the 312 zero
  eigenvalues of the rank-deficient case, any orthonormal basis of the null space is right)."""
  rng = np.random.default_rng(n)
  if kind == "psd":
    g = rng.standard_normal((n, n))
    matrix = (g @ g.T / n).astype(np.float32)
  elif kind == "rank_deficient":
    matrix = _rank_deficient_psd(n, 200, n)
  else:
    g = rng.standard_normal((n, n))
    matrix = ((g + g.T) / 2).astype(np.float32)
  values, vectors = jax.jit(basis._eigh)(jnp.asarray(matrix))
  values, vectors = np.asarray(values, np.float64), np.asarray(vectors, np.float64)
  expected = np.linalg.eigvalsh(matrix.astype(np.float64))
  scale = np.abs(expected).max()
  assert values.shape == (n,) and vectors.shape == (n, n)
  assert np.abs(values - expected).max() < 1e-5 * scale
  assert np.abs(vectors.T @ vectors - np.eye(n)).max() < 1e-5
  residual = matrix.astype(np.float64) @ vectors - vectors * values
  assert np.abs(residual).max() < 1e-5 * scale


@pytest.mark.parametrize("n, padded", [(256, False), (511, False), (512, True)])
def test_eigh_pads_on_cpu_from_512(n, padded):
  text = jax.jit(jax.vmap(basis._eigh)).lower(jax.ShapeDtypeStruct((2, n, n), jnp.float32))
  hlo = text.compile().as_text()
  assert (f"f32[2,{n + 8},{n + 8}]" in hlo) == padded


def test_eigh_descending_of_a_padded_factor():
  """The basis stage's first decomposition: descending eigenvalues, the padded pairs gone."""
  matrix = _rank_deficient_psd(512, 100, 0)
  values, vectors = basis._eigh_descending(jnp.asarray(matrix))
  expected = np.linalg.eigvalsh(matrix.astype(np.float64))[::-1]
  assert np.abs(np.asarray(values, np.float64) - expected).max() < 1e-5 * expected[0]
  top = np.asarray(vectors, np.float64)[:, :100]
  assert np.abs(matrix @ top - top * expected[:100]).max() < 1e-5 * expected[0]


@pytest.mark.parametrize("name", ["soap", "kl_shampoo", "shampoo"])
def test_padded_and_unpadded_decompositions_give_the_same_trajectory(name, monkeypatch):
  """Float64, a 560 × 560 parameter, 9 steps with a refresh every 3 (eigh first, then QR for
  SOAP and KL-Shampoo, eigh throughout for Shampoo): padding changes rounding only. The factors
  have full rank from the first step; with a degenerate eigenspace (e.g. 520 × 600: the right
  factor has 80 zero eigenvalues at step 1) any two eigh implementations may pick different bases
  of it and the trajectories legitimately part."""
  import optax

  import kl_precond as kp

  def run():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((560, 560)))}
    tx = getattr(kp, name)(1e-2, precondition_frequency=3)
    state = tx.init(params)
    for step in range(9):
      grads = {"w": jnp.asarray(rng.standard_normal((560, 560)) * (1 + step))}
      updates, state = jax.jit(tx.update)(grads, state, params)
      params = optax.apply_updates(params, updates)
    return np.asarray(params["w"])

  with jax.enable_x64(True):
    padded = run()
    monkeypatch.setattr(basis, "_PAD_FROM", 10**9)
    plain = run()
  assert np.isfinite(padded).all()
  assert np.abs(padded - plain).max() < 1e-10 * np.abs(plain).max()


@pytest.mark.parametrize("scale", [1e-30, 1e37])
def test_eigh_padding_works_wherever_the_plain_eigh_does(scale):
  """The padded block's value is derived from the matrix's size; near the ends of float32's range
  it must neither overflow (1e37: row sums above the largest float) nor lose the matrix."""
  rng = np.random.default_rng(1)
  g = rng.standard_normal((512, 512))
  matrix = (g @ g.T / 512 * scale).astype(np.float32)
  plain = np.asarray(jnp.linalg.eigh(jnp.asarray(matrix))[0], np.float64)
  values, vectors = basis._eigh(jnp.asarray(matrix))
  values = np.asarray(values, np.float64)
  expected = np.linalg.eigvalsh(matrix.astype(np.float64))
  assert np.isfinite(plain).all() and np.isfinite(values).all()
  assert np.abs(values - expected).max() < 1e-5 * np.abs(expected).max()
  assert np.isfinite(np.asarray(vectors)).all()
