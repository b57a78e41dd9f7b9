"""Jit helpers and the launch-configuration record shared by the Triton kernels v1 and v2.

Activations (``_act``, the offset-free ``_act_offset_free`` for centred paths, the GELU ``erfc`` without
libdevice), the rounding-scale bounds (``_amp``, ``_slope_bound``, depth 1 ``_end_bounds``, ``_centred_scale``),
the centred input of the last Linear (``_centred_input``) and the per-pair ``r2`` / constant-path rule / flag
(``_pair_l``). The activation codes come from the one table ``_tail.ACT_CODES``. Used by
:mod:`.triton_rowblock` (v1) and :mod:`.triton_packed_mma` (v2).
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

from ..foundation.tail import ACT_CODES

# Activation codes of the ``ACT*`` constexprs, from the one activation table (``_tail.ACTIVATIONS``).
_SILU = tl.constexpr(ACT_CODES["silu"])
_RELU = tl.constexpr(ACT_CODES["relu"])
_GELU = tl.constexpr(ACT_CODES["gelu"])
_GELU_TANH = tl.constexpr(ACT_CODES["gelu_tanh"])
_TANH = tl.constexpr(ACT_CODES["tanh"])
_SIGMOID = tl.constexpr(ACT_CODES["sigmoid"])
_LEAKY_RELU = tl.constexpr(ACT_CODES["leaky_relu"])


@triton.jit
def _tanh(x):
    """tanh without cancellation near 0 (odd Taylor series for |x| < 1/8, exp form elsewhere)."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    # tanh x = x - x^3/3 + 2x^5/15 - 17x^7/315 + 62x^9/2835 - 1382x^11/155925 + O(x^13)
    p = -1382.0 / 155925.0
    p = p * x2 + 62.0 / 2835.0
    p = p * x2 - 17.0 / 315.0
    p = p * x2 + 2.0 / 15.0
    p = p * x2 - 1.0 / 3.0
    small = x + x * x2 * p
    return tl.where(a < 0.125, small, tl.where(x < 0, -big, big))


@triton.jit
def _gelu_erfc(x):
    """``erfc(-x / sqrt 2)`` with relative accuracy for both signs (``_tail.ACTIVATIONS``' GELU, no libdevice).

    ``x >= 0``: ``1 + erf(x / sqrt 2)`` (no cancellation). ``x < 0``, ``u = -x / sqrt 2 > 0``: fp32 uses the
    Chebyshev fit of Numerical Recipes' ``erfcc`` (relative error < 1.2e-7 for every ``u >= 0``); fp64 uses
    ``1 - erf(u)`` below ``u = 2.5`` (relative error <= eps / erfc(2.5) = 3e-13) and the continued fraction
    ``erfc(u) = e^{-u^2} / sqrt(pi) / (u + (1/2) / (u + 1 / (u + (3/2) / ...)))`` at 40 terms above
    (relative error < 1e-15 for ``u >= 2.5``, checked against scipy).
    """
    u = -x * 0.7071067811865476
    ua = tl.maximum(u, 0.0)
    pos = 1.0 + tl.erf(-u)
    if x.dtype == tl.float64:
        uc = tl.maximum(ua, 2.5)
        f = uc
        for k in range(40):
            f = uc + ((40 - k) * 0.5) / f
        neg = tl.where(ua < 2.5, 1.0 - tl.erf(ua), tl.exp(-uc * uc) * 0.5641895835477563 / f)
    else:
        t = 1.0 / (1.0 + 0.5 * ua)
        p = 0.17087277
        p = p * t - 0.82215223
        p = p * t + 1.48851587
        p = p * t - 1.13520398
        p = p * t + 0.27886807
        p = p * t - 0.18628806
        p = p * t + 0.09678418
        p = p * t + 0.37409196
        p = p * t + 1.00002368
        p = p * t - 1.26551223
        neg = t * tl.exp(p - ua * ua)
    return tl.where(u <= 0.0, pos, neg)


@triton.jit
def _act(x, ACT: tl.constexpr, SLOPE: tl.constexpr):
    """Elementwise activation ``ACT`` (a code of ``_tail.ACT_CODES``; identity: unchanged) of a block."""
    if ACT == _SILU:
        x = x / (1.0 + tl.exp(-x))
    elif ACT == _RELU:
        x = tl.maximum(x, 0.0)
    elif ACT == _GELU:  # 0.5 x erfc(-x / sqrt 2): the erf form cancels for very negative x
        x = 0.5 * x * _gelu_erfc(x)
    elif ACT == _GELU_TANH:  # 0.5 x (1 + tanh u) == x * sigmoid(2u), no cancellation
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = x / (1.0 + tl.exp(-2.0 * u))
    elif ACT == _TANH:
        x = _tanh(x)
    elif ACT == _SIGMOID:
        x = 1.0 / (1.0 + tl.exp(-x))
    elif ACT == _LEAKY_RELU:
        x = tl.where(x >= 0.0, x, x * SLOPE)
    return x


# SiLU, GELU and GELU-tanh have one minimum (x*, act(x*)): |act| on a segment is at most its value at the
# ends, or |act(x*)| when the segment reaches x* (rounded outwards).
_XSTAR_SILU = tl.constexpr(-1.2784645)
_MIN_SILU = tl.constexpr(0.27846455)
_XSTAR_GELU = tl.constexpr(-0.7517916)
_MIN_GELU = tl.constexpr(0.17004)


@triton.jit
def _act_offset_free(x, ref, ACT: tl.constexpr, SLOPE: tl.constexpr):
    """``act(x)``, minus the constant a saturating unit tends to on ``ref``'s side (``_tail.torch_offset_free``).

    ``ref`` (broadcast against ``x``) is constant along a path, so the offset it removes is too and centring
    cancels it exactly: ``sigmoid(x) - 1 = -sigmoid(-x)``, ``tanh(x) -+ 1 = -+2 sigmoid(-+2x)``.
    """
    if ACT == _SIGMOID:
        e = tl.exp(-tl.abs(x))
        r = 1.0 / (1.0 + e)
        a = tl.where(ref > 0.0, -tl.where(x >= 0.0, e * r, r), tl.where(x >= 0.0, r, e * r))
    elif ACT == _TANH:
        e = tl.exp(-2.0 * tl.abs(x))
        r = 2.0 / (1.0 + e)
        a = tl.where(ref > 0.0, -tl.where(x >= 0.0, e * r, r), tl.where(ref < 0.0, tl.where(x >= 0.0, r, e * r), _tanh(x)))
    else:
        a = _act(x, ACT, SLOPE)
    return a


@triton.jit
def _amp(x, ACT: tl.constexpr):
    """``1 + g``: how much the rounding of the input ``x`` grows through ``act`` relative to ``|act|``
    (``torch_backend._through``: ``|x|`` for smooth units, ``x^2`` for GELU at negative ``x``, 0 otherwise). Homogeneous
    (docs/lmn.md, "Accuracy in the corners"): SiLU, GELU and GELU-tanh are ~x for ``x >= 0``, where ``|x act'(x)| <= 1.2 |act(x)|``:
    ``1 + g = 2.2``
    there (it was ``1 + |x|``: the scale grew like the square of the weights and fired the constant rule)."""
    ax = tl.abs(x)
    if ACT == _GELU:
        f = tl.where(x >= 0.0, 2.2, (1.0 + ax) * (1.0 + ax))
    elif ACT == _TANH:  # |x d/dx log(2 sigmoid(-+2x))| = 2 |x| sigmoid(+-2x) <= 2 |x| (offset free)
        f = 1.0 + 2.0 * ax
    elif ACT == _SIGMOID:
        f = 1.0 + ax
    elif (ACT == _SILU) or (ACT == _GELU_TANH):
        f = tl.where(x >= 0.0, 2.2, 1.0 + ax)
    else:
        f = ax * 0.0 + 1.0
    return f


#: max over x < 0 of |act(x)| (1 + g(x)) for SiLU (0.72 at x = -1.85), GELU (0.67), GELU-tanh (0.35), rounded up
_NEG_PEAK = tl.constexpr(0.8)


@triton.jit
def _slope_bound(x, a, ACT: tl.constexpr, SLOPE: tl.constexpr):
    """Bound on ``|act'(x)|`` from ``x`` and ``a = act(x)`` (``torch_backend._slope_bound``)."""
    if ACT == _RELU:
        d = tl.where(x > 0.0, 1.0, 0.0)
    elif ACT == _LEAKY_RELU:
        d = tl.where(x >= 0.0, 1.0, tl.abs(x * 0.0 + SLOPE))
    elif ACT == _SIGMOID:
        d = tl.minimum(tl.exp(-tl.abs(x)), 0.25)
    elif ACT == _TANH:
        d = tl.minimum(4.0 * tl.exp(-2.0 * tl.abs(x)), 1.0)
    elif ACT == _SILU:
        d = tl.where(x > -1.0, 1.2, tl.abs(a))
    elif ACT == _GELU:
        d = tl.where(x > -1.0, 1.2, tl.abs(a) * (2.0 - x))
    elif ACT == _GELU_TANH:
        d = tl.where(x > -1.0, 1.2, tl.abs(a) * (2.6 + 0.22 * x * x))
    else:
        d = x * 0.0 + 1.0
    return d


@triton.jit
def _centred_input(x3, ACT: tl.constexpr, SLOPE: tl.constexpr, T: tl.constexpr, col0, H_LAST: tl.constexpr, CENTRE: tl.constexpr = True):
    """Input of the last Linear from its pre-activation ``x3`` ``[BLOCK_J, T_PAD, W]`` (columns ``col0..``).

    Returns ``a - mean_t a`` (padded ``t`` zeroed; sigmoid/tanh offset free relative to ``x`` at ``t = 0``;
    ``CENTRE=False``: plain ``a``, for a last Linear followed by an activation) and, per pair, ``max_h m_h`` and
    ``sum_h m_h^2`` of ``m_h = max_t |a_th| (1 + g_th)`` over the real columns.
    """
    TP: tl.constexpr = x3.shape[1]
    W: tl.constexpr = x3.shape[2]
    o_t = tl.arange(0, TP)
    m_t3 = (o_t < T)[None, :, None]
    if CENTRE:
        x0 = tl.sum(tl.where(o_t[None, :, None] == 0, x3, 0.0), axis=1)  # [BJ, W]
        a3 = _act_offset_free(x3, x0[:, None, :], ACT, SLOPE)
    else:
        a3 = _act(x3, ACT, SLOPE)
    if (ACT == _SIGMOID) or (ACT == _TANH):  # offset free: |a| + |x act'(x)| pointwise (homogeneous)
        m3 = tl.where(m_t3, tl.abs(a3) + tl.abs(x3) * _slope_bound(x3, a3, ACT, SLOPE), 0.0)
    else:
        m3 = tl.where(m_t3, tl.abs(a3) * _amp(x3, ACT), 0.0)
    m_h = tl.where((col0 + tl.arange(0, W) < H_LAST)[None, :], tl.max(m3, axis=1), 0.0)  # [BJ, W]
    if CENTRE:
        b_mean = tl.sum(tl.where(m_t3, a3, 0.0), axis=1) / T
        a3 = tl.where(m_t3, a3 - b_mean[:, None, :], 0.0)
    return a3, tl.max(m_h, axis=1), tl.sum(m_h * m_h, axis=1)


@triton.jit
def _end_bounds(b_zi, b_zj, b_ai, b_aj, o_k, ACT: tl.constexpr, H_LAST: tl.constexpr):
    """Depth 1: ``m_h = max(|a_ih|, |a_jh|, |act(x*)| if the path reaches x*) (1 + g(max(|z_ih|, |z_jh|)))`` per pair
    and column (``b_zi [K]``, ``b_zj [P, K]``, ``b_ai``, ``b_aj``: ``act`` at both, offset free relative to ``z_i``;
    columns ``o_k >= H_LAST`` give 0),
    ``>=`` the torch path's ``max_t |a_th| (1 + g_th)`` (``|x_t|`` is at most its ends; monotone units peak at an end)."""
    b_m = tl.maximum(tl.abs(b_ai)[None, :], tl.abs(b_aj))
    b_lo = tl.minimum(b_zi[None, :], b_zj)
    b_hi = tl.maximum(b_zi[None, :], b_zj)
    if ACT == _SILU:
        b_m = tl.where((b_lo <= _XSTAR_SILU + 0.01) & (b_hi >= _XSTAR_SILU - 0.01), tl.maximum(b_m, _MIN_SILU), b_m)
    elif (ACT == _GELU) or (ACT == _GELU_TANH):
        b_m = tl.where((b_lo <= _XSTAR_GELU + 0.01) & (b_hi >= _XSTAR_GELU - 0.01), tl.maximum(b_m, _MIN_GELU), b_m)
    if (ACT == _SILU) or (ACT == _GELU) or (ACT == _GELU_TANH):
        # positive part: |a| <= b_m there, 1 + g = 2.2; negative part: |a| (1 + g) <= min(_NEG_PEAK, b_m (1 + g(lo)))
        # (b_m = max |a| on the path, g grows with |x|): homogeneous (docs/lmn.md, "Accuracy in the corners"), and tight for deeply
        # negative paths
        b_pos = tl.where(b_hi > 0.0, 2.2 * b_m, 0.0)
        b_neg = tl.where(b_lo < 0.0, tl.minimum(b_m * _amp(b_lo, ACT), _NEG_PEAK), 0.0)
        b_m = tl.maximum(b_pos, b_neg) + _floor(b_zi) * (1.0 + tl.maximum(tl.abs(b_lo), tl.abs(b_hi)))
    else:
        b_m = b_m * _amp(tl.maximum(tl.abs(b_lo), tl.abs(b_hi)), ACT)
    return tl.where((o_k < H_LAST)[None, :], b_m, 0.0)


@triton.jit
def _sat_bounds(b_amax, b_smax, b_zi, b_zj, o_k, H_LAST: tl.constexpr):
    """Depth 1, sigmoid/tanh (offset free): ``m_h = max_t |a_th| + max(|z_ih|, |z_jh|) max_t |act'(x_th)|`` over the
    ``T`` points (``b_amax``, ``b_smax``: those maxima, ``[P, K]``), the torch path's ``_through``: the unit's own
    rounding plus its input's through its slope at the points where it is evaluated. Homogeneous: the
    ends' ``max |a| (1 + 2 max |z|)`` grew like the scale of the weights or ``h`` (on the far side of a step ``a`` is the
    whole step, ``act'`` ~ 0), so fp64 fired the constant rule on a step from |z| ~ 1e15 (0.55-0.75 off) and fp32
    flagged such pairs at any scale."""
    b_r = tl.maximum(tl.abs(b_zi)[None, :], tl.abs(b_zj))
    return tl.where((o_k < H_LAST)[None, :], b_amax + b_r * b_smax + _floor(b_zi) * (1.0 + b_r), 0.0)


@triton.jit
def _floor(x):
    """``tiny / eps`` of ``x``'s dtype: below the smallest normal number an exp-based unit keeps no relative accuracy
    (absolute error up to ``tiny |x|``; C++ ``kFloor``, ``torch_backend._through``). Without it a unit that underflowed
    to 0 on the whole path (sigmoid at x ~ -1000 in fp32) made the output exactly constant, the scale 0 and the pair
    neither flagged nor resolvable (0.86 off before): now fp32 flags it and the fp64 recompute resolves it."""
    if x.dtype == tl.float64:
        f = 1.0020841800044864e-292
    else:
        f = 9.860761315262648e-32
    return f


@triton.jit
def _pow2_above(b_amax):
    """``2^round(log2 max_t |yc|)`` per output (1 where it is 0): dividing by it is exact and keeps the squares of the
    moments finite whatever the scale of the weights or ``h`` (docs/lmn.md, "Accuracy in the corners": they overflowed from |y| ~ 1e19
    in fp32)."""
    return tl.where(b_amax > 0.0, tl.exp2(tl.floor(tl.log2(tl.where(b_amax > 0.0, b_amax, 1.0)))), 1.0)


@triton.jit
def _pair_l(
    b_ss,
    b_cov,
    b_ll,
    b_scale,
    b_dn,
    T: tl.constexpr,
    O: tl.constexpr,
    CONST_TOL: tl.constexpr,
    EPS: tl.constexpr,
    FLAG: tl.constexpr,
    FLAG_KAPPA: tl.constexpr,
    FLAGGED: tl.constexpr,
    b_tiny=None,
):
    """``L`` per pair from ``sum_t yc^2``, ``sum_t yc lc`` (``[P, PO]``), ``sum_t lc^2`` and the rounding scale per
    output: clamped ``r2``, the constant-path rule, the mean over the ``O`` real outputs and (``FLAG``) ``FLAGGED``
    where the error estimate exceeds ``FLAG_KAPPA`` (``b_dn == 0``: an exactly constant path, 1). ``b_tiny``
    (float64): ``UNDERFLOW_TINY sum_h |W_kh|`` in the units of the moments; a smaller std is constant (docs/lmn.md)."""
    b_den = tl.where(b_ss > 0.0, b_ss * b_ll, 1.0)
    b_r2 = tl.minimum(tl.maximum(b_cov * b_cov / b_den, 0.0), 1.0)
    b_var = b_ss * (1.0 / T)  # std_t(y)^2
    b_tol = CONST_TOL * b_scale
    b_const = b_var <= b_tol * b_tol  # std <= CONST_TOL eps scale
    if b_tiny is not None:
        b_const = b_const | (b_var <= b_tiny * b_tiny)
    b_r2 = tl.where(b_const, 1.0, b_r2)
    m_o = tl.arange(0, b_ss.shape[1]) < O
    b_l = tl.sum(tl.where(m_o[None, :], b_r2, 0.0), axis=1) / O  # [P]
    if FLAG:  # torch_backend.pair_error_estimate: kappa = eps scale / std, mean_k min(1, ...) > FLAG_KAPPA
        b_err = EPS * b_scale
        b_kap = tl.where(b_err > 0.0, b_err * tl.math.rsqrt(b_var), 0.0)  # err / std; std == 0 < err: inf
        b_est = 2.0 * b_kap * tl.sqrt(tl.maximum(b_r2 * (1.0 - b_r2), b_kap)) + b_kap * b_kap
        b_est = tl.where(b_est < 1.0, b_est, 1.0)  # inf and nan -> 1
        b_e = tl.sum(tl.where(m_o[None, :], b_est, 0.0), axis=1) / O  # [P]
        b_l = tl.where(b_e > FLAG_KAPPA, FLAGGED, b_l)
        # an exactly constant path (z_j == z_i: duplicate samples) is exact, r2 = 1, never flagged
        b_l = tl.where(b_dn == 0.0, 1.0, b_l)
    return b_l


@triton.jit
def _centred_scale(b_mmax, b_msq, wn_ptr, PO: tl.constexpr):
    """``min(max_h m_h |W_k|_1, |m|_2 |W_k|_2) >= sum_h |W_kh| m_h`` (Hoelder, Cauchy-Schwarz): ``[P, PO]``."""
    o_po = tl.arange(0, PO)
    # |m|_2 >= max_h m_h: a sum of squares below that underflowed (floor-sized m_h, the units' underflow floor) and the
    # scale read 0 (as in the C++ kernel)
    b_m2 = tl.maximum(tl.sqrt(b_msq), b_mmax)
    return tl.minimum(b_mmax[:, None] * tl.load(wn_ptr + o_po)[None, :], b_m2[:, None] * tl.load(wn_ptr + PO + o_po)[None, :])


@dataclass(frozen=True)
class LaunchConfig:
    """Everything a launch of :func:`_connectivity_fwd_kernel` depends on besides the tensors.

    Attributes:
        constexprs: constexpr arguments by name.
        signature: argument name -> Triton type (``"*fp32"``, ``"i32"``, ``"constexpr"``).
        widths: real ``[H0, H1, ..., H_DEPTH]`` of the remaining layers.
        pads: padded ``[K0, P1, ..., P_DEPTH]`` (``K0`` a multiple of ``BLOCK_K``).
        num_warps, num_stages: launch options.
    """

    constexprs: dict
    signature: dict
    widths: tuple
    pads: tuple
    num_warps: int
    num_stages: int

    @property
    def block_j(self) -> int:
        return self.constexprs["BLOCK_J"]
