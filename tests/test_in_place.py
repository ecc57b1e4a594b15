"""The state passes through the refresh conditional without copies (``kp.compiler_options``).

XLA's default CPU copy insertion copied every bucket's bases into a temporary and back on every
ordinary step of a donated update, because they pass through the refresh conditional; with
region analysis (``kp.compiler_options()``) and the chassis' single conditional, decided after
the directions, it copies nothing large. Checked on the compiled HLO: the copies in the entry
computation and in the conditional's first branch (the ordinary step's "keep"). The options
must not change any value.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kl_precond as kp

pytestmark = pytest.mark.timeout(300)

PARAMS = {
  "a": jnp.ones((32, 48)),
  "b": jnp.ones((32, 48)),
  "c": jnp.ones((16, 24)),
  "bias": jnp.ones((48,)),
}

METHODS = {
  "soap": lambda: kp.soap(1e-3, precondition_frequency=2),
  "kl_soap": lambda: kp.kl_soap(1e-3, precondition_frequency=2),
  "kl_shampoo": lambda: kp.kl_shampoo(1e-3, precondition_frequency=2),
  "shampoo": lambda: kp.shampoo(1e-3, precondition_frequency=2),
  "adamw_shampoo": lambda: kp.adamw_shampoo(1e-3, precondition_frequency=2),
  "eigenvalue_corrected_shampoo": lambda: kp.eigenvalue_corrected_shampoo(
    1e-3, precondition_frequency=2
  ),
}

_COPY = re.compile(r"= f32\[([\d,]+)\]\S* copy\(")


def _computation(hlo: str, name: str) -> str:
  match = re.search(r"\n%" + re.escape(name) + r" .*?\n}\n", hlo, re.S)
  assert match, name
  return match.group(0)


def _copied_floats(hlo: str) -> int:
  """float32 elements copied by ``copy`` instructions in the entry computation and in the first
  branch of each of its conditionals (what an ordinary step runs)."""
  entry = hlo[hlo.index("\nENTRY") :]
  entry = entry[: entry.index("\n}\n") + 3]
  texts = [entry]
  for match in re.finditer(r"branch_computations=\{%([^,}]+)", entry):
    texts.append(_computation(hlo, match.group(1)))
  for match in re.finditer(r"true_computation=%[^,]+, false_computation=%([^,\s]+)", entry):
    texts.append(_computation(hlo, match.group(1)))
  return sum(
    int(np.prod([int(d) for d in dims.split(",")]))
    for text in texts
    for dims in _COPY.findall(text)
  )


def _compiled_text(tx, options) -> str:
  state = tx.init(PARAMS)
  update = jax.jit(tx.update, donate_argnums=1, compiler_options=options)
  return update.lower(PARAMS, state, PARAMS).compile().as_text()


def _state_floats(tx) -> int:
  leaves = jax.tree.leaves(tx.init(PARAMS))
  return sum(x.size for x in leaves if jnp.issubdtype(x.dtype, jnp.floating))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_ordinary_step_copies_no_state(name):
  tx = METHODS[name]()
  copied = _copied_floats(_compiled_text(tx, kp.compiler_options()))
  assert copied <= 0.01 * _state_floats(tx), (copied, _state_floats(tx))


def test_without_the_options_the_bases_are_copied():
  """The control: XLA's default copy insertion copies at least the bases (so the check above
  can fail, and the options are what removes the copies)."""
  tx = METHODS["soap"]()
  bases = sum(x.size for x in jax.tree.leaves(_bases(tx.init(PARAMS))))
  assert bases > 0
  assert _copied_floats(_compiled_text(tx, {})) >= bases


def _bases(state):
  (preconditioner,) = [
    s
    for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kp.PreconditionerState))
    if isinstance(s, kp.PreconditionerState)
  ]
  return [bucket.basis.bases for bucket in preconditioner.buckets]


@pytest.mark.parametrize("name", ["soap", "kl_shampoo", "shampoo"])
def test_options_change_no_value(name):
  tx = METHODS[name]()
  results = []
  for options in ({}, kp.compiler_options()):
    params = PARAMS
    state = tx.init(params)
    update = jax.jit(tx.update, donate_argnums=1, compiler_options=options)
    history = []
    for step in range(6):  # the first call, ordinary steps and refreshes (every 2)
      grads = jax.tree.map(
        lambda p, k=step: jax.random.normal(jax.random.key(k), p.shape, p.dtype), params
      )
      updates, state = update(grads, state, params)
      history.append(updates)
    results.append((history, state))
  (history, state), (history_opt, state_opt) = results
  for expected, actual in zip(
    jax.tree.leaves((history, state)), jax.tree.leaves((history_opt, state_opt)), strict=True
  ):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-6, atol=1e-7)
