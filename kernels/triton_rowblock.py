"""Fused Triton kernel v1 ("row block") for the linear connectivity matrix of an MLP tail (docs/lmn.md, "How the fast
paths compute it"); which of the two Triton kernels runs is decided in :mod:`.triton`.

One launch computes every ``L_ij`` (``i < j``) of a normalised MLP tail
(``grokfast_metrics.foundation.tail.MLPTail``) from ``z = spec.absorb(h)`` (``N x H0``): the ``T x H0``
interpolated activations of a pair are formed in registers, run through the remaining Linears
with ``tl.dot``, centred over ``t`` and reduced to ``r2`` per output and then to ``L_ij``.
Only ``L`` (``N x N``) is written to memory. A lowered transformer tail (``grokfast_metrics._lower``: one position
of ``h`` selected, ``z = W_in h + b`` absorbed, one folded output matrix) adds its skip term ``lam (u_j - u_i)``,
``u = W_skip h`` computed once per sample in float64, to the centred outputs (``SKIP``).

Tiling. A program owns row ``i`` and ``BLOCK_J`` consecutive columns ``j = i+1+jb*BLOCK_J+...``
(grid ``(N, cdiv(N-1, BLOCK_J))``; programs past the last column do nothing). Its ``BLOCK_J``
pairs give ``M = BLOCK_J * T_PAD`` rows (``T`` padded to a power of two; padded ``t`` are masked
out of the statistics). The first remaining Linear loops over ``K`` (the width of ``z``) in
``BLOCK_K`` chunks. Linears 1-2-3 are chained in column blocks: ``BLOCK_N1`` output columns of
Linear 1 feed Linear 2, whose ``BLOCK_N2`` output columns feed Linear 3 (Linear 1 is recomputed
``P2 / BLOCK_N2`` times, 1 unless layer 2 is wide), so no ``[M, wide]`` intermediate lives in
registers; only the last accumulator (and Linear 4's input) is full width. Weights are packed on
the host as zero-padded ``W^T`` (``[K_PAD, N_PAD]``), so padded columns contribute exactly 0 and
only the pair dimension needs masks. Every ``tl.dot`` accumulates in the compute dtype.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..foundation.policy import CONST_RTOL, FLAG_KAPPA, FLAGGED
from ..foundation.tail import IDENTITY, MLPTail
from .triton_common import (
    _SIGMOID,
    _TANH,
    LaunchConfig,
    _act,
    _act_offset_free,
    _centred_input,
    _centred_scale,
    _end_bounds,
    _pair_l,
    _pow2_above,
    _sat_bounds,
    _slope_bound,
)

#: Remaining Linears (after the absorbed ones) the kernel supports.
MAX_DEPTH = 4
#: Widest layer (padded to a power of two) the kernel supports.
MAX_WIDTH = 1024
#: Default ``tl.dot`` precision for fp32 (fp64 always uses ``"ieee"``), see :func:`connectivity_rowblock`.
DEFAULT_FP32_PRECISION = "tf32x3"


# --------------------------------------------------------------------------------------------
# kernel


@triton.jit
def _first_linear(
    z_ptr,
    w1_ptr,
    c1_ptr,
    i,
    o_j,
    m_j,
    b_lam,
    n0,
    K0: tl.constexpr,
    P1: tl.constexpr,
    BN: tl.constexpr,
    T_PAD: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACT1: tl.constexpr,
    SLOPE1: tl.constexpr,
    PREC: tl.constexpr,
    LAST: tl.constexpr = False,
    H_LAST: tl.constexpr = 0,
    STATS: tl.constexpr = False,
):
    """``W1 act1(z_i + lam (z_j - z_i)) + c1`` for output columns ``n0 .. n0+BN``: ``[BLOCK_J * T_PAD, BN]``.

    ``LAST`` (W1 is the tail's last Linear, no trailing activation): ``W1 (a - a_0)`` instead, no bias
    (``a_0 = act1(z_i)``, offset free for sigmoid/tanh), and per pair ``max_h m_h``, ``sum_h m_h^2`` with
    ``m_h = max(|a_ih|, |a_jh|, |act1(x*)| if the path reaches x*) (1 + g(max(|z_ih|, |z_jh|)))`` >= the torch
    path's ``max_t |a_th| (1 + g_th)`` (``|x_t|`` is at most its ends; monotone units peak at an end). ``STATS``
    (W1 is the last Linear, an activation follows): the same statistics of the plain ``a``. Otherwise they are 0.
    Last: ``max_h |z_jh - z_ih|`` per pair (0: an exactly constant path).
    """
    DT = z_ptr.dtype.element_ty
    o_n = n0 + tl.arange(0, BN)
    b_acc = tl.zeros([BLOCK_J * T_PAD, BN], dtype=DT)  # [M, BN]
    b_mmax = tl.zeros([BLOCK_J], dtype=DT)
    b_msq = tl.zeros([BLOCK_J], dtype=DT)
    b_dn = tl.zeros([BLOCK_J], dtype=DT)
    for k0 in range(0, K0, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        b_zi = tl.load(z_ptr + i.to(tl.int64) * K0 + o_k)  # [BLOCK_K]
        p_zj = z_ptr + o_j.to(tl.int64)[:, None] * K0 + o_k[None, :]
        b_zj = tl.load(p_zj, mask=m_j[:, None], other=0.0)  # [BLOCK_J, BLOCK_K]
        b_d = b_zj - b_zi[None, :]  # [BLOCK_J, BLOCK_K]
        b_dn = tl.maximum(b_dn, tl.max(tl.abs(b_d), axis=1))
        b_x = b_zi[None, None, :] + b_lam[None, :, None] * b_d[:, None, :]  # [BLOCK_J, T_PAD, BLOCK_K]
        b_xp = b_x  # pre-activation
        if LAST:
            b_ai = _act_offset_free(b_zi, b_zi, ACT1, SLOPE1)  # [BLOCK_K]  a at t = 0
            b_x = _act_offset_free(b_x, b_zi[None, None, :], ACT1, SLOPE1) - b_ai[None, None, :]  # padded t: masked later
            b_aj = _act_offset_free(b_zj, b_zi[None, :], ACT1, SLOPE1)  # [BLOCK_J, BLOCK_K]
        else:
            b_x = _act(b_x, ACT1, SLOPE1)
            b_ai = _act(b_zi, ACT1, SLOPE1)
            b_aj = _act(b_zj, ACT1, SLOPE1)
        if (LAST or STATS) and ((ACT1 == _SIGMOID) or (ACT1 == _TANH)):  # saturating: pointwise (_sat_bounds)
            b_p = tl.abs(b_x + b_ai[None, None, :]) if LAST else tl.abs(b_x)  # |a| at the T points (LAST: offset free)
            b_in = (b_lam <= 1.0)[None, :, None]  # padded t (lam > 1) left out
            b_amax = tl.max(tl.where(b_in, b_p, 0.0), axis=1)
            b_smax = tl.max(tl.where(b_in, _slope_bound(b_xp, b_p, ACT1, SLOPE1), 0.0), axis=1)
            b_m = _sat_bounds(b_amax, b_smax, b_zi, b_zj, o_k, H_LAST)
            b_mmax = tl.maximum(b_mmax, tl.max(b_m, axis=1))
            b_msq += tl.sum(b_m * b_m, axis=1)
        elif LAST or STATS:
            b_m = _end_bounds(b_zi, b_zj, b_ai, b_aj, o_k, ACT1, H_LAST)
            b_mmax = tl.maximum(b_mmax, tl.max(b_m, axis=1))
            b_msq += tl.sum(b_m * b_m, axis=1)
        b_x = tl.reshape(b_x, [BLOCK_J * T_PAD, BLOCK_K])  # [M, BLOCK_K]
        b_w = tl.load(w1_ptr + o_k[:, None] * P1 + o_n[None, :])  # [BLOCK_K, BN]
        b_acc = tl.dot(b_x, b_w, b_acc, input_precision=PREC, out_dtype=b_acc.dtype)
    if not LAST:
        b_acc += tl.load(c1_ptr + o_n)[None, :]
    return b_acc, b_mmax, b_msq, b_dn


@triton.jit
def _dense(b_x, w_ptr, c_ptr, K: tl.constexpr, P: tl.constexpr, PREC: tl.constexpr):
    """``b_x @ W^T + c`` with ``W^T`` packed as ``[K, P]``: ``[M, K] -> [M, P]``."""
    o_k = tl.arange(0, K)
    o_n = tl.arange(0, P)
    b_w = tl.load(w_ptr + o_k[:, None] * P + o_n[None, :])  # [K, P]
    return tl.dot(b_x, b_w, input_precision=PREC, out_dtype=b_x.dtype) + tl.load(c_ptr + o_n)[None, :]


@triton.jit
def _connectivity_fwd_kernel(
    z_ptr,
    w1_ptr,
    c1_ptr,
    w2_ptr,
    c2_ptr,
    w3_ptr,
    c3_ptr,
    w4_ptr,
    c4_ptr,
    wn_ptr,
    u_ptr,
    out_ptr,
    N,
    T: tl.constexpr,
    T_PAD: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N1: tl.constexpr,
    BLOCK_N2: tl.constexpr,
    K0: tl.constexpr,
    P1: tl.constexpr,
    P2: tl.constexpr,
    P3: tl.constexpr,
    P4: tl.constexpr,
    PO: tl.constexpr,
    O: tl.constexpr,
    DEPTH: tl.constexpr,
    ACT1: tl.constexpr,
    SLOPE1: tl.constexpr,
    ACT2: tl.constexpr,
    SLOPE2: tl.constexpr,
    ACT3: tl.constexpr,
    SLOPE3: tl.constexpr,
    ACT4: tl.constexpr,
    SLOPE4: tl.constexpr,
    ACT_F: tl.constexpr,
    SLOPE_F: tl.constexpr,
    CONST_TOL: tl.constexpr,
    PREC: tl.constexpr,
    EPS: tl.constexpr,
    FLAG: tl.constexpr,
    FLAG_KAPPA: tl.constexpr,
    FLAGGED: tl.constexpr,
    CENTRED: tl.constexpr,
    H_LAST: tl.constexpr,
    SKIP: tl.constexpr,
):
    """``L[i, j] = L[j, i] = mean_k r2_k`` for row ``i`` and ``BLOCK_J`` columns ``j > i``.

    With ``lam_t = t / (T-1)``, ``x_0 = z_i + lam_t (z_j - z_i)``, ``x_l = W_l act_l(x_{l-1}) + c_l``
    (``l = 1..DEPTH``) and ``y = act_F(x_DEPTH)`` (``T x O``), per output ``k``::

        yc = y_k - mean_t y_k,  r2_k = (sum_t yc lc)^2 / (sum_t yc^2 * sum_t lc^2),  lc = lam - 1/2
        r2_k = 1                          if sqrt(mean_t yc^2) <= CONST_TOL * scale_k
        r2_k = clamp(r2_k, 0, 1)          otherwise

    ``CENTRED`` (no trailing activation, docs/lmn.md, "Accuracy contract"): the last Linear maps its input centred
    over ``t`` (depth 1: ``a_t - a_0``), without its bias, sigmoid/tanh just before it offset free, and
    ``scale_k = min(max_h m_h |W_k|_1, |m|_2 |W_k|_2) >= sum_h |W_kh| m_h`` (``m_h``: the rounding scale of
    ``compute.torch_paths._through``, depth 1 bounded from the path's ends). Otherwise (an activation follows
    the last Linear) ``scale_k = max_t |y_k| + max_t |act_F'(x_k)| (min(max_h m_h |W_k|_1, |m|_2 |W_k|_2) + |c_k|)``
    with ``m_h`` the same bound on the plain input (in fp32, for the flag; fp64: ``max_t |y_k|``).
    ``FLAG`` (fp32): a pair whose ``compute.torch_paths.pair_error_estimate`` of ``EPS * scale`` exceeds
    ``FLAG_KAPPA`` is written ``FLAGGED`` (``core`` recomputes it in fp64); an exactly constant path
    (``z_j == z_i``) is 1, never flagged.

    ``SKIP`` (a lowered transformer tail, ``CENTRED`` only): ``y_t += lam_t (u_j - u_i)`` with ``u = W_skip h``
    (``u [N, PO]`` float64, zero-padded): the difference is taken in float64 and rounded once to the compute
    dtype, and ``|u_j - u_i|`` joins ``scale_k`` (the C++ kernel's contract, ``connectivity_cpu.cpp`` ``run_rows``).

    Args (pointers): ``z [N, K0]`` (zero-padded), ``w_l [K_PAD_l, P_l]`` zero-padded ``W_l^T``,
    ``c_l [P_l]`` zero-padded biases, ``wn [2, PO]`` the last Linear's row norms ``|W_k|_1``, ``|W_k|_2``,
    ``u [N, PO]`` the skip term (``SKIP``), ``out [N, N]``. Unused layers (and ``u`` without ``SKIP``) get any pointer.
    """
    i = tl.program_id(0)
    jb = tl.program_id(1)
    j0 = i + 1 + jb * BLOCK_J
    if j0 < N:
        DT = z_ptr.dtype.element_ty
        o_j = j0 + tl.arange(0, BLOCK_J)  # [BLOCK_J]
        m_j = o_j < N
        o_t = tl.arange(0, T_PAD)  # [T_PAD]
        m_t = o_t < T
        b_lam = o_t.to(DT) / (T - 1)  # [T_PAD]

        # CENTRED (no trailing activation): the last Linear maps its centred input, no bias (docs/lmn.md, "Accuracy contract" (a));
        # b_mmax, b_msq: max_h m_h and sum_h m_h^2 of its input's rounding scale m_h (compute.torch_paths._through)
        b_mmax = tl.zeros([BLOCK_J], dtype=DT)
        b_msq = tl.zeros([BLOCK_J], dtype=DT)
        b_dn = tl.zeros([BLOCK_J], dtype=DT)  # max_h |z_jh - z_ih|
        # TRAIL (fp32, a trailing activation): the same statistics of the last Linear's plain input, for the flag
        TRAIL: tl.constexpr = FLAG and not CENTRED
        if DEPTH == 1:
            b_y, b_mmax, b_msq, b_dn = _first_linear(
                z_ptr,
                w1_ptr,
                c1_ptr,
                i,
                o_j,
                m_j,
                b_lam,
                0,
                K0,
                P1,
                P1,
                T_PAD,
                BLOCK_J,
                BLOCK_K,
                ACT1,
                SLOPE1,
                PREC,
                CENTRED,
                H_LAST,
                TRAIL,
            )  # [M, P1]
        else:
            # layer 1 -> 2 (-> 3) chained in column blocks: x1 cols [BLOCK_N1] feed x2 cols [BLOCK_N2],
            # which feed x3 [P3] when DEPTH >= 3 (layer 1 is recomputed P2 / BLOCK_N2 times).
            PY: tl.constexpr = P2 if DEPTH == 2 else P3
            b_y = tl.zeros([BLOCK_J * T_PAD, PY], dtype=DT)  # [M, PY]
            for n2 in range(0, P2, BLOCK_N2):
                o_n2 = n2 + tl.arange(0, BLOCK_N2)
                b_x2 = tl.zeros([BLOCK_J * T_PAD, BLOCK_N2], dtype=DT)  # [M, BLOCK_N2]
                for n1 in range(0, P1, BLOCK_N1):
                    b_h, _m, _s, b_dn = _first_linear(
                        z_ptr, w1_ptr, c1_ptr, i, o_j, m_j, b_lam, n1, K0, P1, BLOCK_N1, T_PAD, BLOCK_J, BLOCK_K, ACT1, SLOPE1, PREC
                    )  # [M, BLOCK_N1]
                    if (CENTRED or TRAIL) and DEPTH == 2:
                        b_h3, b_m, b_s = _centred_input(tl.reshape(b_h, [BLOCK_J, T_PAD, BLOCK_N1]), ACT2, SLOPE2, T, n1, H_LAST, CENTRED)
                        b_h = tl.reshape(b_h3, [BLOCK_J * T_PAD, BLOCK_N1])
                        b_mmax = tl.maximum(b_mmax, b_m)
                        b_msq += b_s
                    else:
                        b_h = _act(b_h, ACT2, SLOPE2)
                    o_n1 = n1 + tl.arange(0, BLOCK_N1)
                    b_w = tl.load(w2_ptr + o_n1[:, None] * P2 + o_n2[None, :])  # [BLOCK_N1, BLOCK_N2]
                    b_x2 = tl.dot(b_h, b_w, b_x2, input_precision=PREC, out_dtype=b_x2.dtype)
                if not (CENTRED and DEPTH == 2):
                    b_x2 += tl.load(c2_ptr + o_n2)[None, :]
                if DEPTH == 2:
                    b_y = b_x2  # BLOCK_N2 == P2: one pass
                else:
                    if (CENTRED or TRAIL) and DEPTH == 3:
                        b_x23, b_m, b_s = _centred_input(tl.reshape(b_x2, [BLOCK_J, T_PAD, BLOCK_N2]), ACT3, SLOPE3, T, n2, H_LAST, CENTRED)
                        b_x2 = tl.reshape(b_x23, [BLOCK_J * T_PAD, BLOCK_N2])
                        b_mmax = tl.maximum(b_mmax, b_m)
                        b_msq += b_s
                    else:
                        b_x2 = _act(b_x2, ACT3, SLOPE3)
                    o_p3 = tl.arange(0, P3)
                    b_w = tl.load(w3_ptr + o_n2[:, None] * P3 + o_p3[None, :])  # [BLOCK_N2, P3]
                    b_y = tl.dot(b_x2, b_w, b_y, input_precision=PREC, out_dtype=b_y.dtype)
            if DEPTH >= 3:
                if not (CENTRED and DEPTH == 3):
                    b_y += tl.load(c3_ptr + tl.arange(0, P3))[None, :]
            if DEPTH >= 4:
                if CENTRED:
                    b_y3, b_mmax, b_msq = _centred_input(tl.reshape(b_y, [BLOCK_J, T_PAD, P3]), ACT4, SLOPE4, T, 0, H_LAST)
                    o_k4 = tl.arange(0, P3)
                    o_n4 = tl.arange(0, P4)
                    b_w = tl.load(w4_ptr + o_k4[:, None] * P4 + o_n4[None, :])  # [P3, P4]
                    b_y = tl.dot(tl.reshape(b_y3, [BLOCK_J * T_PAD, P3]), b_w, input_precision=PREC, out_dtype=DT)  # [M, P4], no bias
                elif TRAIL:
                    b_y3, b_mmax, b_msq = _centred_input(tl.reshape(b_y, [BLOCK_J, T_PAD, P3]), ACT4, SLOPE4, T, 0, H_LAST, False)
                    b_y = _dense(tl.reshape(b_y3, [BLOCK_J * T_PAD, P3]), w4_ptr, c4_ptr, P3, P4, PREC)  # [M, P4]
                else:
                    b_y = _dense(_act(b_y, ACT4, SLOPE4), w4_ptr, c4_ptr, P3, P4, PREC)  # [M, P4]
        b_xs3 = tl.reshape(b_y, [BLOCK_J, T_PAD, PO])  # pre-activation (TRAIL)
        b_y = _act(b_y, ACT_F, SLOPE_F)  # [M, PO]
        b_y3 = tl.reshape(b_y, [BLOCK_J, T_PAD, PO])  # [BLOCK_J, T_PAD, PO]
        o_j64 = o_j.to(tl.int64)
        i64 = i.to(tl.int64)
        if SKIP:  # + lam_t (u_j - u_i): exact and linear in lam; the difference in float64, rounded once
            o_pu = tl.arange(0, PO)
            b_ui = tl.load(u_ptr + i64 * PO + o_pu)  # [PO] fp64
            b_uj = tl.load(u_ptr + o_j64[:, None] * PO + o_pu[None, :], mask=m_j[:, None], other=0.0)  # [BLOCK_J, PO]
            b_du = (b_uj - b_ui[None, :]).to(DT)  # [BLOCK_J, PO]
            b_y3 += b_lam[None, :, None] * b_du[:, None, :]

        m_t3 = m_t[None, :, None]
        b_mean = tl.sum(tl.where(m_t3, b_y3, 0.0), axis=1) / T  # [BLOCK_J, PO]
        b_yc = tl.where(m_t3, b_y3 - b_mean[:, None, :], 0.0)  # [BLOCK_J, T_PAD, PO]
        b_p2 = _pow2_above(tl.max(tl.abs(b_yc), axis=1))  # [BLOCK_J, PO] scale-free moments
        b_yc = b_yc / b_p2[:, None, :]
        b_lc = tl.where(m_t, b_lam - 0.5, 0.0)  # [T_PAD]
        b_ll = tl.sum(b_lc * b_lc, axis=0)
        b_ss = tl.sum(b_yc * b_yc, axis=1)  # [BLOCK_J, PO]
        b_cov = tl.sum(b_yc * b_lc[None, :, None], axis=1)  # [BLOCK_J, PO]
        if CENTRED:
            b_scale = _centred_scale(b_mmax, b_msq, wn_ptr, PO)
            if SKIP:  # the skip term's rounding scale |u_j - u_i|
                b_scale += tl.abs(b_du)
        else:  # max_t |y| (its own rounding)
            b_scale = tl.max(tl.where(m_t3, tl.abs(b_y3), 0.0), axis=1)  # [BLOCK_J, PO]
            if TRAIL:  # + max_t |act_F'(x)| (sum_h |W_kh| m_h + |c_k|): the last Linear's rounding passed through act_F
                o_po = tl.arange(0, PO)
                b_d = tl.max(tl.where(m_t3, _slope_bound(b_xs3, b_y3, ACT_F, SLOPE_F), 0.0), axis=1)
                if DEPTH == 1:
                    b_c = tl.load(c1_ptr + o_po)
                elif DEPTH == 2:
                    b_c = tl.load(c2_ptr + o_po)
                elif DEPTH == 3:
                    b_c = tl.load(c3_ptr + o_po)
                else:
                    b_c = tl.load(c4_ptr + o_po)
                b_r = _centred_scale(b_mmax, b_msq, wn_ptr, PO)
                if DEPTH >= 2:  # the inner Linears' rounding of its input, as the C++ kernel's factor 2 for deeper tails
                    b_r = 2.0 * b_r
                b_scale += b_d * (b_r + tl.abs(b_c)[None, :])
        b_tiny = None
        if DT == tl.float64:  # the underflow policy (foundation.policy.UNDERFLOW_TINY; fp32 never gets there)
            if CENTRED:
                b_tiny = 1e-290 * tl.load(wn_ptr + tl.arange(0, PO))[None, :] / b_p2  # 1e-290 sum_h |W_kh|
            else:
                b_tiny = 1e-290 / b_p2
        b_l = _pair_l(b_ss, b_cov, b_ll, b_scale / b_p2, b_dn, T, O, CONST_TOL, EPS, FLAG, FLAG_KAPPA, FLAGGED, b_tiny)

        tl.store(out_ptr + i64 * N + o_j64, b_l.to(out_ptr.dtype.element_ty), mask=m_j)
        tl.store(out_ptr + o_j64 * N + i64, b_l.to(out_ptr.dtype.element_ty), mask=m_j)


# --------------------------------------------------------------------------------------------
# host side


def unsupported_reason(spec: MLPTail) -> str | None:
    """Why :func:`connectivity_rowblock` cannot run ``spec``, or ``None`` if it can.

    Affine tails are always supported (they need no kernel: ``L = 1``).
    """
    if spec.is_affine:
        return None
    if not spec.stages:
        return "the tail has no Linear after its first activation"
    if len(spec.stages) > MAX_DEPTH:
        return f"{len(spec.stages)} Linears after the first activation; the kernel supports at most {MAX_DEPTH}"
    for l, (acts, _) in enumerate(spec.stages, start=1):
        if len([a for a in acts if not a.is_identity]) > 1:
            return f"stage {l} stacks {len(acts)} activations; the kernel applies one per stage"
    if len(spec.final) > 1:
        return f"{len(spec.final)} stacked activations after the last Linear; the kernel applies one"
    if spec.skip is not None and spec.final:
        return "a skip term needs a tail that ends in a Linear (no trailing activation)"
    widths = [spec.stages[0][1].in_features] + [lin.out_features for _, lin in spec.stages]
    if max(widths) > MAX_WIDTH:
        return f"layer width {max(widths)} exceeds the kernel's maximum {MAX_WIDTH}"
    if len(spec.stages) == 4 and widths[3] > 256:
        return f"with 4 Linears the input of the last one must be at most 256 wide; got {widths[3]}"
    return None


def _pad(n: int) -> int:
    """Power of two >= max(n, 16) (``tl.dot`` needs every dimension >= 16)."""
    return max(16, triton.next_power_of_2(n))


POINTER_ARGS = ("z_ptr", "w1_ptr", "c1_ptr", "w2_ptr", "c2_ptr", "w3_ptr", "c3_ptr", "w4_ptr", "c4_ptr", "wn_ptr", "u_ptr", "out_ptr")


def launch_config(
    spec: MLPTail,
    dtype: torch.dtype,
    n_lambda: int,
    *,
    interpret: bool,
    input_precision: str | None = None,
    n: int | None = None,
    arch: int | None = None,
) -> LaunchConfig:
    """The (constexprs, signature, launch options) :func:`connectivity_rowblock` uses for this shape.

    Args:
        spec: a non-affine MLP tail that :func:`unsupported_reason` accepts.
        dtype: ``torch.float32`` or ``torch.float64`` (compute dtype).
        n_lambda: interpolation points ``T``.
        interpret: pick the single interpreter config (big blocks: few Python-level programs).
        n: number of samples; only the interpreter config uses it (``BLOCK_J`` up to ``N - 1``).
        input_precision: ``tl.dot`` precision for fp32 (``"tf32x3"``, ``"ieee"``, ``"tf32"``);
            ``None`` means :data:`DEFAULT_FP32_PRECISION`. fp64 always uses ``"ieee"``.
        arch: the GPU's compute capability ``10 * major + minor`` (80, 90); ``None``: 90. Below 90 (``mma.sync``,
            whose operands live in registers) fp32 tails of depth >= 3 take 32-row tiles on 4 warps.

    Raises:
        ValueError: unsupported dtype, precision or tail.
    """
    reason = unsupported_reason(spec)
    if reason is not None:
        raise ValueError(f"the Triton kernel cannot run this tail: {reason}")
    if spec.is_affine:
        raise ValueError("affine tails need no kernel (L = 1)")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute dtype must be float32 or float64; got {dtype}")
    if dtype == torch.float64:
        prec = "ieee"
    else:
        prec = DEFAULT_FP32_PRECISION if input_precision is None else input_precision
        if prec not in ("tf32x3", "ieee", "tf32"):
            raise ValueError(f"input_precision must be 'tf32x3', 'ieee' or 'tf32'; got {input_precision!r}")
    depth = len(spec.stages)
    widths = (spec.stages[0][1].in_features, *tuple(lin.out_features for _, lin in spec.stages))
    p = [_pad(w) for w in widths[1:]]
    wide = max(p)
    fp64 = dtype == torch.float64
    t_pad = triton.next_power_of_2(n_lambda)
    if interpret:
        block_j = min(64, triton.next_power_of_2(max(1, (n or 65) - 1)))
        block_k, block_n1, block_n2, num_warps = _pad(widths[0]), p[0], p[min(1, depth - 1)], 4
    else:
        # Register budget: every [M, width] tile at most ~8K fp32 / ~4K fp64 elements (M = BLOCK_J * T_PAD);
        # chained column blocks keep layers 1-2 narrow, the last accumulator is full width. Halved for fp64
        # erfc-GELU (a 40-term continued fraction per element). Without that, and the sm_80 rule below, they
        # spill on sm_80 / sm_90 (tests/kernels/test_triton_compile.py checks every shape on both).
        names = {a.name for a in (*(a for stage, _ in spec.stages for a in stage), *spec.final)}
        # fp64 GELU, and fp64 sigmoid/tanh past depth 1 (their pointwise rounding scale |a| + |x act'(x)|), take the
        # half-size tiles: the full ones spilled 8 bytes on sm_90 (fp64_h256_d2_tanh, triton 3.9)
        gelu = fp64 and ("gelu" in names or (depth >= 2 and bool(names & {"tanh", "sigmoid"})))
        cap = 8192 if not fp64 else (2048 if gelu else 4096)
        chunk = 64 if not fp64 else (16 if gelu else 32)
        block_k = 32 if not fp64 else 16
        block_n1 = p[0] if depth == 1 else min(p[0], chunk)
        block_n2 = p[1] if depth == 2 else (min(p[1], chunk) if depth >= 3 else 16)
        full = max(p[-1], p[2] if depth >= 3 else 0, block_n1, block_n2)
        rows = max(32, min(128, cap // full))
        block_j = max(1, rows // t_pad)
        num_warps = 4 if block_j * t_pad * full <= 4096 and not fp64 else 8
        if depth >= 3 and not fp64 and (arch or 90) < 90:
            # sm_80, fp32, depth >= 3: 32-row tiles (rather than 32-column layer-1 blocks, which recompute act_1
            # twice as often: static estimate 39 vs 51 ms at N=961, H=100, depth 3); depth 4 needs both
            block_j, num_warps = max(1, 32 // t_pad), 4
            block_n1 = min(block_n1, 32) if depth == 4 else block_n1
    k0 = triton.cdiv(widths[0], block_k) * block_k
    pads = (k0, *tuple(p))
    acts = [next((a for a in stage if not a.is_identity), None) for stage, _ in spec.stages]
    fin = spec.final[0] if spec.final else None
    const = {
        "T": n_lambda,
        "T_PAD": t_pad,
        "BLOCK_J": block_j,
        "BLOCK_K": block_k,
        "BLOCK_N1": block_n1,
        "BLOCK_N2": block_n2,
        "K0": k0,
        "P1": p[0],
        "P2": p[1] if depth >= 2 else 16,
        "P3": p[2] if depth >= 3 else 16,
        "P4": p[3] if depth >= 4 else 16,
        "PO": p[-1],
        "O": widths[-1],
        "DEPTH": depth,
    }
    for l in range(MAX_DEPTH):
        a = acts[l] if l < depth else None
        const[f"ACT{l + 1}"] = (a or IDENTITY).code
        const[f"SLOPE{l + 1}"] = float(a.slope) if a is not None else 0.0
    const["ACT_F"] = (fin or IDENTITY).code
    const["SLOPE_F"] = float(fin.slope) if fin is not None else 0.0
    const["CONST_TOL"] = CONST_RTOL * torch.finfo(dtype).eps
    const["PREC"] = prec
    const["EPS"] = torch.finfo(dtype).eps
    const["FLAG"] = not fp64  # fp32: unresolvable pairs are written FLAGGED, core recomputes them in fp64
    const["FLAG_KAPPA"] = FLAG_KAPPA
    const["FLAGGED"] = FLAGGED
    const["CENTRED"] = not spec.final
    const["H_LAST"] = widths[depth - 1]
    const["SKIP"] = spec.skip is not None
    ptr = "*fp64" if fp64 else "*fp32"
    signature = {name: ptr for name in POINTER_ARGS}
    if const["SKIP"]:
        signature["u_ptr"] = "*fp64"  # the skip term u = W_skip h, always float64
    signature["N"] = "i32"
    signature.update({name: "constexpr" for name in const})
    return LaunchConfig(const, signature, widths, pads, num_warps, 1 if wide >= 512 else 2)


def _pack(w: torch.Tensor, b: torch.Tensor | None, k_pad: int, n_pad: int, dtype, device) -> tuple:
    """Zero-padded ``W^T`` ``[k_pad, n_pad]`` and bias ``[n_pad]`` (zeros when absent), contiguous."""
    wt = torch.zeros(k_pad, n_pad, dtype=dtype, device=device)
    wt[: w.shape[1], : w.shape[0]] = w.detach().t().to(dtype)
    c = torch.zeros(n_pad, dtype=dtype, device=device)
    if b is not None:
        c[: b.shape[0]] = b.detach().to(dtype)
    return wt, c


def check_can_run(z: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``z`` is 2-D and on CUDA, or on the CPU under the Triton interpreter."""
    if z.dim() != 2:
        raise ValueError(f"z must be 2-D (N, H0); got shape {tuple(z.shape)}")
    if z.device.type != "cuda" and not kernel_is_interpreted():
        raise ValueError(
            "connectivity_triton on CPU tensors runs only under the Triton interpreter: set TRITON_INTERPRET=1 "
            "before triton is first imported in this process"
        )


def connectivity_rowblock(
    z: torch.Tensor,
    spec: MLPTail,
    n_lambda: int,
    *,
    u: torch.Tensor | None = None,
    input_precision: str | None = None,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """Connectivity matrix ``L`` of an MLP tail with one fused Triton launch (the v1 kernel).

    ``z = spec.absorb(h)`` is computed by the caller, and for a lowered tail with a skip term ``u = W_skip h`` in
    float64 (``spec.skip_values(h)``); the kernel computes every ``L_ij``, ``i < j``
    (see :func:`_connectivity_fwd_kernel`) and writes both triangles; the diagonal is set to 1 here.
    Identical rows of ``h`` are handled by the caller (``grokfast_metrics.compute.core``).

    Args:
        z: ``(N, H0)`` absorbed representations (``spec.absorb(h)``) in the compute dtype (fp32 or fp64), on CUDA,
            or on the CPU under ``TRITON_INTERPRET=1``.
        spec: normalised MLP tail (``grokfast_metrics.foundation.tail.parse_tail``).
        n_lambda: interpolation points ``T >= 3``.
        u: ``(N, O)`` float64 skip term ``spec.skip_values(h)``, required when ``spec.skip`` is set (a lowered tail).
        input_precision: fp32 ``tl.dot`` precision. Default ``"tf32x3"``: three TF32 tensor-core
            products (split hi/lo operands) reach about fp32 accuracy at tensor-core speed, whereas plain
            ``"tf32"`` (10-bit mantissa, ~5e-4 relative) misses the 1e-5 target on ``L`` and ``"ieee"``
            (exact fp32 FMA) runs on CUDA cores only. Ignored for fp64 (always ``"ieee"``).
        config: launch configuration to use instead of :func:`launch_config`'s pick (tests run the
            GPU tiling under the interpreter this way); must come from ``launch_config`` for this
            ``spec``, dtype and ``n_lambda``.

    Returns:
        ``(N, N)`` tensor, ``z``'s dtype and device.

    Raises:
        ValueError: unsupported tail/dtype, or a CPU tensor without the Triton interpreter.
    """
    if z.dim() != 2:
        raise ValueError(f"z must be 2-D (N, H0); got shape {tuple(z.shape)}")
    n = z.shape[0]
    dtype, dev = z.dtype, z.device
    if spec.is_affine:
        return torch.ones(n, n, dtype=dtype, device=dev)
    check_can_run(z)
    interpret = kernel_is_interpreted()
    cc = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else (9, 0)  # the GPU tiling depends on it
    cfg = config or launch_config(spec, dtype, n_lambda, interpret=interpret, input_precision=input_precision, n=n, arch=10 * cc[0] + cc[1])
    if (
        cfg.constexprs["T"] != n_lambda
        or cfg.widths[0] != spec.stages[0][1].in_features
        or cfg.constexprs["SKIP"] != (spec.skip is not None)
    ):
        raise ValueError("config does not match this tail / n_lambda; build it with launch_config")
    zp = torch.zeros(n, cfg.pads[0], dtype=dtype, device=dev)
    zp[:, : z.shape[1]] = z
    packed = []
    for l, (_, lin) in enumerate(spec.stages):
        packed.extend(_pack(lin.weight, lin.bias, cfg.pads[l], cfg.pads[l + 1], dtype, dev))
    packed.extend([zp] * (2 * MAX_DEPTH - len(packed)))
    w_last = spec.stages[-1][1].weight.detach().to(dtype)  # [O, H_LAST]
    wn = torch.zeros(2, cfg.pads[-1], dtype=dtype, device=dev)  # |W_k|_1, |W_k|_2
    wn[0, : w_last.shape[0]] = w_last.abs().sum(dim=1)
    wn[1, : w_last.shape[0]] = torch.linalg.vector_norm(w_last, dim=1)
    packed.append(wn)
    up = zp
    if spec.skip is not None:  # u = W_skip h (float64, on z's device), zero-padded to PO columns
        if u is None or tuple(u.shape) != (n, spec.out_features):
            raise ValueError(f"a tail with a skip term needs u = spec.skip_values(h) of shape ({n}, {spec.out_features})")
        up = torch.zeros(n, cfg.pads[-1], dtype=torch.float64, device=dev)
        up[:, : spec.out_features] = u.to(device=dev, dtype=torch.float64)
    packed.append(up)
    out = torch.full((n, n), float("nan"), dtype=dtype, device=dev)
    grid = (n, triton.cdiv(n - 1, cfg.block_j))
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        _connectivity_fwd_kernel[grid](zp, *packed, out, n, **cfg.constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    out.diagonal().fill_(1.0)
    return out


def kernel_is_interpreted() -> bool:
    """True when the kernel is an interpreted function (``TRITON_INTERPRET=1`` when triton was imported).

    ``triton.jit`` picks compiled or interpreted when a function is defined, and Triton's own
    library functions (``tl.zeros``, ``tl.sum``) are decided when ``triton`` is first imported, so
    the interpreter works only in a process that had ``TRITON_INTERPRET=1`` before importing triton.
    """
    return not isinstance(_connectivity_fwd_kernel, triton.runtime.JITFunction)
