"""Imports inside ``kl_precond`` go one way: no module imports one that imports it back.

Read from the source with ``ast`` (nothing is imported or compiled): every ``import`` and
``from ... import`` statement counts, at module level or inside a function (a deferred import
that closes a cycle is still a cycle), under ``if TYPE_CHECKING:`` too.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = "kl_precond"
SOURCE = pathlib.Path(__file__).resolve().parents[1] / PACKAGE


def _module_name(path: pathlib.Path) -> str:
  return PACKAGE if path.stem == "__init__" else f"{PACKAGE}.{path.stem}"


def _targets(node: ast.Import | ast.ImportFrom, module: str, modules: set[str]) -> set[str]:
  """The modules of the package that an import statement in ``module`` loads by name.

  ``from kl_precond import x`` loads the submodule ``x`` when there is one, else reads a name
  of the package's ``__init__`` (so it depends on ``kl_precond`` itself). The package
  ``__init__`` that Python runs before any submodule is not counted as a dependency.
  """
  if isinstance(node, ast.Import):
    names = [alias.name for alias in node.names]
    return {name for name in names if name in modules}
  if node.level:  # relative: from . import x, from .x import y
    package = module if module == PACKAGE else module.rsplit(".", 1)[0]
    for _ in range(node.level - 1):
      package = package.rsplit(".", 1)[0]
    base = f"{package}.{node.module}" if node.module else package
  else:
    base = node.module or ""
  if base != PACKAGE and not base.startswith(PACKAGE + "."):
    return set()
  found = set()
  for alias in node.names:
    child = f"{base}.{alias.name}"
    if child in modules:
      found.add(child)
    elif base in modules:
      found.add(base)
  return found


def import_graph(source: pathlib.Path = SOURCE) -> dict[str, set[str]]:
  """``{module: the package's modules it imports}`` for every ``*.py`` file of ``source``."""
  paths = sorted(source.glob("*.py"))
  modules = {_module_name(path) for path in paths}
  graph: dict[str, set[str]] = {}
  for path in paths:
    module = _module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    edges: set[str] = set()
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        edges |= _targets(node, module, modules)
    graph[module] = edges - {module}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None (depth-first search)."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for target in sorted(graph.get(node, ())):
      if state.get(target) == 1:
        return path[path.index(target) :] + [target]
      if target not in state:
        cycle = visit(target)
        if cycle:
          return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_the_graph_is_read() -> None:
  """The parser sees the package's imports (so the test below cannot pass on an empty graph)."""
  graph = import_graph()
  assert f"{PACKAGE}.preconditioner" in graph[f"{PACKAGE}.sharding"]
  assert f"{PACKAGE}.placement" in graph[f"{PACKAGE}.preconditioner"]
  assert f"{PACKAGE}.sharding" in graph[PACKAGE]


def test_find_cycle_finds_one() -> None:
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert find_cycle(graph) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles() -> None:
  graph = import_graph()
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle in kl_precond: " + " -> ".join(cycle or [])
