"""Errors raised in one layer and handled in another."""

from __future__ import annotations


class NonFiniteOutputError(ValueError):
    """The tail's outputs are NaN/Inf: a diverged model, for which LMN is undefined.

    A ``ValueError``; :class:`~grokfast_metrics.tracking.tracker.LMNTracker` records NaN (with a warning) instead.

    >>> import torch, grokfast_metrics as gm
    >>> tail = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 3))
    >>> _ = tail[0].weight.data.fill_(3e38)                # finite weights whose outputs overflow: a diverged model
    >>> try:
    ...     gm.lmn(torch.randn(5, 4), tail)
    ... except gm.NonFiniteOutputError:
    ...     print("LMN undefined")
    LMN undefined
    """
