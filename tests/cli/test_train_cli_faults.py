"""Clean failures of ``grokfast-metrics train`` (docs/training.md): one line on stderr, exit 2, nothing left behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from helpers import PYTHON, TINY_MODEL

from grokfast_metrics.cli import main as cli

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [*TINY_MODEL, "--steps", "3", "--probe", "8", "--lmn-every", "2", "--complexity", "off", "--no-progress", "--no-plot"]


def _one_line_exit_2(argv, capsys, match):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    "args, match",
    [
        (["--seed", str(2**70)], "seed"),
        (["--probe-seed", str(2**70)], "probe seed"),
        (["--device", "meta"], "device"),
        (["--ema-lamb", "nan"], "ema lamb"),
        (["--lr", "inf"], "lr"),
        (["--ma-lamb=-inf"], "ma lamb"),
        (["--ema-alpha", "nan"], "ema alpha"),
    ],
)
def test_bad_values_are_one_line_and_leave_no_directory(tmp_path, capsys, args, match):
    out = tmp_path / "run"
    _one_line_exit_2(["train", *TINY, "--out", str(out), *args], capsys, match)
    assert not out.exists()


def test_unavailable_backend_is_refused_before_the_run_directory(tmp_path, capsys, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("Triton runs here; the refusal is for a machine without CUDA")
    out = tmp_path / "run"
    _one_line_exit_2(["train", *TINY, "--out", str(out), "--lmn-backend", "triton"], capsys, "triton")
    assert not out.exists()
    out.mkdir()  # the next try in the same (existing, empty) directory runs
    _one_line_exit_2(["train", *TINY, "--out", str(out), "--lmn-backend", "triton"], capsys, "triton")
    assert list(out.iterdir()) == []
    assert cli.main(["train", *TINY, "--out", str(out)]) == 0


@pytest.mark.parametrize("args", [["--embed-dim", "100000000"], ["--hidden", "1000000"]])
def test_a_model_that_cannot_fit_is_refused_up_front(tmp_path, capsys, args):
    out = tmp_path / "run"
    err = _one_line_exit_2(["train", *TINY, "--out", str(out), *args], capsys, "needs about")
    assert "GiB" in err and ("--hidden" in err or "--embed-dim" in err)
    assert not out.exists()


def test_memory_estimate_counts_the_training_state():
    from grokfast_metrics.experiment.config import TrainConfig
    from grokfast_metrics.experiment.preflight import estimate_bytes, n_parameters
    from grokfast_metrics.experiment.tasks import make_task

    task = make_task("add")
    small = estimate_bytes(TrainConfig(hidden=100, embed_dim=32))
    ma = estimate_bytes(TrainConfig(hidden=100, embed_dim=32, grokfast="ma", ma_window=100))
    f64 = estimate_bytes(TrainConfig(hidden=100, embed_dim=32, dtype="float64"))
    n = n_parameters(TrainConfig(hidden=100, embed_dim=32), task)
    model = __import__("grokfast_metrics.experiment.model", fromlist=["GrokMLP"]).GrokMLP(
        task.n_tokens, task.n_classes, 32, 100, "separate"
    )
    assert n == sum(p.numel() for p in model.parameters())
    assert 4 * n * 4 < small < 64 << 20  # the paper's model: 17k parameters, a few MB with the activations
    assert ma - small == 100 * n * 4  # the MA filter keeps ma_window gradients
    assert f64 == 2 * small - 8 * task.n_inputs**2  # everything but L doubles
    assert estimate_bytes(TrainConfig(hidden=1_000_000)) > 4 * 10**12 * 4  # 1e12 parameters in fc2 alone, x4 states


_SIGINT_IN_IMPORT = """
import os, signal, sys
import grokfast_metrics.cli.main as c
print('torch' in sys.modules, flush=True)

class Finder:  # Ctrl-C arrives while torch is being imported (the slow part of the start-up)
    def find_spec(self, name, path=None, target=None):
        if name == sys.argv[1]:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, Finder())
sys.exit(c.main(['train', '--steps', '3', '--device', 'cpu', '--out', sys.argv[2], '--no-progress']))
"""


@pytest.mark.parametrize("module", ["torch", "numpy", "grokfast_metrics.experiment.trainer"])
def test_ctrl_c_during_start_up_is_one_line_and_130(tmp_path, module):
    """SIGINT while the command starts (importing torch, NumPy, the trainer): one line, exit 130, no run left.
    One command at a time: run side by side, the torch one once exited 0 with nothing on stderr (a fresh-clone CI run)."""
    out = tmp_path / "run"
    p = subprocess.run([*PYTHON, "-c", _SIGINT_IN_IMPORT, module, str(out)], capture_output=True, text=True, timeout=300)
    assert p.stdout.split()[0] == "False"  # importing the CLI does not import torch: main() is in charge at once
    assert p.returncode == 130 and p.stderr.strip().count("\n") == 0 and "interrupted" in p.stderr, p.stderr
    assert not out.exists()


def test_ctrl_c_while_the_run_is_set_up_removes_what_it_wrote(tmp_path, monkeypatch, capsys):
    from grokfast_metrics.experiment import trainer as train_mod

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    monkeypatch.setattr(train_mod, "layer_tracker", interrupted)  # after config.json, before the first step
    assert cli.main(["train", *TINY, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err
    assert [f.name for f in out.iterdir()] in ([], [".run.lock"])  # only the (empty) lock file of train/resume stays
    monkeypatch.undo()
    assert cli.main(["train", *TINY, "--out", str(out)]) == 0  # the next try is not blocked


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals to a child process")
def test_ctrl_c_to_the_command_while_it_starts(tmp_path):
    """The real command, interrupted 0.3 s in (mid-import on any machine here): one line, exit 130."""
    p = subprocess.Popen(
        [*PYTHON, "-m", "grokfast_metrics", "train", *TINY, "--out", str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    if p.returncode == 0:
        pytest.skip("the run finished before the signal")
    assert p.returncode == 130 and err.strip().count("\n") == 0, err


def test_summary_of_a_good_run_is_json(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["steps_done"] == 3


def test_sweep_with_an_unreachable_ray_address_fails_naming_it(tmp_path):
    """``--ray-address 127.0.0.1:1`` (nothing listens there): one line naming the address, not a wait of minutes."""
    pytest.importorskip("ray")
    argv = ["sweep", *TINY, "--grid", "lr=0.001", "--engine", "ray", "--ray-address", "127.0.0.1:1", "--out", str(tmp_path / "sweep")]
    try:
        p = subprocess.run([*PYTHON, "-m", "grokfast_metrics", *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("no answer in 120 s")
    assert p.returncode == 2 and "127.0.0.1:1" in p.stderr and p.stderr.strip().count("\n") == 0, p.stderr[-3000:]
