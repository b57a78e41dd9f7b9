"""``grokfast-metrics bench --async-tracking``: training-step time with dense LMN tracking, sync vs async.

The paper's MLP on addition mod 31, one full-batch AdamW step (:func:`.workloads.addition_training`), with
LMN of the first hidden layer's output on ``n_track`` inputs after every step through the tracker machinery
(:class:`grokfast_metrics.tracking.tracker.Tracker`): not tracked, synchronous (L and the eigen step in the training
thread) and asynchronous (L in the training thread, the eigen step on host worker threads). The three modes
alternate in blocks of consecutive steps within each round, so machine drift hits them alike; a block of the
asynchronous mode ends with ``flush()``, so the eigen steps still running are counted, not hidden.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from ..compute import core
from ..experiment.model import representation
from ..foundation import runtime as _runtime
from ..tracking.base import Tracker
from ..tracking.schedule import Schedule
from .workloads import TRACKED_LAYER, TrainingWorkload, addition_training

#: the compared modes, in the order each round runs them
MODES = ("none", "sync", "async")


@dataclass
class AsyncTracking:
    """Seconds per training step of each mode (one value per round) and the eigen step alone, same run."""

    n_track: int
    steps: int
    workers: int
    threads: int
    per_step: dict[str, list[float]] = field(default_factory=dict)
    eigen_s: float = float("nan")

    def median(self, mode: str) -> float:
        return statistics.median(self.per_step[mode])


def _tracker(work: TrainingWorkload, backend: str, n_lambda: int, workers: int) -> Tracker:
    """LMN of the tracked layer at every step: in ``update`` (``workers=0``) or with the eigen step on threads."""

    def connectivity() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            h, tail = representation(work.model, work.x_track, TRACKED_LAYER)
            return {TRACKED_LAYER: core.connectivity(h, tail, n_lambda, backend=backend)}

    def measure() -> dict[str, core.LMNResult]:
        return {k: core.lmn_from_connectivity(L) for k, L in connectivity().items()}

    return Tracker(work.model, Schedule.for_tracker(1), measure, connectivity=connectivity, workers=workers)


def async_tracking(
    device: torch.device,
    n_track: int = 961,
    steps: int = 5,
    rounds: int = 3,
    backend: str = "auto",
    workers: int = 1,
    seed: int = 0,
    n_lambda: int = 21,
) -> AsyncTracking:
    """Time ``rounds`` x ``steps`` training steps of each mode (after one warm-up step each); see the module."""
    work = addition_training(device, n_track, seed)
    trackers = {"none": None, "sync": _tracker(work, backend, n_lambda, 0), "async": _tracker(work, backend, n_lambda, workers)}
    out = AsyncTracking(n_track, steps, workers, torch.get_num_threads(), {m: [] for m in MODES})
    step = 0
    for r in range(rounds + 1):  # round 0 is the warm-up (one step per mode, untimed)
        for mode, tracker in trackers.items():
            start = time.perf_counter()
            for _ in range(steps if r else 1):
                work.step()
                if tracker is not None:
                    tracker.update(step)
                step += 1
            if tracker is not None:
                tracker.flush()
            _runtime.synchronize(device)
            if r:
                out.per_step[mode].append((time.perf_counter() - start) / steps)
    trackers["async"].close()
    L = trackers["sync"].results[TRACKED_LAYER].connectivity
    eig = []
    for _ in range(max(3, rounds)):
        start = time.perf_counter()
        core.lmn_from_connectivity(L)
        _runtime.synchronize(device)
        eig.append(time.perf_counter() - start)
    out.eigen_s = statistics.median(eig)
    return out


def format_async_tracking(res: AsyncTracking) -> str:
    """The figure as a small table: ms/step (median, min-max over rounds) and the overhead over no tracking."""
    base = res.median("none")
    lines = [
        f"training step with LMN of {res.n_track} inputs every step (addition mod 31, full-batch AdamW), "
        f"{len(res.per_step['none'])} rounds x {res.steps} steps per mode, torch threads {res.threads}, "
        f"eigen worker threads {res.workers}",
        "| tracking | ms/step (median) | min-max ms | overhead ratio (/ no tracking) |",
        "|---|---|---|---|",
    ]
    for mode in MODES:
        t = res.per_step[mode]
        lines.append(f"| {mode} | {1e3 * res.median(mode):.2f} | {1e3 * min(t):.2f}-{1e3 * max(t):.2f} | {res.median(mode) / base:.1f} |")
    saved = res.median("sync") - res.median("async")
    lines.append(
        f"sync - async: {1e3 * saved:.2f} ms/step; the eigen step alone "
        f"(lmn_from_connectivity of one L, in the training thread): {1e3 * res.eigen_s:.2f} ms"
    )
    return "\n".join(lines)
