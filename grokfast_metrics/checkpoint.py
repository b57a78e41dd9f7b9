"""Checkpoints of a training run and what resuming from one checks (bit-identical resume).

:func:`save_checkpoint` writes ``checkpoint.pt`` into the run directory every ``checkpoint_every`` steps
(the state of every piece of a :class:`~grokfast_metrics.train.Run`); :func:`prepare_resume` reads it
back with the run's configuration and logged rows, and :func:`restore_checkpoint` loads it into a freshly
set-up run. :func:`grokfast_metrics.train.resume` is the entry point.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .collapse import Collapse
from .config import TrainConfig
from .runlog import RunLogError, drop_snapshots_after, read_metrics, torch_bytes, write_atomic

if TYPE_CHECKING:
    from .train import Run

__all__ = ["CHECKPOINT", "load_checkpoint", "prepare_resume", "restore_checkpoint", "save_checkpoint"]

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
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
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
    """
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: nothing to resume (train with --checkpoint-every K to write "
                                "checkpoints)")
    return torch.load(path, weights_only=False, map_location="cpu")


def prepare_resume(run_dir: Path, steps: int | None) -> tuple[TrainConfig, dict, list[dict]]:
    """The configuration, checkpoint and logged rows to resume ``run_dir`` with; the run directory is rolled back.

    The configuration is the run's own; ``steps`` may extend it. Rows and connectivity snapshots after
    the checkpoint are dropped (``summary.json`` too).

    Raises:
        FileNotFoundError: no checkpoint in ``run_dir``.
        RunLogError: ``metrics.jsonl`` is damaged before the checkpoint.
        ValueError: ``steps`` not after the checkpoint.
    """
    state = load_checkpoint(run_dir)
    cfg = TrainConfig(**state["config"])
    if steps is not None:
        if steps <= state["step"]:
            raise ValueError(f"steps must be > {state['step']} (the checkpoint's step) to resume; got {steps}")
        cfg.steps = steps
    cfg.validate()
    rows = read_metrics(run_dir)
    rows = [r for r in rows if r["step"] <= state["step"]]
    if len(rows) != state["rows"]:
        raise RunLogError(f"{run_dir / 'metrics.jsonl'} has {len(rows)} rows up to step {state['step']}, the checkpoint "
                          f"expects {state['rows']}; the run directory was modified")
    drop_snapshots_after(run_dir, state["step"])
    for name in ("summary.json",):
        (run_dir / name).unlink(missing_ok=True)
    return cfg, state, rows


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
