"""Grokfast EMA and MA filters against their direct formulas on a toy sequence of gradients."""

import pytest
import torch
from torch import nn

from grokfast_metrics.experiment.grokfast import EMAFilter, MAFilter, make_filter


def _grads(steps=12, shape=(3, 4), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(steps)]


def _run(filt, grads):
    p = nn.Parameter(torch.zeros(grads[0].shape, dtype=torch.float64))
    out = []
    for g in grads:
        p.grad = g.clone()
        filt([("w", p)])
        out.append(p.grad.clone())
    return out


@pytest.mark.parametrize("alpha, lamb", [(0.98, 2.0), (0.5, 1.0), (0.0, 3.0)])
def test_ema_matches_closed_form(alpha, lamb):
    grads = _grads()
    out = _run(EMAFilter(alpha, lamb), grads)
    for t, g in enumerate(grads):
        # s_t = alpha^t g_0 + sum_{k=1..t} (1 - alpha) alpha^(t-k) g_k
        s = alpha**t * grads[0] + sum((1 - alpha) * alpha ** (t - k) * grads[k] for k in range(1, t + 1))
        torch.testing.assert_close(out[t], g + lamb * s, atol=1e-12, rtol=0)


@pytest.mark.parametrize("window, lamb, warmup", [(4, 5.0, True), (4, 2.0, False), (1, 1.0, True)])
def test_ma_matches_window_mean(window, lamb, warmup):
    grads = _grads()
    out = _run(MAFilter(window, lamb, warmup), grads)
    for t, g in enumerate(grads):
        if warmup and t + 1 < window:
            expected = g
        else:
            recent = grads[max(0, t - window + 1) : t + 1]
            expected = g + lamb * torch.stack(recent).mean(0)
        torch.testing.assert_close(out[t], expected, atol=1e-12, rtol=0)


def test_filters_on_module_and_missing_grads():
    torch.manual_seed(0)
    m = nn.Linear(3, 2)
    f = EMAFilter(0.9, 2.0)
    m.weight.grad = torch.ones_like(m.weight)
    m.bias.grad = None
    f(m)
    torch.testing.assert_close(m.weight.grad, 3 * torch.ones_like(m.weight))  # first step: g + lamb * g
    assert m.bias.grad is None and "bias" not in f.state


def test_make_filter_and_errors():
    assert make_filter("none") is None
    assert isinstance(make_filter("ema"), EMAFilter) and isinstance(make_filter("ma"), MAFilter)
    for bad in (lambda: EMAFilter(1.0), lambda: EMAFilter(0.5, -1), lambda: MAFilter(0), lambda: make_filter("sgd")):
        with pytest.raises(ValueError):
            bad()
