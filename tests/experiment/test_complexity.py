"""Weight norms, spectral entropy and compression complexity against direct formulas and their properties."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from grokfast_metrics.experiment import complexity as cx


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 20), nn.SiLU(), nn.Linear(20, 20), nn.SiLU(), nn.Linear(20, 4))


def test_weight_norms_direct_formula():
    m = _mlp()
    res = cx.weight_norms(m)
    total = math.sqrt(sum(float((p.detach().double() ** 2).sum()) for p in m.parameters()))
    assert res["l2"] == pytest.approx(total, rel=1e-12)
    assert set(res["layers"]) == {"0", "2", "4"}
    last = math.sqrt(float((m[4].weight.detach().double() ** 2).sum() + (m[4].bias.detach().double() ** 2).sum()))
    assert res["last"] == pytest.approx(last, rel=1e-12)
    assert res["layers"]["2"] == pytest.approx(float(torch.cat([m[2].weight.flatten(), m[2].bias]).detach().double().norm()))


def test_spectral_entropy_direct_formula():
    w = torch.randn(7, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    p = s / s.sum()
    h = float(-(p * p.log()).sum())
    assert cx.spectral_entropy(w) == pytest.approx((h, math.exp(h)), rel=1e-12)


@pytest.mark.parametrize("r", [1, 2, 5])
def test_effective_rank_of_equal_spectrum(r):
    w = torch.zeros(8, 6, dtype=torch.float64)
    w[range(r), range(r)] = 3.0
    assert cx.spectral_entropy(w)[1] == pytest.approx(r, rel=1e-12)


def test_spectral_entropy_penalty_matches_and_has_gradient():
    m = _mlp()
    pen = cx.spectral_entropy_penalty(m)
    assert float(pen.detach()) == pytest.approx(sum(v["entropy"] for v in cx.spectral_entropies(m).values()), rel=1e-5)
    pen.backward()
    assert m[0].weight.grad is not None and bool(m[0].weight.grad.abs().sum() > 0)


def test_spectral_entropy_rejects_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        cx.spectral_entropy(torch.ones(3))


def _loss_fn(x, teacher):
    """MSE to the teacher's own outputs: the unmodified teacher has loss 0, coarse-graining costs loss."""
    with torch.no_grad():
        y = teacher(x)

    def f(model):
        return float(nn.functional.mse_loss(model(x), y))

    return f


@pytest.fixture(scope="module")
def x():
    return torch.randn(64, 6, generator=torch.Generator().manual_seed(2))


GRID = dict(bins=tuple(2.0**-k for k in range(10, -1, -2)), rank_fractions=(1.0, 0.9, 0.6))


def test_compression_deterministic_and_monotone(x):
    m = _mlp()
    before = [p.detach().clone() for p in m.parameters()]
    eps = (0.0, 1e-3, 1e-2, 1e-1, 1.0)
    a = cx.compression_complexity(m, _loss_fn(x, m), eps, **GRID)
    b = cx.compression_complexity(m, _loss_fn(x, m), eps, **GRID)
    assert a.bits == b.bits and a.settings == b.settings
    sizes = [a.bits[e] for e in sorted(eps)]
    assert all(x >= y for x, y in zip(sizes, sizes[1:]))
    assert sizes[-1] < sizes[0] <= a.raw_bits
    assert all(torch.equal(p, q) for p, q in zip(before, m.parameters()))


def test_low_rank_network_is_less_complex(x):
    m_rand = _mlp(3)
    m_low = _mlp(3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for lin in (m_low[0], m_low[2], m_low[4]):
            w = lin.weight
            u = torch.randn(w.shape[0], 1, generator=g)
            v = torch.randn(1, w.shape[1], generator=g)
            w.copy_(u @ v * w.norm() / (u @ v).norm())  # rank 1, same Frobenius norm
    eps = (1e-2,)
    low = cx.compression_complexity(m_low, _loss_fn(x, m_low), eps, **GRID).bits[1e-2]
    rnd = cx.compression_complexity(m_rand, _loss_fn(x, m_rand), eps, **GRID).bits[1e-2]
    assert low < rnd


def test_compression_bad_args(x):
    with pytest.raises(ValueError, match="epsilons"):
        cx.compression_complexity(_mlp(), _loss_fn(x, _mlp()), [-1.0])
    with pytest.raises(ValueError, match="compressor"):
        cx.compression_complexity(_mlp(), _loss_fn(x, _mlp()), [0.1], compressors=("zip",), **GRID)
