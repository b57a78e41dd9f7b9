"""Arbitrary-precision yardstick for the connectivity matrix (small problems only).

``L`` is a property of the exact function: the tail as a mathematical function of its *stored*
weights, evaluated at the stored ``h``. This module evaluates it with ``mpmath`` at ``dps`` decimal
digits (default 50): every weight and every entry of ``h`` is converted exactly (a binary float is a
rational number), the whole tail runs from ``h`` layer by layer (nothing absorbed, no centring
tricks: the precision makes them unnecessary), and ``r2_k`` is the squared Pearson correlation with
``lam_t = t/(T-1)``. A path output whose variation is below :data:`TINY` (1e-300: no float64 number resolves it)
counts as constant (``r2 = 1``).

It costs about ``N^2/2 * T * (sum of layer sizes)`` multiprecision operations: keep ``N`` and the
widths small (``N <= 12``, widths <= ~30). Tests use it to arbitrate between backends.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from torch import nn

from ..foundation.tail import _flatten, activation_of

try:  # pragma: no cover - import guard
    import mpmath
except ImportError:  # pragma: no cover
    mpmath = None


def _mp_act(name: str, slope: float) -> Callable[[Any], Any]:
    mp = mpmath.mp
    s2 = mp.sqrt(2)
    k = mp.sqrt(2 / mp.pi)
    c = mp.mpf("0.044715")
    table = {
        "identity": lambda x: x,
        "silu": lambda x: x / (1 + mp.exp(-x)),
        "relu": lambda x: x if x > 0 else mp.zero,
        "gelu": lambda x: x * mp.erfc(-x / s2) / 2,
        "gelu_tanh": lambda x: x / (1 + mp.exp(-2 * k * (x + c * x**3))),  # = x (1 + tanh u) / 2, no cancellation
        "tanh": lambda x: mp.tanh(x),
        "sigmoid": lambda x: 1 / (1 + mp.exp(-x)),
        "leaky_relu": lambda x: x if x >= 0 else mp.mpf(slope) * x,
    }
    return table[name]


#: one layer of the tail in mpmath: ``("linear", W rows, bias or None)`` or ``("act", function, None)``
Layer = tuple[str, Any, Any]


def _layers(tail: nn.Module) -> list[Layer]:
    layers = _flatten(tail)
    if layers is None:
        raise ValueError("exact: the tail must be a plain nn.Sequential of nn.Linear and supported activations")
    out: list[Layer] = []
    for m in layers:
        if type(m) is nn.Linear:
            W = m.weight.detach().cpu().double().numpy()
            b = None if m.bias is None else m.bias.detach().cpu().double().numpy()
            Wm = [[mpmath.mpf(float(v)) for v in row] for row in W]
            bm = None if b is None else [mpmath.mpf(float(v)) for v in b]
            out.append(("linear", Wm, bm))
            continue
        act = activation_of(m)
        if act is None:
            raise ValueError(f"exact: unsupported layer {type(m).__name__}")
        out.append(("act", _mp_act(act.name, act.slope), None))
    return out


def _forward(layers: list[Layer], x: list[Any]) -> list[Any]:
    for kind, a, b in layers:
        if kind == "linear":
            x = [mpmath.fsum(w * v for w, v in zip(row, x)) + (b[o] if b is not None else 0) for o, row in enumerate(a)]
        else:
            x = [a(v) for v in x]
    return x


#: most digits :func:`pair_r2` raises its precision to when a path's variation is lost under its offset
MAX_DPS = 2000
#: an output whose exact spread over the path (``std_t``) is below this counts as constant (``r2 = 1``): it is below
#: the smallest normal float64 number (2.2e-308), so no floating-point backend can resolve it (e.g. a tanh unit at
#: ``x ~ 1e3`` varies by ``e^-2000``). The constant-path rule of docs/lmn.md, "Policies for the undefined cases", in the yardstick.
TINY = 1e-300


def pair_r2(h: Any, tail: nn.Module, i: int, j: int, n_lambda: int = 21, dps: int = 50) -> np.ndarray:
    """Exact ``r2_k`` (``(O,)`` float64, rounded from ``dps`` digits) of the path from ``h[i]`` to ``h[j]``.

    Adaptive: an output whose spread over the path is below ``10^-(dps - 20)`` of its magnitude (a deeply saturated
    unit under a bias: its variation would be lost in the working precision; docs/lmn.md, "Accuracy in the corners") is recomputed with
    4x the
    digits, up to :data:`MAX_DPS`; an output still constant there counts as constant.
    """
    while True:
        out, unresolved = _pair_r2(h, tail, i, j, n_lambda, dps)
        if not unresolved or dps >= MAX_DPS:
            return out
        dps = min(MAX_DPS, 4 * dps)


def _pair_r2(h: Any, tail: nn.Module, i: int, j: int, n_lambda: int, dps: int) -> tuple[np.ndarray, bool]:
    if mpmath is None:  # pragma: no cover
        raise ImportError("grokfast_metrics.compute.exact needs mpmath (pip install mpmath)")
    if hasattr(h, "detach"):
        h = h.detach().cpu().double().numpy()
    unresolved = False
    with mpmath.workdps(dps):
        tiny = mpmath.mpf(10) ** (20 - dps)
        layers = _layers(tail)
        hi = [mpmath.mpf(float(v)) for v in h[i]]
        hj = [mpmath.mpf(float(v)) for v in h[j]]
        T = n_lambda
        lam = [mpmath.mpf(t) / (T - 1) for t in range(T)]
        ys = [_forward(layers, [a + l * (b - a) for a, b in zip(hi, hj)]) for l in lam]
        lc = [l - mpmath.mpf(1) / 2 for l in lam]
        ll = mpmath.fsum(v * v for v in lc)
        out = []
        for k in range(len(ys[0])):
            col = [y[k] for y in ys]
            mean = mpmath.fsum(col) / T
            yc = [v - mean for v in col]
            ss = mpmath.fsum(v * v for v in yc)
            big = max(abs(v) for v in col)
            if ss <= (tiny * big) ** 2 * T:  # the variation may be lost in this precision (exactly 0 included)
                unresolved = True
            if ss <= T * mpmath.mpf(TINY) ** 2:
                out.append(1.0)
                continue
            cov = mpmath.fsum(a * b for a, b in zip(yc, lc))
            out.append(float(cov * cov / (ss * ll)))
    return np.asarray(out), unresolved


def connectivity(h: Any, tail: nn.Module, n_lambda: int = 21, dps: int = 50,
                 pairs: Iterable[tuple[int, int]] | None = None) -> np.ndarray:
    """Exact ``L`` (``(N, N)`` float64). ``pairs``: only these ``(i, j)`` (others left NaN)."""
    if hasattr(h, "detach"):
        h = h.detach().cpu().double().numpy()
    h = np.asarray(h, dtype=np.float64)
    n = h.shape[0]
    L = np.full((n, n), np.nan) if pairs is not None else np.eye(n)
    np.fill_diagonal(L, 1.0)
    todo = pairs if pairs is not None else [(i, j) for i in range(n) for j in range(i + 1, n)]
    for i, j in todo:
        v = 1.0 if np.array_equal(h[i], h[j]) else float(pair_r2(h, tail, i, j, n_lambda, dps).mean())
        L[i, j] = L[j, i] = v
    return L
