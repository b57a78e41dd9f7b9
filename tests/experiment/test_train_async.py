"""Asynchronous LMN in the trainer: ``TrainConfig.lmn_async`` writes the run directory of a synchronous run
(every column but ``time_s``, the snapshots, the summary but its timings), stopped early too. An interrupted
asynchronous run resumed from its checkpoint: ``test_resume_after_interruption_is_bit_identical``
(tests/experiment/test_run_lifecycle.py)."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from grokfast_metrics.cli import main as cli
from grokfast_metrics.experiment import asyncrows as _asyncrows
from grokfast_metrics.experiment import options, runlog
from grokfast_metrics.experiment import trainer as train_mod
from grokfast_metrics.experiment.config import TrainConfig
from grokfast_metrics.experiment.model import GrokMLP
from grokfast_metrics.experiment.tasks import make_task
from grokfast_metrics.experiment.trainer import train
from grokfast_metrics.sweep.batched import unstackable_reason
from grokfast_metrics.tracking import async_eigen
from grokfast_metrics.tracking.schedule import Schedule

TINY = {"task": "add", "device": "cpu", "hidden": 16, "embed_dim": 8, "log_every": 1, "probe": 12, "threads": 1}
#: LMN at steps 0, 3, 6, ... and the early steps, two layers, snapshots at fixed steps, a phase and the end
DENSE = dict(
    lmn_every=3,
    lr=3e-2,
    complexity="20",
    lmn_layers=["hidden1_post", "embeddings"],
    save_connectivity=["0", "35", "memorization", "final"],
    **TINY,
)


def _rows(run_dir):
    return [{k: v for k, v in json.loads(x).items() if k != "time_s"} for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _same_run_dir(a, b) -> None:
    """``a`` and ``b`` hold the same rows (but ``time_s``), CSV length and connectivity snapshots."""
    assert _rows(a) == _rows(b)
    assert (a / "metrics.csv").read_text().count("\n") == (b / "metrics.csv").read_text().count("\n")
    snaps_a, snaps_b = runlog.load_connectivity(a), runlog.load_connectivity(b)
    assert [(s["step"], s["layer"], s["lmn"]) for s in snaps_a] == [(s["step"], s["layer"], s["lmn"]) for s in snaps_b]
    assert snaps_a and all(torch.equal(x["L"], y["L"]) for x, y in zip(snaps_a, snaps_b))


def _same_summary(a: dict, b: dict) -> None:
    same = lambda s: json.dumps({k: v for k, v in s.items() if k != "timings_s"}, sort_keys=True)  # as JSON: NaN == NaN
    assert same(a) == same(b)


def test_async_run_writes_the_sync_run(tmp_path):
    sync = train(TrainConfig(steps=250, **DENSE), tmp_path / "sync", progress=False, plot=False)
    asyn = train(TrainConfig(steps=250, lmn_async=True, **DENSE), tmp_path / "async", progress=True, plot=False)
    assert asyn.exit_code == 0 and sync.summary["memorization_step"] is not None  # a phase snapshot is covered
    _same_run_dir(tmp_path / "sync", tmp_path / "async")
    _same_summary(sync.summary, asyn.summary)
    assert sum(r["lmn"] is not None for r in asyn.rows) > 50


def test_async_nonfinite_stop_writes_the_sync_rows(tmp_path, monkeypatch):
    real = train_mod.optimizer_step
    calls = {"n": 0}

    def poison(run):
        real(run)
        calls["n"] += 1
        if calls["n"] == 38:  # after step 37's update
            with torch.no_grad():
                run.model.fc2.weight.fill_(float("nan"))

    monkeypatch.setattr(train_mod, "optimizer_step", poison)
    sync = train(TrainConfig(steps=100, **DENSE), tmp_path / "sync", progress=False, plot=False)
    calls["n"] = 0
    asyn = train(TrainConfig(steps=100, lmn_async=True, **DENSE), tmp_path / "async", progress=False, plot=False)
    assert sync.exit_code == asyn.exit_code == train_mod.EXIT_NONFINITE and asyn.rows[-1]["step"] == 38
    _same_run_dir(tmp_path / "sync", tmp_path / "async")
    _same_summary(sync.summary, asyn.summary)


def test_rows_wait_in_step_order_for_their_lmn(monkeypatch):
    """A row without LMN waits behind a row whose eigen step has not landed; both are written once it has."""
    gate, real = threading.Event(), async_eigen.lmn_from_connectivity

    def gated(L):
        assert gate.wait(30)
        return real(L)

    monkeypatch.setattr(async_eigen, "lmn_from_connectivity", gated)
    torch.manual_seed(0)
    task = make_task("add")
    model, x = GrokMLP(task.n_tokens, task.n_classes, 8, 16), task.x[:10]
    tracker = train_mod.layer_tracker(model, x, TrainConfig(n_lambda=5, lmn_async=True), Schedule.for_tracker(1))
    written = []
    queue = _asyncrows.RowQueue(tracker, None, ["hidden1_post"], lambda row, metrics, now: written.append({**row, **metrics}))
    try:
        assert tracker.update(0) is None
        queue.put(0, {"other": 1.0}, {"step": 0}, 0.0, lmn=True, snapshot=False)
        queue.put(1, {}, {"step": 1}, 0.0, lmn=False, snapshot=False)
        queue.put(2, None, {"step": 2}, 0.0, lmn=False, snapshot=False)  # no row due
        assert written == [] and len(queue) == 2 and tracker.pending() == 1
        gate.set()
        queue.flush()
    finally:
        gate.set()
        tracker.close()
    sync = train_mod.layer_tracker(model, x, TrainConfig(n_lambda=5), Schedule.for_tracker(1)).update(0)
    assert [r["step"] for r in written] == [0, 1] and written[0]["lmn"] == written[0]["lmn_hidden1_post"] == sync
    assert written[0]["other"] == 1.0 and "lmn" not in written[1] and not tracker.landed


def test_option_cli_and_sweep():
    args, _ = cli.build_parser(["train", "--lmn-async"]).parse_known_args(["train", "--lmn-async"])
    assert options.train_config(args).lmn_async and not TrainConfig().lmn_async
    assert "--lmn-async" in unstackable_reason(TrainConfig(lmn_async=True))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    return one_thread
