"""The ill-conditioned regimes (docs/lmn.md, "Accuracy contract"), built small
(shared by tests/compute/test_ill_conditioned.py and the fuzz run).

Every builder returns ``(h, tail)`` in fp32 (``dtype`` to change): ``h`` ``(N, D)`` and an MLP tail.
"""

from __future__ import annotations

import torch
from torch import nn


def _lin(a: int, b: int, g: torch.Generator, gain: float = 1.0, bias: float = 0.5) -> nn.Linear:
    lin = nn.Linear(a, b)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(b, a, generator=g) * gain / a**0.5)
        lin.bias.copy_(torch.randn(b, generator=g) * bias)
    return lin


def paper_tail(
    d: int = 100,
    hid: int = 100,
    o: int = 31,
    act: type[nn.Module] = nn.SiLU,
    seed: int = 0,
    offset: float = 0.0,
    shift: float = 0.0,
    out_gain: float = 1.0,
) -> nn.Sequential:
    """``Linear(d, hid) - act - Linear(hid, o)``: the paper's tail after the absorbed first Linear.

    ``offset`` is added to every logit (a shared shift), ``shift`` to every pre-activation.
    """
    g = torch.Generator().manual_seed(seed)
    first, last = _lin(d, hid, g, 1.5), _lin(hid, o, g, out_gain)
    with torch.no_grad():
        first.bias += shift
        last.bias += offset
    return nn.Sequential(first, act(), last)


def regime(name: str, n: int = 12, seed: int = 0, small: bool = True, dtype: torch.dtype = torch.float32):
    """``(h, tail)`` of a named regime; ``small`` uses widths the exact yardstick can afford (d=6, H=16, O=5)."""
    d, hid, o = (6, 16, 5) if small else (100, 100, 31)
    g = torch.Generator().manual_seed(seed + 1000)
    h = torch.randn(n, d, generator=g)
    kind, _, arg = name.partition(":")
    v = float(arg) if arg else 0.0
    if kind == "well":
        tail = paper_tail(d, hid, o, seed=seed)
    elif kind == "offset":  # a logit offset shared by all classes
        tail = paper_tail(d, hid, o, seed=seed, offset=v)
    elif kind == "shift":  # SiLU pre-activations shifted by v (very negative: outputs ~ x e^x)
        tail = paper_tail(d, hid, o, seed=seed, shift=v)
    elif kind == "near":  # representations within v of each other
        h = h[:1] + v * torch.randn(n, d, generator=g)
        tail = paper_tail(d, hid, o, seed=seed)
    elif kind in ("sat_tanh", "sat_sigmoid"):  # 1-2 saturated hidden units (pre-activation ~ v) carry the output
        act = nn.Tanh if kind == "sat_tanh" else nn.Sigmoid
        tail = paper_tail(d, 2, o, act=act, seed=seed)
        with torch.no_grad():
            tail[0].weight.mul_(0.5)
            tail[0].bias.copy_(torch.tensor([v, v + 1.0]))
    elif kind == "late":  # late in training: logits up to ~1e3, mostly a shared shift
        tail = paper_tail(d, hid, o, seed=seed, offset=v or 1000.0, out_gain=10.0)
    elif kind == "sigmoid_o1":  # the Triton seed case: sigmoid, O = 1, D = 12, H = 70
        h = torch.randn(n, 12, generator=g)
        tail = paper_tail(12, 70, 1, act=nn.Sigmoid, seed=seed)
    else:
        raise ValueError(name)
    return h.to(dtype), tail.to(dtype)


#: the regimes of the issue's table
REGIMES = [
    "well",
    "offset:1e3",
    "offset:1e4",
    "offset:1e5",
    "shift:-12",
    "shift:-16",
    "shift:-20",
    "near:1e-2",
    "near:1e-3",
    "near:1e-5",
    "sat_tanh:6",
    "sat_tanh:9",
    "sat_sigmoid:8",
    "sat_sigmoid:14",
    "late",
    "sigmoid_o1",
]
