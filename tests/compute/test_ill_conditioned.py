"""Accuracy on ill-conditioned paths (docs/lmn.md, "Accuracy contract"), arbitrated by the exact yardstick.

Every regime of the issue's table is built small (``tests/support/regimes.py``: N = 10, d = 6, H = 16, O = 5)
so that ``grokfast_metrics.compute.exact`` (mpmath, 50 digits) gives the true ``L``. Each backend must be within
1e-5 (fp32) / 1e-10 (fp64) of it, flagged pairs being recomputed in fp64. Tolerances keep >= 5x margin
to the worst error observed on these cases (recorded beside each assertion). The long fuzz run over
many seeds is ``pytest -m fuzz`` (deselected by default).
"""

from __future__ import annotations

import copy
import functools
import os

import numpy as np
import pytest
import torch
from contract import CONTRACT, LMN_RTOL, check_backend, max_err
from helpers import Wrapped, mlp_tail
from regimes import REGIMES, regime

import grokfast_metrics as gm
from grokfast_metrics.compute import core, exact, reference

GELU_EXACT = 0.8223960050741883  # mpmath at 50 and 80 digits agree to all printed digits


@functools.cache
def _exact(name: str, seed: int = 0) -> np.ndarray:
    h, tail = regime(name, n=10, seed=seed)
    return exact.connectivity(h, tail)


def test_gelu_case_all_backends():
    """The hypothesis draw of the issue (n=20, d=1, hid=1, o=3, gelu, seed=323): outputs ~1e-15 on a bias of 0.65.

    The issue quotes 0.8224000909 for it; 50- and 80-digit arithmetic of this draw give 0.82239600507 (the
    fp64 loop before the fix gave 0.8808).
    """
    n, d, hid, o, seed = 20, 1, 1, 3, 323
    tail = mlp_tail([d, hid, o], "gelu", dtype=torch.float64, seed=seed)
    h = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    X = exact.connectivity(h, tail)
    assert abs(X[3, 16] - GELU_EXACT) <= 1e-15
    for backend in ("torch", "reference", "auto"):
        L = gm.connectivity(h, tail, backend=backend)
        assert abs(float(L[3, 16]) - GELU_EXACT) <= CONTRACT[torch.float64], backend  # worst observed 4e-15
        check_backend(L, X, dtype=torch.float64)  # worst observed 3.6e-15
    # not asserted: the generic path (any module) cannot centre inside the module; in fp64 it has no wider
    # dtype to recompute in, and this draw's output variation (1e-15 on 0.65) is below its resolution


@pytest.mark.parametrize("name", REGIMES)
def test_fp64_paths_match_exact(name):
    h, tail = regime(name, n=10)
    X = _exact(name)
    assert max_err(reference.connectivity(h, tail), X) <= CONTRACT[torch.float64]  # worst observed 1.9e-13 (near:1e-2)
    t64 = copy.deepcopy(tail).double()
    check_backend(gm.connectivity(h.double(), t64, backend="torch"), X, dtype=torch.float64)  # worst observed 1.8e-12


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("name", REGIMES)
def test_fp32_within_contract_or_recomputed(name, backend):
    h, tail = regime(name, n=10)
    L = gm.connectivity(h, tail, backend=backend)
    # worst observed at FLAG_KAPPA = 3e-5: 2.0e-6 (torch, sat_sigmoid:8), 5.3e-7 (C++ kernel, shift:-20)
    check_backend(L, _exact(name), dtype=torch.float32)
    info = core.last_run_info()
    assert 0 <= info["recomputed"] <= info["pairs"] == 45


def test_large_offset_regime_keeps_lmn():
    """The issue's headline: a logit offset of 1e5 gave LMN 1.007 in fp32 against 3.5 exact."""
    h, tail = regime("offset:1e5", n=10)
    want = reference.lmn_from_connectivity(_exact("offset:1e5")).lmn
    for backend in ("torch", "auto"):
        got = gm.lmn(h, tail, backend=backend).lmn
        assert abs(got - want) <= LMN_RTOL * want, (backend, got, want)  # worst observed 3e-7 relative


def test_recompute_fraction_is_reported_and_small_when_well_conditioned():
    h, tail = regime("well", n=40, small=False)
    gm.connectivity(h, tail, backend="torch")
    info = core.last_run_info()
    assert info["backend"] == "torch" and info["pairs"] == 780
    assert info["fraction_recomputed"] <= 0.1  # observed 0.00 at FLAG_KAPPA = 3e-5 (0.01 at 2e-5)
    h, tail = regime("near:1e-5", n=10)
    gm.connectivity(h, tail, backend="torch")
    assert core.last_run_info()["fraction_recomputed"] == 1.0  # unresolvable in fp32: every pair recomputed


@pytest.mark.parametrize("name", ["offset:1e5", "near:1e-3", "shift:-20"])
def test_generic_path_flags_and_recomputes(name):
    h, tail = regime(name, n=10)
    L = gm.connectivity(h, Wrapped(tail), backend="torch")
    check_backend(L, _exact(name), dtype=torch.float32)  # worst observed 1.2e-7


def test_bf16_model_computes_in_fp32_without_touching_it():
    h, tail = regime("well", n=10)
    t16 = copy.deepcopy(tail).to(torch.bfloat16)
    want = gm.connectivity(h, copy.deepcopy(t16).float(), backend="torch")  # the same (rounded) weights in fp32
    before = [p.clone() for p in t16.parameters()]
    got = gm.connectivity(h, Wrapped(t16), backend="torch")
    check_backend(got, want, dtype=torch.float32)  # worst observed 3e-7 (bf16 logits gave ~1e-2)
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, q) for p, q in zip(t16.parameters(), before))


@pytest.mark.fuzz
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_fuzz_regimes_many_seeds(backend):
    """``pytest -m fuzz``: every regime over many seeds (N = 8) against the exact yardstick.

    Run with ``GROKFAST_METRICS_FUZZ_SEEDS=63`` (16 regimes x 63 seeds x 2 backends = 2016 matrices, 56,448 pairs; 8.4 min on
    a 2-core machine). Worst |L - exact| per regime at FLAG_KAPPA = 3e-5, torch / auto (C++ kernel): well,
    offset:1e3..1e5 1.1e-6 / 1.0e-6; shift:-12 9.8e-7 / 8.7e-7, shift:-16 7.5e-7 / 9.4e-7, shift:-20 1.2e-6 /
    1.4e-6; near:1e-2 5.4e-7 / 1.1e-6, near:1e-3 4.3e-8 / 1.6e-7, near:1e-5 2.9e-8 / 2.9e-8; sat_tanh:6 2.2e-6 /
    3e-8, sat_tanh:9 2.0e-6 / 3e-8, sat_sigmoid:8 3.5e-6 / 3e-8, sat_sigmoid:14 1.8e-6 / 3e-8; late 1.3e-6 /
    8.7e-7; sigmoid_o1 1.2e-6 / 5.7e-7. All within the 1e-5 contract; the torch path on saturated units by 2.9x
    (its flag estimate is right there, so FLAG_KAPPA sets the error; at 5e-5 it was 6.1e-6, 1.6x).
    """
    seeds = int(os.environ.get("GROKFAST_METRICS_FUZZ_SEEDS", "40"))
    worst = {}
    for name in REGIMES:
        for seed in range(seeds):
            h, tail = regime(name, n=8, seed=seed)
            X = exact.connectivity(h, tail)
            worst[name] = max(worst.get(name, 0.0), max_err(gm.connectivity(h, tail, backend=backend), X))
    print({k: f"{v:.2g}" for k, v in worst.items()})
    assert max(worst.values()) <= CONTRACT[torch.float32], worst
