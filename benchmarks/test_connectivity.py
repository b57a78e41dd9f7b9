"""Throughput of the connectivity matrix L: library backends, the naive torch and NumPy baselines, the roof.

Run: ``pytest benchmarks/ --benchmark-only`` (add ``GROKFAST_METRICS_BENCH_LARGE=1`` for N=961 on the CPU).
``torch`` is chunked stock torch ops; ``auto`` on the CPU is the fused C++ kernel.
``extra_info`` of each row carries pairs/s, useful GFLOP/s (2*T*H*O per pair) and the fraction of
the matmul roof; the ratios between rows are in the pytest-benchmark table (same session).
"""

from __future__ import annotations

import functools

import pytest
import torch
from _gfm_bench import LARGE, check_or_refuse, median_s, needs_cuda, timed

from grokfast_metrics.bench import baselines as bench_baselines
from grokfast_metrics.bench import harness as bench_harness
from grokfast_metrics.bench import workloads as bench_workloads
from grokfast_metrics.compute import reference

H, O, T = 100, 31, 21
N_CPU = (64, 256) + ((961,) if LARGE else ())
N_GPU = (256, 961, 4096, 16384)
CASES = [pytest.param("cpu", b, n, id=f"cpu-{b}-N{n}") for b in ("torch", "auto") for n in N_CPU] + [
    pytest.param("cuda", b, n, marks=needs_cuda, id=f"cuda-{b}-N{n}") for b in ("torch", "triton") for n in N_GPU
]


def _extra(benchmark, n: int, depth: int, roof: float, diff: float) -> None:
    t = median_s(benchmark)
    benchmark.extra_info.update(N=n, H=H, O=O, T=T, depth=depth, max_abs_diff_vs_reference=diff, roof_gflops=roof)
    if t:
        g = bench_harness.useful_gflops(n, T, H, O, depth, t)
        benchmark.extra_info.update(pairs_per_s=bench_harness.n_pairs(n) / t, useful_gflops=g, frac_roof=g / roof)


@pytest.mark.parametrize("dev, backend, n", CASES)
@pytest.mark.parametrize("depth", [1, 2])
def test_connectivity(benchmark, roof_gflops, dev, backend, n, depth):
    device = torch.device(dev)
    tail = bench_workloads.make_tail(H, O, depth, device=device)
    h = bench_workloads.make_inputs(n, H, seed=1, device=device)
    diff = check_or_refuse(h, tail, backend, T)
    rounds = 20 if dev == "cuda" else 3
    L = benchmark.pedantic(
        timed(functools.partial(bench_baselines.backend_fn(backend), h, tail, T), device), rounds=rounds, iterations=1, warmup_rounds=1
    )
    assert L.shape == (n, n)
    _extra(benchmark, n, depth, roof_gflops[dev], diff)


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_naive_torch_baseline(benchmark, roof_gflops, dev):
    device, n = torch.device(dev), (256 if dev == "cpu" else 961)
    tail, h = bench_workloads.make_tail(H, O, 1, device=device), bench_workloads.make_inputs(n, H, seed=1, device=device)
    diff = check_or_refuse(h, tail, "naive", T)
    benchmark.pedantic(
        timed(functools.partial(bench_baselines.naive_connectivity, h, tail, T), device), rounds=3, iterations=1, warmup_rounds=1
    )
    _extra(benchmark, n, 1, roof_gflops[dev], diff)


def test_numpy_reference_per_pair(benchmark, roof_gflops):
    """The NumPy reference on N=16 (120 pairs); divide by the pairs for the per-pair time."""
    n = 16
    tail, h = bench_workloads.make_tail(H, O, 1), bench_workloads.make_inputs(n, H, seed=1)
    benchmark.pedantic(functools.partial(reference.connectivity, h, tail, T), rounds=3, iterations=1)
    _extra(benchmark, n, 1, roof_gflops["cpu"], 0.0)
    t = median_s(benchmark)
    if t:
        benchmark.extra_info["seconds_per_pair"] = t / bench_harness.n_pairs(n)


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_matmul_roof(benchmark, dev):
    """The roof: the harness's large fp32 matmul (2048^2 on CPU, 8192^2 on CUDA), warmed up."""
    device = torch.device(dev)
    mm, size = bench_baselines.square_matmul(device)
    benchmark.pedantic(timed(mm, device), rounds=5, iterations=1, warmup_rounds=1)
    t = median_s(benchmark)
    if t:
        benchmark.extra_info["gflops"] = 2 * size**3 / t / 1e9
