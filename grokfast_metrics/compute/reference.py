"""NumPy reference implementation of the linear mapping number (paper-literal, slow on purpose).

For every pair ``i < j`` it builds the ``T`` interpolation points ``h_i + lam_t (h_j - h_i)`` in the
space of ``h``, runs the *whole* tail layer by layer in float64 NumPy from the module's weights
(no absorption of the first Linear), takes the squared Pearson correlation of every output
dimension with ``lam`` and averages them. The activations' float64 formulas come from the one
activation table (``foundation.tail.ACTIVATIONS``; stable forms: GELU through ``erfc``, sigmoid/SiLU through
``e^{-|x|}``). This file is the fast yardstick the fused paths are checked against
(``grokfast_metrics.compute.exact`` is the arbitrary-precision one); it is not edited to match them.

Two exact rewritings keep it accurate on ill-conditioned paths (docs/lmn.md, "Accuracy contract"): when the
tail ends in a Linear, its output is taken centred over ``t`` *before* that Linear,
``yc = (a - mean_t a) W^T`` (r2 is shift invariant, so the bias and a logit offset shared along the path
never enter), and a saturating activation (sigmoid/tanh) just before it is taken offset free
(``sigmoid(x) - 1 = -sigmoid(-x)``; see ``foundation.tail.numpy_offset_free``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..foundation.policy import CONST_RTOL, UNDERFLOW_TINY
from ..foundation.tail import NumpyTail, _np_sigmoid, numpy_offset_free, numpy_tail
from .result import LMNResult


def pair_r2(y: np.ndarray, lam: np.ndarray, scale: np.ndarray | None = None, wsum: np.ndarray | float = 1.0) -> np.ndarray:
    """r2 of every column of ``y`` (``(T, O)``) with ``lam`` (``(T,)``), float64, the policies of docs/lmn.md, "Policies for the
    undefined cases".

    ``scale`` (``(O,)``): the rounding scale of each column (constant-path rule
    ``std_t(y_k) <= CONST_RTOL * eps * scale_k``); default ``max_t |y_k|``. ``wsum``: ``sum_h |W_kh|`` of the last
    Linear that made ``y`` (underflow policy ``std_t(y_k) <= UNDERFLOW_TINY * wsum_k``: constant).
    """
    eps = np.finfo(np.float64).eps
    if scale is None:
        scale = np.max(np.abs(y), axis=0)
    # r2 and std / scale are invariant under scaling an output: divide each by the power of two above max_t |y - mean|
    # (exact) so that its squares never overflow or underflow, whatever the scale of the weights or h (docs/lmn.md, "Accuracy in the
    # corners")
    _, e = np.frexp(np.max(np.abs(y - y.mean(axis=0)), axis=0))
    e = np.clip(e, -1021, 1021)
    y, scale = np.ldexp(y, -e), np.ldexp(scale, -e)
    tiny = np.ldexp(np.std(y, axis=0), e) <= UNDERFLOW_TINY * np.asarray(wsum, dtype=np.float64)  # absolute: scaled back
    out = np.empty(y.shape[1])
    for k in range(y.shape[1]):
        yk = y[:, k]
        if tiny[k] or np.std(yk) <= CONST_RTOL * eps * scale[k]:
            out[k] = 1.0  # constant along the path: a degenerate linear map
            continue
        cov = np.mean((yk - yk.mean()) * (lam - lam.mean()))
        out[k] = cov**2 / (np.var(yk) * np.var(lam))
    return out


def path_r2(x: np.ndarray, tail: NumpyTail, lam: np.ndarray) -> np.ndarray:
    """``r2_k`` of the path ``x`` (``(T, D)`` points in ``h``'s space) through a :class:`~._tail.NumpyTail`."""
    for f in tail.body:
        x = f(x)
    if tail.last is None:
        for f in tail.final:
            x = f(x)
        return pair_r2(x, lam)
    W, _ = tail.last
    if tail.sat is not None:  # x is the saturating activation's input
        a = numpy_offset_free(tail.sat, x, x[:1])
        k = 1.0 if tail.sat == "sigmoid" else 2.0  # |act'(x)| = k sigmoid(kx) sigmoid(-kx)
        slope = k * _np_sigmoid(k * x) * _np_sigmoid(-k * x)
        amax = (np.abs(a) + np.abs(x) * slope).max(axis=0)  # its own rounding plus x's, amplified by act'(x) (pointwise:
        # max_t |a| * max_t |x| grew like the scale of h squared and fired the constant rule; docs/lmn.md, "Accuracy in the corners")
    else:
        a = x
        amax = np.abs(a).max(axis=0)
    yc = (a - a.mean(axis=0)) @ W.T  # centred before the last Linear: no bias, no offset
    return pair_r2(yc, lam, np.abs(W) @ amax, np.abs(W).sum(axis=1))


def connectivity(h: Any, tail: nn.Module, n_lambda: int = 21) -> np.ndarray:
    """Linear connectivity matrix ``L`` (``(N, N)`` float64) by the paper's definition.

    Args:
        h: ``(N, D)`` representations (anything ``np.asarray`` accepts, or a torch tensor).
        tail: the network from that layer to the logits (``nn.Sequential`` of Linear + activations).
        n_lambda: interpolation points per pair, ``lam_t = t / (n_lambda - 1)``.

    Raises:
        ValueError: the tail has a layer other than ``nn.Linear`` and the supported activations.
    """
    if hasattr(h, "detach"):
        h = h.detach().cpu().double().numpy()
    h = np.asarray(h, dtype=np.float64)
    nt = numpy_tail(tail)
    lam = np.linspace(0.0, 1.0, n_lambda)
    n = h.shape[0]
    L = np.eye(n)
    with np.errstate(over="ignore", under="ignore"):
        for i in range(n):
            for j in range(i + 1, n):
                if np.array_equal(h[i], h[j]):
                    L[i, j] = L[j, i] = 1.0  # identical representations
                    continue
                x = h[i] + lam[:, None] * (h[j] - h[i])  # (T, D)
                L[i, j] = L[j, i] = path_r2(x, nt, lam).mean()
    return L


def lmn_from_connectivity(L: Any) -> LMNResult:
    """:class:`~grokfast_metrics.LMNResult` of a connectivity matrix in float64 NumPy (as :func:`grokfast_metrics.lmn_from_connectivity`).

    ``ev = |eigvalsh(L)|``; eigenvalues at or below ``N * eps * max(ev)`` are eigensolver rounding
    of exact zeros and count as 0; ``p = ev / sum(ev)``; ``S = -sum p log2 p``; ``LMN = 2**S``.
    ``eigenvalues`` (descending) and ``connectivity`` are float64 CPU tensors.
    """
    if hasattr(L, "detach"):
        L = L.detach().cpu().double().numpy()
    L = np.asarray(L, dtype=np.float64)
    ev = np.abs(np.linalg.eigvalsh(L))
    ev[ev <= L.shape[0] * np.finfo(np.float64).eps * ev.max()] = 0.0
    p = ev / ev.sum()
    nz = p[p > 0]
    s = float(-(nz * np.log2(nz)).sum())
    return LMNResult(
        lmn=float(2.0**s), entropy_bits=s, eigenvalues=torch.from_numpy(np.sort(ev)[::-1].copy()), connectivity=torch.from_numpy(L)
    )


def lmn(h: Any, tail: nn.Module, n_lambda: int = 21) -> LMNResult:
    """:class:`~grokfast_metrics.LMNResult` by the reference path (like :func:`grokfast_metrics.lmn`; float64 CPU tensors).

    >>> import torch
    >>> res = lmn(torch.eye(3), torch.nn.Linear(3, 2))   # an affine tail: L = 1 everywhere, LMN = 1
    >>> res.lmn, res.connectivity.shape
    (1.0, torch.Size([3, 3]))
    """
    return lmn_from_connectivity(connectivity(h, tail, n_lambda))
