"""Checkpoints of a training run and what resuming from one checks (bit-identical resume).

:func:`save_checkpoint` writes ``checkpoint.pt`` into the run directory every ``checkpoint_every`` steps
(the state of every piece of a :class:`~grokfast_metrics.experiment.trainer.Run`); :func:`prepare_resume` reads it
back with the run's configuration and logged rows and checks all of it (a damaged file, a state that does
not fit the run) before anything in the run directory changes; :func:`roll_back` then drops what follows
the checkpoint and :func:`restore_checkpoint` loads it into a freshly set-up run.
:func:`grokfast_metrics.experiment.trainer.resume` is the entry point.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .collapse import Collapse
from .config import TrainConfig
from .run import Phases, Run, build_model
from .runlog import RunLogError, drop_snapshots_after, read_metrics, torch_bytes, write_atomic

__all__ = ["CHECKPOINT", "check_restorable", "load_checkpoint", "prepare_resume", "restore_checkpoint", "roll_back", "save_checkpoint"]

#: the checkpoint file in the run directory (the latest one; replaced atomically)
CHECKPOINT = "checkpoint.pt"


def save_checkpoint(run: Run, step: int) -> Path:
    """Write ``checkpoint.pt``: everything needed to continue after ``step`` bit-identically.

    Model, optimizer, Grokfast filter, RNG states, tracker history, phases, collapse detector, timers
    and the number of logged rows (the log is flushed first; rows after ``step`` are dropped on resume).
    A step whose row is not due has none; the resumed run does not write one either.

    Raises:
        RunWriteError: the checkpoint could not be written (the previous one, if any, is left whole).
    """
    run.log.flush()
    state = {
        "step": step,
        "config": asdict(run.cfg),
        "model": run.model.state_dict(),
        "optimizer": run.opt.state_dict(),
        "grad_filter": None if run.grad_filter is None else run.grad_filter.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "tracker": run.tracker.state_dict(),
        "phases": asdict(run.phases),
        "collapse": asdict(run.collapse) if run.collapse is not None else None,
        "timer": dict(run.timer.totals),
        "elapsed_s": time.perf_counter() - run.start,
        "rows": len(run.log.rows),
    }
    path = run.run_dir / CHECKPOINT
    # serialized in memory, then temp file + fsync + os.replace: a full disk leaves the previous checkpoint whole
    return write_atomic(path, torch_bytes(state), tmp=path.with_suffix(".tmp"))


def load_checkpoint(run_dir: str | Path) -> dict:
    """The checkpoint of ``run_dir``.

    Raises:
        FileNotFoundError: no checkpoint (the run was not started with ``checkpoint_every``).
        RunLogError: the file is not a readable checkpoint (truncated, empty, not torch's format, keys missing).
    """
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: nothing to resume (train with --checkpoint-every K to write checkpoints)")
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as e:  # truncated, empty, random bytes: torch and pickle raise many kinds
        raise RunLogError(
            f"{path} is damaged ({path.stat().st_size} bytes; {_one_line(e)}): it cannot be resumed; the run directory is left as it is"
        ) from None
    missing = [k for k in _KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise RunLogError(
            f"{path} is not a checkpoint of this trainer (missing {', '.join(missing)}): it cannot be "
            "resumed; the run directory is left as it is"
        )
    return state


#: what :func:`save_checkpoint` writes
_KEYS = ("step", "config", "model", "optimizer", "grad_filter", "rng", "tracker", "phases", "collapse", "timer", "elapsed_s", "rows")


def _one_line(e: BaseException, limit: int = 160) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[:limit] + " ..."


def check_restorable(cfg: TrainConfig, state: dict, path: Path) -> None:
    """Restore ``state`` into a scratch copy of the run (model, optimizer, filter, RNG, tracker, phases, collapse,
    timers) on the CPU, so that nothing is touched when it cannot be restored.

    Raises:
        RunLogError: a piece does not fit this run's configuration (e.g. a model tensor of the wrong shape).
    """
    from ..tracking.base import Tracker
    from ..tracking.schedule import Schedule
    from .grokfast import make_filter
    from .tasks import make_task

    try:
        if not isinstance(state["step"], int) or not isinstance(state["rows"], int) or state["step"] < 0:
            raise ValueError(f"step {state['step']!r} / rows {state['rows']!r} are not counts")
        model = build_model(make_task(cfg.task, cfg.train_fraction, cfg.seed, cfg.p), cfg, torch.device("cpu"))
        model.load_state_dict(state["model"])
        shapes = {name: p.shape for name, p in model.named_parameters()}
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
        opt.load_state_dict(state["optimizer"])
        for p in model.parameters():
            for key, value in opt.state.get(p, {}).items():
                if key != "step" and isinstance(value, torch.Tensor) and value.shape != p.shape:
                    raise ValueError(f"optimizer state {key} has shape {tuple(value.shape)}, its parameter {tuple(p.shape)}")
        grad_filter = make_filter(
            cfg.grokfast, ema_alpha=cfg.ema_alpha, ema_lamb=cfg.ema_lamb, ma_window=cfg.ma_window, ma_lamb=cfg.ma_lamb
        )
        if grad_filter is not None and state["grad_filter"] is not None:
            grad_filter.load_state_dict(state["grad_filter"], device=torch.device("cpu"))
            for name, value in grad_filter.state.items():
                for t in value if not isinstance(value, torch.Tensor) else [value]:
                    if name not in shapes or t.shape != shapes[name]:
                        raise ValueError(f"Grokfast filter state {name!r} does not match the model's parameters")
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(state["rng"]["torch"])
        Tracker(model, Schedule.for_tracker(1), dict).load_state_dict(state["tracker"])
        dataclasses.replace(Phases(), **state["phases"])
        if state["collapse"] is not None:
            Collapse(**state["collapse"])
        if not all(isinstance(v, (int, float)) for v in dict(state["timer"]).values()) or not isinstance(state["elapsed_s"], (int, float)):
            raise ValueError("timers are not numbers")
    except Exception as e:
        raise RunLogError(f"{path} cannot be restored into this run ({_one_line(e)}); the run directory is left as it is") from None


def prepare_resume(run_dir: Path, steps: int | None) -> tuple[TrainConfig, dict, list[dict]]:
    """The configuration, checkpoint and logged rows to resume ``run_dir`` with, all checked; nothing is changed.

    The configuration is the run's own; ``steps`` may extend it. The checkpoint is restored into a scratch
    copy of the run first (:func:`check_restorable`); :func:`roll_back` then drops what follows it.

    Raises:
        FileNotFoundError: no checkpoint in ``run_dir``.
        RunLogError: a damaged checkpoint, one that does not fit the run, or ``metrics.jsonl`` damaged before the
            checkpoint.
        ValueError: ``steps`` not after the checkpoint.
    """
    state = load_checkpoint(run_dir)
    path = Path(run_dir) / CHECKPOINT
    try:
        cfg = TrainConfig(**state["config"])
    except TypeError as e:
        raise RunLogError(f"{path} holds no configuration of this trainer ({_one_line(e)})") from None
    if steps is not None:
        if not isinstance(state["step"], int) or steps <= state["step"]:
            raise ValueError(f"steps must be > {state['step']} (the checkpoint's step) to resume; got {steps}")
        cfg.steps = steps
    cfg.validate()
    check_restorable(cfg, state, path)
    rows = read_metrics(run_dir)
    rows = [r for r in rows if r["step"] <= state["step"]]
    if len(rows) != state["rows"]:
        raise RunLogError(
            f"{run_dir / 'metrics.jsonl'} has {len(rows)} rows up to step {state['step']}, the checkpoint "
            f"expects {state['rows']}; the run directory was modified"
        )
    return cfg, state, rows


def roll_back(run_dir: Path, step: int) -> None:
    """Drop what follows the checkpoint at ``step``: later connectivity snapshots and ``summary.json``."""
    drop_snapshots_after(run_dir, step)
    (Path(run_dir) / "summary.json").unlink(missing_ok=True)


def restore_checkpoint(run: Run, state: dict) -> None:
    """Load a checkpoint's state into a freshly set-up ``run``."""
    run.model.load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    if run.grad_filter is not None and state["grad_filter"] is not None:
        run.grad_filter.load_state_dict(state["grad_filter"], device=torch.device(run.cfg.device))
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    run.tracker.load_state_dict(state["tracker"])
    run.phases = dataclasses.replace(run.phases, **state["phases"])  # a Phases (train.py) with the saved steps
    if state["collapse"] is not None:
        run.collapse = Collapse(**state["collapse"])
    run.timer.totals.update(state["timer"])
    run.start = time.perf_counter() - state["elapsed_s"]
    run.first_step = state["step"] + 1
