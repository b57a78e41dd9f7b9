"""The worked integrations in ``examples/`` run at tiny size and add exactly three marked lines."""
from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest

from grokfast_metrics.tracker import log_schedule

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "grokfast_transformer": {
        "steps": 12, "p": 5, "dim": 8, "num_layers": 2, "num_heads": 2, "batch_size": 8, "n_probe": 6,
    },
    "omnigrok_mnist_mlp": {"steps": 12, "n_train": 32, "width": 16, "batch_size": 8, "n_probe": 8},
    "sequential_mlp": {"steps": 12, "p": 5, "emb": 4, "width": 8},
}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", sorted(TINY))
def test_example_runs_tiny(name):
    out = _load(name).main(**TINY[name])
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
