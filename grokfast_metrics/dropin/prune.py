"""Position pruning of a split tail: run only what the selected logits depend on
(docs/dropin.md, "How the rest of the model is run", Pruning).

A transformer tail computes logits at every sequence position, and ``output=`` reads one (the last).
:func:`prune_positions` re-traces the fx tail through the user's modules (down to ``torch.nn`` leaves),
finds by a backward pass over the graph which nodes are needed at one position only, and rebuilds the
graph so that those nodes run on that position alone (a size-1 slice along the sequence axis: the rank and
every other axis are unchanged). Attention after the cut keeps its keys and values at every position and
runs its queries (and mask rows) at the selected one only.

The analysis is conservative: an op it does not know to act position by position along the axis (a
reshape, an unknown module, ``tril``) needs its inputs whole, and what feeds it runs in full, as before.
Where nothing can be pruned the tail is returned unchanged (``None``). The plan checks the pruned tail's
outputs on the samples against the model's own at every computation and falls back to the whole tail.
"""

from __future__ import annotations

import builtins
import operator
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .hooks import _Selector

FULL = "full"

#: what a node needs of an input: ``FULL``, or ``("narrow", axis, pos)`` / ``("expand", axis, pos)``
_Expect = str | tuple[str, int, int]
#: at which positions a node runs: ``FULL``, or ``(axis, pos)``
_Demand = str | tuple[int, int]
#: ``{input node: expectation}`` of a node computed at one position, or None when it cannot run that way
_Rule = dict[fx.Node, _Expect] | None
#: ``(element path, axis, position)`` the output selector reads
_OutDemand = tuple[tuple[int, ...], int, int]

# ops acting elementwise (after broadcasting): any axis is position-wise
_ELEMENTWISE_FUNCS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    operator.pos,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.neg,
    torch.relu,
    torch.tanh,
    torch.sigmoid,
    torch.exp,
    torch.sqrt,
    torch.rsqrt,
    torch.abs,
    torch.where,
    torch.eq,
    torch.ne,
    operator.eq,
    operator.ne,
    operator.pow,
    torch.pow,
    torch.erf,
    F.relu,
    F.gelu,
    F.silu,
    F.tanh,
    F.sigmoid,
    F.softplus,
    F.leaky_relu,
    F.elu,
    F.mish,
    F.dropout,
}
_ELEMENTWISE_METHODS = {
    "add",
    "sub",
    "mul",
    "div",
    "neg",
    "relu",
    "tanh",
    "sigmoid",
    "exp",
    "sqrt",
    "rsqrt",
    "abs",
    "float",
    "double",
    "to",
    "contiguous",
    "clone",
    "pow",
    "eq",
    "ne",
    "masked_fill",
    "masked_fill_",
    "add_",
    "mul_",
    "sub_",
    "div_",
    "relu_",
    "type_as",
    "detach",
}
_ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Softplus,
    nn.Mish,
    nn.Identity,
    nn.Dropout,
    nn.ReLU6,
    nn.Hardtanh,
    nn.GLU,
)


#: normalisations over their trailing ``normalized_shape`` axes
_TRAILING_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))


def _is_leaf(m: nn.Module) -> bool:
    return type(m).__module__.startswith("torch.nn") and not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def _traced_len(x: Any) -> Any:
    """``len`` while tracing the tail: recorded on a Proxy (a block's ``len(x)``, Grokfast's mask), else ``len``."""
    if isinstance(x, fx.Proxy):
        return x.size(0)  # recorded as a method call: the graph re-traces (unpickling) without patching len
    return builtins.len(x)


@contextmanager
def _len_recorded(gm: nn.Module) -> Iterator[None]:
    """While tracing, ``len`` in the modules defining the tail's user modules records a node instead of failing."""
    patched: list[dict[str, Any]] = []
    for m in gm.modules():
        g = getattr(type(m).forward, "__globals__", None)
        if g is not None and not _is_leaf(m) and "len" not in g and all(g is not p for p in patched):
            g["len"] = _traced_len
            patched.append(g)
    try:
        yield
    finally:
        for g in patched:
            g.pop("len", None)


def _deep_trace(gm: nn.Module) -> fx.GraphModule | None:
    """The tail's graph traced through every user module (``torch.nn`` modules are leaves); None if it fails."""

    class _Deep(fx.Tracer):
        proxy_buffer_attributes = True

        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return _is_leaf(m)

    try:
        with warnings.catch_warnings(), _len_recorded(gm):
            warnings.simplefilter("ignore")
            graph = _Deep().trace(gm)
            return fx.GraphModule(gm, graph)
    except Exception:  # the tail's modules do not trace: no pruning
        return None


def _shape(n: object) -> tuple[int, ...] | None:
    meta = n.meta.get("tensor_meta") if hasattr(n, "meta") else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _selector_demand(out_example: Any, output: _Selector) -> _OutDemand | None:
    """``(element path, axis, position)``: the one position the selector reads along one axis of one tensor of the
    tail's output; None when it reads several (or cannot be probed)."""
    leaves: list[tuple[tuple[int, ...], torch.Tensor]] = []

    def build(x: Any, path: tuple[int, ...]) -> Any:
        if isinstance(x, torch.Tensor):
            t = torch.randn(x.shape, dtype=torch.float64).requires_grad_(True)
            leaves.append((path, t))
            return t
        if isinstance(x, (tuple, list)):
            return type(x)(build(v, (*path, k)) for k, v in enumerate(x))
        return x

    try:
        fake = build(out_example, ())
        with torch.enable_grad():
            y = _apply(fake, output)
            y.sum().backward()
    except Exception:  # a selector that cannot run on a float64 stand-in: no pruning
        return None
    read = [(p, g) for p, t in leaves if (g := t.grad) is not None and bool((g != 0).any())]
    if len(read) != 1:
        return None
    path, grad = read[0]
    nz = grad != 0
    for axis in range(grad.dim()):
        if grad.shape[axis] < 2:
            continue
        used = nz.movedim(axis, 0).reshape(grad.shape[axis], -1).any(dim=1).nonzero().flatten()
        if used.numel() == 1:
            return path, axis, int(used[0])
    return None


def _apply(out: Any, output: _Selector) -> Any:
    if output is None:
        return out
    if isinstance(output, int):
        return out[output]
    return output(out)


def _aligned(m: fx.node.Argument, axis: int, pos: int, shape: tuple[int, ...]) -> _Expect | None:
    """The expectation on input ``m`` of a node of ``shape`` computed at ``(axis, pos)`` elementwise (broadcasting)."""
    s = _shape(m)
    if s is None:
        return FULL
    k = axis - (len(shape) - len(s))
    if k < 0 or s[k] == 1:
        return FULL
    return ("narrow", k, pos) if s[k] == shape[axis] else None


def _elementwise(n: fx.Node, axis: int, pos: int, shape: tuple[int, ...]) -> _Rule:
    """``{input: expectation}`` of an elementwise node ``n`` (None when an input does not line up)."""
    out: dict[fx.Node, _Expect] = {}
    for m in n.all_input_nodes:
        e = _aligned(m, axis, pos, shape)
        if e is None:
            return None
        out[m] = e
    return out


def _matmul_rule(n: fx.Node, axis: int, pos: int, shape: tuple[int, ...]) -> _Rule:
    """The rule of ``a @ b``: a row of the output reads a row of ``a``, a column one column of ``b``."""
    nd = len(shape)
    a, b = n.args[0], n.args[1]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):  # a constant operand has no recorded shape
        return None
    sa, sb = _shape(a), _shape(b)
    if a is b or sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
        return None
    if axis == nd - 2:
        return {a: ("narrow", len(sa) - 2, pos), b: FULL}
    if axis == nd - 1:
        return {a: FULL, b: ("narrow", len(sb) - 1, pos)}
    ea, eb = _aligned(a, axis, pos, shape), _aligned(b, axis, pos, shape)
    return None if ea is None or eb is None else {a: ea, b: eb}


def _einsum_rule(n: fx.Node, axis: int, pos: int) -> _Rule:
    """The rule of ``torch.einsum(eq, ...)``: each operand narrowed where it carries the output axis' letter."""
    operands = [a for a in n.args[1:] if isinstance(a, fx.Node)]
    if len(set(operands)) != len(operands) or not isinstance(n.args[0], str):
        return None
    eq = n.args[0].replace(" ", "")
    if "..." in eq or "->" not in eq:
        return None
    lhs, rhs = eq.split("->")
    letter = rhs[axis]
    out: dict[fx.Node, _Expect] = {}
    for sub, m in zip(lhs.split(","), n.args[1:]):
        if not isinstance(m, fx.Node):
            continue
        out[m] = ("narrow", sub.index(letter), pos) if letter in sub else FULL
    return out


class _Analysis:
    """Backward demand analysis: which nodes run at one position only, and what each edge expects."""

    def __init__(self, gm: fx.GraphModule, force_full: set[fx.Node]):
        self.gm = gm
        self.mods = dict(gm.named_modules())
        self.force_full = force_full
        self.demand: dict[fx.Node, _Demand] = {}  # node -> FULL or (axis, pos)
        self.expect: dict[tuple[fx.Node, fx.Node], _Expect] = {}  # (user, input node) -> FULL, ("narrow" or "expand", axis, pos)
        self.mha_query: dict[fx.Node, tuple[int, int]] = {}  # attention node -> (axis, pos) of a query that is also its keys/values

    def module(self, n: fx.Node) -> nn.Module | None:
        """The leaf module a ``call_module`` node calls (None for any other node)."""
        return self.mods.get(n.target) if n.op == "call_module" and isinstance(n.target, str) else None

    def place(self, user: fx.Node, node: fx.node.Argument, how: _Expect) -> None:
        if not isinstance(node, fx.Node):
            return
        self.expect[(user, node)] = how
        d: _Demand = FULL if isinstance(how, str) else (how[1], how[2])
        old = self.demand.get(node)
        self.demand[node] = d if old is None or old == d else FULL

    def pruned(self, n: fx.node.Argument) -> bool:
        if not isinstance(n, fx.Node):  # a constant: never in the demand
            return False
        d = self.demand.get(n, FULL)
        return not isinstance(d, str) and n not in self.force_full and self.rule(n, d) is not None

    def rule(self, n: fx.Node, d: tuple[int, int]) -> _Rule:
        """For ``n`` computed at position ``d = (axis, pos)`` only: ``{input node: expectation}``, or None when ``n``
        cannot run that way."""
        axis, pos = d
        mod = self.module(n)
        if isinstance(mod, nn.MultiheadAttention):
            return self._mha(n, mod, axis, pos)
        shape = _shape(n)
        if n.op in ("placeholder", "get_attr", "output") or shape is None:
            return None
        if n.op == "call_module":
            return self._module_rule(mod, n, axis, pos, shape)
        return self._function_rule(n, axis, pos, shape)

    def _module_rule(self, mod: nn.Module | None, n: fx.Node, axis: int, pos: int, shape: tuple[int, ...]) -> _Rule:
        """:meth:`rule` for a leaf module (other than ``nn.MultiheadAttention``)."""
        nd = len(shape)
        if isinstance(mod, _ELEMENTWISE_MODULES):
            return _elementwise(n, axis, pos, shape)
        if isinstance(mod, nn.Linear) and axis != nd - 1:
            return _elementwise(n, axis, pos, shape)
        # (nn.RMSNorm, from torch 2.4, normalises its trailing normalized_shape axes as nn.LayerNorm does)
        if isinstance(mod, _TRAILING_NORMS) and axis < nd - len(cast(nn.LayerNorm, mod).normalized_shape):
            return _elementwise(n, axis, pos, shape)
        if isinstance(mod, nn.Softmax) and mod.dim is not None and mod.dim % nd != axis:
            return _elementwise(n, axis, pos, shape)
        return None

    def _function_rule(self, n: fx.Node, axis: int, pos: int, shape: tuple[int, ...]) -> _Rule:
        """:meth:`rule` for a function or method call."""
        nd = len(shape)
        t = n.target
        if n.op == "call_function" and t is operator.getitem and _shape(n.args[0]) is None:
            # an element of a leaf module's tuple (nn.MultiheadAttention's output): handled at the module
            src = n.args[0]
            if n.args[1] == 0 and isinstance(src, fx.Node) and isinstance(self.module(src), nn.MultiheadAttention):
                return {src: ("narrow", axis, pos)}
            return None
        if (n.op == "call_function" and t in _ELEMENTWISE_FUNCS) or (n.op == "call_method" and t in _ELEMENTWISE_METHODS):
            return _elementwise(n, axis, pos, shape)
        if n.op == "call_function" and t in (F.linear,) and axis != nd - 1:
            return _elementwise(n, axis, pos, shape)
        if (n.op == "call_function" and t in (F.softmax, torch.softmax, F.log_softmax)) or (
            n.op == "call_method" and t in ("softmax", "log_softmax")
        ):
            dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
            return _elementwise(n, axis, pos, shape) if isinstance(dim, int) and dim % nd != axis else None
        if n.op == "call_function" and t is F.layer_norm:
            ns = n.args[1] if len(n.args) > 1 else n.kwargs.get("normalized_shape")
            return _elementwise(n, axis, pos, shape) if isinstance(ns, (list, tuple)) and axis < nd - len(ns) else None
        if (n.op == "call_function" and t in (torch.transpose,)) or (n.op == "call_method" and t == "transpose"):
            src, d0, d1 = (*n.args, None, None)[:3]  # (a transpose's dims are ints, given by position)
            if not (isinstance(src, fx.Node) and isinstance(d0, int) and isinstance(d1, int)):
                return None
            d0, d1 = d0 % nd, d1 % nd
            k = d1 if axis == d0 else d0 if axis == d1 else axis
            return {src: ("narrow", k, pos)}
        if (n.op == "call_function" and t in (torch.matmul, operator.matmul)) or (n.op == "call_method" and t == "matmul"):
            return _matmul_rule(n, axis, pos, shape)
        if n.op == "call_function" and t is torch.cat:
            dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
            if not isinstance(dim, int) or dim % nd == axis or not isinstance(n.args[0], (list, tuple)):
                return None
            return _elementwise(n, axis, pos, shape)
        if n.op == "call_function" and t is torch.einsum and isinstance(n.args[0], str):
            return _einsum_rule(n, axis, pos)
        return None

    def _mha(self, n: fx.Node, mod: nn.MultiheadAttention, axis: int, pos: int) -> _Rule:
        """``nn.MultiheadAttention`` at one query position: the query (and the mask's rows) narrowed, keys and values
        whole. A query that is also the keys or values is narrowed in :func:`_rebuild` (``self.mha_query``)."""
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
        args = {k: v for k, v in zip(names, n.args)}
        args.update(n.kwargs)
        q, k, v, mask = args.get("query"), args.get("key"), args.get("value"), args.get("attn_mask")
        if not isinstance(q, fx.Node):
            return None
        sq = _shape(q)
        if sq is None or len(sq) != 3 or axis != (1 if mod.batch_first else 0) or args.get("is_causal", False):
            return None
        out: dict[fx.Node, _Expect] = {m: FULL for m in n.all_input_nodes}
        if q is k or q is v:
            if not n.args or n.args[0] is not q:
                return None
            self.mha_query[n] = (axis, pos)
        else:
            out[q] = ("narrow", axis, pos)
        if isinstance(mask, fx.Node):
            sm = _shape(mask)
            if sm is None or len(sm) not in (2, 3) or mask in (q, k, v):
                return None
            out[mask] = ("narrow", len(sm) - 2, pos)
        return out

    def selection(self, n: fx.Node) -> tuple[fx.Node, int, int] | None:
        """A getitem reading one position of its input along one axis: ``(input, axis, pos)``, else None."""
        if not (n.op == "call_function" and n.target is operator.getitem):
            return None
        src, idx = n.args
        s = _shape(src)
        if s is None or not isinstance(src, fx.Node):
            return None
        items = idx if isinstance(idx, tuple) else (idx,)
        if any(i is Ellipsis or i is None or isinstance(i, fx.Node) for i in items):
            return None
        for k, i in enumerate(items):
            if isinstance(i, int) and k < len(s) and s[k] > 1:
                return src, k, i % s[k]
        return None

    def run(self, out_node: fx.Node, out_demand: _OutDemand) -> None:
        nodes = list(self.gm.graph.nodes)
        self.out_demand = out_demand
        for n in reversed(nodes):
            if n.op == "output":
                path, axis, pos = out_demand
                target = _output_element(n.args[0], path)
                for m in n.all_input_nodes:
                    self.place(n, m, ("expand", axis, pos) if m is target else FULL)
                continue
            src = n.args[0] if n.args else None
            if n not in self.demand and _in_place(n) and isinstance(src, fx.Node) and self.demand.get(src) is not None:
                self.demand[n] = self.demand[src]  # an in-place op on a needed tensor runs where it does
            if n not in self.demand:
                continue
            d = self.demand[n]
            r = self.rule(n, d) if not isinstance(d, str) and n not in self.force_full else None
            if r is not None:
                for m in n.all_input_nodes:
                    self.place(n, m, r.get(m, FULL))
                continue
            sel = self.selection(n)
            for m in n.all_input_nodes:
                self.place(n, m, ("expand", sel[1], sel[2]) if sel is not None and m is sel[0] else FULL)


def _output_element(out: fx.node.Argument, path: tuple[int, ...]) -> fx.Node | None:
    """The node of the graph's output that the selector reads (``path`` into the output's tuples/lists); None when the
    element lies inside one node's value (a leaf module's tuple, e.g. ``nn.MultiheadAttention``'s): nothing is pruned."""
    for k in path:
        if not isinstance(out, (tuple, list)) or k >= len(out):
            return None
        out = out[k]
    return out if isinstance(out, fx.Node) else None


def _in_place(n: fx.Node) -> bool:
    """A method call whose name ends in ``_`` (``x.masked_fill_(...)``, ``x.add_(...)``): it writes its first argument."""
    return n.op == "call_method" and isinstance(n.target, str) and n.target.endswith("_")


def prune_positions(gm: fx.GraphModule, act_model_layout: torch.Tensor, output: _Selector) -> fx.GraphModule | None:
    """A GraphModule computing the same selected logits as ``gm`` at only the needed positions, or None.

    ``act_model_layout``: the activation at ``at`` as the model produced it (the tail's input); ``output``:
    the user's selector, applied to what ``gm`` returns.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    deep = _deep_trace(gm)
    if deep is None:
        return None
    try:
        with torch.no_grad():
            example = ShapeProp(deep).propagate(act_model_layout.clone())
    except Exception:
        return None
    demand = _selector_demand(example, output)
    if demand is None:
        return None
    out_node = next(n for n in deep.graph.nodes if n.op == "output")
    force_full: set[fx.Node] = set()
    for _ in range(8):
        an = _Analysis(deep, force_full)
        an.run(out_node, demand)
        bad = {n for n in deep.graph.nodes if an.pruned(n) and _in_place(n) and not an.pruned(n.args[0])}
        if not bad:
            break
        force_full |= bad
    else:
        return None
    if not any(an.pruned(n) for n in deep.graph.nodes):
        return None
    return _rebuild(deep, an)


def _rebuild(deep: fx.GraphModule, an: _Analysis) -> fx.GraphModule | None:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in deep.graph.nodes:

        def arg(m: fx.Node, user: fx.Node = n) -> fx.Node:
            v = env[m]
            how = an.expect.get((user, m), FULL)
            if isinstance(how, str):  # FULL
                return v
            kind, axis, pos = how
            if kind == "narrow" and not an.pruned(m):
                return g.call_method("narrow", (v, axis, pos, 1))
            shape = _shape(m)
            if kind == "expand" and an.pruned(m):
                assert shape is not None, "an expanded node holds one tensor (the selector reads it): its shape is known"
                sizes = [-1] * len(shape)
                sizes[axis] = shape[axis]
                return g.call_method("expand", (v, *sizes))
            return v

        new = g.node_copy(n, arg)
        if n in an.mha_query and an.pruned(n):  # the query, also the keys/values: narrowed here alone
            axis, pos = an.mha_query[n]
            q = g.call_method("narrow", (new.args[0], axis, pos, 1))
            new.prepend(q)
            new.args = (q, *new.args[1:])
        if an.pruned(n) and n.op == "call_module" and isinstance(an.mods.get(n.target), nn.MultiheadAttention):
            users_weights = [u for u in n.users if not (u.target is operator.getitem and u.args[1] == 0)]
            if not any(u in an.demand for u in users_weights):
                new.kwargs = {**new.kwargs, "need_weights": False}
        env[n] = new
    try:
        return fx.GraphModule(deep, g)
    except Exception:
        return None
