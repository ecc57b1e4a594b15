"""Independent float64 NumPy references of SOAP, KL-SOAP and KL-Shampoo, written from SPEC.md.

Plain per-tensor loops with explicit unfoldings (``np.moveaxis(...).reshape``) and ``np.linalg``;
no code is shared with the package. Each function maps a list of gradients to the list of
update directions (before learning rate and weight decay); the first call returns zeros.
"""

from __future__ import annotations

import numpy as np


def unfold(x: np.ndarray, axis: int) -> np.ndarray:
  return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def fold(matrix: np.ndarray, axis: int, shape: tuple[int, ...]) -> np.ndarray:
  moved = (shape[axis],) + tuple(d for i, d in enumerate(shape) if i != axis)
  return np.moveaxis(matrix.reshape(moved), 0, axis)


def mode_apply(x: np.ndarray, matrix: np.ndarray, axis: int) -> np.ndarray:
  """Multiplies the mode-``axis`` unfolding from the left: ``fold(matrix @ X_(axis))``."""
  return fold(matrix @ unfold(x, axis), axis, x.shape)


def rotate(x: np.ndarray, bases: list, transpose: bool) -> np.ndarray:
  for axis, q in enumerate(bases):
    if q is not None:
      x = mode_apply(x, q.T if transpose else q, axis)
  return x


def eigh_desc(matrix: np.ndarray) -> np.ndarray:
  _, vectors = np.linalg.eigh(matrix)
  return vectors[:, ::-1]


def soap_reference(
  grads, *, b1, b2, eps, beta, every, sort, bias_correction=True, factored=None, phase=0
):
  """SOAP (SPEC.md "SOAP"); ``factored[i]`` says which axes get a factor. ``phase``: refresh
  after the steps ``t ≡ phase (mod every)`` (a staggered block's own phase; 0: SOAP's)."""
  shape = grads[0].shape
  factored = factored if factored is not None else [True] * len(shape)
  factors = [np.zeros((d, d)) if f else None for d, f in zip(shape, factored, strict=True)]
  mu, nu, bases, out, step = np.zeros(shape), np.zeros(shape), None, [], 0
  for g in grads:
    if bases is None:
      factors = [
        None if f is None else (1 - beta) * unfold(g, i) @ unfold(g, i).T
        for i, f in enumerate(factors)
      ]
      bases = [None if f is None else eigh_desc(f) for f in factors]
      out.append(np.zeros(shape))
      continue
    step += 1
    gp = rotate(g, bases, transpose=True)
    mu = b1 * mu + (1 - b1) * gp
    nu = b2 * nu + (1 - b2) * gp**2
    u = rotate(mu / (np.sqrt(nu) + eps), bases, transpose=False)
    if bias_correction:
      u = u * np.sqrt(1 - b2**step) / (1 - b1**step)
    out.append(u)
    factors = [
      None if f is None else beta * f + (1 - beta) * unfold(g, i) @ unfold(g, i).T
      for i, f in enumerate(factors)
    ]
    if (step - phase) % every == 0:
      mu_param = rotate(mu, bases, transpose=False)
      new_bases = []
      for i, (f, q) in enumerate(zip(factors, bases, strict=True)):
        if f is None:
          new_bases.append(None)
          continue
        if sort:
          order = np.argsort(-np.diag(q.T @ f @ q), kind="stable")
          q = q[:, order]
          nu = np.take(nu, order, axis=i)
        new_bases.append(np.linalg.qr(f @ q)[0])
      bases = new_bases
      mu = rotate(mu_param, bases, transpose=True)
  return out


def _clamp_root(ell: np.ndarray, dim: int, cap, clamp: str = "absolute") -> np.ndarray:
  kappa = None if cap is None else max(10.0, min(float(dim), cap))
  if kappa is not None and clamp == "relative":
    ell = np.maximum(ell, np.max(ell) / kappa**2)
  with np.errstate(divide="ignore"):
    root = np.where(ell > 0, 1 / np.sqrt(np.where(ell > 0, ell, 1)), 0.0)
  if kappa is not None and clamp == "absolute":
    root = np.minimum(root, kappa)
  return root


def kl_reference(
  grads,
  *,
  b1,
  b2,
  eps,
  beta,
  every,
  klsoap,
  init_factor=0.1,
  cap=4000.0,
  start="constant",
  clamp="absolute",
  phase=0,
):
  """KL-Shampoo / KL-SOAP for 2-D and 3-D tensors (SPEC.md, kl_methods_spec.md §2.4).

  ``start="constant"``, ``clamp="absolute"`` is the authors' code. The data starts (our
  defaults), from the math: the first call whitens by ``a I`` on every other axis with
  ``a^k = mean(G²)`` (``k`` the order), so ``F_i = (1-β)(d_i/N) G_(i)G_(i)ᵀ / a^(k-1)``; then
  ``ℓ_i`` starts at ``tr(Δ_i)/d_i`` (``"trace"``) or at the eigenvalues of ``Δ_i = F_i/(1-β)``
  in the first basis (``"eigh"``, ``"debiased"``); ``"debiased"`` updates ``ℓ`` with weight
  ``(1-β)/(1-β^(t+1))``. ``clamp="relative"``: ``ℓ ≥ max ℓ / κ²``.
  """
  shape = grads[0].shape
  order, numel = len(shape), int(np.prod(shape))
  factors = [np.zeros((d, d)) for d in shape]
  roots = [np.full(d, init_factor**-0.5) for d in shape]
  mu, nu, bases, out, step = np.zeros(shape), np.zeros(shape), None, [], 0

  def whitened_gram(g, axis, use_roots):
    y = g
    for j in range(order):
      if j != axis:
        y = mode_apply(y, (bases[j] * use_roots[j][None, :]).T, j)
    return unfold(y, axis) @ unfold(y, axis).T

  def target(gp, axis, use_roots):
    scaled = gp.copy()
    for j in range(order):
      if j != axis:
        view = [1] * order
        view[j] = shape[j]
        scaled = scaled * use_roots[j].reshape(view)
    return np.mean(unfold(scaled, axis) ** 2, axis=1)

  def ema_root(axis, tgt):
    ell = np.where(roots[axis] != 0, 1 / np.where(roots[axis] != 0, roots[axis], 1) ** 2, 0.0)
    rate = (1 - beta) / (1 - beta ** (step + 1)) if start == "debiased" else 1 - beta
    ell = (1 - rate) * ell + rate * tgt
    return _clamp_root(ell, shape[axis], cap, clamp)

  for g in grads:
    if bases is None:
      whitening = 1.0 if start == "constant" else np.mean(g**2) ** ((order - 1) / order)
      factors = [
        (1 - beta) * shape[i] / numel * unfold(g, i) @ unfold(g, i).T / whitening
        for i in range(order)
      ]
      bases = [eigh_desc(f) for f in factors]
      if start != "constant":
        for i in range(order):
          delta = factors[i] / (1 - beta)
          if start == "trace":
            ell = np.full(shape[i], np.trace(delta) / shape[i])
          else:
            ell = np.diag(bases[i].T @ delta @ bases[i])
          roots[i] = _clamp_root(ell, shape[i], cap, clamp)
      out.append(np.zeros(shape))
      continue
    step += 1
    if klsoap:
      gp = rotate(g, bases, transpose=True)
      mu = b1 * mu + (1 - b1) * gp
      nu = b2 * nu + (1 - b2) * gp**2
      out.append(rotate(mu / (np.sqrt(nu) + eps), bases, transpose=False))
    else:
      mu = b1 * mu + (1 - b1) * g
      p = roots[0][:, None] * roots[1][None, :]
      if order == 3:
        p = p[:, :, None] * roots[2][None, None, :]
      out.append(rotate(rotate(mu, bases, True) * p / (1 + eps * p), bases, transpose=False))
    gp = rotate(g, bases, transpose=True)
    coef = [(1 - beta) * shape[i] / numel for i in range(order)]
    old = [r.copy() for r in roots]
    if order == 2:
      for i in range(2):
        factors[i] = beta * factors[i] + coef[i] * whitened_gram(g, i, old)
      roots = [ema_root(i, target(gp, i, old)) for i in range(2)]
    else:
      factors[2] = beta * factors[2] + coef[2] * whitened_gram(g, 2, old)
      factors[1] = beta * factors[1] + coef[1] * whitened_gram(g, 1, old)
      roots[2] = ema_root(2, target(gp, 2, old))
      roots[1] = ema_root(1, target(gp, 1, [old[0], old[1], roots[2]]))
      mixed = [old[0], roots[1], old[2]]
      factors[0] = beta * factors[0] + coef[0] * whitened_gram(g, 0, mixed)
      roots[0] = ema_root(0, target(gp, 0, mixed))
    if (step - phase) % every == 0:
      mu_param = rotate(mu, bases, transpose=False) if klsoap else None
      bases = [np.linalg.qr(f @ q)[0] for f, q in zip(factors, bases, strict=True)]
      if klsoap:
        mu = rotate(mu_param, bases, transpose=True)
  return out


def _diagonal_enough(b, tolerance):
  """Distributed Shampoo's test ``‖B - diag B‖_F <= tolerance ‖B‖_F`` (NaN, i.e. False, when
  rounding makes the difference of squares negative)."""
  norm = np.linalg.norm(b)
  with np.errstate(invalid="ignore"):
    off = np.sqrt(norm**2 - np.linalg.norm(np.diag(b)) ** 2)
  return bool(off <= tolerance * norm)


def _accumulation(b2, t, use_bias_correction, drop_weighting):
  """Distributed Shampoo's weight of a new outer product and its ``bias_correction2``: weight 1
  for a sum (``β₂ = 1``) or with ``drop_weighting_factor_on_gsquare``, else ``1 - β₂``; the
  factors are divided by ``1 - β₂ᵗ`` only when they are an EMA and bias correction is on."""
  weighting = 1.0 if drop_weighting or b2 == 1.0 else 1 - b2
  corrected = use_bias_correction and b2 < 1.0 and not drop_weighting
  return weighting, (1 - b2**t if corrected else 1.0)


def _trace_scaled(a, exponent, eps):
  """``use_trace_scaling``: the bias-corrected factor times ``max(tr, ε)^(-exponent)``."""
  if exponent is None:
    return a
  return a * max(np.trace(a), eps) ** -exponent


def _filtered(m, g, t, b1, beta3, use_bias_correction):
  """Distributed Shampoo's ``_compute_filtered_grad_list``: ``beta3 = -1`` means ``b1``; a
  ``beta3 ≠ b1`` lerps the old EMA towards ``G`` with ``1 - beta3``; the correction is
  ``1 - beta3·b1^(t-1)``; with ``b1 = 0`` the raw gradient. Returns ``(M, Ḡ)``."""
  if b1 == 0:
    return m, g
  beta3 = b1 if beta3 == -1 else beta3
  ahead = m + (1 - beta3) * (g - m)
  m = m + (1 - b1) * (g - m)
  filtered = ahead if beta3 != b1 else m
  if use_bias_correction:
    filtered = filtered / (1 - beta3 * b1 ** (t - 1))
  return m, filtered


def _descend(w, direction, lr, weight_decay, momentum, buffer):
  """``W ← W - lr·P`` with ``P = direction + λW`` (decoupled decay added to the search direction)
  and, with ``momentum = (μ, dampening, nesterov)`` (``ClassicMomentumConfig``),
  ``M ← μM + (1-d)P`` and ``P ← (1-d)P + μM`` (Nesterov) or ``M``. Returns ``(W, M)``."""
  p = direction + weight_decay * w
  if momentum is not None:
    mu, dampening, nesterov = momentum
    buffer = mu * buffer + (1 - dampening) * p
    p = (1 - dampening) * p + mu * buffer if nesterov else buffer
  return w - lr * p, buffer


def _grafted(shampoo, filtered, g, v, t, start, graft):
  """Distributed Shampoo's Adam grafting (``graft = (beta2, epsilon)``, or ``None``): the
  filtered gradient over Adam's denominator alone before ``start``, after it the Shampoo
  direction at that step's norm. Returns the direction and the new second moment."""
  if graft is None:
    return shampoo, v
  graft_b2, graft_eps = graft
  v = graft_b2 * v + (1 - graft_b2) * g**2
  adam = filtered / (np.sqrt(v / (1 - graft_b2**t)) + graft_eps)
  if t < start:
    return adam, v
  return shampoo * np.linalg.norm(adam) / (np.linalg.norm(shampoo) + 1e-16), v


def distributed_shampoo_reference(
  init,
  grads,
  *,
  lr,
  b1,
  b2,
  eps,
  weight_decay,
  every,
  start,
  kl=False,
  graft=None,
  exponents=None,
  refresh="eigh",
  iterations=1,
  tolerance=0.0,
  use_bias_correction=True,
  drop_weighting=False,
  trace_scaling=None,
  beta3=-1.0,
  momentum=None,
  phase=0,
):
  """Distributed Shampoo's root-inverse Shampoo (``kl=True``: its simplified KL-Shampoo), one
  block per tensor, written from the golden sidecars' ``semantics`` (shared/golden). With
  ``refresh="qr"`` or a ``tolerance``: its ``EigendecomposedShampooPreconditionerConfig``, whose
  eigenpairs come from ``matrix_eigendecomposition`` (QR algorithm warm-started from the stored
  eigenvectors, or eigh skipped where they already diagonalise the factor to the tolerance).

  ``init``: one array; ``grads``: a list of arrays. ``graft``: ``None`` or Adam grafting's
  ``(beta2, epsilon)``. ``exponents``: per-axis root exponents (default ``1/(2·order)``; ``0``:
  the axis is not preconditioned). ``use_bias_correction``, ``drop_weighting``
  (``drop_weighting_factor_on_gsquare``) and ``trace_scaling`` (``trace_scaling_exponent`` when
  ``use_trace_scaling``, else ``None``) and ``beta3`` as Distributed Shampoo's options; ``b2 = 1``
  sums. ``momentum``: ``ClassicMomentumConfig``'s ``(momentum, dampening, use_nesterov)``.
  Decoupled weight decay, ``W ← W - lr (P + λW)``. Returns the parameter trajectory
  ``[W_0, W_1, ...]``.
  """
  w = np.array(init, dtype=np.float64)
  order = w.ndim
  if exponents is None:
    exponents = [1.0 / (2 * order)] * order
  axes = [k for k in range(order) if exponents[k] != 0]
  factors = {k: np.zeros((w.shape[k], w.shape[k])) for k in axes}
  inverse = {k: np.eye(w.shape[k]) for k in axes}
  vectors_of = {k: np.eye(w.shape[k]) for k in axes}
  m, v, buffer = np.zeros_like(w), np.zeros_like(w), np.zeros_like(w)

  trajectory = [w.copy()]
  for t, g in enumerate(grads, start=1):
    g = np.asarray(g, np.float64)
    outer = {}
    for k in axes:
      x = g
      if kl:  # the other preconditioned axes whitened by their current inverse roots
        for j in axes:
          if j != k:
            x = mode_apply(x, inverse[j], j)
      outer[k] = unfold(x, k) @ unfold(x, k).T
    weighting, bc2 = _accumulation(b2, t, use_bias_correction, drop_weighting)
    for k in axes:
      factors[k] = b2 * factors[k] + weighting * outer[k]
    if ((t - phase) % every == 0 and t > start) or t == start:
      for k in axes:
        a = _trace_scaled(factors[k] / bc2, trace_scaling, eps) + eps * np.eye(w.shape[k])
        q = vectors_of[k]
        estimate = q.T @ a @ q
        if refresh == "qr":
          for _ in range(iterations):
            if _diagonal_enough(estimate, tolerance):
              break
            rotation, upper = np.linalg.qr(estimate)
            estimate = upper @ rotation
            q = q @ rotation
          order = np.argsort(np.diag(estimate), kind="stable")
          lam, vectors = np.diag(estimate)[order], q[:, order]
        elif tolerance and _diagonal_enough(estimate, tolerance):
          lam, vectors = np.diag(estimate), q
        else:
          lam, vectors = np.linalg.eigh(a)
        vectors_of[k] = vectors
        if lam.min() < eps:
          lam = lam - lam.min() + eps
        inverse[k] = vectors @ np.diag(lam ** -exponents[k]) @ vectors.T
    m, filtered = _filtered(m, g, t, b1, beta3, use_bias_correction)
    shampoo = filtered
    for k in axes:
      shampoo = mode_apply(shampoo, inverse[k], k)
    direction, v = _grafted(shampoo, filtered, g, v, t, start, graft)
    w, buffer = _descend(w, direction, lr, weight_decay, momentum, buffer)
    trajectory.append(w.copy())
  return trajectory


def eigenvalue_corrected_reference(
  init,
  grads,
  *,
  lr,
  b1,
  b2,
  eps,
  weight_decay,
  every,
  start,
  refresh="qr",
  iterations=1,
  tolerance=0.0,
  exponent=0.5,
  unrotated=(),
  graft=None,
  use_bias_correction=True,
  drop_weighting=False,
  trace_scaling=None,
  beta3=-1.0,
  momentum=None,
  phase=0,
):
  """Distributed Shampoo's eigenvalue-corrected Shampoo (``DefaultSOAPConfig`` with
  ``refresh="qr"``, ``EighEigendecompositionConfig`` with ``"eigh"``), one block per tensor,
  written from the ``eigenvalue_corrected`` golden sidecar's ``semantics`` and Distributed
  Shampoo's ``matrix_eigendecomposition``. ``unrotated``: axes that keep the identity basis;
  ``use_bias_correction``, ``drop_weighting``, ``trace_scaling``, ``beta3`` as in
  :func:`distributed_shampoo_reference` (the weight and correction of ``D`` are the factors').
  Returns the parameter trajectory ``[W_0, W_1, ...]``."""
  w = np.array(init, dtype=np.float64)
  axes = [k for k in range(w.ndim) if k not in unrotated]
  factors = {k: np.zeros((w.shape[k], w.shape[k])) for k in axes}
  bases = [np.eye(d) if k in axes else None for k, d in enumerate(w.shape)]
  corrected, m, v, buffer = (np.zeros_like(w) for _ in range(4))

  trajectory = [w.copy()]
  for t, g in enumerate(grads, start=1):
    g = np.asarray(g, np.float64)
    weighting, bc2 = _accumulation(b2, t, use_bias_correction, drop_weighting)
    for k in axes:
      factors[k] = b2 * factors[k] + weighting * unfold(g, k) @ unfold(g, k).T
    if ((t - phase) % every == 0 and t > start) or t == start:
      for k in axes:
        a = _trace_scaled(factors[k] / bc2, trace_scaling, eps) + eps * np.eye(w.shape[k])
        q = bases[k]
        estimate = q.T @ a @ q
        if refresh == "qr":
          for _ in range(iterations):
            if _diagonal_enough(estimate, tolerance):
              break
            rotation, upper = np.linalg.qr(estimate)
            estimate = upper @ rotation
            q = q @ rotation
          order = np.argsort(np.diag(estimate), kind="stable")
          bases[k] = q[:, order]
        elif not (tolerance and _diagonal_enough(estimate, tolerance)):
          _, bases[k] = np.linalg.eigh(a)
    corrected = b2 * corrected + weighting * rotate(g, bases, transpose=True) ** 2
    m, filtered = _filtered(m, g, t, b1, beta3, use_bias_correction)
    scaled = rotate(filtered, bases, transpose=True) / ((corrected / bc2) ** exponent + eps)
    shampoo = rotate(scaled, bases, transpose=False)
    direction, v = _grafted(shampoo, filtered, g, v, t, start, graft)
    w, buffer = _descend(w, direction, lr, weight_decay, momentum, buffer)
    trajectory.append(w.copy())
  return trajectory
