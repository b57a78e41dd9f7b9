"""Grokfast gradient filters (Lee et al. 2024, "Grokfast: Accelerated Grokking by Amplifying Slow Gradients").

Applied between ``loss.backward()`` and ``optimizer.step()``; each parameter's gradient ``g_t``
is replaced in place by ``g_t + lamb * s_t`` where ``s_t`` is a low-pass filter of the gradients:

- ``ema``: ``s_0 = g_0``, ``s_t = alpha * s_{t-1} + (1 - alpha) * g_t``
  (so the first step is amplified by ``1 + lamb``);
- ``ma``: ``s_t = mean(g_{t-w+1}, ..., g_t)`` over the last ``w = window`` gradients; with
  ``warmup`` (the default) nothing is added until ``w`` gradients have been seen.

Parameters without a gradient at a step are skipped (their filter state is not advanced).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import torch
from torch import nn

FILTERS = ("none", "ema", "ma")


def _named(params: nn.Module | Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    if isinstance(params, nn.Module):
        return [(n, p) for n, p in params.named_parameters() if p.requires_grad]
    return list(params)


class EMAFilter:
    """Exponential-moving-average Grokfast filter (``gradfilter_ema``).

    Args:
        alpha: EMA momentum in [0, 1) (Grokfast default 0.98).
        lamb: amplification of the slow component, >= 0 (Grokfast default 2.0).

    Raises:
        ValueError: ``alpha`` not in [0, 1) or ``lamb`` negative.
    """

    def __init__(self, alpha: float = 0.98, lamb: float = 2.0):
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"ema alpha must be in [0, 1); got {alpha}")
        if lamb < 0:
            raise ValueError(f"ema lamb must be >= 0; got {lamb}")
        self.alpha, self.lamb = float(alpha), float(lamb)
        self.state: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, params: nn.Module | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Filter the ``.grad`` of ``params`` (a module or ``(name, tensor)`` pairs) in place."""
        for name, p in _named(params):
            if p.grad is None:
                continue
            g = p.grad
            s = self.state.get(name)
            if s is None:
                s = self.state[name] = g.detach().clone()
            else:
                s.mul_(self.alpha).add_(g, alpha=1.0 - self.alpha)
            g.add_(s, alpha=self.lamb)

    def state_dict(self) -> dict:
        """The filter state (copies), for checkpoints."""
        return {"state": {k: v.detach().clone() for k, v in self.state.items()}}

    def load_state_dict(self, state: dict, device: torch.device | None = None) -> None:
        """Restore :meth:`state_dict` (tensors moved to ``device`` if given)."""
        self.state = {k: v.to(device) if device is not None else v.clone() for k, v in state["state"].items()}


class MAFilter:
    """Windowed moving-average Grokfast filter (``gradfilter_ma``, mean filter).

    Args:
        window: number of recent gradients averaged, >= 1 (Grokfast default 100).
        lamb: amplification of the slow component, >= 0 (Grokfast default 5.0).
        warmup: add nothing until the window is full (Grokfast default True).

    Raises:
        ValueError: ``window`` < 1 or ``lamb`` negative.
    """

    def __init__(self, window: int = 100, lamb: float = 5.0, warmup: bool = True):
        if int(window) < 1:
            raise ValueError(f"ma window must be >= 1; got {window}")
        if lamb < 0:
            raise ValueError(f"ma lamb must be >= 0; got {lamb}")
        self.window, self.lamb, self.warmup = int(window), float(lamb), bool(warmup)
        self.state: dict[str, deque[torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, params: nn.Module | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Filter the ``.grad`` of ``params`` (a module or ``(name, tensor)`` pairs) in place."""
        for name, p in _named(params):
            if p.grad is None:
                continue
            q = self.state.setdefault(name, deque(maxlen=self.window))
            q.append(p.grad.detach().clone())
            if self.warmup and len(q) < self.window:
                continue
            p.grad.add_(torch.stack(list(q)).mean(dim=0), alpha=self.lamb)

    def state_dict(self) -> dict:
        """The filter state (copies of the windows), for checkpoints."""
        return {"state": {k: [g.detach().clone() for g in q] for k, q in self.state.items()}}

    def load_state_dict(self, state: dict, device: torch.device | None = None) -> None:
        """Restore :meth:`state_dict` (tensors moved to ``device`` if given)."""
        self.state = {
            k: deque((g.to(device) if device is not None else g.clone() for g in q), maxlen=self.window) for k, q in state["state"].items()
        }


def make_filter(kind: str, *, ema_alpha: float = 0.98, ema_lamb: float = 2.0, ma_window: int = 100, ma_lamb: float = 5.0):
    """Build a filter by name: ``"none"`` -> ``None``, ``"ema"`` -> :class:`EMAFilter`, ``"ma"`` -> :class:`MAFilter`.

    Raises:
        ValueError: unknown kind or bad filter parameters.
    """
    if kind == "none":
        return None
    if kind == "ema":
        return EMAFilter(ema_alpha, ema_lamb)
    if kind == "ma":
        return MAFilter(ma_window, ma_lamb)
    raise ValueError(f"unknown grokfast filter {kind!r}; choose one of {', '.join(FILTERS)}")
