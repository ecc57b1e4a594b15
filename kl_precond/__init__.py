"""kl_precond: structured second-order optimizers for JAX/Optax.

Shampoo (with grafting), AdamW-style Shampoo, SOAP, KL-Shampoo and KL-SOAP as ``optax.GradientTransformation``s, each a short chain
of public stages: ``layout`` → ``estimator`` (:func:`frobenius`, :func:`kl`, :func:`kl_roots`) → ``basis``
(:func:`qr_every`, :func:`eigh_every`, :func:`qr_algorithm_every`) → ``scaling`` (:func:`adam`,
:func:`kronecker_eigenvalues`, :func:`eigenvalue_corrected`), composed by :func:`scale_by_preconditioner`.
"""

import inspect
from collections.abc import Callable
from typing import Any

from kl_precond import diagnostics as diagnostics
from kl_precond import sharding as sharding
from kl_precond.alias import (
  kl_shampoo,
  kl_soap,
  scale_by_kl_shampoo,
  scale_by_kl_soap,
  scale_by_soap,
  soap,
)
from kl_precond.basis import BasisState, eigh_every, qr_algorithm_every, qr_every
from kl_precond.estimators import FrobeniusState, KLState, frobenius, kl, kl_roots
from kl_precond.grafting import (
  GraftState,
  HoldingTransformation,
  MagnitudeState,
  graft,
  graft_magnitude,
)
from kl_precond.layout import LayoutConfig
from kl_precond.preconditioner import BucketState, PreconditionerState, scale_by_preconditioner
from kl_precond.scaling import (
  AdamState,
  CorrectedState,
  MomentumState,
  adam,
  eigenvalue_corrected,
  kronecker_eigenvalues,
)
from kl_precond.shampoo_family import (
  adamw_shampoo,
  eigenvalue_corrected_shampoo,
  scale_by_eigenvalue_corrected_shampoo,
  scale_by_shampoo,
  shampoo,
)

__version__ = "0.1.0"

# Hyperparameters that shape the computation (sizes, periods) and so cannot be traced arrays,
# common to every optimizer here: ``optax.inject_hyperparams(kp.soap,
# static_args=kp.STATIC_HYPERPARAMS)``. ``kp.static_hyperparams(kp.shampoo)`` adds the ones a
# given optimizer has beyond these (``start_preconditioning_step``, ``qr_iterations``, and
# ``tolerance``, whose zero or nonzero value decides whether the previous bases are stored).
STATIC_HYPERPARAMS = ("precondition_frequency", "max_precond_dim")


def static_hyperparams(factory: Callable[..., Any]) -> tuple[str, ...]:
  """The static arguments of an optimizer of this package, for ``optax.inject_hyperparams``.

  ``STATIC_HYPERPARAMS`` plus those of ``factory`` among ``start_preconditioning_step``,
  ``qr_iterations`` and ``tolerance``: ``optax.inject_hyperparams(f,
  static_args=kp.static_hyperparams(f))`` gives the same state and updates as ``f``.

  ``factory`` must be a callable (e.g. :func:`kl_precond.shampoo`); else ``ValueError``.
  """
  if not callable(factory):
    raise ValueError(f"factory must be an optimizer factory (a callable), got {factory!r}.")
  names = inspect.signature(factory).parameters
  extra = ("start_preconditioning_step", "qr_iterations", "tolerance")
  return tuple(n for n in (*STATIC_HYPERPARAMS, *extra) if n in names)


__all__ = [
  "STATIC_HYPERPARAMS",
  "AdamState",
  "BasisState",
  "BucketState",
  "CorrectedState",
  "FrobeniusState",
  "GraftState",
  "HoldingTransformation",
  "KLState",
  "LayoutConfig",
  "MagnitudeState",
  "MomentumState",
  "PreconditionerState",
  "adam",
  "adamw_shampoo",
  "eigenvalue_corrected",
  "eigenvalue_corrected_shampoo",
  "eigh_every",
  "frobenius",
  "graft",
  "graft_magnitude",
  "kl",
  "kl_roots",
  "kl_shampoo",
  "kl_soap",
  "kronecker_eigenvalues",
  "qr_algorithm_every",
  "qr_every",
  "scale_by_kl_shampoo",
  "scale_by_eigenvalue_corrected_shampoo",
  "scale_by_kl_soap",
  "scale_by_preconditioner",
  "scale_by_shampoo",
  "scale_by_soap",
  "shampoo",
  "static_hyperparams",
  "soap",
]
