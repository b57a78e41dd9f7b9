"""``LMNTracker``: schedules, values, history, and a training run left bit-identical."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grokfast_metrics as gm
from grokfast_metrics.tracking.schedule import log_schedule

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.2), nn.BatchNorm1d(16), nn.SiLU(), nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 3))


class Custom(nn.Module):
    """Non-Sequential model (hook path) with dropout inside the tail."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.inp = nn.Linear(6, 16)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.inp(x))))


def test_log_schedule_matches_formula():
    want = sorted({0} | {math.floor(1.3**k) for k in range(60) if math.floor(1.3**k) <= 5000})
    assert log_schedule(5000) == want
    assert want[:10] == [0, 1, 2, 3, 4, 6, 8, 10, 13, 17]
    tr = gm.LMNTracker(_model(), torch.randn(4, 6), at="3", every="log")
    assert [s for s in range(5001) if tr.should_compute(s)] == want
    assert log_schedule(100, base=2.0) == [0, 1, 2, 4, 8, 16, 32, 64]
    tr5 = gm.LMNTracker(_model(), torch.randn(4, 6), at="3", every=5)
    assert [s for s in range(23) if tr5.should_compute(s)] == [0, 5, 10, 15, 20]


@pytest.mark.parametrize("every", [0, -1, 1.5, "lin", True])
def test_bad_every(every):
    with pytest.raises(ValueError, match="every must be"):
        gm.LMNTracker(_model(), torch.randn(4, 6), at="3", every=every)


def _train(model, x, y, steps, tracker=None, every=1, at="3"):
    """A short AdamW run with dropout + BatchNorm, optionally tracked; returns losses, tracker, RNG state."""
    torch.manual_seed(123)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    tr = gm.LMNTracker(model, x[:10], at=at, every=every, n_lambda=7) if tracker else None
    losses = []
    for step in range(steps):
        model.train()
        idx = torch.randint(x.shape[0], (16,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        if tr is not None and step % 2:  # between backward and step: grads must survive
            tr.update(step)
        opt.step()
        if tr is not None and not step % 2:
            tr.update(step)
        losses.append(loss.item())
    return losses, tr, torch.get_rng_state()


@pytest.mark.parametrize("make, at", [(_model, "3"), (Custom, "drop")])
def test_tracker_leaves_training_bit_identical(make, at):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=g), torch.randint(3, (64,), generator=g)
    m0, m1 = make(), make()
    l0, _, rng0 = _train(m0, x, y, steps=6, at=at)
    l1, tr, rng1 = _train(m1, x, y, steps=6, tracker=True, at=at)
    assert l0 == l1 and torch.equal(rng0, rng1)
    s0, s1 = m0.state_dict(), m1.state_dict()
    assert all(torch.equal(s0[k], s1[k]) for k in s0)  # weights and BatchNorm buffers
    assert [r["step"] for r in tr.history] == list(range(6))
    assert all(m.training for m in m1.modules())


def test_rng_stream_unchanged():
    model, x = _model(), torch.randn(10, 6)
    tr = gm.LMNTracker(model, x, at="3", n_lambda=5)
    torch.manual_seed(7)
    a = torch.rand(3)
    torch.manual_seed(7)
    tr.update(0)
    b = torch.rand(3)
    assert torch.equal(a, b)


def test_values_history_and_reset():
    model, x = _model(), torch.randn(12, 6, generator=torch.Generator().manual_seed(2))
    model.eval()
    tr = gm.LMNTracker(model, x, at="3", every=3, n_lambda=9)
    with pytest.raises(RuntimeError, match="before any LMN"):
        tr.compute()
    got = [tr.update() for _ in range(7)]  # internal counter: steps 0..6
    assert [g is not None for g in got] == [True, False, False, True, False, False, True]
    want = gm.lmn_at(model, x, at="3", n_lambda=9)
    v = tr.compute()
    assert type(v) is float and v == want.lmn
    assert tr.history[-1] == {"step": 6, "lmn": want.lmn, "entropy_bits": want.entropy_bits}
    d = tr.as_dict()
    assert d["step"] == [0, 3, 6] and len(d["lmn"]) == len(d["entropy_bits"]) == 3 == len(tr)
    assert all(type(a) is float for a in d["lmn"] + d["entropy_bits"])
    assert tr.update(torch.tensor(9)) == want.lmn
    tr.reset()
    assert tr.history == [] and tr.as_dict() == {"step": [], "lmn": [], "entropy_bits": []}
    assert tr.update() == want.lmn  # counter restarted at step 0


def test_misspelled_at_fails_at_construction():
    with pytest.raises(ValueError, match=r"no submodule named 'nope'.*Valid names"):
        gm.LMNTracker(_model(), torch.randn(4, 6), at="nope")


def test_diverged_model_records_nan():
    model, x = _model(), torch.randn(6, 6)
    tr = gm.LMNTracker(model, x, at="3", n_lambda=5)
    assert math.isfinite(tr.update(0))
    with torch.no_grad():
        model[4].weight[0, 0] = float("nan")
    with pytest.warns(UserWarning, match=r"'4\.weight'.*NaN"):
        assert math.isnan(tr.update(1))
    assert math.isnan(tr.compute()) and tr.as_dict()["step"] == [0, 1]


def test_overflowing_outputs_record_nan():
    """Finite weights whose logits overflow are a diverged run too: NaN with a warning, not a number, not a crash."""
    model, x = _model(), torch.randn(6, 6)
    tr = gm.LMNTracker(model, x, at="3", n_lambda=5)
    with torch.no_grad():
        model[4].weight.zero_()
        model[4].bias.fill_(1.0)  # every hidden unit SiLU(1) = 0.73
        model[6].weight.fill_(3e38)  # logits = 3e38 * 16 * 0.73 overflow fp32
    with pytest.warns(UserWarning, match="NaN/Inf for"):
        assert math.isnan(tr.update(0))
    assert math.isnan(tr.compute())


def test_torchmetrics_adapter():
    pytest.importorskip("torchmetrics")
    from grokfast_metrics.tracking.metric import LMNMetric

    model, x = _model(), torch.randn(10, 6)
    m = LMNMetric(model, x, at="3", every=2, n_lambda=7)
    m.update(0)
    v0 = float(m.compute())
    assert v0 == gm.lmn_at(model, x, at="3", n_lambda=7).lmn
    assert float(m(1)) == v0 and len(m.tracker.history) == 1
