"""What ``peers.py`` compares: the peers, our method specs and which of them are equal settings.

Imports nothing but the standard library at module load (the peers' jax 0.5.3 venv imports it in
the worker; ``make_peer`` imports each peer package, ``canonical`` ``models``, when called).

Our methods are specs: ``soap``, ``kl_soap``, ``kl_shampoo``, ``shampoo``, ``adamw_shampoo``
(``models.make_optimizer`` with ``--max_precond_dim``, default 10000 as in ``step_time.py``), or
``name@N`` for blocks of at most ``N`` (every axis longer than ``N`` split into blocks, for every
method: ``soap@256`` is SOAP in 256-blocks, ``models.make_optimizer(..., blocks=True)``).
``EQUAL_SETTINGS`` lists, for each peer, the specs of ours at equal settings (the same block size:
Google's Shampoo and distributed-kron's Kron and PRO precondition blocks of at most 256 or 1024,
PSGD's Kron whole axes up to 8192); the verdicts (``peers_rows.verdicts``) compare each peer only
with those. Specs are matched by method, effective ``max_precond_dim`` (capped at the task's
longest axis, above which the value changes nothing) and what happens to longer axes
(``canonical``), so ``shampoo`` at 10000 is ``shampoo@1024`` on both tasks.

The peers break on current JAX: Google's ``distributed_shampoo`` (``precondition-opt``) calls the
removed ``jax.tree_map``; ``distributed-kron`` subscripts ``PartitionSpec[str, str]``;
``psgd-jax`` imports ``optax._src.clipping`` (``failure_reason`` names these from an error).
"""

from __future__ import annotations

from typing import Any

LEARNING_RATE = 1e-4

# name: (package, settings). Shampoo: lr, block size, beta1 0.9, beta2 0.999, preconditioners
# every f steps from step 1, RMSprop grafting (its RMSPROP_NORMALIZED grafting diverges here).
# PSGD Kron's default schedule updates the preconditioner with probability 1 for the first 500
# steps (so in every timed step here), then anneals to 0.03; the "_p0.03" variants time that
# steady state, the "_p0.1" ones the same average refresh rate as our f = 10.
PEERS = {
  "dist_shampoo_b256_eigh": ("precondition-opt", "distributed_shampoo, block 256, eigh, f"),
  "dist_shampoo_b1024_eigh": ("precondition-opt", "distributed_shampoo, block 1024, eigh, f"),
  "dist_shampoo_b256_newton": ("precondition-opt", "distributed_shampoo, block 256, Newton, f"),
  "psgd_kron": ("psgd-jax", "kron, default schedule (p = 1 in the first 500 steps)"),
  "psgd_kron_p0.1": ("psgd-jax", "kron, update probability 0.1 (= our f = 10 on average)"),
  "psgd_kron_p0.03": ("psgd-jax", "kron, update probability 0.03"),
  "dk_kron": ("distributed-kron", "kron, block 256, default schedule (p = 1 at first)"),
  "dk_kron_p0.1": ("distributed-kron", "kron, block 256, update probability 0.1"),
  "dk_kron_p0.03": ("distributed-kron", "kron, block 256, update probability 0.03"),
  "dk_pro": ("distributed-kron", "pro, default settings"),
}
# One peer per package, tried in this repository's venv to record how it breaks.
PROBES = ("dist_shampoo_b256_eigh", "psgd_kron", "dk_kron", "dk_pro")
# Our methods; a spec is one of them, or "name@N" for blocks of at most N.
OURS = ("soap", "kl_soap", "kl_shampoo", "shampoo", "adamw_shampoo")
OURS_AT_256 = tuple(f"{name}@256" for name in OURS)
DEFAULT_OURS = (*OURS, *OURS_AT_256)
SMOKE_PEERS = ("dist_shampoo_b256_eigh", "dk_pro")
SMOKE_OURS = ("soap@256", "shampoo@256")  # both build on the tiny MLP; each matches a smoke peer
# The specs of ours at equal settings to each peer (the verdicts compare a peer with these only):
# the same blocks. Google's Shampoo: Shampoo in its block size. distributed-kron's Kron and PRO
# split every axis longer than 256 into blocks (``block_size=256``, their default): every method
# of ours in 256-blocks. PSGD Kron keeps whole axes up to 8192 (``max_size_triangular``): every
# method of ours with whole axes. (Equal refresh rate for the fixed-probability Krons: see
# ``update_period``.)
EQUAL_SETTINGS: dict[str, tuple[str, ...]] = {
  "dist_shampoo_b256_eigh": ("shampoo@256",),
  "dist_shampoo_b1024_eigh": ("shampoo@1024",),
  "dist_shampoo_b256_newton": ("shampoo@256",),
  **{peer: OURS for peer in PEERS if peer.startswith("psgd_kron")},
  **{peer: OURS_AT_256 for peer in PEERS if peer.startswith("dk_")},
}


def parse_spec(spec: str, default_dim: int) -> tuple[str, int]:
  """``"shampoo@256"`` -> ``("shampoo", 256)``; ``"soap"`` -> ``("soap", default_dim)``."""
  name, at, dim = spec.partition("@")
  if name not in OURS or (at and not (dim.isdigit() and int(dim) >= 1)):
    raise ValueError(f"Bad spec {spec!r}: expected one of {OURS}, optionally with @N (N >= 1).")
  return name, int(dim) if at else default_dim


def canonical(
  spec: str, default_dim: int, largest_axis: int, blocks: bool | None = None
) -> tuple[str, int, str]:
  """The method, its effective max_precond_dim and what happens to longer axes, on a task whose
  longest axis is given.

  Every ``max_precond_dim`` at least the longest axis gives the same optimizer (no axis is left
  unrotated or blocked: ``"whole"``), so ``shampoo`` (10000) and ``shampoo@1024`` are one setting
  when no axis is longer than 1024. Below it, longer axes are split (``"blocks"``: a ``name@N``
  spec, or a Shampoo variant) or left unrotated (``"unrotated"``: SOAP or a KL method built with
  a plain ``max_precond_dim``, as ``step_time.py`` does). ``blocks``: whether the optimizer was
  built with ``blocks=True`` (default: whether the spec has ``@N``).
  """
  from benchmarks import models

  name, dim = parse_spec(spec, default_dim)
  if dim >= largest_axis:
    return name, largest_axis, "whole"
  if blocks is None:
    blocks = "@" in spec
  split = blocks or name in models.BLOCKING_BY_DEFAULT
  return name, dim, "blocks" if split else "unrotated"


def update_probability(name: str) -> float | None:
  """The fixed preconditioner-update probability of a Kron peer named ``…_p<p>``, else None."""
  return float(name.rpartition("_p")[2]) if "_p0" in name else None


def update_period(peer: str) -> int | None:
  """The mean preconditioner-update period ``round(1/p)`` of a Kron peer with a fixed update
  probability ``p`` (``dk_kron_p0.03``: 33); None for a peer on a schedule (Google's Shampoo
  refreshes every ``--frequency`` steps, like ours; Kron's default anneals from ``p = 1``)."""
  p = update_probability(peer)
  return None if p is None else round(1 / p)


def make_peer(name: str, frequency: int) -> Any:
  """The peer optimizer ``name`` (see ``PEERS``), imported only here."""
  if name.startswith("dist_shampoo"):
    from precondition import distributed_shampoo as ds

    _, _, block, solver = name.split("_")
    return ds.distributed_shampoo(
      learning_rate=LEARNING_RATE,
      block_size=int(block[1:]),
      beta1=0.9,
      beta2=0.999,
      preconditioning_compute_steps=frequency,
      start_preconditioning_step=1,
      graft_type=ds.GraftingType.RMSPROP,
      eigh=solver == "eigh",
    )
  p = update_probability(name)
  probability = {} if p is None else {"preconditioner_update_probability": p}
  if name.startswith("psgd_kron"):
    from benchmarks import psgd_compat  # psgd-jax 0.2.9 vs optax 0.2.8: optax._src.clipping

    return psgd_compat.import_kron()(learning_rate=LEARNING_RATE, **probability)
  if name.startswith("dk_kron"):
    from distributed_kron import kron

    return kron(learning_rate=LEARNING_RATE, **probability)
  if name == "dk_pro":
    from distributed_kron import pro

    return pro(learning_rate=LEARNING_RATE)
  raise ValueError(f"Unknown peer {name!r}; expected one of {sorted(PEERS)}.")


def failure_reason(error: str) -> str:
  """A short reason for a known failure of a peer on current JAX."""
  known = {
    "tree_map": "uses jax.tree_map, removed in jax 0.6",
    "not subscriptable": "subscripts PartitionSpec[str, str]; PartitionSpec is not generic in "
    "jax >= 0.6",
    "clipping": "imports optax._src.clipping, moved to optax.transforms in optax 0.2.x",
    "timed out": "no result within the time limit (hang in XLA's CPU scheduler?)",
  }
  return next((why for key, why in known.items() if key in error), "")
