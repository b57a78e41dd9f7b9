"""Clean failures of the library API (docs/dropin.md, "Errors"): memory limits, meta tensors, tracker state and schedules."""
from __future__ import annotations

import math
import subprocess

import pytest
import torch
from helpers import PYTHON
from torch import nn

import grokfast_metrics as gm
from grokfast_metrics import _policy
from grokfast_metrics.schedule import log_steps

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 12), nn.SiLU(), nn.Linear(12, 3))


def _tracker(**kw) -> gm.LMNTracker:
    torch.manual_seed(1)
    return gm.LMNTracker(_mlp(), torch.randn(10, 5), at="0", **kw)


# --------------------------------------------------------------------------------------------
# memory: the fit check reads the process and cgroup limits


#: N=40000 in fp32: L alone is 6.4 GB. The address-space limit is set to what the process maps now plus 1 GiB,
#: so the allocation cannot succeed whatever the machine's free memory is.
_RLIMIT = """
import resource, torch, grokfast_metrics as gm
tail = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
gm.connectivity(torch.randn(8, 3), tail)
vm = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize:')][0]
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    gm.connectivity(torch.randn(40000, 3), tail)
except MemoryError as e:
    print('MemoryError:', e)
"""


def test_fit_check_reads_the_address_space_limit():
    out = subprocess.run([*PYTHON, "-c", _RLIMIT], capture_output=True, text=True, timeout=300)
    assert "MemoryError: connectivity needs about" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "limit" in out.stdout


def test_available_bytes_takes_the_smallest_limit(monkeypatch):
    monkeypatch.setattr(_policy, "_meminfo_available", lambda: 64 << 30)
    monkeypatch.setattr(_policy, "_address_space_left", lambda: 3 << 30)
    monkeypatch.setattr(_policy, "_cgroup_left", lambda: 5 << 30)
    assert _policy.available_bytes("cpu") == 3 << 30
    monkeypatch.setattr(_policy, "_cgroup_left", lambda: 1 << 30)
    assert _policy.available_bytes("cpu") == 1 << 30
    monkeypatch.setattr(_policy, "_address_space_left", lambda: None)
    monkeypatch.setattr(_policy, "_cgroup_left", lambda: None)
    assert _policy.available_bytes("cpu") == 64 << 30


def test_cgroup_limits_are_read(tmp_path, monkeypatch):
    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "memory.current").write_text("268435456\n")
    assert _policy._cgroup_left(roots=[tmp_path]) == (1 << 30) - (1 << 28)
    (tmp_path / "memory.max").write_text("max\n")
    assert _policy._cgroup_left(roots=[tmp_path]) is None


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
