"""The package layout keeps the trust chain's roles apart (docs/design.md, "Layout").

Read from the source, not by importing: every ``import`` statement counts, including those inside functions
(a deferred import is still a dependency, and a circle through one is still a circle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("auditor", "compose", "console", "contracts", "cvm", "kms", "kms_client", "sealing_cli")
# Only the `seal` command may import the command package; every role below it stands on its own.
NEVER_IMPORT_THE_CLI = ("auditor", "compose", "console", "contracts", "cvm", "kms", "kms_client")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The project module an import names: the longest prefix of ``target`` that is one of ours."""
    parts = target.split(".")
    while parts:
        name = ".".join(parts)
        if name in modules:
            return name
        parts.pop()
    return None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import name` imports the submodule pkg.name when there is one, else pkg itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in (_resolve(target, modules) for target in targets) if t and t != module)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_role_imports_the_cli(graph):
    offenders = sorted(f"{module} imports {target}" for module, targets in graph.items()
                       if module.split(".")[0] in NEVER_IMPORT_THE_CLI
                       for target in targets if target.split(".")[0] == "sealing_cli")
    assert not offenders, "\n".join(offenders)


def test_kms_and_its_clients_share_layouts_through_one_module(graph):
    """The KMS and its clients agree on signed bytes through kms_client.messages, not each other's internals."""
    offenders = sorted(f"{module} imports {target}" for module, targets in graph.items()
                       if module.startswith("kms_client") for target in targets if target.split(".")[0] == "kms")
    assert not offenders, "\n".join(offenders)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a set of modules in a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles(graph):
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    """The check above can fail: a two-module circle and a three-module one are both reported."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": set()}) == [
        ["a", "b"], ["c", "d", "e"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
