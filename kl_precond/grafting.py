"""Grafting: take the direction of one optimizer and the per-block step size of another.

.. math::

  P = \\begin{cases}
    P_m & t < t_0 \\\\
    P_d \\, \\dfrac{\\lVert P_m \\rVert_F}{\\lVert P_d \\rVert_F + \\epsilon} & t \\ge t_0
  \\end{cases}

per block (the layout's blocks, or whole tensors), with ``P_d`` the direction (e.g. Shampoo),
``P_m`` the magnitude (SGD, AdaGrad, RMSprop or Adam) and ``t_0`` the
``start_preconditioning_step``. Both transforms see every gradient, so their states stay warm.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kl_precond import layout as layout_lib
from kl_precond import tensor_ops
from kl_precond._validation import (
  check_beta,
  check_bool,
  check_choice,
  check_dtype,
  check_integer,
  check_nonnegative,
  check_stage,
)


class GraftState(NamedTuple):
  """State of :func:`graft`."""

  count: jax.Array  # type: ignore[assignment]  # (), int32: calls so far
  direction: Any  # the direction transform's state
  magnitude: Any  # the magnitude transform's state


def _rescale(direction: jax.Array, magnitude: jax.Array, eps: Any, axes: Any = None) -> jax.Array:
  """``D · ‖M‖ / (‖D‖ + ε)``, norms over ``axes`` (a block's axes of a tiled view; all: None)."""
  dtype = jnp.promote_types(direction.dtype, jnp.float32)
  norm_d = _norm(direction.astype(dtype), axes)
  norm_m = _norm(magnitude.astype(dtype), axes)
  return (direction * (norm_m / (norm_d + eps)).astype(direction.dtype)).astype(direction.dtype)


def _norm(x: jax.Array, axes: Any = None) -> jax.Array:
  """Frobenius norm computed as ``max|x| · ‖x / max|x|‖`` so tiny blocks do not underflow."""
  peak = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
  safe = jnp.where(peak > 0, peak, 1)
  return peak * jnp.sqrt(jnp.sum((x / safe) ** 2, axis=axes, keepdims=True))


def graft(
  direction: optax.GradientTransformation,
  magnitude: optax.GradientTransformation,
  *,
  layout: layout_lib.LayoutConfig | None = None,
  start_preconditioning_step: int = 0,
  eps: Any = 1e-16,
  nonfinite: str = "skip",
) -> optax.GradientTransformation:
  """Rescales ``direction``'s update, block by block, to the norm of ``magnitude``'s update.

  Args:
    direction: the transform whose direction is kept (e.g. :func:`scale_by_shampoo` without
      grafting).
    magnitude: the transform whose per-block Frobenius norm is used (e.g.
      :func:`graft_magnitude`).
    layout: blocks over which norms are taken (``None``: whole tensors).
    start_preconditioning_step: ``t_0``: before it (counting calls from 1) the update is
      ``magnitude``'s own.
    eps: added to the direction's norm.
    nonfinite: ``"skip"``: a call with a NaN/Inf gradient, or one whose squared norm (of any
      block; of any tensor without a layout) exceeds the range of the magnitude's state dtype, so that its moments could
      overflow, returns zeros and keeps the magnitude's state and the step counter (the direction
      handles its own state); a float16 magnitude state is instead checked after the step. A
      :class:`HoldingTransformation` magnitude (:func:`graft_magnitude`) keeps its state itself,
      in place; any other is selected against its previous state.
      ``"propagate"``: no check.

  Returns:
    An ``optax.GradientTransformation``.
  """
  check_stage("direction", direction, ("init", "update"))
  check_stage("magnitude", magnitude, ("init", "update"))
  layout_lib.check_layout("layout", layout)
  check_integer("start_preconditioning_step", start_preconditioning_step, 0)
  check_nonnegative("eps", eps)
  check_choice("nonfinite", nonfinite, ("skip", "propagate"))

  def init_fn(params: Any) -> GraftState:
    return GraftState(jnp.zeros((), jnp.int32), direction.init(params), magnitude.init(params))

  def rows(updates: Any) -> tuple[Any, Any, tuple[int, ...]]:
    """How to stack the tree's blocks into rows and back, and each stack's real rows.

    With a layout, blocks of equal shape are stacked into buckets (as the preconditioner stacks
    them), so the compiled step holds one set of norms and checks per bucket, not per leaf, and
    does not grow with the depth of a model of repeated layers. Without one, every tensor is a
    stack of one row.
    """
    if layout is None:
      treedef: Any = jax.tree.structure(updates)
      sizes = tuple(1 for _ in range(treedef.num_leaves))

      def gather(tree: Any) -> tuple[jax.Array, ...]:
        return tuple(x[None] for x in treedef.flatten_up_to(tree))

      def scatter(stacks: Any) -> Any:
        return treedef.unflatten([x[0] for x in stacks])

      return gather, scatter, sizes
    tree = layout_lib.tree_layout(updates, layout)
    sizes = tuple(len(bucket.members) for bucket in tree.buckets)
    return (
      lambda t: layout_lib.gather(t, tree),
      lambda stacks: layout_lib.scatter(stacks, tree),
      sizes,
    )

  def graft_rows(d: Any, m: Any, count: jax.Array) -> list[jax.Array]:
    """Each row of ``d`` rescaled to the norm of the same row of ``m`` (from ``t_0``)."""
    preconditioning = count + 1 >= start_preconditioning_step
    return [
      jnp.where(preconditioning, _rescale(sd, sm, eps, tuple(range(1, sd.ndim))), sm)
      for sd, sm in zip(d, m, strict=True)
    ]

  def update_fn(updates: Any, state: GraftState, params: Any = None) -> tuple[Any, GraftState]:
    gather, scatter, sizes = rows(updates)
    # The direction guards its own state (it is never passed through a conditional here).
    d, direction_state = direction.update(updates, state.direction, params)
    if nonfinite == "skip" and not tensor_ops.narrower_than_float32(state.magnitude):
      # Decided from the gradient alone, before the magnitude step (every element of a block is
      # at most its norm, so no moment can overflow).
      ok = tensor_ops.all_of(
        [tensor_ops.within_range(g, 1.0, state.magnitude) for g in gather(updates)]
      )

      if isinstance(magnitude, HoldingTransformation):
        # The magnitude holds its own state (rewritten in place, unchanged) on a skipped call.
        m, magnitude_state = magnitude.update(updates, state.magnitude, params, hold=~ok)
        out = graft_rows(gather(d), gather(m), state.count)
      else:
        m, new_magnitude = magnitude.update(updates, state.magnitude, params)
        out = graft_rows(gather(d), gather(m), state.count)
        # Selected only once ``out`` exists, so the old state has no reader left when the
        # select overwrites it, and XLA can update it in place.
        magnitude_state = tensor_ops.after(
          jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_magnitude, state.magnitude), out
        )
      count = jnp.where(ok, optax.safe_increment(state.count), state.count)
      # A non-finite step from finite state (only with graft eps = 0): a zero update. Padding
      # rows (zero blocks: 0/0 with eps = 0) are not part of it.
      finite = tensor_ops.all_finite([u[:n] for u, n in zip(out, sizes, strict=True)])
      out = [jnp.where(ok & finite, u, jnp.zeros_like(u)) for u in out]
      return scatter(out), GraftState(count, direction_state, magnitude_state)
    m, magnitude_state = magnitude.update(updates, state.magnitude, params)
    out = scatter(graft_rows(gather(d), gather(m), state.count))
    new = (out, GraftState(optax.safe_increment(state.count), direction_state, magnitude_state))
    if nonfinite == "propagate":
      return new
    # A float16 magnitude state: check the new state instead of bounding the gradient.
    healthy = tensor_ops.all_finite(state.magnitude)
    ok = tensor_ops.all_finite(updates) & (tensor_ops.all_finite((out, magnitude_state)) | ~healthy)
    kept = (jax.tree.map(jnp.zeros_like, out), state._replace(direction=direction_state))
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, kept)

  return optax.GradientTransformation(init_fn, update_fn)


class MagnitudeState(NamedTuple):
  """State of :func:`graft_magnitude`."""

  count: jax.Array  # type: ignore[assignment]  # (), int32
  mu: Any  # params-shaped first moment (filtered gradient)
  nu: Any  # params-shaped second moment


class HoldingTransformation(optax.GradientTransformationExtraArgs):
  """A transform whose ``update`` takes a keyword ``hold``: a traced flag (or None) where set,
  the state comes back unchanged whatever the gradient holds (NaN included), and the update is
  meaningless. :func:`graft` skips a call through it, so the moments are rewritten in place
  (EMA weights ``(1, 0)``) instead of being selected against a copy of the old ones."""

  __slots__ = ()


def graft_magnitude(
  kind: str = "adam",
  b1: Any = 0.9,
  b2: Any = 0.999,
  eps: Any = 1e-8,
  *,
  dtype: Any = None,
  debias_first_moment: bool = True,
  b3: Any = None,
) -> HoldingTransformation:
  """The diagonal optimizers used as grafting magnitudes (Distributed Shampoo's options).

  All share the bias-corrected filtered gradient ``Ḡ = M / (1 - β₁ᵗ)``,
  ``M ← β₁ M + (1-β₁) G``; the second moment ``V`` uses the raw gradient:

  * ``"sgd"``: ``P = Ḡ`` (``optax.ema(b1, debias=True)``);
  * ``"adagrad"``: ``V ← V + G²``, ``P = Ḡ / (√V + ε)``;
  * ``"rmsprop"``: ``V ← β₂ V + (1-β₂) G²``, ``P = Ḡ / (√V + ε)``;
  * ``"adam"``: ``P = Ḡ / (√(V / (1-β₂ᵗ)) + ε)`` (``optax.scale_by_adam``).

  Args:
    kind: ``"sgd"``, ``"adagrad"``, ``"rmsprop"`` or ``"adam"``.
    b1: EMA weight of the filtered gradient.
    b2: EMA weight of the second moment (RMSprop, Adam).
    eps: added to the root of the second moment.
    dtype: storage dtype of the moments (``None``: the parameters'; the arithmetic runs in
      float32 at least). With ``None``, ``"adam"`` and ``"sgd"`` do the arithmetic of
      ``optax.scale_by_adam`` and ``optax.ema(debias=True)``, op for op (bit for bit outside
      ``jit``; under ``jit`` XLA may fuse the two differently), in their state types.
    debias_first_moment: ``False``: ``Ḡ = M`` (Distributed Shampoo's
      ``use_bias_correction=False``; Adam's ``V`` is still bias-corrected, as there).
    b3: Distributed Shampoo's ``beta3``: ``Ḡ`` looks ahead,
      ``(M_{t-1} + (1-β₃)(G - M_{t-1})) / (1 - β₃β₁^{t-1})``
      (:func:`kl_precond.tensor_ops.filtered_gradient`); ``None``: ``β₁``.

  Returns:
    A :class:`HoldingTransformation` (an ``optax.GradientTransformationExtraArgs``).
  """
  check_choice("kind", kind, ("sgd", "adagrad", "rmsprop", "adam"))
  check_beta("b1", b1)
  check_beta("b2", b2)
  if b3 is not None:
    check_beta("b3", b3)
  check_nonnegative("eps", eps)
  check_dtype("dtype", dtype)
  check_bool("debias_first_moment", debias_first_moment)
  # optax's own state types (and arithmetic in the moments' dtype) for its two optimizers.
  as_optax = dtype is None and kind in ("adam", "sgd") and debias_first_moment and b3 is None

  def init_fn(params: Any) -> Any:
    if as_optax and kind == "adam":
      return optax.scale_by_adam(b1, b2, eps).init(params)
    if as_optax:
      return optax.ema(b1, debias=True).init(params)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, dtype or p.dtype), params)
    return MagnitudeState(jnp.zeros((), jnp.int32), zeros, zeros)

  def work(x: jax.Array) -> Any:
    return x.dtype if as_optax else jnp.promote_types(x.dtype, jnp.float32)

  def update_fn(
    updates: Any, state: Any, params: Any = None, *, hold: Any = None, **extra_args: Any
  ) -> tuple[Any, Any]:
    del params, extra_args
    count = optax.safe_increment(state.count)
    if hold is not None:
      count = jnp.where(hold, state.count, count)
    first = state.ema if isinstance(state, optax.EmaState) else state.mu
    grads = jax.tree.map(lambda g, m: tensor_ops.zeroed(g.astype(work(m)), hold), updates, first)
    if b3 is None:
      beta1, weight1 = tensor_ops.held(hold, b1, 1 - b1)
      mu = jax.tree.map(lambda m, g: beta1 * m.astype(g.dtype) + weight1 * g, first, grads)
      # optax's bias correction on the whole tree, as optax calls it: bit for bit the same.
      out = optax.tree_utils.tree_bias_correction(mu, b1, count) if debias_first_moment else mu
    else:
      pairs = jax.tree.map(
        lambda m, g: tensor_ops.filtered_gradient(
          m.astype(g.dtype), g, b1, count, hold, b3=b3, bias_correction=debias_first_moment
        ),
        first,
        grads,
      )
      mu = jax.tree.map(lambda _, pair: pair[0], first, pairs)
      out = jax.tree.map(lambda _, pair: pair[1], first, pairs)
    mu = jax.tree.map(lambda new, old: new.astype(old.dtype), mu, first)
    if isinstance(state, optax.EmaState):
      new_state: Any = optax.EmaState(count, mu)
    elif kind == "sgd":
      new_state = state._replace(count=count, mu=mu)
    else:
      if kind == "adagrad":  # a sum over calls: saturate instead of overflowing to inf
        nu = jax.tree.map(
          lambda v, g: jnp.minimum(v.astype(g.dtype) + g**2, jnp.finfo(v.dtype).max),
          state.nu,
          grads,
        )
      else:
        beta2, weight2 = tensor_ops.held(hold, b2, 1 - b2)
        nu = jax.tree.map(lambda v, g: beta2 * v.astype(g.dtype) + weight2 * g**2, state.nu, grads)
      second = optax.tree_utils.tree_bias_correction(nu, b2, count) if kind == "adam" else nu
      out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), out, second)
      nu = jax.tree.map(lambda new, old: new.astype(old.dtype), nu, state.nu)
      new_state = state._replace(count=count, mu=mu, nu=nu)
    return jax.tree.map(lambda o, g: o.astype(g.dtype), out, updates), new_state

  return HoldingTransformation(init_fn, update_fn)
