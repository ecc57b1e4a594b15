"""kl_precond's tests (a package, so that test modules can share helpers)."""

import os


def under_ci() -> bool:
  """Whether the ``CI`` environment variable is set to a true value (``true``, ``1``, ``yes``)."""
  return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes", "on"}
