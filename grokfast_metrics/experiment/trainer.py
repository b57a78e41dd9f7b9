"""Full-batch training on the paper's tasks with LMN tracked densely (the project's main job).

:func:`train` runs one job from a :class:`~grokfast_metrics.experiment.config.TrainConfig` and writes, in the run
directory (files of :mod:`grokfast_metrics.experiment.runlog`):

- ``config.json``: the resolved configuration (device, probe, sizes, versions);
- ``metrics.jsonl`` / ``metrics.csv``: one row per logged step (:data:`BASE_COLUMNS` plus
  ``lmn_<layer>`` per tracked layer; LMN columns are empty/null where not computed);
- ``summary.json``: memorization / generalization steps, LMN at the key steps, timings;
- ``curves.png``: train/test accuracy, loss, LMN and L2 norm vs step (paper Fig. 2 style; matplotlib is
  imported only to draw it, after training).

Step ``s`` in the logs is the model after ``s`` optimizer updates (``s = 0``: initialization). A step
runs :func:`forward_backward`, then :func:`measure` (what the :class:`~grokfast_metrics.tracking.schedule.Schedule`
says is due), then the optimizer step, then :func:`write_row`. LMN is tracked through the same
:class:`~grokfast_metrics.tracking.tracker.Tracker` machinery as ``LMNTracker``: under ``torch.no_grad()`` on
detached representations through ``grokfast_metrics.lmn``, which never touches parameters, modes or
RNG; the probe subset is drawn from its own ``torch.Generator``. A run with tracking and one without
give bit-identical losses.

The numerical-collapse detector is :mod:`.collapse`, checkpoints and resume checks are :mod:`.checkpoint`,
timers / progress bar / signals are :mod:`.trainctl`, the run's state and model :mod:`.run`, the checks before
the run directory is touched :mod:`.preflight`.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from ..compute.core import LMNResult, lmn
from ..foundation.dirlock import RUN_LOCK, locked
from ..foundation.tail import parse_tail
from ..tracking.base import Tracker
from ..tracking.schedule import Due, Schedule
from .asyncrows import RowQueue, StepTracker, lmn_columns, track_connectivity
from .checkpoint import prepare_resume, restore_checkpoint, roll_back, save_checkpoint
from .collapse import Collapse, NumericalCollapseWarning
from .complexity import compression_complexity, spectral_entropy_penalty
from .config import TrainConfig
from .grokfast import make_filter
from .measures import (
    COMPLEXITY_BINS,
    COMPLEXITY_RANK_FRACTIONS,
    complexity_column,
    lmn_backend_info,
    run_info,
    weight_columns,
    weight_measures,
)
from .model import GrokMLP, layer_target, representations, segment_of
from .preflight import preflight
from .run import Run, RunResult, build_model, probe_indices
from .runlog import MetricsLog, RunDirError, RunLogError, RunWriteError, collapse_message, prepare_run_dir, read_json, summarize, write_json
from .tasks import make_task
from .trainctl import Timer, _Progress, _Signals
from .transformer import GrokTransformer, track_transformer_lmn

__all__ = ["BASE_COLUMNS", "resume", "track_lmn", "train"]

#: columns always present in the logs; ``lmn_<layer>`` columns follow
BASE_COLUMNS = ("step", "train_loss", "train_acc", "test_loss", "test_acc", "l2", "lmn", "time_s", "train_p1_frac")


# ------------------------------------------------------------------------------------------
# building blocks


def track_lmn(model: GrokMLP, x_probe: torch.Tensor, layers: list[str], n_lambda: int = 21, backend: str = "auto") -> dict[str, LMNResult]:
    """LMN of the probe inputs at each of ``layers`` (no grad, RNG and modes untouched).

    The same computation as :func:`grokfast_metrics.lmn_at` on a plain ``nn.Sequential``: the
    representation at the layer and the model's own modules after it as the tail. For the transformer
    it is :func:`grokfast_metrics.lmn_at` at each layer
    (:func:`~grokfast_metrics.experiment.transformer.track_transformer_lmn`).

    Args:
        model: the network.
        x_probe: ``(N, 2)`` probe operands on the model's device.
        layers: layer names from :data:`~grokfast_metrics.experiment.model.LAYERS`.

    Returns:
        ``{layer: LMNResult}`` (``.lmn``, ``.connectivity``, ...), in the order of ``layers``.
    """
    if isinstance(model, GrokTransformer):
        return track_transformer_lmn(model, x_probe, layers, n_lambda, backend)()
    reps = representations(model, x_probe, layers)
    return {layer: lmn(h, tail, n_lambda, backend) for layer, (h, tail) in reps.items()}


def layer_tracker(model: GrokMLP, x_probe: torch.Tensor, cfg: TrainConfig, schedule: Schedule) -> Tracker:
    """The trainer's tracker: :func:`track_lmn` at ``cfg.lmn_layers`` on ``schedule`` (``cfg.lmn_async``: eigen step on a thread)."""
    layers, args = list(cfg.lmn_layers), (cfg.n_lambda, cfg.lmn_backend)
    if isinstance(model, GrokTransformer):  # through lmn_at (cut checked here, once); lmn_async is refused by validate
        return Tracker(model, schedule, track_transformer_lmn(model, x_probe, layers, *args))
    if not cfg.lmn_async:
        return Tracker(model, schedule, lambda: track_lmn(model, x_probe, layers, *args))
    return StepTracker(
        model,
        schedule,
        lambda: track_lmn(model, x_probe, layers, *args),
        connectivity=lambda: track_connectivity(model, x_probe, layers, *args),
        workers=1,
    )


# ------------------------------------------------------------------------------------------
# checks before the run directory is touched


# ------------------------------------------------------------------------------------------
# one run

#: exit codes of a run that stopped early (``RunResult.exit_code``; 0: completed)
EXIT_SIGINT, EXIT_SIGTERM, EXIT_NONFINITE = 130, 143, 3
#: exit code of a run that stopped because a run file could not be written (disk full, directory made read-only)
EXIT_WRITE = 1


class _Stop(Exception):
    """The loop stops early: ``reason`` in words and the run's exit code."""

    def __init__(self, reason: str, exit_code: int):
        super().__init__(reason)
        self.reason, self.exit_code = reason, exit_code


def setup(cfg: TrainConfig, run_dir: Path, resume_rows: list[dict] | None = None, info: dict | None = None) -> Run:
    """Task, model, optimizer, filter, schedule, tracker and log of a resolved ``cfg``; writes ``config.json``.

    ``resume_rows``: the rows already logged by the run being resumed (the log is rewritten with them, then appended to).
    ``info``: entries that replace or join ``config.json``'s own (a resume keeps the original ``argv``, adds ``resumes``).
    """
    device = torch.device(cfg.device)
    task = make_task(cfg.task, cfg.train_fraction, cfg.seed, cfg.p)
    probe_idx = probe_indices(task, cfg.probe, cfg.probe_seed)
    model = build_model(task, cfg, device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    grad_filter = make_filter(cfg.grokfast, ema_alpha=cfg.ema_alpha, ema_lamb=cfg.ema_lamb, ma_window=cfg.ma_window, ma_lamb=cfg.ma_lamb)
    x, y = task.x.to(device), task.y.to(device)
    tr, te = task.train_idx.to(device), task.test_idx.to(device)
    data = {"x_tr": x[tr], "y_tr": y[tr], "x_te": x[te], "y_te": y[te], "x_probe": x[probe_idx.to(device)]}
    schedule = Schedule.from_config(cfg)
    backend = lmn_backend_info(model, data["x_probe"], cfg)
    write_json(run_dir / "config.json", {**run_info(cfg, task, model, len(probe_idx), schedule), "lmn_backend": backend, **(info or {})})
    for layer in cfg.lmn_layers if cfg.model == "mlp" else ():  # the transformer's readings are not affine
        if parse_tail(segment_of(model, layer)).is_affine:
            warnings.warn(
                f"LMN at {layer}: the map from there to {layer_target(layer)} is affine, so its LMN is 1 at "
                "every step (see docs/lmn.md, 'Which layer')",
                stacklevel=2,
            )
    norm_cols, rank_cols = weight_columns(model)
    columns = [
        *BASE_COLUMNS,
        *(f"lmn_{layer}" for layer in cfg.lmn_layers),
        *norm_cols,
        *rank_cols,
        *map(complexity_column, cfg.complexity_eps),
    ]
    run = Run(
        cfg=cfg,
        run_dir=run_dir,
        model=model,
        opt=opt,
        grad_filter=grad_filter,
        data=data,
        schedule=schedule,
        tracker=layer_tracker(model, data["x_probe"], cfg, schedule),
        log=MetricsLog(run_dir, columns, rows=resume_rows),
        timer=Timer(device),
        collapse=Collapse(cfg.collapse_fraction, cfg.collapse_spike),
        backend=backend,
    )
    run.held = RowQueue(run.tracker, run_dir, cfg.lmn_layers, lambda row, metrics, now: write_row(run, row, metrics, now))
    return run


def forward_backward(run: Run, step: int, final: bool) -> tuple[dict, tuple[str, ...]]:
    """Loss, gradients (not at the ``final`` step) and the step's metrics; returns them and the phase events.

    The metrics include ``train_p1_frac``: the fraction of training samples whose correct-class probability
    is exactly 1 in the training dtype (their loss is exactly 0), the numerical-collapse signal.
    """
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
        p_correct = torch.softmax(logits.detach(), 1).gather(1, d["y_tr"][:, None])
        stats = torch.stack(
            [
                loss.detach(),
                (logits.argmax(1) == d["y_tr"]).sum().to(loss.dtype),
                F.cross_entropy(te_logits, d["y_te"]),
                (te_logits.argmax(1) == d["y_te"]).sum().to(loss.dtype),
                torch.stack(torch._foreach_norm([p.detach() for p in model.parameters()])).norm(),
                (p_correct == 1).sum().to(loss.dtype),
            ]
        ).tolist()
    return step_metrics(run, step, stats)


def step_metrics(run: Run, step: int, stats: list[float]) -> tuple[dict, tuple[str, ...]]:
    """A step's metrics and phase events from its ``stats``: train loss, train correct, test loss, test correct,
    parameter norm and the number of training samples at probability exactly 1 (phases and collapse observed)."""
    tr_loss, tr_correct, te_loss, te_correct, l2, n_p1 = stats
    n_tr, n_te = len(run.data["y_tr"]), len(run.data["y_te"])
    tr_acc, te_acc = tr_correct / n_tr, te_correct / n_te
    events = run.phases.observe(step, tr_correct == n_tr, te_correct == n_te, te_acc)
    metrics = {
        "step": step,
        "train_loss": tr_loss,
        "train_acc": tr_acc,
        "test_loss": te_loss,
        "test_acc": te_acc,
        "l2": l2,
        "train_p1_frac": n_p1 / n_tr,
    }
    if run.collapse is not None and run.collapse.observe(step, tr_loss, n_p1 / n_tr):
        events = (*events, "collapse")
    return metrics, events


def measure(run: Run, step: int, due: Due, events: tuple[str, ...], metrics: dict) -> dict | None:
    """What is due at ``step`` besides training: LMN (and its snapshot), complexity, norms and ranks.

    The norms and ranks go into ``metrics``; returns the LMN and complexity columns, or ``None`` when
    no row is due.
    """
    cfg, row = run.cfg, {}
    with run.timer("lmn", sync=due.lmn):
        if due.lmn:
            run.tracker.update(step, events=events)
            if not run.tracker.asynchronous:  # else the LMN columns are added when they land (RowQueue)
                row = lmn_columns(run.run_dir, cfg.lmn_layers, step, run.tracker.results, due.snapshot)
    with run.timer("complexity"):  # also the norms and ranks
        if due.complexity:
            x_tr, y_tr = run.data["x_tr"], run.data["y_tr"]
            cc = compression_complexity(
                run.model, lambda m: float(F.cross_entropy(m(x_tr), y_tr)), cfg.complexity_eps, COMPLEXITY_BINS, COMPLEXITY_RANK_FRACTIONS
            )
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


def nonfinite_stop(metrics: dict) -> _Stop | None:
    """The stop of a step whose train loss or parameter norm is not finite (``None``: both finite)."""
    if math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["l2"]):
        return None
    what = "train loss" if not math.isfinite(metrics["train_loss"]) else "parameter norm"
    value = metrics["train_loss"] if what == "train loss" else metrics["l2"]
    return _Stop(f"non-finite {what} ({value}) at step {metrics['step']}: training diverged", EXIT_NONFINITE)


def _loop(run: Run, progress: _Progress | None, signals: _Signals) -> _Stop | None:
    """Steps ``first_step`` to ``cfg.steps``; returns why it stopped early (``None``: it completed).

    A signal (SIGINT / SIGTERM) or a non-finite train loss stops it; the last computed metrics are
    then logged. A checkpoint is written every ``cfg.checkpoint_every`` steps (never at the last step).
    """
    cfg = run.cfg
    pending: dict | None = None  # metrics of the latest step (written at a stop unless its row is)
    try:
        for step in range(run.first_step, cfg.steps + 1):
            final = step == cfg.steps
            with run.timer("train"):
                metrics, events = forward_backward(run, step, final)
            pending = metrics
            if (diverged := nonfinite_stop(metrics)) is not None:
                raise diverged
            due = run.schedule.due(step, events)
            row = measure(run, step, due, events, metrics)
            with run.timer("train"):
                if not final:
                    optimizer_step(run)
            now = time.perf_counter()
            with run.timer("log"):
                run.held.put(step, row, metrics, now, due.lmn and run.tracker.asynchronous, due.snapshot)
                if progress is not None:
                    history = run.tracker.ready()  # never waits
                    progress.update(metrics, history[-1]["lmn"] if history else None, final, now)
                if cfg.checkpoint_every and not final and step > 0 and step % cfg.checkpoint_every == 0:
                    with signals.deferred():
                        run.held.flush()
                        save_checkpoint(run, step)
                        run.checkpoint_step = step
        run.held.flush()
    except RunWriteError as e:  # nothing more can be written: the log keeps its whole rows, the checkpoint its last
        kept = f"the rows up to step {run.log.rows[-1]['step']} are intact" if run.log.rows else "no row was written"
        if run.checkpoint_step is not None:
            kept += f", and the checkpoint of step {run.checkpoint_step}"
        return _Stop(f"{e} (errno {e.errno}); {kept}", EXIT_WRITE)
    except (KeyboardInterrupt, _Stop) as e:
        try:
            with signals.deferred():
                run.held.flush()
                if pending is not None and (not run.log.rows or run.log.rows[-1]["step"] < pending["step"]):
                    write_row(run, {}, pending, time.perf_counter())
        except RunWriteError as w:
            return _Stop(f"{e}; then {w} (errno {w.errno})", EXIT_WRITE)
        if isinstance(e, _Stop):
            return e
        name = signals.received[0] if signals.received else "SIGINT"
        return _Stop(f"interrupted ({name})", EXIT_SIGTERM if name == "SIGTERM" else EXIT_SIGINT)
    return None


# ------------------------------------------------------------------------------------------
# the entry points


def train(cfg: TrainConfig, run_dir: str | Path, *, progress: bool = True, plot: bool = True, overwrite: bool = False) -> RunResult:
    """Run one training job and write its logs, summary and plot into ``run_dir``.

    SIGINT (Ctrl-C) and SIGTERM stop training early; a non-finite train loss stops it too. The logs,
    summary and plot of the steps that ran are still written, and ``RunResult.exit_code`` /
    ``stop_reason`` say why it stopped.

    Args:
        cfg: configuration (validated here; device defaults resolved).
        run_dir: output directory (created if missing). One that already holds a run is refused
            unless ``overwrite`` (its run files are then removed first); use :func:`resume` to continue one.
        progress: show a tqdm progress bar on stderr.
        plot: write ``curves.png``.
        overwrite: replace the run in ``run_dir``.

    Returns:
        :class:`RunResult`.

    Raises:
        ValueError: invalid configuration or probe, or an LMN backend that cannot run here (checked before
            ``run_dir`` is touched).
        MemoryError: the run cannot fit in the device's memory (estimated before anything is allocated).
        RunDirError: ``run_dir`` holds a run and ``overwrite`` is False, or another process is writing to it
            (``train`` and ``resume`` hold ``run_dir/.run.lock`` while they run).
        OSError: ``run_dir`` cannot be created or written.
    """
    cfg.validate()
    cfg = cfg.resolved()
    preflight(cfg)
    run_dir = Path(run_dir)
    with locked(run_dir, RUN_LOCK, "run", RunDirError):
        prepare_run_dir(run_dir, overwrite=overwrite)
        return _execute(cfg, run_dir, None, progress, plot)


def resume(run_dir: str | Path, *, steps: int | None = None, progress: bool = True, plot: bool = True) -> RunResult:
    """Continue the run in ``run_dir`` from its checkpoint; the result is bit-identical to an uninterrupted run.

    The configuration is the run's own (``config.json``); ``steps`` may extend it. Everything is checked before
    the run directory changes (the checkpoint is restored into a scratch copy of the run first); then rows and
    connectivity snapshots after the checkpoint are dropped and recomputed. ``config.json`` keeps the original
    command line (``argv``) and lists each resume's (``resumes``: argv, checkpoint step, steps).

    Raises:
        FileNotFoundError: no checkpoint in ``run_dir``.
        RunLogError: a damaged checkpoint (truncated, empty, not a checkpoint), one that does not fit the run (a
            tensor of another shape), or ``metrics.jsonl`` damaged before the checkpoint; nothing was changed.
        RunDirError: another process is writing to ``run_dir``.
        ValueError: ``steps`` not after the checkpoint.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a directory: nothing to resume")
    with locked(run_dir, RUN_LOCK, "run", RunDirError):
        cfg, state, rows = prepare_resume(run_dir, steps)
        try:
            before = read_json(run_dir / "config.json")
        except (OSError, RunLogError):
            before = {}
        info = {
            "argv": before.get("argv"),
            "resumes": [*(before.get("resumes") or []), {"argv": sys.argv, "from_step": state["step"], "steps": cfg.steps}],
        }
        return _execute(cfg, run_dir, (state, rows, info), progress, plot)


def _execute(cfg: TrainConfig, run_dir: Path, resumed: tuple[dict, list[dict], dict] | None, progress: bool, plot: bool) -> RunResult:
    run_dir.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        with _Signals() as signals:
            try:
                run = setup(cfg, run_dir, resume_rows=None if resumed is None else resumed[1], info=None if resumed is None else resumed[2])
            except KeyboardInterrupt:
                if resumed is None:  # interrupted while starting: the run files written so far go
                    _discard_start(run_dir)
                raise
            if resumed is not None:
                restore_checkpoint(run, resumed[0])
                roll_back(run_dir, resumed[0]["step"])
            bar = _Progress(cfg, run.first_step) if progress else None
            try:
                stop = _loop(run, bar, signals)
            finally:
                if bar is not None:
                    bar.close()
                try:
                    run.log.close()
                except RunWriteError as e:
                    stop = _Stop(f"{e} (errno {e.errno})", EXIT_WRITE)
                run.tracker.close()  # asynchronous: stops the eigen thread (nothing is pending by now)
            return _finish(run, stop, plot, signals)
    finally:
        torch.set_num_threads(threads_before)


def _discard_start(run_dir: Path) -> None:
    """Remove what a run interrupted during :func:`setup` wrote (no step ran: nothing of it is worth keeping), so the
    next try in the same directory is not refused."""
    import gc

    gc.collect()  # the half-built run's open log files
    prepare_run_dir(run_dir, overwrite=True)


def _finish(run: Run, stop: _Stop | None, plot: bool, signals: _Signals) -> RunResult:
    """Write ``summary.json`` (signals deferred), then ``curves.png`` (a signal there skips the plot); warn on collapse."""
    timings = {k: round(v, 3) for k, v in run.timer.totals.items()}
    timings["total"] = round(time.perf_counter() - run.start, 3)
    rows = run.log.rows
    steps_done = rows[-1]["step"] if rows else 0
    interrupted = stop is not None and stop.exit_code in (EXIT_SIGINT, EXIT_SIGTERM)
    with signals.deferred():
        summary = summarize(
            rows,
            run.cfg,
            asdict(run.phases),
            run.collapse.summary() if run.collapse else None,
            timings,
            interrupted,
            steps_done,
            None if stop is None else stop.reason,
        )
        summary["lmn_backend"] = run.backend
        try:
            write_json(run.run_dir / "summary.json", summary)
        except RunWriteError as e:  # atomic: no summary.json rather than a partial one
            stop = _Stop(stop.reason if stop is not None and stop.exit_code == EXIT_WRITE else f"{e} (errno {e.errno})", EXIT_WRITE)
            plot = False
    if plot and rows:
        try:
            from .curves import plot_curves  # matplotlib, only to draw

            plot_curves(rows, run.run_dir / "curves.png", summary=summary, layers=list(run.cfg.lmn_layers))
        except KeyboardInterrupt:
            print("interrupted again: curves.png not written (summary.json is)", file=sys.stderr)
        except OSError as e:
            stop = _Stop(f"curves.png not written: {RunWriteError.of(run.run_dir / 'curves.png', e)}", EXIT_WRITE)
    collapse = summary.get("numerical_collapse")
    if collapse is not None:
        warnings.warn(collapse_message(summary), NumericalCollapseWarning, stacklevel=4)  # at train()'s caller
    return RunResult(run.run_dir, summary, rows, interrupted, 0 if stop is None else stop.exit_code, None if stop is None else stop.reason)
