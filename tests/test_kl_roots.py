"""Distributed Shampoo's simplified KL-Shampoo: ``scale_by_shampoo(kl_factors=True)`` (the
``kl_roots`` estimator) against an independent float64 NumPy port, and the parity mapping of its
configurations (with grafting too, which the shared golden files do not hold)."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kl_precond as kp
from kl_precond import parity
from tests import synthetic_golden, trajectories
from tests.numpy_reference import distributed_shampoo_reference


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _ours(init, grads, *, lr, weight_decay, **options):
  """Trajectory of ``W ← W - lr (P + λW)`` with ``P`` from ``scale_by_shampoo``."""
  return trajectories.decoupled(
    kp.scale_by_shampoo(**options), init, grads, lr=lr, weight_decay=weight_decay
  )


CASES = {
  "matrix, adam grafting": dict(shape=(6, 5), graft=(0.999, 1e-8), exponents=None),
  "matrix, no grafting": dict(shape=(5, 7), graft=None, exponents=None),
  "order 3, adam grafting": dict(shape=(3, 4, 2), graft=(0.99, 1e-8), exponents=None),
  "matrix, exponents (1/3, 1/6)": dict(shape=(6, 4), graft=None, exponents=(1 / 3, 1 / 6)),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kl_factors_match_a_numpy_port_of_distributed_shampoo(case):
  spec = CASES[case]
  rng = np.random.default_rng(11)
  shape = spec["shape"]
  init = rng.standard_normal(shape)
  grads = [rng.standard_normal(shape) * (1.0 if t < 6 else 0.1) for t in range(14)]
  common = dict(lr=0.01, weight_decay=0.01)
  graft = spec["graft"]
  port = functools.partial(
    distributed_shampoo_reference,
    init,
    grads,
    b1=0.9,
    b2=0.999,
    eps=1e-12,
    every=3,
    start=4,
    graft=graft,
    exponents=spec["exponents"],
    **common,
  )
  expected = port(kl=True)
  ours, state = _ours(
    init,
    grads,
    b1=0.9,
    b2=0.999,
    eps=1e-12,
    exponents=spec["exponents"],
    precondition_frequency=3,
    start_preconditioning_step=4,
    grafting_type=None if graft is None else "adam",
    graft_b2=0.999 if graft is None else graft[0],
    graft_eps=1e-8 if graft is None else graft[1],
    kl_factors=True,
    **common,
  )
  displacement = np.max(np.abs(expected[-1] - expected[0]))
  error = np.max(np.abs(ours - np.stack(expected))) / displacement
  assert error < 1e-11, error
  # The option changes the trajectory: plain Shampoo's port is far from it.
  plain = port(kl=False)
  assert np.max(np.abs(ours - np.stack(plain))) / displacement > 1e-4


def test_before_the_first_refresh_kl_factors_are_shampoos():
  """With identity roots the whitening is the identity: the factors equal Shampoo's."""
  rng = np.random.default_rng(12)
  grads = [rng.standard_normal((5, 3)) for _ in range(4)]
  options = dict(precondition_frequency=10, start_preconditioning_step=10, grafting_type="adam")
  _, kl_state = _ours(np.zeros((5, 3)), grads, lr=0.0, weight_decay=0.0, kl_factors=True, **options)
  _, plain_state = _ours(np.zeros((5, 3)), grads, lr=0.0, weight_decay=0.0, **options)

  def factors(state):
    is_node = lambda n: isinstance(n, kp.PreconditionerState)  # noqa: E731
    (node,) = [n for n in jax.tree.leaves(state, is_leaf=is_node) if is_node(n)]
    return node.buckets[0].estimator.factors

  for ours, theirs in zip(factors(kl_state), factors(plain_state), strict=True):
    np.testing.assert_array_equal(ours, theirs)


def test_kl_roots_needs_the_bases():
  tx = kp.scale_by_preconditioner(
    kp.kl_roots(0.99),
    kp.eigh_every(2, keep_bases=False),
    kp.kronecker_eigenvalues(0.9, 0.0, eps_placement="inside", cache_roots=True),
    first_call="identity",
    statistics_first=True,
  )
  params = {"w": jnp.zeros((4, 3))}
  with pytest.raises(ValueError, match="keep_bases=True"):
    tx.update({"w": jnp.ones((4, 3))}, tx.init(params), params)


def test_a_gradient_that_whitening_would_overflow_is_skipped():
  """The skip test bounds the whitened statistics by the roots' largest entries: after a
  refresh on tiny gradients (eigenvalues at the floor ε, so roots of ε^(-1/4) = 1e3), a
  gradient of 1e15 fits plain Shampoo's float32 factors (‖G‖² ~ 1e31) but not the whitened ones
  (~1e37 times the other root's square); it is skipped and the state stays finite."""
  with jax.enable_x64(False):
    params = {"w": jnp.zeros((4, 4), jnp.float32)}
    results = {}
    for kl in (False, True):
      tx = kp.scale_by_shampoo(
        precondition_frequency=1,
        start_preconditioning_step=1,
        grafting_type=None,
        eps=1e-12,
        kl_factors=kl,
      )
      state = tx.init(params)
      for scale in (1e-30, 1e-30, 1e15):
        grad = {"w": jnp.full((4, 4), scale, jnp.float32).at[0, 1].set(-scale)}
        update, state = tx.update(grad, state, params)
      finite = all(bool(np.all(np.isfinite(x))) for x in jax.tree.leaves(state))
      results[kl] = (int(state.skipped), finite)
    assert results[False] == (0, True)
    assert results[True] == (1, True)


def _synthetic_golden(tmp_path, constructor_kwargs, kl, graft, **port):
  """A golden file whose trajectory is the NumPy port's, with the sidecar's numbers."""

  def trajectory(init, grads):
    return distributed_shampoo_reference(
      init,
      grads,
      lr=float(np.float32(constructor_kwargs["lr"])),
      b1=constructor_kwargs["betas"][0],
      b2=constructor_kwargs["betas"][1],
      eps=constructor_kwargs["epsilon"],
      weight_decay=constructor_kwargs["weight_decay"],
      every=constructor_kwargs["precondition_frequency"],
      start=constructor_kwargs["start_preconditioning_step"],
      kl=kl,
      graft=graft,
      **port,
    )

  return synthetic_golden.write(tmp_path, constructor_kwargs, trajectory)


@pytest.mark.parametrize(
  "grafting",
  [
    # Without grafting: the shared kl_shampoo_meta golden's configuration (replayed in the
    # default suite by test_parity), so this synthetic replay of it runs in the slow job.
    pytest.param("None", marks=pytest.mark.slow),
    "AdamPreconditionerConfig(beta2=0.999, epsilon=1e-08)",
  ],
)
def test_parity_maps_distributed_shampoos_kl_configurations(tmp_path, grafting):
  """The held-back ``kl_shampoo_meta_graft`` configuration (Adam grafting) and the shared one,
  with a start step that is not a multiple of the frequency, replayed by the parity tool
  against the NumPy port."""
  kwargs = {
    **synthetic_golden.DISTRIBUTED_SHAMPOO,
    "preconditioner_config": "RootInvKLShampooPreconditionerConfig("
    "factor_matrix_dtype=torch.float64, inv_factor_matrix_dtype=torch.float64)",
    "grafting_config": grafting,
    "iterate_averaging_config": None,
    "shampoo_pt2_compile_config": None,
  }
  graft = None if grafting == "None" else (0.999, 1e-8)
  path = _synthetic_golden(tmp_path, kwargs, kl=True, graft=graft)
  records = parity.check(path)
  assert set(records) == {"w_6x5", "t_3x4x2", "b_4"}
  for name, record in records.items():
    assert record["judged"], name  # every factor is full rank at the first refresh (call 5)
    assert record["error_x64"] < 1e-10, (name, record)
    assert record["error_f32_vs_params"] < parity.TOLERANCE_F32, (name, record)
  # The same file read as plain root-inverse Shampoo does not replay: the mapping matters.
  kwargs["preconditioner_config"] = "RootInvShampooPreconditionerConfig()"
  path.with_suffix(".json").write_text(
    json.dumps(
      {
        "reference": {"class": "distributed_shampoo.DistributedShampoo"},
        "constructor_kwargs": kwargs,
      }
    )
  )
  assert max(r["error_x64"] for r in parity.check(path).values()) > 1e-6


@pytest.mark.parametrize(
  "config, grafting, port",
  [
    (
      "EigendecomposedShampooPreconditionerConfig(factor_matrix_dtype=torch.float64)",
      "AdamPreconditionerConfig(beta2=0.999, epsilon=1e-08)",
      dict(kl=False, graft=(0.999, 1e-8)),
    ),
    (
      "EigendecomposedShampooPreconditionerConfig(amortized_computation_config="
      "QREigendecompositionConfig(max_iterations=2, tolerance=0.01))",
      "None",
      dict(kl=False, graft=None, refresh="qr", iterations=2, tolerance=0.01),
    ),
    (
      "EigendecomposedKLShampooPreconditionerConfig(amortized_computation_config="
      "QREigendecompositionConfig())",
      "AdamPreconditionerConfig(beta2=0.999, epsilon=1e-08)",
      dict(kl=True, graft=(0.999, 1e-8), refresh="qr"),
    ),
    # The eigh refresh is also covered by "eigh, adam grafting" (default suite): slow job.
    pytest.param(
      "EigendecomposedShampooPreconditionerConfig(amortized_computation_config="
      "EighEigendecompositionConfig(tolerance=0.05))",
      "None",
      dict(kl=False, graft=None, tolerance=0.05),
      marks=pytest.mark.slow,
    ),
  ],
  ids=["eigh, adam grafting", "QR two steps", "KL, QR, adam grafting", "eigh, tolerance"],
)
def test_parity_maps_distributed_shampoos_eigendecomposed_configurations(
  tmp_path, config, grafting, port
):
  """Roots from stored eigenpairs: eigh (the root-inverse roots), or the QR algorithm's
  Rayleigh quotients (``scale_by_shampoo(refresh="qr")``), against the NumPy port."""
  kwargs = {
    **synthetic_golden.DISTRIBUTED_SHAMPOO,
    "preconditioner_config": config,
    "grafting_config": grafting,
  }
  path = _synthetic_golden(tmp_path, kwargs, **port)
  records = parity.check(path)
  for name, record in records.items():
    assert record["judged"], name
    assert record["error_x64"] < 1e-10, (name, record)


def test_a_qr_refresh_needs_an_absolute_ridge():
  with pytest.raises(ValueError, match="eps_mode"):
    kp.shampoo(refresh="qr", eps_mode="relative")
  with pytest.raises(ValueError, match="iterations"):
    kp.shampoo(refresh="qr", qr_iterations=0)
