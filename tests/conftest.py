"""Test configuration: 8 fake CPU devices, the CPU scheduler workaround, hypothesis's profile.

Both flags must be set before JAX is imported anywhere, so they live here.
"""

import os

_FLAGS = (
  "--xla_force_host_platform_device_count=8",
  "--xla_cpu_enable_concurrency_optimized_scheduler=false",
)
_existing = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_existing, *[f for f in _FLAGS if f not in _existing]]).strip()

# Every hypothesis test is reproducible and leaves nothing in the tree: the same examples on every
# run (derandomize) and no example database (.hypothesis/). A test's own @settings add to this.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("kl_precond", derandomize=True, database=None)
_hypothesis_settings.load_profile("kl_precond")


def pytest_sessionfinish(session, exitstatus):
  """Under CI a skipped test is a failure: every test must run there (goldens, notebooks, peers)."""
  from tests import under_ci

  reporter = session.config.pluginmanager.get_plugin("terminalreporter")
  if not under_ci() or reporter is None or exitstatus != 0:
    return
  skipped = reporter.stats.get("skipped", [])
  if skipped:
    reasons = sorted({str(report.longrepr[-1]) for report in skipped if report.longrepr})
    reporter.write_line(f"CI: {len(skipped)} skipped test(s) fail the run: {reasons}", red=True)
    session.exitstatus = 1
