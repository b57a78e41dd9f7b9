"""The symbolic interpreter behind :mod:`.lower`: it runs a traced tail's graph on values that say how they depend on
the representation (:class:`_Sym`: an affine map of it, with at most one hidden layer of elementwise activations), folding
consecutive affine maps in float64, and raises :class:`NotLowerable` with the reason where the graph leaves that form.
The traces it needs are cached per module (:data:`_TRACES`).
"""

from __future__ import annotations

import operator
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..foundation.tail import Act, activation_of

#: a value of the interpreter: a :class:`_Sym` (it depends on the representation) or a constant the graph computes
#: (a tensor, a number, a tuple of values, ...), as loosely typed as the graph itself
_Value = Any


class NotLowerable(Exception):
    """Raised inside the interpreter; the message is the reason the tail keeps the generic path."""


@dataclass
class _Hidden:
    """One hidden layer: ``act(A x_pos + c)`` at each of its positions (``pos``, ``c``: flattened positions)."""

    A: torch.Tensor  # (H, F_in)
    c: torch.Tensor  # (n_pos, H)
    pos: torch.Tensor  # (n_pos,) input position of each of its positions
    acts: list[Act]


@dataclass
class _Sym:
    """A per-sample value of shape ``(*P, F)`` (batch axis 0 in the graph): ``Wh hidden + A x_pos + c``.

    ``pos`` (shape ``P``) is the input position each position reads, ``hidx`` (shape ``P``) the hidden layer's
    position it uses; ``A`` (F, F_in) or None, ``c`` (*P, F), ``Wh`` (F, H) or None.
    """

    pos: torch.Tensor
    A: torch.Tensor | None
    c: torch.Tensor
    hid: _Hidden | None = None
    Wh: torch.Tensor | None = None
    hidx: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.c.shape[-1]

    def hidden(self) -> tuple[_Hidden, torch.Tensor, torch.Tensor] | None:
        """``(hid, Wh, hidx)`` when a hidden layer reaches this value (every constructor sets the three together)."""
        if self.hid is None:
            return None
        assert self.Wh is not None and self.hidx is not None, "hid, Wh and hidx are set together"
        return self.hid, self.Wh, self.hidx

    def affine_map(self, W: torch.Tensor, b: torch.Tensor | None) -> _Sym:
        """``x W^T + b`` on the feature axis."""
        if W.dim() != 2 or W.shape[1] != self.width:
            raise NotLowerable(f"a linear map of shape {tuple(W.shape)} does not fit width {self.width}")
        c = self.c @ W.t() + (0.0 if b is None else b)
        return _Sym(self.pos, None if self.A is None else W @ self.A, c, self.hid, None if self.Wh is None else W @ self.Wh, self.hidx)

    def scale(self, v: torch.Tensor) -> _Sym:
        """Elementwise product with a constant broadcasting over the feature axis only (a scalar or ``(F,)``)."""
        if v.numel() == 1:
            v = v.reshape(())
            return _Sym(
                self.pos, None if self.A is None else v * self.A, v * self.c, self.hid, None if self.Wh is None else v * self.Wh, self.hidx
            )
        if v.dim() >= 1 and v.shape[-1] == self.width and v.numel() == self.width:
            v = v.reshape(-1)
            return _Sym(
                self.pos,
                None if self.A is None else v[:, None] * self.A,
                v * self.c,
                self.hid,
                None if self.Wh is None else v[:, None] * self.Wh,
                self.hidx,
            )
        raise NotLowerable(f"a product with a constant of shape {tuple(v.shape)} (only scalars and per-feature)")


_ACT_FUNCS = {
    F.relu: "relu",
    torch.relu: "relu",
    F.silu: "silu",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    F.gelu: "gelu",
    F.leaky_relu: "leaky_relu",
}
_ACT_METHODS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}
_NOOP_METHODS = {"contiguous", "clone", "float", "double", "to", "detach"}
_NORMS = tuple(
    t
    for t in (
        getattr(nn, "LayerNorm", None),
        getattr(nn, "RMSNorm", None),
        getattr(nn, "GroupNorm", None),
        getattr(nn, "BatchNorm1d", None),
    )
    if t is not None
)


def _is_identity_module(m: nn.Module) -> bool:
    return isinstance(m, (nn.Identity, nn.Dropout)) or type(m).__name__ == "HookPoint"


class _Interp:
    """Symbolic interpreter of an fx graph over :class:`_Sym` values (see the module docstring)."""

    def __init__(self, in_positions: int, in_width: int):
        self.S, self.F_in = in_positions, in_width

    def input(self, has_pos: bool) -> _Sym:
        pos = torch.arange(self.S) if has_pos else torch.zeros((), dtype=torch.long)
        shape = (self.S, self.F_in) if has_pos else (self.F_in,)
        return _Sym(pos, torch.eye(self.F_in, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64))

    # ---------------------------------------------------------------------------------- graphs
    def run_graph(self, gm: fx.GraphModule, args: list[_Value]) -> _Value:
        env: dict[fx.Node, _Value] = {}
        placeholders = iter(args)
        result = None
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                try:
                    env[n] = next(placeholders)
                except StopIteration:
                    if n.args:  # a default value
                        env[n] = n.args[0]
                    else:
                        raise NotLowerable(f"graph input {n.name!r} has no value") from None
            elif n.op == "get_attr":
                env[n] = _const(_fetch(gm, str(n.target)))  # (the target of get_attr, call_module, call_method: a name)
            elif n.op == "output":
                result = _map(n.args[0], env)
            else:
                a = _map(n.args, env)
                kw = _map(n.kwargs, env)
                if n.op == "call_module":
                    env[n] = self.module(gm.get_submodule(str(n.target)), str(n.target), a, kw)
                elif n.op == "call_function":
                    env[n] = self.function(n.target, a, kw)
                else:
                    env[n] = self.method(str(n.target), a, kw)
        return result

    def module(self, m: nn.Module, name: str, a: tuple[_Value, ...], kw: dict[str, _Value]) -> _Value:
        if len(a) != 1 or kw:
            return self.trace_through(m, name, a, kw)
        x = a[0]
        if not isinstance(x, _Sym):
            raise NotLowerable(f"module {name!r} is applied to a constant")
        if _is_identity_module(m):
            return x
        if type(m) is nn.Linear:
            return x.affine_map(_f64(m.weight), None if m.bias is None else _f64(m.bias))
        act = activation_of(m)
        if act is not None:
            return self.activate(x, act)
        if isinstance(m, _NORMS):
            raise NotLowerable(
                f"{type(m).__name__} {name!r} follows the cut: it divides by the path's own standard "
                "deviation (not affine along the path), so the tail is not an MLP"
            )
        if isinstance(m, nn.MultiheadAttention):
            raise NotLowerable(f"attention ({name!r}) follows the cut")
        return self.trace_through(m, name, a, kw)

    def trace_through(self, m: nn.Module, name: str, a: tuple[_Value, ...] | list[_Value], kw: dict[str, _Value]) -> _Value:
        class _Tracer(fx.Tracer):
            def is_leaf_module(self, mod: nn.Module, qualname: str) -> bool:
                return (
                    type(mod) is nn.Linear
                    or activation_of(mod) is not None
                    or _is_identity_module(mod)
                    or isinstance(mod, (*_NORMS, nn.MultiheadAttention))
                )

        if kw:
            raise NotLowerable(f"module {name!r} is called with keyword arguments")
        graph = _traced(m, _Tracer, name)
        return self.run_graph(fx.GraphModule(m, graph), list(a))

    # ---------------------------------------------------------------------------------- ops
    def activate(self, x: _Sym, act: Act) -> _Sym:
        if act.is_identity:
            return x
        if x.hid is not None:
            if x.A is None and x.Wh is not None and _is_eye(x.Wh) and not bool(x.c.any()):
                hid = _Hidden(x.hid.A, x.hid.c, x.hid.pos, [*x.hid.acts, act])  # act(act'(...)): same hidden layer
                return _Sym(x.pos, None, x.c, hid, x.Wh, x.hidx)
            raise NotLowerable("more than one nonlinear layer follows the cut (one hidden layer is lowered)")
        if x.A is None:
            raise NotLowerable("an activation of a constant")
        shape = x.pos.shape
        n_pos = max(1, x.pos.numel())
        hid = _Hidden(x.A, x.c.reshape(n_pos, x.width), x.pos.reshape(-1), [act])
        hidx = torch.arange(n_pos).reshape(shape)
        return _Sym(x.pos, None, torch.zeros_like(x.c), hid, torch.eye(x.width, dtype=torch.float64), hidx)

    def add(self, x: _Value, y: _Value, sign: float = 1.0) -> _Value:
        if not isinstance(x, _Sym):
            if not isinstance(y, _Sym):
                return _const(x) + sign * _const(y)
            return self.add(y.scale(torch.tensor(sign, dtype=torch.float64)), x)
        if not isinstance(y, _Sym):
            c = _const(y) * sign
            if c.dim() > x.c.dim() or any(s not in (1, t) for s, t in zip(c.shape[::-1], x.c.shape[::-1])):
                raise NotLowerable(
                    f"a constant of shape {tuple(c.shape)} added to a value of per-sample shape "
                    f"{tuple(x.c.shape)} (it would broadcast over the batch)"
                )
            return _Sym(x.pos, x.A, x.c + c, x.hid, x.Wh, x.hidx)
        if x.pos.shape != y.pos.shape or not torch.equal(x.pos, y.pos):
            raise NotLowerable("a sum of values at different positions (positions are mixed)")
        if x.width != y.width:
            raise NotLowerable("a sum of values of different widths")
        hid, Wh, hidx = x.hid, x.Wh, x.hidx
        hx, hy = x.hidden(), y.hidden()
        if hy is not None:
            if hx is None:
                hid, Wh, hidx = hy[0], sign * hy[1], hy[2]
            elif hx[0] is not hy[0] or not torch.equal(hx[2], hy[2]):
                raise NotLowerable("a sum of two different hidden layers (more than one MLP after the cut)")
            else:
                Wh = hx[1] + sign * hy[1]
        A = x.A if y.A is None else (sign * y.A if x.A is None else x.A + sign * y.A)
        return _Sym(x.pos, A, x.c + sign * y.c, hid, Wh, hidx)

    def function(self, f: Callable[..., Any], a: tuple[_Value, ...], kw: dict[str, _Value]) -> _Value:
        if f in (operator.add, torch.add) and len(a) == 2 and not kw:
            return self.add(a[0], a[1])
        if f in (operator.sub, torch.sub) and len(a) == 2 and not kw:
            return self.add(a[0], a[1], -1.0)
        if f in (operator.neg, torch.neg):
            return a[0].scale(torch.tensor(-1.0, dtype=torch.float64)) if isinstance(a[0], _Sym) else -_const(a[0])
        if f in (operator.mul, torch.mul) and len(a) == 2:
            return self.mul(a[0], a[1])
        if f in (operator.truediv, torch.div) and len(a) == 2 and not kw and isinstance(a[0], _Sym) and not isinstance(a[1], _Sym):
            return a[0].scale(1.0 / _const(a[1]))
        if f in (operator.matmul, torch.matmul) and isinstance(a[0], _Sym) and not isinstance(a[1], _Sym):
            W = _const(a[1])
            if W.dim() != 2:
                raise NotLowerable(f"a matmul with a constant of shape {tuple(W.shape)}")
            return a[0].affine_map(W.t(), None)
        if f is F.linear and isinstance(a[0], _Sym):
            b = a[2] if len(a) > 2 else kw.get("bias")
            return a[0].affine_map(_const(a[1]), None if b is None else _const(b))
        if f is torch.einsum:
            return self.einsum(a)
        if f is operator.getitem:
            return self.getitem(a[0], a[1])
        if f in _ACT_FUNCS and isinstance(a[0], _Sym):
            name = _ACT_FUNCS[f]
            if name == "gelu" and kw.get("approximate", "none") == "tanh":
                name = "gelu_tanh"
            slope = float(a[1] if len(a) > 1 else kw.get("negative_slope", 0.01)) if name == "leaky_relu" else 0.0
            return self.activate(a[0], Act(name, slope))
        if not any(isinstance(v, _Sym) for v in list(a) + list(kw.values())):
            try:  # constants only (e.g. a scale computed from a shape): evaluate in float64
                return f(*a, **kw)
            except Exception as e:
                raise NotLowerable(f"{getattr(f, '__name__', f)} on constants failed: {e}") from None
        raise NotLowerable(f"{getattr(f, '__name__', repr(f))} of the representation is not an MLP operation")

    def method(self, name: str, a: tuple[_Value, ...], kw: dict[str, _Value]) -> _Value:
        x = a[0]
        if not isinstance(x, _Sym):
            try:
                return getattr(_const(x), name)(*a[1:], **kw)
            except Exception as e:
                raise NotLowerable(f".{name}() on a constant failed: {e}") from None
        if name in _NOOP_METHODS:
            return x
        if name in _ACT_METHODS and len(a) == 1:
            return self.activate(x, Act(_ACT_METHODS[name]))
        if name in ("add", "sub") and len(a) == 2:
            return self.add(x, a[1], 1.0 if name == "add" else -1.0)
        if name == "mul" and len(a) == 2:
            return self.mul(x, a[1])
        raise NotLowerable(f".{name}() of the representation (a reshape or a reduction) is not lowered")

    def mul(self, x: _Value, y: _Value) -> _Value:
        if isinstance(x, _Sym) and isinstance(y, _Sym):
            raise NotLowerable("a product of two values that depend on the representation")
        if isinstance(y, _Sym):
            x, y = y, x
        if not isinstance(x, _Sym):
            return _const(x) * _const(y)
        return x.scale(_const(y))

    def einsum(self, a: tuple[_Value, ...]) -> _Value:
        eq, ops = a[0], list(a[1:])
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
        if len(ops) != 2 or sum(isinstance(o, _Sym) for o in ops) != 1:
            raise NotLowerable(f"einsum {eq!r} (two operands, one of them a parameter, are lowered)")
        lhs, out = eq.replace(" ", "").split("->")
        s = lhs.split(",")
        k = 0 if isinstance(ops[0], _Sym) else 1
        sx, sw, W = s[k], s[1 - k], _const(ops[1 - k])
        if len(sw) != 2 or W.dim() != 2 or not sx:
            raise NotLowerable(f"einsum {eq!r}: the parameter must be a matrix")
        d = sx[-1]
        if d not in sw or d in out:
            raise NotLowerable(f"einsum {eq!r} does not contract the feature axis")
        m = sw.replace(d, "")
        if len(m) != 1 or out != sx[:-1] + m:
            raise NotLowerable(f"einsum {eq!r} is not a per-position linear map")
        return ops[k].affine_map(W if sw == m + d else W.t(), None)

    def getitem(self, x: _Value, idx: _Value) -> _Value:
        if not isinstance(x, _Sym):
            if isinstance(x, (tuple, list, dict)):
                return x[idx]
            return _const(x)[idx]
        idx = idx if isinstance(idx, tuple) else (idx,)
        nd = 1 + x.pos.dim() + 1  # batch, positions, features
        if any(i is Ellipsis for i in idx):
            e = idx.index(Ellipsis)
            idx = idx[:e] + (slice(None),) * (nd - len(idx) + 1) + idx[e + 1 :]
        idx = idx + (slice(None),) * (nd - len(idx))
        if len(idx) != nd or idx[0] != slice(None) or idx[-1] != slice(None):
            raise NotLowerable(f"indexing {idx!r} touches the batch or feature axis (only positions are selected)")
        pidx = idx[1:-1]
        if not all(isinstance(i, (int, slice)) for i in pidx):
            raise NotLowerable(f"indexing positions by {pidx!r} (ints and slices are lowered)")
        per_position = (*pidx, slice(None))
        c = x.c[per_position]
        return _Sym(x.pos[pidx], x.A, c, x.hid, x.Wh, None if x.hidx is None else x.hidx[pidx])


def _fetch(gm: nn.Module, target: str) -> _Value:
    obj: _Value = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def _const(v: _Value) -> _Value:
    if isinstance(v, _Sym):
        raise NotLowerable("a value that depends on the representation used where a constant is needed")
    if isinstance(v, torch.Tensor):
        return v.detach().to(device="cpu", dtype=torch.float64) if v.is_floating_point() else v.detach().cpu()
    if isinstance(v, (int, float, bool)):
        return torch.tensor(float(v), dtype=torch.float64)
    return v


def _map(v: fx.node.Argument, env: dict[fx.Node, _Value]) -> _Value:
    return fx.node.map_aggregate(v, lambda n: env[n] if isinstance(n, fx.Node) else n)


def _is_eye(W: torch.Tensor) -> bool:
    return W.shape[0] == W.shape[1] and torch.equal(W, torch.eye(W.shape[0], dtype=W.dtype))


#: module -> (its submodules' identities, its traced graph): a lowered tail is re-folded whenever a parameter changes
#: (every training step), and tracing again each time would patch ``torch.nn.Module`` globally (``torch.fx`` does while
#: it traces) under a training loop running in another thread (docs/dropin.md, "Threads"). The graph depends only on
#: the code and the submodules, which the key checks; the folded values are read from the parameters every time.
_TRACES: weakref.WeakKeyDictionary[Any, tuple[tuple[tuple[str, int], ...], Any]] = weakref.WeakKeyDictionary()


def _traced(m: nn.Module, tracer: Any, name: str) -> Any:
    """``tracer().trace(m)``, once per module and set of submodules (:data:`_TRACES`)."""
    key = tuple((n, id(c)) for n, c in m.named_modules())
    hit = _TRACES.get(m)
    if hit is not None and hit[0] == key:
        return hit[1]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tracer().trace(m)
    except Exception as e:
        raise NotLowerable(f"module {name!r} ({type(m).__name__}) does not trace: {type(e).__name__}") from None
    _TRACES[m] = (key, graph)
    return graph


def _traced_selector(output: Any) -> Any:
    """``fx.symbolic_trace(output)`` for an ``output=`` callable, once per callable (:data:`_TRACES`)."""
    try:
        hit = _TRACES.get(output)
    except TypeError:  # not weakly referenceable: traced every time
        hit = None
    if hit is not None:
        return hit[1]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sel = fx.symbolic_trace(output)
    except Exception:
        raise NotLowerable("the output= selector does not trace (use an int or a traceable callable)") from None
    try:
        _TRACES[output] = ((), sel)
    except TypeError:
        pass
    return sel
