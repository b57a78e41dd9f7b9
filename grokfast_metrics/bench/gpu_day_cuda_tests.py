"""Stage 1 of the GPU day (:mod:`.gpu_day`): the tests that skip on the CPU for want of CUDA, run on the GPU."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .gpu_day_budget import _left

#: test files whose tests skip on the CPU for want of CUDA (``tests/bench/test_gpu_day.py`` checks the list is complete)
CUDA_TESTS = ("tests/kernels/test_triton_kernel.py", "tests/kernels/test_triton_skip.py")


SKIP_NO_CUDA = "SKIPPED: no CUDA"


def repo_root() -> Path:
    """The repository the tests and the trainer run from (``$GROKFAST_METRICS_GPU_DAY_REPO``, else the folder above this package)."""
    env = os.environ.get("GROKFAST_METRICS_GPU_DAY_REPO")
    return Path(env) if env else Path(__file__).resolve().parents[2]


def cuda_tests(py: Sequence[str], deadline: float, dry_run: bool) -> dict:
    """Run :data:`CUDA_TESTS` in a child pytest (at most 5 failures, ``pytest-xdist`` with 4 workers if present).

    Without CUDA (the dry run) the same command only collects the tests (``--collect-only``): the imports, the shim
    and the paths are checked, and the status is ``SKIPPED: no CUDA`` unless the collection failed (``FAILED``).

    Returns:
        ``{"status", "summary", "failures", "seconds", "command"}``; ``status`` is ``ok``, ``FAILED``, ``TIMEOUT``
        or ``SKIPPED: no CUDA``.
    """
    root = repo_root()
    cmd = [
        *py,
        "-m",
        "pytest",
        "-q",
        "-rfE",
        "--maxfail=5",
        "--rootdir",
        str(root),
        "-c",
        str(root / "pytest.ini"),
        *(str(root / t) for t in CUDA_TESTS),
    ]
    if dry_run or not torch.cuda.is_available():
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                [*cmd, "--collect-only"],
                capture_output=True,
                text=True,
                cwd=tempfile.gettempdir(),
                timeout=max(5.0, _left(deadline)),
                env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
            )
        except subprocess.TimeoutExpired:
            return {
                "status": SKIP_NO_CUDA,
                "summary": f"collect only: not finished in {time.monotonic() - t0:.0f} s",
                "failures": [],
                "seconds": time.monotonic() - t0,
                "command": " ".join(cmd),
            }
        lines = proc.stdout.strip().splitlines()
        last = lines[-1] if lines else proc.stderr[-300:]
        ok = proc.returncode == 0
        return {
            "status": SKIP_NO_CUDA if ok else "FAILED",
            "summary": f"collect only: {last}",
            "failures": [] if ok else [ln for ln in lines if ln.startswith("ERROR")],
            "seconds": time.monotonic() - t0,
            "command": " ".join(cmd),
            **({} if ok else {"tail": proc.stdout[-3000:] + proc.stderr[-1000:]}),
        }
    if importlib.util.find_spec("xdist") is not None:  # pytest-xdist: optional, not a dependency
        cmd += ["-n", "4"]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, _left(deadline)), cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        # a failure already seen stops the day like a finished failing run; else the timing stage's own agreement
        # checks still guard every row
        failed = any(re.fullmatch(r"[.sxXFE]+(\s+\[\s*\d+%\])?", ln.strip()) and ("F" in ln or "E" in ln) for ln in out.splitlines())
        return {
            "status": "FAILED" if failed else "TIMEOUT",
            "summary": f"not finished in {time.monotonic() - t0:.0f} s" + ("; some tests failed" if failed else ""),
            "failures": [],
            "seconds": time.monotonic() - t0,
            "command": " ".join(cmd),
            "tail": out[-3000:],
        }
    lines = proc.stdout.strip().splitlines()
    failures = [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    status = "ok" if proc.returncode == 0 else "FAILED"
    return {
        "status": status,
        "summary": lines[-1] if lines else proc.stderr[-500:],
        "failures": failures,
        "seconds": time.monotonic() - t0,
        "command": " ".join(cmd),
        **({} if status == "ok" else {"tail": (proc.stdout[-4000:] + proc.stderr[-1000:])}),
    }
