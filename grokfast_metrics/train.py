"""Full-batch training on the paper's tasks with LMN tracked densely (the project's main job).

:func:`train` runs one job from a :class:`~grokfast_metrics.config.TrainConfig` and writes, in the run
directory (files of :mod:`grokfast_metrics.runlog`):

- ``config.json``: the resolved configuration (device, probe, sizes, versions);
- ``metrics.jsonl`` / ``metrics.csv``: one row per logged step (:data:`BASE_COLUMNS` plus
  ``lmn_<layer>`` per tracked layer; LMN columns are empty/null where not computed);
- ``summary.json``: memorization / generalization steps, LMN at the key steps, timings;
- ``curves.png``: train/test accuracy, loss, LMN and L2 norm vs step (paper Fig. 2 style; matplotlib is
  imported only to draw it, after training).

Step ``s`` in the logs is the model after ``s`` optimizer updates (``s = 0``: initialization). A step
runs :func:`forward_backward`, then :func:`measure` (what the :class:`~grokfast_metrics.schedule.Schedule`
says is due), then the optimizer step, then :func:`write_row`. LMN is tracked through the same
:class:`~grokfast_metrics.tracker.Tracker` machinery as ``LMNTracker``: under ``torch.no_grad()`` on
detached representations through ``grokfast_metrics.lmn``, which never touches parameters, modes or
RNG; the probe subset is drawn from its own ``torch.Generator``. A run with tracking and one without
give bit-identical losses.
"""
from __future__ import annotations

import math
import platform
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ._runtime import synchronize
from ._tail import parse_tail
from .complexity import compression_complexity, spectral_entropies, spectral_entropy_penalty, weight_matrices, weight_norms
from .config import SNAPSHOT_DEFAULT, TrainConfig, parse_probe
from .core import LMNResult, lmn
from .grokfast import make_filter
from .model import GrokMLP, representations, scale_init
from .runlog import MetricsLog, save_connectivity, summarize, write_json
from .schedule import Due, Schedule
from .tasks import Task, make_task
from .tracker import Tracker

__all__ = ["BASE_COLUMNS", "SNAPSHOT_DEFAULT", "RunResult", "TrainConfig", "parse_probe", "probe_indices", "track_lmn",
           "train"]

#: columns always present in the logs; ``lmn_<layer>`` columns follow
BASE_COLUMNS = ("step", "train_loss", "train_acc", "test_loss", "test_acc", "l2", "lmn", "time_s")
#: test accuracy that counts as generalized
GENERALIZED_ACC = 0.99
#: the trainer's compression-complexity grid (7 bin sizes x 4 rank fractions, ~1.6 s per evaluation on the
#: paper's model on one CPU core); ``grokfast_metrics.complexity`` has the finer default grid
COMPLEXITY_BINS = tuple(2.0**-k for k in range(12, -1, -2))
COMPLEXITY_RANK_FRACTIONS = (1.0, 0.9, 0.7, 0.5)


# ------------------------------------------------------------------------------------------
# building blocks


def weight_columns(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Column names of the per-layer norms (``l2_<module>``, ``l2_last``) and effective ranks (``erank_<linear>``)."""
    norms = [f"l2_{name}" for name in weight_norms(model)["layers"]] + ["l2_last"]
    ranks = [f"erank_{name}" for name in weight_matrices(model)]
    return norms, ranks


def weight_measures(model: torch.nn.Module, ranks: bool) -> dict[str, float]:
    """Per-layer L2 norms, the last layer's norm and (if ``ranks``) the effective rank of each Linear."""
    wn = weight_norms(model)
    row = {f"l2_{name}": v for name, v in wn["layers"].items()}
    row["l2_last"] = wn["last"]
    if ranks:
        row.update({f"erank_{name}": v["effective_rank"] for name, v in spectral_entropies(model).items()})
    return row


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


def build_model(task: Task, cfg: TrainConfig, device: torch.device) -> GrokMLP:
    """The paper's MLP for ``task``, seeded by ``cfg.seed`` (global RNG state is restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = GrokMLP(task.n_tokens, task.n_classes, cfg.embed_dim, cfg.hidden, cfg.embedding)
    scale_init(model, cfg.init_scale)
    return model.to(device)


def track_lmn(model: GrokMLP, x_probe: torch.Tensor, layers: list[str], n_lambda: int = 21,
              backend: str = "auto") -> dict[str, LMNResult]:
    """LMN of the probe inputs at each of ``layers`` (no grad, RNG and modes untouched).

    The same computation as :func:`grokfast_metrics.lmn_at` on a plain ``nn.Sequential``: the
    representation at the layer and the model's own modules after it as the tail.

    Args:
        model: the network.
        x_probe: ``(N, 2)`` probe operands on the model's device.
        layers: layer names from :data:`~grokfast_metrics.model.LAYERS`.

    Returns:
        ``{layer: LMNResult}`` (``.lmn``, ``.connectivity``, ...), in the order of ``layers``.
    """
    reps = representations(model, x_probe, layers)
    return {layer: lmn(h, tail, n_lambda, backend) for layer, (h, tail) in reps.items()}


def layer_tracker(model: GrokMLP, x_probe: torch.Tensor, cfg: TrainConfig, schedule: Schedule) -> Tracker:
    """The trainer's :class:`~grokfast_metrics.tracker.Tracker`: :func:`track_lmn` at ``cfg.lmn_layers`` on ``schedule``."""
    layers = list(cfg.lmn_layers)
    return Tracker(model, schedule, lambda: track_lmn(model, x_probe, layers, cfg.n_lambda, cfg.lmn_backend))


class Timer:
    """Seconds spent per section of the loop, accumulated: ``with timer("lmn"): ...``.

    Args:
        device: the device whose queued work a ``sync=True`` section waits for.
        sections: section names (``totals`` starts at 0 for each).
    """

    def __init__(self, device: torch.device, sections: tuple[str, ...] = ("train", "lmn", "complexity", "log")):
        self.device = device
        self.totals = dict.fromkeys(sections, 0.0)

    @contextmanager
    def __call__(self, section: str, sync: bool = False):
        """Add the time the block takes to ``totals[section]`` (after a device sync if ``sync``)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                synchronize(self.device)
            self.totals[section] += time.perf_counter() - t0


@dataclass
class Phases:
    """The first step with train accuracy 100% (memorization) and with test accuracy >= 99% (generalization)."""

    memorization: int | None = None
    generalization: int | None = None

    def observe(self, step: int, all_train_correct: bool, test_acc: float) -> tuple[str, ...]:
        """Record ``step``'s accuracies; returns the phase events first reached at this step."""
        events = []
        if self.memorization is None and all_train_correct:
            self.memorization = step
            events.append("memorization")
        if self.generalization is None and test_acc >= GENERALIZED_ACC:
            self.generalization = step
            events.append("generalization")
        return tuple(events)


# ------------------------------------------------------------------------------------------
# one run


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
    phases: Phases = field(default_factory=Phases)
    start: float = field(default_factory=time.perf_counter)


@dataclass
class RunResult:
    """What :func:`train` returns. ``summary`` is also written to ``summary.json``."""

    run_dir: Path
    summary: dict
    rows: list[dict]
    interrupted: bool


def setup(cfg: TrainConfig, run_dir: Path) -> Run:
    """Task, model, optimizer, filter, schedule, tracker and log of a resolved ``cfg``; writes ``config.json``."""
    device = torch.device(cfg.device)
    task = make_task(cfg.task, cfg.train_fraction, cfg.seed)
    probe_idx = probe_indices(task, cfg.probe, cfg.probe_seed)
    model = build_model(task, cfg, device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    grad_filter = make_filter(cfg.grokfast, ema_alpha=cfg.ema_alpha, ema_lamb=cfg.ema_lamb, ma_window=cfg.ma_window, ma_lamb=cfg.ma_lamb)
    x, y = task.x.to(device), task.y.to(device)
    tr, te = task.train_idx.to(device), task.test_idx.to(device)
    data = {"x_tr": x[tr], "y_tr": y[tr], "x_te": x[te], "y_te": y[te], "x_probe": x[probe_idx.to(device)]}
    schedule = Schedule.from_config(cfg)
    write_json(run_dir / "config.json", _run_info(cfg, task, model, len(probe_idx), schedule))
    for layer in cfg.lmn_layers:
        if parse_tail(model.tail(layer)).is_affine:
            warnings.warn(f"LMN at {layer}: the tail from there to the logits is affine, so its LMN is 1 at every step "
                          "(see docs/lmn.md, 'Which layer')", stacklevel=2)
    norm_cols, rank_cols = weight_columns(model)
    columns = [*BASE_COLUMNS, *(f"lmn_{layer}" for layer in cfg.lmn_layers), *norm_cols, *rank_cols,
               *map(complexity_column, cfg.complexity_eps)]
    return Run(cfg=cfg, run_dir=run_dir, model=model, opt=opt, grad_filter=grad_filter, data=data, schedule=schedule,
               tracker=layer_tracker(model, data["x_probe"], cfg, schedule), log=MetricsLog(run_dir, columns),
               timer=Timer(device))


def _run_info(cfg: TrainConfig, task: Task, model: GrokMLP, n_probe: int, schedule: Schedule) -> dict:
    """The contents of ``config.json``."""
    device = torch.device(cfg.device)
    return {
        "config": asdict(cfg),
        "n_inputs": task.n_inputs, "n_train": len(task.train_idx), "n_test": len(task.test_idx), "n_classes": task.n_classes,
        "n_probe": n_probe, "lmn_early_steps": schedule.early_lmn_steps(), "n_params": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(), "argv": sys.argv,
    }


def complexity_column(eps: float) -> str:
    """Log column of the compression complexity at loss tolerance ``eps``."""
    return f"complexity_bits_eps{eps:g}"


def forward_backward(run: Run, step: int, final: bool) -> tuple[dict, tuple[str, ...]]:
    """Loss, gradients (not at the ``final`` step) and the step's metrics; returns them and the phase events."""
    cfg, model, d = run.cfg, run.model, run.data
    model.train()
    logits = model(d["x_tr"])
    loss = F.cross_entropy(logits, d["y_tr"])
    if not final:
        run.opt.zero_grad(set_to_none=True)
        if cfg.spectral_entropy_weight > 0:
            (loss + cfg.spectral_entropy_weight * spectral_entropy_penalty(model)).backward()
        else:
            loss.backward()
    with torch.no_grad():
        te_logits = model(d["x_te"])
        stats = torch.stack([
            loss.detach(),
            (logits.argmax(1) == d["y_tr"]).sum().to(loss.dtype),
            F.cross_entropy(te_logits, d["y_te"]),
            (te_logits.argmax(1) == d["y_te"]).sum().to(loss.dtype),
            torch.stack(torch._foreach_norm([p.detach() for p in model.parameters()])).norm(),
        ]).tolist()
    tr_loss, tr_correct, te_loss, te_correct, l2 = stats
    n_tr, n_te = len(d["y_tr"]), len(d["y_te"])
    tr_acc, te_acc = tr_correct / n_tr, te_correct / n_te
    events = run.phases.observe(step, tr_correct == n_tr, te_acc)
    metrics = {"step": step, "train_loss": tr_loss, "train_acc": tr_acc, "test_loss": te_loss, "test_acc": te_acc, "l2": l2}
    return metrics, events


def measure(run: Run, step: int, due: Due, events: tuple[str, ...], metrics: dict) -> dict | None:
    """What is due at ``step`` besides training: LMN (and its snapshot), complexity, norms and ranks.

    The norms and ranks go into ``metrics``; returns the LMN and complexity columns, or ``None`` when
    no row is due.
    """
    cfg, row = run.cfg, {}
    with run.timer("lmn", sync=due.lmn):
        if due.lmn:
            run.tracker.update(step, events)
            results = run.tracker.results
            row = {f"lmn_{layer}": math.nan if results is None else results[layer].lmn for layer in cfg.lmn_layers}
            row["lmn"] = row[f"lmn_{cfg.lmn_layers[0]}"]
            if due.snapshot and results is not None:
                save_connectivity(run.run_dir, step, cfg.lmn_layers[0], results[cfg.lmn_layers[0]].connectivity, row["lmn"])
    with run.timer("complexity"):  # also the norms and ranks
        if due.complexity:
            x_tr, y_tr = run.data["x_tr"], run.data["y_tr"]
            cc = compression_complexity(run.model, lambda m: float(F.cross_entropy(m(x_tr), y_tr)), cfg.complexity_eps,
                                        COMPLEXITY_BINS, COMPLEXITY_RANK_FRACTIONS)
            row.update({complexity_column(e): b for e, b in cc.bits.items()})
        if due.row:  # norms / effective ranks of the same weights as the rest of the row
            metrics.update(weight_measures(run.model, ranks=due.ranks))
    return row if due.row else None


def optimizer_step(run: Run) -> None:
    """Apply the Grokfast filter (if any) to the gradients, then the optimizer step."""
    if run.grad_filter is not None:
        run.grad_filter(run.model)
    run.opt.step()


def write_row(run: Run, row: dict, metrics: dict, now: float) -> None:
    """Write the step's row: the measured columns, the metrics and the elapsed time ``now - start``."""
    run.log.write({**row, **metrics, "time_s": round(now - run.start, 4)})


class _Progress:
    """tqdm bar on stderr with a loss / accuracy / LMN postfix refreshed at most every 0.5 s."""

    def __init__(self, cfg: TrainConfig):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=cfg.steps, desc=f"{cfg.task}", unit="step", dynamic_ncols=True, mininterval=0.5)
        self.last_postfix = 0.0

    def update(self, metrics: dict, lmn_value: float | None, final: bool, now: float) -> None:
        """Advance one step (not past the last) and refresh the postfix if due."""
        if not final:
            self.bar.update(1)
        if now - self.last_postfix > 0.5 or final:
            self.last_postfix = now
            m, lm = metrics, "-" if lmn_value is None else f"{lmn_value:.2f}"
            self.bar.set_postfix_str(f"loss {m['train_loss']:.3g}/{m['test_loss']:.3g} acc {m['train_acc']:.3f}/"
                                     f"{m['test_acc']:.3f} LMN {lm}", refresh=False)

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()


def _loop(run: Run, progress: _Progress | None) -> bool:
    """Steps 0 to ``cfg.steps``; returns whether Ctrl-C stopped it (the last computed metrics are then logged)."""
    pending: dict | None = None  # metrics of the latest step, until written
    try:
        for step in range(run.cfg.steps + 1):
            final = step == run.cfg.steps
            with run.timer("train"):
                metrics, events = forward_backward(run, step, final)
            pending = metrics
            due = run.schedule.due(step, events)
            row = measure(run, step, due, events, metrics)
            with run.timer("train"):
                if not final:
                    optimizer_step(run)
            now = time.perf_counter()
            with run.timer("log"):
                if row is not None:
                    write_row(run, row, metrics, now)
                    pending = None
                if progress is not None:
                    history = run.tracker.history
                    progress.update(metrics, history[-1]["lmn"] if history else None, final, now)
    except KeyboardInterrupt:
        if pending is not None and (not run.log.rows or run.log.rows[-1]["step"] < pending["step"]):
            write_row(run, {}, pending, time.perf_counter())
        return True
    return False


def train(cfg: TrainConfig, run_dir: str | Path, *, progress: bool = True, plot: bool = True) -> RunResult:
    """Run one training job and write its logs, summary and plot into ``run_dir``.

    Ctrl-C (``KeyboardInterrupt``) stops training early; the logs, summary and plot of the steps
    that ran are still written and ``RunResult.interrupted`` is True.

    Args:
        cfg: configuration (validated here; device defaults resolved).
        run_dir: output directory (created if missing; existing logs in it are overwritten).
        progress: show a tqdm progress bar on stderr.
        plot: write ``curves.png``.

    Returns:
        :class:`RunResult`.

    Raises:
        ValueError: invalid configuration or probe.
        OSError: ``run_dir`` cannot be created or written.
    """
    cfg.validate()
    cfg = cfg.resolved()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        run = setup(cfg, run_dir)
        bar = _Progress(cfg) if progress else None
        try:
            interrupted = _loop(run, bar)
        finally:
            if bar is not None:
                bar.close()
            run.log.close()
        return _finish(run, interrupted, plot)
    finally:
        torch.set_num_threads(threads_before)


def _finish(run: Run, interrupted: bool, plot: bool) -> RunResult:
    """Write ``summary.json`` (and ``curves.png``) from the logged rows."""
    timings = {k: round(v, 3) for k, v in run.timer.totals.items()}
    timings["total"] = round(time.perf_counter() - run.start, 3)
    rows = run.log.rows
    steps_done = rows[-1]["step"] if rows else 0
    summary = summarize(rows, run.cfg, run.phases.memorization, run.phases.generalization, timings, interrupted, steps_done)
    write_json(run.run_dir / "summary.json", summary)
    if plot and rows:
        from .figures import plot_curves

        plot_curves(rows, run.run_dir / "curves.png", summary=summary, layers=list(run.cfg.lmn_layers))
    return RunResult(run.run_dir, summary, rows, interrupted)

