"""Clean failures of the library API (docs/dropin.md, "Errors"): meta tensors, tracker state and schedules (the memory limits:
tests/foundation/test_memory_limits.py, tests/compute/test_memory.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import grokfast_metrics as gm
from grokfast_metrics.tracking.schedule import log_steps

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 12), nn.SiLU(), nn.Linear(12, 3))


def _tracker(**kw) -> gm.LMNTracker:
    torch.manual_seed(1)
    return gm.LMNTracker(_mlp(), torch.randn(10, 5), at="0", **kw)


# --------------------------------------------------------------------------------------------
# meta tensors


def test_lmn_from_connectivity_refuses_meta_at_once():
    with pytest.raises(ValueError, match="meta"):
        gm.lmn_from_connectivity(torch.empty(5000, 5000, device="meta"))


# --------------------------------------------------------------------------------------------
# tracker state and schedules


def test_load_state_dict_without_history_is_a_clear_value_error():
    t = _tracker(every=1)
    t.update(0)
    state = t.state_dict()
    del state["history"]
    with pytest.raises(ValueError, match="history"):
        _tracker(every=1).load_state_dict(state)
    with pytest.raises(ValueError, match="not a state_dict"):
        _tracker(every=1).load_state_dict([1, 2])


def test_huge_step_on_a_log_schedule_is_a_value_error():
    t = _tracker(every="log")
    t.update(0)
    with pytest.raises(ValueError, match="step"):
        t.update(10**400)
    assert t.update(10**9) is not None  # still usable, and a large real step works


@pytest.mark.parametrize("base", [math.inf, math.nan])
def test_non_finite_log_base_is_a_value_error(base):
    with pytest.raises(ValueError, match="log_base"):
        _tracker(every="log", log_base=base)
    with pytest.raises(ValueError, match="base"):
        log_steps(base, 100)


def test_force_right_after_the_same_step_returns_its_value():
    t = _tracker(every=5)
    v = t.update(10)
    assert t.update(10, force=True) == v
    assert len(t.history) == 1  # not computed twice
    t.update(11)  # not scheduled: nothing computed at 11
    forced = t.update(11, force=True)
    assert forced is not None and t.last_step == 11
    with pytest.raises(ValueError, match="steps must increase"):
        t.update(10, force=True)
    with pytest.raises(ValueError, match="steps must increase"):
        t.update(11)
