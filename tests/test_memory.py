"""Optimizer-state memory, counted from the state itself (issue: KL-Shampoo saves one N buffer)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import kl_precond as kp

SHAPES = [(16, 8), (32, 32), (20, 12), (20, 12)]


def _per_block_elements(state) -> int:
  """Elements of every array with at least one axis: the per-block buffers (scalars excluded)."""
  return sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)


def _scalars(state) -> int:
  return sum(1 for x in jax.tree.leaves(state) if x.ndim == 0)


@pytest.fixture
def params():
  return {f"w{i}": jnp.zeros(s) for i, s in enumerate(SHAPES)}


def test_kl_shampoo_state_is_n_plus_factors_bases_and_eigenvalues(params):
  state = kp.kl_shampoo(1e-3).init(params)
  expected = sum(m * n + 2 * (m * m + n * n) + (m + n) for m, n in SHAPES)
  assert _per_block_elements(state) == expected
  assert _scalars(state) <= 4  # counters only


def test_soap_state_is_two_n_plus_factors_and_bases(params):
  state = kp.soap(1e-3).init(params)
  expected = sum(2 * m * n + 2 * (m * m + n * n) for m, n in SHAPES)
  assert _per_block_elements(state) == expected


def test_kl_soap_state_adds_the_second_moment(params):
  state = kp.kl_soap(1e-3).init(params)
  expected = sum(2 * m * n + 2 * (m * m + n * n) + (m + n) for m, n in SHAPES)
  assert _per_block_elements(state) == expected


@pytest.mark.parametrize(
  ("options", "matrices"),
  [({}, 2), ({"cache_roots": False}, 2), ({"store_bases": True}, 3)],
  ids=["roots", "bases", "roots_and_bases"],
)
def test_shampoo_state_is_moment_factors_bases_roots_eigenvalues_and_grafting(
  params, options, matrices
):
  """Per block: ``M`` (N); factors and cached roots (default), factors and bases
  (``cache_roots=False``), or all three (``store_bases=True``); eigenvalues (m+n); Adam grafting
  adds 2N. Without stored bases each factor keeps a one-element placeholder."""
  state = kp.shampoo(1e-3, **options).init(params)
  placeholders = 2 if options == {} else 0  # per block: one per factor
  expected = sum(3 * m * n + matrices * (m * m + n * n) + (m + n) + placeholders for m, n in SHAPES)
  assert _per_block_elements(state) == expected


def test_axes_above_max_precond_dim_store_no_factor():
  state = kp.soap(1e-3, max_precond_dim=100).init({"w": jnp.zeros((300, 5))})
  assert _per_block_elements(state) == 2 * 300 * 5 + 2 * 5 * 5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_state_dtype_option_sets_the_bytes(dtype, params):
  state = kp.kl_shampoo(1e-3, dtype=dtype).init(params)
  arrays = [x for x in jax.tree.leaves(state) if x.ndim > 0]
  assert {x.dtype for x in arrays} == {jnp.dtype(dtype)}
  expected = sum(m * n + 2 * (m * m + n * n) + (m + n) for m, n in SHAPES)
  assert sum(x.nbytes for x in arrays) == expected * jnp.dtype(dtype).itemsize


def test_eigenvalue_corrected_state_is_soaps(params):
  """``M``, ``D`` (2N), factors and bases: SOAP's count (no eigenvalues stored)."""
  state = kp.eigenvalue_corrected_shampoo(1e-3).init(params)
  expected = sum(2 * m * n + 2 * (m * m + n * n) for m, n in SHAPES)
  assert _per_block_elements(state) == expected


def test_kl_factors_keep_the_bases_beside_the_roots(params):
  """Shampoo with ``kl_factors``: the whitening needs the bases, so they are stored with the
  roots (as ``store_bases=True``)."""
  state = kp.shampoo(1e-3, kl_factors=True).init(params)
  expected = sum(3 * m * n + 3 * (m * m + n * n) + (m + n) for m, n in SHAPES)
  assert _per_block_elements(state) == expected
