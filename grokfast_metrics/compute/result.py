"""``LMNResult``: what every ``lmn`` of the library returns (:func:`grokfast_metrics.lmn`, ``reference.lmn``, ``lmn_at``).

Defined below both :mod:`grokfast_metrics.core` and :mod:`grokfast_metrics.reference` (core dispatches to the
reference, so neither may import the other for it); ``grokfast_metrics.LMNResult`` and ``core.LMNResult`` are this class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LMNResult:
    """Result of :func:`~grokfast_metrics.lmn` / :func:`~grokfast_metrics.lmn_from_connectivity`.

    Attributes:
        lmn: linear mapping number ``2 ** entropy_bits``.
        entropy_bits: von Neumann-style entropy ``S`` of the normalised eigenvalues, in bits.
        eigenvalues: ``(N,)`` float64 absolute eigenvalues of ``L``, descending.
        connectivity: ``(N, N)`` linear connectivity matrix ``L``.
    """

    lmn: float
    entropy_bits: float
    eigenvalues: torch.Tensor
    connectivity: torch.Tensor
