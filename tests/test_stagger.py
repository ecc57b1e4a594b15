"""Staggered refresh (``stagger_refresh=True``, issue #27): each block once per cycle, at its own
phase, a share of the work at every step.

* The schedule (``preconditioner.refresh_schedule``): every block of a bucket with a factor has
  a phase in ``[0, T)``; every phase's cost (``Σ d³`` of its blocks, as computed) is at most the
  mean plus one group's; a sharded bucket's groups take as many rows from every device's run.
* The optimizer follows it: the blocks whose bases change at a step are exactly those whose
  phase is the step's (from the state, float64, random gradients).
* Float64 trajectories equal the NumPy ports of ``tests/numpy_reference.py`` run block by block,
  each with its own phase (SOAP, KL-Shampoo, KL-SOAP, Shampoo with its full refresh at
  ``start``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kl_precond as kp
from kl_precond import layout as layout_lib
from kl_precond import preconditioner
from tests import numpy_reference as ref


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _tree() -> dict:
  """A bucket of five 5x4 blocks, one 7x6 block, one 3x4x2 block and a bias (no factor)."""
  return {
    "m": [np.zeros((5, 4)) for _ in range(5)],
    "big": np.zeros((7, 6)),
    "cube": np.zeros((3, 4, 2)),
    "bias": np.zeros((4,)),
  }


def _grads(params: dict, steps: int, seed: int = 0) -> list:
  rng = np.random.default_rng(seed)
  return [
    jax.tree.map(lambda p, t=t: rng.standard_normal(p.shape) * (1 + 0.2 * t), params)
    for t in range(steps)
  ]


def _leaf_phases(params: dict, every: int, layout: kp.LayoutConfig, devices: int = 1) -> list:
  """Each leaf's phase (leaves of one block each), from the library's schedule."""
  tree = layout_lib.tree_layout(params, layout)
  schedule = preconditioner.refresh_schedule(tree, every, devices)
  phases = []
  for where in tree.where:
    ((bucket, row),) = where
    stagger = schedule[bucket]
    phases.append(None if stagger is None else stagger.phase(row, every))
  return phases


# --- the schedule ------------------------------------------------------------------------------


def _transformer_layout(layers: int, width: int, block: int) -> layout_lib.TreeLayout:
  shapes = [(width, 3 * width), (width, width), (width, 4 * width), (4 * width, width), (width,)]
  params = {f"l{i}": [jnp.zeros(s) for s in shapes] for i in range(layers)}
  return layout_lib.tree_layout(params, kp.LayoutConfig(block, blocking=True))


@pytest.mark.parametrize(("every", "devices"), [(10, 1), (3, 1), (4, 4), (7, 2)])
def test_schedule_gives_every_block_one_phase_and_balances_cost(every, devices):
  transformer = _transformer_layout(6, 48, 32)
  layout = layout_lib.tree_layout(
    {f"l{i}": [jnp.zeros((48, 144)), jnp.zeros((48, 192))] for i in range(6)},
    kp.LayoutConfig(32, blocking=True, bucket_multiple=devices),
  )
  # Ten buckets of one block each: only the buckets' offsets can spread them.
  distinct = layout_lib.tree_layout(
    [jnp.zeros((i + 3, 2 * i + 4)) for i in range(10)],
    kp.LayoutConfig(bucket_multiple=devices),
  )
  for tree in (transformer, layout, distinct):
    schedule = preconditioner.refresh_schedule(tree, every, devices)
    load = np.zeros(every)
    group_costs = []
    for bucket, stagger in zip(tree.buckets, schedule, strict=True):
      if not any(bucket.preconditioned):
        assert stagger is None
        continue
      cost = sum(d**3 for d, m in zip(bucket.shape, bucket.preconditioned, strict=True) if m)
      phases = [stagger.phase(row, every) for row in range(bucket.size)]
      assert all(0 <= p < every for p in phases)
      # A group's computed rows: the same slice of every device's run (a short last group is
      # computed at full size and partly discarded, so it costs a full group).
      used = sorted(set(phases))
      for p in used:
        rows = [r for r in range(bucket.size) if phases[r] == p]
        split = stagger.devices
        per_run = [sum(r // (bucket.size // split) == d for r in rows) for d in range(split)]
        assert len(set(per_run)) == 1, (p, per_run)
        load[p] += cost * split * stagger.size
      group_costs.append(cost * stagger.devices * stagger.size)
      # Every block is in one group; consecutive rows of a run share a phase until the group
      # is full.
      assert len(used) == stagger.groups <= every
    total = load.sum()
    assert load.max() <= total / every + max(group_costs) + 1e-9, (load, total / every)


def test_schedule_spreads_a_transformer_over_the_cycle():
  # 6 layers of width 48 in blocks of 32: an unstaggered refresh does all the work at one step.
  tree = _transformer_layout(6, 48, 32)
  schedule = preconditioner.refresh_schedule(tree, 10)
  load = np.zeros(10)
  for bucket, stagger in zip(tree.buckets, schedule, strict=True):
    if stagger is not None:
      cost = sum(d**3 for d, m in zip(bucket.shape, bucket.preconditioned, strict=True) if m)
      for row in range(bucket.size):
        load[stagger.phase(row, 10)] += cost
  assert np.all(load > 0)
  assert load.max() / load.mean() < 1.5, load


# --- the optimizer follows the schedule --------------------------------------------------------


@pytest.mark.parametrize("devices", [1, pytest.param(4, marks=pytest.mark.slow)])
def test_each_block_is_refreshed_once_per_cycle_at_its_phase(devices):
  every, steps = 3, 10
  params = {"m": [np.zeros((4, 4)) for _ in range(10)], "big": np.zeros((8, 8))}
  layout = kp.LayoutConfig(bucket_multiple=devices)
  tx = kp.scale_by_soap(precondition_frequency=every, stagger_refresh=True, layout=layout)
  tree = layout_lib.tree_layout(params, layout)
  schedule = preconditioner.refresh_schedule(tree, every, devices)
  state = tx.init(params)
  update = jax.jit(tx.update)
  previous = None
  for t, g in enumerate(_grads(params, steps + 1)):
    _, state = update(g, state)
    if t == 0:  # the first call builds every basis
      previous = state
      continue
    for k, (bucket, stagger) in enumerate(zip(tree.buckets, schedule, strict=True)):
      new = np.asarray(state.buckets[k].basis.bases[0])
      old = np.asarray(previous.buckets[k].basis.bases[0])
      changed = [bool(np.any(new[r] != old[r])) for r in range(len(bucket.members))]
      due = [stagger.phase(r, every) == t % every for r in range(len(bucket.members))]
      assert changed == due, (t, k, changed, due)
    previous = state
  # Every block was refreshed at `steps / every` steps, one per cycle (checked per step above).


def test_unstaggered_refresh_is_every_block_at_once():
  every = 3
  params = {"m": [np.zeros((4, 4)) for _ in range(6)]}
  tx = kp.scale_by_soap(precondition_frequency=every)
  state = tx.init(params)
  update = jax.jit(tx.update)
  previous = None
  for t, g in enumerate(_grads(params, 7)):
    _, state = update(g, state)
    if t:
      new, old = (np.asarray(s.buckets[0].basis.bases[0]) for s in (state, previous))
      changed = {bool(np.any(new[r] != old[r])) for r in range(6)}
      assert changed == {t % every == 0}
    previous = state


# --- float64 trajectories against the NumPy ports, block by block ------------------------------


def _run(tx, grads):
  state = tx.init(jax.tree.map(jnp.asarray, grads[0]))
  update = jax.jit(tx.update)
  out = []
  for g in grads:
    u, state = update(jax.tree.map(jnp.asarray, g), state)
    out.append(u)
  return out


def _per_leaf(outs, grads, reference, phases):
  """Our updates and the port's, leaf by leaf, the port run with each leaf's phase."""
  leaves = [jax.tree.leaves(o) for o in outs]
  streams = [jax.tree.leaves(g) for g in grads]
  for i, phase in enumerate(phases):
    if phase is None:
      continue
    ours = [np.asarray(step[i]) for step in leaves]
    theirs = reference([step[i] for step in streams], phase)
    scale = max(np.max(np.abs(x)) for x in theirs)
    for t, (a, b) in enumerate(zip(ours, theirs, strict=True)):
      np.testing.assert_allclose(a, b, atol=1e-9 * scale, rtol=0, err_msg=f"leaf {i} call {t}")


def _distinct(phases):
  used = {p for p in phases if p is not None}
  assert len(used) > 1, phases  # the tree must exercise several phases
  return phases


def test_staggered_soap_matches_numpy_per_block():
  every = 3
  params = _tree()
  grads = _grads(params, 11, seed=1)
  phases = _distinct(_leaf_phases(params, every, kp.LayoutConfig()))
  tx = kp.scale_by_soap(
    0.9, 0.95, 1e-8, shampoo_beta=0.8, precondition_frequency=every, stagger_refresh=True
  )

  def reference(stream, phase):
    return ref.soap_reference(
      stream, b1=0.9, b2=0.95, eps=1e-8, beta=0.8, every=every, sort=True, phase=phase
    )

  _per_leaf(_run(tx, grads), grads, reference, phases)


# The default suite runs SOAP's and Shampoo's replays (and KL-Shampoo sharded).
@pytest.mark.slow
@pytest.mark.parametrize("klsoap", [True, False], ids=["kl_soap", "kl_shampoo"])
def test_staggered_kl_methods_match_numpy_per_block(klsoap):
  every = 3
  params = _tree()
  grads = _grads(params, 11, seed=1 if klsoap else 2)
  phases = _distinct(_leaf_phases(params, every, kp.LayoutConfig()))
  settings = dict(b1=0.9, b2=0.95, eps=1e-3, beta=0.85, cap=50.0, start="constant")
  factory = kp.scale_by_kl_soap if klsoap else kp.scale_by_kl_shampoo
  tx = factory(
    settings["b1"],
    settings["b2"],
    settings["eps"],
    shampoo_beta=settings["beta"],
    precondition_frequency=every,
    stagger_refresh=True,
    max_clamp_value=settings["cap"],
    eigenvalue_init=settings["start"],
    clamp="absolute",
  )

  def reference(stream, phase):
    return ref.kl_reference(
      stream, every=every, klsoap=klsoap, clamp="absolute", phase=phase, **settings
    )

  _per_leaf(_run(tx, grads), grads, reference, phases)


def test_staggered_shampoo_matches_numpy_per_block():
  # Distributed Shampoo's order: identity bases until a full refresh at `start`, then each
  # block at its own phase. Grafted per block, so the blocks stay independent.
  every, start = 3, 4
  params = {k: v for k, v in _tree().items() if k != "bias"}
  grads = _grads(params, 13, seed=3)
  layout = kp.LayoutConfig(10000, blocking=True)
  phases = _distinct(_leaf_phases(params, every, layout))
  tx = kp.scale_by_shampoo(
    0.9,
    0.999,
    1e-3,
    precondition_frequency=every,
    start_preconditioning_step=start,
    stagger_refresh=True,
    graft_b2=0.999,
    graft_eps=1e-8,
  )

  def reference(stream, phase):
    # The port is a whole optimizer; with lr = 1 and no decay its step is minus the direction.
    zero = np.zeros(stream[0].shape)
    path = ref.distributed_shampoo_reference(
      zero,
      stream,
      lr=1.0,
      b1=0.9,
      b2=0.999,
      eps=1e-3,
      weight_decay=0.0,
      every=every,
      start=start,
      graft=(0.999, 1e-8),
      phase=phase,
    )
    return [path[t] - path[t + 1] for t in range(len(stream))]

  _per_leaf(_run(tx, grads), grads, reference, phases)
