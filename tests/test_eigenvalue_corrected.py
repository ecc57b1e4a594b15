"""Distributed Shampoo's eigenvalue-corrected Shampoo (its SOAP):
``scale_by_eigenvalue_corrected_shampoo`` against an independent float64 NumPy port, its stages
(``qr_algorithm_every``, ``eigenvalue_corrected``), and the parity mapping of its configurations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kl_precond as kp
from kl_precond import parity
from tests import synthetic_golden, trajectories
from tests.numpy_reference import eigenvalue_corrected_reference


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


CASES = {
  "qr, one step": dict(shape=(6, 5), refresh="qr"),
  "qr, three steps to tolerance 0.05, order 3": dict(
    shape=(3, 4, 5), refresh="qr", iterations=3, tolerance=0.05
  ),
  "eigh": dict(shape=(5, 7), refresh="eigh"),
  "eigh, tolerance 0.2": dict(shape=(5, 7), refresh="eigh", tolerance=0.2),
  "adam grafting, exponent 1/4, axis 1 unrotated": dict(
    shape=(6, 4), refresh="qr", graft=(0.99, 1e-8), exponent=0.25, unrotated=(1,)
  ),
  "vector (full-rank factor at the first refresh)": dict(shape=(3,), refresh="qr"),
}


def _trajectories(spec, seed=21, steps=14):
  rng = np.random.default_rng(seed)
  shape = spec["shape"]
  init = rng.standard_normal(shape)
  grads = [rng.standard_normal(shape) * (1.0 if t < 7 else 0.1) for t in range(steps)]
  hyper = dict(lr=0.01, b1=0.9, b2=0.99, eps=1e-10, weight_decay=0.01, every=3, start=4)
  expected = np.stack(
    eigenvalue_corrected_reference(
      init,
      grads,
      refresh=spec["refresh"],
      iterations=spec.get("iterations", 1),
      tolerance=spec.get("tolerance", 0.0),
      exponent=spec.get("exponent", 0.5),
      unrotated=spec.get("unrotated", ()),
      graft=spec.get("graft"),
      **hyper,
    )
  )
  graft = spec.get("graft")
  order = len(shape)
  tx = kp.eigenvalue_corrected_shampoo(
    hyper["lr"],
    hyper["b1"],
    hyper["b2"],
    hyper["eps"],
    hyper["weight_decay"],
    exponent=spec.get("exponent", 0.5),
    precondition_frequency=hyper["every"],
    start_preconditioning_step=hyper["start"],
    refresh=spec["refresh"],
    qr_iterations=spec.get("iterations", 1),
    tolerance=spec.get("tolerance", 0.0),
    unrotated_axes={order: spec["unrotated"]} if spec.get("unrotated") else None,
    grafting_type=None if graft is None else "adam",
    graft_b2=0.999 if graft is None else graft[0],
    graft_eps=1e-8 if graft is None else graft[1],
  )
  ours, state = trajectories.applied(tx, init, grads)
  return ours, expected, state


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_a_numpy_port_of_distributed_shampoo(case):
  ours, expected, _ = _trajectories(CASES[case])
  displacement = np.max(np.abs(expected[-1] - expected[0]))
  error = np.max(np.abs(ours - expected)) / displacement
  assert error < 1e-11, error


def test_the_options_change_the_trajectory():
  """Each option the port is checked on moves the trajectory (so the test above can fail)."""
  base, _, _ = _trajectories(CASES["qr, one step"])
  for variant in (
    dict(shape=(6, 5), refresh="eigh"),
    dict(shape=(6, 5), refresh="qr", iterations=3),
    dict(shape=(6, 5), refresh="qr", exponent=0.25),
    dict(shape=(6, 5), refresh="qr", unrotated=(1,)),
  ):
    other, _, _ = _trajectories(variant)
    assert np.max(np.abs(other - base)) > 1e-6, variant


def test_second_moment_is_neither_rotated_nor_permuted_at_a_refresh():
  """Between the calls around a refresh, D changes only by its EMA (no rotation, no sort)."""
  rng = np.random.default_rng(22)
  tx = kp.scale_by_eigenvalue_corrected_shampoo(
    0.9, 0.5, 1e-10, precondition_frequency=3, start_preconditioning_step=3
  )
  params = {"w": jnp.zeros((5, 4))}
  state = tx.init(params)
  for _ in range(3):  # calls 1-3; call 3 refreshes
    before = state.buckets[0]
    grad = jnp.asarray(rng.standard_normal((5, 4)))
    _, state = tx.update({"w": grad}, state, params)
  after = state.buckets[0]
  assert not np.allclose(after.basis.bases[0], before.basis.bases[0])  # call 3 refreshed
  # D was updated with the gradient projected in the NEW basis, from the OLD D unmoved.
  projected = after.basis.bases[0][0].T @ grad @ after.basis.bases[1][0]
  np.testing.assert_allclose(
    after.scaling.nu[0], 0.5 * before.scaling.nu[0] + 0.5 * projected**2, rtol=1e-12
  )


def test_qr_algorithm_converges_to_the_eigenbasis():
  """Many QR steps from the identity: the Rayleigh quotients become the eigenvalues, sorted."""
  rng = np.random.default_rng(23)
  x = rng.standard_normal((6, 6))
  factor = x @ x.T + np.diag(np.arange(6.0))
  stage = kp.qr_algorithm_every(1, iterations=200, tolerance=1e-13)
  state = stage.init((6,), (True,), jnp.float64)
  new, permutations, failed = stage.refresh((jnp.asarray(factor),), state)
  q = np.asarray(new.bases[0])
  assert permutations == (None,) and not bool(failed)
  np.testing.assert_allclose(np.diag(q.T @ factor @ q), np.linalg.eigvalsh(factor), rtol=1e-9)


def test_bad_options_are_refused():
  with pytest.raises(ValueError, match="iterations"):
    kp.qr_algorithm_every(3, iterations=0)
  with pytest.raises(ValueError, match="tolerance"):
    kp.qr_algorithm_every(3, tolerance=1.5)
  with pytest.raises(ValueError, match="refresh"):
    kp.scale_by_eigenvalue_corrected_shampoo(refresh="power")
  with pytest.raises(ValueError, match="exponents"):
    kp.eigenvalue_corrected(exponent=-0.5)
  with pytest.raises(ValueError, match="keep_bases"):
    kp.eigh_every(3, keep_bases=False, tolerance=0.1)


META = synthetic_golden.DISTRIBUTED_SHAMPOO


@pytest.mark.parametrize(
  "config, grafting, options",
  [
    ("DefaultSOAPConfig", "None", dict(refresh="qr")),
    (
      "EigenvalueCorrectedShampooPreconditionerConfig(amortized_computation_config="
      "QREigendecompositionConfig(max_iterations=2, tolerance=0.01), "
      "factor_matrix_dtype=torch.float64)",
      "AdamPreconditionerConfig(beta2=0.999, epsilon=1e-08)",
      dict(refresh="qr", iterations=2, tolerance=0.01, graft=(0.999, 1e-8)),
    ),
    (
      "EigenvalueCorrectedShampooPreconditionerConfig(inverse_exponent_override={2: 0.25, 1: 0.5})",
      "None",
      dict(refresh="eigh", exponent={2: 0.25, 1: 0.5, 3: 0.5}),
    ),
  ],
  ids=["DefaultSOAPConfig", "QR two steps, adam grafting", "eigh, exponent override"],
)
def test_parity_maps_eigenvalue_corrected_configurations(tmp_path, config, grafting, options):
  kwargs = dict(META, preconditioner_config=config, grafting_config=grafting)
  exponents = options.pop("exponent", {1: 0.5, 2: 0.5, 3: 0.5})

  def port(init, grads):
    return eigenvalue_corrected_reference(
      init,
      grads,
      lr=float(np.float32(0.01)),
      b1=0.9,
      b2=0.999,
      eps=1e-12,
      weight_decay=0.01,
      every=3,
      start=5,
      exponent=exponents[np.ndim(init)],
      **options,
    )

  path = synthetic_golden.write(tmp_path, kwargs, port, seed=24)
  records = parity.check(path)
  for name, record in records.items():
    assert record["judged"], name
    assert record["error_x64"] < 1e-10, (name, record)


@pytest.mark.parametrize(
  "config",
  [
    "EigenvalueCorrectedShampooPreconditionerConfig(amortized_computation_config="
    "EighEigendecompositionConfig(rank_deficient_stability_config="
    "PerturbationConfig(perturb_before_computation=False)))",
    "RootInvShampooPreconditionerConfig(amortized_computation_config=EigenConfig(some_option=1))",
    "RootInvShampooPreconditionerConfig(amortized_computation_config=CoupledNewtonConfig())",
    "EigenvalueCorrectedShampooPreconditionerConfig(amortized_computation_config="
    "EighEigendecompositionConfig(rank_deficient_stability_config=PseudoInverseConfig()))",
    "RootInvShampooPreconditionerConfig(some_new_option=1)",
    "SpectralDescentPreconditionerConfig()",
    "RootInvShampooPreconditionerConfig(amortized_computation_config=QREigendecompositionConfig())",
  ],
)
def test_configurations_without_an_equivalent_are_refused(config):
  sidecar = {
    "reference": {"class": "distributed_shampoo.DistributedShampoo"},
    "constructor_kwargs": dict(META, preconditioner_config=config, grafting_config="None"),
  }
  with pytest.raises(parity.Unsupported):
    parity.recipe(sidecar)


def test_momentum_in_the_eigenbasis_gives_the_references_direction():
  """``proj(M)`` kept and re-rotated at refreshes equals projecting a parameter-space ``M``."""
  rng = np.random.default_rng(25)
  params = {"w": jnp.zeros((6, 5)), "t": jnp.zeros((3, 4, 2)), "b": jnp.zeros(4)}

  def build(in_basis):
    return kp.scale_by_preconditioner(
      kp.frobenius(0.99, bias_correction=True),
      kp.qr_algorithm_every(2, start=2, ridge=1e-8),
      kp.eigenvalue_corrected(0.9, 0.99, 1e-8, momentum_in_eigenbasis=in_basis),
      layout=kp.LayoutConfig(blocking=True, precondition_1d=True),
      first_call="identity",
      statistics_first=True,
    )

  fast, reference = build(True), build(False)
  s1, s2 = fast.init(params), reference.init(params)
  # Jitted: an eager update compiles each of its conditionals anew on every call.
  update1, update2 = jax.jit(fast.update), jax.jit(reference.update)
  for _ in range(9):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)
    u1, s1 = update1(grads, s1, params)
    u2, s2 = update2(grads, s2, params)
    for key in params:
      np.testing.assert_allclose(u1[key], u2[key], rtol=1e-10, atol=1e-12)
  assert not np.allclose(s1.buckets[0].scaling.mu, s2.buckets[0].scaling.mu)  # different M
