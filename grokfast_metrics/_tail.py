"""Turn a tail module into the layer list the fast paths run.

A tail that is an ``nn.Sequential`` (possibly nested) of ``nn.Linear`` and the supported
elementwise activations is an *MLP tail*. It is normalised to::

    z = A h + c                      # the leading affine part (Linears before the first
                                     # activation), absorbed: computed once per sample
    x_0 = z_i + lam (z_j - z_i)      # interpolation happens on z (exact by linearity)
    x_l = W_l act_l(x_{l-1}) + b_l   # l = 1..depth, one "stage" per later Linear
    y   = final_act(x_depth)         # optional trailing activation(s)

Any other module is not an MLP tail; it takes the generic path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

#: activation name -> how it is recognised. GELU is split by its ``approximate`` flag.
ACTIVATIONS = ("identity", "silu", "relu", "gelu", "gelu_tanh", "tanh", "sigmoid", "leaky_relu")


@dataclass(frozen=True)
class Act:
    """An elementwise activation. ``slope`` is only used by ``leaky_relu``."""

    name: str
    slope: float = 0.0

    @property
    def is_identity(self) -> bool:
        return self.name == "identity"


IDENTITY = Act("identity")


@dataclass
class MLPTail:
    """Normalised MLP tail (see module docstring). Weights are detached views of the module's.

    Attributes:
        pre: leading Linears absorbed into ``z`` (applied in order; may be empty).
        stages: ``(act, linear)`` pairs applied after interpolation.
        final: activations applied after the last Linear (usually empty).
        in_features: width of ``h`` the tail expects (that of its first Linear), ``None`` if it has none.
    """

    pre: list[nn.Linear] = field(default_factory=list)
    stages: list[tuple[list[Act], nn.Linear]] = field(default_factory=list)
    final: list[Act] = field(default_factory=list)
    in_features: int | None = None

    @property
    def is_affine(self) -> bool:
        """True when the tail is an affine map (every activation is the identity)."""
        acts = [a for acts, _ in self.stages for a in acts] + self.final
        return all(a.is_identity for a in acts)

    @property
    def out_features(self) -> int | None:
        if self.stages:
            return self.stages[-1][1].out_features
        if self.pre:
            return self.pre[-1].out_features
        return None


def _flatten(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        out: list[nn.Module] = []
        for m in module:
            out.extend(_flatten(m))
        return out
    return [module]


def activation_of(m: nn.Module) -> Act | None:
    """The :class:`Act` an activation module computes, or ``None`` if it is not supported."""
    if isinstance(m, nn.Identity):
        return IDENTITY
    if isinstance(m, nn.SiLU):
        return Act("silu")
    if isinstance(m, nn.ReLU):
        return Act("relu")
    if isinstance(m, nn.GELU):
        return Act("gelu_tanh" if m.approximate == "tanh" else "gelu")
    if isinstance(m, nn.Tanh):
        return Act("tanh")
    if isinstance(m, nn.Sigmoid):
        return Act("sigmoid")
    if isinstance(m, nn.LeakyReLU):
        return Act("leaky_relu", float(m.negative_slope))
    return None


def parse_tail(tail: nn.Module) -> MLPTail | None:
    """Normalise ``tail`` to an :class:`MLPTail`, or return ``None`` if it is not an MLP tail.

    ``nn.Linear`` on its own and (nested) ``nn.Sequential`` of ``nn.Linear`` and the supported
    activations qualify. Subclasses of ``nn.Sequential`` with their own ``forward`` do not.
    """
    if isinstance(tail, nn.Sequential) and type(tail).forward is not nn.Sequential.forward:
        return None
    layers = _flatten(tail)
    if not layers:
        return None
    spec = MLPTail()
    pending: list[Act] = []
    for m in layers:
        if isinstance(m, nn.Sequential) and type(m).forward is not nn.Sequential.forward:
            return None
        if type(m) is nn.Linear:
            if spec.in_features is None:
                spec.in_features = m.in_features
            if not spec.stages and all(a.is_identity for a in pending):
                spec.pre.append(m)
            else:
                spec.stages.append(([a for a in pending if not a.is_identity] or [IDENTITY], m))
            pending = []
            continue
        act = activation_of(m)
        if act is None or type(m) not in _ACT_TYPES:
            return None
        pending.append(act)
    spec.final = [a for a in pending if not a.is_identity]
    return spec


_ACT_TYPES = (nn.Identity, nn.SiLU, nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU)


def apply_act(x: torch.Tensor, act: Act, inplace: bool = False) -> torch.Tensor:
    """Apply ``act`` to ``x`` with torch ops (in place when ``inplace``)."""
    F = torch.nn.functional
    n = act.name
    if n == "identity":
        return x
    if n == "silu":
        return F.silu(x, inplace=inplace)
    if n == "relu":
        return F.relu(x, inplace=inplace)
    if n == "gelu":
        return F.gelu(x)
    if n == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if n == "tanh":
        return x.tanh_() if inplace else x.tanh()
    if n == "sigmoid":
        return x.sigmoid_() if inplace else x.sigmoid()
    if n == "leaky_relu":
        return F.leaky_relu(x, act.slope, inplace=inplace)
    raise ValueError(f"unknown activation {n!r}")
