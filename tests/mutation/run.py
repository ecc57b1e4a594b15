"""Mutation testing of kl_precond with cosmic-ray: one command, run by hand (not in CI).

    python tests/mutation/run.py --seed 0 --per-module 20 --workers 2

What it does, on a scratch copy (never on the checkout, which another process may be testing):

1. ``git archive`` of ``--rev`` (default ``HEAD``) into ``--scratch``/<commit>/base and one copy
   per worker (w0, w1, ...). Only committed code is mutated and tested.
2. Coverage map: the tests in ``TEST_FILES`` run once on the base copy under pytest-cov with one
   coverage context per test, and ``timing_plugin`` records each test's duration. Cached per
   commit.
3. Per module in ``MODULES``: ``cosmic_ray.commands.init`` writes every mutant of all core
   operators into a cosmic-ray session (``<module>.sqlite``); mutants inside annotations (never
   evaluated: every module has ``from __future__ import annotations``) and inside the arguments of
   a ``raise`` (the error message text) are marked skipped; of the rest, ``--per-module`` are
   drawn with ``random.Random(seed)`` from the list sorted by (operator, occurrence), the others
   are marked skipped (the same mark cosmic-ray's own filters use).
4. Each sampled mutant is applied by cosmic-ray to a worker's copy and the tests that cover its
   lines run in a fresh ``python -m pytest -x`` process: the covering tests that run the fewest lines
   of the module first (unit tests before end-to-end runs), then the fastest, for half of
   ``--budget`` seconds of (unmutated) test time, then the most specific test of each other
   covering file, then the rest, until ``--budget``. A mutant on a
   line that only runs at import time (module constants, default arguments, decorators) takes the
   tests that cover any line of the module, fastest first. A mutant whose lines no test runs is recorded as
   survived without a run. Lines are looked up at their statement's first line too (where
   coverage records a multi-line statement).
5. Results: per module killed / total; a timeout (cosmic-ray kills the run after ``--timeout-factor``
   times the selection's test time plus 120 s) counts as killed, and is shown in its
   own column; ``incompetent`` (the mutated module does not import, or cosmic-ray failed) is shown
   too and counts as killed by cosmic-ray. Survivors listed in ``equivalents.py`` are named
   equivalent. Written to ``<scratch>/<commit>/report.md`` and ``results.json`` and printed.

``--rerun results.json`` runs only the mutants that survived or timed out in that report, found
again in ``--rev`` by their text (operator, removed and added line), to show that new tests kill
them.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import hashlib
import json
import os
import random
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import attrs
import cosmic_ray.plugins
from cosmic_ray.commands.init import init as cr_init
from cosmic_ray.config import load_config, serialize_config
from cosmic_ray.mutating import mutate_and_test, mutate_code
from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import MutationSpec, TestOutcome, WorkerOutcome, WorkResult

sys.path.insert(0, str(Path(__file__).resolve().parent))
from equivalents import EQUIVALENTS  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODULES = [
  "estimators",
  "basis",
  "scaling",
  "grafting",
  "layout",
  "preconditioner",
  "tensor_ops",
  "_validation",
]
# The tests whose coverage decides what each mutant runs: the default suite less the notebooks,
# README/docs/benchmark smoke runs, optax's 30k-step contrib matrix, subprocess import checks and
# the HLO checks (none of which is a check of one module's numbers or conditions).
TEST_FILES = [
  "tests/test_decomposition_order.py",
  "tests/test_diagnostics.py",
  "tests/test_ecosystem.py",
  "tests/test_eigenvalue_corrected.py",
  "tests/test_factor_invariant.py",
  "tests/test_faults.py",
  "tests/test_invariances.py",
  "tests/test_kl_roots.py",
  "tests/test_lapack_padding.py",
  "tests/test_layouts.py",
  "tests/test_memory.py",
  "tests/test_methods.py",
  "tests/test_mutation_kills.py",
  "tests/test_parity.py",
  "tests/test_precision.py",
  "tests/test_properties.py",
  "tests/test_scale_invariance.py",
  "tests/test_shampoo.py",
  "tests/test_sharding.py",
  "tests/test_statistics_options.py",
  "tests/test_validation.py",
]
STARTUP_SECONDS = 8.0  # python + jax + pytest start of one mutant's run, measured on the 2-core VM


def _copy(rev: str, dest: Path) -> None:
  if dest.exists():
    return
  dest.mkdir(parents=True)
  archive = subprocess.run(
    ["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True
  )
  subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)


def _spans(path: Path) -> list[tuple[tuple[int, int], tuple[int, int]]]:
  """Source spans whose mutants are skipped: annotations and the arguments of ``raise X(...)``."""
  tree = ast.parse(path.read_text())
  nodes = []
  for node in ast.walk(tree):
    if isinstance(node, ast.arg) and node.annotation is not None:
      nodes.append(node.annotation)
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
      nodes.append(node.returns)
    elif isinstance(node, ast.AnnAssign):
      nodes.append(node.annotation)
    elif isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
      nodes.extend(node.exc.args)
      nodes.extend(keyword.value for keyword in node.exc.keywords)
  return [((n.lineno, n.col_offset), (n.end_lineno, n.end_col_offset)) for n in nodes]


def _statement_lines(path: Path) -> dict[int, int]:
  """Line -> first line of the innermost statement spanning it: coverage records a statement
  at its first line, so a mutant on a continuation line (a default argument of a multi-line
  ``def``, an argument on the next line of a call) is looked up there too."""
  first: dict[int, int] = {}
  statements = sorted(
    (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.stmt)),
    key=lambda n: n.end_lineno - n.lineno,
    reverse=True,
  )
  for node in statements:  # the widest first, so the innermost statement writes last
    for line in range(node.lineno, node.end_lineno + 1):
      first[line] = node.lineno
  return first


def _change(source: str, mutation) -> tuple[str, str]:
  """The mutant's first removed and first added line, stripped (its name in reports and in
  ``equivalents.py``; ``--rerun`` finds it again by it in a later commit)."""
  operator = cosmic_ray.plugins.get_operator(mutation.operator_name)(**mutation.operator_args)
  mutated = mutate_code(source, operator, mutation.occurrence) or source
  removed, added = "", ""
  for line in difflib.unified_diff(source.splitlines(), mutated.splitlines(), lineterm="", n=0):
    if line.startswith("-") and not line.startswith("---") and not removed:
      removed = line[1:].strip()
    elif line.startswith("+") and not line.startswith("+++") and not added:
      added = line[1:].strip()
  return removed, added


def _excluded(start: tuple[int, int], spans) -> bool:
  return any(lo <= tuple(start) < hi for lo, hi in spans)


def _file_key(base: Path, test_file: str) -> str:
  """What a test file's coverage depends on: the package, the test helpers and the file itself."""
  digest = hashlib.sha256()
  sources = sorted((base / "kl_precond").glob("*.py")) + sorted(
    p for p in (base / "tests").glob("*.py") if not p.name.startswith("test_")
  )
  for path in [*sources, base / test_file]:
    digest.update(str(path.relative_to(base)).encode() + b"\0" + path.read_bytes())
  return digest.hexdigest()[:16]


def split_by_file(result: dict, base: Path, cache: Path) -> None:
  """Store a coverage map per test file, so a later commit that adds tests reuses the others."""
  cache.mkdir(parents=True, exist_ok=True)
  for test_file in {n.split("::")[0] for n in result["durations"]}:
    if not (base / test_file).exists():
      continue
    part = {
      "lines": {
        module: {
          line: [n for n in ids if n.startswith(test_file + "::")] for line, ids in lines.items()
        }
        for module, lines in result["lines"].items()
      },
      "durations": {n: d for n, d in result["durations"].items() if n.startswith(test_file + "::")},
    }
    (cache / f"{_file_key(base, test_file)}.json").write_text(json.dumps(part))


def coverage_map(base: Path, out: Path, workers: int, cache: Path) -> dict:
  """{"lines": {module: {line: [nodeid, ...]}}, "durations": {nodeid: seconds}}: the test files
  whose code, helpers and package are unchanged come from the cache, the others are run."""
  files = [f for f in TEST_FILES if (base / f).exists()]
  missing = [f for f in files if not (cache / f"{_file_key(base, f)}.json").exists()]
  if missing:
    env = dict(os.environ, PYTHONPATH=str(base), KL_MUTATION_DURATIONS=str(out / "durations.json"))
    start = time.time()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command += ["-p", "tests.mutation.timing_plugin", "--cov=kl_precond", "--cov-context=test"]
    command += ["--cov-report=", "-n", str(workers), "--dist", "loadfile", *missing]
    run = subprocess.run(command, cwd=base, env=env, capture_output=True, text=True)
    tail = run.stdout.strip().splitlines()[-1]
    print(f"coverage map of {len(missing)} test files: {tail} ({time.time() - start:.0f} s)")
    if run.returncode != 0:
      raise SystemExit(f"the tests fail on the unmutated copy:\n{run.stdout[-5000:]}")
    import coverage

    data = coverage.CoverageData(basename=str(base / ".coverage"))
    data.read()
    lines: dict = {}
    for module in MODULES:
      by_line = data.contexts_by_lineno(str(base / "kl_precond" / f"{module}.py"))
      lines[module] = {
        str(line): sorted({c.rsplit("|", 1)[0] for c in contexts if c})
        for line, contexts in by_line.items()
      }
    durations = json.loads((out / "durations.json").read_text())
    split_by_file({"lines": lines, "durations": durations}, base, cache)
  merged: dict = {"lines": {m: defaultdict(list) for m in MODULES}, "durations": {}}
  for test_file in files:
    part = json.loads((cache / f"{_file_key(base, test_file)}.json").read_text())
    merged["durations"].update(part["durations"])
    for module in MODULES:
      for line, ids in part["lines"].get(module, {}).items():
        merged["lines"][module][line].extend(ids)
  return merged


def _select(nodeids, durations, budget: float, reach: dict) -> tuple[list[str], float]:
  """The covering tests, the most specific first (fewest lines of the module run, i.e. unit
  tests before end-to-end runs; then the fastest) for half of ``budget`` seconds of test time,
  then the most specific test of each file not yet chosen, then the rest in the same order."""
  ordered = sorted(nodeids, key=lambda n: (reach.get(n, 0), durations.get(n, 60.0), n))
  firsts: dict[str, str] = {}
  for nodeid in ordered:
    firsts.setdefault(nodeid.split("::")[0], nodeid)
  chosen: list[str] = []
  total = 0.0
  for limit, candidates in ((budget / 2, ordered), (budget, firsts.values()), (budget, ordered)):
    for nodeid in candidates:
      cost = durations.get(nodeid, 60.0)
      if nodeid not in chosen and (not chosen or total + cost <= limit):
        chosen.append(nodeid)
        total += cost
  return chosen, total


def _result_row(module, item, result, selection, change) -> dict:
  mutation = item.mutations[0]
  outcome = result.test_outcome.value if result.test_outcome else result.worker_outcome.value
  if result.output == "timeout":
    outcome = "timeout"
  return {
    "module": module,
    "operator": mutation.operator_name,
    "occurrence": mutation.occurrence,
    "line": mutation.start_pos[0],
    "old": change[0],
    "new": change[1],
    "outcome": outcome,
    "tests": len(selection),
  }


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--per-module", type=int, default=20, help="mutants drawn per module")
  parser.add_argument("--workers", type=int, default=2, help="mutants run at once (copies)")
  parser.add_argument("--budget", type=float, default=30.0, help="test seconds per mutant")
  parser.add_argument("--timeout-factor", type=float, default=4.0)
  parser.add_argument("--rev", default="HEAD")
  parser.add_argument("--scratch", default="/work/mut")
  parser.add_argument("--modules", default=",".join(MODULES))
  parser.add_argument("--rerun", help="results.json of an earlier run: run only its survivors")
  args = parser.parse_args()

  commit = subprocess.run(
    ["git", "-C", str(REPO), "rev-parse", args.rev], check=True, capture_output=True, text=True
  ).stdout.strip()
  out = Path(args.scratch) / commit[:12]
  out.mkdir(parents=True, exist_ok=True)
  started = time.time()
  base = out / "base"
  _copy(commit, base)
  copies = [out / f"w{i}" for i in range(args.workers)]
  for copy in copies:
    _copy(commit, copy)
  cmap = coverage_map(base, out, args.workers, Path(args.scratch) / "coverage-cache")
  durations = cmap["durations"]
  rerun = None
  if args.rerun:
    earlier = json.loads(Path(args.rerun).read_text())
    rerun = set()
    for r in earlier["rows"]:
      if r["outcome"] not in ("survived", "timeout"):
        continue
      if not (r["old"] or r["new"]):  # named again from the earlier commit's copy
        path = Path(args.scratch) / earlier["commit"][:12] / "base" / "kl_precond"
        spec = MutationSpec(
          path / f"{r['module']}.py", r["operator"], r["occurrence"], (r["line"], 0), (r["line"], 1)
        )
        r["old"], r["new"] = _change(spec.module_path.read_text(), spec)
      rerun.add((r["module"], r["operator"], r["old"], r["new"]))

  jobs = []  # (module, work item, selection, test seconds)
  changes_by_job: dict[str, tuple[str, str]] = {}
  modules = args.modules.split(",")
  for module in modules:
    rel = Path("kl_precond") / f"{module}.py"
    session = out / f"{module}.sqlite"
    config = load_config(str(REPO / "tests" / "mutation" / "cosmic-ray.toml"))
    config["module-path"] = str(rel)
    (out / f"{module}.toml").write_text(serialize_config(config))
    with use_db(str(session), WorkDB.Mode.create) as db:
      cwd = os.getcwd()
      os.chdir(base)
      try:
        cr_init([rel], db, config.operators_config)
      finally:
        os.chdir(cwd)
      spans = _spans(base / rel)
      items = sorted(
        db.pending_work_items,
        key=lambda i: (i.mutations[0].operator_name, i.mutations[0].occurrence),
      )
      eligible = [i for i in items if not _excluded(i.mutations[0].start_pos, spans)]
      sample = random.Random(args.seed).sample(eligible, min(args.per_module, len(eligible)))
      source = (base / rel).read_text()
      if rerun is not None:  # the earlier survivors, found again by their text in this commit
        wanted = {(op, old, new) for m, op, old, new in rerun if m == module}
        operators = {op for op, _, _ in wanted}
        sample = [
          i
          for i in eligible
          if i.mutations[0].operator_name in operators
          and (i.mutations[0].operator_name, *_change(source, i.mutations[0])) in wanted
        ]
      changes = {i.job_id: _change(source, i.mutations[0]) for i in sample}
      changes_by_job.update(changes)
      chosen = {i.job_id for i in sample}
      skipped = [i.job_id for i in items if i.job_id not in chosen]
      db.set_multiple_results(
        skipped, WorkResult(output="not sampled, or excluded", worker_outcome=WorkerOutcome.SKIPPED)
      )
      print(
        f"{module}: {len(items)} mutants, {len(eligible)} outside annotations/messages, {len(sample)} drawn"
      )
    lines = cmap["lines"][module]
    statement = _statement_lines(base / rel)
    reach: dict[str, int] = defaultdict(int)  # lines of this module each test runs
    for ts in lines.values():
      for t in ts:
        reach[t] += 1
    module_tests = sorted(reach)
    for item in sample:
      mutation = item.mutations[0]
      span = range(mutation.start_pos[0], mutation.end_pos[0] + 1)
      looked_up = {str(line) for line in span} | {str(statement.get(line, line)) for line in span}
      covering = set()
      for line in looked_up:
        covering.update(lines.get(line, ()))
      order = reach
      if not covering and any(lines.get(line) is not None for line in looked_up):
        # The statement runs at import time only (a default, a field, a decorator): which test
        # reads its value is unknown, so every test of the module is a candidate, fastest first.
        covering, order = set(module_tests), {}
      selection, seconds = _select(covering, durations, args.budget, order)
      jobs.append((module, item, selection, seconds))

  estimate = sum(STARTUP_SECONDS + s for *_, s in jobs) / args.workers
  print(
    f"{len(jobs)} mutants, about {estimate / 60:.0f} min of test time on {args.workers} workers"
  )
  free = list(copies)
  rows = []
  timings = {}

  def work(job):
    module, item, selection, seconds = job
    copy = free.pop()
    try:
      # A run stopped mid-mutant leaves the copy mutated: start each mutant from the clean file.
      clean = base / item.mutations[0].module_path
      (copy / item.mutations[0].module_path).write_bytes(clean.read_bytes())
      mutation = attrs.evolve(item.mutations[0], module_path=copy / item.mutations[0].module_path)
      if not selection:
        return (
          job,
          WorkResult(
            output="no test runs this line",
            test_outcome=TestOutcome.SURVIVED,
            worker_outcome=WorkerOutcome.NORMAL,
          ),
          0.0,
        )
      # Generous: a test alone compiles what it shared with others in the coverage run, and the
      # machine may be shared; only a mutant that hangs should reach it.
      timeout = args.timeout_factor * seconds + 120
      command = [
        "env",
        "-C",
        str(copy),
        f"PYTHONPATH={copy}",
        sys.executable,
        "-m",
        "pytest",
        "-x",
        "-q",
      ]
      command += ["-p", "no:cacheprovider", "-n", "0", "--timeout", str(int(timeout)), *selection]
      t0 = time.time()
      result = mutate_and_test([mutation], shlex.join(command), timeout)
      return job, result, time.time() - t0
    finally:
      free.append(copy)

  done = 0
  with ThreadPoolExecutor(max_workers=args.workers) as pool:
    for (module, item, selection, _), result, seconds in pool.map(work, jobs):
      done += 1
      with use_db(str(out / f"{module}.sqlite"), WorkDB.Mode.open) as db:
        db.set_result(item.job_id, result)
      row = _result_row(module, item, result, selection, changes_by_job[item.job_id])
      row["seconds"] = round(seconds, 1)
      key = (module, row["operator"], row["old"], row["new"])
      if row["outcome"] == "survived" and key in EQUIVALENTS:
        row["equivalent"] = EQUIVALENTS[key]
      if row["outcome"] == "survived":
        row["diff"] = result.diff
        row["selection"] = selection
      rows.append(row)
      timings[module] = timings.get(module, 0.0) + seconds
      print(
        f"[{done}/{len(jobs)} {time.time() - started:.0f}s] {module}:{row['line']} {row['operator']} -> {row['outcome']} ({seconds:.0f} s)",
        flush=True,
      )

  report(rows, modules, commit, time.time() - started, args, out)


def report(rows, modules, commit, seconds, args, out: Path) -> None:
  table = [
    "| module | killed / total | survived (equivalent) | of which timeouts | incompetent | score |"
  ]
  table.append("| --- | --- | --- | --- | --- | --- |")
  for module in modules:
    mine = [r for r in rows if r["module"] == module]
    killed = [r for r in mine if r["outcome"] in ("killed", "timeout", "incompetent")]
    survived = [r for r in mine if r["outcome"] == "survived"]
    equivalent = [r for r in survived if "equivalent" in r]
    timeouts = sum(r["outcome"] == "timeout" for r in mine)
    incompetent = sum(r["outcome"] == "incompetent" for r in mine)
    score = len(killed) / max(1, len(mine) - len(equivalent))
    table.append(
      f"| `{module}` | {len(killed)} / {len(mine)} | {len(survived)} ({len(equivalent)}) | {timeouts} | {incompetent} | {100 * score:.0f}% |"
    )
  lines = [
    f"commit {commit}, seed {args.seed}, {args.per_module} per module, {args.workers} workers, {seconds / 60:.1f} min",
    "",
  ]
  lines += table + ["", "Survivors:", ""]
  for r in rows:
    if r["outcome"] == "survived":
      note = f" — equivalent: {r['equivalent']}" if "equivalent" in r else ""
      lines.append(
        f"- `{r['module']}`:{r['line']} {r['operator']}: `{r['old']}` -> `{r['new']}`{note}"
      )
  text = "\n".join(lines)
  print(text)
  name = "rerun" if args.rerun else "results"
  (out / f"{name}.md").write_text(text + "\n")
  (out / f"{name}.json").write_text(
    json.dumps({"commit": commit, "seconds": seconds, "rows": rows}, indent=1)
  )


if __name__ == "__main__":
  main()
