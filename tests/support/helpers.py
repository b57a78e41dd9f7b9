"""Small builders shared by the test files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

from grokfast_metrics.foundation.tail import ACTIVATIONS

#: the repository's root
ROOT = Path(__file__).resolve().parents[2]

#: how the tests start a Python subprocess: never with the working directory (the repository root) on
#: ``sys.path``, where the top-level ``kernels/`` folder would shadow installed packages of that name
#: (Hugging Face's ``kernels``, which ``transformers`` 5 imports). ``-P`` exists from Python 3.11 on.
PYTHON = [sys.executable, "-P"] if sys.version_info >= (3, 11) else [sys.executable]

#: the repository's examples/ folder (standalone scripts the tests import and run)
EXAMPLES = ROOT / "examples"

#: ``train`` options of a tiny addition model on the CPU, which the tiny runs of the CLI, resume and sweep tests share
TINY_MODEL = ["--task", "add", "--device", "cpu", "--hidden", "8", "--embed-dim", "4"]
#: the smallest ``bench`` run through every stage (two N, one tail, every baseline): seconds
TINY_BENCH = [
    *("--n", "4", "6", "--hidden", "5", "--depth", "1", "--out", "2", "--n-lambda", "5", "--repeats", "1"),
    *("--n-ref", "4", "--n-naive", "6", "--roof-size", "32", "--train-n", "8", "--no-progress"),
]


def load_example(name: str):
    """Import ``examples/<name>.py`` as a fresh module (not registered in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


#: activation name -> module factory, one per entry of the library's activation table
ACTS = {
    name: (lambda: nn.GELU(approximate="tanh"))
    if name == "gelu_tanh"
    else (lambda: nn.LeakyReLU(0.1))
    if name == "leaky_relu"
    else kind.module
    for name, kind in ACTIVATIONS.items()
}


def mlp_tail(
    widths: list[int], act: str = "silu", bias: bool = True, final_act: str | None = None, dtype: torch.dtype = torch.float32, seed: int = 0
) -> nn.Sequential:
    """``Linear(w0,w1) -> act -> Linear(w1,w2) -> act ... -> Linear`` with seeded init."""
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        if k:
            layers.append(ACTS[act]())
        lin = nn.Linear(a, b, bias=bias)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g) / a**0.5 * 1.5)
            if bias:
                lin.bias.copy_(torch.randn(b, generator=g) * 0.5)
        layers.append(lin)
    if final_act is not None:
        layers.append(ACTS[final_act]())
    return nn.Sequential(*layers).to(dtype)


class Wrapped(nn.Module):
    """Hides a module behind a custom forward so it takes the generic path."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def abs_tail() -> nn.Sequential:
    """f(x) = |x| for 1-D x: a path from -a to +a is a symmetric V, r2 = 0."""
    t = nn.Sequential(nn.Linear(1, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        t[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        t[2].weight.copy_(torch.tensor([[1.0, 1.0]]))
    return t


def rows_without_time(run_dir: Path) -> list[dict]:
    """The rows of a run directory's ``metrics.jsonl``, every column but ``time_s``."""
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def interrupted_and_resumed(cfg: dict, tmp_path: Path, monkeypatch, cut_at: int, **cut_cfg):
    """Bit-identical resume, the shape every model's test shares: train ``cfg`` through in ``tmp_path/full``; train it
    again in ``tmp_path/cut`` with a Ctrl-C during step ``cut_at``'s optimizer update (``cut_cfg``: options of that run
    only), resume ``cut``, and check that its ``metrics.jsonl`` is the full run's (every column but ``time_s``).
    Returns ``(full, cut, resumed)`` for the model's own checks."""
    from grokfast_metrics.experiment import trainer as train_mod

    full = train_mod.train(train_mod.TrainConfig(**cfg), tmp_path / "full", progress=False, plot=False)
    calls = {"n": 0}
    real = train_mod.optimizer_step

    def interrupt(run):
        calls["n"] += 1
        if calls["n"] == cut_at + 1:  # the update of step cut_at (steps count from 0)
            raise KeyboardInterrupt
        return real(run)

    monkeypatch.setattr(train_mod, "optimizer_step", interrupt)
    cut = train_mod.train(train_mod.TrainConfig(**cfg, **cut_cfg), tmp_path / "cut", progress=False, plot=False)
    monkeypatch.setattr(train_mod, "optimizer_step", real)
    assert cut.interrupted and cut.rows[-1]["step"] == cut_at
    resumed = train_mod.resume(tmp_path / "cut", progress=False, plot=False)
    assert not resumed.interrupted and resumed.exit_code == 0
    assert rows_without_time(tmp_path / "cut") == rows_without_time(tmp_path / "full")
    return full, cut, resumed


def sweep_tasks_in_this_process(monkeypatch) -> None:
    """The sweeps of this test run their tasks in the test's process: ``sweep.engines.run_local`` without its pool of
    spawned workers (each a fresh interpreter importing torch: seconds). For tests of what a sweep's command records,
    not of the pool (the 4-run sweep of tests/sweep/test_sweep.py and the signal and kill tests of
    tests/sweep/test_sweep_faults.py keep the pool)."""
    from grokfast_metrics.sweep import engines

    def run_here(tasks, workers, plot, on_done):
        for task in tasks:
            engines._report(task, lambda task=task: engines.run_task(*engines._args(task, plot)), on_done)

    monkeypatch.setattr(engines, "run_local", run_here)
