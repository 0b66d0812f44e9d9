"""The house rules, read from the source: no import cycle among our modules (every `import`, also
inside functions, and every "module:function" handler the CLI dispatches to), and no import
upward: `vitae` and `infra` import nothing of ours but themselves; `data_prep` and `cluster` only
`infra`; `pipelines` anything."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {  # package -> the other packages of ours it may import
    "vitae": set(),
    "infra": set(),
    "data_prep": {"infra"},
    "cluster": {"infra"},
    "pipelines": {"vitae", "infra", "data_prep", "cluster"},
}
HANDLER = re.compile(r"^((?:%s)(?:\.\w+)+):\w+$" % "|".join(ALLOWED))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_modules() -> dict[str, Path]:
    return {module_name(path): path for package in ALLOWED for path in sorted((REPO / package).rglob("*.py"))}


def imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement (or a CLI handler string) refers to."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
        return [base, *(f"{base}.{alias.name}" for alias in node.names)]
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and (match := HANDLER.match(node.value)):
        return [match.group(1)]
    return []


def import_graph() -> dict[str, set[str]]:
    modules = our_modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for name in imported_names(node, module, path.name == "__init__.py"):
                while name and name not in modules:  # `from pkg.mod import function` -> pkg.mod
                    name = name.rpartition(".")[0]
                if name and name != module:
                    edges.add(name)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_sees_every_kind_of_import(graph):
    assert "infra.errors" in graph["pipelines.cli"]  # a top-level `from ... import`
    assert "pipelines.training.driver" in graph["pipelines.cli.jobs"]  # a handler string
    assert "vitae.factory" in graph["vitae"]  # a relative import


def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_no_import_upward(graph):
    upward = sorted(f"{module} -> {target}" for module, targets in graph.items() for target in targets
                    if target.split(".")[0] != module.split(".")[0]
                    and target.split(".")[0] not in ALLOWED[module.split(".")[0]])
    assert upward == []


def test_a_cycle_and_an_upward_import_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    node = ast.parse("from pipelines.cli import main").body[0]
    assert imported_names(node, "infra.errors", False) == ["pipelines.cli", "pipelines.cli.main"]


def places(pattern: str) -> list[str]:
    """The modules of ours whose source matches `pattern`."""
    return sorted(module for module, path in our_modules().items() if re.search(pattern, path.read_text()))


def test_mlflow_has_one_owner_and_no_process_wide_default_is_changed():
    assert places(r"MlflowClient\(") == ["pipelines.tracking.client"]
    assert places(r"QUICK_RETRIES|MLFLOW_HTTP_REQUEST") == ["pipelines.tracking.client"]
    assert places(r"set_tracking_uri\(|set_registry_uri\(") == []
