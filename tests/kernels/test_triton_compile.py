"""Compile the fused kernel for real GPU targets on the CPU (no driver needed).

The interpreter accepts kernels the GPU compiler rejects (non-power-of-two blocks, small ``tl.dot``
shapes, dtype mixes), so every configuration :func:`launch_config` would pick on a GPU is compiled
to PTX and a cubin for sm_90 and sm_80 with exactly the constexprs/signature the launcher uses.
This needs the compiled (``JITFunction``) kernel: when this session runs under ``TRITON_INTERPRET=1``
the file reruns itself in a child pytest without it.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from torch import nn

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

import itertools

from grokfast_metrics.kernels import triton_packed_mma as kc2
from grokfast_metrics.kernels import triton_rowblock as kc
from helpers import PYTHON
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from grokfast_metrics.foundation.tail import ACT_CODES, Act, MLPTail, parse_tail

COMPILED_HERE = not kc.kernel_is_interpreted()
here = pytest.mark.skipif(not COMPILED_HERE, reason="interpreter session; run by test_compile_subprocess")

#: Largest dynamic shared memory per block (bytes): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _mlp(d: int, widths: list[int], acts: list[nn.Module], final: nn.Module | None = None) -> nn.Sequential:
    """``Linear(d, w0)`` then ``act_l, Linear(w_{l-1}, w_l)`` for each further width (+ ``final``)."""
    layers: list[nn.Module] = [nn.Linear(d, widths[0])]
    for act, (a, b) in zip(acts, itertools.pairwise(widths)):
        layers += [act, nn.Linear(a, b)]
    return nn.Sequential(*layers, *([final] if final is not None else []))


def _lowered(d_model: int, d_mlp: int, o: int, act: str, positions: int = 3) -> nn.Module:
    """A lowered transformer tail as ``grokfast_metrics._lower`` builds it (the last of ``positions`` positions,
    ``Linear(d_model, d_mlp)`` absorbed, ``act``, the folded ``Linear(d_mlp, o)``, a skip term ``W_skip``): the
    kernel runs with ``SKIP``."""
    torch.manual_seed(0)
    m = nn.Module()
    m.lowered_spec = MLPTail(
        pre=[nn.Linear(d_model, d_mlp)],
        stages=[([Act(act)], nn.Linear(d_mlp, o))],
        in_features=positions * d_model,
        select=((positions - 1) * d_model, positions * d_model),
        skip=torch.randn(o, d_model, dtype=torch.float64),
    )
    return m


F32, F64 = torch.float32, torch.float64
# id -> (tail, dtype, fp32 input_precision)
CONFIGS = {
    "default_h100_o31": (_mlp(64, [100, 31], [nn.SiLU()]), F32, None),
    "default_ieee": (_mlp(64, [100, 31], [nn.SiLU()]), F32, "ieee"),
    "h256_d1_gelu": (_mlp(64, [256, 31], [nn.GELU()]), F32, None),
    "h512_d1_relu": (_mlp(64, [512, 31], [nn.ReLU()]), F32, None),
    "h100_d2_tanh_gelutanh": (_mlp(64, [100, 100, 31], [nn.Tanh(), nn.GELU(approximate="tanh")]), F32, None),
    "h256_d2_sigmoid_leaky_o1": (_mlp(64, [256, 256, 1], [nn.Sigmoid(), nn.LeakyReLU(0.1)]), F32, None),
    "h512_d2_silu": (_mlp(64, [512, 512, 31], [nn.SiLU(), nn.SiLU()]), F32, None),
    "h100_d3_final_tanh": (_mlp(64, [100, 100, 100, 31], [nn.SiLU()] * 3, nn.Tanh()), F32, None),
    "h256_d3_mixed": (_mlp(64, [256, 256, 256, 31], [nn.ReLU(), nn.GELU(), nn.Sigmoid()]), F32, None),
    "h512_d3_silu": (_mlp(64, [512, 512, 512, 31], [nn.SiLU()] * 3), F32, None),
    "h64_d4": (_mlp(16, [64, 48, 40, 24, 10], [nn.SiLU(), nn.Tanh(), nn.ReLU(), nn.GELU()]), F32, None),
    "h100_d1_sigmoid": (_mlp(64, [100, 31], [nn.Sigmoid()]), F32, None),  # depth 1 saturating: _sat_bounds
    "fp64_default": (_mlp(64, [100, 31], [nn.SiLU()]), F64, None),
    "fp64_h100_d1_tanh": (_mlp(64, [100, 31], [nn.Tanh()]), F64, None),
    "fp64_h512_d1_gelu": (_mlp(64, [512, 31], [nn.GELU()]), F64, None),
    "fp64_h256_d2_tanh": (_mlp(64, [256, 256, 31], [nn.Tanh(), nn.Sigmoid()]), F64, None),
    "fp64_h100_d2_silu_gelu": (_mlp(64, [100, 100, 31], [nn.SiLU(), nn.GELU()]), F64, None),  # erfc-GELU, chained
    "fp64_h512_d3": (_mlp(64, [512, 512, 512, 31], [nn.SiLU(), nn.LeakyReLU(0.01), nn.GELU(approximate="tanh")]), F64, None),
    # p = 113 logits (PO = 128): v2's wide accumulator (the lowered Nanda tail without a skip term runs v2)
    "h512_o113_relu": (_mlp(128, [512, 113], [nn.ReLU()]), F32, None),
    "h100_o113_ieee": (_mlp(64, [100, 113], [nn.SiLU()]), F32, "ieee"),
    "fp64_h512_o113_relu": (_mlp(128, [512, 113], [nn.ReLU()]), F64, None),
    # lowered transformer tails with a skip term (docs/dropin.md): the Nanda tail (d_model 128, d_mlp 512, p = 113)
    "lowered_nanda_relu": (_lowered(128, 512, 113, "relu"), F32, None),
    "lowered_nanda_gelu_ieee": (_lowered(128, 512, 113, "gelu"), F32, "ieee"),
    "fp64_lowered_nanda_relu": (_lowered(128, 512, 113, "relu"), F64, None),
}


@pytest.mark.skipif(COMPILED_HERE, reason="the compiled kernel is available in this process")
def test_compile_subprocess():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [*PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"GPU compile tests failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary, summary


@triton.jit
def _probe(x_ptr):
    tl.store(x_ptr + tl.arange(0, 16), tl.arange(0, 16).to(tl.float32))


@pytest.fixture(scope="module")
def cuda_compiler():
    """Skip (with the reason) if this triton cannot build a cubin for CUDA without a driver."""

    try:
        triton.compile(ASTSource(fn=_probe, signature={"x_ptr": "*fp32"}), target=GPUTarget("cuda", 80, 32))
    except Exception as e:
        pytest.skip(f"the installed triton {triton.__version__} cannot compile for CUDA on this machine: {e!r}")


def _compile(name: str, cc: int, variant: str = "v1"):
    tail, dtype, prec = CONFIGS[name]
    spec = parse_tail(tail)
    mod, fn = (kc, kc._connectivity_fwd_kernel) if variant == "v1" else (kc2, kc2._connectivity_v2_kernel)
    cfg = mod.launch_config(spec, dtype, 21, interpret=False, input_precision=prec, arch=cc)
    # the JIT marks 16-byte aligned pointers (every fresh torch allocation) as divisible by 16
    attrs = {(fn.arg_names.index(p),): [["tt.divisibility", 16]] for p in mod.POINTER_ARGS}
    src = ASTSource(fn=fn, signature=cfg.signature, constexprs=cfg.constexprs, attrs=attrs)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return cfg, triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)


#: Every (shape, arch, variant) the launcher can pick: v1 for every tail, v2 for the tails it runs.
TARGETS = [(name, cc, "v1") for name in CONFIGS for cc in (90, 80)] + [
    (name, cc, "v2") for name in CONFIGS for cc in (90, 80) if kc2.supported(parse_tail(CONFIGS[name][0]), 21)
]


def _spill_bytes(k) -> int | None:
    """Local memory (spills) of a cubin from ``cuobjdump --dump-resource-usage``; ``None`` without cuobjdump."""
    from grokfast_metrics.bench import static_gpu

    try:
        _sass, res = static_gpu.sass_of(k)
    except (RuntimeError, OSError):
        return None
    return res.get("LOCAL", 0) + res.get("STACK", 0)


@here
@pytest.mark.parametrize("name, cc, variant", TARGETS, ids=[f"{n}-sm{c}-{v}" for n, c, v in TARGETS])
def test_compiles_for_gpu(name, cc, variant, cuda_compiler):
    cfg, k = _compile(name, cc, variant)
    assert k.asm.get("cubin"), "no cubin produced"
    spills = _spill_bytes(k)
    assert spills in (0, None), f"{spills} bytes of spills on sm_{cc} ({variant})"
    ptx = k.asm["ptx"]
    assert f".target sm_{cc}" in ptx
    assert k.metadata.shared <= SMEM_LIMIT[cc], f"{k.metadata.shared} B shared memory > {SMEM_LIMIT[cc]} on sm_{cc}"
    if cfg.constexprs["PREC"] in ("tf32x3", "tf32"):
        assert ".tf32" in ptx, "fp32 dots should run on TF32 tensor cores (tf32x3)"
    if cfg.constexprs["PREC"] == "ieee" and "fp64" not in name:
        assert ".tf32" not in ptx, "input_precision='ieee' must not use TF32"


@here
@pytest.mark.parametrize("cc", [90, 80])
def test_v2_prepass_compiles_with_fast_silu(cc, cuda_compiler):
    """v2's ``a0 = act(z)`` pre-pass with the inline-PTX SiLU (``ex2.approx.ftz``, ``rcp.approx.ftz``)."""
    const = {"ACT": ACT_CODES["silu"], "SLOPE": 0.0, "FAST_ACT": True, "REL": kc2.APPROX_REL, "INTERP": False, "BLOCK": 1024}
    sig = {"z_ptr": "*fp32", "a0_ptr": "*fp32", "n": "i32", **{k: "constexpr" for k in const}}
    k = triton.compile(
        ASTSource(fn=kc2._act0_kernel, signature=sig, constexprs=const), target=GPUTarget("cuda", cc, 32), options={"num_warps": 4}
    )
    ptx = k.asm["ptx"]
    assert "ex2.approx.ftz.f32" in ptx and "rcp.approx.ftz.f32" in ptx and "div.rn" not in ptx


def test_configs_cover_the_brief():
    acts = {a.name for tail, _, _ in CONFIGS.values() for stage, _ in parse_tail(tail).stages for a in stage}
    acts |= {a.name for tail, _, _ in CONFIGS.values() for a in parse_tail(tail).final}
    assert acts >= set(ACT_CODES) - {"identity"}
    depths = {len(parse_tail(t).stages) for t, _, _ in CONFIGS.values()}
    assert depths >= {1, 2, 3}
    skip = {(dtype, parse_tail(t).skip is not None) for t, dtype, _ in CONFIGS.values()}
    assert {(F32, True), (F64, True)} <= skip
