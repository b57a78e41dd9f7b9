"""What the accuracy-corner tests and the fuzz run share (tests/compute/test_corners.py, the Triton saturating-unit
test, benchmarks/fuzz_corners.py): tails built into a corner (``narrow``, ``paper``), the cheap yardstick and the fuzz
draws (docs/lmn.md, "Accuracy in the corners")."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
from contract import CONTRACT, max_err
from helpers import Wrapped
from torch import nn

import grokfast_metrics as gm
from grokfast_metrics.compute import exact, reference
from grokfast_metrics.foundation.errors import NonFiniteOutputError

ACTS = {
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "relu": nn.ReLU,
}
TOL = CONTRACT  # the contract's one table (tests/support/contract.py)


def narrow(
    act: str,
    width: int,
    seed: int,
    gain: float = 1.5,
    bias: float | None = None,
    n: int = 6,
    d: int = 4,
    o: int = 3,
    h_offset: float = 0.0,
    scale: float = 1.0,
    h_scale: float = 1.0,
    dtype=torch.float32,
):
    """``(h, Linear(d, width) - act - Linear(width, o))``; ``bias`` fixes every hidden bias (saturation), ``scale``
    multiplies every weight and bias, ``h_scale`` / ``h_offset`` the representations."""
    g = torch.Generator().manual_seed(seed)
    l1, l2 = nn.Linear(d, width).double(), nn.Linear(width, o).double()  # scaled in fp64, then rounded once
    with torch.no_grad():
        l1.weight.copy_(torch.randn(width, d, generator=g) * gain)
        l1.bias.copy_(torch.randn(width, generator=g) * gain if bias is None else torch.full((width,), bias))
        l2.weight.copy_(torch.randn(o, width, generator=g))
        l2.bias.copy_(torch.randn(o, generator=g))
        for p in (*l1.parameters(), *l2.parameters()):
            p.mul_(scale)
    h = torch.randn(n, d, generator=g, dtype=torch.float64) * h_scale + h_offset
    return h.to(dtype), nn.Sequential(l1, ACTS[act](), l2).to(dtype)


def paper(seed: int = 0, n: int = 12, dtype=torch.float32, scale: float = 1.0, h_scale: float = 1.0):
    """The issue's tail ``Linear(100, 100) - SiLU - Linear(100, 31)`` with every weight times ``scale``."""
    torch.manual_seed(seed)
    tail = nn.Sequential(nn.Linear(100, 100), nn.SiLU(), nn.Linear(100, 31)).to(dtype)
    with torch.no_grad():
        for p in tail.parameters():
            p.mul_(scale)
    h = torch.randn(n, 100, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype) * h_scale
    return h, tail


err = max_err  # worst |L - X|, no assert (the fuzz run collects it)


def backends(dtype) -> list[str]:
    return ["auto", "torch"] if dtype == torch.float32 else ["auto", "torch", "reference"]


def _corner(rng: np.random.Generator):
    """One random corner: activation, width 1-5, weight scale 1e-6..1e30 (until the forward overflows fp32),
    h scale, a saturating bias, an h offset."""
    act = str(rng.choice(list(ACTS)))
    width = int(rng.integers(1, 6))
    kind = str(rng.choice(["scale", "h_scale", "bias", "offset", "plain"]))
    kw = {}
    if kind == "scale":
        kw["scale"] = float(10.0 ** rng.uniform(-6, 15))  # y ~ scale^2: fp32 overflows near 1e18
    elif kind == "h_scale":
        kw["h_scale"] = float(10.0 ** rng.uniform(-6, 30))
    elif kind == "bias":
        kw["bias"] = float(rng.choice([-1, 1]) * rng.uniform(3, 40))
    elif kind == "offset":
        kw["h_offset"] = float(rng.choice([-1, 1]) * 10.0 ** rng.uniform(0, 3))
    return act, width, kind, kw


def _check_corner(act, width, seed, kw, dtype, backends_=("auto", "torch")) -> dict:
    h, tail = narrow(act, width, seed, n=5, dtype=dtype, **kw)
    X = exact.connectivity(h, tail)
    out = {}
    for b in backends_:
        out[b] = err(gm.connectivity(h, tail, backend=b), X)
    return out


#: the fuzz's fp64 yardstick is trusted for a pair only where the torch fp64 path's own error estimate is below this
#: and it agrees with the reference to it (two independent float64 computations: absorbed ``z`` vs the whole tail from
#: ``h``); every other pair goes to ``exact``. 100x below the fp64 contract.
YARD_KAPPA = 1e-12


def yardstick(h: torch.Tensor, tail: nn.Module) -> tuple[np.ndarray, int]:
    """``(L, number of pairs sent to exact)``: the cheap yardstick of the fuzz.

    The float64 reference where it is provably close to exact: the torch fp64 path's error estimate (the fp32 flag's
    ``mean_k min(1, 2 kappa sqrt(r2 (1 - r2)) + kappa^2)``, computed in float64) below :data:`YARD_KAPPA` and the
    reference within :data:`YARD_KAPPA` of it; ``exact`` (mpmath) for the other pairs: ill-conditioned ones, those where
    a constant or underflow rule fires on a nonzero scale, and those where the two float64 paths disagree.
    """
    from grokfast_metrics.compute import torch_paths as torch_backend
    from grokfast_metrics.foundation.tail import parse_tail

    h64, t64 = h.detach().double(), copy.deepcopy(tail).double()
    R = reference.connectivity(h64, t64)
    old = torch_backend.FLAG_KAPPA
    torch_backend.FLAG_KAPPA = YARD_KAPPA
    try:
        F = torch_backend.connectivity_mlp(h64, parse_tail(t64), 21, flag=True).numpy()
    finally:
        torch_backend.FLAG_KAPPA = old
    n = h.shape[0]
    todo = [(i, j) for i in range(n) for j in range(i + 1, n) if F[i, j] < 0 or not abs(F[i, j] - R[i, j]) <= YARD_KAPPA]
    if todo:
        X = exact.connectivity(h, tail, pairs=todo)
        for i, j in todo:
            R[i, j] = R[j, i] = X[i, j]
    return R, len(todo)


#: what each fuzz draw checks: every backend that runs on the CPU (``generic``: the tail behind a custom forward, the
#: any-module path). The reference is the yardstick itself outside the pairs sent to exact: its error is the audit's.
FUZZ_BACKENDS = {torch.float32: ("auto", "torch", "generic"), torch.float64: ("auto", "torch", "generic")}
#: backends measured but not held to the contract (none now: see FUZZ_NAN_OK)
FUZZ_REPORT_ONLY: dict[torch.dtype, tuple[str, ...]] = {torch.float64: (), torch.float32: ()}
#: backends held to the contract *or NaN* (docs/lmn.md, "Accuracy in the corners"): the generic path cannot centre or take
#: a saturating unit offset free inside a module, so where a saturated unit's variation is lost in its float64 forward it
#: returns NaN for the pair (with a warning). A NaN pair is an explicit answer, not an error: the draw's error is taken
#: over the other pairs, and the NaN pairs are counted (key ``"nan:<backend>"``). A NaN from any other backend fails.
FUZZ_NAN_OK = ("generic",)


def fuzz_draw(rng: np.random.Generator, k: int, dtype, audit: bool = False, backends_=None) -> tuple[str, dict, int]:
    """One fuzz draw: ``(regime key, {backend: max abs error}, pairs sent to exact)``; ``audit``: also the cheap
    yardstick's own error against ``exact`` on every pair (key ``"yardstick"``). Raises ``NonFiniteOutputError``
    where the forward overflows (the contract there)."""
    act, width, kind, kw = _corner(rng)
    h, tail = narrow(act, width, k, n=5, dtype=dtype, **kw)
    Y, sent = yardstick(h, tail)
    out: dict[str, float] = {}
    for b in backends_ or FUZZ_BACKENDS[dtype]:
        if b == "generic":
            L = gm.connectivity(h, Wrapped(tail), backend="torch")
        else:
            L = gm.connectivity(h, tail, backend=b)
        nan = torch.isnan(L)
        if b in FUZZ_NAN_OK and bool(nan.any()):
            out[f"nan:{b}"] = int(nan.sum()) // 2
            out[b] = err(L, Y, ~nan.numpy()) if not bool(nan.all()) else 0.0
        else:
            out[b] = err(L, Y) if not bool(nan.any()) else float("inf")  # NaN elsewhere: a failure
    if audit:
        out["yardstick"] = float(np.abs(Y - exact.connectivity(h, tail)).max())
    return f"{kind}/{act}", out, sent


def fuzz_run(draws: int, dtype, seed: int, audit_every: int = 0, log=None, backends_=None) -> dict:
    """``draws`` fuzz draws; returns ``{"worst": {regime: {backend: err}}, "overflow": n, "exact_pairs": n, ...}``
    (``backends_``: instead of :data:`FUZZ_BACKENDS`, e.g. ``("triton",)`` under ``TRITON_INTERPRET=1``)."""
    rng = np.random.default_rng(seed)
    worst: dict[str, dict[str, float]] = {}
    stats = {"draws": draws, "overflow": 0, "exact_pairs": 0, "pairs": 0, "audited": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(draws):
            audit = audit_every > 0 and k % audit_every == 0
            try:
                key, e, sent = fuzz_draw(rng, k, dtype, audit, backends_)
            except NonFiniteOutputError:
                stats["overflow"] += 1  # the forward overflowed: a clear error is the contract there
                continue
            stats["exact_pairs"] += sent
            stats["pairs"] += 10
            stats["audited"] += audit
            w = worst.setdefault(key, {})
            for b, v in e.items():
                w[b] = w.get(b, 0) + v if b.startswith("nan:") else max(w.get(b, 0.0), v)  # NaN pairs: counted
            if log is not None:
                log(k, key, e, sent)
    stats["worst"] = worst
    return stats


def fuzz_failures(stats: dict, dtype) -> dict:
    """``{regime/backend: err}`` over the contract (report-only backends, NaN-pair counts and the audit excluded)."""
    skip = {"yardstick", *FUZZ_REPORT_ONLY[dtype]}
    return {
        f"{key}/{b}": v
        for key, w in stats["worst"].items()
        for b, v in w.items()
        if b not in skip and not b.startswith("nan:") and not v <= TOL[dtype]
    }
