"""AsyncEigen: the eigen step on host worker threads gives the synchronous results, in submission order."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import mlp_tail

import grokfast_metrics as gm
from grokfast_metrics.tracking.async_eigen import AsyncEigen, EigenStepError


def _L(n: int, seed: int) -> torch.Tensor:
    h = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
    return gm.connectivity(h, mlp_tail([4, 16, 3], seed=seed))


def test_same_results_as_synchronous_in_submission_order():
    sizes = [160, 20, 100, 5, 60, 30]  # big ones first: they finish last, yet come back first
    mats = [_L(n, k) for k, n in enumerate(sizes)]
    with AsyncEigen(workers=3) as eig:
        for step, L in enumerate(mats):
            eig.submit(step, L)
        got = eig.ready() + eig.wait()
        assert eig.pending() == 0
    assert [k for k, _ in got] == list(range(len(sizes)))
    for (_, res), L in zip(got, mats):
        want = gm.lmn_from_connectivity(L)
        assert res.lmn == want.lmn and torch.equal(res.eigenvalues, want.eigenvalues)


def test_ready_does_not_wait_and_keeps_order():
    gate = threading.Event()
    with AsyncEigen(workers=2) as eig:
        eig._pool.submit(gate.wait)  # occupies one worker until released
        eig.submit("slow", _L(80, 1))
        eig.submit("fast", _L(5, 2))
        gate.set()
        out = eig.wait()
    assert [k for k, _ in out] == ["slow", "fast"]


def test_a_failed_matrix_raises_in_order_and_loses_nothing():
    with AsyncEigen() as eig:
        eig.submit(0, _L(8, 0))
        eig.submit(1, torch.full((3, 3), float("inf")))  # (NaN gives LMN NaN: the generic path's unresolved pairs)
        eig.submit(2, _L(6, 2))
        assert [k for k, _ in eig.wait()] == [0]  # what came before the failure
        with pytest.raises(EigenStepError, match="of 1 failed: ValueError: L has Inf") as info:
            eig.wait()
        assert info.value.key == 1 and isinstance(info.value.__cause__, ValueError)
        assert [k for k, _ in eig.wait()] == [2]  # and what came after it


def test_several_matrices_in_one_job_and_discard():
    mats = {"a": _L(12, 0), "b": _L(9, 1)}
    gate = threading.Event()
    with AsyncEigen() as eig:
        eig.submit(0, mats)
        [(key, got)] = eig.wait()
        assert key == 0 and list(got) == ["a", "b"]
        assert all(got[k].lmn == gm.lmn_from_connectivity(L).lmn for k, L in mats.items())
        eig._pool.submit(gate.wait)
        eig.submit(1, mats)
        eig.discard()  # does not wait for the blocked worker
        assert eig.pending() == 0 and eig.wait() == []
        gate.set()


def test_bad_arguments():
    with pytest.raises(ValueError, match="workers"):
        AsyncEigen(workers=0)
    with AsyncEigen() as eig, pytest.raises(ValueError, match="2-D"):
        eig.submit(0, torch.ones(3))
