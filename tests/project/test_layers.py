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


def imports(module: str, source: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of the package that ``module`` imports anywhere in its source (any depth, any condition)."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (
                (node.module or "")
                if node.level == 0
                else ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            )
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
