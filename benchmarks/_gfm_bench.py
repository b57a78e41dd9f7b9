"""Helpers shared by the pytest-benchmark files (not a test module)."""

from __future__ import annotations

import os

import pytest
import torch

from grokfast_metrics.bench import baselines as bench_baselines
from grokfast_metrics.bench import harness as bench_harness
from grokfast_metrics.foundation.runtime import synchronize

N_REF = 24
LARGE = os.environ.get("GROKFAST_METRICS_BENCH_LARGE", "0") not in ("", "0")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def timed(fn, device: torch.device):
    """``fn`` followed by a device sync, so the benchmark times the work, not the launch."""

    def call():
        out = fn()
        synchronize(device)
        return out

    return call


def check_or_refuse(h: torch.Tensor, tail: torch.nn.Module, backend: str, n_lambda: int = 21) -> float:
    """Max abs diff of ``backend`` (or ``"naive"``) vs the NumPy reference on ``h[:N_REF]``; ``pytest.fail`` when refused."""
    sub = h[:N_REF]
    L_ref, _ = bench_baselines.reference_timed(sub, tail, n_lambda)
    diff, why = bench_harness.check_agreement(lambda: bench_baselines.backend_fn(backend)(sub, tail, n_lambda), L_ref)
    if why:
        pytest.fail(f"{why} (backend {backend!r})")
    return diff


def median_s(benchmark) -> float | None:
    """Median seconds of the finished ``benchmark`` (``None`` when benchmarking is disabled)."""
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.median
