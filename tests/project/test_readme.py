"""The README's API snippet runs as written, and its two commands match what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_api_snippet_runs():
    snippet = next(b for b in _blocks("python") if "gm.lmn(h, tail)" in b)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert 1.0 <= scope["res"].lmn <= 200


def test_ci_runs_the_readme_test_command():
    test_cmd = next(b for b in _blocks("bash") if "pytest" in b).strip()
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert test_cmd in ci
