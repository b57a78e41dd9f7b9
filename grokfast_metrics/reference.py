"""NumPy reference implementation of the linear mapping number (paper-literal, slow on purpose).

For every pair ``i < j`` it builds the ``T`` interpolation points ``h_i + lam_t (h_j - h_i)`` in the
space of ``h``, runs the *whole* tail layer by layer in float64 NumPy from the module's weights
(no absorption of the first Linear), takes the squared Pearson correlation of every output
dimension with ``lam`` and averages them. This file is the yardstick the fast paths are checked
against; it is not edited to match them.
"""
from __future__ import annotations

import math

import numpy as np
from torch import nn

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _erf(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return erf(x)


def _np_layers(tail: nn.Module) -> list:
    """The tail as a list of NumPy callables (float64). Raises ValueError for unsupported layers."""
    mods = list(tail) if isinstance(tail, nn.Sequential) else [tail]
    layers = []
    for m in mods:
        if isinstance(m, nn.Sequential):
            layers.extend(_np_layers(m))
        elif type(m) is nn.Linear:
            W = m.weight.detach().cpu().double().numpy()
            b = None if m.bias is None else m.bias.detach().cpu().double().numpy()
            layers.append(lambda x, W=W, b=b: x @ W.T + (0.0 if b is None else b))
        elif isinstance(m, nn.Identity):
            layers.append(lambda x: x)
        elif isinstance(m, nn.SiLU):
            layers.append(lambda x: x / (1.0 + np.exp(-x)))
        elif isinstance(m, nn.ReLU):
            layers.append(lambda x: np.maximum(x, 0.0))
        elif isinstance(m, nn.LeakyReLU):
            s = float(m.negative_slope)
            layers.append(lambda x, s=s: np.where(x >= 0.0, x, s * x))
        elif isinstance(m, nn.GELU) and m.approximate == "tanh":
            layers.append(lambda x: 0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3))))
        elif isinstance(m, nn.GELU):
            layers.append(lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))))
        elif isinstance(m, nn.Tanh):
            layers.append(np.tanh)
        elif isinstance(m, nn.Sigmoid):
            layers.append(lambda x: 1.0 / (1.0 + np.exp(-x)))
        else:
            raise ValueError(
                f"the reference backend runs nn.Linear and elementwise activations only; got {type(m).__name__}"
            )
    return layers


def pair_r2(y: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """r2 of every column of ``y`` (``(T, O)``) with ``lam`` (``(T,)``), float64, SPEC §1 policies."""
    eps = np.finfo(np.float64).eps
    out = np.empty(y.shape[1])
    for k in range(y.shape[1]):
        yk = y[:, k]
        if np.std(yk) <= 16 * eps * np.max(np.abs(yk)):
            out[k] = 1.0  # constant along the path: a degenerate linear map
            continue
        cov = np.mean((yk - yk.mean()) * (lam - lam.mean()))
        out[k] = cov**2 / (np.var(yk) * np.var(lam))
    return out


def connectivity(h, tail: nn.Module, n_lambda: int = 21) -> np.ndarray:
    """Linear connectivity matrix ``L`` (``(N, N)`` float64) by the paper's definition.

    Args:
        h: ``(N, D)`` representations (anything ``np.asarray`` accepts, or a torch tensor).
        tail: the network from that layer to the logits (``nn.Sequential`` of Linear + activations).
        n_lambda: interpolation points per pair, ``lam_t = t / (n_lambda - 1)``.
    """
    if hasattr(h, "detach"):
        h = h.detach().cpu().double().numpy()
    h = np.asarray(h, dtype=np.float64)
    layers = _np_layers(tail)
    lam = np.linspace(0.0, 1.0, n_lambda)
    n = h.shape[0]
    L = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            if np.array_equal(h[i], h[j]):
                L[i, j] = L[j, i] = 1.0  # identical representations
                continue
            y = h[i] + lam[:, None] * (h[j] - h[i])      # (T, D)
            for f in layers:
                y = f(y)
            L[i, j] = L[j, i] = pair_r2(y, lam).mean()
    return L


def lmn_from_connectivity(L) -> tuple[float, float, np.ndarray]:
    """``(lmn, entropy_bits, eigenvalues)`` of a connectivity matrix, float64.

    ``ev = |eigvalsh(L)|``; eigenvalues at or below ``N * eps * max(ev)`` are eigensolver rounding
    of exact zeros and count as 0; ``p = ev / sum(ev)``; ``S = -sum p log2 p``; ``LMN = 2**S``.
    """
    if hasattr(L, "detach"):
        L = L.detach().cpu().double().numpy()
    L = np.asarray(L, dtype=np.float64)
    ev = np.abs(np.linalg.eigvalsh(L))
    ev[ev <= L.shape[0] * np.finfo(np.float64).eps * ev.max()] = 0.0
    p = ev / ev.sum()
    nz = p[p > 0]
    s = float(-(nz * np.log2(nz)).sum())
    return float(2.0**s), s, ev


def lmn(h, tail: nn.Module, n_lambda: int = 21) -> tuple[float, float, np.ndarray, np.ndarray]:
    """``(lmn, entropy_bits, eigenvalues, L)`` by the reference path."""
    L = connectivity(h, tail, n_lambda)
    value, s, ev = lmn_from_connectivity(L)
    return value, s, ev, L
