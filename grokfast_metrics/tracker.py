"""``LMNTracker``: LMN of a fixed probe set at one layer, on a schedule, inside any training loop.

Three lines in an existing loop::

    import grokfast_metrics as gm
    tracker = gm.LMNTracker(model, probe_inputs, at="layers.0", every="log")
    tracker.update(step)            # in the loop; computes only when the schedule says so

``update`` / ``compute`` / ``reset`` follow torchmetrics; values are plain Python floats, ready for
wandb, TensorBoard or ``torch.save``. A computation never perturbs training: it runs without
grad, in eval mode (restored afterwards), with the global RNG state forked, and leaves no hooks.

:class:`Tracker` is the machinery behind it (schedule, history, NaN policy) with a pluggable
measurement; the trainer (:mod:`grokfast_metrics.train`) tracks its layers through the same class.
The schedules live in :mod:`grokfast_metrics.schedule` (``log_schedule`` and ``LOG_BASE`` are
re-exported here).

``LMNMetric`` (a ``torchmetrics.Metric`` wrapping a tracker) exists only when torchmetrics is
installed; it is not a dependency.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Collection

import torch
from torch import nn

from .core import LMNResult, NonFiniteOutputError
from .dropin import OutputSelector, lmn_at
from .schedule import LOG_BASE, Schedule, log_schedule

__all__ = ["LOG_BASE", "LMNTracker", "Tracker", "diverged_parameters", "log_schedule"]


def diverged_parameters(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters of ``model`` that hold NaN or Inf (one device sync)."""
    params = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    if not params:
        return []
    flags = torch.stack([torch.isfinite(p).all().to(params[0][1].device) for _, p in params]).tolist()
    return [n for (n, _), ok in zip(params, flags) if not ok]


class Tracker:
    """LMN on a :class:`~grokfast_metrics.schedule.Schedule`, with a history: the machinery every tracker shares.

    What is measured is pluggable: ``measure()`` returns ``{name: LMNResult}`` for the model's current
    weights, the first entry being the one recorded in :attr:`history`. :class:`LMNTracker` measures
    with :func:`grokfast_metrics.lmn_at`; the trainer measures several layers of its MLP at once.

    Args:
        model: the model being trained (its parameters are checked for NaN/Inf before each measurement).
        schedule: when LMN is due (``schedule.due(step, events).lmn``).
        measure: ``() -> {name: LMNResult}``.

    Attributes:
        history: list of ``{"step": int, "lmn": float, "entropy_bits": float}``, one per computation
            (NaN values, with a warning, when the model's parameters or outputs are not finite: a
            diverged run keeps training instead of crashing in the metric).
        results: every result of the latest computation (``None`` before the first one or after NaN).
    """

    def __init__(self, model: nn.Module, schedule: Schedule, measure: Callable[[], dict[str, LMNResult]]):
        self.model = model
        self.schedule = schedule
        self._measure = measure
        self._calls = 0
        self.history: list[dict] = []
        self.results: dict[str, LMNResult] | None = None

    def should_compute(self, step: int, events: Collection[str] = ()) -> bool:
        """Whether the schedule computes LMN at ``step`` (where ``events`` happen, e.g. ``"memorization"``)."""
        return self.schedule.due(int(step), events).lmn

    def update(self, step: int | None = None, events: Collection[str] = ()) -> float | None:
        """Compute LMN if the schedule says so at ``step`` (default: the number of earlier ``update`` calls).

        Returns:
            the new LMN as a float when computed (NaN when the parameters diverged), else ``None``.
        """
        if step is None:
            step = self._calls
        self._calls += 1
        step = int(step)
        if not self.should_compute(step, events):
            return None
        bad = diverged_parameters(self.model)
        if bad:  # a diverged run: record NaN rather than crash the training loop
            return self._record_nan(step, f"parameters {bad[:3]} have NaN/Inf")
        try:
            self.results = self._measure()
        except NonFiniteOutputError as e:  # finite weights, but the logits overflow: diverged all the same
            return self._record_nan(step, str(e))
        first = next(iter(self.results.values()))
        self.history.append({"step": step, "lmn": float(first.lmn), "entropy_bits": float(first.entropy_bits)})
        return float(first.lmn)

    def _record_nan(self, step: int, why: str) -> float:
        warnings.warn(f"{type(self).__name__}: step {step}: {why}; recording LMN = NaN", stacklevel=3)
        self.results = None
        self.history.append({"step": step, "lmn": math.nan, "entropy_bits": math.nan})
        return math.nan

    def compute(self) -> float:
        """The latest LMN as a plain float.

        Raises:
            RuntimeError: nothing computed yet (call ``update`` first).
        """
        if not self.history:
            raise RuntimeError(f"{type(self).__name__}.compute() called before any LMN was computed; call update(step) first")
        return self.history[-1]["lmn"]

    def reset(self) -> None:
        """Forget the history and the call counter (a cut check already done is not repeated)."""
        self.history = []
        self.results = None
        self._calls = 0

    def state_dict(self) -> dict:
        """The tracking state (history and call counter), for checkpoints: plain Python values."""
        return {"history": [dict(row) for row in self.history], "calls": self._calls}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the next scheduled computation continues the history."""
        self.history = [dict(row) for row in state["history"]]
        self._calls = int(state["calls"])
        self.results = None

    def as_dict(self) -> dict[str, list]:
        """History as ``{"step": [...], "lmn": [...], "entropy_bits": [...]}`` (``pandas.DataFrame(...)``-ready)."""
        keys = ("step", "lmn", "entropy_bits")
        return {k: [row[k] for row in self.history] for k in keys}

    def __len__(self) -> int:
        return len(self.history)


class LMNTracker(Tracker):
    """Linear mapping number of ``probe_inputs`` at the output of ``model.<at>``, on a schedule.

    Args:
        model: the model being trained (not copied: LMN is measured on its current weights).
        probe_inputs: the model's input for the fixed probe samples (tensor or tuple of tensors,
            samples along ``batch_dim``), on the model's device. Keep them fixed so curves compare.
        at: submodule name (see :func:`grokfast_metrics.lmn_at`).
        every: ``int`` k (compute at steps divisible by k, including 0) or ``"log"`` (steps 0 and
            ``floor(log_base ** k)``).
        output, batch_dim, n_lambda, backend: as in :func:`grokfast_metrics.lmn_at`.
        log_base: base of the log schedule (default 1.3).
        check: cut check on the first computation only (the cut is structural; later calls skip it).

    Attributes:
        history: list of ``{"step": int, "lmn": float, "entropy_bits": float}``, one per computation
            (NaN values, with a warning, when the model's parameters are not finite: a diverged run
            keeps training instead of crashing in the metric).

    Raises:
        ValueError: bad ``every``/``log_base``; errors of :func:`lmn_at` surface at the first ``update``.
    """

    def __init__(self, model: nn.Module, probe_inputs, at: str, every: int | str = 1, output: OutputSelector = None,
                 batch_dim: int = 0, n_lambda: int = 21, backend: str = "auto", log_base: float = LOG_BASE,
                 check: bool = True):
        if isinstance(every, str):
            if every != "log":
                raise ValueError(f"every must be a positive int or 'log'; got {every!r}")
            if not log_base > 1.0:
                raise ValueError(f"log_base must be > 1; got {log_base}")
        elif isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int or 'log'; got {every!r}")
        super().__init__(model, Schedule.for_tracker(every, log_base), self._lmn_at)
        self.probe_inputs = probe_inputs
        self.at = at
        self.every = every
        self.output = output
        self.batch_dim = batch_dim
        self.n_lambda = n_lambda
        self.backend = backend
        self.log_base = log_base
        self._check = check
        self._checked = False

    def _lmn_at(self) -> dict[str, LMNResult]:
        res = lmn_at(self.model, self.probe_inputs, at=self.at, output=self.output, batch_dim=self.batch_dim,
                     n_lambda=self.n_lambda, backend=self.backend, check=self._check and not self._checked)
        self._checked = True
        return {self.at: res}

    def __repr__(self) -> str:
        last = f", last={self.history[-1]}" if self.history else ""
        return f"LMNTracker(at={self.at!r}, every={self.every!r}, computed={len(self.history)}{last})"


try:  # optional adapter, only when torchmetrics is installed
    import torchmetrics as _tm
except ImportError:  # pragma: no cover - depends on the environment
    _tm = None

if _tm is not None:

    class LMNMetric(_tm.Metric):
        """``torchmetrics.Metric`` wrapper of :class:`LMNTracker`: ``update(step)`` / ``compute()`` -> 0-d tensor.

        State ``value`` (latest LMN, NaN before the first computation) is reduced across processes
        with ``mean`` (ranks of a data-parallel run hold the same model and probe set, hence the same value).
        ``metric(step)`` is ``update(step)`` then ``compute()`` (one computation, not torchmetrics' two).
        """

        full_state_update = False
        higher_is_better = None
        is_differentiable = False

        def __init__(self, model: nn.Module, probe_inputs, at: str, every: int | str = 1, **kwargs):
            tracker_keys = ("output", "batch_dim", "n_lambda", "backend", "log_base", "check")
            tracker_kw = {k: kwargs.pop(k) for k in tracker_keys if k in kwargs}
            super().__init__(**kwargs)
            self._tracker = LMNTracker(model, probe_inputs, at=at, every=every, **tracker_kw)
            self.add_state("value", default=torch.tensor(float("nan"), dtype=torch.float64), dist_reduce_fx="mean")

        @property
        def tracker(self) -> LMNTracker:
            return self._tracker

        def update(self, step: int | None = None) -> None:
            self._tracker.update(step)
            if self._tracker.history:  # also after reset(), which restores the NaN default
                latest = self._tracker.history[-1]["lmn"]
                self.value = torch.tensor(latest, dtype=torch.float64, device=self.value.device)

        def compute(self) -> torch.Tensor:
            return self.value

        def forward(self, step: int | None = None) -> torch.Tensor:
            self.update(step)
            return self.compute()
