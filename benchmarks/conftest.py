"""Shared fixtures of the pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only``.

Every timed test first checks its backend against the NumPy reference on the first ``N_REF`` samples
(same tail, same run) and fails (no speed reported) when ``max |L - L_ref| > 1e-5``: the
refuse-on-disagreement rule of ``grokfast_metrics.bench``. Set ``GROKFAST_METRICS_BENCH_LARGE=1`` to add the
N=961 rows on the CPU (about a minute per round on 2 shared cores).
"""

from __future__ import annotations

import pytest
import torch

from grokfast_metrics.bench import baselines as bench_baselines


class _Roof(dict):
    def __missing__(self, key: str) -> float:
        self[key] = bench_baselines.matmul_roof(torch.device(key), repeats=3)[0]
        return self[key]


@pytest.fixture(scope="session")
def roof_gflops() -> dict[str, float]:
    """Large fp32 matmul GFLOP/s per device type (``"cpu"``, ``"cuda"``), measured once per session, lazily."""
    return _Roof()
