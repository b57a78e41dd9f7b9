"""End-to-end LMN (L + eigen + entropy) split into its parts, and the training-step overhead of tracking it.

Run: ``pytest benchmarks/ --benchmark-only``. The training rows use ``bench_workloads.addition_training`` (the
paper's ``GrokMLP`` on addition mod 31): compare the ``plain`` and ``tracked`` medians of the same
session for the overhead ratio. The entropy part is ``eigen_plus_entropy`` minus ``eigen``.
"""

from __future__ import annotations

import functools

import pytest
import torch
from _gfm_bench import LARGE, check_or_refuse, needs_cuda, timed

import grokfast_metrics as gm
from grokfast_metrics.bench import workloads as bench_workloads
from grokfast_metrics.foundation.runtime import synchronize

H, O, T = 100, 31, 21
DEVS = [("cpu", n) for n in (64, 256) + ((961,) if LARGE else ())] + [pytest.param("cuda", n, marks=needs_cuda) for n in (961, 4096)]


@pytest.mark.parametrize("dev, n", DEVS)
def test_lmn_end_to_end(benchmark, dev, n):
    device = torch.device(dev)
    tail, h = bench_workloads.make_tail(H, O, 1, device=device), bench_workloads.make_inputs(n, H, seed=1, device=device)
    check_or_refuse(h, tail, "auto", T)
    res = benchmark.pedantic(
        timed(functools.partial(gm.lmn, h, tail, T), device), rounds=20 if dev == "cuda" else 3, iterations=1, warmup_rounds=1
    )
    assert res.lmn >= 1.0


@pytest.mark.parametrize("dev, n", DEVS)
def test_eigen_part(benchmark, dev, n):
    device = torch.device(dev)
    tail, h = bench_workloads.make_tail(H, O, 1, device=device), bench_workloads.make_inputs(n, H, seed=1, device=device)
    L = gm.connectivity(h, tail, T).to(torch.float64)
    benchmark.pedantic(timed(functools.partial(torch.linalg.eigvalsh, L), device), rounds=10, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("dev, n", DEVS)
def test_eigen_plus_entropy_part(benchmark, dev, n):
    device = torch.device(dev)
    tail, h = bench_workloads.make_tail(H, O, 1, device=device), bench_workloads.make_inputs(n, H, seed=1, device=device)
    L = gm.connectivity(h, tail, T)
    benchmark.pedantic(timed(functools.partial(gm.lmn_from_connectivity, L), device), rounds=10, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("dev, n_track", [("cpu", 64), pytest.param("cuda", 961, marks=needs_cuda)])
@pytest.mark.parametrize("tracked", [False, True], ids=["plain", "tracked"])
def test_training_step(benchmark, dev, n_track, tracked):
    """One full-batch AdamW step of the paper's MLP, with or without LMN of layer 1 on ``n_track`` inputs."""
    device = torch.device(dev)
    work = bench_workloads.addition_training(device, n_track, seed=0)

    def step():
        work.step()
        if tracked:
            work.track()
        synchronize(device)

    benchmark.pedantic(step, rounds=10 if not tracked or dev == "cuda" else 3, iterations=1, warmup_rounds=1)
