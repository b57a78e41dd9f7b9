"""How much memory the device leaves (``_policy.available_bytes``): the smallest of free memory, the address-space
limit and the cgroup limit."""

from __future__ import annotations

from grokfast_metrics.foundation import policy as _policy


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
