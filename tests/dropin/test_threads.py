"""``lmn_at`` from two threads on one model, and beside a thread running the model's forward (docs/dropin.md, "Threads").

Deterministic overlap: a gate module at the model's input makes the LMN thread wait (at its first forward,
inside ``lmn_at`` with its hooks installed) until the other thread has run the model once.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import grokfast_metrics as gm

pytestmark = pytest.mark.usefixtures("one_thread")


class Gate(nn.Module):
    """Identity; in the thread ``hold`` names, the first call waits (up to 2 s) for ``passed`` to be set."""

    def __init__(self):
        super().__init__()
        self.hold: int | None = None
        self.reached = threading.Event()
        self.passed = threading.Event()

    def forward(self, x):
        if threading.get_ident() == self.hold and not self.reached.is_set():
            self.reached.set()
            self.passed.wait(2.0)
        return x


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))  # residual: its sub-layer is not a cut, the block is


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.gate = Gate()
        self.inp = nn.Linear(6, 16)
        self.blocks = nn.ModuleList([Block(16), Block(16)])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.tanh(self.inp(self.gate(x)))
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _probe(n: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))


def _together(*fns, timeout: float = 60.0) -> list[threading.Thread]:
    """Run each function in its own thread, all started before any is joined; fail on any exception they raised.
    Returns the (finished) threads, in the order of ``fns``."""
    errors: list[BaseException] = []

    def guarded(fn):
        def target():
            try:
                fn()
            except BaseException as e:
                errors.append(e)

        return target

    threads = [threading.Thread(target=guarded(fn)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    assert not errors, errors
    return threads


@pytest.mark.parametrize("path", ["hooks", "split"])
def test_lmn_at_beside_a_thread_running_the_forward(path):
    model, probe, other_x = Net(), _probe(), _probe(20, seed=2)
    expected_lmn = gm.lmn_at(model, probe, at="blocks.0", path=path).lmn
    with torch.no_grad():
        expected_out = model(other_x)
    fired: list[int] = []
    model.blocks[0].register_forward_hook(lambda m, i, o: fired.append(threading.get_ident()))  # the other thread's hook
    outs, got = [], []

    def other():
        assert model.gate.reached.wait(30)  # the LMN thread is inside lmn_at, hooks installed
        with torch.no_grad():
            outs.append(model(other_x))
        model.gate.passed.set()

    def lmn():
        model.gate.hold = threading.get_ident()
        got.append(gm.lmn_at(model, probe, at="blocks.0", path=path).lmn)

    fired.clear()
    threads = _together(other, lmn)
    assert got == [expected_lmn]  # the same value as alone
    assert len(outs) == 1 and torch.equal(outs[0], expected_out)  # the other thread's forward was not altered
    assert fired == [threads[0].ident]  # its own hook fired (once, for its forward); never for the LMN thread's


def test_lmn_at_from_two_threads_on_one_model():
    model, probe = Net(), _probe()
    expected = {at: gm.lmn_at(model, probe, at=at, path="hooks").lmn for at in ("blocks.0", "inp")}
    got = {}

    def first():
        model.gate.hold = threading.get_ident()
        got["blocks.0"] = gm.lmn_at(model, probe, at="blocks.0", path="hooks").lmn
        model.gate.passed.set()

    def second():
        assert model.gate.reached.wait(30)
        got["inp"] = gm.lmn_at(model, probe, at="inp", path="hooks").lmn
        model.gate.passed.set()

    _together(first, second)
    assert got == expected
    assert model.training  # modes restored once both are done
    assert all(not m._forward_hooks for m in model.modules())  # no hook left behind


def test_tracker_beside_a_training_thread():
    """The asynchronous tracker's purpose: LMN in one thread while another trains; the trainer's hooks fire."""
    model, probe = Net(), _probe()
    tracker = gm.LMNTracker(model, probe, at="blocks.0", every=1)
    calls: list[int] = []
    model.head.register_forward_hook(lambda m, i, o: calls.append(1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x, y = _probe(32, seed=3), torch.arange(32) % 3
    stop = threading.Event()
    steps = []

    def train():
        while not stop.is_set() or len(steps) < 3:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            steps.append(1)

    def track():
        model.gate.hold = threading.get_ident()
        for step in range(4):
            tracker.update(step)
        stop.set()
        model.gate.passed.set()

    model.gate.reached.clear()
    _together(train, track, timeout=120)
    assert len(calls) == len(steps)  # the training thread's hook fired at each of its forwards, and only those
    assert len(tracker.history) == 4 and all(r["lmn"] >= 1.0 for r in tracker.history)
