"""``LMNTracker(asynchronous=...)`` gives the synchronous history, bit for bit, in step order."""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
from torch import nn

import grokfast_metrics as gm
from grokfast_metrics.tracking.async_eigen import EigenStepError

pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.SiLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _x(n: int = 12) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(5))


def _twins(at, every, **kw):
    """A model, its probe and a synchronous and an asynchronous tracker watching it."""
    model, x = _model(), _x()
    sync = gm.LMNTracker(model, x, at=at, every=every, n_lambda=5, **kw)
    asyn = gm.LMNTracker(model, x, at=at, every=every, n_lambda=5, asynchronous=True, **kw)
    return model, x, sync, asyn


def _train_step(model: nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def _gate(tracker: gm.LMNTracker) -> threading.Event:
    """Keep the tracker's (single) eigen thread busy until the returned event is set."""
    gate = threading.Event()
    tracker._eigen._pool.submit(gate.wait)
    return gate


@pytest.mark.parametrize(
    "at, every, steps",
    [
        ("1", 1, range(30)),  # dense
        ("1", "log", range(40)),  # sparse schedule
        (["0", "2"], 4, range(30)),  # several layers
        ("2", 5, [0, 3, 7, 12, 13, 21, 22, 40]),  # catch-up: scheduled steps no update hits
    ],
)
def test_same_history_as_synchronous(at, every, steps):
    model, x, sync, asyn = _twins(at, every)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in steps:
        assert asyn.update(step) is None  # the value is not known yet: it lands in history
        sync.update(step)
        _train_step(model, x, opt)
    got = asyn.history  # waits for the pending eigen steps
    assert got == sync.history and len({r["lmn"] for r in got}) > 1  # bitwise-equal floats; weights did move
    assert asyn.as_dict() == sync.as_dict() and asyn.compute(with_step=True) == sync.compute(with_step=True)
    assert asyn.state_dict() == sync.state_dict() and asyn.pending() == 0
    asyn.close()


def test_nothing_waits_until_asked():
    _, _, sync, asyn = _twins("1", 1)
    asyn.update(0)
    sync.update(0)
    gate = _gate(asyn)  # step 0 may run; steps 1-3 queue behind the gate
    for step in (1, 2, 3):
        asyn.update(step)
        sync.update(step)
    landed = asyn.ready()  # does not wait (it would block forever)
    assert [r["step"] for r in landed] in ([], [0]) and asyn.pending() == 4 - len(landed)
    gate.set()
    asyn.flush()
    assert asyn.pending() == 0 and asyn.ready() == asyn.history
    assert [r["step"] for r in asyn.history] == [0, 1, 2, 3] and asyn.history == sync.history
    asyn.close()


def test_a_failed_eigen_step_is_raised_with_its_step():
    _, _, sync, asyn = _twins("1", 1)
    real = asyn._connectivity

    def skewed():  # a non-symmetric L at step 2: the eigen step refuses it
        mats = real()
        return {k: L + torch.triu(torch.ones_like(L), 1) for k, L in mats.items()} if asyn._calls == 3 else mats

    asyn._connectivity = skewed
    for step in range(5):
        asyn.update(step)  # never raises: the eigen step runs later
        sync.update(step)
    with pytest.raises(EigenStepError, match=r"step 2: .*not symmetric") as info:
        asyn.flush()
    assert info.value.key == 2 and isinstance(info.value.__cause__, ValueError)
    assert [r["step"] for r in asyn._history] == [0, 1]  # what came before it landed
    assert asyn.history == [r for r in sync.history if r["step"] != 2]  # and what came after it follows
    asyn.close()


def test_state_dict_and_resume_with_pending_results():
    model, x, sync, asyn = _twins(["0", "2"], 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    asyn.update(0)
    sync.update(0)
    gate = _gate(asyn)
    for step in range(1, 10):
        asyn.update(step)
        sync.update(step)
        _train_step(model, x, opt)
    threading.Timer(0.05, gate.set).start()  # state_dict waits for the gate, then the rest
    state = asyn.state_dict()
    assert state == sync.state_dict() and asyn.pending() == 0
    resumed = gm.LMNTracker(model, x, at=["0", "2"], every=2, n_lambda=5, asynchronous=2)
    resumed.update(10)
    gate = _gate(resumed)
    resumed.update(12)
    resumed.load_state_dict(state)  # the pending computations are dropped
    gate.set()
    for step in range(10, 16):
        resumed.update(step)
        sync.update(step)
        _train_step(model, x, opt)
    with resumed:  # leaving the block flushes and stops the threads
        pass
    assert resumed.history == sync.history and resumed._eigen is None
    resumed.update(16)  # a closed tracker starts new threads when needed
    sync.update(16)
    assert resumed.history == sync.history


def test_diverged_model_row_lands_in_step_order():
    model, _, _, asyn = _twins("1", 1)
    asyn.update(0)
    gate = _gate(asyn)
    asyn.update(1)
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    threading.Timer(0.05, gate.set).start()
    with pytest.warns(UserWarning, match="step 2: .*NaN"):
        asyn.update(2)
    assert [r["step"] for r in asyn.history] == [0, 1, 2] and math.isnan(asyn.compute())
    asyn.close()


def test_copies_and_reset():
    _, _, sync, asyn = _twins("1", 1)
    for step in range(3):
        asyn.update(step)
        sync.update(step)
    twin = copy.deepcopy(asyn)  # carries the landed history, not the threads
    assert twin.history == sync.history and twin._eigen is None
    asyn.reset()
    assert asyn.pending() == 0 and asyn.history == [] and len(twin) == 3
    twin.close()


@pytest.mark.parametrize("bad", [-1, "yes", 1.5])
def test_bad_asynchronous(bad):
    with pytest.raises(ValueError, match="asynchronous"):
        gm.LMNTracker(_model(), _x(), at="1", asynchronous=bad)
