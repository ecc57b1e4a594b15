"""Matmul FLOPs of one non-refresh update of each method, counted from kl_precond's code, and
of one refresh (textbook counts of its products and decompositions).

Imports nothing (no flags, no jax), so tests can read the counts without the side effects of
importing ``optimizer_only`` (its absl flags and CPU settings); ``layout_blocks`` imports
``kl_precond`` when called.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Matmul FLOPs of one non-refresh update of one m×n block, counted from the code. A product by
# an m×m matrix on the left costs 2m²n ("left"), by an n×n matrix on the right 2mn² ("right").
# The Gram matrices G Gᵀ and Gᵀ G are full GEMMs in XLA (no SYRK), so they count as one each.
#   SOAP (frobenius + qr_every + adam):
#     direction: project G: Q_Lᵀ G, · Q_R (left + right); unproject: Q_L · X · Q_Rᵀ (left + right)
#     statistics: G Gᵀ (left), Gᵀ G (right)                 → 3(left + right) = 6mn(m+n)
#   KL-SOAP (kl + qr_every + adam):
#     direction: project G, unproject (2 × (left + right))
#     estimator: project G again for the eigenvalue EMA (the same product as the direction's:
#       XLA merges the two), whiten G by Q_R (right) then Gram (left); whiten by Q_L (left) then
#       Gram (right). The projection multiplies the longer side first, the same product as
#       that side's whitening (merged too): min(left, right) of the whitening remains
#                                         → 3(left + right) + min(left, right) = 7n³ (square)
#   KL-Shampoo (kl + qr_every + kronecker_eigenvalues(momentum_in_eigenbasis=True)):
#     the momentum is kept projected and folds the estimator's projection of G; unproject; the
#     estimator as KL-SOAP                → 3(left + right) + min(left, right) = 7n³ (square)
#   Shampoo, AdamW-Shampoo (frobenius statistics, eigenvalue scaling with cached roots):
#     Grams (left + right), then the momentum times the cached roots R_L M R_R (left + right)
#                                                           → 2(left + right) = 4mn(m+n)
#   AdamW: elementwise only (0 matmul FLOPs).
# For a square n×n block, left + right = 4n³.
# Units of left + right = 2mn(m+n), and min(left, right) (KL whitening not merged).
FLOP_COUNTS = {
  "adamw": 0,
  "soap": 3,
  "kl_soap": 3,
  "kl_shampoo": 3,
  "shampoo": 2,
  "adamw_shampoo": 2,
}
UNMERGED_WHITENING = ("kl_soap", "kl_shampoo")
COUNT_NOTES = {
  "kl_soap": "the estimator's projection of G is the direction's, and its first product one "
  "whitening's, merged by XLA",
  "kl_shampoo": "the momentum kept in the eigenbasis folds the estimator's projection of G; the "
  "projection's first product is one whitening's, merged by XLA",
  "shampoo": "with the default cache_roots=True (3 units with cache_roots=False)",
  "adamw_shampoo": "with the default cache_roots=True (3 units with cache_roots=False)",
}


def update_flops(method: str, m: int, n: int, left: bool = True, right: bool = True) -> int:
  """Matmul FLOPs of one non-refresh update of one ``m×n`` block (see ``FLOP_COUNTS``).

  ``left``/``right``: whether the block's first/second axis has a factor (both by default; the
  counts were checked with both). A 1-D block of length ``k`` with a factor (Shampoo's
  ``precondition_1d``) is ``m=k, n=1, right=False``.
  """
  products = 2 * m * n * (m * left + n * right)
  whitening = 2 * m * n * min(m, n) if method in UNMERGED_WHITENING and left and right else 0
  return FLOP_COUNTS[method] * products + whitening


# FLOPs of one refresh, per factor of size k (textbook counts, not read from the compiled code):
#   QR power step (SOAP, KL-SOAP, KL-Shampoo: qr_every): F·Q 2k³ (SOAP's sort estimates
#     diag(QᵀFQ) from the same product), Householder QR of the k×k product with Q formed
#     explicitly 4/3·k³ + 4/3·k³                                              → 14/3·k³, of
#     which 8/3·k³ is the QR itself (LAPACK geqrf/orgqr: panel factorizations, not one GEMM);
#     then the first moment is re-expressed in the new basis: unproject by the old bases and
#     project by the new ones, 2 × (left + right) per block (see FLOP_COUNTS' units).
#   eigh refresh (Shampoo, AdamW-Shampoo: cached roots): symmetric eigendecomposition with
#     eigenvectors ≈ 9k³ (Golub & Van Loan, tridiagonal QR algorithm), then the cached root
#     Q·diag(λ^p)·Qᵀ 2k³                                                     → 11·k³, of which
#     9k³ is the eigh (LAPACK syevd); the momentum stays in parameter space (no rotation).
# The decompositions (QR, eigh) are the part that runs far below the matmul rate on accelerators.
REFRESH_PER_FACTOR = {"qr": 14 / 3, "eigh": 11.0}
DECOMPOSITION_PER_FACTOR = {"qr": 8 / 3, "eigh": 9.0}
REFRESH_KIND = {
  "soap": "qr",
  "kl_soap": "qr",
  "kl_shampoo": "qr",
  "shampoo": "eigh",
  "adamw_shampoo": "eigh",
}
ROTATION_UNITS = {"qr": 2, "eigh": 0}


def refresh_flops(
  method: str, m: int, n: int, left: bool = True, right: bool = True
) -> tuple[float, float]:
  """``(all, decompositions)``: FLOPs of one refresh of one ``m×n`` block (see the comment
  above), the second the QR/eigh part of the first. ``(0, 0)`` for AdamW."""
  if method not in REFRESH_KIND:
    return 0.0, 0.0
  kind = REFRESH_KIND[method]
  cubes = m**3 * left + n**3 * right
  rotation = ROTATION_UNITS[kind] * 2 * m * n * (m * left + n * right)
  return REFRESH_PER_FACTOR[kind] * cubes + rotation, DECOMPOSITION_PER_FACTOR[kind] * cubes


def layout_blocks(
  shapes: Sequence[Sequence[int]], config: Any
) -> list[tuple[int, int, bool, bool]]:
  """``(m, n, left, right)`` of every block with a factor, over parameters of ``shapes`` laid
  out by ``kl_precond`` under ``config`` (a ``LayoutConfig``); a 1-D block of length ``k`` is
  ``(k, 1, True, False)``."""
  from kl_precond.layout import tensor_layout

  out = []
  for shape in shapes:
    for block in tensor_layout(shape, config).blocks:
      if not any(block.preconditioned):
        continue
      if len(block.shape) == 1:
        out.append((block.shape[0], 1, True, False))
      elif len(block.shape) == 2:
        (m, n), (left, right) = block.shape, block.preconditioned
        out.append((m, n, left, right))
      else:
        raise NotImplementedError(f"a {len(block.shape)}-D block: {block}")
  return out


def layout_flops(
  method: str, shapes: Sequence[Sequence[int]], config: Any, frequency: int
) -> dict[str, float]:
  """FLOPs per step over all blocks (``layout_blocks``): ``update`` (one non-refresh update,
  ``update_flops``), ``refresh`` and ``decomposition`` (one refresh, ``refresh_flops``, ÷
  ``frequency``). Zero for AdamW."""
  totals = {"update": 0.0, "refresh": 0.0, "decomposition": 0.0}
  if method not in REFRESH_KIND:
    return totals
  for m, n, left, right in layout_blocks(shapes, config):
    totals["update"] += update_flops(method, m, n, left, right)
    every, decomposed = refresh_flops(method, m, n, left, right)
    totals["refresh"] += every / frequency
    totals["decomposition"] += decomposed / frequency
  return totals
