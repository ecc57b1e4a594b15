"""Test configuration: 8 fake CPU devices and the CPU scheduler workaround.

Both flags must be set before JAX is imported anywhere, so they live here.
"""

import os

_FLAGS = (
  "--xla_force_host_platform_device_count=8",
  "--xla_cpu_enable_concurrency_optimized_scheduler=false",
)
_existing = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_existing, *[f for f in _FLAGS if f not in _existing]]).strip()
