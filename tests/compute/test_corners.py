"""The accuracy contract in the corners (docs/lmn.md, "Accuracy in the corners"): scale, narrow tails, saturation, offsets, diverging runs.

Each row of the issue's table is a test here, against the exact yardstick (``grokfast_metrics.compute.exact``, mpmath,
adaptive precision) for small tails or the float64 NumPy reference (scale-free, checked against ``exact`` below)
for the paper-sized ones. Contract: 1e-5 (fp32) / 1e-10 (fp64); every assert keeps >= 5x margin to the worst error
observed (recorded beside it). ``pytest -m fuzz`` draws these corners at random (``GROKFAST_METRICS_FUZZ_DRAWS``, default 200).
"""
from __future__ import annotations

import copy
import os
import pathlib
import warnings

import numpy as np
import pytest
import torch
from contract import CONTRACT, max_err
from helpers import Wrapped
from torch import nn

import grokfast_metrics as gm
from grokfast_metrics.compute import exact, reference
from grokfast_metrics.foundation.errors import NonFiniteOutputError

ACTS = {"silu": nn.SiLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid, "leaky_relu": nn.LeakyReLU, "relu": nn.ReLU}
TOL = CONTRACT  # the contract's one table (tests/support/contract.py)


def narrow(act: str, width: int, seed: int, gain: float = 1.5, bias: float | None = None, n: int = 6, d: int = 4,
           o: int = 3, h_offset: float = 0.0, scale: float = 1.0, h_scale: float = 1.0, dtype=torch.float32):
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


# ---------------------------------------------------------------------------------------------------------------
# rows 1-3: scale (moments overflowing in fp32, the rounding scale growing like the square of the scale in fp64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-6, 1e10, 1e12, 1e13, 1e14])
def test_weight_scale_paper_tail(dtype, scale):
    """Row 1-2: every weight x1e10..1e14 gave LMN 29.7 / N (C++ fp32), 1.76 / 1.64 (fp64) against 4.46."""
    h, tail = paper(dtype=dtype, scale=scale)
    X = reference.connectivity(h, tail)
    for b in backends(dtype)[:2]:
        L = gm.connectivity(h, tail, backend=b)
        assert err(L, X) <= TOL[dtype] / 5, (b, scale)  # worst observed 4.8e-7 fp32, 4.4e-15 fp64 (before: 0.97)


@pytest.mark.parametrize("h_scale", [1e-6, 1e20, 1e30])
def test_h_scale_paper_tail(h_scale):
    """Row 3: h x1e20 / 1e30 gave LMN 12 = N (auto), 1.0 (torch, torch fp64) against 4.0."""
    h, tail = paper(h_scale=h_scale)
    X = reference.connectivity(h, tail)
    for b in ("auto", "torch"):
        assert err(gm.connectivity(h, tail, backend=b), X) <= 2e-6, b            # worst observed 3.6e-7
    t64 = copy.deepcopy(tail).double()
    for b in ("auto", "torch"):
        assert err(gm.connectivity(h.double(), t64, backend=b), X) <= 2e-11, b   # worst observed 2.2e-15


def test_reference_is_scale_free_against_exact():
    """The fp64 reference (the yardstick of the paper-sized rows) agrees with exact at every scale."""
    for scale in (1.0, 1e14, 1e80):
        h, tail = narrow("silu", 5, 0, scale=scale, n=5, dtype=torch.float64)
        X = exact.connectivity(h, tail)
        assert float(np.abs(reference.connectivity(h, tail) - X).max()) <= 1e-11
        # worst observed 4.4e-16 (1e80: outputs ~1e160, their squares overflowed before)


def test_overflowing_forward_is_a_clear_error():
    """Where the forward itself overflows, a clear error, never L = 0 or LMN = N."""
    h, tail = paper(scale=1e20)
    for b in ("auto", "torch"):
        with pytest.raises(NonFiniteOutputError, match="overflows"):
            gm.connectivity(h, tail, backend=b)


# ---------------------------------------------------------------------------------------------------------------
# rows 5-8: narrow and saturated tails (the flag must see the curvature of a single unit)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_gelu_width_one_25_seeds(act):
    """Row 5: a GELU tail of width 1 was up to 0.18 off (C++ fp32: erf form, 1.5e-7 absolute error)."""
    worst = {"auto": 0.0, "torch": 0.0}
    for seed in range(25):
        h, tail = narrow(act, 1, seed, n=6)
        X = exact.connectivity(h, tail)
        for b in worst:
            worst[b] = max(worst[b], err(gm.connectivity(h, tail, backend=b), X))
    assert max(worst.values()) <= 2e-6, worst  # worst observed 1.4e-6 gelu, 6.9e-7 gelu_tanh (before: 0.73 / 0.80)


def test_silu_x100_width_one():
    """Row 6: SiLU x100, width 1: pre-activations ~ -500 underflow in fp32 (outputs exactly constant, r2 read 1)."""
    for seed in range(6):
        h, tail = narrow("silu", 1, seed, scale=100.0)
        X = exact.connectivity(h, tail)
        for b in ("auto", "torch"):
            assert err(gm.connectivity(h, tail, backend=b), X) <= 2e-6, (b, seed)  # worst observed 3e-7 (before: 0.86)


def test_gelu_tanh_bias_minus_12():
    """Row 7: GELU-tanh with bias -12 (x sigmoid(2u) ~ e^-140): LMN 1.00 vs 4.80 in C++ fp32."""
    for seed in range(3):
        h, tail = narrow("gelu_tanh", 4, seed, bias=-12.0)
        X = exact.connectivity(h, tail)
        for b in ("auto", "torch"):
            assert err(gm.connectivity(h, tail, backend=b), X) <= 2e-6, (b, seed)  # worst observed 2.5e-8 (before: 0.91)


def _leaky_tail(seed: int, width: int, deep: bool):
    g = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(4, width), nn.LeakyReLU()] + ([nn.Linear(width, width), nn.LeakyReLU()] if deep else [])
    tail = nn.Sequential(*layers, nn.Linear(width, 3))
    with torch.no_grad():
        for p in tail.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 1.5)
    return torch.randn(6, 4, generator=g), tail


@pytest.mark.parametrize("seed, width, deep, offset", [(1, 4, True, 100.0), (0, 2, False, 1000.0), (0, 4, False, 100.0)])
def test_leaky_relu_h_offset_generic(seed, width, deep, offset):
    """Row 8: LeakyReLU tail, h offset 100 / 1000, on the generic path (any module: it cannot centre or see inside,
    so an offset on h cancelled inside the module went unflagged: 1.4e-5 / 1.3e-5 before) and the MLP paths."""
    h, tail = _leaky_tail(seed, width, deep)
    h = h + offset
    X = exact.connectivity(h, tail)
    assert err(gm.connectivity(h, Wrapped(tail), backend="torch"), X) <= 2e-6   # worst observed 1.3e-6
    for b in ("auto", "torch"):
        assert err(gm.connectivity(h, tail, backend=b), X) <= 2e-6, b          # worst observed 2.4e-7


# ---------------------------------------------------------------------------------------------------------------
# row 4: the trainer on a diverging run


def test_diverging_run_logs_the_exact_contract_value():
    """Row 4: ``train --lr 1e6``: step 1 logged LMN = the probe size; now the reference's value (or NaN)."""
    from grokfast_metrics.experiment import trainer as train
    from grokfast_metrics.experiment.config import TrainConfig
    from grokfast_metrics.experiment.model import representations

    cfg = TrainConfig(lr=1e6, steps=1, probe="24", lmn_every=1, hidden=20, embed_dim=8).resolved()
    import tempfile

    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = train.setup(cfg, pathlib.Path(d))
        train.forward_backward(run, 0, False)
        train.optimizer_step(run)
        res = train.track_lmn(run.model, run.data["x_probe"], ["hidden1_post"])["hidden1_post"]
        h, tail = representations(run.model, run.data["x_probe"], ["hidden1_post"])["hidden1_post"]
        assert float(h.abs().max()) > 1e6  # a diverging run indeed
        want = reference.lmn(h, tail).lmn
    assert res.lmn < 24 - 1e-3
    assert abs(res.lmn - want) <= 2e-6 * want  # worst observed 4e-8 relative (before: LMN = 24)


# ---------------------------------------------------------------------------------------------------------------
# the yardstick sweep: scales, widths 1-5, every activation pushed into saturation, offsets, against exact


def _corner(rng: np.random.Generator):
    """One random corner: activation, width 1-5, weight scale 1e-6..1e30 (until the forward overflows fp32),
    h scale, a saturating bias, an h offset."""
    act = str(rng.choice(list(ACTS)))
    width = int(rng.integers(1, 6))
    kind = str(rng.choice(["scale", "h_scale", "bias", "offset", "plain"]))
    kw = {}
    if kind == "scale":
        kw["scale"] = float(10.0 ** rng.uniform(-6, 15))   # y ~ scale^2: fp32 overflows near 1e18
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


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sweep_activation_width_scale(act, dtype):
    """Every activation, widths 1-5, weights x1e-6 / 1e12, h x1e20, biases +-20 (saturation), h offset 100."""
    worst = 0.0
    cases = [{"scale": 1e-6}, {"scale": 1e12}, {"h_scale": 1e20}, {"bias": -20.0}, {"bias": 20.0}, {"h_offset": 100.0}]
    for width in range(1, 6):
        kw = cases[width % len(cases)]
        for extra in (kw, cases[(width + 3) % len(cases)]):
            e = _check_corner(act, width, width, extra, dtype)
            worst = max(worst, *e.values())
    assert worst <= TOL[dtype] / 5, worst  # worst observed 1.5e-6 fp32, 2.2e-13 fp64... see docs/lmn.md


@pytest.mark.fuzz
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fuzz_corners(dtype):
    """``pytest -m fuzz``: random corners (``GROKFAST_METRICS_FUZZ_DRAWS`` draws, default 200) against exact, auto and torch.

    The recorded fuzz run (fp64, 300 draws; its one open draw, and why fp32 did not finish) is in docs/lmn.md.
    """
    draws = int(os.environ.get("GROKFAST_METRICS_FUZZ_DRAWS", "200"))
    rng = np.random.default_rng(24 + (dtype == torch.float64))
    worst: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(draws):
            act, width, kind, kw = _corner(rng)
            try:
                e = _check_corner(act, width, k, kw, dtype)
            except NonFiniteOutputError:
                continue  # the forward overflowed: a clear error is the contract there
            key = f"{kind}/{act}"
            worst[key] = max(worst.get(key, 0.0), *e.values())
            if (k + 1) % 100 == 0:
                print(k + 1, "draws:", max(worst.values()), flush=True)
    print({k: f"{v:.2g}" for k, v in sorted(worst.items())})
    assert max(worst.values()) <= TOL[dtype], worst
