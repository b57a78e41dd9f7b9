"""``Tracker``: LMN on a schedule with a history and a NaN policy, the machinery every tracker shares, with a
pluggable measurement. :class:`~grokfast_metrics.tracking.tracker.LMNTracker` measures with ``lmn_at``; the trainer
(:mod:`grokfast_metrics.experiment.trainer`) tracks the layers of its MLP through the same class."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Collection
from typing import cast

import torch
from torch import nn

from ..compute.core import LMNResult
from ..foundation.errors import NonFiniteOutputError
from ..foundation.runtime import keyword_only
from .async_eigen import AsyncEigen, EigenStepError
from .schedule import Schedule

__all__ = ["Tracker", "Value", "diverged_parameters"]

#: what ``update`` returns when it computes: LMN as a float, or ``{layer: float}`` for a tracker of several layers
Value = float | dict[str, float]


def diverged_parameters(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters of ``model`` that hold NaN or Inf (one device sync)."""
    params = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    if not params:
        return []
    flags = torch.stack([torch.isfinite(p).all().to(params[0][1].device) for _, p in params]).tolist()
    return [n for (n, _), ok in zip(params, flags) if not ok]


class Tracker:
    """LMN on a :class:`~grokfast_metrics.tracking.schedule.Schedule`, with a history: the machinery every tracker shares.

    What is measured is pluggable: ``measure()`` returns ``{name: LMNResult}`` for the model's current
    weights, the first entry being the one recorded in :attr:`history`. :class:`LMNTracker` measures
    with :func:`grokfast_metrics.lmn_at`; the trainer measures several layers of its MLP at once.

    Asynchronous mode (``workers >= 1``): ``connectivity()`` (``{name: L}``, the expensive kernel) runs in
    the caller's thread (on a GPU: in the training stream), and the eigen step and entropy of those
    matrices run on ``workers`` host threads (:class:`~grokfast_metrics.tracking.async_eigen.AsyncEigen`); the rows
    land in :attr:`history` in step order. Reading :attr:`history`, :meth:`compute` or :meth:`state_dict`
    waits for what is pending; :meth:`ready` does not; :meth:`flush` waits; :meth:`close` (or leaving a
    ``with`` block) flushes and stops the threads. A failed eigen step raises
    :class:`~grokfast_metrics.tracking.async_eigen.EigenStepError` (naming its step) at the next of these calls.

    Args:
        model: the model being trained (its parameters are checked for NaN/Inf before each measurement).
        schedule: when LMN is due (``schedule.due(step, events).lmn``).
        measure: ``() -> {name: LMNResult}``.
        connectivity: ``() -> {name: L}`` (the same names; required when ``workers >= 1``).
        workers: host threads for the eigen step; 0 (default) computes it in ``update``.

    Attributes:
        history: list of ``{"step": int, "lmn": float, "entropy_bits": float}``, one per computation
            (NaN values, with a warning, when the model's parameters or outputs are not finite: a
            diverged run keeps training instead of crashing in the metric).
        results: every result of the latest computation (``None`` before the first one or after NaN;
            asynchronous: of the latest one landed).
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Schedule,
        measure: Callable[[], dict[str, LMNResult]],
        *,
        connectivity: Callable[[], dict[str, torch.Tensor]] | None = None,
        workers: int = 0,
    ):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an int >= 0 (0: synchronous); got {workers!r}")
        if workers and connectivity is None:
            raise ValueError("an asynchronous tracker (workers >= 1) needs connectivity=")
        self.model = model
        self.schedule = schedule
        self._measure = measure
        self._connectivity = connectivity
        self._workers = workers
        self._eigen: AsyncEigen | None = None  # started at the first asynchronous computation
        self._calls = 0
        self._history: list[dict] = []
        self.results: dict[str, LMNResult] | None = None

    @property
    def asynchronous(self) -> bool:
        """Whether the eigen step runs on host worker threads (``workers >= 1``)."""
        return self._workers > 0

    @property
    def history(self) -> list[dict]:
        """The rows of every computation, in step order (asynchronous: waits for the pending ones)."""
        self._drain(block=True)
        return self._history

    @history.setter
    def history(self, rows: list[dict]) -> None:
        self._history = rows

    def should_compute(self, step: int, events: Collection[str] = ()) -> bool:
        """Whether the schedule computes LMN at ``step`` (where ``events`` happen, e.g. ``"memorization"``)."""
        return self.schedule.due(int(step), events).lmn

    @keyword_only("update(step, events=(), force=False)")
    def update(self, step: int | None = None, *, events: Collection[str] = (), force: bool = False) -> Value | None:
        """Compute LMN if the schedule says so at ``step`` (default: the number of earlier ``update`` calls).

        Args:
            step: the training step.
            events: what happens at ``step`` (e.g. ``"memorization"``), for a schedule with event triggers.
            force: compute now, whatever the schedule.

        Returns:
            the new LMN as a float when computed (NaN when the parameters diverged), else ``None``
            (asynchronous: ``None``; the value lands in :attr:`history`).
        """
        if step is None:
            step = self._calls
        self._calls += 1
        step = int(step)
        if not force and not self.should_compute(step, events):
            return None
        return self._measure_and_record(step)

    def _measure_and_record(self, step: int) -> float | None:
        """Measure now and append the history rows of ``step`` (NaN with a warning for a diverged model);
        asynchronous: compute L and submit it."""
        bad = diverged_parameters(self.model)
        if bad:  # a diverged run: record NaN rather than crash the training loop
            return self._record_nan(step, f"parameters {bad[:3]} have NaN/Inf")
        try:
            if self.asynchronous:
                assert self._connectivity is not None  # checked in __init__
                self._submit(step, self._connectivity())
                return None
            self.results = self._measure()
        except NonFiniteOutputError as e:  # finite weights, but the logits overflow: diverged all the same
            return self._record_nan(step, str(e))
        self._history.extend(self._rows(step, self.results))
        return float(next(iter(self.results.values())).lmn)

    def _submit(self, step: int, mats: dict[str, torch.Tensor]) -> None:
        if self._eigen is None:
            self._eigen = AsyncEigen(self._workers)
        self._eigen.submit(step, mats)

    def _drain(self, block: bool) -> None:
        """Move the finished eigen steps (every pending one with ``block``) into the history, in step order."""
        while self._eigen is not None and self._eigen.pending():
            try:
                got = self._eigen.wait() if block else self._eigen.ready()
            except EigenStepError as e:
                raise EigenStepError(f"{type(self).__name__}: step {e.key}: {e}", e.key) from e.__cause__
            for key, results in got:  # the keys and results this tracker submitted: steps and {name: LMNResult}
                self.results = cast("dict[str, LMNResult]", results)
                self._history.extend(self._rows(cast(int, key), self.results))
            if not block:
                return

    def ready(self) -> list[dict]:
        """The history landed so far, without waiting (synchronous: the history)."""
        self._drain(block=False)
        return self._history

    def pending(self) -> int:
        """How many computations have not landed in the history yet (0 when synchronous)."""
        return 0 if self._eigen is None else self._eigen.pending()

    def flush(self) -> None:
        """Wait for every pending eigen step (their rows land in the history). Raises as :attr:`history`."""
        self._drain(block=True)

    def close(self) -> None:
        """:meth:`flush`, then stop the worker threads (a later asynchronous computation starts new ones)."""
        try:
            self.flush()
        finally:
            if self._eigen is not None:
                self._eigen.close()
                self._eigen = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _discard_pending(self) -> None:
        """Drop every pending computation (for reset and load_state_dict: the history is replaced)."""
        if self._eigen is not None:
            self._eigen.discard()
            self._eigen = None

    def __getstate__(self) -> dict:
        """Copies and pickles carry the landed history, not the worker threads."""
        self._drain(block=True)
        return {**self.__dict__, "_eigen": None}

    def _rows(self, step: int, results: dict[str, LMNResult] | None) -> list[dict]:
        """History rows of one computation: the first result's (NaN when ``results`` is None)."""
        if results is None:
            return [{"step": step, "lmn": math.nan, "entropy_bits": math.nan}]
        first = next(iter(results.values()))
        return [{"step": step, "lmn": float(first.lmn), "entropy_bits": float(first.entropy_bits)}]

    def _record_nan(self, step: int, why: str) -> float:
        warnings.warn(f"{type(self).__name__}: step {step}: {why}; recording LMN = NaN", stacklevel=4)
        self._drain(block=True)  # the pending rows come first
        self.results = None
        self._history.extend(self._rows(step, None))
        return math.nan

    def compute(self) -> float:
        """The latest LMN as a plain float (asynchronous: waits for the pending computations).

        Raises:
            RuntimeError: nothing computed yet (call ``update`` first).
        """
        if not self.history:
            raise RuntimeError(f"{type(self).__name__}.compute() called before any LMN was computed; call update(step) first")
        return self.history[-1]["lmn"]

    def reset(self) -> None:
        """Forget the history (and pending computations) and the call counter (a cut check done is not repeated)."""
        self._discard_pending()
        self._history = []
        self.results = None
        self._calls = 0

    def state_dict(self) -> dict:
        """The tracking state (history and call counter), for checkpoints: plain Python values (waits for pending)."""
        return {"history": [dict(row) for row in self.history], "calls": self._calls}

    #: the keys :meth:`state_dict` writes and :meth:`load_state_dict` needs
    state_keys: tuple[str, ...] = ("history", "calls")

    def _check_state(self, state) -> None:
        """ValueError naming what is missing from ``state`` (before anything is changed)."""
        if not isinstance(state, dict):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: not a state_dict (a dict from state_dict()); got {type(state).__name__}"
            )
        missing = [k for k in self.state_keys if k not in state]
        if missing:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the state has no {', '.join(map(repr, missing))}; pass what state_dict() returned"
            )
        if not isinstance(state["history"], list) or not all(isinstance(r, dict) for r in state["history"]):
            raise ValueError(f"{type(self).__name__}.load_state_dict: state['history'] must be a list of dicts")

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (pending computations are dropped); the next scheduled computation continues.

        Raises:
            ValueError: ``state`` is not a state_dict (a key missing, a history that is not a list of rows).
        """
        self._check_state(state)
        self._discard_pending()
        self._history = [dict(row) for row in state["history"]]
        self._calls = int(state["calls"])
        self.results = None

    @property
    def history_keys(self) -> tuple[str, ...]:
        """The columns of a history row."""
        return ("step", "lmn", "entropy_bits")

    def as_dict(self) -> dict[str, list]:
        """History as ``{column: [...]}`` over :attr:`history_keys` (``pandas.DataFrame(...)``-ready)."""
        return {k: [row[k] for row in self.history] for k in self.history_keys}

    def __len__(self) -> int:
        return len(self.history)
