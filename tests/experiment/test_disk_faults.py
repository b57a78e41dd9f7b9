"""Disk full, unwritable and damaged run files (docs/training.md): one line, whole rows and checkpoints, no partial files.

A full disk is simulated by making ``runlog._write_fd`` (where every run file's bytes are written) write part of
its data and then raise ``OSError(ENOSPC)``; a read-only directory by raising ``EROFS`` (tests run as root, where
``chmod`` does not stop writes; the chmod version runs only as another user).
"""

from __future__ import annotations

import errno
import json
import os
import warnings

import pytest
import torch
from helpers import sweep_tasks_in_this_process

from grokfast_metrics.cli import main as cli
from grokfast_metrics.experiment import runlog

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--device", "cpu", "--hidden", "8", "--embed-dim", "4", "--probe", "8", "--complexity", "off", "--no-progress", "--log-every", "1"]


_REAL_WRITE = runlog._write_fd


class Full:
    """``runlog._write_fd`` that fails once ``budget`` more bytes have been written: half the failing chunk lands."""

    def __init__(self, budget: int, err: int = errno.ENOSPC, partial: bool = True, larger_than: int = 0):
        self.budget, self.err, self.partial, self.real = budget, err, partial, _REAL_WRITE
        self.larger_than = larger_than  # writes up to this size always succeed

    def __call__(self, fd: int, data: bytes) -> None:
        if len(data) <= self.larger_than:
            return self.real(fd, data)
        if len(data) <= self.budget:
            self.budget -= len(data)
            return self.real(fd, data)
        if self.partial:
            self.real(fd, bytes(data)[: max(1, len(data) // 2)])
        raise OSError(self.err, os.strerror(self.err))


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _fill_after_checkpoint(monkeypatch, after_step: int):
    """The disk fills right after the checkpoint of ``after_step`` is written."""
    from grokfast_metrics.experiment import trainer as train_mod

    real = train_mod.save_checkpoint

    def save(run, step):
        path = real(run, step)
        if step == after_step:
            monkeypatch.setattr(runlog, "_write_fd", Full(0))
        return path

    monkeypatch.setattr(train_mod, "save_checkpoint", save)


def test_disk_full_mid_run_is_one_line_with_rows_and_checkpoint_whole(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _fill_after_checkpoint(monkeypatch, 10)
    rc = cli.main(["train", *TINY, "--steps", "40", "--lmn-every", "5", "--checkpoint-every", "10", "--out", str(run)])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "metrics.jsonl" in err, err
    raw = (run / "metrics.jsonl").read_bytes()
    assert raw.endswith(b"\n")  # whole lines only
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(len(rows))) and rows[-1]["step"] >= 10
    csv_lines = (run / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == len(rows) + 1  # the header, then the same whole rows
    state = torch.load(run / "checkpoint.pt", weights_only=False)  # the last good checkpoint loads
    assert state["step"] == 10
    leftovers = [p.name for p in run.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    assert not (run / "summary.json").exists()  # no room for it: absent rather than partial


def test_directory_made_read_only_mid_run(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _fill_after_checkpoint(monkeypatch, 10)
    from grokfast_metrics.experiment import trainer as train_mod

    real = train_mod.save_checkpoint

    def save(run_, step):
        path = real(run_, step)
        if step == 10:
            monkeypatch.setattr(runlog, "_write_fd", Full(0, errno.EROFS, partial=False))
        return path

    monkeypatch.setattr(train_mod, "save_checkpoint", save)
    rc = cli.main(["train", *TINY, "--steps", "40", "--lmn-every", "5", "--checkpoint-every", "10", "--out", str(run)])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Read-only file system" in err, err
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 10
    assert (run / "metrics.jsonl").read_bytes().endswith(b"\n")


def test_a_failed_checkpoint_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    from grokfast_metrics.experiment import trainer as train_mod
    from grokfast_metrics.experiment.config import TrainConfig
    from grokfast_metrics.experiment.trainer import train

    real = train_mod.save_checkpoint

    def save(run, step):
        if step == 20:  # the disk fills while the second checkpoint is written
            monkeypatch.setattr(runlog, "_write_fd", Full(1000, larger_than=8000))  # the rows fit, not the checkpoint
        return real(run, step)

    monkeypatch.setattr(train_mod, "save_checkpoint", save)
    cfg = TrainConfig(
        steps=40, device="cpu", hidden=8, embed_dim=4, probe=8, complexity="off", lmn_every=5, log_every=1, checkpoint_every=10
    )
    res = train(cfg, tmp_path / "run", progress=False, plot=False)
    assert res.exit_code == 1 and "checkpoint.pt" in res.stop_reason and "No space left" in res.stop_reason
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == 10
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_metrics_log_truncates_back_to_whole_rows(tmp_path, monkeypatch):
    log = runlog.MetricsLog(tmp_path, ["step", "x"], flush_s=1e9)
    log.write({"step": 0, "x": 1.5})
    log.flush()
    good_jsonl, good_csv = (tmp_path / "metrics.jsonl").read_bytes(), (tmp_path / "metrics.csv").read_bytes()
    log.write({"step": 1, "x": 2.5})
    log.write({"step": 2, "x": 3.5})
    monkeypatch.setattr(runlog, "_write_fd", Full(len(b'{"step": 1, "x": 2.5}\n')))  # jsonl gets 1.5 rows, csv none
    with pytest.raises(runlog.RunWriteError, match="metrics"):
        log.flush()
    assert (tmp_path / "metrics.jsonl").read_bytes() == good_jsonl
    assert (tmp_path / "metrics.csv").read_bytes() == good_csv
    assert [r["step"] for r in log.rows] == [0]  # the log says what the files hold
    with pytest.raises(runlog.RunWriteError):
        log.write({"step": 3, "x": 0.0})
    log.close()


@pytest.mark.parametrize("what", ["json", "snapshot", "csv"])
def test_atomic_writes_leave_the_old_file(tmp_path, monkeypatch, what):
    from grokfast_metrics.sweep.outcomes import write_csv

    if what == "json":
        path = tmp_path / "summary.json"
        runlog.write_json(path, {"a": 1})
        write = lambda: runlog.write_json(path, {"a": list(range(1000))})
    elif what == "snapshot":
        path = runlog.save_connectivity(tmp_path, 3, "hidden1_post", torch.eye(4), 1.0)
        write = lambda: runlog.save_connectivity(tmp_path, 3, "hidden1_post", torch.eye(40), 2.0)
    else:
        path = tmp_path / "sweep.csv"
        write_csv([{"run": "a", "status": "done"}], path)
        write = lambda: write_csv([{"run": f"r{k}", "status": "done"} for k in range(500)], path)
    before = path.read_bytes()
    monkeypatch.setattr(runlog, "_write_fd", Full(10))
    with pytest.raises(runlog.RunWriteError, match="No space left on device") as e:
        write()
    assert str(e.value).startswith(f"cannot write {path}")
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left


def _small_run(tmp_path):
    run = tmp_path / "run"
    assert (
        cli.main(["train", *TINY, "--steps", "20", "--lmn-every", "5", "--save-connectivity", "0,10,final", "--no-plot", "--out", str(run)])
        == 0
    )
    return run


def test_plot_into_a_full_or_read_only_directory_is_one_line(tmp_path, monkeypatch, capsys):
    run = _small_run(tmp_path)
    capsys.readouterr()
    for err_no, text in ((errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")):
        monkeypatch.setattr(runlog, "_write_fd", Full(0, err_no))
        assert cli.main(["plot", str(run), "--out", str(tmp_path / "figs")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and text in err and "fig2_curves.png" in err, err
        assert not [p for p in (tmp_path / "figs").iterdir()]  # nothing partial
    monkeypatch.undo()
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["plot", str(run), "--out", str(blocker / "figs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 555 directory anyway; the EROFS test covers it")
def test_plot_into_a_chmod_read_only_directory(tmp_path, capsys):
    run = _small_run(tmp_path)
    figs = tmp_path / "figs"
    figs.mkdir()
    figs.chmod(0o555)
    try:
        assert cli.main(["plot", str(run), "--out", str(figs)]) == 2
        assert "Permission denied" in capsys.readouterr().err
    finally:
        figs.chmod(0o755)


def test_plot_non_utf8_metrics_is_one_line(tmp_path, capsys):
    run = _small_run(tmp_path)
    data = (run / "metrics.jsonl").read_bytes().split(b"\n")
    data[2] = data[2][:10] + b"\xff\xfe" + data[2][12:]
    (run / "metrics.jsonl").write_bytes(b"\n".join(data))
    capsys.readouterr()
    assert cli.main(["plot", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 3: not UTF-8" in err and "metrics.jsonl" in err, err


@pytest.mark.parametrize("damage", [b"", b"\x00garbage" * 10, "truncate", "dict"])
def test_plot_skips_a_damaged_snapshot_and_names_it(tmp_path, capsys, damage):
    run = _small_run(tmp_path)
    snap = sorted((run / "connectivity").glob("step_0000010_*.pt"))[0]
    if damage == "truncate":
        snap.write_bytes(snap.read_bytes()[:200])
    elif damage == "dict":
        torch.save({}, snap)
    else:
        snap.write_bytes(damage)
    capsys.readouterr()
    assert cli.main(["plot", str(run)]) == 0
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "warning" in err and snap.name in err and "skipped" in err, err
    assert "fig4: " in out and (run / "fig4_connectivity.png").stat().st_size > 0  # drawn from the others


def test_plot_with_a_damaged_summary_draws_the_rest(tmp_path, capsys):
    run = _small_run(tmp_path)
    (run / "summary.json").write_bytes(b'{"task": "add", \xff')
    capsys.readouterr()
    assert cli.main(["plot", str(run)]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "summary.json" in err


def test_sweep_plot_with_one_damaged_summary(tmp_path, capsys, monkeypatch):
    sweep_tasks_in_this_process(monkeypatch)  # the sweep directory is the set-up, not what is checked
    out = tmp_path / "sweep"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (
            cli.main(
                [
                    "sweep",
                    *TINY,
                    "--steps",
                    "10",
                    "--lmn-every",
                    "5",
                    "--grid",
                    "lr=0.001,0.002",
                    "--workers",
                    "1",
                    "--no-plot",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
    runs = sorted(d for d in out.iterdir() if (d / "summary.json").is_file())
    (runs[0] / "summary.json").write_text('{"task": "add", "memoriz')
    capsys.readouterr()
    assert cli.main(["plot", str(out)]) == 0
    stdout, err = capsys.readouterr()
    assert err.count("\n") == 1 and runs[0].name in err and "summary.json" in err, err
    assert "1 done, 1 damaged" in stdout
    assert (out / "sweep.csv").read_text().count("\n") == 3


def test_sweep_outputs_into_a_full_disk(tmp_path, monkeypatch, capsys):
    sweep_tasks_in_this_process(monkeypatch)  # the sweep directory is the set-up, not what is checked
    out = tmp_path / "sweep"
    argv = ["sweep", *TINY, "--steps", "10", "--lmn-every", "5", "--grid", "lr=0.001", "--workers", "1", "--no-plot", "--out", str(out)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(argv) == 0
    before = (out / "sweep.csv").read_bytes()
    from grokfast_metrics.sweep import command

    real = command.write_outputs

    def full(*a, **k):
        monkeypatch.setattr(runlog, "_write_fd", Full(0))
        return real(*a, **k)

    monkeypatch.setattr(command, "write_outputs", full)
    capsys.readouterr()
    assert cli.main(["plot", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "sweep.csv" in err, err
    assert (out / "sweep.csv").read_bytes() == before  # not emptied


def test_a_sweep_run_that_cannot_write_is_failed_not_done(tmp_path, monkeypatch):
    from dataclasses import asdict

    from grokfast_metrics.experiment.config import TrainConfig
    from grokfast_metrics.sweep.engines import run_one

    cfg = TrainConfig(steps=20, device="cpu", hidden=8, embed_dim=4, probe=8, complexity="off", lmn_every=5, log_every=1)
    monkeypatch.setattr(runlog, "_write_fd", Full(2000))
    res = run_one(asdict(cfg), str(tmp_path / "run"), plot=False)
    assert res["status"] == "failed" and "No space left on device" in res["error"], res
