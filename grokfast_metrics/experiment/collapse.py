"""The trainer's numerical-collapse detector (:class:`Collapse`) and its warning.

:func:`grokfast_metrics.experiment.trainer.forward_backward` feeds :class:`Collapse` every step; the thresholds are
``collapse_fraction`` and ``collapse_spike`` of :class:`~grokfast_metrics.experiment.config.TrainConfig`, and the
event goes into ``summary.json`` (``numerical_collapse``) with a :class:`NumericalCollapseWarning`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["Collapse", "NumericalCollapseWarning"]


@dataclass
class Collapse:
    """Numerical-collapse detector, fed every step.

    The collapse event is the first step at which either (a) the fraction of training samples whose
    correct-class probability is exactly 1 in the training dtype reaches ``fraction`` (their loss is
    exactly 0 and their gradient through the correct logit vanishes: "softmax collapse"), or (b) the
    train loss exceeds ``spike`` times its lowest value so far (a loss spike of orders of magnitude).

    Attributes:
        fraction_step, spike_step: first step of each criterion (``None``: not reached).
        detail: the values at those steps.
    """

    fraction: float
    spike: float
    min_loss: float = math.inf
    fraction_step: int | None = None
    spike_step: int | None = None
    detail: dict = field(default_factory=dict)

    def observe(self, step: int, train_loss: float, p1_fraction: float) -> bool:
        """Record ``step``; returns True when the collapse event happens at this step."""
        before = self.step
        if self.fraction_step is None and p1_fraction >= self.fraction:
            self.fraction_step = step
            self.detail["at_fraction_step"] = {"train_loss": train_loss, "train_p1_frac": p1_fraction}
        if self.spike_step is None and 0.0 < self.min_loss and train_loss > self.spike * self.min_loss:
            self.spike_step = step
            self.detail["at_spike_step"] = {"train_loss": train_loss, "min_train_loss_before": self.min_loss, "train_p1_frac": p1_fraction}
        if train_loss < self.min_loss:
            self.min_loss = train_loss
        return before is None and self.step is not None

    @property
    def step(self) -> int | None:
        """The collapse step: the first step of either criterion (``None``: no collapse)."""
        hits = [s for s in (self.fraction_step, self.spike_step) if s is not None]
        return min(hits) if hits else None

    def summary(self) -> dict | None:
        """``summary.json``'s ``numerical_collapse`` entry (``None`` when no collapse)."""
        if self.step is None:
            return None
        return {
            "step": self.step,
            "p1_fraction_step": self.fraction_step,
            "loss_spike_step": self.spike_step,
            "p1_fraction_threshold": self.fraction,
            "loss_spike_factor": self.spike,
            **self.detail,
        }


class NumericalCollapseWarning(UserWarning):
    """The run's training hit a numerical collapse (see :class:`Collapse`)."""
