"""The public surface: one top-level name per thing, one call style for the drop-in API, one environment prefix.

docs/api.md lists the names, docs/environment.md the variables; these tests keep the code and those pages in step.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import grokfast_metrics as gm
from grokfast_metrics.compute import core, reference
from grokfast_metrics.dropin import affine
from grokfast_metrics.dropin import measure as dropin
from grokfast_metrics.foundation import errors
from grokfast_metrics.foundation import runtime as _runtime
from grokfast_metrics.tracking import async_eigen, metric, tracker

ROOT = Path(__file__).resolve().parents[2]

#: public name -> (module that defines it, the object's name there)
DEFINED_IN = {
    "NonFiniteOutputError": errors,
    "resolve_backend": core,
    "LMNResult": core,
    "connectivity": core,
    "lmn": core,
    "lmn_from_connectivity": core,
    "BACKENDS": core,
    "AffineTailWarning": affine,
    "EigenStepError": async_eigen,
    "check_cut": dropin,
    "lmn_at": dropin,
    "LMNTracker": tracker,
}


def _metric(*args, **kwargs):
    """``gm.LMNMetric(...)`` (skips without torchmetrics)."""
    pytest.importorskip("torchmetrics")
    return gm.LMNMetric(*args, **kwargs)


def _mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 8), torch.nn.SiLU(), torch.nn.Linear(8, 3))


# ------------------------------------------------------------------------------------------
# one public name per thing


@pytest.mark.parametrize("name", sorted(DEFINED_IN))
def test_public_name_is_top_level_and_documented(name):
    assert getattr(gm, name) is getattr(DEFINED_IN[name], name)
    assert name in gm.__all__
    assert f"`gm.{name}" in (ROOT / "docs" / "api.md").read_text(encoding="utf-8")


def test_lmn_metric_is_top_level_with_torchmetrics():
    pytest.importorskip("torchmetrics")
    assert gm.LMNMetric is metric.LMNMetric and "LMNMetric" in gm.__all__
    assert "`gm.LMNMetric" in (ROOT / "docs" / "api.md").read_text(encoding="utf-8")


def test_without_torchmetrics_lmn_metric_says_what_to_install():
    """A fresh interpreter where torchmetrics does not import: ``import *`` works, ``gm.LMNMetric`` is one line."""
    code = (
        "import sys; sys.modules['torchmetrics'] = None\n"
        "from grokfast_metrics import *\n"
        "import grokfast_metrics as gm\n"
        "assert 'LMNMetric' not in gm.__all__, gm.__all__\n"
        "try:\n    gm.LMNMetric\nexcept ImportError as e:\n    print(str(e))\nelse:\n    raise SystemExit('no error')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 1 and "pip install torchmetrics" in out.stdout


def test_reference_lmn_returns_lmn_result_like_core():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(7, 8, generator=g, dtype=torch.float64)
    tail = _mlp()[2:].double()
    ref, fast = reference.lmn(h, tail), gm.lmn(h, tail)
    assert isinstance(ref, gm.LMNResult)
    assert ref.lmn == pytest.approx(fast.lmn, rel=1e-10)  # observed 1.3e-15 (fp64 contract 1e-10)
    assert torch.equal(ref.eigenvalues, ref.eigenvalues.sort(descending=True).values)
    assert ref.connectivity.shape == (7, 7) and ref.eigenvalues.dtype == torch.float64


# ------------------------------------------------------------------------------------------
# keyword-only arguments after ``at``

#: the arguments lmn_at, check_cut and LMNTracker share, with their one default
SHARED = {
    "to": None,
    "output": None,
    "batch_dim": 0,
    "input_batch_dim": None,
    "n_lambda": 21,
    "backend": "auto",
    "check": True,
    "path": "auto",
    "user_hooks": False,
}


@pytest.mark.parametrize("fn", [dropin.lmn_at, dropin.check_cut, tracker.LMNTracker], ids=["lmn_at", "check_cut", "LMNTracker"])
def test_keyword_only_after_at_same_order_and_defaults(fn):
    params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
    positional = [p.name for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert positional[2:] == ["at"] and len(positional) == 3
    assert params[2].default is inspect.Parameter.empty  # at has no default
    shared = [p for p in params if p.name in SHARED]
    assert [p.name for p in shared] == [n for n in SHARED if n in {p.name for p in shared}]  # one order
    assert {p.name: p.default for p in shared} == {p.name: SHARED[p.name] for p in shared}
    assert {"to", "output", "batch_dim", "input_batch_dim"} <= {p.name for p in shared}


@pytest.mark.parametrize(
    "call, fix",
    [
        (lambda m, x: gm.lmn_at(m, x, "1", "3"), "lmn_at(model, inputs, at="),  # to was positional
        (lambda m, x: gm.lmn_at(m, x), "lmn_at(model, inputs, at="),  # at had a default
        (lambda m, x: gm.check_cut(m, x, "1", None), "check_cut(model, inputs, at="),
        (lambda m, x: gm.LMNTracker(m, x, "1", 10), "every=1"),  # every was positional
        (lambda m, x: gm.LMNTracker(m, x, at="1").update(0, True), "update(step, force=True)"),
        (lambda m, x: _metric(m, x, "1", 10), "every=1"),
        (lambda m, x: _metric(m, x, "1", every=2).update(0, True), "update(step, force=True)"),
    ],
)
def test_old_call_styles_get_one_line_saying_how(call, fix):
    with pytest.raises(TypeError) as e:
        call(_mlp(), torch.randn(6, 4))
    msg = str(e.value)
    assert "\n" not in msg and "call it as" in msg and fix in msg, msg


def test_keyword_calls_work():
    m, x = _mlp(), torch.randn(6, 4)
    a = gm.lmn_at(m, x, "1", to="3", n_lambda=5)
    b = gm.lmn_at(m, x, at="1", to="3", n_lambda=5)
    assert a.lmn == b.lmn
    assert gm.check_cut(m, x, "1", to="3") == 0.0  # a plain Sequential child: the swap reproduces the logits exactly
    tr = gm.LMNTracker(m, x, "1", every=2, n_lambda=5)
    assert tr.update(0) is not None and tr.update(1) is None and tr.update(2, force=True) is not None


def test_tracker_update_keeps_its_base_class_signature():
    base = inspect.signature(tracker.Tracker.update).parameters
    sub = inspect.signature(tracker.LMNTracker.update).parameters
    assert [(p.name, p.kind, p.default) for p in base.values()] == [(p.name, p.kind, p.default) for p in sub.values()]


# ------------------------------------------------------------------------------------------
# one environment prefix, documented in one file

#: files the project's variables could be read or named in
SCANNED = [
    p
    for d in ("grokfast_metrics", "kernels", "tests", "benchmarks", "docs", "examples", ".ci")
    for p in sorted((ROOT / d).rglob("*"))
    if p.is_file() and p.suffix in (".py", ".sh", ".md", ".cpp", "") and "__pycache__" not in p.parts and p.name != Path(__file__).name
] + [ROOT / "README.md", ROOT / "setup.py"]


def test_no_variable_outside_the_prefix():
    """``GM_*`` / ``GFM_*`` names: only the deprecated old names, in ``_runtime`` and docs/environment.md (C++ enum
    constants aside)."""
    found = []
    for path in SCANNED:
        for m in re.finditer(r"\b(?:GM|GFM)_[A-Z][A-Z0-9_]*", path.read_text(encoding="utf-8", errors="replace")):
            if m.group().startswith("GM_ACT_"):  # the C++ kernel's activation codes, not variables
                continue
            found.append(f"{path.relative_to(ROOT)}: {m.group()}")
    allowed = {
        f"{where}: {old}"
        for old in _runtime.ENV_OLD_NAMES.values()
        for where in ("grokfast_metrics/foundation/runtime.py", "docs/environment.md")
    }
    assert set(found) <= allowed, sorted(set(found) - allowed)


def test_every_variable_documented_and_read_in_one_place():
    doc = (ROOT / "docs" / "environment.md").read_text(encoding="utf-8")
    assert "docs/environment.md" in (ROOT / "README.md").read_text(encoding="utf-8")
    read_in: dict[str, set[str]] = {}
    for path in SCANNED:
        text = path.read_text(encoding="utf-8", errors="replace")
        for name in set(re.findall(r"\bGROKFAST_METRICS_[A-Z0-9_]*[A-Z0-9]", text)):
            assert f"`{name}`" in doc, f"{name} (named in {path.relative_to(ROOT)}) is not in docs/environment.md"
        for name in re.findall(r"environ(?:\.get\(|\[)\s*[\"'](GROKFAST_METRICS_\w+)", text):
            read_in.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    for suffix in _runtime.ENV_VARS:
        assert f"`{_runtime.ENV_PREFIX}{suffix}`" in doc
    assert {n: f for n, f in read_in.items() if len(f) > 1} == {}
    library = {n: f for n, f in read_in.items() if any(p.startswith(("grokfast_metrics/", "kernels/")) for p in f)}
    assert not any(n[len(_runtime.ENV_PREFIX) :] in _runtime.ENV_VARS for n in library), library  # only via env()


def test_triton_kernel_variable_and_its_deprecated_old_name(monkeypatch):
    monkeypatch.delenv("GROKFAST_METRICS_TRITON_KERNEL", raising=False)
    monkeypatch.delenv("GM_TRITON_KERNEL", raising=False)
    assert _runtime.env("TRITON_KERNEL") is None
    monkeypatch.setenv("GROKFAST_METRICS_TRITON_KERNEL", "v1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _runtime.env("TRITON_KERNEL") == "v1"
    monkeypatch.delenv("GROKFAST_METRICS_TRITON_KERNEL")
    monkeypatch.setenv("GM_TRITON_KERNEL", "v1")
    with pytest.warns(DeprecationWarning, match="GROKFAST_METRICS_TRITON_KERNEL"):
        assert _runtime.env("TRITON_KERNEL") == "v1"
    monkeypatch.setenv("GROKFAST_METRICS_TRITON_KERNEL", "v2")  # the new name wins, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _runtime.env("TRITON_KERNEL") == "v2"
    kc = pytest.importorskip("grokfast_metrics.kernels.connectivity")
    assert kc.kernel_variant() == "v2"
    monkeypatch.delenv("GROKFAST_METRICS_TRITON_KERNEL")
    with pytest.warns(DeprecationWarning):
        assert kc.kernel_variant() == "v1"


def test_cpu_kernel_switch_is_the_prefixed_variable(monkeypatch):
    h, tail = torch.randn(5, 8), _mlp()[2:]
    monkeypatch.setenv("GROKFAST_METRICS_CPU_KERNEL", "0")
    assert _runtime.cpu_kernel_switched_off()
    assert gm.resolve_backend(h, tail) == "torch"
    with pytest.raises(ValueError, match="GROKFAST_METRICS_CPU_KERNEL=0"):
        gm.resolve_backend(h, tail, "cpu")
    monkeypatch.setenv("GROKFAST_METRICS_CPU_KERNEL", "1")
    assert not _runtime.cpu_kernel_switched_off()


def test_env_refuses_an_undocumented_name():
    with pytest.raises(KeyError, match=r"docs/environment\.md"):
        _runtime.env("NOPE")


# ------------------------------------------------------------------------------------------
# code and docs point at documents in the repository


def test_citations_point_at_sections_that_exist():
    """No "SPEC §N" or "issue N" (documents outside the repository); every ``docs/x.md, "Heading"`` names a heading."""
    cited = 0
    for path in SCANNED:  # benchmarks/RESULTS.md included
        text = path.read_text(encoding="utf-8", errors="replace")
        assert not re.search(r"SPEC §|\b[Ii]ssues? \d+", text), path.relative_to(ROOT)
        for doc, heading in re.findall(r"((?:docs|benchmarks)/\w+\.md),\s+\"([^\"]+)\"", text):
            heading = re.sub(r"\s+(?:(?:#:?|//)\s+)?", " ", heading)  # a citation wrapped over comment lines
            headings = [h.lstrip("#").strip() for h in (ROOT / doc).read_text(encoding="utf-8").splitlines() if h.startswith("#")]
            assert any(h.startswith(heading) for h in headings), f"{path.relative_to(ROOT)} cites {doc}, {heading!r}"
            cited += 1
    assert cited >= 20  # the pointers this test keeps true (61 when written)


# ------------------------------------------------------------------------------------------
# the public API's doctests run in CI

#: the public names whose docstrings carry examples (doctests)
WITH_EXAMPLES = [
    "connectivity",
    "lmn",
    "lmn_from_connectivity",
    "resolve_backend",
    "NonFiniteOutputError",
    "AffineTailWarning",
    "lmn_at",
    "check_cut",
    "LMNTracker",
]


def test_ci_runs_the_public_api_doctests():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    start = ci.index("--doctest-modules")
    command = ci[start : ci.index("\n", ci.index("\\\n", start) + 2)]  # the command, one continuation line
    assert ci.index("&& pytest -q") < start  # after the README's test command
    files = set(re.findall(r"grokfast_metrics/[\w/]+\.py", command))
    for name in WITH_EXAMPLES:
        obj = getattr(gm, name)
        assert ">>> " in (obj.__doc__ or ""), f"gm.{name} has no example"
        assert DEFINED_IN[name].__name__.replace(".", "/") + ".py" in files, name
    assert ">>> " in (reference.lmn.__doc__ or "") and "grokfast_metrics/compute/reference.py" in files
    assert "grokfast_metrics/__init__.py" in files
