"""``compile=True``: a split tail on the generic path through ``torch.compile`` at one batch shape
(:class:`~grokfast_metrics.compute.generic.CompiledTail`, kept on the plan for its next computations), and what a plan
reports to :func:`grokfast_metrics.compute.core.last_run_info` (its path, the affine shortcut, what compiling did)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..compute import core, generic
from ..compute.core import connectivity


def run_generic(plan: Any, h: torch.Tensor, tail: nn.Module, n_lambda: int, backend: str, chunk_bytes: int | None) -> torch.Tensor:
    """``connectivity`` through a split or hook tail of ``plan``; with ``plan.compile`` a split tail runs compiled, at
    one batch shape (``plan._compiled`` keeps it; ``plan.compile_info`` says what happened)."""
    if not plan.compile:
        return connectivity(h, tail, n_lambda, backend, chunk_bytes=chunk_bytes)
    dtype = core._compute_dtype(h, tail)
    why = (
        "the hook tail re-runs the whole model (split tails only)"
        if plan.path != "split"
        else f"backend={backend!r}"
        if backend not in ("auto", "torch")
        else "the tail's parameters are not in the compute dtype"
        if any(p.dtype != dtype for p in tail.parameters() if p.is_floating_point())
        else None
    )
    if why is not None:
        plan.compile_info = {"compiled": False, "why": why}
        return connectivity(h, tail, n_lambda, backend, chunk_bytes=chunk_bytes)
    rows = generic.compiled_rows(tail, h.to(dtype), n_lambda, chunk_bytes)
    key = (id(tail), rows, dtype)
    ct = plan._compiled.get(key)
    if ct is None or ct.tail is not tail:
        ct = plan._compiled[key] = generic.CompiledTail(tail, rows, dtype)
    L = connectivity(h, ct, n_lambda, backend, chunk_bytes=generic.chunk_bytes_for_rows(tail, h.to(dtype), rows))
    plan.compile_info = ct.info()
    return L


def compile_note(plan: Any) -> str:
    """What ``compile=True`` did, for ``plan.ran`` (empty without it)."""
    info = plan.compile_info
    if not plan.compile:
        return ""
    if info is None:
        return "; compile=True not used (no generic torch tail ran: a lowered tail, or the reference)"
    if not info["compiled"]:
        return f"; not compiled: {info.get('why') or info.get('failed') or 'no batch reached the compiled size'}"
    return f"; compiled (torch.compile, {info['rows']} rows per batch, first call {info['first_call_s']:.1f} s)"


def report_affine_shortcut(plan: Any) -> None:
    """:func:`grokfast_metrics.last_run_info` and ``plan.ran`` after the ``L = 1`` shortcut of a known-affine tail: no
    backend ran and no pair was computed (not the previous computation's backend and counts)."""
    n = plan.n
    core._LAST_RUN.clear()
    core._LAST_RUN.update(backend=None, kernel=None, pairs=n * (n - 1) // 2, recomputed=0, fraction_recomputed=0.0, unresolved=0)
    plan.ran = f"{plan.path}, affine: L = 1 exactly, not computed (only affine layers follow {plan.at!r})"


def report_path(plan: Any) -> None:
    """Add the plan's path, its reason and what compiling did to :func:`grokfast_metrics.last_run_info`."""
    core._LAST_RUN.update(path=plan.path, path_reason=plan.reason, ran=plan.ran, compile=plan.compile_info)
