"""The tail spec every backend reads: the activation table and the normalised MLP tail.

A tail that is a plain ``nn.Sequential`` (possibly nested) of ``nn.Linear`` and the activations of
:data:`ACTIVATIONS` is an *MLP tail*. It is normalised to::

    z = A h + c                      # the leading affine part (Linears before the first
                                     # activation), absorbed: computed once per sample
    x_0 = z_i + lam (z_j - z_i)      # interpolation happens on z (exact by linearity)
    x_l = W_l act_l(x_{l-1}) + b_l   # l = 1..depth, one "stage" per later Linear
    y   = final_act(x_depth)         # optional trailing activation(s)

Any other module is not an MLP tail; it takes the generic path.

:data:`ACTIVATIONS` is the one description of the supported activations: how a module is
recognised, the integer code both fused kernels use (the Triton kernel's ``constexpr`` codes and
the C++ kernel's ``ActCode`` enum are generated from it), the torch function and the float64
NumPy function of the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeGuard

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_SQRT_HALF = math.sqrt(0.5)


def _np_erfc(x: np.ndarray) -> np.ndarray:
    from scipy.special import erfc

    y: np.ndarray = erfc(x)  # (scipy is untyped)
    return y


def _np_sigmoid(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + e^-x)`` without overflow: ``e^x / (1 + e^x)`` for ``x < 0`` (relative accuracy everywhere)."""
    e = np.exp(-np.abs(x))
    y: np.ndarray = np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))  # (numpy types where(c, x, y) as Any)
    return y


# Stable formulas (docs/lmn.md, "Accuracy contract"): GELU as 0.5 x erfc(-x/sqrt 2) (the erf form cancels for very negative x),
# sigmoid and SiLU through e^{-|x|} (no overflow, relative accuracy for both signs), GELU-tanh as
# x sigmoid(2u) (0.5 x (1 + tanh u) cancels for negative u).


@dataclass(frozen=True)
class ActivationKind:
    """One supported elementwise activation.

    Attributes:
        name: the name used everywhere (``Act.name``, kernel codes, error messages).
        code: the integer both fused kernels use for it.
        module: the ``nn.Module`` type that computes it (matched exactly, subclasses are not).
        matches: extra condition on the module (GELU is split by its ``approximate`` flag).
        torch_fn: ``(x, slope, inplace) -> y`` with torch ops.
        numpy_fn: ``(x, slope) -> y`` in float64 NumPy (the reference).
    """

    name: str
    code: int
    module: type[nn.Module]
    torch_fn: Callable[[torch.Tensor, float, bool], torch.Tensor]
    numpy_fn: Callable[[np.ndarray, float], np.ndarray]
    matches: Callable[[nn.Module], bool] = lambda m: True


def _inplace(method: str) -> Callable[[torch.Tensor, float, bool], torch.Tensor]:
    return lambda x, s, inplace: getattr(x, method + ("_" if inplace else ""))()


#: name -> :class:`ActivationKind`, in kernel-code order.
ACTIVATIONS: dict[str, ActivationKind] = {
    k.name: k
    for k in (
        ActivationKind("identity", 0, nn.Identity, lambda x, s, inplace: x, lambda x, s: x),
        ActivationKind("silu", 1, nn.SiLU, lambda x, s, inplace: F.silu(x, inplace=inplace), lambda x, s: x * _np_sigmoid(x)),
        ActivationKind("relu", 2, nn.ReLU, lambda x, s, inplace: F.relu(x, inplace=inplace), lambda x, s: np.maximum(x, 0.0)),
        ActivationKind(
            "gelu",
            3,
            nn.GELU,
            lambda x, s, inplace: 0.5 * x * torch.special.erfc(x * -_SQRT_HALF),
            lambda x, s: 0.5 * x * _np_erfc(-x * _SQRT_HALF),
            matches=lambda m: m.approximate != "tanh",
        ),
        ActivationKind(
            "gelu_tanh",
            4,
            nn.GELU,
            lambda x, s, inplace: x * torch.sigmoid(2.0 * _SQRT_2_OVER_PI * (x + 0.044715 * x**3)),
            lambda x, s: x * _np_sigmoid(2.0 * _SQRT_2_OVER_PI * (x + 0.044715 * x**3)),
            matches=lambda m: m.approximate == "tanh",
        ),
        ActivationKind("tanh", 5, nn.Tanh, _inplace("tanh"), lambda x, s: np.tanh(x)),
        ActivationKind("sigmoid", 6, nn.Sigmoid, _inplace("sigmoid"), lambda x, s: _np_sigmoid(x)),
        ActivationKind(
            "leaky_relu",
            7,
            nn.LeakyReLU,
            lambda x, s, inplace: F.leaky_relu(x, s, inplace=inplace),
            lambda x, s: np.where(x >= 0.0, x, s * x),
        ),
    )
}
#: activations bounded by a constant they saturate to (sigmoid -> 0 / 1, tanh -> -1 / +1)
SATURATING = ("sigmoid", "tanh")
#: activations computed through exp/erfc (relative accuracy only down to the dtype's smallest normal number)
SMOOTH = ("silu", "gelu", "gelu_tanh", "tanh", "sigmoid")


def torch_offset_free(name: str, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``act(x) - c`` for a saturating activation, ``c`` the constant ``act`` saturates to on ``ref``'s side.

    ``ref`` broadcasts against ``x`` and must be constant along the path (e.g. ``x`` at ``t = 0``), so
    ``c`` is constant along it and centring over ``t`` removes it exactly. ``sigmoid(x) - 1 = -sigmoid(-x)``
    and ``tanh(x) -+ 1 = -+2 sigmoid(-+2x)`` keep full relative accuracy on saturated units, where
    ``act(x)`` itself is ``1 - tiny`` and its variation is lost below one ulp.
    """
    if name == "sigmoid":
        return torch.where(ref > 0, -torch.sigmoid(-x), torch.sigmoid(x))
    if name == "tanh":
        return torch.where(ref > 0, -2.0 * torch.sigmoid(-2.0 * x), torch.where(ref < 0, 2.0 * torch.sigmoid(2.0 * x), torch.tanh(x)))
    raise ValueError(name)


def numpy_offset_free(name: str, x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """NumPy twin of :func:`torch_offset_free` (float64)."""
    if name == "sigmoid":
        return np.where(ref > 0, -_np_sigmoid(-x), _np_sigmoid(x))
    if name == "tanh":
        return np.where(ref > 0, -2.0 * _np_sigmoid(-2.0 * x), np.where(ref < 0, 2.0 * _np_sigmoid(2.0 * x), np.tanh(x)))
    raise ValueError(name)


#: activation name -> kernel code (what both fused kernels are compiled with).
ACT_CODES: dict[str, int] = {k.name: k.code for k in ACTIVATIONS.values()}


@dataclass(frozen=True)
class Act:
    """An elementwise activation of a tail. ``slope`` is only used by ``leaky_relu``."""

    name: str
    slope: float = 0.0

    @property
    def is_identity(self) -> bool:
        return self.name == "identity"

    @property
    def code(self) -> int:
        """The fused kernels' code for this activation."""
        return ACTIVATIONS[self.name].code

    def torch(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Apply it to ``x`` with torch ops (in place when ``inplace`` and the op allows it)."""
        return ACTIVATIONS[self.name].torch_fn(x, self.slope, inplace)

    def numpy(self, x: np.ndarray) -> np.ndarray:
        """Apply it to a float64 array (the reference's formula)."""
        return ACTIVATIONS[self.name].numpy_fn(x, self.slope)


IDENTITY = Act("identity")


def activation_of(m: nn.Module) -> Act | None:
    """The :class:`Act` an activation module computes, or ``None`` if it is not one of :data:`ACTIVATIONS`."""
    for kind in ACTIVATIONS.values():
        if type(m) is kind.module and kind.matches(m):
            return Act(kind.name, float(m.negative_slope) if isinstance(m, nn.LeakyReLU) else 0.0)
    return None


def is_plain_sequential(m: nn.Module) -> TypeGuard[nn.Sequential]:
    """True for an ``nn.Sequential`` whose forward is the plain chain (not a subclass overriding it)."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


@dataclass
class MLPTail:
    """Normalised MLP tail (see module docstring). Weights are the module's own (never copied).

    Attributes:
        pre: leading Linears absorbed into ``z`` (applied in order; may be empty).
        stages: ``(acts, linear)`` pairs applied after interpolation.
        final: activations applied after the last Linear (usually empty).
        in_features: width of ``h`` the tail expects (that of its first Linear), ``None`` if it has none.
        select: ``(lo, hi)``: the tail reads only the columns ``h[:, lo:hi]`` (a lowered transformer tail reading one
            position); ``None``: all of ``h``.
        skip: ``(O, hi - lo)`` float64 matrix of a skip term ``u = W_skip h[:, lo:hi]`` added to the output (a lowered
            residual connection; it enters each pair as ``lam (u_j - u_i)``, exact); ``None``: no skip.
        exact: the float64 twin of this spec (folded weights never rounded to float32) used by the fp64 recompute,
            or ``None`` (the weights themselves are exact).
    """

    pre: list[nn.Linear] = field(default_factory=list)
    stages: list[tuple[list[Act], nn.Linear]] = field(default_factory=list)
    final: list[Act] = field(default_factory=list)
    in_features: int | None = None
    select: tuple[int, int] | None = None
    skip: torch.Tensor | None = None
    exact: MLPTail | None = None

    def selected(self, h: torch.Tensor) -> torch.Tensor:
        """The columns of ``h`` the tail reads (``h`` itself unless :attr:`select` is set)."""
        return h if self.select is None else h[:, self.select[0] : self.select[1]]

    def skip_values(self, h: torch.Tensor) -> torch.Tensor | None:
        """``u = W_skip h_sel`` in float64 on ``h``'s device, ``(N, O)`` (``None`` without a skip term)."""
        if self.skip is None:
            return None
        x = self.selected(h.detach()).to(torch.float64)
        return (x @ self.skip.to(device=x.device, dtype=torch.float64).t()).contiguous()

    @property
    def activations(self) -> list[Act]:
        """Every activation after the absorbed part, stage by stage, then the final ones."""
        return [a for acts, _ in self.stages for a in acts] + list(self.final)

    @property
    def is_affine(self) -> bool:
        """True when the tail is an affine map (every activation is the identity)."""
        return all(a.is_identity for a in self.activations)

    @property
    def out_features(self) -> int | None:
        if self.stages:
            return self.stages[-1][1].out_features
        if self.pre:
            return self.pre[-1].out_features
        return None

    def absorb(self, h: torch.Tensor) -> torch.Tensor:
        """``z``: ``h`` through the leading (absorbed) affine layers, in ``h``'s dtype. ``(N, H0)``.

        Interpolating ``h`` and then applying an affine map equals interpolating ``z``, so every fused
        path interpolates ``z`` and saves the first Linear per interpolation point.
        """
        z = self.selected(h)
        for lin in self.pre:  # (a lowered tail's float64 twin keeps its weights on the CPU: moved to h's device)
            w, b = lin.weight.to(device=h.device, dtype=h.dtype), lin.bias
            z = F.linear(z, w, None if b is None else b.to(device=h.device, dtype=h.dtype))
        return z

    def absorb_rounded_once(self, h: torch.Tensor) -> torch.Tensor:
        """``z`` computed in float64 (a lowered tail: through its float64 :attr:`exact` twin) and rounded once to
        ``h``'s dtype. An ``h`` carrying a large component that the absorbed Linear cancels (a residual stream's offset,
        an offset on which the Linear's rows sum to 0) then keeps ``z`` accurate relative to ``|z|``, which is all a
        fused path's error estimate sees (absorbed in fp32, ``h + 1e3`` read 3.6e-4 off, unflagged). The fused CPU
        kernel does the same through its own GEMM (``kernels.cpu_fused.absorb_f64``)."""
        src = self if self.exact is None else self.exact
        if h.dtype == torch.float64 and src is self:
            return self.absorb(h)
        return src.absorb(h.to(torch.float64)).to(h.dtype)


def _flatten(module: nn.Module) -> list[nn.Module] | None:
    """The leaves of nested plain Sequentials, or ``None`` if a container overrides its forward."""
    if not isinstance(module, nn.Sequential):
        return [module]
    if not is_plain_sequential(module):
        return None
    out: list[nn.Module] = []
    for m in module:
        leaves = _flatten(m)
        if leaves is None:
            return None
        out.extend(leaves)
    return out


def parse_tail(tail: nn.Module) -> MLPTail | None:
    """Normalise ``tail`` to an :class:`MLPTail`, or return ``None`` if it is not an MLP tail.

    ``nn.Linear`` on its own and (nested) plain ``nn.Sequential`` of ``nn.Linear`` and the
    activations of :data:`ACTIVATIONS` qualify. Subclasses of ``nn.Sequential`` with their own
    ``forward`` do not.
    """
    lowered = getattr(tail, "lowered_spec", None)  # a tail lowered from a traced graph (grokfast_metrics.dropin.lower)
    if isinstance(lowered, MLPTail):
        return lowered
    layers = _flatten(tail)
    if not layers:
        return None
    spec = MLPTail()
    pending: list[Act] = []
    for m in layers:
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
        if act is None:
            return None
        pending.append(act)
    spec.final = [a for a in pending if not a.is_identity]
    return spec


def _layer_kinds(tail: nn.Module) -> list[nn.Linear | Act]:
    """The tail's layers (nested plain Sequentials flattened), each an ``nn.Linear`` or the :class:`Act` it computes.

    Raises:
        ValueError: the tail contains something other than ``nn.Linear`` and :data:`ACTIVATIONS`.
    """
    out: list[nn.Linear | Act] = []
    for m in _flatten(tail) or [tail]:  # a Sequential overriding its forward (or an empty one) is refused whole
        if type(m) is nn.Linear:
            out.append(m)
            continue
        act = activation_of(m)
        if act is None:
            raise ValueError(
                f"the reference backend runs nn.Linear and elementwise activations ({', '.join(ACTIVATIONS)}) only; got {type(m).__name__}"
            )
        out.append(act)
    return out


def _numpy_linear(lin: nn.Linear) -> Callable[[np.ndarray], np.ndarray]:
    W = lin.weight.detach().cpu().double().numpy()
    b = None if lin.bias is None else lin.bias.detach().cpu().double().numpy()
    return lambda x: x @ W.T + (0.0 if b is None else b)


def _numpy_fn(layer: nn.Linear | Act) -> Callable[[np.ndarray], np.ndarray]:
    return _numpy_linear(layer) if isinstance(layer, nn.Linear) else layer.numpy


def numpy_layers(tail: nn.Module) -> list[Callable[[np.ndarray], np.ndarray]]:
    """The tail, layer by layer, as float64 NumPy callables (the reference runs these, nothing absorbed).

    Raises:
        ValueError: the tail contains something other than ``nn.Linear`` and :data:`ACTIVATIONS`.
    """
    return [_numpy_fn(layer) for layer in _layer_kinds(tail)]


@dataclass
class NumpyTail:
    """The tail split for the centred evaluation of every backend (float64 NumPy, nothing absorbed).

    ``body`` runs literally; when ``last`` is set (the tail ends in a Linear with no activation after it)
    the output is taken centred over ``t`` as ``(a - mean_t a) W^T`` (r2 is shift invariant: the bias and
    any offset shared along the path never enter). ``sat`` names the saturating activation just before
    ``last`` (sigmoid/tanh) whose output is taken offset free (:func:`numpy_offset_free`); then ``body``
    stops at its input. ``final`` is the literal remainder when the tail ends in an activation.
    """

    body: list[Callable[[np.ndarray], np.ndarray]]
    last: tuple[np.ndarray, np.ndarray | None] | None
    sat: str | None
    final: list[Callable[[np.ndarray], np.ndarray]]


def numpy_tail(tail: nn.Module) -> NumpyTail:
    """Split :func:`numpy_layers` for the centred evaluation (see :class:`NumpyTail`)."""
    layers = _layer_kinds(tail)
    fns = [_numpy_fn(layer) for layer in layers]
    linears = [(k, m) for k, m in enumerate(layers) if isinstance(m, nn.Linear)]
    if not linears:
        return NumpyTail(fns, None, None, [])
    last_lin, lin = linears[-1]
    if any(isinstance(a, Act) and not a.is_identity for a in layers[last_lin + 1 :]):
        return NumpyTail(fns, None, None, [])
    W = lin.weight.detach().cpu().double().numpy()
    b = None if lin.bias is None else lin.bias.detach().cpu().double().numpy()
    body = fns[:last_lin]
    prev = [(k, m) for k, m in enumerate(layers[:last_lin]) if not (isinstance(m, Act) and m.is_identity)]
    sat = None
    if prev:
        k_sat, before = prev[-1]
        if isinstance(before, Act) and before.name in SATURATING:
            sat = before.name
            body = [f for k, f in enumerate(fns[:last_lin]) if k != k_sat]  # identities after it are no-ops
    return NumpyTail(body, (W, b), sat, [])
