"""Triton kernel v2 for depth-1 centred MLP tails (``Linear -> act -> Linear``, the default tail;
docs/lmn.md, "How the fast paths compute it").

Same mathematics, flags and accuracy contract as v1 (:mod:`.triton_rowblock`; both import their shared jit
helpers from :mod:`.triton_common`; :mod:`.triton` chooses between them); what changes is how the work is laid out (each change kept because
the static estimate of ``bench --static-gpu`` went down, see ``benchmarks/RESULTS.md``):

- **dense rows**: a tile packs ``BP`` pairs ``(i, j0 .. j0+BP-1)`` x ``T`` points into ``M`` MMA rows
  (``T = 21``: 6 pairs = 126 of 128 rows, against v1's ``T`` padded to 32), and ``H`` is padded only to a
  multiple of ``BLOCK_K = 16`` (112 for 100), not to a power of two (chunks of 8, the tf32 MMA ``K``
  granularity, pad less, 104, but their per-chunk overhead made the static estimate 4% higher);
- **persistent, triangular**: a 1-D list of the tiles of the upper triangle (built on the host), walked by
  a grid of at most 8 programs per SM (no program exits at once, unlike v1's square grid);
- **tf32x3 by hand**: ``W`` is split into tf32 ``hi + lo`` once on the host (rounded to nearest); the
  activations are split in the kernel as Triton's tf32x3 does (``hi`` truncated, ``lo = a - hi`` truncated by
  the MMA) and ``a W = a_hi W_hi + a_hi W_lo + a_lo W_hi``. The interpreter multiplies in fp32, so it
  truncates the MMA operands explicitly (``INTERP``): the tests see the GPU's tf32 arithmetic;
- **fast SiLU** (fp32): ``x * rcp(1 + ex2(-x log2 e))`` with ``ex2.approx.ftz`` / ``rcp.approx.ftz`` (inline
  PTX). The interpreter cannot run PTX: it evaluates the same formula with exact operations and perturbs each
  approximate result by ``APPROX_REL`` with a sign taken from the input's bits, so the tests hold the formula
  to the contract with the approximation's error budget;
- **the start of the path once per sample**: ``a0 = act(z)`` comes from a small pre-pass (``_act0_kernel``)
  and anchors every row (``a - a0``, as v1's ``a_t - a_0``);
- **sums over t by MMA**: per-pair sums are ``[2 BPP, M] @ [M, PO]`` products with an exact 0/1 and integer
  (``2t - (T-1)``) selection matrix; a shift ``c ~ mean_t y`` is broadcast back with one exact 0/1 product and
  corrected for exactly (``_tile_stats``): only ``y - c`` and its square are elementwise; the moments are
  scaled by a power of two per pair and output (``sum_t |y - c|``, broadcast back by another exact 0/1 product).

Anything else (depth >= 2, a trailing activation, ``T > 128``, more than 64 outputs, a lowered tail's skip term)
runs v1: :func:`supported`.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from ..foundation.policy import check_fits
from ..foundation.tail import MLPTail
from .triton_common import (
    _SIGMOID,
    _SILU,
    _TANH,
    LaunchConfig,
    _act_offset_free,
    _centred_scale,
    _end_bounds,
    _pair_l,
    _sat_bounds,
    _slope_bound,
)
from .triton_rowblock import kernel_is_interpreted, unsupported_reason
from .triton_rowblock import launch_config as _v1_launch_config

#: Relative error the interpreter's emulation gives each approximate ``ex2`` / ``rcp``: an assumed budget of 2-4 fp32
#: ulp (the PTX ISA's stated bounds for ``ex2.approx.ftz.f32`` / ``rcp.approx.ftz.f32`` are of that order); not
#: checked on hardware yet (no GPU lent): compare v2 with v1 on a GPU before relying on it.
APPROX_REL = 2.0**-22
#: Largest ``T`` v2 packs (one tile holds at least one pair of ``T`` rows, ``M <= 128``).
MAX_T = 128
BLOCK_K = 16
#: Most outputs v2 runs (``PO <= 64``): with ``p = 113`` logits (``PO = 128``) its ``[M, PO]`` accumulator spills on
#: sm_90 and sm_80 (triton 3.9: 40 bytes at 4 warps, tf32x3; triton 3.6: 64-136 bytes even at 8 warps and 32-row
#: "ieee" tiles), where v1 compiles without spills: wider tails run v1 (tests/kernels/test_triton_compile.py, ``*_o113*``).
MAX_OUT = 64


@triton.jit
def _tf32(x):
    """``x`` truncated to tf32 (10-bit mantissa): what a tf32 tensor-core product reads of an fp32 operand."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _hw(x, INTERP: tl.constexpr):
    """The operand a tf32 MMA sees: the interpreter multiplies in fp32, so it truncates explicitly."""
    if INTERP:
        x = _tf32(x)
    return x


@triton.jit
def _approx(y, x, REL: tl.constexpr):
    """Interpreter stand-in for an approximate op: ``y (1 +- REL)``, the sign from a bit of ``x``."""
    s = ((x.to(tl.uint32, bitcast=True) >> 7) & 1).to(tl.float32) * 2.0 - 1.0
    return y * (1.0 + s * REL)


@triton.jit
def _silu_fast(x, INTERP: tl.constexpr, REL: tl.constexpr):
    """``x / (1 + e^-x)`` as ``x * rcp(1 + ex2(-x log2 e))``: PTX approx ftz, or the interpreter's emulation."""
    u = x * -1.4426950408889634
    if not INTERP:
        e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [u], dtype=tl.float32, is_pure=True, pack=1)
        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [1.0 + e], dtype=tl.float32, is_pure=True, pack=1)
    else:
        e = _approx(tl.exp2(u), u, REL)
        d = 1.0 + e
        r = _approx(1.0 / d, d, REL)
    return x * r


@triton.jit
def _act_v2(x, ref, ACT: tl.constexpr, SLOPE: tl.constexpr, FAST_ACT: tl.constexpr, REL: tl.constexpr, INTERP: tl.constexpr):
    """v1's offset-free activation, or (``FAST_ACT``, fp32) the fast SiLU."""
    if FAST_ACT and (ACT == _SILU):
        a = _silu_fast(x, INTERP, REL)
    else:
        a = _act_offset_free(x, ref, ACT, SLOPE)
    return a


@triton.jit
def _mma(a, w_hi, w_lo, acc, HILO: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr):
    """``acc + a @ w``: ``HILO``: three tf32 products ``a_hi w_hi + a_hi w_lo + a_lo w_hi`` (``w`` split on the host,
    ``a_hi`` truncated as Triton's tf32x3 does, ``a_lo = a - a_hi`` truncated by the MMA), else one dot."""
    if HILO:
        a_hi = _tf32(a)
        a_lo = _hw(a - a_hi, INTERP)
        acc = tl.dot(a_hi, w_lo, acc, input_precision="tf32")
        acc = tl.dot(a_lo, w_hi, acc, input_precision="tf32")
        acc = tl.dot(a_hi, w_hi, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, w_hi, acc, input_precision=PREC, out_dtype=acc.dtype)
    return acc


@triton.jit
def _row_sums(sel, y, HILO: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr):
    """``sel @ y`` (``sel`` exact in tf32: 0/1 and small integers), ``y`` split in two tf32 halves when ``HILO``
    (``y_lo`` truncated by the MMA: ``2^-20 |y|`` at most)."""
    if HILO:
        y_hi = _tf32(y)
        s = tl.dot(sel, _hw(y - y_hi, INTERP), input_precision="tf32")
        s = tl.dot(sel, y_hi, s, input_precision="tf32")
    else:
        s = tl.dot(sel, y, input_precision=PREC, out_dtype=y.dtype)
    return s


@triton.jit
def _pow2_pair(s, DT: tl.constexpr):
    """``2^floor(log2 s)`` (1 where ``s <= 0``), clamped to the normal range with its inverse (fp32 ``2^-126 .. 2^126``,
    fp64 ``2^-1022 .. 2^1022``): both are exact tf32 / fp64 MMA operands (no subnormal to flush) and exact divisors."""
    if DT == tl.float64:
        lo: tl.constexpr = -1022.0
    else:
        lo: tl.constexpr = -126.0
    e = tl.floor(tl.log2(tl.where(s > 0.0, s, 1.0)))
    e = tl.minimum(tl.maximum(e, lo), -lo)
    return tl.exp2(e).to(DT)


@triton.jit
def _tile_stats(y, r_p, sel, T: tl.constexpr, BPP: tl.constexpr, HILO: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr):
    """Per pair ``sum_t yc^2`` and ``sum_t lc yc`` (``[BPP, PO]``, ``lc = 2t - (T-1)``) of the tile's ``y [M, PO]``,
    divided by ``p2^2`` and ``p2`` (the third result, ``[BPP, PO]``: per pair and output, the power of two at or below
    ``sum_t |y - c|``, clamped to the normal range).

    ``sel [2 BPP, M]``: rows ``p`` select pair ``p``'s rows (1), rows ``BPP + p`` weight them by ``lc``. ``y`` is
    shifted by ``c ~ mean_t y``, the same for every row of a pair (one plain product each way: ``c`` need not be
    exact), then divided by its pair's ``p2`` (broadcast back to the pair's rows by an exact 0/1 product: ``|y - c| / p2
    < 2``), and ``sum_t (y - c)`` corrects ``sum_t (y - c)^2`` exactly: ``sum_t yc^2 = sum_t (y - c)^2 - (sum_t (y - c))^2
    / T``; ``sum_t lc = 0``. The scale was one per tile and output (the max over every row, the padding pairs' rows on
    ``z_j = 0`` included): a pair whose variation was small beside the tile's largest had its squares underflow (``ss =
    0``, the constant rule: fp64 GELU under a bias of -39.7 read ``r2 = 1``, 0.86 off) or go subnormal (fp32 tanh, 0.046
    off unflagged; docs/lmn.md, "Accuracy in the corners").
    """
    PO: tl.constexpr = y.shape[1]
    o_s = tl.arange(0, 2 * BPP)
    pick = (r_p[:, None] == o_s[None, :]) & (o_s < BPP)[None, :]  # [M, 2 BPP]: row -> its pair
    one = tl.where(pick, 1.0, 0.0).to(y.dtype)
    back = tl.where(pick, 1.0 / T, 0.0).to(y.dtype)
    if HILO:
        s1 = tl.dot(sel, _hw(y, INTERP), input_precision="tf32")
        c = tl.dot(_hw(back, INTERP), _hw(s1, INTERP), input_precision="tf32")  # [M, PO]
    else:
        c = tl.dot(back, tl.dot(sel, y, input_precision=PREC, out_dtype=y.dtype), input_precision=PREC, out_dtype=y.dtype)
    yc = y - c
    if HILO:
        s0 = tl.dot(sel, _hw(tl.abs(yc), INTERP), input_precision="tf32")  # [2 BPP, PO]: a magnitude, tf32 is enough
    else:
        s0 = tl.dot(sel, tl.abs(yc), input_precision=PREC, out_dtype=y.dtype)
    p2 = _pow2_pair(s0, y.dtype)  # rows >= BPP (lc-weighted) are picked by no row
    if HILO:
        yc = yc * tl.dot(one, 1.0 / p2, input_precision="tf32")  # exact: one 1 per row, powers of two
    else:
        yc = yc * tl.dot(one, 1.0 / p2, input_precision=PREC, out_dtype=y.dtype)
    s2 = tl.reshape(_row_sums(sel, yc, HILO, PREC, INTERP), [2, BPP, PO])
    s2a, s2b = tl.split(tl.permute(s2, (1, 2, 0)))  # sum yc, sum lc yc
    s3 = tl.reshape(_row_sums(sel, yc * yc, HILO, PREC, INTERP), [2, BPP, PO])
    s3a, _s3b = tl.split(tl.permute(s3, (1, 2, 0)))
    p2a, _p2b = tl.split(tl.permute(tl.reshape(p2, [2, BPP, PO]), (1, 2, 0)))
    return s3a - s2a * s2a / T, s2b, p2a


@triton.jit
def _pair_bounds(
    z_ptr,
    a0_ptr,
    i,
    j0,
    N,
    K0: tl.constexpr,
    BP: tl.constexpr,
    BPP: tl.constexpr,
    BLOCK_KE: tl.constexpr,
    ACT: tl.constexpr,
    SLOPE: tl.constexpr,
    FAST_ACT: tl.constexpr,
    REL: tl.constexpr,
    INTERP: tl.constexpr,
    H_LAST: tl.constexpr,
    T: tl.constexpr = 21,
):
    """Per pair of the tile: ``max_h m_h``, ``sum_h m_h^2`` of v1's depth-1 rounding scale (``_end_bounds``, exact
    activation) and ``max_h |z_jh - z_ih|``, from the path's ends only: ``[BPP, BLOCK_KE]`` chunks of ``z``."""
    DT = z_ptr.dtype.element_ty
    o_p = tl.arange(0, BPP)
    p_j = j0 + o_p
    p_m = (o_p < BP) & (p_j < N)
    b_mmax = tl.zeros([BPP], dtype=DT)
    b_msq = tl.zeros([BPP], dtype=DT)
    b_dn = tl.zeros([BPP], dtype=DT)
    for k0 in range(0, K0, BLOCK_KE):
        o_k = k0 + tl.arange(0, BLOCK_KE)
        b_zi = tl.load(z_ptr + i.to(tl.int64) * K0 + o_k, mask=o_k < K0, other=0.0)  # [BKE]
        b_zj = tl.load(
            z_ptr + p_j.to(tl.int64)[:, None] * K0 + o_k[None, :], mask=p_m[:, None] & (o_k < K0)[None, :], other=0.0
        )  # [BPP, BKE]
        b_ai = tl.load(a0_ptr + i.to(tl.int64) * K0 + o_k, mask=o_k < K0, other=0.0)
        b_aj = _act_v2(b_zj, b_zi[None, :], ACT, SLOPE, FAST_ACT, REL, INTERP)
        if (ACT == _SIGMOID) or (ACT == _TANH):  # saturating: pointwise over the T points (_sat_bounds)
            b_amax = tl.zeros([BPP, BLOCK_KE], dtype=DT)
            b_smax = tl.zeros([BPP, BLOCK_KE], dtype=DT)
            for t in range(T):  # a runtime loop: unrolled (static_range) it spilled 168 B fp32 / 1408 B fp64 on sm_90
                b_lam = (t + tl.zeros([1], dtype=DT)) / (T - 1)
                b_x = b_zi[None, :] + b_lam[None, :] * (b_zj - b_zi[None, :])
                b_amax = tl.maximum(b_amax, tl.abs(_act_v2(b_x, b_zi[None, :], ACT, SLOPE, FAST_ACT, REL, INTERP)))
                b_smax = tl.maximum(b_smax, _slope_bound(b_x, b_x, ACT, SLOPE))
            b_m = _sat_bounds(b_amax, b_smax, b_zi, b_zj, o_k, H_LAST)
        else:
            b_m = _end_bounds(b_zi, b_zj, b_ai, b_aj, o_k, ACT, H_LAST)
        b_mmax = tl.maximum(b_mmax, tl.max(b_m, axis=1))
        b_msq += tl.sum(b_m * b_m, axis=1)
        b_dn = tl.maximum(b_dn, tl.max(tl.abs(b_zj - b_zi[None, :]), axis=1))
    return b_mmax, b_msq, b_dn


@triton.jit
def _act0_kernel(
    z_ptr,
    a0_ptr,
    n,
    ACT: tl.constexpr,
    SLOPE: tl.constexpr,
    FAST_ACT: tl.constexpr,
    REL: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``a0 = act(z)`` (offset free relative to ``z`` itself) for ``n`` elements: the path's start, once per sample."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    z = tl.load(z_ptr + o, mask=o < n, other=0.0)
    tl.store(a0_ptr + o, _act_v2(z, z, ACT, SLOPE, FAST_ACT, REL, INTERP), mask=o < n)


@triton.jit
def _selection(r_p, T: tl.constexpr, BP: tl.constexpr, BPP: tl.constexpr, DT: tl.constexpr):
    """``[2 BPP, M]``: rows ``p`` select pair ``p``'s rows (1), rows ``BPP + p`` weight them by ``lc = 2t - (T-1)``."""
    M: tl.constexpr = r_p.shape[0]
    o_r = tl.arange(0, M)
    o_s = tl.arange(0, 2 * BPP)
    same = (r_p[None, :] == (o_s % BPP)[:, None]) & (r_p < BP)[None, :]  # [2 BPP, M]
    lc = (2 * (o_r % T) - (T - 1)).to(DT)
    return tl.where(same, tl.where((o_s < BPP)[:, None], 1.0, lc[None, :]), 0.0).to(DT)


@triton.jit
def _connectivity_v2_kernel(
    z_ptr,
    a0_ptr,
    tiles_ptr,
    w_ptr,
    wlo_ptr,
    wn_ptr,
    out_ptr,
    N,
    n_tiles,
    T: tl.constexpr,
    M: tl.constexpr,
    BP: tl.constexpr,
    BPP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    K0: tl.constexpr,
    PO: tl.constexpr,
    O: tl.constexpr,
    ACT: tl.constexpr,
    SLOPE: tl.constexpr,
    FAST_ACT: tl.constexpr,
    REL: tl.constexpr,
    INTERP: tl.constexpr,
    HILO: tl.constexpr,
    PREC: tl.constexpr,
    LL: tl.constexpr,
    CONST_TOL: tl.constexpr,
    EPS: tl.constexpr,
    FLAG: tl.constexpr,
    FLAG_KAPPA: tl.constexpr,
    FLAGGED: tl.constexpr,
    H_LAST: tl.constexpr,
    BLOCK_KE: tl.constexpr,
):
    """``L[i, j] = L[j, i]`` for the pairs of the tiles ``pid, pid + programs, ...`` of ``tiles [n_tiles, 2] = (i, j0)``.

    A tile's row ``r`` is pair ``p = r // T`` (``j = j0 + p``), point ``t = r % T``; rows of ``p >= BP`` or
    ``j >= N`` are computed on zeros and left out of every sum. Per pair the statistics are v1's depth-1
    centred ones: ``y = a W^T`` (no bias; ``a = act(z_i + lam_t (z_j - z_i))``), ``yc = y - mean_t y``,
    ``r2 = (sum lc yc)^2 / (sum yc^2 sum lc^2)``, the scale ``m_h`` from the path's ends and the flag (``_pair_l``).
    ``w``/``wlo``: ``W^T`` ``[K0, PO]`` (its tf32 hi and lo parts when ``HILO``; else ``wlo`` is unused), ``wn [2, PO]``
    the row norms of ``W``.
    """
    DT = z_ptr.dtype.element_ty
    o_r = tl.arange(0, M)
    r_p = o_r // T
    r_lam = (o_r % T).to(DT) / (T - 1)  # [M]
    o_po = tl.arange(0, PO)
    o_kb = tl.arange(0, BLOCK_K)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        i = tl.load(tiles_ptr + 2 * tile)
        j0 = tl.load(tiles_ptr + 2 * tile + 1)
        r_j = j0 + r_p
        r_m = (r_p < BP) & (r_j < N)
        p_zi = z_ptr + i.to(tl.int64) * K0 + o_kb  # [BK] pointers
        p_a0 = a0_ptr + i.to(tl.int64) * K0 + o_kb
        p_zj = z_ptr + r_j.to(tl.int64)[:, None] * K0 + o_kb[None, :]  # [M, BK] pointers
        acc = tl.zeros([M, PO], dtype=DT)
        for k0 in range(0, K0, BLOCK_K):
            b_zi = tl.load(p_zi + k0)  # [BK]
            b_zj = tl.load(p_zj + k0, mask=r_m[:, None], other=0.0)  # [M, BK]
            b_x = b_zi[None, :] + r_lam[:, None] * (b_zj - b_zi[None, :])  # [M, BK]
            b_a0 = tl.load(p_a0 + k0)  # a at t = 0: [BK]
            b_a = _act_v2(b_x, b_zi[None, :], ACT, SLOPE, FAST_ACT, REL, INTERP) - b_a0[None, :]  # [M, BK]
            b_w = tl.load(w_ptr + (k0 + o_kb)[:, None] * PO + o_po[None, :])  # [BK, PO]
            b_wlo = b_w
            if HILO:
                b_wlo = tl.load(wlo_ptr + (k0 + o_kb)[:, None] * PO + o_po[None, :])
            acc = _mma(b_a, b_w, b_wlo, acc, HILO, PREC, INTERP)
        # the moments first: acc is dead before the bounds' loops (the other order spilled 8-64 bytes on sm_90 / sm_80
        # once the moments were scaled per pair)
        b_ss, b_cov, b_p2 = _tile_stats(acc, r_p, _selection(r_p, T, BP, BPP, DT), T, BPP, HILO, PREC, INTERP)
        b_mmax, b_msq, b_dn = _pair_bounds(z_ptr, a0_ptr, i, j0, N, K0, BP, BPP, BLOCK_KE, ACT, SLOPE, FAST_ACT, REL, INTERP, H_LAST, T)
        b_scale = _centred_scale(b_mmax, b_msq, wn_ptr, PO) / b_p2
        b_tiny = None
        if DT == tl.float64:  # the underflow policy (_policy.UNDERFLOW_TINY): std <= 1e-290 sum_h |W_kh| is constant
            b_tiny = 1e-290 * tl.load(wn_ptr + o_po)[None, :] / b_p2
        b_l = _pair_l(b_ss, b_cov, LL, b_scale, b_dn, T, O, CONST_TOL, EPS, FLAG, FLAG_KAPPA, FLAGGED, b_tiny)
        p_j = j0 + tl.arange(0, BPP)
        p_m = (tl.arange(0, BPP) < BP) & (p_j < N)
        p64 = p_j.to(tl.int64)
        i64 = i.to(tl.int64)
        tl.store(out_ptr + i64 * N + p64, b_l.to(out_ptr.dtype.element_ty), mask=p_m)
        tl.store(out_ptr + p64 * N + i64, b_l.to(out_ptr.dtype.element_ty), mask=p_m)


# --------------------------------------------------------------------------------------------
# host side


def supported(spec: MLPTail, n_lambda: int) -> bool:
    """Whether v2 runs ``spec``: a non-affine depth-1 tail without a trailing activation, ``T <= MAX_T``, at most
    :data:`MAX_OUT` outputs, and without a skip term (a lowered transformer tail's ``lam (u_j - u_i)`` runs in v1)."""
    return (
        not spec.is_affine
        and unsupported_reason(spec) is None
        and len(spec.stages) == 1
        and not spec.final
        and n_lambda <= MAX_T
        and spec.skip is None
        and spec.stages[0][1].out_features <= MAX_OUT
    )


@functools.cache
def min_dot_k(fp64: bool) -> int:
    """``K`` chunk of the fp64 and fp32 "ieee" tiles: 8, or the smallest ``tl.dot`` ``K`` the installed Triton compiles
    for NVIDIA if larger (triton 3.9: 8 fp32 / 4 fp64; triton 3.6, the lent GPU machines' version: 16 for both).
    The padded pair count ``BPP`` keeps ``2 BPP`` (another dot's ``K``) at least this large too."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import min_dot_size

        ty = tl.float64 if fp64 else tl.float32
        return max(8, int(min_dot_size(GPUTarget("cuda", 90, 32))(ty, ty)[2]))
    except Exception:  # another Triton layout: the bound every version accepts
        return BLOCK_K


def launch_config(
    spec: MLPTail,
    dtype: torch.dtype,
    n_lambda: int,
    *,
    interpret: bool,
    input_precision: str | None = None,
    n: int | None = None,
    arch: int | None = None,
):
    """v2's :class:`kernels.triton_common.LaunchConfig` (v1's checks, activation codes and flag constants).

    ``M`` rows hold ``BP = min(8, M // T)`` pairs (``T = 21``: 128 rows, 6 pairs); ``H`` is padded to
    ``BLOCK_K``. The interpreter takes bigger tiles (up to 48 pairs, ``min(48, n - 1)``) and ``H`` in one
    chunk: fewer Python-level steps. ``arch`` (as v1's; ``None``: 90): on sm_80 the tf32x3 tiles read the path's
    ends (``_pair_bounds``) in ``[BPP, 64]`` chunks, and the fp32 "ieee" tiles run on 8 warps on both archs: since
    the moments became scale-free (``_tile_stats``) they spilled otherwise (8 warps do not help the tf32x3 tile:
    it still spills on sm_80, and the ``[2 BPP, M]`` sums' MMAs would be repeated by the extra warps).
    """
    if not supported(spec, n_lambda):
        raise ValueError("v2 runs depth-1 tails without a trailing activation and n_lambda <= 128; use v1")
    v1 = _v1_launch_config(spec, dtype, n_lambda, interpret=False, input_precision=input_precision)
    c1 = v1.constexprs
    fp64 = dtype == torch.float64
    prec = c1["PREC"]
    hilo = (not fp64) and prec != "ieee"
    po = c1["PO"]
    cap = 4096 if fp64 else 8192
    if interpret:  # big tiles: few Python-level programs
        m = triton.next_power_of_2(n_lambda * min(48, max(1, (n or 49) - 1)))
        bp = m // n_lambda
    else:  # fp64 and fp32 "ieee" (no tf32 split, FMA-heavy): 64-row tiles keep them in registers
        rows = 128 if hilo else 64
        m = max(triton.next_power_of_2(n_lambda), min(rows, triton.next_power_of_2(8 * n_lambda), cap // po), 16)
        bp = min(8, m // n_lambda)
    h = v1.widths[0]
    block_k = max(BLOCK_K, triton.next_power_of_2(h)) if interpret else (BLOCK_K if hilo else min_dot_k(fp64))
    k0 = triton.cdiv(h, block_k) * block_k
    sm80_hilo = hilo and not interpret and (arch or 90) < 90
    # pairs padded to a power of two; 2 BPP is the K of the per-pair sums' broadcast back (``_tile_stats``)
    bpp = triton.next_power_of_2(bp) if interpret else max(triton.next_power_of_2(bp), min_dot_k(fp64) // 2)
    const = {
        "T": n_lambda,
        "M": m,
        "BP": bp,
        "BPP": bpp,
        "BLOCK_K": block_k,
        "K0": k0,
        "PO": po,
        "O": c1["O"],
        "ACT": c1["ACT1"],
        "SLOPE": c1["SLOPE1"],
        "FAST_ACT": not fp64,
        "REL": APPROX_REL,
        "INTERP": interpret,
        "BLOCK_KE": min(64 if sm80_hilo else 128, triton.next_power_of_2(k0)),
        "HILO": hilo,
        "PREC": prec,
        "LL": (n_lambda - 1) * n_lambda * (n_lambda + 1) / 3.0,
        **{k: c1[k] for k in ("CONST_TOL", "EPS", "FLAG", "FLAG_KAPPA", "FLAGGED", "H_LAST")},
    }
    ptr = "*fp64" if fp64 else "*fp32"
    signature = {name: ptr for name in POINTER_ARGS}
    signature["tiles_ptr"] = "*i32"
    signature.update({"N": "i32", "n_tiles": "i32"})
    signature.update({name: "constexpr" for name in const})
    # the fp64 / "ieee" tiles with a 16-wide K chunk (triton 3.6) spill at 4 warps: 8 halve each thread's share;
    # so do the fp32 "ieee" tiles with an 8-wide one (triton 3.9) since the scale-free moments
    # (tests/kernels/test_triton_compile.py: 8 bytes of spills on sm_80, 32 on sm_90, on 4 warps)
    warps = 8 if (not (interpret or hilo) and (block_k > 8 or not fp64)) else 4
    if sm80_hilo and h >= 512 and min_dot_k(fp64) >= 16:  # triton 3.6, wide tf32x3 tile on sm_80: 8 bytes spilled on 4
        warps = 8
    return LaunchConfig(const, signature, v1.widths, (k0, po), warps, 1)


POINTER_ARGS = ("z_ptr", "a0_ptr", "tiles_ptr", "w_ptr", "wlo_ptr", "wn_ptr", "out_ptr")


def pair_tiles(n: int, bp: int, device=None) -> torch.Tensor:
    """``[n_tiles, 2]`` int32 ``(i, j0)``: the upper triangle's pairs ``(i, j0 .. j0+bp-1)``, row by row.

    8 bytes per tile of ``bp`` pairs: at ``bp = 6`` about 1/6 of ``L``'s own fp32 memory (180 MB at N = 16384;
    :func:`connectivity_packed_mma` counts it in its memory check)."""
    i = torch.arange(n - 1)
    per_row = (n - 1 - i + bp - 1) // bp
    rows = torch.repeat_interleave(i, per_row)
    first = torch.cumsum(per_row, 0) - per_row
    j0 = rows + 1 + (torch.arange(len(rows)) - torch.repeat_interleave(first, per_row)) * bp
    return torch.stack([rows, j0], 1).to(torch.int32).contiguous().to(device)


def tf32_split(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)``: ``w`` rounded to tf32 (nearest, ties away, as ``_tf32_rna``) and the rest, also rounded."""

    def rna(x):
        b = x.contiguous().view(torch.int32)
        return ((b + 0x1000) & -0x2000).view(torch.float32)

    hi = rna(w)
    return hi, rna(w - hi)


def default_programs(n_tiles: int, device: torch.device) -> int:
    """Persistent grid size: 8 programs per SM (the HW scheduler balances the tail), at most one per tile."""
    if device.type != "cuda":
        return n_tiles
    return max(1, min(n_tiles, 8 * torch.cuda.get_device_properties(device).multi_processor_count))


def connectivity_packed_mma(
    z: torch.Tensor, spec: MLPTail, n_lambda: int, *, input_precision: str | None = None, config=None, programs: int | None = None
) -> torch.Tensor:
    """``L`` from ``z = spec.absorb(h)`` with the v2 kernel (same contract as
    :func:`.triton_rowblock.connectivity_rowblock`, for the tails :func:`supported` accepts). ``programs``:
    persistent grid size (default :func:`default_programs`)."""
    n = z.shape[0]
    dtype, dev = z.dtype, z.device
    cfg = config or launch_config(spec, dtype, n_lambda, interpret=kernel_is_interpreted(), input_precision=input_precision, n=n)
    c = cfg.constexprs
    elem = z.element_size()  # refuse before allocating: L, z and a0 padded to K0, the tile list (8 B per tile)
    check_fits(n * n * elem, 2 * n * c["K0"] * elem + 8 * (n * (n - 1) // 2 // c["BP"] + n), dev)
    zp = torch.zeros(n, c["K0"], dtype=dtype, device=dev)
    zp[:, : z.shape[1]] = z
    lin = spec.stages[0][1]
    w = torch.zeros(c["K0"], c["PO"], dtype=dtype, device=dev)
    w[: lin.in_features, : lin.out_features] = lin.weight.detach().t().to(dtype)
    w, w_lo = tf32_split(w) if c["HILO"] else (w, w)
    w_last = lin.weight.detach().to(dtype)
    wn = torch.zeros(2, c["PO"], dtype=dtype, device=dev)  # |W_k|_1, |W_k|_2
    wn[0, : w_last.shape[0]] = w_last.abs().sum(dim=1)
    wn[1, : w_last.shape[0]] = torch.linalg.vector_norm(w_last, dim=1)
    a0 = torch.empty_like(zp)
    act0 = {k: c[k] for k in ("ACT", "SLOPE", "FAST_ACT", "REL", "INTERP")}
    tiles = pair_tiles(n, c["BP"], dev)
    grid = (programs or default_programs(tiles.shape[0], dev),)
    out = torch.full((n, n), float("nan"), dtype=dtype, device=dev)
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        _act0_kernel[(triton.cdiv(zp.numel(), 1024),)](zp, a0, zp.numel(), **act0, BLOCK=1024)
        _connectivity_v2_kernel[grid](
            zp, a0, tiles, w, w_lo, wn, out, n, tiles.shape[0], **c, num_warps=cfg.num_warps, num_stages=cfg.num_stages
        )
    out.diagonal().fill_(1.0)
    return out
