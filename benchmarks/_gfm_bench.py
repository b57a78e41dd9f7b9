"""Helpers shared by the pytest-benchmark files (not a test module)."""
from __future__ import annotations

import os

import pytest
import torch

from grokfast_metrics import bench

N_REF = 24
LARGE = os.environ.get("GFM_BENCH_LARGE", "0") not in ("", "0")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """``fn`` followed by a device sync, so the benchmark times the work, not the launch."""
    def call():
        out = fn()
        sync(device)
        return out

    return call


def check_or_refuse(h: torch.Tensor, tail: torch.nn.Module, backend: str, n_lambda: int = 21) -> float:
    """Max abs diff of ``backend`` vs the NumPy reference on ``h[:N_REF]``; ``pytest.fail`` when refused."""
    sub = h[:N_REF]
    try:
        if backend == "naive":
            L = bench.naive_connectivity(sub, tail, n_lambda)
        else:
            L = bench.backend_fn(backend)(sub, tail, n_lambda)
    except Exception as e:
        pytest.fail(f"REFUSED: backend {backend!r} raised {type(e).__name__}: {e}")
    L_ref, _ = bench.reference_timed(sub, tail, n_lambda)
    diff = bench.max_abs_diff(L, L_ref)
    why = bench.refusal(diff, bench.ATOL[torch.float32])
    if why:
        pytest.fail(f"{why} (backend {backend!r})")
    return diff


def median_s(benchmark) -> float | None:
    """Median seconds of the finished ``benchmark`` (``None`` when benchmarking is disabled)."""
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.median
