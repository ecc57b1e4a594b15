"""The ``layout`` stage: how each tensor of a pytree becomes matrix blocks, and blocks buckets.

The layout is static. It is recomputed from shapes at trace time and never stored in the state:

1. **Squeeze** singleton axes (``squeeze=True``, the KL-Methods behaviour; upstream SOAP keeps
   them, which gives 1×1 factors that do nothing).
2. **Permute** 4-D tensors from channels-last to channels-first (``channels_last=True``; upstream
   SOAP's ``data_format="channels_last"``).
3. **Merge** neighbouring axes left to right while their product stays within
   ``max_precond_dim`` (``merge_small_dims=True``; upstream SOAP's ``merge_dims``).
4. **Block**: an axis longer than ``max_precond_dim`` is left unrotated (identity basis), or with
   ``blocking=True`` split into blocks of at most ``max_precond_dim`` (Distributed Shampoo).
5. **Fallback**: tensors of order 0 or 1 (after step 1) get no Kronecker factor, so the method's
   scaling acts elementwise (Adam), unless ``precondition_1d=True``.

Blocks of equal shape, factor mask and dtype across the whole pytree form a **bucket**; the
chassis stacks them on a leading axis so that every per-block computation is one batched call.
With ``bucket_multiple=k`` a bucket with a Kronecker factor is padded with zero blocks up to a
multiple of ``k`` rows, so that its state can be sharded evenly over ``k`` devices
(:mod:`kl_precond.sharding`). A zero block stays in its own row: its factors, bases and moments
never mix with the real blocks' and its direction is dropped, so padding does not change the
updates.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kl_precond._validation import check_axes_per_order, check_bool, check_integer


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
  """Static options of the layout stage (see the module docstring).

  Attributes:
    max_precond_dim: largest axis that gets a Kronecker factor (``>= 1``).
    merge_small_dims: merge neighbouring axes while the product is ``<= max_precond_dim``.
    precondition_1d: give 1-D tensors a full factor instead of the diagonal fallback.
    blocking: split axes above ``max_precond_dim`` into blocks instead of leaving them unrotated.
    squeeze: drop axes of size one before anything else.
    channels_last: permute 4-D tensors ``(a, b, c, d) -> (a, d, b, c)`` before merging.
    unfactored_axes: ``((order, (axis, ...)), ...)``: in blocks of that order these axes get
      no factor (one-sided Shampoo: ``((2, (1,)),)`` keeps only the left factor of matrices);
      each axis ``0 <= axis < order`` (the order is a block's number of axes).
    bucket_multiple: pad every bucket with a Kronecker factor with zero blocks up to a multiple
      of this many rows (e.g. the size of the mesh axis its state is sharded over); ``1``: none.
  """

  max_precond_dim: int = 10000
  merge_small_dims: bool = False
  precondition_1d: bool = False
  blocking: bool = False
  squeeze: bool = True
  channels_last: bool = False
  unfactored_axes: tuple[tuple[int, tuple[int, ...]], ...] = ()
  bucket_multiple: int = 1

  def __post_init__(self) -> None:
    check_integer("max_precond_dim", self.max_precond_dim, 1)
    check_integer("bucket_multiple", self.bucket_multiple, 1)
    for name in ("merge_small_dims", "precondition_1d", "blocking", "squeeze", "channels_last"):
      check_bool(name, getattr(self, name))
    check_axes_per_order("unfactored_axes", self.unfactored_axes)


def check_layout(name: str, value: Any) -> None:
  """``value`` must be ``None`` or a :class:`kl_precond.LayoutConfig`. (Here, not in
  ``_validation``, which this module imports: that keeps the imports one-way.)"""
  if value is not None and not isinstance(value, LayoutConfig):
    raise ValueError(f"{name} must be None or a kl_precond.LayoutConfig, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class Block:
  """One block of a tensor in its working shape: where it starts, its shape, its factored axes."""

  start: tuple[int, ...]
  shape: tuple[int, ...]
  preconditioned: tuple[bool, ...]


@dataclasses.dataclass(frozen=True)
class TensorLayout:
  """How one tensor maps to blocks.

  Attributes:
    shape: the parameter's shape.
    permutation: axis permutation applied before reshaping (``None`` for none).
    work_shape: shape after squeeze, permutation and merging; blocks tile this shape.
    blocks: the blocks, in row-major order of their start indices.
  """

  shape: tuple[int, ...]
  permutation: tuple[int, ...] | None
  work_shape: tuple[int, ...]
  blocks: tuple[Block, ...]


def merge_dims(shape: Sequence[int], max_dim: int) -> tuple[int, ...]:
  """Greedily merges neighbouring axes, left to right, while the product is ``<= max_dim``.

  This is upstream SOAP's rule: ``(4, 6, 5)`` with ``max_dim=64`` becomes ``(24, 5)``.
  """
  merged: list[int] = []
  current = 1
  for size in shape:
    if current * size > max_dim:
      if current > 1:
        merged.append(current)
        current = size
      else:
        merged.append(size)
        current = 1
    else:
      current *= size
  if current > 1 or not merged:
    merged.append(current)
  return tuple(merged)


def _axis_chunks(size: int, config: LayoutConfig) -> list[tuple[int, int]]:
  if not config.blocking or size <= config.max_precond_dim:
    return [(0, size)]
  step = config.max_precond_dim
  return [(start, min(start + step, size)) for start in range(0, size, step)]


def tensor_layout(shape: Sequence[int], config: LayoutConfig) -> TensorLayout:
  """Returns the static layout of a tensor of the given shape."""
  shape = tuple(int(d) for d in shape)
  permutation = (0, 3, 1, 2) if config.channels_last and len(shape) == 4 else None
  work = tuple(shape[a] for a in permutation) if permutation else shape
  if config.squeeze:
    work = tuple(d for d in work if d != 1)
  order = len(work)
  if config.merge_small_dims and order >= 2:
    work = merge_dims(work, config.max_precond_dim)
  diagonal = order <= 1 and not config.precondition_1d
  skipped = dict(config.unfactored_axes).get(len(work), ())
  blocks = []
  for chunks in itertools.product(*[_axis_chunks(d, config) for d in work]):
    block_shape = tuple(stop - start for start, stop in chunks)
    mask = tuple(
      not diagonal and d <= config.max_precond_dim and axis not in skipped
      for axis, d in enumerate(block_shape)
    )
    blocks.append(Block(tuple(start for start, _ in chunks), block_shape, mask))
  return TensorLayout(shape, permutation, work, tuple(blocks))


def _work(x: jax.Array, layout: TensorLayout) -> jax.Array:
  """The tensor in its working shape (permuted, squeezed, merged)."""
  if layout.permutation is not None:
    x = jnp.transpose(x, layout.permutation)
  return x.reshape(layout.work_shape)


def _unwork(x: jax.Array, layout: TensorLayout) -> jax.Array:
  """Inverse of :func:`_work`."""
  if layout.permutation is not None:
    permuted = tuple(layout.shape[a] for a in layout.permutation)
    return jnp.transpose(x.reshape(permuted), tuple(int(a) for a in np.argsort(layout.permutation)))
  return x.reshape(layout.shape)


def grid(layout: TensorLayout) -> tuple[int, ...] | None:
  """Blocks per axis when all blocks have one shape (a regular tiling), else ``None``."""
  shapes = {block.shape for block in layout.blocks}
  if len(shapes) != 1:
    return None
  (shape,) = shapes
  return tuple(d // c for d, c in zip(layout.work_shape, shape, strict=True))


def tiled(x: jax.Array, layout: TensorLayout) -> jax.Array | None:
  """A regularly tiled tensor as ``(n_1, c_1, ..., n_k, c_k)`` (``n_i`` blocks of ``c_i`` along
  axis ``i``): a reshape, no copy. ``None`` when the tiling is not regular."""
  counts = grid(layout)
  if counts is None:
    return None
  sizes = layout.blocks[0].shape
  return _work(x, layout).reshape([v for pair in zip(counts, sizes, strict=True) for v in pair])


def untiled(x: jax.Array, layout: TensorLayout) -> jax.Array:
  """Inverse of :func:`tiled`."""
  return _unwork(x.reshape(layout.work_shape), layout)


def to_stack(x: jax.Array, layout: TensorLayout) -> jax.Array:
  """The blocks of a regularly tiled tensor (:func:`grid` not ``None``) stacked on a new leading
  axis, ``(len(blocks), *block_shape)`` in the order of ``layout.blocks``: one transpose.

  .. math:: X_{(b_1 c_1 + r_1) \\dots} \\to S_{(b_1 \\dots b_k),\\, r_1 \\dots r_k}
  """
  view = tiled(x, layout)
  if view is None:
    raise ValueError(f"Blocks of unequal shapes cannot be stacked: {layout.blocks}.")
  order = view.ndim // 2
  moved = jnp.transpose(view, [*range(0, 2 * order, 2), *range(1, 2 * order, 2)])
  return moved.reshape((len(layout.blocks), *layout.blocks[0].shape))


def from_stack(stack: jax.Array, layout: TensorLayout) -> jax.Array:
  """Inverse of :func:`to_stack`."""
  counts = grid(layout)
  if counts is None:
    raise ValueError(f"Blocks of unequal shapes cannot be stacked: {layout.blocks}.")
  order = len(counts)
  view = stack.reshape((*counts, *layout.blocks[0].shape))
  back = [a for axis in range(order) for a in (axis, order + axis)]
  return untiled(jnp.transpose(view, back), layout)


def to_blocks(x: jax.Array, layout: TensorLayout) -> list[jax.Array]:
  """Cuts a tensor into its blocks."""
  x = _work(x, layout)
  if len(layout.blocks) == 1:
    return [x]
  return [
    x[tuple(slice(s, s + d) for s, d in zip(block.start, block.shape, strict=True))]
    for block in layout.blocks
  ]


def from_blocks(blocks: Sequence[jax.Array], layout: TensorLayout) -> jax.Array:
  """Inverse of :func:`to_blocks`."""
  if len(blocks) == 1:
    x = blocks[0].reshape(layout.work_shape)
  else:
    x = jnp.zeros(layout.work_shape, blocks[0].dtype)
    for block, value in zip(layout.blocks, blocks, strict=True):
      index = tuple(slice(s, s + d) for s, d in zip(block.start, block.shape, strict=True))
      x = x.at[index].set(value)
  return _unwork(x, layout)


@dataclasses.dataclass(frozen=True)
class Bucket:
  """Blocks of one shape, factor mask and dtype, stacked on a leading axis.

  ``members[j] = (leaf, block)`` says that row ``j`` of the stack is block ``block`` of leaf
  ``leaf`` (leaves in ``jax.tree`` order); ``padding`` zero blocks follow the members.
  """

  shape: tuple[int, ...]
  preconditioned: tuple[bool, ...]
  dtype: Any
  members: tuple[tuple[int, int], ...]
  padding: int = 0

  @property
  def size(self) -> int:
    return len(self.members) + self.padding

  @property
  def numel(self) -> int:
    return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class TreeLayout:
  """The layout of a whole pytree: per-leaf layouts and the buckets of their blocks."""

  treedef: Any
  leaves: tuple[TensorLayout, ...]
  buckets: tuple[Bucket, ...]
  # where[leaf][block] = (bucket index, row in the bucket)
  where: tuple[tuple[tuple[int, int], ...], ...]


def _padding(size: int, mask: tuple[bool, ...], config: LayoutConfig) -> int:
  """Zero blocks that round a bucket with a Kronecker factor up to ``config.bucket_multiple``."""
  return -size % config.bucket_multiple if any(mask) else 0


def tree_layout(tree: Any, config: LayoutConfig) -> TreeLayout:
  """Computes the static layout of a pytree of arrays (or ``jax.ShapeDtypeStruct``)."""
  leaves, treedef = jax.tree.flatten(tree)
  layouts = tuple(tensor_layout(leaf.shape, config) for leaf in leaves)
  groups: dict[tuple[Any, ...], list[tuple[int, int]]] = {}
  for i, (leaf, layout) in enumerate(zip(leaves, layouts, strict=True)):
    for j, block in enumerate(layout.blocks):
      key = (block.shape, block.preconditioned, jnp.dtype(leaf.dtype))
      groups.setdefault(key, []).append((i, j))
  buckets = tuple(
    Bucket(shape, mask, dtype, tuple(members), _padding(len(members), mask, config))
    for (shape, mask, dtype), members in groups.items()
  )
  where: list[list[tuple[int, int]]] = [[(0, 0)] * len(lay.blocks) for lay in layouts]
  for k, bucket in enumerate(buckets):
    for row, (i, j) in enumerate(bucket.members):
      where[i][j] = (k, row)
  return TreeLayout(treedef, layouts, buckets, tuple(tuple(w) for w in where))


def _runs(rows: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
  """Groups ``(owner, index)`` pairs into runs ``(owner, first, stop)`` of consecutive indices,
  so that each run is one slice instead of one row at a time."""
  runs: list[tuple[int, int, int]] = []
  for owner, index in rows:
    if runs and runs[-1][0] == owner and runs[-1][2] == index:
      runs[-1] = (owner, runs[-1][1], index + 1)
    else:
      runs.append((owner, index, index + 1))
  return runs


def gather(tree: Any, layout: TreeLayout) -> tuple[jax.Array, ...]:
  """Returns one stacked array ``(bucket.size, *bucket.shape)`` per bucket (padding: zeros).

  A regularly tiled tensor is cut by one transpose (:func:`to_stack`) and its blocks that sit
  next to each other in a bucket are taken as one slice; other tensors block by block.
  """
  leaves = layout.treedef.flatten_up_to(tree)
  sources: list[Any] = [
    to_stack(leaf, lay) if grid(lay) is not None else [b[None] for b in to_blocks(leaf, lay)]
    for leaf, lay in zip(leaves, layout.leaves, strict=True)
  ]

  def piece(i: int, first: int, stop: int) -> jax.Array:
    source = sources[i]
    # (jnp.concatenate of one array is that array: no copy.)
    return jnp.concatenate(source[first:stop]) if isinstance(source, list) else source[first:stop]

  out = []
  for bucket in layout.buckets:
    pieces = [piece(*run) for run in _runs(bucket.members)]
    if bucket.padding:
      pieces.append(jnp.zeros((bucket.padding, *bucket.shape), pieces[0].dtype))
    out.append(jnp.concatenate(pieces))
  return tuple(out)


def scatter(stacks: Sequence[jax.Array], layout: TreeLayout) -> Any:
  """Inverse of :func:`gather`: rebuilds the pytree from the bucket stacks."""
  leaves = []
  for where, lay in zip(layout.where, layout.leaves, strict=True):
    if grid(lay) is None:
      leaves.append(from_blocks([stacks[k][row] for k, row in where], lay))
      continue
    pieces = [stacks[k][first:stop] for k, first, stop in _runs(where)]
    leaves.append(from_stack(jnp.concatenate(pieces), lay))
  return layout.treedef.unflatten(leaves)
