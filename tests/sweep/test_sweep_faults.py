"""Sweeps that never lie (docs/sweeps.md, "Resumable and fault-tolerant"). A worker killed with -9 fails only its
own run; SIGINT / SIGTERM leave sweep.csv true and start no queued run; finished runs trained with other options are
not passed off as this sweep's; options a sweep cannot honour are refused; one sweep per directory (filelock).

The signal tests run the CLI in a subprocess of its own session and wait for states by polling files (deadlines, no
sleeps standing in for a state)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from filelock import FileLock
from helpers import PYTHON, TINY_MODEL, sweep_tasks_in_this_process

from grokfast_metrics.cli import main as cli
from grokfast_metrics.experiment.config import TrainConfig
from grokfast_metrics.sweep import engines, plan_runs

#: a tiny model, no LMN, no complexity, no plots: a run is its training loop only
TINY = [*TINY_MODEL, "--lmn-every", "0", "--complexity", "off", "--save-connectivity", "", "--no-plot", "--no-progress"]
#: long enough never to finish while a test waits for it (it is always stopped)
LONG = 10**7


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "sweep.csv", newline="") as f:
        return {r["run"]: r for r in csv.DictReader(f)}


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def _wait_for(what: str, ok, deadline_s: float = 180.0, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + deadline_s
    while not ok():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep exited ({proc.returncode}) before {what}: {proc.stdout.read()}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / "sweep"
    proc = subprocess.Popen(
        [*PYTHON, "-m", "grokfast_metrics", "sweep", *TINY, "--out", str(out), *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    return proc, out


def _finish(proc: subprocess.Popen, deadline_s: float = 180.0) -> int:
    try:
        proc.wait(deadline_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError("the sweep did not end after the signal") from None
    return proc.returncode


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# ------------------------------------------------------------------------------------------
# in-process: refusals


def test_options_a_sweep_cannot_honour_are_refused(tmp_path, capsys):
    out = str(tmp_path / "s")
    for extra, words in (
        (["--resume", str(tmp_path)], "--resume does not apply to a sweep"),
        (["--seed", "3"], "--seed does not apply to a sweep"),
        (["--ray-address", "127.0.0.1:1"], "--ray-address needs --engine ray"),
    ):
        assert cli.main(["sweep", *TINY, "--steps", "3", "--out", out, *extra]) == 2
        assert words in _one_error_line(capsys)
    assert not (tmp_path / "s").exists()


def test_two_sweeps_on_one_directory_are_refused(tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    with FileLock(str(out / ".sweep.lock")):  # another sweep holds the directory
        assert cli.main(["sweep", *TINY, "--steps", "3", "--out", str(out)]) == 2
        assert "another sweep is writing to" in _one_error_line(capsys)
    assert not (out / "sweep.json").exists()


def test_a_finished_sweep_rerun_with_other_options_is_refused_unless_overwrite(tmp_path, capsys, monkeypatch):
    sweep_tasks_in_this_process(monkeypatch)  # what is checked is the command's, not the pool's
    out = tmp_path / "s"
    base = ["sweep", *TINY, "--workers", "1", "--grid", "weight_decay=0.1", "--out", str(out)]
    assert cli.main([*base, "--steps", "3"]) == 0
    run = out / "weight_decay=0.1_seed=0"
    manifest, summary = (out / "sweep.json").read_bytes(), (run / "summary.json").read_bytes()
    capsys.readouterr()
    assert cli.main([*base, "--steps", "5"]) == 2  # not "skipped" as if it had run 5 steps
    line = _one_error_line(capsys)
    assert "weight_decay=0.1_seed=0: steps 3 (this sweep: 5)" in line and "--overwrite" in line
    assert (out / "sweep.json").read_bytes() == manifest and (run / "summary.json").read_bytes() == summary
    assert cli.main([*base, "--steps", "5", "--overwrite"]) == 0
    assert _summary(run)["steps_done"] == 5 and _rows(out)["weight_decay=0.1_seed=0"]["status"] == "done"
    assert json.loads((out / "sweep.json").read_text())["runs"][0]["config"]["steps"] == 5
    assert cli.main([*base, "--steps", "5"]) == 0  # the same options again: skipped, untouched
    assert _rows(out)["weight_decay=0.1_seed=0"]["status"] == "skipped"


def test_a_task_that_raised_fails_its_unfinished_runs_with_an_error_txt(tmp_path):
    """What a Ray task whose worker died reports: the runs that finished are done, the others failed with error.txt."""
    runs = plan_runs(TrainConfig(steps=5), [("weight_decay", [0.1, 0.2])], [0], tmp_path)
    runs[0].run_dir.mkdir()
    (runs[0].run_dir / "summary.json").write_text(json.dumps({"interrupted": False}))

    def died():
        raise RuntimeError("The worker died unexpectedly while executing this task")

    seen = {}
    engines._report(runs, died, lambda run, result: seen.__setitem__(run.name, result))
    assert seen[runs[0].name] == {"status": "done"}
    assert seen[runs[1].name]["status"] == "failed" and "worker died" in seen[runs[1].name]["error"]
    assert "worker died" in (runs[1].run_dir / "error.txt").read_text()


# ------------------------------------------------------------------------------------------
# subprocesses: signals and a killed worker


def test_kill_9_of_a_worker_fails_only_its_run(tmp_path):
    proc, out = _start(tmp_path, "--workers", "1", "--grid", f"steps=20,{LONG},30")
    long_dir = out / f"steps={LONG}_seed=0"
    mark = long_dir / ".sweep-worker"
    _wait_for("the long run to start", lambda: mark.is_file() and (long_dir / "metrics.jsonl").is_file(), proc=proc)
    os.kill(int(mark.read_text()), signal.SIGKILL)
    rc = _finish(proc)
    rows = _rows(out)
    assert rc == 1, proc.stdout.read()
    assert rows["steps=20_seed=0"]["status"] == "done" and _summary(out / "steps=20_seed=0")["steps_done"] == 20
    assert rows["steps=30_seed=0"]["status"] == "done"  # queued behind the killed run: ran in a new pool
    bad = rows[f"steps={LONG}_seed=0"]
    assert bad["status"] == "failed" and "killed by SIGKILL" in bad["error"] and "BrokenProcessPool" not in bad["error"]
    assert "killed by SIGKILL" in (long_dir / "error.txt").read_text()


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_sweep_stops_its_runs_and_reports_the_finished_ones_done(tmp_path, sig, code):
    proc, out = _start(tmp_path, "--workers", "2", "--grid", f"steps=20,{LONG}")
    done_dir, long_dir = out / "steps=20_seed=0", out / f"steps={LONG}_seed=0"
    _wait_for(
        "one run to finish and the other to run",
        lambda: (done_dir / "summary.json").is_file() and (long_dir / "metrics.jsonl").is_file(),
        proc=proc,
    )
    os.kill(proc.pid, sig)  # the parent only: it stops its workers' runs itself
    rc = _finish(proc)
    rows = _rows(out)
    assert rc == code, proc.stdout.read()
    assert rows["steps=20_seed=0"]["status"] == "done"  # finished: not "not run"
    assert rows[f"steps={LONG}_seed=0"]["status"] == "interrupted"
    assert _summary(long_dir)["interrupted"] and _summary(long_dir)["steps_done"] < LONG


def test_ctrl_c_to_the_process_group_starts_no_queued_run(tmp_path):
    proc, out = _start(tmp_path, "--workers", "1", "--grid", f"steps={LONG},{LONG + 1}")
    first, queued = out / f"steps={LONG}_seed=0", out / f"steps={LONG + 1}_seed=0"
    _wait_for("the first run to run", lambda: (first / "metrics.jsonl").is_file(), proc=proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C at a terminal does
    rc = _finish(proc)
    rows = _rows(out)
    assert rc == 130, proc.stdout.read()
    assert rows[first.name]["status"] == "interrupted" and _summary(first)["interrupted"]
    assert rows[queued.name]["status"] == "not run"
    assert not (queued / "config.json").exists() and not (queued / "metrics.jsonl").exists()
