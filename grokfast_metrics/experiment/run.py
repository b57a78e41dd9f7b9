"""One training job's state: the model it builds (:func:`build_model`), its probe set, the phases it reached and
everything it holds while it runs (:class:`Run`), and what :func:`~grokfast_metrics.experiment.trainer.train`
returns (:class:`RunResult`). Checkpoints (:mod:`.checkpoint`) save and restore a :class:`Run`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..tracking.base import Tracker
from ..tracking.schedule import Schedule
from .asyncrows import RowQueue
from .collapse import Collapse
from .config import TrainConfig
from .model import GrokMLP, scale_init
from .runlog import MetricsLog
from .tasks import Task
from .trainctl import Timer
from .transformer import GrokTransformer

#: test accuracy of ``generalization_99`` (the paper's generalization step is the first at test accuracy 100%)
GENERALIZED_ACC = 0.99


def probe_indices(task: Task, probe: str | int, seed: int) -> torch.Tensor:
    """Sorted indices of the probe inputs; a size-n subset of all inputs is drawn with its own generator.

    Raises:
        ValueError: subset size larger than the task.
    """
    if probe == "all":
        return torch.arange(task.n_inputs)
    if probe == "train":
        return task.train_idx.clone()
    if probe == "test":
        return task.test_idx.clone()
    n = int(probe)
    if n > task.n_inputs:
        raise ValueError(f"probe subset of {n} is larger than the task ({task.n_inputs} inputs); use --probe all")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(task.n_inputs, generator=gen)[:n].sort().values


def build_model(task: Task, cfg: TrainConfig, device: torch.device) -> GrokMLP | GrokTransformer:
    """The network of ``cfg.model`` (the paper's MLP or the one-layer transformer) for ``task``, seeded by
    ``cfg.seed`` (global RNG state is restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.model == "transformer":
            model = GrokTransformer(task.n_tokens, task.n_classes, cfg.d_model, cfg.d_mlp, cfg.n_heads)
        else:
            model = GrokMLP(task.n_tokens, task.n_classes, cfg.embed_dim, cfg.hidden, cfg.embedding)
    scale_init(model, cfg.init_scale)
    return model.to(device=device, dtype=TORCH_DTYPES[cfg.dtype])


@dataclass
class Phases:
    """First steps with train accuracy 100% (memorization), test accuracy 100% (generalization, the paper's
    definition) and test accuracy >= 99% (``generalization_99``)."""

    memorization: int | None = None
    generalization: int | None = None
    generalization_99: int | None = None

    def observe(self, step: int, all_train_correct: bool, all_test_correct: bool, test_acc: float) -> tuple[str, ...]:
        """Record ``step``'s accuracies; returns the phase events first reached at this step."""
        events = []
        if self.memorization is None and all_train_correct:
            self.memorization = step
            events.append("memorization")
        if self.generalization is None and all_test_correct:
            self.generalization = step
            events.append("generalization")
        if self.generalization_99 is None and test_acc >= GENERALIZED_ACC:
            self.generalization_99 = step
            events.append("generalization_99")
        return tuple(events)


@dataclass
class Run:
    """Everything one training job holds while it runs (built by :func:`setup`)."""

    cfg: TrainConfig
    run_dir: Path
    model: GrokMLP
    opt: torch.optim.Optimizer
    grad_filter: Callable[[torch.nn.Module], None] | None
    data: dict[str, torch.Tensor]
    schedule: Schedule
    tracker: Tracker
    log: MetricsLog
    timer: Timer
    held: RowQueue = None  # rows waiting for their LMN (cfg.lmn_async; else written at once); set by setup()
    phases: Phases = field(default_factory=Phases)
    collapse: Collapse | None = None
    start: float = field(default_factory=time.perf_counter)
    first_step: int = 0
    backend: dict | None = None  # lmn_backend_info: written to config.json and summary.json
    checkpoint_step: int | None = None  # the step of the last checkpoint written by this process


@dataclass
class RunResult:
    """What :func:`train` returns. ``summary`` is also written to ``summary.json``.

    ``exit_code``: 0 completed, 130 SIGINT, 143 SIGTERM, 3 non-finite loss; ``stop_reason`` says why in words.
    """

    run_dir: Path
    summary: dict
    rows: list[dict]
    interrupted: bool
    exit_code: int = 0
    stop_reason: str | None = None


#: dtype names of ``--dtype``
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
