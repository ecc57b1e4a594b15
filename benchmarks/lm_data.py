"""Byte-level corpus built from the Python standard library's own source files.

Every machine that runs Python has this corpus, so the LM benchmark needs no download. Files
are listed in sorted order, assigned to train or validation *by file* with a stable hash of
their relative path, visited in a fixed pseudo-random order and read until a byte cap is hit.
The result depends only on the installed Python version, never on a seed.
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
import zlib

import numpy as np

EXCLUDED_DIRS = frozenset(
  {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
FILE_SEPARATOR = b"\n\n"


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Train and validation byte streams (uint8) plus the file names behind them."""

  train: np.ndarray
  val: np.ndarray
  train_files: tuple[str, ...]
  val_files: tuple[str, ...]


def list_stdlib_files(root: str | None = None) -> list[str]:
  """Sorted relative paths of the ``.py`` files under ``root`` (default: the stdlib).

  Test directories, test modules, caches and installed third-party packages are skipped.
  """
  root = root or sysconfig.get_paths()["stdlib"]
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
    for name in filenames:
      if name.endswith(".py") and not name.startswith("test_"):
        paths.append(os.path.relpath(os.path.join(dirpath, name), root))
  return sorted(paths)


def is_validation_file(relative_path: str, val_percent: int) -> bool:
  """Stable, seed-free split rule: a CRC32 of the path picks ``val_percent`` % of files."""
  return zlib.crc32(relative_path.encode("utf-8")) % 100 < val_percent


def load_stdlib_corpus(
  max_bytes: int = 4_000_000, val_percent: int = 10, root: str | None = None
) -> Corpus:
  """Reads at most ``max_bytes`` of stdlib source, split into train/validation by file.

  Files are visited in a fixed permutation of the sorted listing (so that the cap does not
  keep only the alphabetically first packages) and concatenated with a blank-line separator.
  """
  root = root or sysconfig.get_paths()["stdlib"]
  files = list_stdlib_files(root)
  order = np.random.default_rng(0).permutation(len(files))
  chunks: dict[bool, list[bytes]] = {False: [], True: []}
  names: dict[bool, list[str]] = {False: [], True: []}
  total = 0
  for index in order:
    relative_path = files[index]
    with open(os.path.join(root, relative_path), "rb") as f:
      content = f.read()
    is_val = is_validation_file(relative_path, val_percent)
    chunks[is_val].append(content)
    names[is_val].append(relative_path)
    total += len(content)
    if total >= max_bytes:
      break
  if not chunks[False] or not chunks[True]:
    raise ValueError(f"Corpus under {root} is too small for a train/validation split.")

  def to_array(parts: list[bytes]) -> np.ndarray:
    return np.frombuffer(FILE_SEPARATOR.join(parts), dtype=np.uint8).copy()

  return Corpus(
    train=to_array(chunks[False]),
    val=to_array(chunks[True]),
    train_files=tuple(names[False]),
    val_files=tuple(names[True]),
  )


def sample_batch(
  data: np.ndarray, rng: np.random.Generator, batch_size: int, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
  """Random windows of ``seq_len + 1`` bytes: returns int32 ``(inputs, targets)``."""
  starts = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
  windows = data[starts[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int32)
  return windows[:, :-1], windows[:, 1:]


def fixed_batches(
  data: np.ndarray, num_batches: int, batch_size: int, seq_len: int, seed: int = 1234
) -> list[tuple[np.ndarray, np.ndarray]]:
  """A reproducible list of batches (used for validation; identical for every method)."""
  rng = np.random.default_rng(seed)
  return [sample_batch(data, rng, batch_size, seq_len) for _ in range(num_batches)]
