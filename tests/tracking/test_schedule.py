"""``Schedule``: the one log-spaced-steps function reproduces each schedule it replaced, step for step."""

from __future__ import annotations

import math

import pytest

from grokfast_metrics.experiment.config import TrainConfig
from grokfast_metrics.tracking.schedule import Schedule, Steps, complexity_steps, log_schedule, log_steps


def _old_early(every: int, base: float = 1.5) -> set[int]:
    """The trainer's former ``lmn_steps_early``."""
    out, k = set(), 0
    while (s := int(base**k)) < every:
        out.add(s)
        k += 1
    return out


def _old_complexity(spec: str, steps: int) -> set[int]:
    """The trainer's former ``complexity_steps`` plus the last step."""
    if spec == "off":
        return set()
    if spec == "log":
        out, k = {0}, 0
        while 2**k <= steps:
            out.add(2**k)
            k += 1
        return out | {steps}
    return set(range(0, steps + 1, int(spec))) | {steps}


def _old_on_log(step: int, base: float) -> bool:
    """The tracker's former ``_on_log_schedule``."""
    if step <= 1:
        return step >= 0
    k0 = int(math.log(step) / math.log(base))
    return any(math.floor(base**k) == step for k in range(max(0, k0 - 2), k0 + 3))


def test_log_steps_bounds_and_bad_base():
    assert log_steps(1.5, 11) == [1, 2, 3, 5, 7, 11]
    assert log_steps(1.5, 11, below=True) == [1, 2, 3, 5, 7]
    assert log_steps(2.0, 0) == [] and log_schedule(0) == [0]
    with pytest.raises(ValueError, match="base must be > 1"):
        log_steps(1.0, 10)


@pytest.mark.parametrize("every", [1, 2, 5, 37, 100, 1000])
def test_early_lmn_steps_match_former_rule(every):
    cfg = TrainConfig(steps=3 * every, lmn_every=every, log_every=10)
    sched = Schedule.from_config(cfg)
    assert sched.early_lmn_steps() == sorted(_old_early(every))
    want = {s for s in range(3 * every + 1) if s % every == 0 or s in _old_early(every)} | {3 * every}
    assert {s for s in range(3 * every + 1) if sched.due(s).lmn} == want


@pytest.mark.parametrize("spec", ["off", "log", "1", "7", "64"])
@pytest.mark.parametrize("steps", [1, 12, 513, 2000])
def test_complexity_steps_match_former_rule(spec, steps):
    sched = Schedule.from_config(TrainConfig(steps=steps, complexity=spec, lmn_every=0, log_every=1))
    assert {s for s in range(steps + 1) if sched.due(s).complexity} == _old_complexity(spec, steps)


@pytest.mark.parametrize("base", [1.05, 1.3, 1.5, 2.0, 3.7])
def test_tracker_log_schedule_matches_former_membership(base):
    sched = Schedule.for_tracker("log", base)
    assert all(sched.due(s).lmn == _old_on_log(s, base) for s in range(-3, 3000))
    assert log_schedule(3000, base) == [s for s in range(3001) if _old_on_log(s, base)]


def _old_trainer(cfg: TrainConfig, step: int, key: bool, events: set[str]) -> tuple[bool, bool, bool, bool]:
    """The trainer's former inline decisions: (lmn, snapshot, complexity, logged)."""
    snap_steps = {int(s) for s in cfg.save_connectivity if str(s).isdigit()}
    snap = step in snap_steps or bool(events & {s for s in cfg.save_connectivity if not str(s).isdigit()})
    final = step == cfg.steps
    early = _old_early(cfg.lmn_every) if cfg.lmn_every > 0 and cfg.lmn_early else set()
    lmn = cfg.lmn_every > 0 and (step % cfg.lmn_every == 0 or final or key or step in early or snap)
    cx = step in _old_complexity(cfg.complexity, cfg.steps)
    return lmn, lmn and snap, cx, lmn or cx or key or final or step % cfg.log_every == 0


@pytest.mark.parametrize(
    "every, early, log_every, snaps",
    [
        (100, True, 10, ["0", "memorization", "generalization", "final"]),
        (7, False, 3, ["5", "final"]),
        (0, True, 4, ["0", "memorization"]),
        (1, True, 1, []),
    ],
)
def test_trainer_schedule_matches_former_rules(every, early, log_every, snaps):
    cfg = TrainConfig(steps=300, lmn_every=every, lmn_early=early, log_every=log_every, save_connectivity=snaps, complexity="log")
    sched = Schedule.from_config(cfg)
    phase_events = {143: ("memorization",), 221: ("generalization",), 250: ("memorization", "generalization")}
    for step in range(cfg.steps + 1):
        ev = phase_events.get(step, ())
        due = sched.due(step, ev)
        events = set(ev) | ({"final"} if step == cfg.steps else set())
        assert (due.lmn, due.snapshot, due.complexity, due.row) == _old_trainer(cfg, step, bool(ev), events), step
        assert due.ranks == (due.lmn or step == cfg.steps) and due.final == (step == cfg.steps)


def test_steps_membership():
    s = Steps(every=4, log_base=2.0, log_below=10, extra=frozenset({13}), events=frozenset({"x"}))
    assert [t for t in range(-2, 20) if s.due(t)] == [0, 1, 2, 4, 8, 12, 13, 16]
    assert s.due(7, ("x",)) and not s.due(-1, ("x",))
    assert complexity_steps("off") == Steps()
    with pytest.raises(ValueError, match="complexity must be"):
        complexity_steps("sometimes")
