"""The report of ``peers.py``: ``peers.json``, ``peers.md`` (``markdown``) and ``peers.png``
(``plot``), written to ``--out_dir`` by ``write``.

``peers.md`` holds one table row per row of the report (its process and status), the processes,
the verdict table (each peer against its specs of ours at equal settings; lower is faster), the
failures and how each peer package fares unchanged on this venv's JAX. ``peers.png``: amortised
ratios to AdamW, ours blue, peers red.
"""

from __future__ import annotations

import json
import os
from typing import Any

from benchmarks.peers_specs import PEERS
from benchmarks.peers_venv import SCHEDULER_FLAG

HEADERS = (
  "task",
  "process",
  "method",
  "settings",
  "median ms",
  "mean ms",
  "refresh ms",
  "amortised ms",
  "AdamW median ms (same process)",
  "×AdamW median",
  "×AdamW amortised",
  "final loss",
  "status",
)
VERDICT_HEADERS = (
  "task",
  "peer",
  "peer ×AdamW amortised (median)",
  "ours",
  "ours ×AdamW amortised (median)",
  "faster amortised?",
  "faster median?",
)


def _pair(amortised: float, median: float) -> str:
  return f"{amortised:.2f} ({median:.2f})"


def _process_line(name: str, p: dict[str, Any]) -> str:
  env = p["environment"]
  where = f"jax {env['jax']}, optax {env['optax']}" if env else "no environment reported"
  what = f"adamw + {len(p['peers'])} peer(s) + {len(p['ours'])} of ours"
  status = "ok" if p["ok"] else f"FAILED: {p['error'][:200]}"
  if not p["ok"] and p["kind"] == "head-to-head":
    status += f" — fell back to one worker per peer (culprit: {p['culprit'] or 'unknown'})"
  return f"- `{name}` ({p['where']}: {where}): {what}; {p['wall_seconds']:.0f} s; {status}"


def markdown(report: dict[str, Any]) -> str:
  from benchmarks import models

  settings, rows, nan = report["settings"], [], float("nan")
  for r in report["rows"]:
    status = "ok"
    if "error" in r:
      status = f"{'skipped' if r.get('why') == 'not built' else 'FAILED'}: {r['error'][:120]}"
    rows.append(
      (
        r["task"],
        r["process"].partition("/")[2] or r["process"],
        r["method"],
        r["settings"],
        r.get("median_ms", nan),
        r.get("mean_ms", nan),
        r.get("refresh_ms", nan),
        r.get("amortised_ms", nan),
        r.get("adamw_median_ms", nan),
        r.get("ratio_median", nan),
        r.get("ratio_amortised", nan),
        r.get("final_loss", nan),
        status,
      )
    )
  layout = "one head-to-head worker per task" if settings["combined"] else "one worker per peer"
  lines = [
    "# Peers vs ours, head-to-head: step time as a ratio to optax.adamw of the same process",
    "",
    f"AdamW, the peers and ours ({layout}) "
    + (
      f"in this venv (its jax; peer packages from "
      f"`{report['venv'].get('peer_packages', {}).get('path', '?')}`, "
      "installed without their pinned dependencies), "
      if settings.get("in_this_venv")
      else f"in the jax 0.5.3 venv at `{settings['peer_venv']}` (pins in requirements-peers.txt), "
    )
    + f"`XLA_FLAGS={SCHEDULER_FLAG}`, "
    f"`OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS') or 'unset'}`, "
    "interleaved in chunks of "
    f"{settings['chunk']}: {settings['warmup']} warmup + {settings['steps']} timed calls per "
    f"method. Frequency {settings['frequency']}; ours at max_precond_dim "
    f"{settings['max_precond_dim']} unless `@N`"
    + ("; eigh batched as lax.map (--sequential_eigh)" if settings["sequential_eigh"] else "")
    + f"; wall {report['wall_seconds']:.0f} s.",
    "",
    models.markdown_table(HEADERS, rows),
    "",
    "Every ratio is to the AdamW of the row's own process (`process`); amortised = "
    "((f-1)·median(non-refresh) + median(refresh)) / f where the refresh steps are found "
    "(ours, distributed Shampoo), else the mean; ratios: amortised / AdamW mean, median / AdamW "
    "median.",
    "",
    "Processes:",
    "",
  ]
  lines += [_process_line(name, p) for name, p in report["processes"].items()]
  if settings["ours_json"]:
    lines.append(
      f"- `step_time.json`: ours from `{settings['ours_json']}` (this venv, another environment "
      "and process; ratios to that run's AdamW)"
    )
  comparisons = report["verdicts"]["comparisons"]
  if comparisons:
    table = []
    for v in comparisons:
      mark = "" if v["same_process"] else (" †" if v["same_environment"] else " ‡")
      rate = "" if v["equal_rate"] else " ◇"
      if "error" in v:
        ours, faster_amortised, faster_median = f"FAILED: {v['error'][:60]}", "–", "–"
      else:
        ours = _pair(v["ours_ratio_amortised"], v["ours_ratio_median"])
        faster_amortised = "yes" if v["faster_amortised"] else "**no**"
        faster_median = "yes" if v["faster_median"] else "**no**"
      table.append(
        (
          v["task"],
          v["peer"] + rate,
          _pair(v["peer_ratio_amortised"], v["peer_ratio_median"]),
          v["ours"] + mark,
          ours,
          faster_amortised,
          faster_median,
        )
      )
    lines += [
      "",
      "Verdicts: each peer against the specs of ours at equal settings (`EQUAL_SETTINGS`); lower "
      "is faster.",
      "",
      models.markdown_table(VERDICT_HEADERS, table),
    ]
    measured = [v for v in comparisons if "error" not in v and v["equal_rate"]]
    lines += [
      "",
      f"Ours faster in {sum(v['faster_amortised'] for v in measured)} of {len(measured)} "
      f"comparisons amortised, {sum(v['faster_median'] for v in measured)} of {len(measured)} by "
      "median.",
    ]
    if not all(v["equal_rate"] for v in comparisons):
      lines += [
        "",
        f"◇ A Kron peer with a fixed update probability p updates every 1/p steps on average, "
        f"ours every f = {settings['frequency']}: not equal settings, so not counted (run with "
        "`--frequency` = 1/p for that comparison).",
      ]
    notes = []
    if any(not v["same_process"] and v["same_environment"] for v in comparisons):
      notes.append("† ours from another process of the same venv (fallback layout)")
    if any(not v["same_environment"] for v in comparisons):
      notes.append("‡ ours from another environment (`--ours_json`)")
    if notes:
      lines += ["", "; ".join(notes) + ": each ratio is to its own process's AdamW."]
  missing = report["verdicts"]["not_compared"]
  if missing:
    lines += [
      "",
      "Not compared (no such run of ours): "
      + "; ".join(f"{m['task']} {m['peer']} ↔ {m['spec']}" for m in missing)
      + ".",
    ]
  failures = [r for r in report["rows"] if "error" in r]
  if failures:
    lines += ["", "Failures:", ""]
    lines += [
      f"- {r['task']} {r['method']} (`{r['process']}`): {r['error'][:300]}"
      + (f" — {r['why']}" if r.get("why") else "")
      for r in failures
    ]
  if report["probes"]:
    lines += ["", "Each peer package unchanged in this repository's venv:", ""]
    for peer, p in report["probes"].items():
      verdict = "runs" if p["runs"] else f"fails: {p['error'][:200]}"
      lines.append(
        f"- {PEERS[peer][0]} ({peer}): {verdict}" + (f" — {p['why']}" if p["why"] else "")
      )
  return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str) -> None:
  import numpy as np
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  tasks = list(dict.fromkeys(r["task"] for r in report["rows"]))
  fig = Figure(figsize=(5.5 * max(1, len(tasks)), 4))
  FigureCanvasAgg(fig)
  for k, task in enumerate(tasks):
    ax = fig.add_subplot(1, len(tasks), k + 1)
    rows = [r for r in report["rows"] if r["task"] == task and r["method"] != "adamw"]
    values = [r.get("ratio_amortised", np.nan) for r in rows]
    colors = ["C0" if r["package"] == "kl_precond" else "C3" for r in rows]
    labels = [r["method"] + ("" if r["process"].endswith("/head-to-head") else " †") for r in rows]
    ax.bar(np.arange(len(rows)), values, color=colors)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(rows)), labels, rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("amortised step time / AdamW (same process)")
    ax.set_title(f"{task}: ours (blue) vs peers (red); † not head-to-head", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def write(report: dict[str, Any], out_dir: str) -> None:
  with open(os.path.join(out_dir, "peers.json"), "w") as f:
    json.dump(report, f, indent=1, default=str)
  text = markdown(report)
  with open(os.path.join(out_dir, "peers.md"), "w") as f:
    f.write(text)
  plot(report, os.path.join(out_dir, "peers.png"))
  print(text, flush=True)
