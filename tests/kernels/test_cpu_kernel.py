"""Fused CPU kernel (``grokfast_metrics.kernels.cpu_fused``) against the NumPy reference.

The kernel is built on first use (a few seconds); tests that need it skip when it cannot run here
(no AVX2/FMA, no compiler), the fallback tests run everywhere.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from contract import CONTRACT, check_against_reference, check_backend
from grokfast_metrics.kernels import cpu_fused as kc
from helpers import ACTS, PYTHON, mlp_tail
from torch import nn

import grokfast_metrics as gm
from grokfast_metrics.compute import core
from grokfast_metrics.compute import torch_paths as torch_backend
from grokfast_metrics.foundation.policy import FLAGGED
from grokfast_metrics.foundation.tail import parse_tail

needs_kernel = pytest.mark.skipif(not kc.available(), reason=f"fused CPU kernel unavailable: {kc.build_info()['error']}")

FUSED_ACTS = [a for a in ACTS if a != "identity"]


def make_tail(d: int, widths: list[int], act: str, bias: bool = True, trailing: bool = False) -> nn.Sequential:
    """``Linear(d, w0) -> act -> Linear(w0, w1) -> act -> ...`` (``len(widths) - 1`` stages after the first)."""
    return mlp_tail([d, *widths], act, bias=bias, final_act=act if trailing else None, seed=sum(widths) + d)


def fused(h: torch.Tensor, tail: nn.Module, n_lambda: int = 21, num_threads: int | None = None, flag: bool = True) -> torch.Tensor:
    spec = parse_tail(tail)
    with torch.no_grad():
        # as core does: z absorbed in float64, rounded once
        return kc.connectivity_cpu(kc.absorb_f64(h, spec), spec, n_lambda, num_threads=num_threads, flag=flag)


#: ``check_against_reference(..., direct=True)``: the kernel's own output with its flag on (FLAGGED pairs skipped: core
#: recomputes them in fp64). The fp32 contract holds there too: worst observed 1.7e-6 at FLAG_KAPPA = 3e-5 (3.5e-6 at
#: 5e-5, SiLU, O = 3, N = 65; 7.5e-6 on the trailing-activation tails before their flag scale carried the inner
#: rounding): a 6x margin.


@needs_kernel
@pytest.mark.parametrize("n, widths", [(2, [100, 31]), (3, [7, 1]), (17, [37, 31]), (65, [24, 3])])
@pytest.mark.parametrize("act", FUSED_ACTS)
def test_one_stage_matches_reference(n: int, widths: list[int], act: str) -> None:
    torch.manual_seed(n * 31 + len(act))
    h = torch.randn(n, 5)
    tail = make_tail(5, widths, act)
    check_against_reference(fused(h, tail), h, tail, direct=True)


@needs_kernel
@pytest.mark.parametrize("widths", [[13, 9, 2], [40, 17, 33, 5]])
@pytest.mark.parametrize("act", ["silu", "tanh", "leaky_relu", "gelu"])
@pytest.mark.parametrize("bias, trailing", [(True, False), (False, True)])
def test_deeper_tails_bias_and_trailing(widths: list[int], act: str, bias: bool, trailing: bool) -> None:
    torch.manual_seed(len(widths) + 7 * bias)
    h = torch.randn(11, 6)
    tail = make_tail(6, widths, act, bias=bias, trailing=trailing)
    check_against_reference(fused(h, tail), h, tail, direct=True)


@needs_kernel
@pytest.mark.parametrize("n_lambda", [3, 4, 20, 21, 50])
def test_n_lambda_even_odd_and_long(n_lambda: int) -> None:
    """Even/odd T change where the two exp chains meet; T > CHAIN_TMAX takes the direct exp path."""
    torch.manual_seed(n_lambda)
    h = torch.randn(9, 4)
    tail = make_tail(4, [30, 6], "silu")
    check_against_reference(fused(h, tail, n_lambda), h, tail, n_lambda, direct=True)


@needs_kernel
def test_large_activations_take_the_direct_exp_path() -> None:
    """Samples with |z| > 40 must not use the exp chain (it could overflow); pairs mixing both kinds are right too."""
    torch.manual_seed(3)
    h = torch.randn(12, 4)
    h[:4] *= 60.0  # z = W h + b reaches |z| > 80 for these rows (chain limit: 40)
    tail = make_tail(4, [20, 3], "silu")
    with torch.no_grad():
        z = parse_tail(tail).absorb(h)
    assert float(z[:4].abs().max()) > 80.0 and float(z[4:].abs().max()) < 40.0
    check_against_reference(fused(h, tail), h, tail, direct=True)


@needs_kernel
def test_constant_paths_count_as_linear() -> None:
    """Dead ReLU units (a whole path at z < 0) give y = bias exactly: r2 = 1 by the constant-path rule."""
    torch.manual_seed(4)
    tail = make_tail(3, [8, 2], "relu")
    with torch.no_grad():
        tail[0].weight.copy_(torch.eye(8, 3))
        tail[0].bias.fill_(-10.0)
    h = torch.rand(5, 3)  # z in [-10, -9]: every unit is off on every path
    L = fused(h, tail)
    assert torch.all(L == 1.0)
    check_against_reference(L, h, tail, direct=True)


@needs_kernel
def test_default_tail_threads_and_dispatch() -> None:
    """Default tail shape; 1 and 2 threads agree bit for bit; ``backend="auto"`` on CPU uses the kernel,
    ``backend="torch"`` the stock torch ops."""
    torch.manual_seed(5)
    h = torch.randn(40, 100)
    tail = nn.Sequential(nn.Linear(100, 100), nn.SiLU(), nn.Linear(100, 31))
    L1 = fused(h, tail, num_threads=1, flag=False)
    L2 = fused(h, tail, num_threads=2, flag=False)
    assert torch.equal(L1, L2)
    # the public API recomputes the pairs the kernel flags as ill-conditioned in fp64: equal elsewhere
    keep = fused(h, tail, num_threads=1, flag=True) != FLAGGED
    assert torch.equal(gm.connectivity(h, tail)[keep], L1[keep])
    with torch.no_grad():
        ops = torch_backend.connectivity_mlp(h, parse_tail(tail), 21)
        keep_ops = torch_backend.connectivity_mlp(h, parse_tail(tail), 21, flag=True) != FLAGGED
    assert torch.equal(gm.connectivity(h, tail, backend="torch")[keep_ops], ops[keep_ops])
    assert torch.equal(gm.connectivity(h, tail, backend="cpu")[keep], L1[keep])
    assert core.resolve_backend(h, tail) == "cpu"
    assert float((ops - L1).abs().max()) <= 2 * CONTRACT[torch.float32]
    check_against_reference(L1, h, tail)


@needs_kernel
def test_default_tail_flags_few_pairs_and_resolves_the_rest() -> None:
    """The benchmark's key shape (default SiLU tail, post-SiLU inputs): the exp-chain path bounds max_t |a_th| from the
    path's ends and SiLU's minimum (the max of |silu| over the segment), not by |a_0| + max_t |a_t - a_0| (up to twice
    that). Measured at N = 160: 3.03% of the pairs flagged before, 0.69% after; every resolved pair within the contract
    of the float64 kernel (worst observed 9.7e-7 after, 7.7e-7 before: a 10x margin)."""
    import copy

    from grokfast_metrics.bench.workloads import make_inputs
    from grokfast_metrics.bench.workloads import make_tail as bench_tail

    tail, h = bench_tail(100, 31, 1, seed=0), make_inputs(160, 100, seed=1)
    L = fused(h, tail).numpy()
    iu = np.triu_indices(160, 1)
    ok = L[iu] != FLAGGED
    assert 1.0 - ok.mean() <= 0.015, f"{100 * (1 - ok.mean()):.2f}% of the pairs flagged for the fp64 recompute"
    L64 = gm.connectivity(h.double(), copy.deepcopy(tail).double()).numpy()
    err = np.abs(L[iu][ok] - L64[iu][ok]).max()
    assert err <= CONTRACT[torch.float32], f"max |L - L_fp64| = {err:.3g} over the resolved pairs"


@needs_kernel
def test_duplicate_rows_through_public_api() -> None:
    torch.manual_seed(6)
    h = torch.randn(6, 5)
    h[4] = h[1]
    tail = make_tail(5, [16, 4], "silu")
    L = gm.connectivity(h, tail)
    assert float(L[1, 4]) == 1.0 and float(L[4, 1]) == 1.0
    check_against_reference(L, h, tail)


def test_kernel_is_compiled_with_the_activation_table() -> None:
    """The C++ ActCode enum takes its values from ``_tail.ACT_CODES`` (one -D flag per activation)."""
    from grokfast_metrics.foundation.tail import ACT_CODES

    assert {f"-DGM_ACT_{n.upper()}={c}" for n, c in ACT_CODES.items()} <= set(kc._FLAGS)
    assert len(set(ACT_CODES.values())) == len(ACT_CODES)


def test_unsupported_inputs_fall_back_to_torch_ops() -> None:
    torch.manual_seed(7)
    h = torch.randn(7, 4)
    tail = nn.Sequential(nn.Linear(4, 6), nn.SiLU())  # no Linear after the activation: not fused
    spec = parse_tail(tail)
    assert "no Linear" in (kc.unsupported_reason(spec, h.device, h.dtype) or "")
    assert core.resolve_backend(h, tail) == "torch"
    check_against_reference(gm.connectivity(h, tail), h, tail)
    with pytest.raises(ValueError, match="backend='cpu' cannot run here: the tail has no Linear"):
        gm.connectivity(h, tail, backend="cpu")
    with pytest.raises(ValueError, match="cannot run this tail"):
        kc.connectivity_cpu(h, spec, 21)
    tail64 = make_tail(4, [10, 3], "silu").double()
    assert "float32 and float64" in kc.unsupported_reason(parse_tail(tail64), h.device, torch.float16)
    assert "float32 kernel" in kc.unsupported_reason(parse_tail(tail64), h.device, torch.float32)


def test_env_switch_disables_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GROKFAST_METRICS_CPU_KERNEL", "0")
    tail = make_tail(4, [10, 3], "silu")
    h = torch.randn(5, 4)
    assert not kc.available()
    assert "GROKFAST_METRICS_CPU_KERNEL" in kc.unsupported_reason(parse_tail(tail), h.device, h.dtype)
    assert core.resolve_backend(h, tail) == "torch"
    check_against_reference(gm.connectivity(h, tail), h, tail)


@needs_kernel
@pytest.mark.parametrize(
    "n, widths, act, n_lambda, trailing",
    [
        (40, [100, 31], "silu", 21, False),  # the default tail: two 16-column panels in one pass of zmm registers
        (9, [37, 8], "gelu", 5, False),  # one 8-wide panel (AVX2 code either way)
        (9, [24, 16], "tanh", 26, False),  # one 16-wide panel
        (9, [40, 40], "sigmoid", 3, False),  # 16 + 16 + 8
        (7, [13, 72, 9], "silu", 41, False),  # depth 2: 72 = 32 + 32 + 8 columns
        (11, [30, 50], "relu", 21, False),  # the ReLU split: the indexed GEMM over the crossing units
        (8, [20, 24, 5], "leaky_relu", 21, True),  # trailing activation: the uncentred GEMM with its bias
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_avx512_gemm_is_bitwise_the_avx2_gemm(n: int, widths: list[int], act: str, n_lambda: int, trailing: bool, dtype) -> None:
    """Where the CPU has AVX-512F the GEMMs run in zmm registers (kernels.cpu_fused.use_avx512): the same products
    added in the same order per output, so L must be bitwise that of the AVX2 GEMMs (and within the contract)."""
    was = kc.build_info()["avx512"]
    if not kc.use_avx512(True):
        kc.use_avx512(was)
        pytest.skip("this CPU has no AVX-512F")
    torch.manual_seed(n + n_lambda)
    h = torch.randn(n, 6, dtype=dtype)
    tail = make_tail(6, widths, act, trailing=trailing).to(dtype)
    try:
        wide = fused(h, tail, n_lambda)
        kc.use_avx512(False)
        narrow = fused(h, tail, n_lambda)
    finally:
        kc.use_avx512(was)
    assert torch.equal(wide, narrow), f"max |difference| {float((wide - narrow).abs().max()):.3g}"
    check_against_reference(wide, h, tail, n_lambda, dtype=dtype, direct=True)


@needs_kernel
def test_avx512_env_switch() -> None:
    """``GROKFAST_METRICS_CPU_AVX512=0`` keeps the fp32 GEMM in AVX2 registers (read when the library loads)."""
    import subprocess

    code = "from grokfast_metrics.kernels import cpu_fused as k; print(k.available(), k.build_info()['avx512'])"
    env = {**os.environ, "GROKFAST_METRICS_CPU_AVX512": "0"}
    out = subprocess.run([*PYTHON, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=True).stdout.split()
    assert out == ["True", "False"], out


def test_build_failure_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    bad = tmp_path / "connectivity_cpu.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(kc, "_SOURCE", bad)
    monkeypatch.setattr(kc, "_cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(kc, "_cpu_has_avx2_fma", lambda: True)
    monkeypatch.setattr(kc, "_state", kc.initial_state())
    with pytest.warns(RuntimeWarning, match="fused CPU kernel unavailable"):
        assert not kc.available()
    assert "failed" in kc.build_info()["error"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert not kc.available()
        tail = make_tail(3, [6, 2], "silu")
        h = torch.randn(4, 3)
        check_against_reference(gm.connectivity(h, tail), h, tail)


@needs_kernel
def test_kernel_allocation_failure_is_a_python_exception() -> None:
    """A failed allocation inside the C++ kernel (here: absurd widths through a mocked z row count) must come
    back as a Python exception, never std::terminate/SIGABRT; run in a subprocess so an abort cannot kill pytest."""
    import subprocess

    code = (
        "import torch, ctypes\n"
        "from grokfast_metrics.kernels import cpu_fused as kc\n"
        "from torch import nn\n"
        "from grokfast_metrics.foundation.tail import parse_tail\n"
        "lib = kc._library()\n"
        "n = 3; T = 21\n"
        "kp = (ctypes.c_int * 1)(1 << 30); kin = (ctypes.c_int * 1)(8); np_ = (ctypes.c_int * 1)(8)\n"
        "w = torch.zeros(64); b = torch.zeros(64); z = torch.zeros(n * 64)\n"
        "wp = (ctypes.c_void_p * 1)(w.data_ptr()); bp = (ctypes.c_void_p * 1)(b.data_ptr())\n"
        "off = (ctypes.c_int * 3)(0, 1, 1); codes = (ctypes.c_int * 1)(2); sl = (ctypes.c_float * 1)(0.0)\n"
        "lam = torch.linspace(0, 1, T); lc = lam - 0.5; out = torch.empty(n, n)\n"
        "rc = lib.gm_connectivity_mlp(n, T, 1, ctypes.addressof(kp), ctypes.addressof(kin), ctypes.addressof(np_),"
        " ctypes.addressof(wp), ctypes.addressof(bp), ctypes.addressof(off), ctypes.addressof(codes),"
        " ctypes.addressof(sl), 1, z.data_ptr(), lam.data_ptr(), lc.data_ptr(), 1.0, 1e-7, 16.0, out.data_ptr(), 2,"
        " w.data_ptr(), w.data_ptr(), 0.0, None)\n"
        "print('rc', rc)\n"
    )
    proc = subprocess.run(
        [*PYTHON, "-c", code], capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "MALLOC_ARENA_MAX": "2"}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rc 2" in proc.stdout, proc.stdout


@needs_kernel
@pytest.mark.parametrize("act", FUSED_ACTS)
@pytest.mark.parametrize("widths, bias, trailing", [([13, 3], True, False), ([9, 7, 4], False, False), ([9, 7, 4], True, True)])
def test_fp64_pair_kernel_matches_torch_fp64(act: str, widths: list[int], bias: bool, trailing: bool) -> None:
    """The C++ fp64 recompute of flagged pairs (``kc.pairs_f64``) is the torch fp64 path's algebra."""
    tail = make_tail(5, widths, act, bias=bias, trailing=trailing)
    h = torch.randn(9, 5, generator=torch.Generator().manual_seed(len(widths) + len(act)))
    spec = parse_tail(tail)
    i, j = torch.triu_indices(9, 9, 1)
    got = kc.pairs_f64(h, spec, i, j, 21)
    want = torch_backend.mlp_pairs(h.double(), spec, i, j, 21)
    assert got.dtype == torch.float64
    assert float((got - want).abs().max()) <= 1e-11  # observed <= 3e-15 (leaky_relu: the slope is passed in fp64)


@needs_kernel
def test_fp64_pair_kernel_on_the_regimes() -> None:
    from regimes import REGIMES, regime

    for name in REGIMES:
        h, tail = regime(name, n=10)
        spec = parse_tail(tail)
        i, j = torch.triu_indices(10, 10, 1)
        got = kc.pairs_f64(h, spec, i, j, 21)
        want = torch_backend.mlp_pairs(h.double(), spec, i, j, 21)
        assert float((got - want).abs().max()) <= 1e-10, name  # observed worst 2.7e-12 (both fp64 roundings)


# ------------------------------------------------------------------------------------------------
# the float64 kernel (fp64 models: no flags, the fp64 contract)

ATOL64 = 5e-13  # fp64 kernel vs the float64 NumPy reference: observed worst 7.4e-14 (sigmoid, depth 3, trailing)


def fused64(h: torch.Tensor, tail: nn.Module, n_lambda: int = 21, num_threads: int | None = None) -> torch.Tensor:
    return fused(h.double(), tail.double(), n_lambda, num_threads)


@needs_kernel
@pytest.mark.parametrize("act", FUSED_ACTS)
@pytest.mark.parametrize(
    "n, d, widths, bias, trailing",
    [
        (2, 5, [100, 31], True, False),
        (9, 5, [13, 3], True, False),
        (17, 7, [9, 7, 4], False, False),
        (10, 6, [9, 7, 5, 3], True, True),
        (11, 3, [31, 1], False, True),
    ],
)
def test_fp64_kernel_matches_reference(act: str, n: int, d: int, widths: list[int], bias: bool, trailing: bool) -> None:
    """Depth 1-3, every activation, with and without bias and a trailing activation, odd N and widths."""
    tail = make_tail(d, widths, act, bias=bias, trailing=trailing).double()
    h = torch.randn(n, d, generator=torch.Generator().manual_seed(n + len(act)), dtype=torch.float64)
    check_against_reference(fused64(h, tail), h, tail, atol=ATOL64, dtype=torch.float64, direct=True)


@needs_kernel
@pytest.mark.parametrize("n_lambda", [3, 4, 21, 50])
def test_fp64_chain_and_direct_paths(n_lambda: int) -> None:
    """Rows with |z| > 40 and T > CHAIN_TMAX take the direct SiLU, the others the exp chain; both agree."""
    h = torch.randn(12, 4, generator=torch.Generator().manual_seed(n_lambda), dtype=torch.float64)
    h[:3] *= 60.0
    tail = make_tail(4, [20, 3], "silu").double()
    L = fused64(h, tail, n_lambda)
    check_against_reference(L, h, tail, n_lambda, atol=ATOL64, dtype=torch.float64, direct=True)  # observed <= 1.1e-15


@needs_kernel
def test_fp64_constant_paths_and_regimes() -> None:
    """Dead ReLU units give L = 1 exactly; every regime of the correctness issue in fp64 against the exact value."""
    from regimes import REGIMES, regime

    from grokfast_metrics.compute import exact

    tail = make_tail(3, [8, 2], "relu").double()
    with torch.no_grad():
        tail[0].weight.copy_(torch.eye(8, 3))
        tail[0].bias.fill_(-10.0)
    assert torch.all(fused64(torch.rand(5, 3), tail) == 1.0)
    worst = 0.0
    for name in REGIMES:
        h, tail = regime(name, n=6, dtype=torch.float64)
        worst = max(worst, check_backend(gm.connectivity(h, tail), exact.connectivity(h, tail), dtype=torch.float64))
        assert core.last_run_info()["backend"] == "cpu", name
    assert worst <= 1e-13  # observed worst 3.6e-15 (near:1e-3); the fp64 contract is 1e-10


@needs_kernel
def test_fp64_model_takes_the_kernel() -> None:
    """``gm.connectivity`` of an fp64 model (or fp32 h through an fp64 tail) on the CPU runs the fp64 kernel:
    resolve_backend and last_run_info say so, threads agree bit for bit, nothing is flagged."""
    h = torch.randn(40, 100, generator=torch.Generator().manual_seed(8))
    tail = nn.Sequential(nn.Linear(100, 100), nn.SiLU(), nn.Linear(100, 31)).double()
    L1 = fused64(h, tail, num_threads=1)
    assert torch.equal(fused64(h, tail, num_threads=2), L1)
    assert core.resolve_backend(h.double(), tail) == "cpu" and core.resolve_backend(h, tail) == "cpu"
    for x in (h.double(), h):
        L = gm.connectivity(x, tail)
        assert L.dtype == torch.float64 and torch.equal(L, L1)
        assert core.last_run_info()["backend"] == "cpu" and core.last_run_info()["recomputed"] == 0
    assert torch.equal(gm.connectivity(h.double(), tail, backend="cpu"), L1)
    check_against_reference(L1, h.double(), tail, atol=ATOL64, direct=True)  # observed 2.6e-15
