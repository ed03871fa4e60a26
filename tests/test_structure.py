"""The package's shape: no import cycle between modules of ``src/pe``, no module over 500 lines (the
phantom excepted), no function over 80 lines, and albumentations never asks the internet for its
version."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "pe"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
LONG_MODULES = {"pe.synthetic.phantom"}  # a generator of a whole synthetic CT data set, by design


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Every ``pe`` module ``name`` imports, at the top or inside a function."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `from pe.eval import metric` names a module; `... import score` not
                t = t.rpartition(".")[0]
            if t and t != name and t != "pe":
                found.add(t)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        colour[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if colour.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in colour and (c := visit(v)):
                return c
        stack.pop()
        colour[u] = 2
        return None

    for u in sorted(graph):
        if u not in colour and (c := visit(u)):
            return c
    return None


def test_find_cycle_detects_a_loop_and_accepts_a_dag() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_package() -> None:
    mods = modules()
    known = set(mods)
    graph = {name: imports_of(path, name, known) for name, path in mods.items()}
    # Package __init__ files import nothing, so a module's package never pulls in its siblings.
    assert all(not graph[n] for n, p in mods.items() if p.name == "__init__.py"), graph
    assert len(graph) > 30
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_modules_and_functions_are_short() -> None:
    long_modules, long_functions = [], []
    for name, path in modules().items():
        text = path.read_text()
        if name not in LONG_MODULES and len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {n} lines")
    assert not long_modules, long_modules
    assert not long_functions, long_functions


@pytest.mark.parametrize("module", ["pe.data.slices", "pe.infer.kernel"])
def test_albumentations_is_imported_without_an_update_check(module: str) -> None:
    """albumentations checks PyPI for a newer version on import unless NO_ALBUMENTATIONS_UPDATE is set:
    a warning on every run, and a stall in an offline Kaggle notebook. The package sets it first."""
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    code = f"import os, {module}; import albumentations; print(os.environ.get('NO_ALBUMENTATIONS_UPDATE'))"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(PKG.parent)},
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "1"
