"""Replay the authors' golden trajectories with our optimizers.

A golden file ``X.npz`` (with its sidecar ``X.json``) holds a gradient stream and the parameter
trajectory that a reference PyTorch optimizer produced from it (see ``shared/golden/README.md``).
:func:`replay` maps the sidecar's reference class and constructor kwargs to our ``scale_by_*``
transform, feeds it the same gradients, applies the learning rate and weight decay in the
reference's order around our output, and returns our trajectory. :func:`check` compares it with
the file: per tensor, the max abs error over all calls divided by the max abs total
displacement ``|params[25] - params[0]|``.

Command line::

  python -m kl_precond.parity FILE.npz [FILE.npz ...] [--json] [--inject {none,q0,all}]

It exits with 1 when a well-posed tensor misses its tolerance, and with 3 when a file's
configuration has no kl_precond equivalent (say, Distributed Shampoo's spectral descent or its
Newton-iteration roots); the table says which. A tensor is well-posed when
every Kronecker factor is full rank when its first basis is computed (for the methods whose
first call only initialises: the first gradient's mode unfoldings have full row rank); other
tensors depend on the arbitrary eigenbasis of a null space and are reported, not judged.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kl_precond import alias, shampoo_family
from kl_precond import layout as layout_lib
from kl_precond.preconditioner import PreconditionerState

TOLERANCE_X64 = 1e-10
TOLERANCE_META_X64 = 1e-8
TOLERANCE_F32 = 1e-4


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How to replay one reference configuration.

  Attributes:
    transform: our direction (``scale_by_*``), before learning rate and weight decay.
    learning_rate: the reference's learning rate.
    weight_decay: the reference's weight decay.
    decay_order: ``"after"``: ``W ← W - ηU; W ← W - ηλW`` (SOAP, KLOpt); ``"before"``:
      ``W ← (1-ηλ)W; W ← W - ηU`` (AdamWBF16); ``"decoupled"``: ``W ← W - η(U + λW)``;
      ``"l2"``: ``G ← G + λW`` before the transform, then ``W ← W - ηU`` (Distributed Shampoo).
    skips_first_call: the reference's first call neither updates nor decays.
    layout: the layout our transform uses (for well-posedness and basis injection).
    tolerance_x64: the float64 tolerance (Distributed Shampoo: 1e-8, its roots need eigh of
      ridge-regularised factors).
    first_basis_call: the call (1-based) whose factors give the first basis; well-posedness
      is judged on the factors accumulated up to it.
    momentum: a transform applied to ``U + λW`` (``"decoupled"``) or ``U`` (``"l2"``) before
      ``W ← W - η·``its output (Distributed Shampoo's ``ClassicMomentumConfig``), or ``None``.
  """

  transform: optax.GradientTransformation
  learning_rate: float
  weight_decay: float
  decay_order: str
  skips_first_call: bool
  layout: layout_lib.LayoutConfig | None
  tolerance_x64: float = TOLERANCE_X64
  first_basis_call: int = 1
  momentum: optax.GradientTransformation | None = None


_SOAP_KWARGS = {
  "lr",
  "betas",
  "shampoo_beta",
  "eps",
  "weight_decay",
  "precondition_frequency",
  "max_precond_dim",
  "merge_dims",
  "precondition_1d",
  "normalize_grads",
  "data_format",
  "correct_bias",
  "cast_dtype",
}
_KLOPT_KWARGS = {
  "lr",
  "betas",
  "shampoo_beta",
  "eps",
  "weight_decay",
  "precondition_frequency",
  "using_klsoap",
  "normalize_grads",
  "init_factor",
  "using_damping",
  "using_clamping",
  "max_clamp_value",
  "cast_dtype",
}
_ADAMW_KWARGS = {
  "lr",
  "betas",
  "eps",
  "weight_decay",
  "is_normalize",
  "using_scaling",
  "cast_dtype",
}
# KLOpt has no size cap: every axis gets a factor.
_NO_CAP = 2**31 - 1


def _check_kwargs(name: str, kwargs: dict[str, Any], known: set[str]) -> None:
  unknown = set(kwargs) - known
  if unknown:
    raise ValueError(f"{name}: constructor kwargs with no mapping to kl_precond: {sorted(unknown)}")


def _shampoo_beta(value: Any) -> Any:
  return None if value is None or value < 0 else value


def _soap_recipe(kwargs: dict[str, Any], upstream: bool) -> Recipe:
  _check_kwargs("SOAP", kwargs, _SOAP_KWARGS)
  b1, b2 = kwargs.get("betas", (0.95, 0.95))
  layout = layout_lib.LayoutConfig(
    max_precond_dim=int(kwargs.get("max_precond_dim", 10000)),
    merge_small_dims=bool(kwargs.get("merge_dims", False)),
    precondition_1d=bool(kwargs.get("precondition_1d", False)),
    squeeze=False,
    channels_last=kwargs.get("data_format", "channels_first") == "channels_last",
  )
  transform = alias.scale_by_soap(
    b1,
    b2,
    kwargs.get("eps", 1e-8),
    shampoo_beta=_shampoo_beta(kwargs.get("shampoo_beta", -1)),
    precondition_frequency=int(kwargs.get("precondition_frequency", 10)),
    bias_correction=bool(kwargs.get("correct_bias", True)),
    sort_basis=upstream,
    normalize_grads=bool(kwargs.get("normalize_grads", False)),
    layout=layout,
  )
  return Recipe(
    transform, kwargs.get("lr", 3e-3), kwargs.get("weight_decay", 0.01), "after", True, layout
  )


def _klopt_recipe(kwargs: dict[str, Any]) -> Recipe:
  _check_kwargs("KLOpt", kwargs, _KLOPT_KWARGS)
  b1, b2 = kwargs.get("betas", (0.9, 0.98))
  eps = kwargs.get("eps", 1e-8)
  layout = layout_lib.LayoutConfig(max_precond_dim=_NO_CAP)
  factory = (
    alias.scale_by_kl_soap if kwargs.get("using_klsoap", False) else alias.scale_by_kl_shampoo
  )
  transform = factory(
    b1,
    b2,
    eps,
    shampoo_beta=_shampoo_beta(kwargs.get("shampoo_beta", -1)),
    precondition_frequency=int(kwargs.get("precondition_frequency", 10)),
    # The authors' start and clamp (our defaults are the scale-free ones).
    eigenvalue_init="constant",
    clamp="absolute",
    init_factor=kwargs.get("init_factor", 0.1),
    max_clamp_value=kwargs.get("max_clamp_value", 4000)
    if kwargs.get("using_clamping", True)
    else None,
    damping=eps if kwargs.get("using_damping", False) else 0.0,
    normalize_grads=bool(kwargs.get("normalize_grads", False)),
    layout=layout,
  )
  return Recipe(
    transform, kwargs.get("lr", 1e-4), kwargs.get("weight_decay", 0.01), "after", True, layout
  )


def _adamw_recipe(kwargs: dict[str, Any]) -> Recipe:
  _check_kwargs("AdamWBF16", kwargs, _ADAMW_KWARGS)
  if kwargs.get("using_scaling", False):
    raise ValueError("AdamWBF16(using_scaling=True) has no kl_precond equivalent.")
  b1, b2 = kwargs.get("betas", (0.9, 0.999))
  parts = [optax.scale_by_adam(b1, b2, kwargs.get("eps", 1e-8))]
  if kwargs.get("is_normalize", False):
    parts.append(
      optax.stateless(
        lambda u, p: jax.tree.map(lambda x: x / (1e-30 + jnp.sqrt(jnp.mean(x**2))), u)
      )
    )
  return Recipe(
    optax.chain(*parts),
    kwargs.get("lr", 1e-3),
    kwargs.get("weight_decay", 1e-2),
    "before",
    False,
    None,
  )


_META_KWARGS = {
  "lr",
  "betas",
  "epsilon",
  "weight_decay",
  "weight_decay_type",
  "max_preconditioner_dim",
  "precondition_frequency",
  "start_preconditioning_step",
  "use_bias_correction",
  "preconditioner_config",
  "grafting_config",
  "distributed_config",
  "beta3",
  "iterate_averaging_config",
  "shampoo_pt2_compile_config",
  # Where and how fast, not what: pinned host memory, eager NaN checks, threads.
  "use_pin_memory",
  "shampoo_runtime_config",
  "concurrency_config",
}


class Unsupported(ValueError):
  """A reference configuration that kl_precond has no equivalent for (not a parity failure)."""


def _parse_call(text: str | None) -> tuple[str | None, dict[str, Any]]:
  """``"Name(a=1, b={2: {0: 0.5}})  # comment"`` -> ``("Name", {"a": 1, "b": {...}})``.

  Values that are not Python literals (``torch.float64``, ``math.inf``) are kept as source text.
  """
  if text is None or text.strip() in ("None", ""):
    return None, {}
  source = text.split("  #")[0].strip()
  node = ast.parse(source, mode="eval").body
  if not isinstance(node, ast.Call):
    raise ValueError(f"cannot parse a configuration from {text!r}")
  kwargs: dict[str, Any] = {}
  for keyword in node.keywords:
    segment = ast.get_source_segment(source, keyword.value) or ""
    try:
      kwargs[str(keyword.arg)] = ast.literal_eval(segment)
    except ValueError:
      kwargs[str(keyword.arg)] = segment
  return ast.unparse(node.func), kwargs


def _meta_grafting(text: str | None) -> tuple[str | None, float, float]:
  name, kwargs = _parse_call(text)
  kinds = {
    None: None,
    "AdamPreconditionerConfig": "adam",
    "RMSpropPreconditionerConfig": "rmsprop",
    "AdaGradPreconditionerConfig": "adagrad",
    "SGDPreconditionerConfig": "sgd",
  }
  if name not in kinds:
    raise Unsupported(f"grafting_config {name} has no kl_precond equivalent")
  kind = kinds[name]
  # AdaGrad sums (beta2 = 1) and SGD/no grafting have no second-moment EMA: any valid b2 will do.
  beta2 = kwargs.get("beta2", 0.999) if kind in ("adam", "rmsprop") else 0.999
  return kind, beta2, kwargs.get("epsilon", 1e-10)


# Distributed Shampoo's named preconditioner configs, as (class, options).
_META_ALIASES = {
  "DefaultShampooConfig": ("RootInvShampooPreconditionerConfig", {}),
  "DefaultEigenvalueCorrectedShampooConfig": ("EigenvalueCorrectedShampooPreconditionerConfig", {}),
  "DefaultSOAPConfig": (
    "EigenvalueCorrectedShampooPreconditionerConfig",
    {"amortized_computation_config": "QREigendecompositionConfig()"},
  ),
}
_ROOT_INVERSE = ("RootInvShampooPreconditionerConfig", "RootInvKLShampooPreconditionerConfig")
# Roots from stored eigenpairs: the same roots as root-inverse with eigh; or from the QR
# algorithm's estimates (``scale_by_shampoo(refresh="qr")``).
_EIGENDECOMPOSED = (
  "EigendecomposedShampooPreconditionerConfig",
  "EigendecomposedKLShampooPreconditionerConfig",
)
_KL_CONFIGS = (
  "RootInvKLShampooPreconditionerConfig",
  "EigendecomposedKLShampooPreconditionerConfig",
)
_EIGENVALUE_CORRECTED = "EigenvalueCorrectedShampooPreconditionerConfig"
# Options of the preconditioner configs that change nothing a float64 replay can see (dtypes,
# storage, failure tolerance) or that are mapped below.
_META_CONFIG_OPTIONS = {
  "amortized_computation_config",
  "num_tolerated_failed_amortized_computations",
  "factor_matrix_dtype",
  "inv_factor_matrix_dtype",
  "factor_matrix_eigenvectors_dtype",
  "factor_matrix_eigenvalues_dtype",
  "corrected_eigenvalues_dtype",
  "use_symmetric_packing",
  "inverse_exponent_override",
  "ignored_basis_change_dims",
  "use_trace_scaling",
  "trace_scaling_exponent",
  "drop_weighting_factor_on_gsquare",
}


def _meta_preconditioner(text: str | None) -> tuple[str, dict[str, Any]]:
  """The preconditioner config's class and options; refuses what has no equivalent."""
  source = (text or "DefaultShampooConfig").split("  #")[0].strip()
  if source in _META_ALIASES:
    config, options = _META_ALIASES[source]
    options = dict(options)
  else:
    parsed, options = _parse_call(source)
    config = str(parsed)
  if config not in (*_ROOT_INVERSE, *_EIGENDECOMPOSED, _EIGENVALUE_CORRECTED):
    raise Unsupported(
      f"preconditioner_config {config} has no kl_precond equivalent (root-inverse and "
      "eigendecomposed Shampoo and KL-Shampoo, eigenvalue-corrected Shampoo; see the README's "
      "method table)"
    )
  unknown = set(options) - _META_CONFIG_OPTIONS
  if unknown:
    raise Unsupported(f"{config} options {sorted(unknown)} have no kl_precond equivalent")
  return config, options


def _meta_statistics(options: dict[str, Any], use_bias_correction: bool) -> dict[str, Any]:
  """The ``scale_by_*`` options for how the factors (and ``D``) accumulate and are scaled."""
  return {
    "bias_correction": use_bias_correction,
    # ``drop_weighting_factor_on_gsquare``: the outer products enter with weight 1, and the
    # factors are no longer an EMA, so they are not bias-corrected (β₂ = 1 does this by itself).
    "statistics_weight": 1.0 if options.get("drop_weighting_factor_on_gsquare") else None,
    "trace_scaling": float(options.get("trace_scaling_exponent", 0.5))
    if options.get("use_trace_scaling")
    else None,
  }


def _meta_decomposition(config: str, text: Any) -> tuple[str, int, float]:
  """``(refresh, iterations, tolerance)`` from an ``amortized_computation_config``."""
  default = "EigenConfig()" if config in _ROOT_INVERSE else "EighEigendecompositionConfig()"
  source = str(text or default).split("  #")[0].strip()
  if source in ("DefaultEigenConfig", "DefaultEigendecompositionConfig"):
    source = "EigenConfig()" if source == "DefaultEigenConfig" else "EighEigendecompositionConfig()"
  name, options = _parse_call(source)
  kinds = {"EigenConfig": "eigh", "EighEigendecompositionConfig": "eigh"}
  if config not in _ROOT_INVERSE:
    kinds["QREigendecompositionConfig"] = "qr"
  if name not in kinds:
    raise Unsupported(f"amortized_computation_config {name} has no kl_precond equivalent")
  stability = str(options.pop("rank_deficient_stability_config", "DefaultPerturbationConfig"))
  if stability not in ("DefaultPerturbationConfig", "PerturbationConfig()") and (
    not stability.startswith("PerturbationConfig(")
    or "perturb_before_computation=True" not in stability
  ):
    raise Unsupported(f"rank_deficient_stability_config {stability} has no kl_precond equivalent")
  iterations = int(options.pop("max_iterations", 1))
  tolerance = float(options.pop("tolerance", 0.0))
  options.pop("retry_double_precision", None)  # a retry on failure only
  options.pop("eigendecomposition_offload_device", None)  # where, not what
  if options:
    raise Unsupported(f"{name} options {sorted(options)} have no kl_precond equivalent")
  return kinds[str(name)], iterations, tolerance


def _meta_recipe(kwargs: dict[str, Any]) -> Recipe:
  _check_kwargs("DistributedShampoo", kwargs, _META_KWARGS)
  b1, b2 = kwargs.get("betas", (0.9, 1.0))
  beta3 = kwargs.get("beta3", -1.0)
  momentum = _meta_momentum(kwargs.get("iterate_averaging_config"))
  config, options = _meta_preconditioner(kwargs.get("preconditioner_config"))
  statistics = _meta_statistics(options, bool(kwargs.get("use_bias_correction", True)))
  # ``beta3 = -1`` means β₁; otherwise the filtered gradient looks ahead with it.
  statistics["b3"] = None if beta3 in (-1.0, b1) else beta3
  refresh, iterations, tolerance = _meta_decomposition(
    config, options.get("amortized_computation_config")
  )
  kind, graft_b2, graft_eps = _meta_grafting(kwargs.get("grafting_config"))
  merged = "target_parameter_dimensionality=math.inf" not in str(kwargs.get("distributed_config"))
  cap = int(kwargs.get("max_preconditioner_dim", 1024))
  frequency = int(kwargs.get("precondition_frequency", 1))
  start = int(kwargs.get("start_preconditioning_step", -1))
  start = frequency if start < 0 else start
  eps = kwargs.get("epsilon", 1e-12)
  layout = layout_lib.LayoutConfig(
    cap, merge_small_dims=merged, precondition_1d=True, blocking=True
  )
  if config == _EIGENVALUE_CORRECTED:
    ignored = options.get("ignored_basis_change_dims") or {}
    if ignored:
      unrotated = tuple((int(o), tuple(int(a) for a in axes)) for o, axes in ignored.items())
      layout = dataclasses.replace(layout, unfactored_axes=unrotated)
    transform = shampoo_family.scale_by_eigenvalue_corrected_shampoo(
      b1,
      b2,
      eps,
      exponent=options.get("inverse_exponent_override") or 0.5,
      precondition_frequency=frequency,
      start_preconditioning_step=start,
      refresh=refresh,
      qr_iterations=iterations,
      tolerance=tolerance,
      layout=layout,
      grafting_type=kind,
      graft_b2=graft_b2,
      graft_eps=graft_eps,
      **statistics,
    )
    replay_layout = layout
  else:
    if tolerance and config in _ROOT_INVERSE:
      raise Unsupported("a root-inverse eigh with tolerance > 0 has no kl_precond equivalent")
    exponents = options.get("inverse_exponent_override") or None
    transform = shampoo_family.scale_by_shampoo(
      b1,
      b2,
      eps,
      exponents=exponents,
      precondition_frequency=frequency,
      start_preconditioning_step=start,
      layout=layout,
      kl_factors=config in _KL_CONFIGS,
      refresh=refresh,
      qr_iterations=iterations,
      tolerance=tolerance,
      grafting_type=kind,
      graft_b2=graft_b2,
      graft_eps=graft_eps,
      **statistics,
    )
    replay_layout = transform_layout(layout, exponents)
  decay, weight_decay = _meta_weight_decay(kwargs)
  # The reference keeps lr in a float32 tensor.
  learning_rate = float(np.float32(kwargs.get("lr", 1e-2)))
  return Recipe(
    transform,
    learning_rate,
    weight_decay,
    decay,
    False,
    replay_layout,
    TOLERANCE_META_X64,
    start,
    momentum,
  )


def _meta_weight_decay(kwargs: dict[str, Any]) -> tuple[str, float]:
  """Distributed Shampoo's ``weight_decay_type`` as ``(decay_order, λ)``: ``L2`` adds ``λW`` to
  the gradient; the others add ``αW`` to the search direction, with ``α = λ`` (``DECOUPLED``),
  ``λ·lr_t/peak_lr`` (``CORRECTED``; ``lr_t`` read back from a float32 tensor, ``peak_lr`` the
  constructor's ``lr``: a constant lr gives ``λ`` up to float32 rounding) or ``λ/peak_lr``
  (``INDEPENDENT``)."""
  kind = str(kwargs.get("weight_decay_type", "DECOUPLED")).rsplit(".", 1)[-1]
  decay = float(kwargs.get("weight_decay", 0.0))
  lr = float(kwargs.get("lr", 1e-2))
  alphas = {
    "L2": decay,
    "DECOUPLED": decay,
    "CORRECTED": decay * float(np.float32(lr)) / lr,
    "INDEPENDENT": decay / lr,
  }
  if kind not in alphas:
    raise Unsupported(f"weight_decay_type {kind} has no kl_precond equivalent")
  return ("l2" if kind == "L2" else "decoupled"), alphas[kind]


def _meta_momentum(text: Any) -> optax.GradientTransformation | None:
  """``ClassicMomentumConfig(momentum=μ, dampening=d, use_nesterov=n)``: ``M ← μM + (1-d)P``,
  then ``P ← (1-d)P + μM`` (Nesterov) or ``M``, i.e. ``optax.scale(1-d)`` then
  ``optax.trace(μ, n)``. Generalized primal averaging and Schedule-Free are refused."""
  name, options = _parse_call(None if text is None else str(text))
  if name is None:
    return None
  if name != "ClassicMomentumConfig":
    raise Unsupported(f"iterate averaging {name} has no kl_precond equivalent")
  unknown = set(options) - {"momentum", "dampening", "use_nesterov"}
  if unknown:
    raise Unsupported(f"ClassicMomentumConfig options {sorted(unknown)} have no equivalent")
  dampening = float(options.get("dampening", 0.0))
  return optax.chain(
    optax.scale(1 - dampening),
    optax.trace(float(options.get("momentum", 0.5)), bool(options.get("use_nesterov", False))),
  )


def transform_layout(layout: layout_lib.LayoutConfig, exponents: Any) -> layout_lib.LayoutConfig:
  """The layout that :func:`kl_precond.scale_by_shampoo` derives (zero exponents drop axes)."""
  return dataclasses.replace(layout, unfactored_axes=shampoo_family._unfactored_axes(exponents))


def recipe(sidecar: dict[str, Any]) -> Recipe:
  """Maps a golden sidecar (reference class and constructor kwargs) to a replay recipe."""
  reference = sidecar["reference"]
  kwargs = dict(sidecar["constructor_kwargs"])
  name = reference.get("class", "")
  if name == "SOAP":
    return _soap_recipe(kwargs, upstream=reference.get("repo") == "nikhilvyas/SOAP")
  if name == "KLOpt":
    return _klopt_recipe(kwargs)
  if name == "AdamWBF16":
    return _adamw_recipe(kwargs)
  if name.endswith("DistributedShampoo"):
    return _meta_recipe(kwargs)
  raise ValueError(f"No kl_precond mapping for reference class {name!r} ({reference}).")


def _load(path: str | pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  path = pathlib.Path(path)
  with np.load(path) as archive:
    arrays = {key: archive[key] for key in archive.files}
  sidecar = json.loads(path.with_suffix(".json").read_text())
  return arrays, sidecar


def _injector(
  arrays: dict[str, np.ndarray],
  names: Sequence[str],
  rule: Recipe,
  params: dict[str, Any],
  inject: str,
  x64: bool,
) -> Callable[[Any, int], Any]:
  """Returns ``f(state, call)`` that overwrites our bases with the reference's after a call."""
  if inject == "none" or rule.layout is None:
    return lambda state, call: state
  tree = layout_lib.tree_layout(params, rule.layout)
  leaf_index = {name: i for i, name in enumerate(sorted(names))}
  prefix = _basis_prefix(inject, x64)

  def inject_fn(state: Any, call: int) -> Any:
    if inject == "q0" and call != 0:
      return state
    # The preconditioner's state may sit inside a wrapper's (Shampoo's grafting).
    is_node = lambda n: isinstance(n, PreconditionerState)  # noqa: E731
    return jax.tree.map(lambda n: inject_node(n, call) if is_node(n) else n, state, is_leaf=is_node)

  def inject_node(state: Any, call: int) -> Any:
    buckets = list(state.buckets)
    for name in names:
      rows = tree.where[leaf_index[name]]
      if len(rows) != 1:  # the files store bases of unblocked tensors only
        continue
      ((bucket_id, row),) = rows
      bases = list(buckets[bucket_id].basis.bases)
      for axis in range(len(bases)):
        key = _basis_key(arrays, prefix, name, axis, 1)
        # A basis stage that stores no bases (Shampoo's cached roots, ``keep_bases=False``) has
        # one-element placeholders (blocks, 1): nothing to overwrite, and its roots do not
        # depend on the choice of eigenvectors within an eigenspace anyway.
        if key is not None and bases[axis] is not None and bases[axis].ndim == 3:
          value = arrays[key] if inject == "q0" else arrays[key][call]
          bases[axis] = bases[axis].at[row].set(jnp.asarray(value, bases[axis].dtype))
      basis = buckets[bucket_id].basis._replace(bases=tuple(bases))
      buckets[bucket_id] = buckets[bucket_id]._replace(basis=basis)
    return state._replace(buckets=tuple(buckets))

  return inject_fn


def _replay(path: str | pathlib.Path, x64: bool, inject: str) -> dict[str, np.ndarray]:
  arrays, sidecar = _load(path)
  names = [str(n) for n in arrays["param_names"]]
  dtype = np.float64 if x64 else np.float32
  rule = recipe(sidecar)
  params = {n: jnp.asarray(arrays[f"init/{n}"], dtype) for n in names}
  grads = {n: jnp.asarray(arrays[f"grads/{n}"], dtype) for n in names}
  learning_rate = jnp.asarray(rule.learning_rate, dtype)
  decay = jnp.asarray(rule.weight_decay, dtype)
  # The innermost transform of the replayed chain carries the bases (injection acts on it).
  # Jitted: one compilation instead of one per primitive of an eager ``init``.
  state = jax.jit(rule.transform.init)(params)
  update = jax.jit(rule.transform.update)
  momentum = rule.momentum
  momentum_state = None if momentum is None else momentum.init(params)
  inject_fn = _injector(arrays, names, rule, params, inject, x64)
  trajectory = {n: [np.asarray(params[n])] for n in names}
  for call in range(grads[names[0]].shape[0]):
    grad = {n: grads[n][call] for n in names}
    if rule.decay_order == "l2":
      grad = {n: grad[n] + decay * params[n] for n in names}
    direction, state = update(grad, state, params)
    state = inject_fn(state, call)
    if momentum is not None:
      if rule.decay_order == "decoupled":
        direction = {n: direction[n] + decay * params[n] for n in names}
      direction, momentum_state = momentum.update(direction, momentum_state)
      params = _apply(params, direction, learning_rate, decay, "l2")
    elif not (rule.skips_first_call and call == 0):
      params = _apply(params, direction, learning_rate, decay, rule.decay_order)
    for n in names:
      trajectory[n].append(np.asarray(params[n]))
  return {n: np.stack(v) for n, v in trajectory.items()}


def _apply(params: Any, direction: Any, lr: jax.Array, decay: jax.Array, order: str) -> Any:
  def one(p: jax.Array, u: jax.Array) -> jax.Array:
    if order == "before":
      return p * (1 - lr * decay) - lr * u
    if order == "decoupled":
      return p - lr * (u + decay * p)
    if order == "l2":
      return p - lr * u
    p = p - lr * u
    return p - lr * decay * p

  return jax.tree.map(one, params, direction)


def replay(
  path: str | pathlib.Path, *, x64: bool = True, inject: str = "none"
) -> dict[str, np.ndarray]:
  """Replays a golden file with our optimizer; returns ``{name: (calls+1, *shape)}``.

  Args:
    path: the ``.npz`` file; its ``.json`` sidecar must sit beside it.
    x64: replay in float64 (compare with ``params_linalg64``); else float32 (``params``).
    inject: ``"none"``, ``"q0"`` (overwrite our first eigenbasis with the reference's, for
      tensors whose first factor is rank deficient) or ``"all"`` (after every call, where the
      file stores it).

  Returns:
    Our parameter trajectory per tensor, laid out like the file's ``params/<name>``.
  """
  if x64:
    with jax.enable_x64(True):
      return _replay(path, True, inject)
  return _replay(path, False, inject)


def well_posed(path: str | pathlib.Path) -> dict[str, bool]:
  """Per tensor: is every Kronecker factor full rank when the first basis is computed?

  The factor of axis ``i`` at call ``c`` spans the mode-``i`` unfoldings of the first ``c``
  gradients, so it is full rank when their concatenation has rank ``d_i``.
  """
  arrays, sidecar = _load(path)
  rule = recipe(sidecar)
  result = {}
  for name in (str(n) for n in arrays["param_names"]):
    stream = arrays[f"grads/{name}"][: rule.first_basis_call]
    if rule.layout is None:
      result[name] = True
      continue
    tensor = layout_lib.tensor_layout(stream.shape[1:], rule.layout)
    per_call = [layout_lib.to_blocks(jnp.asarray(g), tensor) for g in stream]
    ok = True
    for index, block in enumerate(tensor.blocks):
      for axis, factored in enumerate(block.preconditioned):
        if factored:
          unfolding = np.concatenate(
            [
              np.moveaxis(np.asarray(blocks[index]), axis, 0).reshape(block.shape[axis], -1)
              for blocks in per_call
            ],
            axis=1,
          )
          ok &= bool(np.linalg.matrix_rank(unfolding) == block.shape[axis])
    result[name] = ok
  return result


def relative_errors(ours: np.ndarray, reference: np.ndarray) -> float:
  """Max abs error over all calls divided by the max abs total displacement."""
  displacement = np.max(np.abs(reference[-1] - reference[0]))
  return float(np.max(np.abs(ours - reference)) / max(displacement, 1e-300))


# What a float64 replay is compared with: the reference with float64 decompositions (SOAP,
# KLOpt), the reference under torch's float64 default dtype (Distributed Shampoo), or as is.
_X64_REFERENCES = ("params_linalg64", "params_default64", "params")


def _basis_prefix(inject: str, x64: bool) -> str:
  """The key prefix of the reference's bases that ``inject`` reads: the first basis (``q0``) or
  every call's (``q``), from the reference with float64 decompositions (``_linalg64``) when
  replaying in float64. (Distributed Shampoo's per-call ``q_default64`` bases are not read: set
  after a refresh, they would leave our moments in the previous basis.)"""
  stem = "q0" if inject == "q0" else "q"
  return f"{stem}_linalg64" if x64 else stem


def _basis_key(
  arrays: dict[str, np.ndarray], prefix: str, name: str, axis: int, blocks: int
) -> str | None:
  """The file's key of the basis of ``axis`` of an unblocked tensor, ``prefix/name/axis``; None
  if the file does not store it, or the tensor has several blocks (the references that store
  bases this way do not block). Distributed Shampoo's per-block ``q/name/block/axis`` is not
  read (see :func:`_basis_prefix`)."""
  key = f"{prefix}/{name}/{axis}"
  return key if blocks == 1 and key in arrays else None


def _fully_injected(arrays: dict[str, np.ndarray], name: str, inject: str, rule: Recipe) -> bool:
  """Does the file store an injectable basis for every factor of this tensor (every factored
  axis of every block of ``rule``'s layout; a recipe without a layout injects nothing)?"""
  if inject == "none" or rule.layout is None:
    return False
  prefix = _basis_prefix(inject, True)
  shape = arrays[f"init/{name}"].shape
  blocks = layout_lib.tensor_layout(shape, rule.layout).blocks
  return all(
    _basis_key(arrays, prefix, name, axis, len(blocks)) is not None
    for block in blocks
    for axis, factored in enumerate(block.preconditioned)
    if factored
  )


def injection_for(path: str | pathlib.Path, name: str) -> str | None:
  """``"q0"`` when the file stores the reference's first basis for every factor of tensor
  ``name`` (injecting it makes a tensor whose first factors are rank-deficient replayable),
  else None. (Every call's bases, ``"all"``, are not offered: replacing a basis after a
  refresh leaves the moments kept in the previous one behind.)"""
  arrays, sidecar = _load(path)
  return "q0" if _fully_injected(arrays, name, "q0", recipe(sidecar)) else None


def check(path: str | pathlib.Path, *, inject: str = "none") -> dict[str, dict[str, Any]]:
  """Replays in float64 and float32 and compares; returns one record per tensor.

  A tensor is judged against the tolerances when it is well-posed, or when ``inject`` replaces
  every one of its bases with the reference's.
  """
  arrays, sidecar = _load(path)
  rule = recipe(sidecar)
  posed = well_posed(path)
  ours64 = replay(path, x64=True, inject=inject)
  ours32 = replay(path, x64=False, inject=inject)
  records = {}
  for name, trajectory in ours64.items():
    ref64 = next(
      arrays[f"{prefix}/{name}"] for prefix in _X64_REFERENCES if f"{prefix}/{name}" in arrays
    )
    err64 = relative_errors(trajectory, ref64)
    err32 = relative_errors(ours32[name], arrays[f"params/{name}"])
    passed = err64 <= rule.tolerance_x64 and err32 <= TOLERANCE_F32
    records[name] = {
      "well_posed": posed[name],
      "reference_x64": next(p for p in _X64_REFERENCES if f"{p}/{name}" in arrays),
      "tolerance_x64": rule.tolerance_x64,
      "error_x64": err64,
      "error_f32_vs_params": err32,
      "passed": passed,
      "judged": posed[name] or _fully_injected(arrays, name, inject, rule),
      "finite": bool(np.all(np.isfinite(trajectory))),
    }
  return records


def _format(path: str, records: dict[str, dict[str, Any]]) -> str:
  lines = [
    f"{path}",
    f"  {'tensor':<10} {'posed':<6} {'x64 vs ref64':>16} {'f32 vs params':>14}  status",
  ]
  for name, r in records.items():
    status = (
      ("ok" if r["passed"] else "FAIL")
      if r["judged"]
      else ("reported" + ("" if r["passed"] else " (ill-posed, not judged)"))
    )
    lines.append(
      f"  {name:<10} {str(r['well_posed']):<6} {r['error_x64']:>16.3e} "
      f"{r['error_f32_vs_params']:>14.3e}  {status}"
    )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  import argparse

  parser = argparse.ArgumentParser(
    prog="python -m kl_precond.parity",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("files", nargs="+")
  parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
  parser.add_argument("--inject", choices=("none", "q0", "all"), default="none")
  args = parser.parse_args(argv)
  results: dict[str, Any] = {}
  failed = unsupported = False
  for path in args.files:
    try:
      records = check(path, inject=args.inject)
    except Unsupported as error:
      unsupported = True
      results[path] = {"unsupported": str(error)}
      if not args.json:
        print(f"{path}\n  not replayable: {error}")
      continue
    results[path] = records
    failed |= any(r["judged"] and not r["passed"] for r in records.values())
    if not args.json:
      print(_format(path, records))
  if args.json:
    print(json.dumps(results, indent=2))
  verdict = "FAILED" if failed else "all judged tensors passed"
  print(
    f"tolerances: x64 {TOLERANCE_X64:g} (SOAP, KLOpt, AdamW vs params_linalg64) or "
    f"{TOLERANCE_META_X64:g} (Distributed Shampoo vs params_default64), f32 "
    f"{TOLERANCE_F32:g} (vs params); {verdict}"
    + ("; some configurations have no kl_precond equivalent (exit 3)" if unsupported else ""),
    file=sys.stderr,
  )
  return 1 if failed else (3 if unsupported else 0)


__all__ = [
  "Unsupported",
  "check",
  "injection_for",
  "main",
  "recipe",
  "relative_errors",
  "replay",
  "well_posed",
]


if __name__ == "__main__":
  sys.exit(main())
