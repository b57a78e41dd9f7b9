"""The worked integrations in ``examples/`` run at tiny size and add exactly three marked lines."""

from __future__ import annotations

import math
import re

import pytest
from helpers import EXAMPLES, load_example

from grokfast_metrics.tracking.schedule import log_schedule

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "grokfast_transformer": {
        "steps": 12,
        "p": 5,
        "dim": 8,
        "num_layers": 2,
        "num_heads": 2,
        "batch_size": 8,
        "n_probe": 6,
    },
    "omnigrok_mnist_mlp": {"steps": 12, "n_train": 32, "width": 16, "batch_size": 8, "n_probe": 8},
    "sequential_mlp": {"steps": 12, "p": 5, "emb": 4, "width": 8},
    "transformer_lens_grokking": {"steps": 12, "p": 7, "d_model": 16, "n_heads": 2, "d_mlp": 32, "n_probe": 6},
    "tensorboard_logging": {"steps": 12, "p": 5, "emb": 4, "width": 8},
}
#: the optional package an example needs (installed by the ``test`` extra; skipped with the reason otherwise)
NEEDS = {"transformer_lens_grokking": "transformer_lens", "tensorboard_logging": "tensorboard"}


@pytest.mark.parametrize("name", sorted(TINY))
def test_example_runs_tiny(name, tmp_path):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name], reason=f"examples/{name}.py needs {NEEDS[name]} (the test extra installs it)")
    kwargs = {**TINY[name], **({"logdir": str(tmp_path)} if name == "tensorboard_logging" else {})}
    out = load_example(name).main(**kwargs)
    steps = TINY[name]["steps"]
    assert out["step"] == log_schedule(steps - 1)
    assert len(out["loss"]) == steps and all(math.isfinite(v) for v in out["loss"])
    assert len(out["lmn"]) == len(out["entropy_bits"]) == len(out["step"])
    for lmn, s in zip(out["lmn"], out["entropy_bits"]):
        assert math.isfinite(lmn) and lmn >= 1.0 and abs(lmn - 2.0**s) <= 1e-12 * lmn


@pytest.mark.parametrize("name", sorted(TINY))
def test_example_adds_three_lines(name):
    src = (EXAMPLES / f"{name}.py").read_text().splitlines()
    lines = [ln for ln in src if re.search(r"# \[LMN\] \d/3", ln)]
    assert [re.search(r"\d/3", ln).group() for ln in lines] == ["1/3", "2/3", "3/3"]
    assert "import grokfast_metrics as gm" in lines[0]
    assert "gm.LMNTracker(" in lines[1] and "tracker.update(step)" in lines[2]


def test_tensorboard_example_logs_what_the_tracker_computed(tmp_path):
    pytest.importorskip("tensorboard", reason="examples/tensorboard_logging.py needs tensorboard (the test extra installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = load_example("tensorboard_logging").main(logdir=str(tmp_path), **TINY["tensorboard_logging"])
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    lmn = events.Scalars("lmn/hidden1")
    assert [e.step for e in lmn] == out["step"]
    assert all(abs(e.value - v) <= 1e-6 * v for e, v in zip(lmn, out["lmn"]))  # float32 in the event file
    assert len(events.Scalars("train/loss")) == TINY["tensorboard_logging"]["steps"]


def test_transformer_lens_resid_post_warns_affine():
    pytest.importorskip("transformer_lens", reason="needs transformer-lens<4 (the test extra installs it)")
    import torch

    import grokfast_metrics as gm
    from grokfast_metrics.dropin.plan import AffineTailWarning

    model = load_example("transformer_lens_grokking").make_model(p=7, d_model=16, n_heads=2, d_mlp=32)
    tokens = torch.stack([torch.arange(6), torch.arange(6).flip(0), torch.full((6,), 7)], dim=1)
    with pytest.warns(AffineTailWarning, match="L is 1 to rounding"):
        gm.lmn_at(model, tokens, at="blocks.0.hook_resid_post", output=lambda out: out[:, -1], n_lambda=5)
