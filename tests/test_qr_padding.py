"""The basis stage's QR (``kl_precond.basis._qr_q``): on CPU, square matrices of 512 and up are
factored with 8 zero rows appended (LAPACK is faster at a leading dimension that is not a power of
two); the Q must be the Q of the square matrix, checked against a float64 numpy QR."""

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
