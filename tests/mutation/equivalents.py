"""Surviving mutants whose behaviour is the same as the original's, each with its reason.

Keyed by (module, cosmic-ray operator, original line, mutated line), both lines stripped as in
the report, so that an entry survives edits elsewhere in the module.
"""

EQUIVALENTS: dict[tuple[str, str, str, str], str] = {
  (
    "estimators",
    "core/NumberReplacer",
    "init_factor: Any = 0.1",
    "init_factor: Any = -0.9",
  ): "a default of the KL dataclass, which is never read: kl(), its only constructor, passes "
  "every field",
  (
    "basis",
    "core/ReplaceComparisonOperator_Eq_Is",
    'if self.method == "eigh":',
    'if self.method is "eigh":',
  ): "method is one of the factories' string literals, which CPython interns: `is` equals `==`",
  (
    "basis",
    "core/ReplaceUnaryOperator_Delete_USub",
    "bound = jnp.max(jnp.sum(jnp.abs(sym), axis=-1))  # Gershgorin: no eigenvalue below -bound",
    "bound = jnp.max(jnp.sum(jnp.abs(sym), axis=1))  # Gershgorin: no eigenvalue below -bound",
  ): "sym is 2-D (m + m.T), so axis 1 is its last axis",
  (
    "basis",
    "core/NumberReplacer",
    "n = matrix.shape[-1]",
    "n = matrix.shape[- 2]",
  ): "matrix is a square factor: shape[-2] == shape[-1]",
  (
    "basis",
    "core/ReplaceOrWithAnd",
    "if factor is None or basis is None:",
    "if factor is None and basis is None:",
  ): "a basis is None exactly where its factor is (both from the same mask), so `or` equals `and`",
  (
    "basis",
    "core/NumberReplacer",
    "bool(ascending),",
    "bool(ascending), 2,",
  ): "eigh_every's iterations field is read only by the QR-algorithm refresh "
  "(method 'qr_algorithm'); its method is 'eigh'",
  (
    "grafting",
    "core/ReplaceComparisonOperator_Gt_NotEq",
    "safe = jnp.where(peak > 0, peak, 1)",
    "safe = jnp.where(peak != 0, peak, 1)",
  ): "peak = max|x| is >= 0 or NaN, and a NaN peak gives a NaN norm either way",
  (
    "grafting",
    "core/ReplaceTrueWithFalse",
    "layout_lib.to_blocks(d, tensor), layout_lib.to_blocks(m, tensor), strict=True",
    "layout_lib.to_blocks(d, tensor), layout_lib.to_blocks(m, tensor), strict=False",
  ): "both lists are split by the same layout, so they have the same length",
  (
    "tensor_ops",
    "core/ReplaceComparisonOperator_NotEq_IsNot",
    "others = [a for a in range(x.ndim) if a != axis]",
    "others = [a for a in range(x.ndim) if a is not axis]",
  ): "a and axis are small Python ints (range, enumerate), which CPython caches: `is not` "
  "equals `!=`",
}
