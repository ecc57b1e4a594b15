"""Matmul FLOPs of one non-refresh update of each method, counted from kl_precond's code.

Imports nothing (no flags, no jax), so tests can read the counts without the side effects of
importing ``optimizer_only`` (its absl flags and CPU settings).
"""

from __future__ import annotations

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


def update_flops(method: str, m: int, n: int) -> int:
  """Matmul FLOPs of one non-refresh update of one ``m×n`` block (see ``FLOP_COUNTS``)."""
  whitening = 2 * m * n * min(m, n) if method in UNMERGED_WHITENING else 0
  return FLOP_COUNTS[method] * 2 * m * n * (m + n) + whitening
