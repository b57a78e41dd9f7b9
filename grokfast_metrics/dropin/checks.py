"""What a :class:`~grokfast_metrics.dropin.plan.Plan` checks, as functions: the cut check (the pairs it mixes, its error
and tolerance), a split tail's agreement with the model's outputs, how affine a split tail is, a tail that reads one
position, the layout hints of its error messages, and ``L = 1`` of an affine tail."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from ..foundation.errors import NonFiniteOutputError
from .hooks import _Selector
from .split import _AFFINE, _graph_kind

#: samples used by the cut check (pairs ``(i, i+1 mod k)`` among the first ``k`` samples).
CUT_CHECK_SAMPLES = 8


def _cut_error(
    run_mixed: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], y: torch.Tensor, idx_src: torch.Tensor, idx_dst: torch.Tensor
) -> float:
    """Max |model(input i, activation j) - model(input j)| over the pairs, relative to max |logits|."""
    y_mix = run_mixed(idx_src, idx_dst)
    ref = y.index_select(0, idx_dst)
    scale = float(ref.abs().max()) or 1.0
    return float((y_mix.to(ref.dtype) - ref).abs().max()) / scale


def _cut_rtol(dtype: torch.dtype) -> float:
    # batched GEMMs of different batch sizes differ by rounding only (~1e-6 relative in fp32);
    # a bypassing skip connection changes the logits by as much as two samples differ (~1e-1).
    # fp16/bf16 logits get a few ulps of their own precision.
    eps = torch.finfo(dtype).eps
    return 1e-9 if eps < 1e-10 else max(1e-4, 4 * eps)


def _pairs(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    k = min(n, CUT_CHECK_SAMPLES)
    dst = torch.arange(k, device=device)
    return torch.roll(dst, 1), dst  # input of sample i-1, activation of sample i


def _read_at_one_position(gm: fx.GraphModule) -> tuple[fx.GraphModule, tuple[int, int]] | None:
    """When the pruned tail reads its input ``h`` only through ``h.narrow(k, p, 1)`` (one ``(k, p)``): a copy
    taking that slice as its input, and ``(k, p)``; else None."""
    import copy

    g = copy.deepcopy(gm.graph)
    ph = next(n for n in g.nodes if n.op == "placeholder")
    users = list(ph.users)
    keys = {tuple(u.args[1:]) if u.op == "call_method" and u.target == "narrow" and not u.kwargs else None for u in users}
    key = next(iter(keys)) if len(keys) == 1 else None
    if key is None or len(key) != 3 or key[2] != 1:
        return None
    k, p, _ = key
    if not (isinstance(k, int) and isinstance(p, int)):  # a position computed in the graph: not one known position
        return None
    for u in users:
        u.replace_all_uses_with(ph)
        g.erase_node(u)
    try:
        return fx.GraphModule(gm, g), (k, p)
    except Exception:
        return None


def _tail_kind(gm: fx.GraphModule) -> int:
    """How affine a split tail is, seen through the user's modules (TransformerLens' ``Unembed``: ``x @ W_U``)."""
    from .prune import _deep_trace

    kind = _graph_kind(gm)
    if kind > _AFFINE:
        deep = _deep_trace(gm)
        if deep is not None:
            kind = _graph_kind(deep)
    return kind


def _samples_hint(act: torch.Tensor, at: str, batch_dim: int, rows: int) -> str:
    """Where the selected logits have ``rows`` samples and the activation at ``at`` has them along another axis
    than ``batch_dim``: pass ``batch_dim`` (the inputs follow it unless ``input_batch_dim`` says otherwise)."""
    axes = [d for d in range(act.dim()) if act.shape[d] == rows and d != batch_dim]
    if rows < 0 or not axes:
        return ""
    return (
        f" The activation at {at!r} ({tuple(act.shape)}) has {rows} along axis {axes[0]}: if the samples are "
        f"there, pass batch_dim={axes[0]} (e.g. a sequence-first model fed (seq, batch) tokens; "
        "input_batch_dim defaults to batch_dim)."
    )


def _rows(out: Any, output: _Selector) -> int:
    try:
        y = out if output is None else (out[output] if isinstance(output, int) else output(out))
        return int(y.shape[0])
    except Exception:
        return -1


def _device_type(args: tuple[torch.Tensor, ...]) -> str:
    return args[0].device.type


def _agrees(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    scale = float(b.abs().max()) or 1.0
    return float((a.to(b.dtype) - b).abs().max()) / scale <= _cut_rtol(b.dtype)


def _ones_if_finite(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``L = 1`` for an affine tail, in the dtype ``connectivity`` would return; NaN/Inf logits raise as there."""
    if not bool(torch.isfinite(y).all()):
        raise NonFiniteOutputError(
            "the model's outputs on the probe are NaN/Inf: the model has diverged or overflows its dtype, and LMN is undefined there"
        )
    dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    return torch.ones(h.shape[0], h.shape[0], dtype=dtype, device=h.device)


def why_not_chain(plan: Any, act: torch.Tensor) -> str:
    """Why the chain path does not apply (one clause)."""
    if plan.output is not None:
        return "not a chain: output= selects the logits"
    if plan.batch_dim != 0:
        return "not a chain: batch_dim != 0"
    if act.dim() != 2:
        return f"not a chain: {plan.at!r} outputs a {act.dim()}-D activation"
    return f"not a chain: {plan.at!r} is not in plain nn.Sequential chains"
