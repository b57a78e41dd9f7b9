"""The GPU side of docs/dropin.md, "Lowered split tails": lowered transformer tails (a skip term ``lam (u_j - u_i)``) in the Triton kernel.

``grokfast_metrics._lower`` turns the Nanda-style tail into one hidden layer, a folded output matrix and a skip term
``u = W_skip x`` (float64, once per sample); the C++ kernel runs it on the CPU, and the Triton kernel v1 on CUDA
(``core._choose``). Every value is compared with the module's own float64 reference (``backend="reference"``: the
paper-literal loop through the traced, un-lowered tail) and with the C++ kernel. Without CUDA the kernel tests run
under the Triton interpreter (a child pytest with ``TRITON_INTERPRET=1`` when this process cannot interpret, as in
``test_triton_kernel.py``); keep ``N`` tiny there. The dispatch and the torch fp64 recompute run in this process.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import types

import numpy as np
import pytest
import torch
from models import nanda, nanda_offset
from torch import nn

triton = pytest.importorskip("triton")

from grokfast_metrics.kernels import cpu_fused as kcpu
from grokfast_metrics.kernels import triton as kt
from grokfast_metrics.kernels import triton_packed_mma as kc2
from grokfast_metrics.kernels import triton_rowblock as kc
from helpers import PYTHON

from grokfast_metrics.compute import core, generic
from grokfast_metrics.compute import torch_paths as torch_backend
from grokfast_metrics.dropin.plan import Plan
from grokfast_metrics.foundation.policy import FLAGGED
from grokfast_metrics.foundation.tail import Act, parse_tail

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUN_HERE = DEVICE == "cuda" or kc.kernel_is_interpreted()
here = pytest.mark.skipif(not RUN_HERE, reason="needs the Triton interpreter; run by test_interpreter_subprocess")
needs_cpu_kernel = pytest.mark.skipif(not kcpu.available(), reason="the fused C++ CPU kernel cannot build here")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.skipif(RUN_HERE, reason="the kernel runs in this process")
def test_interpreter_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_DEFAULT_FP_FUSION": "1"}
    cmd = [*PYTHON, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "not subprocess", __file__]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"interpreted kernel tests failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary, summary


def _triton(h: torch.Tensor, spec, n_lambda: int, **kw) -> torch.Tensor:
    """``L`` through ``kernels.triton`` as ``core`` calls it: ``z`` absorbed through the float64 twin, rounded once,
    and the skip term ``u = spec.skip_values(h)``."""
    z = spec.absorb_rounded_once(h)
    return kt.connectivity_triton(z, spec, n_lambda, u=spec.skip_values(h), **kw)


def _plan(model, probe, kw) -> Plan:
    kw = dict(kw)
    return Plan(model.to(DEVICE), probe.to(DEVICE), kw.pop("at"), **kw)


def _h(plan: Plan) -> torch.Tensor:
    with plan.running():
        return plan.forward()[1].reshape(plan.n, -1)


def _ref(plan: Plan, n_lambda: int = 21) -> np.ndarray:
    """L of the un-lowered split tail by the float64 paper-literal loop (every position)."""
    return plan.connectivity(n_lambda, backend="reference").double().cpu().numpy()


def _direct_err(L: torch.Tensor, R: np.ndarray) -> float:
    """max |L - R| over the pairs the kernel resolved (fp32 pairs it cannot resolve are ``FLAGGED``)."""
    L = L.double().cpu().numpy()
    ok = L != FLAGGED
    return float(np.abs(L - R)[ok].max())


# --------------------------------------------------------------------------------------------
# the dispatch: on CUDA a lowered tail takes the Triton kernel (v1), not the generic path


def _lowered_nanda(n: int = 8, act: str = "ReLU", dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    model, probe, kw = nanda(n=n)
    model.blocks[0].mlp.act_type = act
    plan = _plan(model.to(dtype), probe, kw)
    plan.connectivity(n_lambda=3, backend="reference")  # builds the plan (and its lowering) without a kernel
    assert plan.lowering.tail is not None, plan.lowering.reason
    return plan


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_auto_picks_triton_for_a_lowered_tail_on_cuda(dtype):
    """``resolve_backend``/``backend_info`` with ``h`` on a (mocked) CUDA device: the Triton kernel v1 runs the lowered
    tail (before: ``"torch"``, the generic path through the module, with the fallback reason "the Triton kernels have
    no skip term"). The decision reads only ``h.is_cuda``, ``h.device`` and ``h.dtype``."""
    plan = _lowered_nanda(dtype=dtype)
    low = plan.lowering.tail
    assert low.lowered_spec.skip is not None
    h_cuda = types.SimpleNamespace(is_cuda=True, dtype=dtype, device=torch.device("cuda"))
    assert core.resolve_backend(h_cuda, low) == "triton"
    info = core.backend_info(h_cuda, low)
    assert (info["backend"], info["kernel"], info["fallback"]) == ("triton", "v1", None)
    assert core._unavailable("triton", h_cuda, dtype, low.lowered_spec) is None
    # on the CPU the C++ kernel stays the choice
    if kcpu.available() and DEVICE == "cpu":
        assert core.resolve_backend(_h(plan), low) == "cpu"


def test_v2_leaves_the_skip_term_and_wide_outputs_to_v1():
    """v2 has no skip term; and with p = 113 logits (PO = 128) its accumulator spills (tests/kernels/test_triton_compile.py), so
    the lowered Nanda tail of the targets runs v1 even without a skip term."""
    spec = _lowered_nanda().lowering.tail.lowered_spec
    assert not kc2.supported(spec, 21)
    assert kc2.supported(dataclasses.replace(spec, skip=None), 21)
    wide = nn.Sequential(nn.Linear(8, 100), nn.ReLU(), nn.Linear(100, 113))
    assert core._kernel_of("triton", torch.float32, parse_tail(wide), 21) == "v1"
    assert not kc2.supported(parse_tail(nn.Sequential(nn.Linear(8, 100), nn.ReLU(), nn.Linear(100, 65))), 21)
    assert kc2.supported(parse_tail(nn.Sequential(nn.Linear(8, 100), nn.ReLU(), nn.Linear(100, 64))), 21)


def test_skip_with_a_trailing_activation_is_refused():
    spec = _lowered_nanda().lowering.tail.lowered_spec
    bad = dataclasses.replace(spec, final=[Act("tanh")])
    assert "skip term needs a tail that ends in a Linear" in kc.unsupported_reason(bad)


# --------------------------------------------------------------------------------------------
# the fp64 recompute off the CPU: the torch MLP path with the skip term, through the exact float64 twin


def test_torch_mlp_pairs_with_skip_match_reference():
    """``torch_backend.mlp_pairs`` (what ``core`` recomputes flagged pairs with on CUDA) carries the skip term. Before:
    a lowered tail went through the generic path with the fp32-rounded folded weights."""
    plan = _lowered_nanda(n=8)
    h = _h(plan).double()
    spec = plan.lowering.tail.lowered_spec
    i, j = torch.triu_indices(8, 8, 1, device=h.device)
    v = torch_backend.mlp_pairs(h, spec.exact, i, j, 21).cpu().numpy()
    no_skip = torch_backend.mlp_pairs(h, dataclasses.replace(spec.exact, skip=None), i, j, 21).cpu().numpy()
    L_ref = generic.reference_connectivity(h, plan.full_tail, 21)[i.cpu(), j.cpu()]
    # observed worst 1.9e-15 (the exact float64 twin of the folded weights); without the skip term 0.16
    np.testing.assert_allclose(v, L_ref, rtol=0, atol=1e-12)
    assert np.abs(no_skip - L_ref).max() > 1e-3  # the skip term matters on this model


# --------------------------------------------------------------------------------------------
# the kernel (interpreted on the CPU) against the reference and the C++ kernel


@here
@pytest.mark.parametrize("act", ["ReLU", "GELU"])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_nanda_lowered_triton_matches_reference(act, dtype, atol):
    plan = _lowered_nanda(n=8, act=act, dtype=dtype)
    L = plan.connectivity(backend="triton")
    assert plan.ran.startswith("split, lowered (triton)"), plan.ran
    assert core.last_run_info()["kernel"] == "v1"
    assert "skip Linear(32, 13)" in plan.ran
    L = L.double().cpu().numpy()
    R = _ref(plan)
    # observed worst fp32 1.8e-7 (ReLU, GELU; 2 / 5 of 28 pairs recomputed); fp64 2.1e-15: >= 9x margin to atol / 5
    np.testing.assert_allclose(L, R, rtol=0, atol=atol / 5)
    assert not np.allclose(L, 1.0)
    if kcpu.available() and DEVICE == "cpu":
        Lc = plan.connectivity(backend="cpu").double().numpy()
        assert plan.ran.startswith("split, lowered (cpu)")
        np.testing.assert_allclose(L, Lc, rtol=0, atol=atol / 5)  # observed 3.6e-7 fp32 / 5.6e-16 fp64


@here
def test_kernel_without_the_skip_term_disagrees():
    """The skip term is what the kernel adds: dropping it moves L far from the reference (the test above can fail)."""
    plan = _lowered_nanda(n=6)
    h = _h(plan)
    spec = plan.lowering.tail.lowered_spec
    L = _triton(h, spec, 21)
    L0 = _triton(h, dataclasses.replace(spec, skip=None), 21)
    R = _ref(plan)
    assert _direct_err(L, R) <= 2e-6  # observed 1.2e-7
    assert _direct_err(L0, R) > 1e-2  # observed 0.14


@here
@pytest.mark.parametrize("arch, dtype", [(90, torch.float32), (80, torch.float32), (90, torch.float64)])
def test_gpu_tiling_with_skip_matches_reference(arch, dtype):
    """The configuration a GPU would run (K chunks of the 128-wide hidden layer, small pair blocks) under the
    interpreter, with the skip term."""
    plan = _lowered_nanda(n=7, dtype=dtype)
    h = _h(plan)
    spec = plan.lowering.tail.lowered_spec
    cfg = kc.launch_config(spec, dtype, 21, interpret=False, arch=arch)
    c = cfg.constexprs
    assert c["SKIP"] and c["CENTRED"] and c["DEPTH"] == 1 and c["BLOCK_K"] < c["K0"]
    assert c["BLOCK_J"] < h.shape[0] - 1  # several column blocks per row
    L = _triton(h, spec, 21, config=cfg)
    assert bool(torch.isfinite(L).all()) and torch.equal(L, L.T)
    # observed fp32 1.8e-7 (sm_90 and sm_80 tilings, 2 pairs flagged), fp64 1.3e-15
    assert _direct_err(L, _ref(plan)) <= (2e-6 if dtype == torch.float32 else 2e-11)


# --------------------------------------------------------------------------------------------
# ill-conditioned regimes through the skip term


@here
@pytest.mark.parametrize("scale", [1e3, 1e5])
def test_large_common_logit_offset_through_the_skip(scale):
    plan = _plan(*nanda_offset(scale, n=8))
    L = plan.connectivity(backend="triton")
    info = core.last_run_info()
    assert plan.ran.startswith("split, lowered (triton)"), plan.ran
    # the offset cancels exactly in u_j - u_i (taken in float64) and the absorb runs in float64: it flags no more pairs
    # than the model without it (observed 1 of 28 without the offset, 1 at 1e3, 2 at 1e5; the C++ kernel 1 / 1 / 3)
    assert info["recomputed"] < info["pairs"] // 4
    # observed worst 1.8e-7 (1e3) / 3.0e-7 (1e5): >= 33x margin; u_j - u_i rounded from fp32 u: 4e-5 / 3.7e-3, the
    # absorb in fp32 (not the float64 twin): 1.3e-4 / 1.4e-2
    np.testing.assert_allclose(L.double().cpu().numpy(), _ref(plan), rtol=0, atol=1e-5)


@here
def test_mlp_cancelling_the_skip_is_flagged_and_recomputed(monkeypatch):
    """An MLP whose linear part cancels the skip term to 1e-5 (relu(v) - relu(-v) = v), leaving a 1e-4 nonlinear part:
    the pairs fp32 cannot resolve are flagged and recomputed in fp64 by the torch MLP path with the skip term (what
    runs on CUDA: the C++ pair kernel is switched off here). The MLP's own rounding scale flags them here already
    (checked: they are flagged without the skip's |u_j - u_i| in the scale too, which cancellation bounds by the MLP's
    part: this test does not isolate that term)."""
    monkeypatch.setattr(kcpu, "pairs_f64_unsupported", lambda spec, device: "switched off by the test")
    model, probe, kw = nanda(n=8, d_model=16, d_mlp=64)
    plan = _plan(model, probe, kw)
    x_mean = _h(plan).reshape(8, 3, 16)[:, 2].mean(0).cpu()
    mlp = model.blocks[0].mlp
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        W = torch.randn(32, 16, generator=g)
        mlp.W_in.copy_(torch.cat([W, -W]))
        mlp.b_in.copy_(-mlp.W_in.cpu() @ x_mean)  # units centred on the probe: they cross 0 along the paths
        P = torch.linalg.pinv(W)
        Q = torch.randn(16, 32, generator=g)
        mlp.W_out.copy_(torch.cat([-P, P], dim=1) * (1 - 1e-5) + 1e-4 * torch.cat([Q, torch.zeros(16, 32)], dim=1))
    plan = _plan(model, probe, kw)
    L = plan.connectivity(backend="triton").double().cpu().numpy()
    info = core.last_run_info()
    assert plan.ran.startswith("split, lowered (triton)") and info["recomputed"] > 0
    # observed: every pair recomputed in fp64 (28 of 28), worst 0
    np.testing.assert_allclose(L, _ref(plan), rtol=0, atol=1e-5)
    assert L.min() < 0.99


@here
@pytest.mark.parametrize("rel", [1e-3, 1e-5])
def test_nearly_identical_representations(rel):
    plan = _lowered_nanda(n=8)
    h = _h(plan)
    g = torch.Generator().manual_seed(3)
    hn = h[:1] + rel * h.abs().max() * torch.randn(h.shape, generator=g).to(h.device)
    low = plan.lowering.tail
    L = core.connectivity(hn, low, backend="triton").double().cpu().numpy()
    info = core.last_run_info()
    assert info["backend"] == "triton"
    L_ref = core.connectivity(hn, plan.full_tail, backend="reference").double().cpu().numpy()
    # observed worst 6.0e-8 (1e-3: 27 of 28 pairs recomputed in fp64) / 0 (1e-5: all 28): >= 160x margin
    np.testing.assert_allclose(L, L_ref, rtol=0, atol=1e-5)
