"""Figures from a run directory: spectral reordering, correlations, rendering."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from grokfast_metrics.cli import plot as plot_command
from grokfast_metrics.experiment import runlog
from grokfast_metrics.figures import run as figures


def test_spectral_order_recovers_blocks():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (30,), generator=g)
    L = (labels[:, None] == labels[None, :]).double() * 0.9 + 0.05
    L.fill_diagonal_(1.0)
    perm = figures.spectral_order(L.numpy())
    assert sorted(perm.tolist()) == list(range(30))
    ordered = labels[torch.as_tensor(perm)].tolist()
    changes = sum(a != b for a, b in zip(ordered, ordered[1:]))
    assert changes == len(set(ordered)) - 1  # each cluster is contiguous


def test_pearson_matches_numpy_and_handles_degenerate():
    x, y = [1.0, 2.0, 4.0, 3.0], [2.0, 1.0, 5.0, 4.5]
    assert figures.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert figures.pearson([1.0, 2.0], [3.0, 4.0]) is None
    assert figures.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None


def _fake_run(tmp_path):
    rows = []
    for s in range(0, 401, 20):
        mem, gen = 100, 300
        lmn = 5 + s / 20 if s < mem else 10 - 8 * (s - mem) / (gen - mem) if s <= gen else 2.0
        rows.append(
            {
                "step": s,
                "train_loss": 1 / (s + 1),
                "train_acc": min(1.0, s / mem),
                "test_loss": 0.3 * lmn + 0.01,
                "test_acc": 0.1 if s < gen else 1.0,
                "l2": 40 - s / 20,
                "lmn": lmn,
                "lmn_hidden1_post": lmn,
                "lmn_embeddings": lmn * 1.5,
                "time_s": s / 100,
            }
        )
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "summary.json").write_text(json.dumps({"memorization_step": 100, "generalization_step": 300, "lmn_layer": "hidden1_post"}))
    for step, c in ((100, 6), (300, 2)):
        labels = torch.arange(24) % c
        L = (labels[:, None] == labels[None, :]).float()
        runlog.save_connectivity(tmp_path, step, "hidden1_post", L, float(c))
    return rows


def test_make_figures_renders_everything(tmp_path):
    _fake_run(tmp_path)
    res = figures.make_figures(tmp_path)
    for key in ("fig2", "fig3", "fig4"):
        assert res[key] is not None and (tmp_path / res[key].split("/")[-1]).stat().st_size > 10_000
    sc = res["scatter"]
    assert sc["phase_steps"] == [100, 300] and sc["phase_points"] == 11
    assert sc["pearson_lmn_test_loss"] == pytest.approx(1.0)  # test loss is affine in LMN here
    assert sc["pearson_l2_test_loss"] is not None and sc["pearson_l2_test_loss"] > 0.9
    assert json.loads((tmp_path / "figures.json").read_text())["fig4"] == res["fig4"]
    snaps = runlog.load_connectivity(tmp_path)
    assert [s["step"] for s in snaps] == [100, 300] and snaps[0]["L"].shape == (24, 24)


def test_plot_cli_bad_run_dir(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    plot_command.add_arguments(parser)
    assert plot_command.run(parser.parse_args([str(tmp_path / "nope")])) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
