"""``grokfast-metrics bench --async-tracking`` at a tiny size: the figure's shape, not its speed (no timed assertions)."""

from __future__ import annotations

import argparse
import re

import torch

from grokfast_metrics.bench import command as bench_command
from grokfast_metrics.bench.async_track import MODES, async_tracking


def _parse(argv):
    return bench_command.add_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_every_mode_is_timed_in_the_same_run():
    res = async_tracking(torch.device("cpu"), n_track=8, steps=2, rounds=2, n_lambda=5)
    assert set(res.per_step) == set(MODES) and all(len(t) == 2 and min(t) > 0 for t in res.per_step.values())
    assert res.eigen_s > 0 and res.workers == 1


def test_cli_prints_the_three_modes_and_writes_no_csv(tmp_path, capsys):
    csv = tmp_path / "r.csv"
    argv = ["--async-tracking", "--train-n", "8", "--repeats", "1", "--n-lambda", "5", "--csv", str(csv)]
    assert bench_command.run(_parse(argv)) == 0
    text = capsys.readouterr().out
    rows = {m: re.search(rf"^\| {m} \| ([0-9.]+) \| [0-9.]+-[0-9.]+ \| ([0-9.]+) \|$", text, re.M) for m in MODES}
    assert all(rows.values()) and rows["none"].group(2) == "1.0"
    assert "the eigen step alone" in text and not csv.exists()


def test_cli_bad_sizes_return_2(capsys):
    assert bench_command.run(_parse(["--async-tracking", "--train-n", "1"])) == 2
    assert "--async-tracking needs" in capsys.readouterr().err
