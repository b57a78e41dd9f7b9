"""Model layers and tails, tracker non-interference, logs/plot of a short run, the CLI."""

import csv
import json
import math
import subprocess

import pytest
import torch
from helpers import PYTHON

import grokfast_metrics as gm
from grokfast_metrics.cli import main as cli
from grokfast_metrics.experiment import options
from grokfast_metrics.experiment import trainer as train_mod
from grokfast_metrics.experiment.config import TrainConfig
from grokfast_metrics.experiment.model import LAYERS, GrokMLP, representation, representations, scale_init
from grokfast_metrics.experiment.run import probe_indices
from grokfast_metrics.experiment.tasks import make_task
from grokfast_metrics.experiment.trainer import train

TINY = {"task": "add", "device": "cpu", "hidden": 16, "embed_dim": 8, "log_every": 1, "probe": 12, "threads": 1}


@pytest.fixture(scope="module")
def model_and_x():
    torch.manual_seed(0)
    task = make_task("add")
    return GrokMLP(task.n_tokens, task.n_classes, 8, 16), task.x[:10]


@pytest.mark.parametrize("layer", LAYERS)
def test_tail_of_representation_gives_logits(model_and_x, layer):
    model, x = model_and_x
    h, tail = representation(model, x, layer)
    torch.testing.assert_close(tail(h), model(x), atol=1e-6, rtol=1e-5)
    own = {id(m) for m in model.modules()}
    assert all(id(m) in own for m in tail)  # the model's own modules, no copies
    assert not h.requires_grad


def test_layer_equivalences(model_and_x):
    """docs/lmn.md, "Which layer": embeddings == hidden1_pre, hidden1_post == hidden2_pre, hidden2_post is affine (LMN 1)."""
    model, x = model_and_x
    reps = representations(model, x, list(LAYERS))
    L = {k: gm.connectivity(h, t, backend="torch") for k, (h, t) in reps.items()}
    torch.testing.assert_close(L["embeddings"], L["hidden1_pre"], atol=1e-5, rtol=0)
    torch.testing.assert_close(L["hidden1_post"], L["hidden2_pre"], atol=1e-5, rtol=0)
    assert gm.lmn_from_connectivity(L["hidden2_post"]).lmn == pytest.approx(1.0, abs=1e-6)
    ref = gm.lmn(*reps["hidden1_post"], backend="reference").lmn
    assert gm.lmn_from_connectivity(L["hidden1_post"]).lmn == pytest.approx(ref, rel=1e-5)


def test_separate_embeddings_and_init_scale():
    torch.manual_seed(0)
    m = GrokMLP(5, 3, 4, 6, embedding="separate")
    assert m.embed_a is not m.embed_b
    before = [p.detach().clone() for p in m.parameters()]
    scale_init(m, 0.5)
    for b, p in zip(before, m.parameters()):
        torch.testing.assert_close(p.detach(), 0.5 * b)
    with pytest.raises(ValueError):
        scale_init(m, 0.0)


def test_probe_subset_seeded_and_rng_untouched():
    task = make_task("add")
    state = torch.get_rng_state()
    a, b = probe_indices(task, 40, 7), probe_indices(task, 40, 7)
    assert torch.equal(a, b) and len(set(a.tolist())) == 40
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(probe_indices(task, "test", 0), task.test_idx)


def test_tracking_does_not_perturb_training(tmp_path):
    """Bit-identical losses and parameters with LMN at every step (two layers) and without tracking."""
    state = torch.get_rng_state()
    on = train(
        TrainConfig(steps=25, lmn_every=1, lmn_layers=["hidden1_post", "embeddings"], grokfast="ema", **TINY),
        tmp_path / "on",
        progress=False,
        plot=False,
    )
    off = train(TrainConfig(steps=25, lmn_every=0, grokfast="ema", **TINY), tmp_path / "off", progress=False, plot=False)
    assert torch.equal(torch.get_rng_state(), state)
    loss_on = [r["train_loss"] for r in on.rows]
    assert loss_on == [r["train_loss"] for r in off.rows] and len(loss_on) == 26
    assert [r["test_loss"] for r in on.rows] == [r["test_loss"] for r in off.rows]
    assert [r["l2"] for r in on.rows] == [r["l2"] for r in off.rows]
    assert all(r["lmn"] is not None and r["lmn"] >= 1.0 for r in on.rows)
    assert all(r["lmn"] is None for r in off.rows)
    assert len(set(loss_on)) > 20  # it did train


def test_key_steps_match_logged_accuracies(tmp_path):
    res = train(TrainConfig(steps=40, lmn_every=0, lr=1e-2, **TINY), tmp_path, progress=False, plot=False)
    first_mem = next((r["step"] for r in res.rows if r["train_acc"] == 1.0), None)
    first_gen = next((r["step"] for r in res.rows if r["test_acc"] >= 0.99), None)
    assert res.summary["memorization_step"] == first_mem
    assert res.summary["generalization_step"] == first_gen


def test_cli_short_run_writes_valid_logs_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(
        [
            "train",
            "--task",
            "s4",
            "--steps",
            "12",
            "--lmn-every",
            "5",
            "--probe",
            "16",
            "--hidden",
            "16",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--no-progress",
            "--log-every",
            "3",
        ]
    )
    assert rc == 0
    assert "memorization step" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 12]  # every 3, LMN / complexity steps, final
    cx_steps = [r["step"] for r in rows if r.get("complexity_bits_eps0.01") is not None]
    assert cx_steps == [0, 1, 2, 4, 8, 12]  # "log" schedule: 0, powers of two, final
    assert all(r["l2_fc3"] > 0 and r["l2_last"] == r["l2_fc3"] for r in rows)
    assert all(r["erank_fc2"] is not None for r in rows if r["lmn"] is not None)
    assert [r["step"] for r in rows if r["lmn"] is not None] == [0, 1, 2, 3, 5, 10, 12]  # early 1, 2, 3; every 5
    with open(out / "metrics.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in csv_rows] == [r["step"] for r in rows]
    assert float(csv_rows[5]["lmn"]) == pytest.approx(rows[5]["lmn"]) and csv_rows[6]["lmn"] == ""  # steps 5, 6
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["task"] == "s4" and cfg["n_inputs"] == 576 and cfg["n_probe"] == 16
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == 12 and not summary["interrupted"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interrupt_leaves_valid_logs_and_plot(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = train_mod.track_lmn

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # steps 0, 1, 2, 3 (early), 4, 8
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "track_lmn", flaky)
    rc = cli.main(
        [
            "train",
            "--steps",
            "50",
            "--lmn-every",
            "4",
            "--probe",
            "8",
            "--hidden",
            "8",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
            "--no-progress",
            "--log-every",
            "1",
        ]
    )
    assert rc == 130
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # step 8's metrics were computed before its LMN call was interrupted: logged, without LMN
    assert [r["step"] for r in rows] == list(range(9)) and rows[-1]["lmn"] is None and rows[4]["lmn"] is not None
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["interrupted"] and summary["steps_done"] == 8
    assert (tmp_path / "curves.png").exists()


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["train", "--task", "mul"], "invalid choice"),
        (["train", "--train-fraction", "1.0"], "train fraction"),
        (["train", "--steps", "0"], "steps"),
        (["train", "--probe", "1"], "probe"),
        (["train", "--probe", "2000"], "larger than the task"),
        (["train", "--lmn-layer", "hidden3"], "unknown LMN layer 'hidden3'"),
        (["train", "--lmn-layer", "hidden2_pre:hidden1_post"], "must come after"),
        (["train", "--dtype", "float16"], "invalid choice"),
        (["train", "--adam-eps", "0"], "adam eps"),
        (["train", "--checkpoint-every", "-1"], "checkpoint_every"),
        (["train", "--grokfast", "ema", "--ema-alpha", "1.5"], "alpha"),
        (["train", "--bogus"], "unrecognized"),
        ([], "required"),
    ],
)
def test_cli_bad_arguments_one_line_exit_2(argv, msg, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


def test_cli_unwritable_out_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["train", "--out", str(blocker / "sub"), "--steps", "1"]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_cli_missing_lazy_subcommand(monkeypatch, capsys):
    monkeypatch.setitem(cli.LAZY, "plot", ("grokfast_metrics._no_such_module", "x"))
    assert cli.main(["plot", "--anything"]) == 2
    err = capsys.readouterr().err
    assert "not available" in err and err.count("\n") == 1


def test_python_dash_m_entry_point():
    p = subprocess.run([*PYTHON, "-m", "grokfast_metrics", "train", "--steps", "-3"], capture_output=True, text=True, check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "steps" in p.stderr


# ------------------------------------------------------------------------------------------
# every layer, other measures, connectivity snapshots, the plot command (docs/training.md)


def test_all_layers_in_one_run_with_equivalences_and_affine_warning(tmp_path):
    with pytest.warns(UserWarning, match="hidden2_post: the map from there to the logits is affine"):
        rc = cli.main(
            [
                "train",
                "--steps",
                "6",
                "--lmn-every",
                "3",
                "--probe",
                "12",
                "--hidden",
                "12",
                "--device",
                "cpu",
                "--lmn-layer",
                "all",
                "--complexity",
                "off",
                "--out",
                str(tmp_path),
                "--no-progress",
                "--no-plot",
            ]
        )
    assert rc == 0
    rows = [r for r in (json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()) if r["lmn"] is not None]
    assert rows and all(r["lmn"] == r["lmn_hidden1_post"] for r in rows)  # default layer first
    for r in rows:
        assert r["lmn_hidden1_post"] == pytest.approx(r["lmn_hidden2_pre"], rel=1e-5)  # same interpolation (docs/lmn.md)
        assert r["lmn_embeddings"] == pytest.approx(r["lmn_hidden1_pre"], rel=1e-5)
        assert r["lmn_hidden2_post"] == 1.0


def test_connectivity_snapshots_and_plot_command(tmp_path, capsys):
    run = tmp_path / "run"
    rc = cli.main(
        [
            "train",
            "--steps",
            "30",
            "--lr",
            "1e-2",
            "--lmn-every",
            "10",
            "--probe",
            "20",
            "--hidden",
            "16",
            "--device",
            "cpu",
            "--complexity",
            "10",
            "--save-connectivity",
            "0,7,memorization,final",
            "--out",
            str(run),
            "--no-progress",
        ]
    )
    assert rc == 0
    summary = json.loads((run / "summary.json").read_text())
    saved = sorted(int(p.name.split("_")[1]) for p in (run / "connectivity").glob("step_*.pt"))
    expected = {0, 7, 30} | ({summary["memorization_step"]} if summary["memorization_step"] is not None else set())
    assert saved == sorted(expected)
    snap = torch.load(next((run / "connectivity").glob("step_0000007_*.pt")), weights_only=True)
    rows = {r["step"]: r for r in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines())}
    assert snap["L"].shape == (20, 20) and snap["lmn"] == pytest.approx(rows[7]["lmn"])
    assert [s for s, r in sorted(rows.items()) if r.get("complexity_bits_eps0.1") is not None] == [0, 10, 20, 30]
    capsys.readouterr()
    assert cli.main(["plot", str(run), "--out", str(tmp_path / "figs")]) == 0
    out = capsys.readouterr().out
    assert "Pearson r with test loss" in out
    for name in ("fig2_curves.png", "fig3_layers.png", "fig4_connectivity.png", "scatter_test_loss.png", "figures.json"):
        assert (tmp_path / "figs" / name).stat().st_size > 0


def test_spectral_entropy_regularizer_lowers_effective_rank(tmp_path):
    def total_erank(weight):
        cfg = TrainConfig(steps=60, lr=1e-2, lmn_every=0, complexity="off", spectral_entropy_weight=weight, **TINY)
        res = train(cfg, tmp_path / f"w{weight}", progress=False, plot=False)
        last = res.rows[-1]
        return sum(v for k, v in last.items() if k.startswith("erank_")), res.rows[-1]["train_loss"]

    erank0, _ = total_erank(0.0)
    erank1, _ = total_erank(1.0)
    assert erank1 < erank0 * 0.9


@pytest.mark.parametrize(
    "args, match",
    [
        (["--complexity", "sometimes"], "complexity must be"),
        (["--complexity-eps", "-1"], "complexity eps"),
        (["--spectral-entropy-weight", "-0.5"], "spectral entropy weight"),
        (["--save-connectivity", "0,later"], "save-connectivity"),
    ],
)
def test_issue6_bad_arguments(tmp_path, capsys, args, match):
    assert cli.main(["train", "--steps", "2", "--device", "cpu", "--out", str(tmp_path), *args]) == 2
    assert match in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# one source of defaults, no plotting import, the shared tracker machinery


def _parse_train(argv):
    args, extra = cli.build_parser(["train", *argv]).parse_known_args(["train", *argv])
    assert not extra
    return options.train_config(args)


def test_cli_defaults_are_the_dataclass_defaults():
    assert _parse_train([]) == TrainConfig()


def test_cli_options_map_to_fields():
    cfg = _parse_train(
        [
            "--lmn-layer",
            "embeddings",
            "--lmn-layer",
            "all",
            "--no-lmn-early",
            "--save-connectivity",
            " 5, final ",
            "--complexity-eps",
            "0.5",
            "0.25",
            "--probe",
            "64",
            "--lmn-every",
            "3",
            "--lmn-backend",
            "cpu",
        ]
    )
    assert cfg.lmn_layers == ["embeddings", "hidden1_post", "hidden1_pre", "hidden2_pre", "hidden2_post"]
    assert not cfg.lmn_early and cfg.save_connectivity == ["5", "final"] and cfg.complexity_eps == [0.5, 0.25]
    assert cfg.probe == "64" and cfg.lmn_every == 3 and cfg.lmn_backend == "cpu"
    assert _parse_train(["--save-connectivity", ""]).save_connectivity == []


def test_importing_the_trainer_does_not_import_matplotlib():
    code = "import sys, grokfast_metrics.experiment.trainer, grokfast_metrics.cli.main; assert 'matplotlib' not in sys.modules"
    p = subprocess.run([*PYTHON, "-c", code], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr


def test_trainer_tracker_records_nan_when_parameters_diverge(model_and_x):
    from grokfast_metrics.tracking.schedule import Schedule

    model, x = model_and_x
    tracker = train_mod.layer_tracker(model, x, TrainConfig(lmn_layers=["hidden1_post", "embeddings"], n_lambda=5), Schedule.for_tracker(1))
    assert tracker.update(0) == tracker.results["hidden1_post"].lmn >= 1.0
    bad = GrokMLP(model.embed_a.num_embeddings, model.fc3.out_features, 8, 16)
    with torch.no_grad():
        bad.fc2.weight[0, 0] = float("inf")
    tracker = train_mod.layer_tracker(bad, x, TrainConfig(n_lambda=5), Schedule.for_tracker(1))
    with pytest.warns(UserWarning, match=r"'fc2\.weight'.*NaN"):
        assert math.isnan(tracker.update(0))
    assert tracker.results is None and math.isnan(tracker.compute())
