"""Torch backend: the linear connectivity matrix, vectorised over pairs in bounded chunks.

Two paths share one reduction (:func:`r2_from_centred`):

* :func:`connectivity_mlp` for MLP tails (``foundation.tail.MLPTail``): the leading Linear is absorbed
  (``z = W h + b`` once per sample, interpolation on ``z``), only the upper triangle is computed,
  and a chunk of ``P`` pairs materialises ``P * T * H`` activations, never ``N^2 * T * H``. When the
  tail ends in a Linear, its output is taken centred over ``t`` *before* that Linear,
  ``yc = (a - mean_t a) W^T`` (docs/lmn.md, "Accuracy contract": the bias and a shared logit offset never
  enter), and a saturating activation just before it is taken offset free.
* any other module takes the generic path of :mod:`grokfast_metrics.compute.generic`, which shares this
  module's reduction (:func:`r2_from_paths`), pair chunks and allocation (:func:`new_L`).

Both run on whatever device ``h`` lives on (CPU or CUDA) in fp32 or fp64. With ``flag=True`` (what
``core`` asks for in fp32) a pair the fp32 computation cannot resolve to the accuracy contract is
written as :data:`~grokfast_metrics.foundation.policy.FLAGGED` and ``core`` recomputes it in fp64 (:func:`mlp_pairs`,
:func:`grokfast_metrics.compute.generic.pairs_connectivity`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..foundation.policy import CONST_RTOL, FLAG_KAPPA, FLAGGED, UNDERFLOW_TINY, check_fits, lambdas
from ..foundation.tail import SATURATING, SMOOTH, Act, MLPTail, torch_offset_free


def _slope_bound(act: Act, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor | None:
    """``(P, T, H)`` bound on ``|act'(x)|`` from ``x`` and ``a = act(x)`` (``None``: 1 everywhere).

    sigmoid ``<= min(1/4, e^-|x|)``, tanh ``<= min(1, 4 e^-2|x|)`` (true for ``a`` taken offset free too);
    SiLU, GELU, GELU-tanh: ``<= 1.2`` for ``x > -1``, else ``<= |a|``, ``|a| (2 + |x|)``, ``|a| (2.6 + 0.22 x^2)``,
    so a unit far in its flat negative tail passes on only a relative share of its input's rounding.
    """
    name = act.name
    if name == "identity":
        return None
    if name == "relu":
        return (x > 0).to(x.dtype)
    if name == "leaky_relu":
        return torch.where(x >= 0, 1.0, abs(act.slope)).to(x.dtype)
    if name == "sigmoid":  # at the T points themselves: a steep unit crossing 0 between two of them has a step
        return torch.exp(-x.abs()).clamp_(max=0.25)  # there, resolved exactly (the segment's max flagged it)
    if name == "tanh":
        return torch.exp(x.abs() * -2.0).mul_(4.0).clamp_(max=1.0)
    return torch.where(x > -1.0, torch.full_like(x, 1.2), (a.abs() * _gelu_tail(name, x.abs())).clamp_(max=1.2))


def _slope_max_on_segment(act: Act, x0: torch.Tensor, x1: torch.Tensor, own: torch.Tensor) -> torch.Tensor | None:
    """``(P, H)`` bound on ``max_t |act'(x_t)|`` when ``x`` is linear in ``t`` from ``x0`` to ``x1`` (the first layer's
    pre-activations), from the ends and ``own = max_t |act(x_t)|`` alone: the same bounds as :func:`_slope_bound`,
    taken at the point of the segment where each is largest (no pass over the ``T`` points)."""
    name = act.name
    if name == "identity":
        return None
    hi = torch.maximum(x0, x1)
    if name == "relu":
        return (hi > 0).to(x0.dtype)
    if name == "leaky_relu":
        return torch.where(hi >= 0, 1.0, abs(act.slope)).to(x0.dtype)
    if name in ("sigmoid", "tanh"):  # smallest |x| on the segment: 0 where it crosses 0
        ax = torch.where(x0 * x1 <= 0, torch.zeros_like(x0), torch.minimum(x0.abs(), x1.abs()))
        return torch.exp(-ax).clamp_(max=0.25) if name == "sigmoid" else torch.exp(ax * -2.0).mul_(4.0).clamp_(max=1.0)
    # |act'| <= 1.2 everywhere (SiLU 1.10, GELU 1.13, GELU-tanh 1.13); below -1 also <= |act| * ratio(|x|). The
    # bound must stay homogeneous: max(own, 1.2) here made the scale grow like |x|^2 at large inputs.
    flat = (own * _gelu_tail(name, torch.maximum(x0.abs(), x1.abs()))).clamp_(max=1.2)
    return torch.where(hi > -1.0, torch.full_like(flat, 1.2), flat)


def _gelu_tail(name: str, ax: torch.Tensor) -> torch.Tensor | float:
    """``|act'(x)| / |act(x)|`` bound for ``x <= -1`` of SiLU (1), GELU (``2 + |x|``), GELU-tanh (``2.6 + 0.22 x^2``)."""
    if name == "silu":
        return 1.0
    return 2.0 + ax if name == "gelu" else 2.6 + 0.22 * ax * ax


def _through(act: Act, x: torch.Tensor, a: torch.Tensor, r: torch.Tensor, linear: bool = False) -> torch.Tensor:
    """``(P, H)`` rounding scale of ``a = act(x)`` (``(P, T, H)``) from that of ``x`` (``r``, in units of eps):
    ``max_t |act'(x)| r + max_t |a|`` (its input's rounding passed on, plus its own). ``linear``: ``x`` is linear
    in ``t`` (the first layer), so the slope bound comes from the path's ends (:func:`_slope_max_on_segment`)."""
    own = a.abs().amax(dim=1)
    if act.name in SMOOTH:  # below the smallest normal number an exp-based unit has no relative accuracy left
        own = own + torch.finfo(x.dtype).tiny / torch.finfo(x.dtype).eps
    if linear and act.name not in SATURATING:
        d = _slope_max_on_segment(act, x[:, 0], x[:, -1], own)
    else:
        d = _slope_bound(act, x, a)
        d = None if d is None else d.amax(dim=1)
    return own + r if d is None else torch.addcmul(own, d, r)


def _linear_scale(r: torch.Tensor, wt: torch.Tensor, b: torch.Tensor | None, last: bool) -> torch.Tensor:
    """Rounding scale of ``x W^T + b`` from that of ``x`` (``r``): ``sum_h |W_kh| r_h + |b_k|`` for the tail's last
    Linear (as the centred outputs' scale), ``(sum_h W_kh^2 r_h^2)^1/2 + |b_k|`` for inner ones (rounding errors add
    up like independent terms; the worst case over-flags deep tails: 116 of 136 pairs of a depth-3 test tail)."""
    out = torch.matmul(r, wt.abs()) if last else torch.matmul(r * r, wt * wt).sqrt_()
    return out if b is None else out + b.abs()


def r2_from_centred(
    yc: torch.Tensor,
    scale: torch.Tensor,
    lam_c: torch.Tensor,
    eps: float,
    flag: bool = False,
    wsum: torch.Tensor | float = 1.0,
    kappa: float | None = None,
) -> torch.Tensor:
    """Mean over outputs of r2 of centred paths, constant-path rule and (optionally) the fp32 flag.

    Args:
        yc: ``(P, T, O)`` outputs centred over ``t`` (``sum_t yc = 0`` up to rounding).
        scale: ``(P, O)`` rounding scale of each output: its error is about ``eps * scale``.
        lam_c: ``(T,)`` centred lambdas.
        eps: machine epsilon of the computation.
        flag: write :data:`FLAGGED` for a pair whose estimated error (:func:`pair_error_estimate` of
            ``eps * scale``) exceeds :data:`FLAG_KAPPA` (this includes the constant rule firing on a nonzero scale).
        wsum: ``(O,)`` ``sum_h |W_kh|`` of the last Linear (centred outputs; 1 otherwise): the underflow policy
            ``std_t(yc_k) <= UNDERFLOW_TINY * wsum_k`` counts as constant.
        kappa: the flag's threshold (default :data:`FLAG_KAPPA`; the generic path's float64 check passes its own). In
            float64 an output the underflow policy calls constant whose rounding ``eps * scale_k`` is itself at or below
            ``UNDERFLOW_TINY * wsum_k`` adds nothing to the estimate (the policy's answer, not an unresolved one).

    Returns:
        ``(P,)`` values of ``L_ij`` (or :data:`FLAGGED`).
    """
    T = yc.shape[1]
    yc = yc - yc.mean(dim=1, keepdim=True)  # second pass: exact centring of rounding
    _, e = torch.frexp(yc.abs().amax(dim=1))  # the power of two scale_free divides by
    yc, scale = scale_free(yc, scale)
    cov = torch.matmul(lam_c, yc)  # [P, O]
    ss = yc.square().sum(dim=1)  # [P, O]  T * var(y)
    ll = torch.dot(lam_c, lam_c)  # T * var(lam)
    r2 = (cov * cov / (ss * ll)).clamp_(0.0, 1.0)
    std = (ss / T).sqrt()
    const = std <= CONST_RTOL * eps * scale
    tiny = None
    if yc.dtype == torch.float64:  # underflow policy (docs/lmn.md; fp32 never gets there: std 0 fires the rule above)
        e = e.clamp(-1021, 1021)
        tiny = torch.ldexp(std, e) <= UNDERFLOW_TINY * wsum
        const |= tiny
    r2 = torch.where(const, torch.ones_like(r2), r2)
    out = r2.mean(dim=1)
    if flag:
        err = eps * scale
        if tiny is not None:  # constant by the underflow policy with rounding below its threshold too: the policy's answer
            err = torch.where(tiny & (torch.ldexp(err, e) <= UNDERFLOW_TINY * wsum), torch.zeros_like(err), err)
        bad = pair_error_estimate(err, std, r2) > (FLAG_KAPPA if kappa is None else kappa)
        out = torch.where(bad, torch.full_like(out, FLAGGED), out)
    return out


def scale_free(yc: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``yc`` (``(P, T, O)``) and ``scale`` (``(P, O)``) divided, per output, by the power of two ``2^e`` nearest above
    ``max_t |yc|`` (exact: only exponents change), so the squares of the moments neither overflow nor underflow
    (docs/lmn.md, "Accuracy in the corners": unscaled, fp32 lost every output above ~1e19 and L read 0 or 1). r2, ``std / scale`` and
    the flag's
    ``kappa`` are unchanged by it."""
    _, e = torch.frexp(yc.abs().amax(dim=1))  # [P, O]; 0 -> e = 0
    lim = 125 if yc.dtype != torch.float64 else 1021  # 2^-e itself must be finite
    e = e.clamp_(-lim, lim)
    return torch.ldexp(yc, -e.unsqueeze(1)), torch.ldexp(scale, -e)


def pair_error_estimate(err: torch.Tensor, std: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """``(P,)`` estimate of the error of ``L_ij`` from the rounding ``err`` and spread ``std`` of each output.

    ``kappa_k = err_k / std_k`` is the relative perturbation of the centred path; it moves
    ``r2_k`` by about ``2 sqrt(r2_k (1 - r2_k)) kappa_k + kappa_k^2`` (first order in the residual of the
    linear fit, second order in the perturbation; ``r2 (1 - r2)`` floored at ``kappa``), at most 1.
    ``std == 0 < err`` gives 1.
    """
    kappa = torch.where(err > 0, err / std, torch.zeros_like(std))
    # r2 (1 - r2) floored at kappa: the computed r2 is itself off by ~kappa (a near-linear path can read r2 = 1)
    est = 2.0 * kappa * torch.maximum(r2 * (1.0 - r2), kappa).sqrt() + kappa * kappa
    return est.nan_to_num_(nan=1.0).clamp_(max=1.0).mean(dim=1)


def r2_from_paths(
    y: torch.Tensor,
    lam_c: torch.Tensor,
    eps: float,
    flag: bool = False,
    in_ratio: torch.Tensor | None = None,
    kappa: float | None = None,
) -> torch.Tensor:
    """:func:`r2_from_centred` of uncentred outputs ``(P, T, O)`` with scale ``max_t |y|`` (plus, with ``in_ratio``
    ``(P,)``, ``std_t(y) * in_ratio``: the input's rounding relative to the path, for the flag and the constant rule;
    ``kappa``: the flag's threshold, default ``FLAG_KAPPA``)."""
    amax = torch.maximum(y.amax(dim=1), -y.amin(dim=1))  # [P, O]  max_t |y|
    yc = y - y.mean(dim=1, keepdim=True)
    if in_ratio is not None:
        amax = amax + yc.abs().amax(dim=1) * in_ratio.unsqueeze(1)  # max_t |yc| >= std_t(y): no overflowing square
    return r2_from_centred(yc, amax, lam_c, eps, flag, kappa=kappa)


def triu_pair_chunks(n: int, chunk: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(i, j)`` index tensors covering every pair ``i < j`` of ``n`` items, ``chunk`` at a time."""
    counts = torch.arange(n - 1, -1, -1, device=device)  # pairs in row i: n - 1 - i
    offsets = torch.zeros(n + 1, dtype=torch.long, device=device)
    torch.cumsum(counts, 0, out=offsets[1:])
    total = n * (n - 1) // 2
    for p0 in range(0, total, chunk):
        p = torch.arange(p0, min(p0 + chunk, total), device=device)
        i = torch.searchsorted(offsets, p, right=True) - 1
        yield i, p - offsets[i] + i + 1


def default_chunk_bytes(device: torch.device) -> int:
    return (256 << 20) if device.type == "cuda" else (4 << 20)


def chunk_pairs(width: int, n_lambda: int, elem_bytes: int, device: torch.device, chunk_bytes: int | None) -> int:
    """Pairs per chunk so that one ``(P, T, width)`` activation block takes about ``chunk_bytes``."""
    if chunk_bytes is None:
        chunk_bytes = default_chunk_bytes(device)
    return max(1, chunk_bytes // max(1, n_lambda * width * elem_bytes))


def new_L(n: int, dtype: torch.dtype, device: torch.device, work_bytes: int) -> torch.Tensor:
    """The ``(N, N)`` output with a unit diagonal, allocated once, after checking that it and ``work_bytes`` of
    working memory fit (``MemoryError`` otherwise, before anything is allocated)."""
    elem = torch.empty((), dtype=dtype).element_size()
    check_fits(n * n * elem, int(work_bytes) + 64 * n, device)
    L = torch.empty(n, n, dtype=dtype, device=device)
    L.diagonal().fill_(1.0)
    return L


def _chunk_work(n: int, n_lambda: int, width: int, elem: int, chunk_bytes: int | None, device: torch.device) -> int:
    """Working bytes of one chunk: a few ``[P, T, width]`` blocks (never more than all pairs need)."""
    chunk = chunk_bytes if chunk_bytes is not None else default_chunk_bytes(device)
    return 4 * min(chunk, n * n // 2 * n_lambda * width * elem)


#: the tail's stages in the compute dtype: ``(activations, W^T, bias or None)``
Stages = list[tuple[list[Act], torch.Tensor, torch.Tensor | None]]


def _prepare(spec: MLPTail, dtype: torch.dtype, device: torch.device | None = None) -> Stages:
    return [
        (acts, lin.weight.to(device=device, dtype=dtype).t(), None if lin.bias is None else lin.bias.to(device=device, dtype=dtype))
        for acts, lin in spec.stages
    ]


def _pairs_values(
    z: torch.Tensor,
    spec: MLPTail,
    stages: Stages,
    i: torch.Tensor,
    j: torch.Tensor,
    n_lambda: int,
    flag: bool,
    u: torch.Tensor | None = None,
) -> torch.Tensor:
    """``L_ij`` of the pairs ``(i[p], j[p])`` from the absorbed ``z`` (``(P,)`` in ``z``'s dtype).

    ``u`` (``(N, O)`` float64, a lowered tail's skip term ``W_skip h``): the centred outputs gain ``lam_c (u_j - u_i)``
    (the difference in float64, rounded once) and ``|u_j - u_i|`` joins their rounding scale, as in the fused kernels.

    Alongside the forward, ``r`` (``(P, width)``) bounds the rounding of every layer's values in units of eps,
    propagated layer by layer (:func:`_through`, :func:`_linear_scale`, from ``max_t |x_0|``): the scale of the
    flag and the constant rule, including the inner layers' rounding for tails ending in an activation.
    """
    dtype, dev = z.dtype, z.device
    if u is not None and spec.final:
        raise ValueError("a skip term needs a tail that ends in a Linear (no trailing activation)")
    lam, lam_c = lambdas(n_lambda, dtype, dev)
    eps = torch.finfo(dtype).eps
    zi = z[i]
    x = torch.addcmul(zi.unsqueeze(1), lam.view(1, -1, 1), (z[j] - zi).unsqueeze(1))  # [P, T, H0]
    r = torch.maximum(x[:, 0].abs(), x[:, -1].abs())  # [P, H0] max_t |x_0|
    lin = True  # x still linear in t (the first layer's): slope bounds from its ends
    centred = not spec.final
    last = len(stages) - 1
    for s, (acts, wt, b) in enumerate(stages):
        if s == last and centred:
            last_act = acts[-1]
            for a in acts[:-1]:
                x, r = _act_step(a, x, r, lin)
                lin = lin and a.is_identity
            if last_act.name in SATURATING:  # offset free: the constant the unit saturates to never enters
                y = torch_offset_free(last_act.name, x, x[:, :1])
                r = _through(last_act, x, y, r, lin)
            else:
                y, r = _act_step(last_act, x, r, lin)
            yc = torch.matmul(y - y.mean(dim=1, keepdim=True), wt)  # [P, T, O], no bias
            scale = torch.matmul(r, wt.abs())
            if u is not None:  # skip term: exact and linear in lam
                du = (u[j] - u[i]).to(dtype)  # [P, O]
                yc = torch.addcmul(yc, lam_c.view(1, -1, 1), du.unsqueeze(1))
                scale = scale + du.abs()
            return r2_from_centred(yc, scale, lam_c, eps, flag, wt.abs().sum(dim=0))
        for a in acts:
            x, r = _act_step(a, x, r, lin)
            lin = lin and a.is_identity
        x = torch.matmul(x, wt) if b is None else torch.addmm(b, x.flatten(0, 1), wt).view(x.shape[0], n_lambda, -1)
        r = _linear_scale(r, wt, b, s == last)
        lin = False
    for a in spec.final:
        x, r = _act_step(a, x, r, lin)
        lin = lin and a.is_identity
    return r2_from_centred(x - x.mean(dim=1, keepdim=True), r, lam_c, eps, flag)


def _act_step(act: Act, x: torch.Tensor, r: torch.Tensor, linear: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(act(x), its rounding scale)`` from ``x`` and ``r`` (``linear``: ``x`` is the first layer's, linear in ``t``)."""
    if act.is_identity:
        return x, r
    a = act.torch(x, inplace=False)
    return a, _through(act, x, a, r, linear)


@torch.no_grad()
def connectivity_mlp(h: torch.Tensor, spec: MLPTail, n_lambda: int, chunk_bytes: int | None = None, flag: bool = False) -> torch.Tensor:
    """Connectivity matrix ``(N, N)`` of an MLP tail with chunked stock torch ops, in ``h``'s dtype.

    Peak extra memory: ``L`` (``N^2``) plus one chunk of activations (``chunk_bytes``, a few times).

    Args:
        h: ``(N, D)`` representations (fp32 or fp64, any device).
        spec: normalised MLP tail.
        n_lambda: interpolation points per pair.
        chunk_bytes: size of one chunk of activations.
        flag: write :data:`~grokfast_metrics.foundation.policy.FLAGGED` for pairs fp32 cannot resolve (``core`` recomputes them).

    Raises:
        MemoryError: ``L`` and a chunk cannot fit in the device's memory (checked before allocating).
    """
    dtype, dev = h.dtype, h.device
    n = h.shape[0]
    if spec.is_affine:  # affine tail: every path is a straight line, r2 = 1 exactly
        return torch.ones(n, n, dtype=dtype, device=dev)
    stages = _prepare(spec, dtype, dev)
    z, u = spec.absorb_rounded_once(h), spec.skip_values(h)  # z: float64, rounded once (MLPTail.absorb_rounded_once)
    width = max([z.shape[1]] + [w.shape[1] for _, w, _ in stages])
    L = new_L(n, dtype, dev, _chunk_work(n, n_lambda, width, h.element_size(), chunk_bytes, dev))
    chunk = chunk_pairs(width, n_lambda, h.element_size(), dev, chunk_bytes)
    for i, j in triu_pair_chunks(n, chunk, dev):
        v = _pairs_values(z, spec, stages, i, j, n_lambda, flag, u)
        L[i, j] = v
        L[j, i] = v
    return L


@torch.no_grad()
def mlp_pairs(
    h: torch.Tensor, spec: MLPTail, i: torch.Tensor, j: torch.Tensor, n_lambda: int, chunk_bytes: int | None = None
) -> torch.Tensor:
    """``L_ij`` of the listed pairs only, in ``h``'s dtype (the fp64 recompute of flagged pairs; a lowered tail's skip
    term included)."""
    stages = _prepare(spec, h.dtype, h.device)
    z, u = spec.absorb_rounded_once(h), spec.skip_values(h)
    width = max([z.shape[1]] + [w.shape[1] for _, w, _ in stages])
    chunk = chunk_pairs(width, n_lambda, h.element_size(), h.device, chunk_bytes)
    return torch.cat(
        [_pairs_values(z, spec, stages, i[c : c + chunk], j[c : c + chunk], n_lambda, False, u) for c in range(0, i.numel(), chunk)]
    )
