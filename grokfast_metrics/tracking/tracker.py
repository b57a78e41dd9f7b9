"""``LMNTracker``: LMN of a fixed probe set at one layer, on a schedule, inside any training loop.

Three lines in an existing loop::

    import grokfast_metrics as gm
    tracker = gm.LMNTracker(model, probe_inputs, at="layers.0", every="log")
    tracker.update(step)            # in the loop; computes only when the schedule says so

``update`` / ``compute`` / ``reset`` follow torchmetrics; values are plain Python floats, ready for
wandb, TensorBoard or ``torch.save``. A computation never perturbs training: it runs without
grad, in eval mode (restored afterwards), with the global RNG state forked, and leaves no hooks.

:class:`~grokfast_metrics.tracking.base.Tracker` is the machinery behind it (schedule, history, NaN policy) with a
pluggable measurement; the schedules live in :mod:`grokfast_metrics.tracking.schedule`.

``LMNMetric`` (a ``torchmetrics.Metric`` wrapping a tracker) exists only when torchmetrics is
installed; it is not a dependency.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Collection, Sequence
from typing import Any, cast

import torch
from torch import nn

from ..compute.core import BACKENDS, LMNResult, resolve_backend
from ..dropin.hooks import OutputSelector
from ..dropin.plan import Plan, emit_affine_warning
from ..foundation.policy import check_n_lambda
from ..foundation.runtime import keyword_only
from .base import Tracker, Value
from .schedule import LOG_BASE, Schedule

__all__ = ["LMNTracker"]


def _follow_model(probe, model: nn.Module):
    """``probe`` on the model's device, floating tensors in the model's floating dtype (integer ids unchanged)."""
    ref = next((p for p in list(model.parameters()) + list(model.buffers()) if p.is_floating_point()), None)
    if ref is None:
        return probe

    def move(x):
        return x.to(ref.device, ref.dtype) if x.is_floating_point() else x.to(ref.device)

    return (
        move(probe)
        if isinstance(probe, torch.Tensor)
        else type(probe)(move(x) for x in probe)
        if isinstance(probe, (tuple, list))
        else probe
    )


def _next_after(step: int, every: int | str, log_base: float) -> int:
    """The first scheduled step after ``step``: the next multiple of ``every``, or the next ``floor(log_base ** k)``."""
    if isinstance(every, int):
        return (step // every + 1) * every
    k = 0
    while (s := math.floor(log_base**k)) <= step:
        k += 1
    return s


#: the largest step a tracker accepts (an int64, as a step counter tensor holds)
MAX_STEP = 2**63 - 1


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
    if step > MAX_STEP:
        raise ValueError(f"step must be <= 2**63 - 1 (a training step); got a {step.bit_length()}-bit integer")
    return step


class LMNTracker(Tracker):
    """Linear mapping number of ``probe_inputs`` at the output of ``model.<at>``, on a schedule.

    Every argument is checked at construction (one forward of the probe and the cut check; with ``lazy=True``
    at the first computation instead), so a
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
        to, output, batch_dim, input_batch_dim, n_lambda, backend, path, user_hooks: as in
            :func:`grokfast_metrics.lmn_at` (the same order and defaults; every argument after ``at`` is keyword-only).
        check: the cut check, once at construction (the cut is structural).
        log_base: base of the log schedule (default 1.3).
        lazy: ``True``: nothing runs at construction; the first computation moves the probe to the model's device
            (floating probes to its floating dtype), then runs every check. For a tracker built in a Lightning
            module's ``__init__`` (the trainer moves and casts the model afterwards). Errors surface at the first
            ``update`` that computes.
        compile: a split tail on the generic path (attention after the cut) runs through ``torch.compile``, compiled
            once at the first computation (its cost: ``last_run_info()["compile"]["first_call_s"]``) and reused at
            every later one without recompiling (see :func:`grokfast_metrics.lmn_at`).
        asynchronous: ``True`` (one thread) or a number of host threads: ``update`` computes ``L`` (the
            expensive kernel, in the training stream on a GPU) and hands the eigen step and entropy to
            those threads; the rows land in :attr:`history` in step order, the same values as without it
            (bit for bit on the CPU; on a GPU the eigen step runs in host LAPACK instead of on the device).
            :attr:`history`, :meth:`compute`, :attr:`last_step` and :meth:`state_dict` wait for pending
            results; :meth:`ready` does not; :meth:`flush` waits; :meth:`close` (or ``with tracker:``)
            flushes and stops the threads. A failed eigen step raises
            :class:`~grokfast_metrics.tracking.async_eigen.EigenStepError`, naming its step, at the next of these.

    Attributes:
        history: list of ``{"step", "lmn", "entropy_bits"}`` (plus ``"at"`` for several layers), one per
            computation (NaN values, with a warning, when the model's parameters or outputs are not finite).
        last_step: the step of the latest computation (``None`` before the first).

    Raises:
        ValueError, TypeError: bad ``every``/``log_base``/``n_lambda``/``backend``, and every error of
            :func:`grokfast_metrics.lmn_at`, at construction. TypeError: more than ``model, probe_inputs, at``
            passed positionally, or no ``at``: one line saying how to call it.

    Example (every 10 steps: computed at steps 0 and 10):

    >>> import torch, grokfast_metrics as gm
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 8), torch.nn.SiLU(),
    ...                             torch.nn.Linear(8, 3))
    >>> tracker = gm.LMNTracker(model, torch.randn(6, 4), "1", every=10, n_lambda=5)
    >>> [step for step in range(12) if tracker.update(step) is not None]
    [0, 10]
    >>> [row["step"] for row in tracker.history], tracker.compute() >= 1.0
    ([0, 10], True)
    """

    @keyword_only("LMNTracker(model, probe_inputs, at='<layer name>', every=1, to=None, output=None, ...)")
    def __init__(
        self,
        model: nn.Module,
        probe_inputs: Any,
        at: str | Sequence[str],
        *,
        every: int | str = 1,
        to: str | None = None,
        output: OutputSelector = None,
        batch_dim: int = 0,
        input_batch_dim: int | None = None,
        n_lambda: int = 21,
        backend: str = "auto",
        check: bool = True,
        path: str = "auto",
        user_hooks: bool = False,
        log_base: float = LOG_BASE,
        asynchronous: bool | int = False,
        lazy: bool = False,
        compile: bool = False,
    ):
        if isinstance(every, str):
            if every != "log":
                raise ValueError(f"every must be a positive int or 'log'; got {every!r}")
            if not (isinstance(log_base, numbers.Real) and log_base > 1.0 and math.isfinite(log_base)):
                raise ValueError(f"log_base must be > 1 and finite; got {log_base!r}")
        elif isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int or 'log'; got {every!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
        self.n_lambda = check_n_lambda(n_lambda)
        names = [at] if isinstance(at, str) else list(at) if isinstance(at, (list, tuple)) else None
        if not names or not all(isinstance(a, str) for a in names) or len(set(names)) != len(names):
            raise ValueError(f"at must be a submodule name or a non-empty list of distinct names; got {at!r}")
        if not isinstance(asynchronous, int) or asynchronous < 0:
            raise ValueError(f"asynchronous must be a bool or a number of threads >= 0; got {asynchronous!r}")
        super().__init__(
            model, Schedule.for_tracker(every, log_base), self._lmn_at, connectivity=self._connectivity_at, workers=int(asynchronous)
        )
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
        self._submitted: int | None = None  # the step of the latest asynchronous computation
        self._names = names
        self._plan_args = (to, output, batch_dim, input_batch_dim, path, user_hooks, check, bool(compile))
        self.lazy = bool(lazy)
        self._plans: dict[str, Plan] | None = None
        if not self.lazy:
            self._build_plans()

    def _build_plans(self) -> dict[str, Plan]:
        """The plans (and every check) now; a lazy tracker does it at its first computation, after moving the probe
        to the model's device and its floating tensors to the model's floating dtype (Lightning moves and casts
        the model after ``__init__``)."""
        if self._plans is None:
            to, output, batch_dim, input_batch_dim, path, user_hooks, check, *more = self._plan_args
            compile_ = bool(more and more[0])  # a tracker pickled before compile= existed has 7 plan arguments
            probe = _follow_model(self.probe_inputs, self.model) if self.lazy else self.probe_inputs
            plans = {
                name: Plan(self.model, probe, name, to, output, batch_dim, input_batch_dim, path, user_hooks, compile=compile_)
                for name in self._names
            }
            for plan in plans.values():
                self._validate(plan, check)
            self._plans = plans
        return self._plans

    def _validate(self, plan: Plan, check: bool) -> None:
        """Fail fast: one forward of the probe, the cut check, the backend, the structural affine warning."""
        with plan.running():
            y, act = plan.forward()
            if plan.path != "chain" and check:
                plan.enforce_cut(act, y)
            h = act.movedim(plan.batch_dim, 0).reshape(plan.n, -1)
            resolve_backend(h, cast(nn.Module, plan.tail), self.backend)  # plan.forward() built the tail
        plan.checked = plan.checked or not check
        if plan.affine:
            plan.affine_warned = True
            emit_affine_warning(plan.at, plan.to, "structurally: only affine layers follow it", stacklevel=4, model=plan.model)

    def _lmn_at(self) -> dict[str, LMNResult]:
        return {name: plan.compute(self.n_lambda, self.backend) for name, plan in self._build_plans().items()}

    def _connectivity_at(self) -> dict[str, torch.Tensor]:
        return {name: plan.connectivity(self.n_lambda, self.backend) for name, plan in self._build_plans().items()}

    @property
    def last_step(self) -> int | None:
        """The step of the latest computation (``None`` before the first)."""
        return self.history[-1]["step"] if self.history else None

    @keyword_only("update(step, force=True)")
    def update(self, step: int | None = None, *, events: Collection[str] = (), force: bool = False) -> Value | None:
        """Compute LMN if a scheduled step is due at or before ``step`` (or ``force``); steps must increase.

        Args:
            step: the training step (an int; default: the number of earlier ``update`` calls). A
                scheduled step that no ``update`` hit exactly is computed at the first ``update`` after it.
            events: as in :meth:`Tracker.update`; an ``LMNTracker``'s schedule has no event triggers, so they
                change nothing (the argument is there so that an ``LMNTracker`` is a ``Tracker``).
            force: compute now, whatever the schedule. ``update(s, force=True)`` right after ``update(s)``
                (e.g. the last step, forced after the loop) returns step ``s``'s value, computed once.

        Returns:
            the new LMN (a float, or ``{name: float}`` for several layers; NaN for a diverged model)
            when computed, else ``None`` (always ``None`` when asynchronous: the value lands in :attr:`history`).

        Raises:
            TypeError: a step that is not an integer; ``force`` passed positionally (it is keyword-only).
            ValueError: a negative, repeated (unless forced) or decreasing step, or one above 2**63 - 1.
        """
        step = self._calls if step is None else step
        step = _as_step(step)
        if force and step == self._last_seen:  # forcing the step just updated (e.g. the last one, after the loop)
            if self._history_step() == step:
                return None if self.asynchronous else self._latest()
            self._measure_and_record(step)
            self._next_due = _next_after(step, self.every, self.log_base)
            return None if self.asynchronous else self._latest()
        if self._last_seen is not None and step <= self._last_seen:
            raise ValueError(
                f"update(step={step}) after update(step={self._last_seen}): steps must increase (call "
                "update once per training step; reset() starts over)"
            )
        self._calls += 1
        self._last_seen = step
        if not force and step < self._next_due:
            return None
        self._measure_and_record(step)
        self._next_due = _next_after(step, self.every, self.log_base)
        return None if self.asynchronous else self._latest()

    def _history_step(self) -> int | None:
        """The step of the latest computation, landed or pending (``None`` before the first)."""
        if self._eigen is not None and self._eigen.pending():
            return self._submitted
        return self._history[-1]["step"] if self._history else None

    def _submit(self, step: int, mats: dict[str, torch.Tensor]) -> None:
        self._submitted = step
        super()._submit(step, mats)

    def _rows(self, step: int, results: dict[str, LMNResult] | None) -> list[dict]:
        if not self._multi:
            return super()._rows(step, results)
        if results is None:
            return [{"step": step, "at": a, "lmn": math.nan, "entropy_bits": math.nan} for a in self._names]
        return [{"step": step, "at": a, "lmn": float(r.lmn), "entropy_bits": float(r.entropy_bits)} for a, r in results.items()]

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

    state_keys = ("history", "calls", "next_due", "last_seen")

    @property
    def history_keys(self) -> tuple[str, ...]:
        """The columns of a history row; with several layers an ``"at"`` column too."""
        return ("step", "at", "lmn", "entropy_bits") if self._multi else super().history_keys

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume: the history and the schedule position (not the model or probe)."""
        return {
            **super().state_dict(),
            "at": self.at,
            "every": self.every,
            "log_base": self.log_base,
            "next_due": self._next_due,
            "last_seen": self._last_seen,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` (same ``at`` and ``every``; ValueError otherwise, or for a key missing)."""
        self._check_state(state)
        mine = self.at if isinstance(self.at, str) else list(self.at)
        theirs = state.get("at")
        theirs = theirs if isinstance(theirs, str) else list(theirs or [])
        if theirs != mine or state.get("every") != self.every or state.get("log_base", self.log_base) != self.log_base:
            raise ValueError(
                f"state is of a tracker with at={state.get('at')!r}, every={state.get('every')!r}; this one "
                f"has at={self.at!r}, every={self.every!r}"
            )
        super().load_state_dict(state)
        self._next_due = int(state["next_due"])
        self._last_seen = None if state["last_seen"] is None else int(state["last_seen"])

    def __deepcopy__(self, memo):
        """A copy with its own history that watches the *same* model and probe (they are never copied)."""
        new = copy.copy(self)
        memo[id(self)] = new
        new.history = copy.deepcopy(self.history, memo)
        new.results = copy.deepcopy(self.results, memo)
        new._plans = None if self._plans is None else dict(self._plans)
        return new

    def __repr__(self) -> str:
        last = f", last={self._history[-1]}" if self._history else ""  # what has landed: repr never waits
        return f"LMNTracker(at={self.at!r}, every={self.every!r}, computed={len(self.history)}{last})"
