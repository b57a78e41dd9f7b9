"""``sweep --batched``: a stack of models gives the metrics of the same runs trained one by one; the grouping into
stacks; a batched sweep through the CLI (a failing run, resume) and ``plot`` on its sweep directory."""

from __future__ import annotations

import csv
import json

import pytest

from grokfast_metrics.cli import main as cli
from grokfast_metrics.experiment.config import TrainConfig
from grokfast_metrics.experiment.runlog import read_json, read_metrics
from grokfast_metrics.experiment.trainer import train
from grokfast_metrics.sweep import plan_runs
from grokfast_metrics.sweep.batched import plan_stacks, stack_key, train_stack

#: a few steps on a small probe: about a second per run
BASE = {
    "task": "add",
    "steps": 30,
    "lmn_every": 10,
    "probe": 24,
    "complexity": "off",
    "save_connectivity": ["final"],
    "device": "cpu",
    "log_every": 5,
}
#: (weight decay, init scale, lr, seed) of the stacked runs: every per-model hyperparameter varies
POINTS = [(0.0, 1.0, 1e-3, 0), (1.0, 2.0, 3e-3, 1), (0.2, 0.5, 1e-3, 2), (0.05, 1.0, 2e-3, 0)]
#: the issue's bound on the relative difference of losses and LMN between a batched and a one-by-one run
REL_TOL = 1e-5


def _rel(a: float, b: float) -> float:
    return 0.0 if a == b else abs(a - b) / max(abs(a), abs(b))


@pytest.mark.parametrize("grokfast", ["none", "ema"])
def test_batched_runs_match_the_same_runs_one_by_one(tmp_path, grokfast):
    cfgs = [TrainConfig(**BASE, grokfast=grokfast, weight_decay=wd, init_scale=a, lr=lr, seed=s) for wd, a, lr, s in POINTS]
    for i, cfg in enumerate(cfgs):
        train(cfg, tmp_path / f"one{i}", progress=False, plot=False)
    results = train_stack(cfgs, [tmp_path / f"stack{i}" for i in range(len(cfgs))], plot=False)
    assert all(not r.interrupted and r.exit_code == 0 for r in results)
    worst = 0.0
    for i in range(len(cfgs)):
        one, stacked = read_metrics(tmp_path / f"one{i}"), read_metrics(tmp_path / f"stack{i}")
        assert [r["step"] for r in one] == [r["step"] for r in stacked]  # the same rows
        assert one[0].keys() == stacked[0].keys()
        for a, b in zip(one, stacked):
            assert [k for k, v in a.items() if v is None] == [k for k, v in b.items() if v is None]
            worst = max([worst] + [_rel(v, b[k]) for k, v in a.items() if v is not None and k not in ("step", "time_s")])
        s1, s2 = (read_json(tmp_path / f"{d}{i}" / "summary.json") for d in ("one", "stack"))
        assert (s1["memorization_step"], s1["lmn_evaluations"]) == (s2["memorization_step"], s2["lmn_evaluations"])
        assert sorted(p.name for p in (tmp_path / f"one{i}" / "connectivity").iterdir()) == sorted(
            p.name for p in (tmp_path / f"stack{i}" / "connectivity").iterdir()
        )
    # observed worst over every column (losses, accuracies, LMN, norms, ranks), 30 steps, 4 runs, this machine:
    # 1.13e-6 (none: the LMN of the 4th run at step 30) / 2.8e-7 (ema); losses <= 2.7e-7 (fp32 rounding of the vmapped
    # forward; the stack's AdamW is torch's single-tensor AdamW operation for operation)
    assert worst <= REL_TOL  # 8.9x margin


def test_runs_that_differ_in_architecture_or_cannot_stack_are_grouped_apart(tmp_path):
    runs = plan_runs(TrainConfig(**BASE), [("weight_decay", [0.0, 0.2]), ("hidden", [50, 100])], [0, 1], tmp_path)
    runs += plan_runs(TrainConfig(**BASE, spectral_entropy_weight=0.1), [], [0], tmp_path / "penalty")
    tasks, notes = plan_stacks(runs, workers=2)
    assert sorted(len(t) for t in tasks) == [1, 4, 4]  # a group of 4 per worker
    for task in tasks:
        assert len({stack_key(r.config) for r in task}) == 1  # a stack shares everything outside PER_MODEL
    assert any("runs one by one: --spectral-entropy-weight" in n for n in notes)
    assert any("2 groups" in n for n in notes) and notes[-1].endswith("8 runs in 2 stacks of 4, 4; 1 run(s) one by one")
    with pytest.raises(ValueError, match="cannot stack runs whose options differ"):
        train_stack([r.config for r in runs[:4:3]], [tmp_path / "a", tmp_path / "b"])


FAST = [
    "--task",
    "add",
    "--steps",
    "20",
    "--lmn-every",
    "10",
    "--probe",
    "24",
    "--complexity",
    "off",
    "--no-plot",
    "--no-progress",
    "--save-connectivity",
    "",
]


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_batched_sweep_records_failures_resumes_and_plot_rewrites_its_outputs(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", *FAST, "--grid", "init_scale=1,2", "probe=24,5000", "--workers", "1", "--batched", "--out", str(out)]
    assert cli.main(argv) == 1  # probe=5000 is larger than the task: those two runs fail
    assert "4 runs in 1 stacks of 4" in capsys.readouterr().err
    rows = _rows(out / "sweep.csv")
    assert sorted(r["status"] for r in rows) == ["done", "done", "failed", "failed"]
    assert all("larger than the task" in r["error"] for r in rows if r["status"] == "failed")
    for r in rows:
        if r["status"] == "done":
            assert json.loads((out / r["run"] / "summary.json").read_text())["steps_done"] == 20
    assert cli.main(argv) == 1  # resumed: the finished runs are skipped
    assert sorted(r["status"] for r in _rows(out / "sweep.csv")) == ["failed", "failed", "skipped", "skipped"]

    for name in ("sweep.csv", "phase.png", "lmn_predicts.png"):
        (out / name).unlink()
    capsys.readouterr()
    assert cli.main(["plot", str(out)]) == 0
    assert "4 runs: 2 done, 2 failed" in capsys.readouterr().out
    replotted = _rows(out / "sweep.csv")  # from the directory alone: the same rows as the sweep's
    assert [(r["run"], r["status"], r["lmn_end"]) for r in replotted] == [(r["run"], r["status"], r["lmn_end"]) for r in rows]
    assert (out / "phase.png").stat().st_size > 0 and (out / "lmn_predicts.png").stat().st_size > 0
    assert cli.main(["plot", str(out), "--out", str(tmp_path / "x")]) == 2

    manifest = json.loads((out / "sweep.json").read_text())  # a sweep.json without its run list: the
    (out / "sweep.json").write_text(json.dumps({"axes": manifest["axes"]}))  # run directories' own config.json
    assert cli.main(["plot", str(out)]) == 0
    assert [(r["run"], r["lmn_end"]) for r in _rows(out / "sweep.csv")] == [(r["run"], r["lmn_end"]) for r in rows if r["status"] == "done"]
