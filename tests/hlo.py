"""Reading compiled HLO text in tests."""

from __future__ import annotations

import re


def dots_on_every_call(hlo: str) -> int:
  """Matrix products (``dot`` instructions) in the computations a compiled module runs on every
  call: ENTRY and what it calls (fusions, reductions, loops), not the branches of its
  conditionals (in kl_precond: the first call and the refreshes)."""
  bodies = {}
  entry = ""
  for block in re.split(r"\n(?=\S)", hlo):
    match = re.match(r"(ENTRY )?%?([\w.\-]+) ", block)
    if match:
      bodies[match.group(2)] = block
      entry = match.group(2) if match.group(1) else entry
  seen: set[str] = set()
  stack = [entry]
  while stack:
    name = stack.pop()
    if name in seen or name not in bodies:
      continue
    seen.add(name)
    stack += re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", bodies[name])
  return sum(len(re.findall(r"= \S+ dot\(", bodies[name])) for name in seen)


def instruction_count(hlo: str) -> int:
  """Instructions in a compiled module's text: every ``%name = ...`` line, in every computation
  (ENTRY, fusions, branches)."""
  return len(re.findall(r"^\s*(?:ROOT )?%\S+ = ", hlo, re.M))
