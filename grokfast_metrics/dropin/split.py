"""The tails :class:`~grokfast_metrics.dropin.plan.Plan` builds for ``lmn_at``, and how affine they are.

A **chain** tail (:func:`_chain_tail`) is the modules after ``at`` in (nested) plain ``nn.Sequential``
chains; a **split** tail (:class:`_SplitTail`) is the ``torch.fx`` sub-graph after ``at``
(:func:`_trace_split`); a **hook** tail (:class:`_HookTail`) re-runs the whole model with ``at``'s
output replaced. :func:`_graph_kind` and :func:`_selector_affine` tell, from the graph alone, whether
the tail is affine (then LMN is 1 at every step).
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Container
from typing import Any, Literal, Protocol, overload

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..foundation.tail import is_plain_sequential
from .hooks import _run_replaced, _select, _select_to, _Selector, _take


class PlanView(Protocol):
    """What a tail reads of the :class:`~grokfast_metrics.dropin.plan.Plan` that builds it."""

    model: nn.Module
    module: nn.Module
    to_module: nn.Module | None
    to: str | None
    args: tuple[torch.Tensor, ...]
    act_shape: tuple[int, ...] | None
    output: _Selector
    batch_dim: int
    input_batch_dim: int


# --------------------------------------------------------------------------------------------
# tails


def _act_shape(plan: PlanView) -> tuple[int, ...]:
    """The activation's shape without the samples' axis: a plan builds its tails after the probe has set it."""
    assert plan.act_shape is not None, "a tail is built before the plan has seen the activation"
    return tuple(plan.act_shape)


class _HookTail(nn.Module):
    """``(B, D)`` interpolated activations -> ``(B, O)`` by re-running the model with ``at`` replaced.

    The probe input of sample 0 is repeated ``B`` times (the cut check guarantees the outputs depend
    on the input only through the activation). With ``to``, the forward stops at ``to``'s output.
    """

    def __init__(self, plan: PlanView):
        super().__init__()
        self.model = plan.model  # registered: its parameters decide dtype/device checks
        self._modules_at = (plan.module, plan.to_module)  # a tuple: not registered twice
        for k, x in enumerate(_take(plan.args, torch.zeros(1, dtype=torch.long), plan.input_batch_dim)):
            self.register_buffer(f"_arg{k}", x, persistent=False)  # buffers: .double() converts float probes
        self._n_args = len(plan.args)
        self._act_shape = _act_shape(plan)
        self._output = plan.output
        self._batch_dim = plan.batch_dim
        self._input_batch_dim = plan.input_batch_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        act = x.reshape(B, *self._act_shape).movedim(0, self._batch_dim).contiguous()
        args0 = tuple(getattr(self, f"_arg{k}") for k in range(self._n_args))
        args = _take(args0, torch.zeros(B, dtype=torch.long), self._input_batch_dim)  # sample 0, B times
        at_mod, to_mod = self._modules_at
        out = _run_replaced(self.model, at_mod, args, act, to_mod)
        if to_mod is not None:
            return _select_to(out, self._output, B, self._batch_dim)
        return _select(out, self._output, B)


class _SplitTail(nn.Module):
    """``(B, D)`` interpolated activations -> ``(B, O)`` through the traced sub-graph after ``at`` only."""

    def __init__(self, graph_module: fx.GraphModule, plan: PlanView):
        super().__init__()
        self.graph = graph_module
        self._act_shape = _act_shape(plan)
        self._output = plan.output
        self._batch_dim = plan.batch_dim
        self._to = plan.to is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        out = self.graph(x.reshape(B, *self._act_shape).movedim(0, self._batch_dim))
        if self._to:
            return _select_to(out, self._output, B, self._batch_dim)
        return _select(out, self._output, B)


def _chain_tail(model: nn.Module, at: str, to: str | None) -> nn.Sequential | None:
    """The modules after ``at`` (up to and including ``to``) when both sit in (nested) plain Sequential chains."""
    if not is_plain_sequential(model):
        return None
    leaves: list[nn.Module] = []
    ends: dict[str, int] = {}

    def walk(container: nn.Module, prefix: str) -> None:
        for name, child in container.named_children():
            q = prefix + name
            if is_plain_sequential(child) and len(child):
                walk(child, q + ".")
            else:
                leaves.append(child)
            ends[q] = len(leaves)

    walk(model, "")
    if at not in ends or (to is not None and to not in ends):
        return None
    stop = len(leaves) if to is None else ends[to]
    if stop <= ends[at]:
        if to is None:
            first = next(
                (
                    n
                    for n, k in ends.items()
                    if 0 < k < len(leaves) and "." not in n and not isinstance(leaves[k - 1], (nn.Linear, nn.Flatten, nn.Dropout))
                ),
                None,
            )
            eg = f", e.g. at={first!r} (the first hidden activation)" if first is not None else ""
            raise ValueError(
                f"at={at!r} is the model's last layer: its output is the model's output, so no layer "
                f"is left after it and LMN would be 1. Measure at an earlier layer{eg}"
            )
        raise ValueError(f"to={to!r} must come after at={at!r} in the model")
    return nn.Sequential(*leaves[ends[at] : stop])


@overload
def _trace_split(
    model: nn.Module,
    at: str,
    to: str | None,
    explain: Literal[False] = False,
    args: tuple[torch.Tensor, ...] | None = None,
    input_batch_dim: int = 0,
    tuple_at: bool = False,
) -> fx.GraphModule | None: ...
@overload
def _trace_split(
    model: nn.Module,
    at: str,
    to: str | None,
    explain: Literal[True],
    args: tuple[torch.Tensor, ...] | None = None,
    input_batch_dim: int = 0,
    tuple_at: bool = False,
) -> tuple[fx.GraphModule | None, str]: ...
def _trace_split(
    model: nn.Module,
    at: str,
    to: str | None,
    explain: bool = False,
    args: tuple[torch.Tensor, ...] | None = None,
    input_batch_dim: int = 0,
    tuple_at: bool = False,
) -> fx.GraphModule | tuple[fx.GraphModule | None, str] | None:
    """A ``torch.fx`` GraphModule computing the output (or ``to``'s) from ``at``'s output alone, or None.

    Every module that does not contain ``at``/``to`` is a leaf; None when the model does not trace,
    ``at``/``to`` are not called exactly once in the graph, or the output needs anything of the input
    other than through ``at`` (e.g. a skip connection, an input-dependent mask).
    With ``explain``: ``(GraphModule or None, why)``, ``why`` one clause saying what failed.

    With the probe ``args`` (positional, samples along ``input_batch_dim``): the forward's other arguments
    are traced at their defaults (openai/grok's ``save_activations=False``, ``pos=None``: control flow on
    them traces), and sizes read from the inputs along axes other than the samples' (a mask sliced to the
    sequence length) are constants of the tail. ``tuple_at``: ``at`` returns a tuple and ``h`` is its first
    element; the tail may use no other element.
    """
    gm, why = _trace_split_why(model, at, to, args, input_batch_dim, tuple_at)
    return (gm, why) if explain else gm


def _trace_split_why(
    model: nn.Module, at: str, to: str | None, args: tuple[torch.Tensor, ...] | None, input_batch_dim: int, tuple_at: bool
) -> tuple[fx.GraphModule | None, str]:
    graph, err = _trace_through(model, at, to, explain=True, n_args=None if args is None else len(args))
    if graph is None:
        return None, f"torch.fx cannot trace the model ({err})"
    nodes = list(graph.nodes)
    calls = [n for n in nodes if n.op == "call_module" and n.target == at]
    if len(calls) != 1:
        return None, f"{at!r} is called {len(calls)} times in the traced graph"
    a = calls[0]
    result: fx.node.Argument
    if to is None:
        out_nodes = [n for n in nodes if n.op == "output"]
        if len(out_nodes) != 1:
            return None, "the traced graph has several outputs"
        result = out_nodes[0].args[0]
    else:
        b = [n for n in nodes if n.op == "call_module" and n.target == to]
        if len(b) != 1:
            return None, f"{to!r} (to=) is called {len(b)} times in the traced graph"
        result = b[0]
    consts = {} if args is None else _shape_constants(nodes, args, input_batch_dim)
    needed = _needed_nodes(result, a, consts)
    if a not in needed:
        return None, f"the output does not depend on {at!r} in the traced graph"
    h_node = a
    if tuple_at:
        users = [n for n in needed if a in n.all_input_nodes]
        firsts = [n for n in users if n.op == "call_function" and n.target is operator.getitem and n.args[1] == 0]
        if len(users) != len(firsts) or len(firsts) != 1:
            return None, f"the output needs more of {at!r}'s tuple than its first element"
        h_node = firsts[0]
        needed.discard(a)
    # nodes the output needs that depend on the input other than through `at`: not a split
    dep_in = _input_dependent(nodes, h_node, consts)
    bad = [n for n in needed if n in dep_in]
    if bad:
        return None, f"the output needs the input other than through {at!r} (e.g. node {bad[0].name!r})"
    gm = _sub_graph_module(model, nodes, needed, h_node, result, consts)
    return gm, ("" if gm is not None else "the traced tail cannot be rebuilt as a GraphModule")


def _container_split(
    model: nn.Module, at: str, args: tuple[torch.Tensor, ...], tuple_at: bool
) -> tuple[fx.GraphModule, str] | tuple[None, None]:
    """The split of the innermost module containing ``at`` whose output *is* the model's output (the model
    returns it as it is), when the model itself does not trace (danielmamay's einops ``rearrange`` before the
    blocks): the tail is traced alone, inside that module. ``(GraphModule, its name)`` or ``(None, None)``."""
    from .hooks import _call_model

    parts = at.split(".")
    names = [".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1)]
    modules = dict(model.named_modules())
    outs: dict[str, Any] = {}
    handles = [modules[c].register_forward_hook(_first_output_hook(outs, c)) for c in names]
    try:
        out = _call_model(model, args)
    finally:
        for h in handles:
            h.remove()
    for c in names:
        if outs.get(c) is not out:
            continue
        gm, _ = _trace_split_why(modules[c], at[len(c) + 1 :], None, None, 0, tuple_at)
        if gm is not None:
            return gm, c
    return None, None


def _first_output_hook(outs: dict[str, Any], name: str) -> Callable[[nn.Module, Any, Any], None]:
    """A forward hook keeping the first output of module ``name`` in ``outs``."""

    def hook(m: nn.Module, i: Any, o: Any) -> None:
        outs.setdefault(name, o)

    return hook


@overload
def _trace_through(
    model: nn.Module, at: str, to: str | None, explain: Literal[False] = False, n_args: int | None = None
) -> fx.Graph | None: ...
@overload
def _trace_through(
    model: nn.Module, at: str, to: str | None, explain: Literal[True], n_args: int | None = None
) -> tuple[fx.Graph | None, str]: ...
def _trace_through(
    model: nn.Module, at: str, to: str | None, explain: bool = False, n_args: int | None = None
) -> fx.Graph | tuple[fx.Graph | None, str] | None:
    """The ``torch.fx`` graph of ``model`` with every module not containing ``at``/``to`` a leaf; None if it does not trace."""
    through: set[str] = set()
    for name in (at, to):
        if name is not None:
            parts = name.split(".")
            through.update(".".join(parts[:k]) for k in range(1, len(parts)))

    class _Tracer(fx.Tracer):
        proxy_buffer_attributes = True  # a buffer sliced by a traced size (openai/grok's mask) traces

        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return qualname not in through

    concrete = None
    if n_args is not None:  # the forward's arguments the probe does not pass: traced at their defaults
        import inspect

        try:
            params = list(inspect.signature(model.forward).parameters.values())[n_args:]
        except (TypeError, ValueError):
            params = []
        concrete = {
            p.name: p.default for p in params if p.default is not inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD
        } or None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = _Tracer().trace(model, concrete_args=concrete)
    except Exception as e:  # any failure to trace means: use the hook path
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return (None, f"{type(e).__name__}: {msg[:200]}") if explain else None
    return (g, "") if explain else g


_SAME_SHAPE_METHODS = {"to", "contiguous", "long", "int", "cpu", "cuda", "clone", "detach"}


def _shape_constants(nodes: list[fx.Node], args: tuple[torch.Tensor, ...], input_batch_dim: int) -> dict[fx.Node, int]:
    """Nodes reading a size of a probe input along an axis other than the samples' (``x.shape[-1]``,
    ``x.size(1)``, ``len(x)`` of a batch-second input) and their values: the same for every batch of the tail."""
    phs = [n for n in nodes if n.op == "placeholder"]
    values = {ph: x for ph, x in zip(phs, args)}
    consts: dict[fx.Node, int] = {}

    def axis_ok(x: torch.Tensor, k: int) -> bool:
        return -x.dim() <= k < x.dim() and k % x.dim() != input_batch_dim

    shapes: dict[fx.Node, torch.Tensor] = {}
    for n in nodes:
        src = n.args[0] if n.args else None
        if not isinstance(src, fx.Node):  # every rule below reads a node's sizes
            continue
        k = n.args[1] if len(n.args) > 1 else None
        if n.op == "call_method" and n.target in _SAME_SHAPE_METHODS and src in values:
            values[n] = values[src]  # x.to(device): the same sizes
        elif n.op == "call_function" and n.target is getattr and src in values and k == "shape":
            shapes[n] = values[src]
        elif n.op == "call_function" and n.target is operator.getitem and src in shapes and isinstance(k, int) and axis_ok(shapes[src], k):
            consts[n] = int(shapes[src].shape[k])
        elif (
            n.op == "call_method"
            and n.target == "size"
            and src in values
            and len(n.args) == 2
            and isinstance(k, int)
            and axis_ok(values[src], k)
        ):
            consts[n] = int(values[src].shape[k])
        elif n.op == "call_function" and n.target is len and src in values and axis_ok(values[src], 0):
            consts[n] = int(values[src].shape[0])
    return consts


def _needed_nodes(result: fx.node.Argument, a: fx.Node, stop: Container[fx.Node] = ()) -> set[fx.Node]:
    """The nodes ``result`` depends on, walking back no further than ``a`` (and the constants in ``stop``)."""
    needed: set[fx.Node] = set()
    stack: list[fx.Node] = []
    fx.node.map_arg(result, stack.append)
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        if n is not a and n not in stop:
            stack.extend(n.all_input_nodes)
    return needed


def _input_dependent(nodes: list[fx.Node], a: fx.Node, consts: Container[fx.Node] = ()) -> set[fx.Node]:
    """The nodes that depend on a placeholder (the input) other than through ``a`` (or the shape ``consts``)."""
    dep_in: set[fx.Node] = set()
    for n in nodes:
        if n is a or n in consts:
            continue
        if n.op == "placeholder" or any(m in dep_in for m in n.all_input_nodes):
            dep_in.add(n)
    return dep_in


def _sub_graph_module(
    model: nn.Module,
    nodes: list[fx.Node],
    needed: set[fx.Node],
    a: fx.Node,
    result: fx.node.Argument,
    consts: dict[fx.Node, int] | None = None,
) -> fx.GraphModule | None:
    """The GraphModule of the ``needed`` nodes, with ``a``'s output its input ``h`` and the ``consts`` nodes
    replaced by their values; None if it cannot be built."""
    g2 = fx.Graph()
    env: dict[fx.Node, fx.node.Argument] = {a: g2.placeholder("h"), **(consts or {})}
    for n in nodes:
        if n in needed and n not in env:
            env[n] = g2.node_copy(n, lambda m: env[m])
    g2.output(fx.node.map_arg(result, lambda m: env[m]))
    try:
        return fx.GraphModule(model, g2)
    except Exception:  # e.g. a target GraphModule cannot copy: use the hook path
        return None


# structural affinity of a traced tail: const < affine < nonlinear
_CONST, _AFFINE, _NONLINEAR = 0, 1, 2
_LINEAR_MODULES = (nn.Linear, nn.Identity, nn.Dropout, nn.Flatten, nn.Unflatten)
_LINEAR_FUNCS = {
    operator.add,
    operator.sub,
    operator.neg,
    operator.pos,
    operator.getitem,
    torch.add,
    torch.sub,
    torch.cat,
    torch.stack,
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.squeeze,
    torch.unsqueeze,
    torch.movedim,
    F.dropout,
    getattr,
}
_LINEAR_METHODS = {
    "reshape",
    "view",
    "permute",
    "transpose",
    "flatten",
    "unflatten",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "expand",
    "expand_as",
    "movedim",
    "add",
    "sub",
    "neg",
    "clone",
    "float",
    "double",
    "to",
    "size",
}
_SCALE = {operator.mul, operator.matmul, torch.mul, torch.matmul, "mul", "matmul", F.linear}
_DIV = {operator.truediv, torch.div, "div"}


def _graph_kind(gm: fx.GraphModule) -> int:
    """``_CONST``/``_AFFINE``/``_NONLINEAR``: how the traced graph's output depends on its input."""
    kind: dict[fx.Node, int] = {}
    mods = dict(gm.named_modules())
    out = _NONLINEAR
    for n in gm.graph.nodes:
        args = [kind.get(m, _CONST) for m in n.all_input_nodes]
        top = max(args, default=_CONST)
        if n.op == "placeholder":
            k = _AFFINE
        elif n.op == "get_attr" or top == _CONST:
            k = _CONST
        elif n.op == "output":
            out = top
            continue
        elif n.op == "call_module":
            k = top if isinstance(mods.get(n.target), _LINEAR_MODULES) else _NONLINEAR
        else:
            t = n.target
            if t in _LINEAR_FUNCS or t in _LINEAR_METHODS:
                k = top
            elif t in _SCALE:
                k = top if sum(a != _CONST for a in args) <= 1 else _NONLINEAR
            elif t in _DIV:
                k = top if len(args) < 2 or args[1] == _CONST else _NONLINEAR
            else:
                k = _NONLINEAR
        kind[n] = k
    return out


def _selector_affine(output: _Selector) -> bool:
    """Whether the output selector is structurally affine (None, an index, or a traceable affine callable)."""
    from .hooks import LastPosition

    if output is None or isinstance(output, (int, LastPosition)):
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _graph_kind(fx.symbolic_trace(output)) <= _AFFINE
    except Exception:  # an untraceable selector: unknown, the numeric check decides
        return False
