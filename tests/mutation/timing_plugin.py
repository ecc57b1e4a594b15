"""pytest plugin for the mutation driver: writes each test's duration (setup + call + teardown, in
seconds) as JSON to the path in ``KL_MUTATION_DURATIONS``. Under xdist the controller writes it."""

import json
import os
from collections import defaultdict

_durations: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report):
  _durations[report.nodeid] += report.duration


def pytest_sessionfinish(session):
  path = os.environ.get("KL_MUTATION_DURATIONS")
  if path and not hasattr(session.config, "workerinput"):
    with open(path, "w") as handle:
      json.dump(dict(_durations), handle, indent=0, sort_keys=True)
