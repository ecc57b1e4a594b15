"""The rows of ``peers.py``'s report (one per runner of each worker, or of a ``step_time.json``)
and the verdicts drawn from them.

``RowMaker`` names and keys the rows of one invocation (its settings and each task's longest
axis); ``peers._Run``, the driver's state, is one. Every row records its process (``process``)
and environment (``env``); ratios are to the AdamW of the row's own process. Rows from
``--ours_json`` (``json_rows``) are marked as from another environment and their ratios are to
that run's AdamW.

The verdicts compare each peer only with its specs of ours at equal settings
(``peers_specs.EQUAL_SETTINGS``, matched by ``canonical`` key), on both the amortised and the
median ratio.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

from benchmarks.peers_specs import (
  EQUAL_SETTINGS,
  PEERS,
  canonical,
  failure_reason,
  parse_spec,
  update_period,
)

_SPLIT_NOTE = {"whole": "", "blocks": ", blocks", "unrotated": ", longer axes unrotated"}


@functools.lru_cache
def largest_axis(task: str, smoke: bool) -> int:
  """The longest axis of any parameter of the task (caps the effective max_precond_dim)."""
  import jax

  from benchmarks import models

  params = models.make_task(task, smoke=smoke).params
  return max(max(x.shape, default=1) for x in jax.tree.leaves(params))


class RowMaker:
  """Names, keys and matches the rows of one invocation: its settings (``frequency``,
  ``max_precond_dim``) and ``report["largest_axis"]``."""

  def __init__(self, settings: dict[str, Any], report: dict[str, Any]):
    self.settings, self.report = settings, report

  def canonical(self, task: str, spec: str) -> tuple[str, int, str]:
    return canonical(spec, self.settings["max_precond_dim"], self.report["largest_axis"][task])

  def matches(self, task: str, spec: str, peer: str) -> bool:
    wanted = {self.canonical(task, s) for s in EQUAL_SETTINGS.get(peer, ())}
    return self.canonical(task, spec) in wanted

  def rows(
    self,
    task: str,
    process: str,
    env: str,
    result: dict[str, Any],
    peers: Sequence[str],
    specs: Sequence[str],
  ) -> list[dict[str, Any]]:
    """AdamW's row, then a row per peer and per spec of ours (a result, or why there is none)."""
    frequency = self.settings["frequency"]
    results, errors = result.get("results", {}), result.get("errors", {})
    base = {"task": task, "process": process, "env": env}
    adamw = results.get("adamw")
    reference = (
      {"adamw_median_ms": adamw["median_ms"], "adamw_mean_ms": adamw["mean_ms"]} if adamw else {}
    )
    rows = []
    if adamw:
      rows.append(
        dict(base, method="adamw", package="optax", settings="optax.adamw", **reference, **adamw)
      )
    for name in [*peers, *specs]:
      if name in peers:
        meta = {
          "method": name,
          "package": PEERS[name][0],
          "settings": PEERS[name][1].replace(", f", f", f={frequency}"),
        }
      else:
        optimizer, dim = parse_spec(name, self.settings["max_precond_dim"])
        key = self.canonical(task, name)
        meta = {
          "method": name,
          "package": "kl_precond",
          "settings": f"f={frequency}, max_precond_dim={dim}{_SPLIT_NOTE[key[2]]}",
          "optimizer": optimizer,
          "max_precond_dim": dim,
          "canonical": list(key),
        }
      if name in results:
        rows.append(dict(base, **meta, **reference, **results[name]))
      elif name in result.get("skipped", {}):
        rows.append(dict(base, **meta, error=result["skipped"][name], why="not built"))
      else:
        failure = errors.get(name, {})
        error = failure.get("error") or result.get("error", "no result")
        text = failure.get("traceback") or result.get("traceback") or result.get("stderr_tail", "")
        rows.append(dict(base, **meta, error=error, why=failure_reason(error), traceback=text))
    return rows


def json_rows(
  step_time: dict[str, Any], tasks: Sequence[str], frequency: int, run: RowMaker, path: str
) -> list[dict[str, Any]]:
  """Rows of a step_time report (``--ours_json``) for the peers' tasks and frequency."""
  rows = []
  jax_version = step_time["environment"]["jax"]
  dim = step_time.get("settings", {}).get("max_precond_dim", 10000)
  env = f"jax {jax_version} (this venv, {os.path.basename(path)}: another environment)"
  for config in step_time["configs"]:
    if config["task"] not in tasks or config["frequency"] != frequency:
      continue
    results = config["results"]
    adamw = results.get("adamw", {})
    reference = {
      "adamw_median_ms": adamw.get("median_ms", float("nan")),
      "adamw_mean_ms": adamw.get("mean_ms", float("nan")),
    }
    base = {"task": config["task"], "process": "step_time.json", "env": env}
    for method in [*results, *config["skipped"]]:
      meta: dict[str, Any] = {"method": method}
      if method == "adamw":
        meta.update(package="optax", settings="optax.adamw")
      else:
        # step_time builds with a plain max_precond_dim: no blocks for SOAP and the KL methods,
        # so a row that "name@N" (blocks) would misname keeps its max_precond_dim in its name.
        key = canonical(method, dim, run.report["largest_axis"][config["task"]], blocks=False)
        if dim != run.settings["max_precond_dim"]:
          spec = f"{method}@{dim}"
          same = run.canonical(config["task"], spec) == key
          meta["method"] = spec if same else f"{method} (max_precond_dim={dim})"
        meta.update(
          package="kl_precond",
          settings=f"f={config['frequency']}, max_precond_dim={dim}{_SPLIT_NOTE[key[2]]}",
          optimizer=method,
          max_precond_dim=dim,
          canonical=list(key),
        )
      if method in results:
        rows.append(dict(base, **meta, **reference, **results[method]))
      else:
        rows.append(dict(base, **meta, error=config["skipped"][method], why="not built"))
  return rows


def verdicts(rows: Sequence[dict[str, Any]], run: RowMaker) -> dict[str, Any]:
  """Each peer against its equal-settings specs of ours (``EQUAL_SETTINGS``), on both ratios.

  A fixed-probability Kron peer is at equal settings only with a run whose ``--frequency`` is
  its mean update period (``update_period``: p = 0.1 with f = 10, p = 0.03 with f = 33); its
  comparisons in a run at another frequency are kept with ``equal_rate`` False and not counted.

  For each spec the row of ours with the same ``canonical`` key (method, effective
  max_precond_dim, blocks or unrotated longer axes) is taken, from the peer's own process if
  there is one (head-to-head), else from another process (the fallback layout, ``--ours_json``;
  ``same_process`` False). A spec with no row at all is listed under ``not_compared``.
  """
  found, missing = [], []
  for peer_row in rows:
    if peer_row["package"] in ("kl_precond", "optax") or "ratio_amortised" not in peer_row:
      continue
    task, peer = peer_row["task"], peer_row["method"]
    ours = [r for r in rows if r["task"] == task and r["package"] == "kl_precond"]
    chosen: list[int] = []
    for spec in EQUAL_SETTINGS.get(peer, ()):
      key = list(run.canonical(task, spec))
      candidates = [r for r in ours if r["canonical"] == key]
      if not candidates:
        missing.append({"task": task, "peer": peer, "spec": spec})
        continue
      best = min(
        candidates,
        key=lambda r: (
          "ratio_amortised" not in r,  # measured first
          r["process"] != peer_row["process"],  # then the peer's own process
          r["env"] != peer_row["env"],  # then the same environment
          r["method"] != spec,  # then the spec as written
        ),
      )
      if id(best) in chosen:
        continue
      chosen.append(id(best))
      verdict = {
        "task": task,
        "peer": peer,
        "peer_process": peer_row["process"],
        "peer_ratio_amortised": peer_row["ratio_amortised"],
        "peer_ratio_median": peer_row["ratio_median"],
        "equal_spec": spec,
        "ours": best["method"],
        "ours_process": best["process"],
        "same_process": best["process"] == peer_row["process"],
        "same_environment": best["env"] == peer_row["env"],
        "equal_rate": update_period(peer) in (None, run.settings["frequency"]),
      }
      if "ratio_amortised" in best:
        verdict.update(
          ours_ratio_amortised=best["ratio_amortised"],
          ours_ratio_median=best["ratio_median"],
          faster_amortised=best["ratio_amortised"] < peer_row["ratio_amortised"],
          faster_median=best["ratio_median"] < peer_row["ratio_median"],
        )
      else:
        verdict["error"] = best.get("error", "no result")
      found.append(verdict)
  return {"comparisons": found, "not_compared": missing}
