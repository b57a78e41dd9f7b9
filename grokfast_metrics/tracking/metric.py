"""``LMNMetric``: a ``torchmetrics.Metric`` wrapping :class:`~grokfast_metrics.tracking.tracker.LMNTracker`.

Defined on first use (``grokfast_metrics.tracking.metric.LMNMetric``), only when torchmetrics is installed: importing
torchmetrics imports matplotlib, and it is not a dependency.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..foundation.runtime import keyword_only
from .tracker import LMNTracker

if TYPE_CHECKING:  # the methods are mixed into a torchmetrics.Metric subclass (torchmetrics is imported only then)
    from torchmetrics import Metric as _MetricBase
else:
    _MetricBase = object


class _LMNMetricMethods(_MetricBase):
    """The methods of :class:`LMNMetric`, mixed into its ``torchmetrics.Metric`` subclass by :func:`_make_lmn_metric`."""

    value: torch.Tensor  # the states add_state registers: the latest LMN per layer, and its step
    step: torch.Tensor

    @keyword_only("LMNMetric(model, probe_inputs, at='<layer name>', every=1, ...)", name="LMNMetric")
    def __init__(self, model: nn.Module, probe_inputs, at: str | Sequence[str], *, every: int | str = 1, **kwargs):
        tracker_keys = ("output", "batch_dim", "n_lambda", "backend", "log_base", "check", "to", "input_batch_dim", "path", "user_hooks")
        tracker_kw = {k: kwargs.pop(k) for k in tracker_keys if k in kwargs}
        super().__init__(**kwargs)
        self._tracker = LMNTracker(model, probe_inputs, at=at, every=every, **tracker_kw)
        k = 1 if isinstance(at, str) else len(at)
        self.add_state("value", default=torch.full((k,), float("nan"), dtype=torch.float64), dist_reduce_fx="mean")
        self.add_state("step", default=torch.tensor(-1, dtype=torch.long), dist_reduce_fx="max")

    @property
    def tracker(self) -> LMNTracker:
        return self._tracker

    @keyword_only("update(step, force=True)", name="LMNMetric.update")
    def update(self, step: int | None = None, *, force: bool = False) -> None:
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

    def forward(self, step: int | None = None, *, force: bool = False):
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
            raise ImportError(
                'LMNMetric needs torchmetrics: pip install torchmetrics (or pip install "grokfast_metrics[torchmetrics]")'
            ) from e
        globals()["LMNMetric"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
