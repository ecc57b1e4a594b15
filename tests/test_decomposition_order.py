"""The decompositions of a step run one after another (``kl_precond.tensor_ops.after``).

jaxlib 0.10's CPU runtime deadlocks when two batched ``eigh`` calls run at once on a 2-thread
pool, so the chassis chains them: at every level of the traced program, the equations that
contain an ``eigh`` or ``qr`` must be totally ordered by data dependencies. Checked on the
jaxpr of ``update`` (first call and refresh branches) for every method, on a tree with several
buckets and two-sided blocks, and ``after`` must not change values (NaN dependencies included).
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import kl_precond as kp
from kl_precond import tensor_ops

pytestmark = pytest.mark.timeout(120)

DECOMPOSITIONS = {"eigh", "qr"}
PARAMS = {
  "a": jnp.ones((6, 4)),
  "b": jnp.ones((5, 3)),
  "c": jnp.ones((7, 2, 3)),
  "bias": jnp.ones((4,)),
}


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def _contains(eqn) -> int:
  """Number of decompositions inside ``eqn`` (0 for none)."""
  if eqn.primitive.name in DECOMPOSITIONS:
    return 1
  return sum(_count(j) for j in _sub_jaxprs(eqn))


def _count(jaxpr) -> int:
  return sum(_contains(e) for e in jaxpr.eqns)


def _unordered_pairs(jaxpr) -> list[tuple[int, int]]:
  """Pairs of decomposition-holding equations, at any level, with no dependency path."""
  producers = {}
  ancestors: list[set[int]] = []
  for index, eqn in enumerate(jaxpr.eqns):
    deps: set[int] = set()
    for var in eqn.invars:
      if isinstance(var, jax.extend.core.Var) and var in producers:
        source = producers[var]
        deps |= {source} | ancestors[source]
    ancestors.append(deps)
    for var in eqn.outvars:
      producers[var] = index
  holders = [i for i, e in enumerate(jaxpr.eqns) if _contains(e)]
  bad = [(i, j) for n, i in enumerate(holders) for j in holders[n + 1 :] if i not in ancestors[j]]
  for eqn in jaxpr.eqns:
    for sub in _sub_jaxprs(eqn):
      bad += _unordered_pairs(sub)
  return bad


METHODS = {
  "soap": lambda: kp.soap(1e-3, precondition_frequency=1),
  "kl_soap": lambda: kp.kl_soap(1e-3, precondition_frequency=1),
  "kl_shampoo": lambda: kp.kl_shampoo(1e-3, precondition_frequency=1),
  "shampoo": lambda: kp.shampoo(1e-3, precondition_frequency=1, precondition_1d=True),
  "adamw_shampoo": lambda: kp.adamw_shampoo(1e-3, precondition_frequency=1),
  "eigenvalue_corrected_shampoo": lambda: kp.eigenvalue_corrected_shampoo(
    1e-3, precondition_frequency=1
  ),
  "eigenvalue_corrected_shampoo (eigh)": lambda: kp.eigenvalue_corrected_shampoo(
    1e-3, precondition_frequency=1, refresh="eigh"
  ),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_decompositions_are_chained(name):
  tx = METHODS[name]()
  state = tx.init(PARAMS)
  jaxpr = jax.make_jaxpr(tx.update)(PARAMS, state, PARAMS).jaxpr
  # Several buckets, each with two (or three) factors: many decompositions to order.
  assert _count(jaxpr) >= 6, _count(jaxpr)
  assert _unordered_pairs(jaxpr) == []


def test_checker_sees_independent_decompositions():
  """The checker itself fails on two independent ``eigh`` calls (so the test above can fail)."""

  def independent(x, y):
    return jnp.linalg.eigh(x)[1], jnp.linalg.eigh(y)[1]

  def chained(x, y):
    first = jnp.linalg.eigh(x)[1]
    return first, jnp.linalg.eigh(tensor_ops.after(y, first))[1]

  eye = jnp.eye(3)
  assert _unordered_pairs(jax.make_jaxpr(independent)(eye, eye).jaxpr)
  assert not _unordered_pairs(jax.make_jaxpr(chained)(eye, eye).jaxpr)


@pytest.mark.parametrize("anchor", [0.0, -1e30, np.inf, -np.inf, np.nan])
def test_after_changes_no_value(anchor):
  x = {"m": jnp.arange(6.0).reshape(2, 3), "v": jnp.asarray([np.nan, 1.0])}
  dependency = (jnp.full((2, 2), anchor, jnp.bfloat16), jnp.zeros((3,), jnp.int32))
  out = jax.jit(tensor_ops.after)(x, dependency)
  for key in x:
    np.testing.assert_array_equal(np.asarray(out[key]), np.asarray(x[key]))
  assert tensor_ops.after(x, None) is x
