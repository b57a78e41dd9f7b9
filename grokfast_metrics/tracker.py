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

import copy
import math
import numbers
import warnings
from collections.abc import Callable, Collection, Sequence

import torch
from torch import nn

from ._policy import check_n_lambda
from .core import BACKENDS, LMNResult, NonFiniteOutputError, resolve_backend
from .dropin import OutputSelector, Plan, emit_affine_warning
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
        return self._measure_and_record(step)

    def _measure_and_record(self, step: int) -> float:
        """Measure now and append the history rows of ``step`` (NaN with a warning for a diverged model)."""
        bad = diverged_parameters(self.model)
        if bad:  # a diverged run: record NaN rather than crash the training loop
            return self._record_nan(step, f"parameters {bad[:3]} have NaN/Inf")
        try:
            self.results = self._measure()
        except NonFiniteOutputError as e:  # finite weights, but the logits overflow: diverged all the same
            return self._record_nan(step, str(e))
        self.history.extend(self._rows(step, self.results))
        return float(next(iter(self.results.values())).lmn)

    def _rows(self, step: int, results: dict[str, LMNResult] | None) -> list[dict]:
        """History rows of one computation: the first result's (NaN when ``results`` is None)."""
        if results is None:
            return [{"step": step, "lmn": math.nan, "entropy_bits": math.nan}]
        first = next(iter(results.values()))
        return [{"step": step, "lmn": float(first.lmn), "entropy_bits": float(first.entropy_bits)}]

    def _record_nan(self, step: int, why: str) -> float:
        warnings.warn(f"{type(self).__name__}: step {step}: {why}; recording LMN = NaN", stacklevel=4)
        self.results = None
        self.history.extend(self._rows(step, None))
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

    #: the columns of a history row
    history_keys: tuple[str, ...] = ("step", "lmn", "entropy_bits")

    def as_dict(self) -> dict[str, list]:
        """History as ``{column: [...]}`` over :attr:`history_keys` (``pandas.DataFrame(...)``-ready)."""
        return {k: [row[k] for row in self.history] for k in self.history_keys}

    def __len__(self) -> int:
        return len(self.history)


def _next_after(step: int, every: int | str, log_base: float) -> int:
    """The first scheduled step after ``step``: the next multiple of ``every``, or the next ``floor(log_base ** k)``."""
    if every != "log":
        return (step // every + 1) * every
    k = 0
    while (s := math.floor(log_base**k)) <= step:
        k += 1
    return s


def _as_step(step) -> int:
    """``step`` as a non-negative int: ints, NumPy integers and 0-d integer tensors; anything else is a TypeError."""
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.is_floating_point() or step.is_complex() or step.dtype == torch.bool:
            raise TypeError(f"step must be an integer; got a tensor {tuple(step.shape)} {step.dtype}")
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an integer (the training step); got {step!r} ({type(step).__name__})")
    step = int(step)
    if step < 0:
        raise ValueError(f"step must be >= 0; got {step}")
    return step


class LMNTracker(Tracker):
    """Linear mapping number of ``probe_inputs`` at the output of ``model.<at>``, on a schedule.

    Every argument is checked at construction (one forward of the probe and the cut check), so a
    misspelled ``at``, a probe in the wrong layout or dtype, or a non-cut fails here, not at the
    first ``update``.

    Args:
        model: the model being trained (not copied: LMN is measured on its current weights; a copy of
            the tracker, e.g. ``copy.deepcopy`` or ``LMNMetric.clone()``, watches the same model).
        probe_inputs: the model's input for the fixed probe samples (tensor or tuple of tensors,
            samples along ``input_batch_dim``), on the model's device. Keep them fixed so curves compare.
        at: submodule name (see :func:`grokfast_metrics.lmn_at`), or a list of names: every layer is
            measured at each scheduled step (``compute()`` is then ``{name: lmn}`` and the history has
            one row per layer with an ``"at"`` column).
        every: ``int`` k (compute at the multiples of k, 0 included) or ``"log"`` (steps 0 and
            ``floor(log_base ** k)``). A scheduled step is never skipped: it is computed at the first
            ``update`` at or after it (the history records the step actually measured).
        output, batch_dim, n_lambda, backend: as in :func:`grokfast_metrics.lmn_at`.
        log_base: base of the log schedule (default 1.3).
        check: the cut check, once at construction (the cut is structural).
        to, input_batch_dim, path, user_hooks: as in :func:`grokfast_metrics.lmn_at`.

    Attributes:
        history: list of ``{"step", "lmn", "entropy_bits"}`` (plus ``"at"`` for several layers), one per
            computation (NaN values, with a warning, when the model's parameters or outputs are not finite).
        last_step: the step of the latest computation (``None`` before the first).

    Raises:
        ValueError, TypeError: bad ``every``/``log_base``/``n_lambda``/``backend``, and every error of
            :func:`grokfast_metrics.lmn_at`, at construction.
    """

    def __init__(self, model: nn.Module, probe_inputs, at: str | Sequence[str], every: int | str = 1,
                 output: OutputSelector = None, batch_dim: int = 0, n_lambda: int = 21, backend: str = "auto",
                 log_base: float = LOG_BASE, check: bool = True, *, to: str | None = None,
                 input_batch_dim: int | None = None, path: str = "auto", user_hooks: bool = False):
        if isinstance(every, str):
            if every != "log":
                raise ValueError(f"every must be a positive int or 'log'; got {every!r}")
            if not log_base > 1.0:
                raise ValueError(f"log_base must be > 1; got {log_base}")
        elif isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int or 'log'; got {every!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
        self.n_lambda = check_n_lambda(n_lambda)
        names = [at] if isinstance(at, str) else list(at) if isinstance(at, (list, tuple)) else None
        if not names or not all(isinstance(a, str) for a in names) or len(set(names)) != len(names):
            raise ValueError(f"at must be a submodule name or a non-empty list of distinct names; got {at!r}")
        super().__init__(model, Schedule.for_tracker(every, log_base), self._lmn_at)
        self.probe_inputs = probe_inputs
        self.at = at
        self.to = to
        self.every = every
        self.output = output
        self.batch_dim = batch_dim
        self.input_batch_dim = input_batch_dim
        self.backend = backend
        self.log_base = log_base
        self._multi = not isinstance(at, str)
        self._next_due = 0
        self._last_seen: int | None = None
        self._plans = {name: Plan(model, probe_inputs, name, to, output, batch_dim, input_batch_dim, path, user_hooks)
                       for name in names}
        for plan in self._plans.values():
            self._validate(plan, check)

    def _validate(self, plan: Plan, check: bool) -> None:
        """Fail fast: one forward of the probe, the cut check, the backend, the structural affine warning."""
        with plan.running():
            y, act = plan.forward()
            if plan.path != "chain" and check:
                plan.enforce_cut(act, y)
            h = act.movedim(plan.batch_dim, 0).reshape(plan.n, -1)
            resolve_backend(h, plan.tail, self.backend)
        plan.checked = plan.checked or not check
        if plan.affine:
            plan.affine_warned = True
            emit_affine_warning(plan.at, plan.to, "structurally: only affine layers follow it", stacklevel=4)

    def _lmn_at(self) -> dict[str, LMNResult]:
        return {name: plan.compute(self.n_lambda, self.backend) for name, plan in self._plans.items()}

    @property
    def last_step(self) -> int | None:
        """The step of the latest computation (``None`` before the first)."""
        return self.history[-1]["step"] if self.history else None

    def update(self, step: int | None = None, force: bool = False):
        """Compute LMN if a scheduled step is due at or before ``step`` (or ``force``); steps must increase.

        Args:
            step: the training step (an int; default: the number of earlier ``update`` calls). A
                scheduled step that no ``update`` hit exactly is computed at the first ``update`` after it.
            force: compute now, whatever the schedule.

        Returns:
            the new LMN (a float, or ``{name: float}`` for several layers; NaN for a diverged model)
            when computed, else ``None``.

        Raises:
            TypeError: a step that is not an integer. ValueError: a negative, repeated or decreasing step.
        """
        step = self._calls if step is None else step
        step = _as_step(step)
        if self._last_seen is not None and step <= self._last_seen:
            raise ValueError(f"update(step={step}) after update(step={self._last_seen}): steps must increase (call "
                             "update once per training step; reset() starts over)")
        self._calls += 1
        self._last_seen = step
        if not force and step < self._next_due:
            return None
        self._measure_and_record(step)
        self._next_due = _next_after(step, self.every, self.log_base)
        return self._latest()

    def _rows(self, step: int, results: dict[str, LMNResult] | None) -> list[dict]:
        if not self._multi:
            return super()._rows(step, results)
        if results is None:
            return [{"step": step, "at": a, "lmn": math.nan, "entropy_bits": math.nan} for a in self._plans]
        return [{"step": step, "at": a, "lmn": float(r.lmn), "entropy_bits": float(r.entropy_bits)}
                for a, r in results.items()]

    def _latest(self):
        if not self._multi:
            return self.history[-1]["lmn"]
        step = self.history[-1]["step"]
        return {row["at"]: row["lmn"] for row in self.history if row["step"] == step}

    def compute(self, with_step: bool = False):
        """The latest LMN: a plain float (``{name: float}`` for several layers); ``(step, value)`` with ``with_step``.

        Raises:
            RuntimeError: nothing computed yet (call ``update`` first).
        """
        if not self.history:
            raise RuntimeError("LMNTracker.compute() called before any LMN was computed; call update(step) first")
        value = self._latest()
        return (self.last_step, value) if with_step else value

    def reset(self) -> None:
        """Forget the history, the call counter and the steps seen (the checks done at construction stay done)."""
        super().reset()
        self._next_due = 0
        self._last_seen = None

    @property
    def history_keys(self) -> tuple[str, ...]:
        """The columns of a history row; with several layers an ``"at"`` column too."""
        return ("step", "at", "lmn", "entropy_bits") if self._multi else Tracker.history_keys

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume: the history and the schedule position (not the model or probe)."""
        return {**super().state_dict(), "at": self.at, "every": self.every, "log_base": self.log_base,
                "next_due": self._next_due, "last_seen": self._last_seen}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` (same ``at`` and ``every``; ValueError otherwise)."""
        mine = self.at if isinstance(self.at, str) else list(self.at)
        theirs = state.get("at")
        theirs = theirs if isinstance(theirs, str) else list(theirs or [])
        if theirs != mine or state.get("every") != self.every or state.get("log_base", self.log_base) != self.log_base:
            raise ValueError(f"state is of a tracker with at={state.get('at')!r}, every={state.get('every')!r}; this one "
                             f"has at={self.at!r}, every={self.every!r}")
        super().load_state_dict(state)
        self._next_due = int(state["next_due"])
        self._last_seen = None if state["last_seen"] is None else int(state["last_seen"])

    def __deepcopy__(self, memo):
        """A copy with its own history that watches the *same* model and probe (they are never copied)."""
        new = copy.copy(self)
        memo[id(self)] = new
        new.history = copy.deepcopy(self.history, memo)
        new.results = copy.deepcopy(self.results, memo)
        new._plans = dict(self._plans)
        return new

    def __repr__(self) -> str:
        last = f", last={self.history[-1]}" if self.history else ""
        return f"LMNTracker(at={self.at!r}, every={self.every!r}, computed={len(self.history)}{last})"


class _LMNMetricMethods:
    """The methods of :class:`LMNMetric`, mixed into its ``torchmetrics.Metric`` subclass by :func:`_make_lmn_metric`."""

    def __init__(self, model: nn.Module, probe_inputs, at: str | Sequence[str], every: int | str = 1, **kwargs):
        tracker_keys = ("output", "batch_dim", "n_lambda", "backend", "log_base", "check", "to",
                        "input_batch_dim", "path", "user_hooks")
        tracker_kw = {k: kwargs.pop(k) for k in tracker_keys if k in kwargs}
        super().__init__(**kwargs)
        self._tracker = LMNTracker(model, probe_inputs, at=at, every=every, **tracker_kw)
        k = 1 if isinstance(at, str) else len(at)
        self.add_state("value", default=torch.full((k,), float("nan"), dtype=torch.float64), dist_reduce_fx="mean")
        self.add_state("step", default=torch.tensor(-1, dtype=torch.long), dist_reduce_fx="max")

    @property
    def tracker(self) -> LMNTracker:
        return self._tracker

    def update(self, step: int | None = None, force: bool = False) -> None:
        if self._tracker.update(step, force=force) is not None:
            latest = self._tracker.compute()
            vals = [latest] if isinstance(latest, float) else list(latest.values())
            self.value = torch.tensor(vals, dtype=torch.float64, device=self.value.device)
            self.step = torch.tensor(self._tracker.last_step, dtype=torch.long, device=self.step.device)

    def compute(self):
        if int(self.step) < 0:
            raise RuntimeError("LMNMetric.compute() called before any LMN was computed; call update(step) first")
        if isinstance(self._tracker.at, str):
            return self.value[0]
        return dict(zip(self._tracker.at, self.value.unbind()))

    def reset(self) -> None:
        super().reset()
        if "_tracker" in self.__dict__:
            self._tracker.reset()

    def forward(self, step: int | None = None, force: bool = False):
        self.update(step, force=force)
        return self.compute()

    def get_extra_state(self) -> dict:
        return self._tracker.state_dict()

    def set_extra_state(self, state: dict) -> None:
        self._tracker.load_state_dict(state)


def _make_lmn_metric() -> type:
    """Define :class:`LMNMetric` on first use: importing torchmetrics (it imports matplotlib) only when asked."""
    import torchmetrics as _tm

    class LMNMetric(_LMNMetricMethods, _tm.Metric):
        """``torchmetrics.Metric`` wrapper of :class:`LMNTracker`: ``update(step)`` / ``compute()`` -> 0-d tensor.

        torchmetrics semantics: ``reset()`` clears the tracker's history too (the next ``update``
        computes); ``clone()`` gives an independent metric that watches the *same* model (the model
        and probe are never copied); ``compute()`` before any computation raises ``RuntimeError``;
        ``state_dict()`` carries the tracker's history and schedule (``load_state_dict`` restores them).
        With a list ``at``, ``compute()`` is ``{name: 0-d tensor}``. States ``value`` (latest LMN per
        layer) and ``step`` are reduced across processes with ``mean`` / ``max`` (ranks hold the same
        model and probe set, hence the same value). ``metric(step)`` is ``update(step)`` then ``compute()``.
        """

        full_state_update = False
        higher_is_better = None
        is_differentiable = False

    LMNMetric.__module__, LMNMetric.__qualname__ = __name__, "LMNMetric"
    return LMNMetric


def __getattr__(name: str):
    """``LMNMetric`` is built on first access, when torchmetrics is installed (it is not a dependency)."""
    if name == "LMNMetric":
        try:
            cls = _make_lmn_metric()
        except ImportError as e:
            raise ImportError('LMNMetric needs torchmetrics: pip install torchmetrics (or pip install '
                              '"grokfast_metrics[torchmetrics]")') from e
        globals()["LMNMetric"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
