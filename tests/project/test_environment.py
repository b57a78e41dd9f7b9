"""The test environment is what the README's command makes it: the repository root never shadows installed packages."""

from __future__ import annotations

import importlib.util
import os
import re
import sys

from helpers import ROOT

from grokfast_metrics.foundation.runtime import drop_checkout_from_path


def _is_root(entry: str) -> bool:
    return os.path.realpath(entry or os.getcwd()) == os.path.realpath(ROOT)


def _kernels_origin() -> str | None:
    spec = importlib.util.find_spec("kernels")
    return None if spec is None else str(spec.origin or spec.submodule_search_locations)


def test_repository_root_is_not_on_sys_path():
    # `python -m pytest` from the root would put it there (and its kernels/ folder ahead of site-packages)
    assert not [e for e in sys.path if _is_root(e)], "run the tests with `pytest`, not `python -m pytest`"


def test_top_level_kernels_is_not_this_repository():
    origin = _kernels_origin()
    assert origin is None or str(ROOT / "kernels") not in origin, origin
    if importlib.util.find_spec("transformers") is not None and origin is not None:
        # transformers 5 depends on Hugging Face's `kernels`; it must be the installed one
        assert "site-packages" in origin, origin


def test_python_dash_m_drops_the_checkout(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", ["", str(ROOT), *sys.path])
    assert _kernels_origin() is not None and str(ROOT / "kernels") in _kernels_origin()
    drop_checkout_from_path()
    assert not [e for e in sys.path if _is_root(e)]
    origin = _kernels_origin()
    assert origin is None or str(ROOT / "kernels") not in origin


def test_readme_test_command_is_hermetic():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    cmd = next(b for b in re.findall(r"```bash\n(.*?)```", readme, flags=re.S) if "pytest" in b).strip()
    assert "python -m pytest" not in cmd
    assert cmd.count("-c .ci/constraints.txt") == 2, cmd
    pins = (ROOT / ".ci" / "constraints.txt").read_text(encoding="utf-8").splitlines()
    pinned = {re.split(r"==", p)[0].lower().replace("_", "-") for p in pins if "==" in p}
    # every direct dependency, extras included, has an exact version in the lock
    setup = (ROOT / "setup.py").read_text(encoding="utf-8")
    declared = {re.split(r"[<>=\[]", d)[0].lower().replace("_", "-") for d in re.findall(r'"([A-Za-z][\w.-]*(?:[<>=][^"]*)?)"', setup)}
    direct = {
        "torch",
        "numpy",
        "scipy",
        "tqdm",
        "matplotlib",
        "mpmath",
        "filelock",
        "pytest",
        "pytest-benchmark",
        "hypothesis",
        "ruff",
        "triton",
        "ray",
        "torchmetrics",
        "tensorboard",
        "transformer-lens",
    }
    assert direct <= declared, direct - declared
    assert direct <= pinned, direct - pinned


#: import name -> distribution name, where they differ
_DIST = {"transformer_lens": "transformer-lens", "pytest_benchmark": "pytest-benchmark", "yaml": "pyyaml"}


def test_every_import_of_the_package_is_declared():
    import ast

    own = {"grokfast_metrics", "kernels"}
    imported: set[str] = set()
    for folder in ("grokfast_metrics", "kernels"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    imported.add(node.module.split(".")[0])
    third_party = {_DIST.get(m, m).replace("_", "-") for m in imported - own - set(sys.stdlib_module_names)}
    setup = (ROOT / "setup.py").read_text(encoding="utf-8")
    declared = {re.split(r"[<>=\[]", d)[0].lower().replace("_", "-") for d in re.findall(r'"([A-Za-z][\w.-]*(?:[<>=][^"]*)?)"', setup)}
    assert third_party <= declared, f"imported but not declared in setup.py: {sorted(third_party - declared)}"
