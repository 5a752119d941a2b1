"""The package's layout rules, checked from the source: no import cycle between its modules (imports
inside functions included), and each layer imports only the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lord_export"

#: What each part of the package may import (besides itself and the top-level modules in ``BASE``).
#: A part's own subpackage is always allowed; lower layers come first.
BASE = {
    "lord_export.errors",
    "lord_export._version",
    "lord_export.config",
    "lord_export.device",
    "lord_export.progress",
}
ALLOWED = {
    "core": {"core"},
    "calibration": {"core", "calibration", "persist.hf"},
    "persist": {"core", "persist"},
    "integrations": {"core", "persist", "integrations"},
    "passes": {"core", "passes"},
    "pipeline": {"core", "calibration", "persist", "integrations", "pipeline"},
    "export": {"core", "calibration", "persist", "passes", "export"},
    "measure": {"core", "calibration", "persist", "integrations", "pipeline", "export", "measure"},
    "cli": {"core", "calibration", "persist", "integrations", "pipeline", "export", "measure", "cli"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "assets" not in p.parts}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every lord_export module ``name`` imports, at module level or inside functions."""
    is_pkg = path.name == "__init__.py"
    package = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
        else:
            continue
        for t in targets:
            # the longest known module the name refers to ("pkg.mod.func" -> "pkg.mod")
            parts = t.split(".")
            while parts and ".".join(parts) not in known:
                parts.pop()
            if parts and ".".join(parts) != name:
                out.add(".".join(parts))
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def without_facade(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph without the package facade (lord_export/__init__.py re-exports everything; every
    module is inside it, so Python's implicit parent-package imports are not edges here)."""
    return {k: {v for v in vs if v != "lord_export"} for k, vs in graph.items() if k != "lord_export"}


def test_no_import_cycles():
    assert cycles(without_facade(import_graph())) == []


def test_the_cycle_check_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def part_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and f"lord_export.{parts[1]}" not in BASE) else None


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_layers_import_only_lower_layers(part):
    graph = without_facade(import_graph())
    allowed = ALLOWED[part]
    bad = []
    for name, targets in graph.items():
        if not name.startswith(f"lord_export.{part}"):
            continue
        for t in targets:
            if t in BASE or t == f"lord_export.{part}":
                continue
            rest = t.removeprefix("lord_export.")
            if not any(rest == a or rest.startswith(a + ".") for a in allowed):
                bad.append(f"{name} -> {t}")
    assert not bad, bad


def test_base_modules_import_only_core_math():
    graph = without_facade(import_graph())
    for name in BASE:
        extra = {t for t in graph.get(name, set()) if t not in BASE and not t.startswith("lord_export.core.")}
        assert not extra, (name, extra)
