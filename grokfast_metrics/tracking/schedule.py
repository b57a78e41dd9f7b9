"""What a run measures at which step: one log-spaced-steps function and one :class:`Schedule`.

Every schedule of the library is stated here once:

- :class:`~grokfast_metrics.tracking.tracker.LMNTracker`: every ``k`` steps, or ``every="log"``: step 0 and
  ``floor(1.3 ** k)`` (:data:`LOG_BASE`);
- the trainer (:meth:`Schedule.from_config`): LMN every ``lmn_every`` steps plus the early log-spaced
  steps ``floor(1.5 ** k) < lmn_every`` (:data:`EARLY_BASE`), the compression complexity at step 0 and
  the powers of two (``floor(2 ** k)``) or every ``k`` steps, connectivity snapshots, and a log row
  every ``log_every`` steps; the phase events (memorization, generalization) and the last step add
  their own measurements.

All log-spaced steps come from :func:`log_steps`, which differs between schedules only in its base.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol


class ScheduleConfig(Protocol):
    """The fields of a resolved training configuration that the trainer's schedule reads
    (:class:`~grokfast_metrics.experiment.config.TrainConfig` has them)."""

    steps: int
    lmn_every: int
    lmn_early: bool
    log_every: int
    complexity: str
    save_connectivity: list[str]


#: base of ``LMNTracker(every="log")``: steps 0 and floor(LOG_BASE ** k), k = 0, 1, 2, ...
LOG_BASE = 1.3
#: base of the trainer's early LMN steps floor(EARLY_BASE ** k) below ``lmn_every``
EARLY_BASE = 1.5
#: base of the compression-complexity ``"log"`` schedule (step 0 and the powers of two)
COMPLEXITY_BASE = 2.0
#: phase events: the first step with train accuracy 100% / test accuracy 100% (the paper's generalization) /
#: test accuracy >= 99%
PHASE_EVENTS = ("memorization", "generalization", "generalization_99")
#: events a snapshot step can name: the phase events and the last step
SNAPSHOT_EVENTS = (*PHASE_EVENTS, "final")


def log_steps(base: float, limit: int, *, below: bool = False) -> list[int]:
    """The distinct steps ``floor(base ** k)``, ``k = 0, 1, 2, ...``, up to ``limit``, ascending.

    Args:
        base: growth factor, > 1.
        limit: largest step (included unless ``below``).
        below: keep only the steps ``< limit``.

    Raises:
        ValueError: ``base <= 1``.
    """
    if not (base > 1.0 and math.isfinite(base)):
        raise ValueError(f"log schedule base must be > 1 and finite; got {base}")
    out, k = set(), 0
    while (s := math.floor(base**k)) < limit or (s == limit and not below):
        out.add(s)
        k += 1
    return sorted(out)


def log_schedule(max_step: int, base: float = LOG_BASE) -> list[int]:
    """Steps ``0`` and ``floor(base ** k)`` up to ``max_step``, deduplicated, ascending.

    ``base = 1.3`` gives 0, 1, 2, 3, 4, 6, 8, 10, 13, 17, 23, 30, 39, ... (about 8.8 steps per decade:
    36 computations over a 20,000-step run).
    """
    return sorted({0, *log_steps(base, max_step)})


#: per base, the largest step looked at so far and the log-spaced steps up to it
_LOG_CACHE: dict[float, tuple[int, frozenset[int]]] = {}


def _is_log_step(step: int, base: float) -> bool:
    """``step == floor(base ** k)`` for some ``k >= 0`` (the steps are cached per base, grown on demand)."""
    limit, steps = _LOG_CACHE.get(base, (-1, frozenset()))
    if step > limit:
        limit = max(step, 2 * limit, 64)
        steps = frozenset(log_steps(base, limit))
        _LOG_CACHE[base] = (limit, steps)
    return step in steps


@dataclass(frozen=True)
class Steps:
    """A set of steps: multiples of ``every``, log-spaced steps, listed steps and named events.

    Attributes:
        every: the multiples of ``every`` (0 included); 0 = none.
        log_base: also the steps ``floor(log_base ** k)`` (``None``: none).
        log_below: only the log-spaced steps below this step (``None``: all).
        extra: listed steps.
        events: named events (e.g. ``"memorization"``) at whose step this set is due as well.
    """

    every: int = 0
    log_base: float | None = None
    log_below: int | None = None
    extra: frozenset[int] = frozenset()
    events: frozenset[str] = frozenset()

    def due(self, step: int, events: Collection[str] = ()) -> bool:
        """Whether ``step`` (at which ``events`` happen) is in the set; never for a negative step."""
        if step < 0:
            return False
        if step in self.extra or (self.every and step % self.every == 0) or not self.events.isdisjoint(events):
            return True
        if self.log_base is None or (self.log_below is not None and step >= self.log_below):
            return False
        return _is_log_step(step, self.log_base)


#: the empty set of steps
NEVER = Steps()


@dataclass(frozen=True)
class Due:
    """What a run does at one step (see :meth:`Schedule.due`).

    Attributes:
        lmn: compute LMN.
        snapshot: save the connectivity matrix (LMN is due too).
        complexity: compute the compression complexity.
        row: write a log row.
        ranks: the row carries the effective ranks.
        final: the last step.
    """

    lmn: bool
    snapshot: bool
    complexity: bool
    row: bool
    ranks: bool
    final: bool


@dataclass(frozen=True)
class Schedule:
    """What is due at each step of a run: LMN, connectivity snapshots, compression complexity, log rows.

    ``LMNTracker`` uses only ``lmn`` (:meth:`for_tracker`); the trainer uses all of it
    (:meth:`from_config`). Snapshots need LMN: they are due only while LMN is tracked, and make it due.

    Attributes:
        lmn: LMN steps; ``None`` = LMN is not tracked.
        snapshots: steps at which the connectivity matrix is saved.
        complexity: compression-complexity steps.
        rows: steps that are logged even without a measurement.
        last: the last step (event ``"final"``), if known.
    """

    lmn: Steps | None = None
    snapshots: Steps = NEVER
    complexity: Steps = NEVER
    rows: Steps = NEVER
    last: int | None = None

    @classmethod
    def for_tracker(cls, every: int | str, log_base: float = LOG_BASE) -> Schedule:
        """``every=k``: the multiples of ``k``; ``every="log"``: 0 and ``floor(log_base ** k)``."""
        if every == "log":
            return cls(lmn=Steps(log_base=log_base, extra=frozenset({0})))
        return cls(lmn=Steps(every=every))

    @classmethod
    def from_config(cls, cfg: ScheduleConfig) -> Schedule:
        """The trainer's schedule of a resolved :class:`~grokfast_metrics.experiment.config.TrainConfig`.

        LMN: every ``lmn_every`` steps, the early steps ``floor(1.5 ** k) < lmn_every`` (``lmn_early``), the
        phase events and the last step. Complexity: ``complexity_steps(cfg.complexity)`` and the last step.
        Rows: every ``log_every`` steps, the phase events, the last step and every measured step.
        """
        phases_and_end = frozenset((*PHASE_EVENTS, "final"))
        lmn = None
        if cfg.lmn_every > 0:
            early = EARLY_BASE if cfg.lmn_early else None
            lmn = Steps(every=cfg.lmn_every, log_base=early, log_below=cfg.lmn_every, events=phases_and_end)
        snapshots = Steps(
            extra=frozenset(int(s) for s in cfg.save_connectivity if str(s).isdigit()),
            events=frozenset(s for s in cfg.save_connectivity if s in SNAPSHOT_EVENTS),
        )
        return cls(
            lmn=lmn,
            snapshots=snapshots,
            complexity=complexity_steps(cfg.complexity),
            rows=Steps(every=cfg.log_every, events=phases_and_end),
            last=cfg.steps,
        )

    def due(self, step: int, events: Collection[str] = ()) -> Due:
        """What is due at ``step``, given the phase ``events`` first reached there (``"final"`` is added at ``last``)."""
        final = step == self.last
        events = {*events, "final"} if final else events
        snapshot = self.lmn is not None and self.snapshots.due(step, events)
        lmn = self.lmn is not None and (snapshot or self.lmn.due(step, events))
        complexity = self.complexity.due(step, events)
        row = lmn or complexity or self.rows.due(step, events)
        return Due(lmn=lmn, snapshot=snapshot, complexity=complexity, row=row, ranks=lmn or final, final=final)

    def early_lmn_steps(self) -> list[int]:
        """The trainer's extra log-spaced LMN steps below ``lmn_every`` (empty when off)."""
        s = self.lmn
        if s is None or s.log_base is None or s.log_below is None:
            return []
        return log_steps(s.log_base, s.log_below, below=True)


def complexity_steps(spec: str) -> Steps:
    """Compression-complexity steps: ``"off"``, ``"log"`` (0 and the powers of two) or every ``k`` (a digit
    string), each with the last step (event ``"final"``).

    Raises:
        ValueError: any other spec.
    """
    spec = str(spec)
    if spec == "off":
        return NEVER
    final = frozenset({"final"})
    if spec == "log":
        return Steps(log_base=COMPLEXITY_BASE, extra=frozenset({0}), events=final)
    if spec.isdigit() and int(spec) >= 1:
        return Steps(every=int(spec), events=final)
    raise ValueError(f"complexity must be 'off', 'log' or a step interval >= 1; got {spec!r}")
