"""The compiled step keeps the optimizer state in the layout it is stored in.

SOAP's refresh permutes Adam's ``V`` by the sort of the basis, and rotates ``M``. Taken along
each axis in turn (``jnp.take``), XLA laid the permuted ``V`` out column-major; since ``V``
leaves the refresh conditional, the conditional's other branch (every non-refresh step) then
transposed ``V`` into that layout, and the step transposed it back: two copies of ``V`` per call
(~10 % of SOAP's update on the benchmark transformer in 256-blocks). ``tensor_ops.permute_axes``
gathers over all axes at once instead. Likewise the rotated ``M`` of a bucket of one
wide block, whose last mode product ``moveaxis(tensordot(M, Qᵀ))`` XLA laid out column-major:
``tensor_ops.mode_product`` writes a product on the first axis as ``Q M``. Checked here on the
compiled HLO, and the permutation against numpy.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kl_precond as kp
from kl_precond import tensor_ops

pytestmark = pytest.mark.timeout(300)

# Two buckets of two-sided blocks, one of them several blocks of a tiled matrix.
PARAMS = {"w": jnp.ones((64, 128)), "v": jnp.ones((32, 48)), "bias": jnp.ones((48,))}


def _conditional_outputs(hlo: str) -> list[str]:
  """The array types (with layouts) that the conditionals of an HLO module return."""
  outputs = []
  for line in hlo.splitlines():
    match = re.match(r"\s*(?:ROOT )?%\S+ = \((.*)\) conditional\(", line)
    if match:
      outputs += re.findall(r"[a-z0-9]+\[[0-9,]+\]\{[0-9,]+\}", match.group(1))
  return outputs


def _row_major(array_type: str) -> bool:
  rank = array_type[: array_type.index("]")].count(",") + 1
  layout = array_type[array_type.index("{") + 1 : -1]
  return layout == ",".join(str(axis) for axis in reversed(range(rank)))


@pytest.mark.parametrize(
  "make",
  [
    lambda: kp.soap(1e-3, precondition_frequency=2),
    lambda: kp.soap(1e-3, precondition_frequency=2, layout=kp.LayoutConfig(32, blocking=True)),
    lambda: kp.kl_soap(1e-3, precondition_frequency=2),
  ],
  ids=["soap", "soap_blocks", "kl_soap"],
)
def test_state_leaves_the_refresh_conditional_row_major(make):
  tx = make()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), PARAMS)
  state = tx.init(PARAMS)
  update = jax.jit(tx.update, donate_argnums=(1,))
  hlo = update.lower(grads, state, PARAMS).compile().as_text()
  outputs = [t for t in _conditional_outputs(hlo) if "," in t[: t.index("]")]]  # rank >= 2
  assert outputs, "no conditional returns a matrix: the refresh is no longer a conditional?"
  assert [t for t in outputs if not _row_major(t)] == []


@pytest.mark.parametrize(
  "shape, which",
  [((5, 7), (0, 1)), ((5, 7), (1,)), ((3, 4, 6), (0, 2)), ((3, 4, 6), (0, 1, 2)), ((9,), (0,))],
)
def test_permute_axes_matches_numpy(shape, which):
  rng = np.random.default_rng(sum(shape))
  x = rng.standard_normal(shape).astype(np.float32)
  permutations = [rng.permutation(n) if axis in which else None for axis, n in enumerate(shape)]
  expected = x[
    np.ix_(*[np.arange(n) if p is None else p for n, p in zip(shape, permutations, strict=True)])
  ]
  args = [None if p is None else jnp.asarray(p, jnp.int32) for p in permutations]
  out = jax.jit(tensor_ops.permute_axes)(jnp.asarray(x), args)
  np.testing.assert_array_equal(np.asarray(out), expected)


def test_permute_axes_without_permutations_is_the_input():
  x = jnp.arange(6.0).reshape(2, 3)
  assert tensor_ops.permute_axes(x, (None, None)) is x
