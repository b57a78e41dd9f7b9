"""``LMNTracker`` (docs/dropin.md): catch-up schedule, steps, fail fast, several layers, state, torchmetrics semantics."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import load_example
from torch import nn

import grokfast_metrics as gm

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.SiLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _x(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(5))


# --------------------------------------------------------------------------------------------
# 3: stale values


def test_scheduled_steps_are_caught_up():
    tr = gm.LMNTracker(_model(), _x(), at="1", every="log", n_lambda=5)
    for step in range(0, 301, 100):  # update only in a logging block
        tr.update(step)
    assert [r["step"] for r in tr.history] == [0, 100, 200, 300]
    tr = gm.LMNTracker(_model(), _x(), at="1", every=150, n_lambda=5)
    got = [tr.update(s) for s in (0, 100, 200, 300, 400)]
    assert [g is not None for g in got] == [True, False, True, True, False]
    assert [r["step"] for r in tr.history] == [0, 200, 300]
    assert tr.last_step == 300 and tr.compute(with_step=True) == (300, tr.compute())


def test_force_computes_off_schedule():
    tr = gm.LMNTracker(_model(), _x(), at="1", every=1000, n_lambda=5)
    assert tr.update(0) is not None and tr.update(7) is None
    assert tr.update(8, force=True) == tr.compute() and tr.last_step == 8
    assert tr.update(1000) is not None


@pytest.mark.parametrize(
    "bad, err", [(1.5, TypeError), ("3", TypeError), (torch.tensor(2.0), TypeError), (True, TypeError), (-1, ValueError)]
)
def test_bad_steps_are_errors(bad, err):
    tr = gm.LMNTracker(_model(), _x(), at="1", n_lambda=5)
    with pytest.raises(err, match="step"):
        tr.update(bad)


def test_repeated_or_decreasing_steps_are_errors():
    tr = gm.LMNTracker(_model(), _x(), at="1", every=10, n_lambda=5)
    tr.update(0)
    tr.update(5)
    with pytest.raises(ValueError, match=r"update\(step=5\) after update\(step=5\): steps must increase"):
        tr.update(5)
    with pytest.raises(ValueError, match="steps must increase"):
        tr.update(3)
    tr.update(torch.tensor(10))  # 0-d integer tensors are steps
    tr.reset()
    assert tr.update(0) is not None  # reset starts over


# --------------------------------------------------------------------------------------------
# 6: fail fast


@pytest.fixture(scope="module")
def decoder():
    g = load_example("grokfast_transformer")
    torch.manual_seed(0)
    model = g.Decoder(dim=8, num_layers=2, num_heads=2, num_tokens=9, seq_len=5)
    probe = g.modular_data(7, 7, 8)[:-1, :10]  # (4, 10), sequence-first
    return model, probe


def test_fails_fast_with_the_library_messages(decoder):
    model, probe = decoder
    kw = dict(output=lambda o: o[-1], batch_dim=1)
    with pytest.raises(ValueError, match=r"no submodule named 'layer.0'.*Did you mean 'layers\.0'"):
        gm.LMNTracker(model, probe, at="layer.0", **kw)
    with pytest.raises(ValueError, match=r"integer tensor"):
        gm.LMNTracker(model, probe.float(), at="layers.0", **kw)
    with pytest.raises(ValueError, match=r"failed on the probe inputs \(inputs\[0\] \(10, 4\).*layout"):
        gm.LMNTracker(model, probe.T.contiguous(), at="layers.0", output=lambda o: o[-1], batch_dim=0)
    with pytest.raises(ValueError, match=r"'layers\.0\.attn' is not a cut.*at='layers\.0'"):
        gm.LMNTracker(model, probe, at="layers.0.attn", **kw)
    with pytest.raises(ValueError, match="backend='cpu' cannot run"):
        gm.LMNTracker(model, probe, at="layers.0", backend="cpu", **kw)
    with pytest.raises(ValueError, match="n_lambda"):
        gm.LMNTracker(model, probe, at="layers.0", n_lambda=2, **kw)


# --------------------------------------------------------------------------------------------
# 9: several layers


def test_several_layers_in_one_tracker():
    model, x = _model(), _x()
    tr = gm.LMNTracker(model, x, at=["1", "2"], every=2, n_lambda=5)
    v = tr.update(0)
    want = {a: gm.lmn_at(model, x, at=a, n_lambda=5) for a in ("1", "2")}
    assert v == tr.compute() == {a: r.lmn for a, r in want.items()}
    tr.update(1)
    tr.update(2)
    d = tr.as_dict()
    assert d["step"] == [0, 0, 2, 2] and d["at"] == ["1", "2", "1", "2"]
    assert d["entropy_bits"][:2] == [want["1"].entropy_bits, want["2"].entropy_bits]
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="NaN"):
        out = tr.update(4)
    assert set(out) == {"1", "2"} and all(math.isnan(v) for v in out.values())


# --------------------------------------------------------------------------------------------
# state, copies


def test_state_dict_round_trip_and_copies_share_the_model():
    model, x = _model(), _x()
    tr = gm.LMNTracker(model, x, at="1", every=10, n_lambda=5)
    tr.update(0)
    tr.update(12)
    state = tr.state_dict()
    fresh = gm.LMNTracker(model, x, at="1", every=10, n_lambda=5)
    fresh.load_state_dict(copy.deepcopy(state))
    assert fresh.history == tr.history and fresh.last_step == 12
    assert fresh.update(15) is None and fresh.update(20) is not None  # the schedule resumes where it was
    with pytest.raises(ValueError, match="steps must increase"):
        fresh.update(20)
    with pytest.raises(ValueError, match=r"at=.2."):
        gm.LMNTracker(model, x, at="2", every=10, n_lambda=5).load_state_dict(state)
    twin = copy.deepcopy(tr)
    assert twin.model is model and twin.history == tr.history and twin.history is not tr.history
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    assert twin.update(30) == gm.lmn_at(model, x, at="1", n_lambda=5).lmn


# --------------------------------------------------------------------------------------------
# 8: torchmetrics


def test_torchmetrics_semantics():
    pytest.importorskip("torchmetrics")
    from grokfast_metrics.tracking.metric import LMNMetric

    model, x = _model(), _x()
    m = LMNMetric(model, x, at="1", every=2, n_lambda=5)
    with pytest.raises(RuntimeError, match="before any LMN"), pytest.warns(UserWarning):
        m.compute()  # torchmetrics warns, the tracker refuses
    m.update(0)
    v0 = float(m.compute())
    assert v0 == gm.lmn_at(model, x, at="1", n_lambda=5).lmn and int(m.step) == 0
    state = m.state_dict()
    m.reset()
    assert m.tracker.history == []  # reset clears the tracker's history too
    m.load_state_dict(state)
    assert m.tracker.history[0]["lmn"] == v0
    clone = m.clone()
    assert clone.tracker.model is model and clone.tracker is not m.tracker
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    clone.update(2)
    assert float(clone.compute()) == gm.lmn_at(model, x, at="1", n_lambda=5).lmn != v0
    assert len(m.tracker.history) == 1  # the original is independent
    two = LMNMetric(model, x, at=["1", "2"], n_lambda=5)
    out = two(0)
    assert set(out) == {"1", "2"} and float(out["2"]) == gm.lmn_at(model, x, at="2", n_lambda=5).lmn
