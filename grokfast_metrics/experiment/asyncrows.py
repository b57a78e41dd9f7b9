"""The trainer's log rows when LMN is tracked asynchronously (``TrainConfig.lmn_async``).

The trainer's :class:`~grokfast_metrics.tracking.tracker.Tracker` then computes ``L`` in the training thread and
leaves the eigen step and entropy to a host worker thread. A row whose LMN has not landed yet waits in a
:class:`RowQueue`, and every row after it waits behind it, so ``metrics.jsonl`` stays in step order; a
row is written (with its connectivity snapshot, if one is due) as soon as everything before it is
complete. :meth:`RowQueue.flush` waits for all of them: the trainer calls it before a checkpoint, when it
stops and at the end, so the run directory holds the same rows and snapshots as a synchronous run.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..compute.core import LMNResult, connectivity
from ..tracking.base import Tracker
from .model import GrokMLP, representations
from .runlog import save_connectivity

__all__ = ["RowQueue", "StepTracker", "lmn_columns", "track_connectivity"]


def track_connectivity(
    model: GrokMLP, x_probe: torch.Tensor, layers: list[str], n_lambda: int = 21, backend: str = "auto"
) -> dict[str, torch.Tensor]:
    """``L`` of the probe inputs at each of ``layers``: what :func:`grokfast_metrics.experiment.trainer.track_lmn` computes
    before the eigen step (the same representations, tails and kernel, so the LMN values are bit-identical)."""
    reps = representations(model, x_probe, layers)
    return {layer: connectivity(h, tail, n_lambda, backend) for layer, (h, tail) in reps.items()}


def lmn_columns(run_dir: Path, layers: list[str], step: int, results: dict[str, LMNResult] | None, snapshot: bool) -> dict:
    """The LMN columns of ``step``'s row from its ``results`` (NaN: ``None``, a diverged model); saves the
    first layer's connectivity snapshot when ``snapshot`` is due and there is one."""
    row = {f"lmn_{layer}": math.nan if results is None else results[layer].lmn for layer in layers}
    row["lmn"] = row[f"lmn_{layers[0]}"]
    if snapshot and results is not None:
        save_connectivity(run_dir, step, layers[0], results[layers[0]].connectivity, row["lmn"])
    return row


class StepTracker(Tracker):
    """An asynchronous :class:`Tracker` that also keeps every landed computation's results by step
    (:attr:`landed`, ``None`` for a NaN step) until the row queue takes them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.landed: dict[int, dict[str, LMNResult] | None] = {}

    def _rows(self, step: int, results: dict[str, LMNResult] | None) -> list[dict]:
        self.landed[step] = results
        return super()._rows(step, results)


@dataclass
class _Held:
    """A row waiting to be written: its measured columns, metrics, time and whether LMN (a snapshot) is due."""

    step: int
    row: dict
    metrics: dict
    now: float
    lmn: bool
    snapshot: bool


class RowQueue:
    """Rows in step order, each written once its LMN (if due) has landed in ``tracker``. Rows without pending
    LMN (all of them with a synchronous tracker) are written at once when nothing is held before them.

    Args:
        tracker: the trainer's tracker (a :class:`StepTracker` when rows are held for LMN).
        run_dir: where snapshots go.
        layers: the tracked layers (the first is the ``lmn`` column and the snapshot's).
        write: ``(row, metrics, now) -> None`` writes one row (the trainer's ``write_row``).
    """

    def __init__(self, tracker: Tracker, run_dir: Path, layers: list[str], write: Callable[[dict, dict, float], None]):
        self.tracker, self.run_dir, self.layers, self._write = tracker, run_dir, list(layers), write
        self._held: deque[_Held] = deque()

    def put(self, step: int, row: dict | None, metrics: dict, now: float, lmn: bool, snapshot: bool) -> None:
        """Queue ``step``'s row (``None``: no row is due; ``lmn``: its LMN columns are still to come), then write
        the rows that are complete."""
        if row is not None:
            self._held.append(_Held(step, row, metrics, now, lmn, snapshot))
        self.drain()

    def drain(self, block: bool = False) -> None:
        """Write the complete rows at the head of the queue (``block``: wait for every LMN; all are written)."""
        if block:
            self.tracker.flush()
        else:
            self.tracker.ready()
        while self._held and (not self._held[0].lmn or self._held[0].step in self.tracker.landed):
            held = self._held.popleft()
            if held.lmn:  # the LMN columns first, as in a synchronous row
                results = self.tracker.landed.pop(held.step)
                held.row = {**lmn_columns(self.run_dir, self.layers, held.step, results, held.snapshot), **held.row}
            self._write(held.row, held.metrics, held.now)
        if block and self._held:
            raise RuntimeError(f"step {self._held[0].step}: its LMN never landed in the tracker")

    def flush(self) -> None:
        """Wait for every pending LMN and write every held row."""
        self.drain(block=True)

    def __len__(self) -> int:
        return len(self._held)
