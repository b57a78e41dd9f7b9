"""docs/training.md, "Run directories, stopping, checkpoints and resume": a resume checks everything before it touches the run
directory; options given with --resume are compared with the run's recorded config (not with the defaults); config.json
keeps the original command line and each resume's; one writer per run directory (filelock)."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
from filelock import FileLock
from helpers import TINY_MODEL

from grokfast_metrics.cli import main as cli
from grokfast_metrics.experiment import trainer as train_mod
from grokfast_metrics.experiment.runlog import read_json

TINY = [*TINY_MODEL, "--probe", "8", "--complexity", "off", "--lmn-every", "10", "--log-every", "5", "--no-progress", "--no-plot"]


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A 30-step run with checkpoints at steps 10 and 20 and a snapshot at step 25 (after the checkpoint), lr 0.002."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    argv = [
        "train",
        *TINY,
        "--steps",
        "30",
        "--lr",
        "0.002",
        "--checkpoint-every",
        "10",
        "--save-connectivity",
        "0,25,final",
        "--out",
        str(out),
    ]
    saved = sys.argv
    sys.argv = ["grokfast-metrics", *argv]
    try:
        assert cli.main(argv) == 0
    finally:
        sys.argv = saved
    return out


def _copy(src, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def _contents(run_dir) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path):
    path.write_bytes(b"")


def _random(path):
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes())


def _empty_dict(path):
    torch.save({}, path)


def _wrong_shape(path):
    state = torch.load(path, weights_only=False)
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros(3, 3)
    torch.save(state, path)


@pytest.mark.parametrize(
    "damage", [_truncate, _empty, _random, _empty_dict, _wrong_shape], ids=["truncated", "empty", "random", "empty-dict", "wrong-shape"]
)
def test_damaged_checkpoint_is_refused_with_one_line_and_the_run_left_intact(checkpointed, tmp_path, capsys, damage):
    run = _copy(checkpointed, tmp_path)
    damage(run / "checkpoint.pt")
    before = _contents(run)
    assert "summary.json" in before and "connectivity/step_0000025_hidden1_post.pt" in before
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--no-progress", "--no-plot"]) == 2
    line = _one_error_line(capsys)
    assert "checkpoint.pt" in line and "cannot resume" in line
    assert _contents(run) == before  # summary.json, every row and every snapshot kept, byte for byte


def test_resume_compares_given_options_with_the_recorded_config_not_the_defaults(checkpointed, tmp_path, capsys, monkeypatch):
    run = _copy(checkpointed, tmp_path)
    before = _contents(run)
    capsys.readouterr()
    # --lr 0.001 is the default; the run's lr is 0.002: refused
    assert cli.main(["train", "--resume", str(run), "--lr", "0.001", "--no-progress", "--no-plot"]) == 2
    assert "--lr 0.001 differs from the resumed run's config (0.002)" in _one_error_line(capsys)
    # options equal to the run's own values are fine, as is --device auto (the run resolved it to cpu)
    seen = {}

    def fake_resume(run_dir, *, steps=None, progress=True, plot=True):
        seen["steps"] = steps
        raise ValueError("stop here")

    monkeypatch.setattr(train_mod, "resume", fake_resume)
    assert (
        cli.main(
            [
                "train",
                "--resume",
                str(run),
                "--steps",
                "20000",
                "--lr",
                "0.002",
                "--hidden",
                "8",
                "--device",
                "auto",
                "--probe",
                "8",
                "--no-progress",
                "--no-plot",
            ]
        )
        == 2
    )
    assert seen == {"steps": 20000}  # 20000 equals the default: still the new length
    assert cli.main(["train", "--resume", str(run), "--no-progress", "--no-plot"]) == 2
    assert seen == {"steps": None}  # not given: the run's own
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--overwrite", "--no-progress", "--no-plot"]) == 2
    assert "--overwrite" in _one_error_line(capsys)
    assert _contents(run) == before


def test_resume_extends_and_config_json_keeps_both_command_lines(checkpointed, tmp_path, monkeypatch):
    run = _copy(checkpointed, tmp_path)
    first = read_json(run / "config.json")["argv"]
    assert "--lr" in first
    argv = ["train", "--resume", str(run), "--steps", "40", "--no-progress", "--no-plot"]
    monkeypatch.setattr(sys, "argv", ["grokfast-metrics", *argv])
    assert cli.main(argv) == 0
    info = read_json(run / "config.json")
    assert info["argv"] == first
    assert info["resumes"] == [{"argv": ["grokfast-metrics", *argv], "from_step": 20, "steps": 40}]
    assert info["config"]["steps"] == 40 and info["config"]["lr"] == 0.002
    assert read_json(run / "summary.json")["steps_done"] == 40


def test_a_run_directory_has_one_writer(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with FileLock(str(out / ".run.lock")):  # another process (or thread) is training into it
        assert cli.main(["train", *TINY, "--steps", "5", "--out", str(out)]) == 2
        assert "another run is writing to" in _one_error_line(capsys)
        assert not (out / "config.json").exists()
    assert cli.main(["train", *TINY, "--steps", "5", "--out", str(out)]) == 0


def test_resume_of_a_missing_directory_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        train_mod.resume(tmp_path / "nothing", progress=False, plot=False)
    assert not (tmp_path / "nothing").exists()
