"""Errors raised in one layer and handled in another."""
from __future__ import annotations


class NonFiniteOutputError(ValueError):
    """The tail's outputs are NaN/Inf: a diverged model, for which LMN is undefined.

    A ``ValueError``; :class:`~grokfast_metrics.tracking.tracker.LMNTracker` records NaN (with a warning) instead.
    """
