"""The package's shape: every import points down the layer order of ``grokfast_metrics._layers``, and no modules
import each other in a cycle (function-local and ``TYPE_CHECKING`` imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from grokfast_metrics._layers import LAYERS, layer_of

ROOT = Path(__file__).resolve().parents[2]


def module_name(path: Path) -> str:
    """``grokfast_metrics/compute/core.py`` -> ``grokfast_metrics.compute.core``; ``kernels/x.py`` -> ``grokfast_metrics.kernels.x``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":
        parts.insert(0, "grokfast_metrics")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, tuple[str, bool]]:
    """module -> (source, is a package ``__init__``) for every module of ``grokfast_metrics/`` and ``kernels/``."""
    files = sorted([*ROOT.glob("grokfast_metrics/**/*.py"), *ROOT.glob("kernels/**/*.py")])
    return {module_name(f): (f.read_text(encoding="utf-8"), f.name == "__init__.py") for f in files}


def from_base(node: ast.ImportFrom, package: list[str]) -> str:
    """The absolute module of ``from <base> import ...`` in a module of ``package``."""
    if node.level == 0:
        return node.module or ""
    return ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))


def imports(module: str, source: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of the package that ``module`` imports anywhere in its source (any depth, any condition)."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = from_base(node, package)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t.split(".")[0] == "grokfast_metrics" and t != module)
    return found


def graph(srcs: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    known = set(srcs)
    return {m: imports(m, src, pkg, known) for m, (src, pkg) in srcs.items()}


def upward(edges: dict[str, set[str]]) -> list[str]:
    """``a -> b`` for every import of a module ``b`` of a higher layer than ``a``'s."""
    return sorted(
        f"{a} ({LAYERS[layer_of(a)][0] or 'root'}) -> {b} ({LAYERS[layer_of(b)][0] or 'root'})"
        for a, bs in edges.items()
        for b in bs
        if layer_of(b) > layer_of(a)
    )


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_is_in_a_layer() -> None:
    for module in sources():
        layer_of(module)  # raises naming the module otherwise


def test_no_import_points_up_the_layers() -> None:
    assert upward(graph(sources())) == []


def test_no_import_cycle() -> None:
    assert cycles(graph(sources())) == []


def test_the_checks_catch_an_upward_import_and_a_cycle() -> None:
    """The walk sees a function-local upward import, a TYPE_CHECKING one, and the cycle they close."""
    srcs = {
        "grokfast_metrics.compute.core": ("def f():\n    from ..dropin import plan\n", False),
        "grokfast_metrics.dropin.plan": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..compute.core import f\n", False),
        "grokfast_metrics.dropin": ("", True),
        "grokfast_metrics.compute": ("", True),
    }
    edges = graph(srcs)
    assert edges["grokfast_metrics.compute.core"] == {"grokfast_metrics.dropin.plan"}
    assert upward(edges) == ["grokfast_metrics.compute.core (compute) -> grokfast_metrics.dropin.plan (dropin)"]
    assert cycles(edges) == [["grokfast_metrics.compute.core", "grokfast_metrics.dropin.plan"]]


def test_a_module_outside_the_table_is_refused() -> None:
    with pytest.raises(ValueError, match="no layer"):
        layer_of("grokfast_metrics.nowhere.x")


def unresolved(srcs: dict[str, tuple[str, bool]]) -> list[str]:
    """``module: from X import name`` for every import of the package (function-local ones included, where a renamed
    module fails only when that function runs) whose target is neither a module of the package nor a name ``X``
    defines (the ``__init__``'s names, read from its AST: nothing is imported)."""
    known = set(srcs)
    defined: dict[str, set[str]] = {}
    for m, (src, _) in srcs.items():
        names: set[str] = set()
        for node in ast.parse(src).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
        defined[m] = names
    bad = []
    for module, (src, is_package) in srcs.items():
        package = module.split(".") if is_package else module.split(".")[:-1]
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Import):
                bad += [f"{module}: import {a.name}" for a in node.names if a.name.startswith("grokfast_metrics.") and a.name not in known]
            elif isinstance(node, ast.ImportFrom):
                base = from_base(node, package)
                if not base.startswith("grokfast_metrics"):
                    continue
                if base not in known:
                    bad.append(f"{module}: from {base} import ...")
                    continue
                bad += [
                    f"{module}: from {base} import {a.name}"
                    for a in node.names
                    if a.name != "*" and f"{base}.{a.name}" not in known and a.name not in defined[base]
                ]
    return sorted(bad)


def test_every_import_of_the_package_resolves() -> None:
    """A function-local import of a renamed module fails only when that function runs (the GPU day's
    ``from ..kernels import connectivity_v2`` did, after the kernels were renamed by strategy)."""
    assert unresolved(sources()) == []


def test_the_resolution_check_catches_a_renamed_module() -> None:
    srcs = {
        "grokfast_metrics.kernels": ("from .a import f\n", True),
        "grokfast_metrics.kernels.a": ("def f(): ...\n", False),
        "grokfast_metrics.bench.x": ("def g():\n    from ..kernels import old_name, a, f\n", False),
        "grokfast_metrics.bench": ("", True),
    }
    assert unresolved(srcs) == ["grokfast_metrics.bench.x: from grokfast_metrics.kernels import old_name"]
