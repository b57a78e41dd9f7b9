"""Sweeps: the grid, outcomes, a 4-run sweep on 2 workers (resumable, a failing run does not stop the
others) with the local process pool and with a local Ray."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import sys

import pytest

from grokfast_metrics.cli import main as cli
from grokfast_metrics.experiment import options
from grokfast_metrics.experiment.config import TrainConfig
from grokfast_metrics.sweep import classify, engines, parse_axis, plan_runs

#: a few steps, LMN on a small probe, no compression complexity: seconds per run
FAST = [
    "--task",
    "add",
    "--steps",
    "40",
    "--lmn-every",
    "20",
    "--probe",
    "24",
    "--complexity",
    "off",
    "--no-plot",
    "--no-progress",
    "--save-connectivity",
    "",
]


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    options.add_train_arguments(p)
    return p


def test_parse_axis_converts_like_the_train_option():
    p = _train_parser()
    assert parse_axis("init_scale=0.5,1,2", p) == ("init_scale", [0.5, 1.0, 2.0])
    assert parse_axis("--train-fraction=0.3,0.5", p) == ("train_fraction", [0.3, 0.5])
    assert parse_axis("grokfast=none,ema", p) == ("grokfast", ["none", "ema"])
    for spec, match in [
        ("init_scale", "name=v1"),
        ("nope=1,2", "unknown grid axis 'nope'"),
        ("seed=0,1", "use --seeds"),
        ("steps=10,x", "bad value 'x'"),
        ("grokfast=none,fast", "not one of"),
        ("lr=", "no values"),
        ("lr=1e-3,0.001", "repeats a value"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_axis(spec, p)


def test_plan_runs_names_every_point_and_seed(tmp_path):
    axes = [("weight_decay", [0.0, 0.2]), ("grokfast", ["none", "ema"])]
    runs = plan_runs(TrainConfig(steps=10), axes, [0, 1], tmp_path)
    assert len(runs) == 8 and len({r.run_dir for r in runs}) == 8
    assert runs[0].name == "weight_decay=0_grokfast=none_seed=0" and runs[0].config.seed == 0
    assert runs[-1].config.weight_decay == 0.2 and runs[-1].config.grokfast == "ema" and runs[-1].config.seed == 1
    with pytest.raises(ValueError, match="grid point lr=-1_seed=0: lr must be a positive number"):
        plan_runs(TrainConfig(), [("lr", [-1.0])], [0], tmp_path)


@pytest.mark.parametrize(
    "mem, gen, outcome",
    [
        (None, None, "confusion"),
        (100, None, "memorization"),
        (100, 150, "comprehension"),
        (100, 200, "comprehension"),
        (100, 201, "grokking"),
        (0, 5, "grokking"),
    ],
)
def test_classify(mem, gen, outcome):
    assert classify(mem, gen) == outcome


def _sweep(tmp_path, *extra: str) -> tuple[int, list[dict]]:
    out = tmp_path / "sweep"
    rc = cli.main(["sweep", *FAST, "--grid", "weight_decay=0,0.2", "probe=24,5000", "--workers", "2", "--out", str(out), *extra])
    with open(out / "sweep.csv", newline="") as f:
        return rc, list(csv.DictReader(f))


def _check_four_runs(tmp_path, *engine: str) -> None:
    rc, rows = _sweep(tmp_path, *engine)
    assert rc == 1 and len(rows) == 4  # probe=5000 is larger than the task: those two runs fail
    ok = [r for r in rows if r["probe"] == "24"]
    bad = [r for r in rows if r["probe"] == "5000"]
    assert [r["status"] for r in ok] == ["done", "done"] and all(r["outcome"] for r in ok)
    assert all(r["status"] == "failed" and "larger than the task" in r["error"] for r in bad)
    for r in ok:
        summary = json.loads((tmp_path / "sweep" / r["run"] / "summary.json").read_text())
        assert summary["steps_done"] == 40 and not summary["interrupted"]
    assert all((tmp_path / "sweep" / r["run"] / "error.txt").exists() for r in bad)
    assert (tmp_path / "sweep" / "phase.png").stat().st_size > 0

    stamps = {r["run"]: (tmp_path / "sweep" / r["run"] / "summary.json").stat().st_mtime_ns for r in ok}
    rc, rows = _sweep(tmp_path, *engine)  # resumed: the finished runs are skipped, untouched
    assert rc == 1
    assert sorted(r["status"] for r in rows) == ["failed", "failed", "skipped", "skipped"]
    assert stamps == {r["run"]: (tmp_path / "sweep" / r["run"] / "summary.json").stat().st_mtime_ns for r in ok}


def test_local_sweep_on_two_workers_resumes_and_survives_a_failing_run(tmp_path):
    _check_four_runs(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason='ray is not installed (pip install "grokfast_metrics[ray]")')
def test_ray_sweep_runs_the_same_four_runs(tmp_path):
    _check_four_runs(tmp_path, "--engine", "ray")


def test_ray_engine_without_ray_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    runs = plan_runs(TrainConfig(steps=5), [], [0], tmp_path)
    with pytest.raises(RuntimeError, match=r"pip install \"grokfast_metrics\[ray\]\""):
        engines.run_sweep(runs, "ray", 1)


def test_bad_sweep_options_exit_2(tmp_path, capsys):
    assert cli.main(["sweep", *FAST, "--grid", "nope=1", "--out", str(tmp_path / "s")]) == 2
    assert "unknown grid axis" in capsys.readouterr().err
    assert cli.main(["sweep", *FAST, "--seeds", "0", "--out", str(tmp_path / "s")]) == 2
