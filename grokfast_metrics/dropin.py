"""LMN at any layer of any ``nn.Module``: :func:`lmn_at`, the cut check and the tail it builds.

``lmn_at(model, inputs, at="blocks.0")`` takes the output of the submodule named ``at`` as the
representation ``h`` (one flattened row per sample) and *the rest of the model* (or, with
``to=``, the sub-network up to module ``to``'s output) as the tail. The tail is one of, in order of
preference (:class:`Plan` decides once):

* **chain**: ``at`` (and ``to``) sit in (nested) plain ``nn.Sequential`` chains and the activation
  is ``(N, D)``: the tail is the modules between them; an MLP segment takes the fused kernels;
* **split**: ``torch.fx`` traces the model (every module that does not contain ``at``/``to`` is a
  leaf) and the nodes after ``at`` that the output needs depend on nothing else of the input: the
  tail is that sub-graph alone, so the layers before ``at`` are never re-run;
* **hooks**: otherwise the model is re-run on copies of probe sample 0 with a forward hook that
  *replaces* ``at``'s output (and, with ``to=``, stops the forward at ``to``).

Split and hook tails take the generic path of :mod:`grokfast_metrics.generic`: the ends of every
path computed once, the interior points in large batches. The split tail is checked against the
model's own outputs on every computation and abandoned for the hook path if they disagree.

Re-running the model with a replaced activation is only the rest of the model if the rest depends
on the inputs *only through* that activation (``at`` is a *cut*). A residual sub-layer
(``x + attn(x)``) is not: the skip connection bypasses it. :func:`check_cut` verifies the cut on
a few pairs and ``lmn_at`` refuses a non-cut with a ``ValueError`` naming an enclosing module
that is one.

While ``lmn_at`` runs, the forward hooks and forward pre-hooks the user registered on the model's
modules are suspended (``user_hooks=True`` keeps them firing); the pre-hooks that compute weights
(``weight_norm``, ``spectral_norm``, pruning) always run.
"""
from __future__ import annotations

import difflib
import operator
import warnings
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._policy import check_n_lambda
from ._runtime import eval_mode
from ._tail import is_plain_sequential, parse_tail
from .core import LMNResult, _check_h, _compute_dtype, _identical_rows, _param_dtype, lmn, lmn_from_connectivity

#: what ``output`` may be: ``None`` (the model returns ``(B, O)``), a tuple index, or a callable.
OutputSelector = int | Callable[[Any], torch.Tensor] | None

#: samples used by the cut check (pairs ``(i, i+1 mod k)`` among the first ``k`` samples).
CUT_CHECK_SAMPLES = 8

#: what ``path=`` accepts: ``"auto"`` (chain, else split, else hooks), or one of them explicitly
PATHS = ("auto", "chain", "split", "hooks")


class AffineTailWarning(UserWarning):
    """The map from ``at`` to the output is affine, so LMN is 1 at every step (choose another layer)."""


# --------------------------------------------------------------------------------------------
# inputs, names, outputs


def _as_args(inputs) -> tuple[torch.Tensor, ...]:
    """Positional arguments of the model: a tensor, or a tuple/list of tensors."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(x, torch.Tensor) for x in inputs):
        return tuple(inputs)
    raise TypeError(
        "inputs must be a tensor or a tuple/list of tensors (the model's positional arguments, "
        f"batched along input_batch_dim); got {type(inputs).__name__}"
    )


def _shapes(args: tuple[torch.Tensor, ...]) -> str:
    return ", ".join(f"inputs[{k}] {tuple(x.shape)} {str(x.dtype).replace('torch.', '')}" for k, x in enumerate(args))


def _n_samples(args: tuple[torch.Tensor, ...], input_batch_dim: int) -> int:
    sizes = set()
    for k, x in enumerate(args):
        if x.dim() <= input_batch_dim:
            raise ValueError(f"inputs[{k}] has shape {tuple(x.shape)}, which has no input_batch_dim={input_batch_dim}")
        sizes.add(x.shape[input_batch_dim])
    if len(sizes) != 1:
        raise ValueError(f"inputs disagree on the batch size along input_batch_dim={input_batch_dim}: {sorted(sizes)}")
    return sizes.pop()


def _model_device(model: nn.Module) -> torch.device | None:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return None


def _check_devices(model: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    dev = _model_device(model)
    if dev is None:
        return
    for k, x in enumerate(args):
        if x.device != dev:
            raise ValueError(
                f"inputs[{k}] is on {x.device} but the model is on {dev}; move the probe inputs "
                f"with .to({str(dev)!r}) (the tracker keeps them where you put them)"
            )


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The eager module behind a ``torch.compile``d one (``OptimizedModule._orig_mod``), else ``model``."""
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
        return inner
    return model


def _plain_name(at: str) -> str:
    """``at`` without the ``_orig_mod.`` prefixes ``torch.compile`` adds to submodule names."""
    while at.startswith("_orig_mod."):
        at = at[len("_orig_mod."):]
    return at


def _find_module(model: nn.Module, at: str, what: str = "at") -> nn.Module:
    """The submodule named ``at``; ValueError listing (close) valid names otherwise."""
    if not isinstance(at, str):
        raise TypeError(f"{what} must be a submodule name (str) as in model.named_modules(); got {type(at).__name__}")
    modules = dict(model.named_modules())
    if at in modules and at != "":
        return modules[at]
    names = [n for n in modules if n]
    if not names:
        raise ValueError(f"model {type(model).__name__} has no submodules; there is no layer named {at!r} to cut at")
    close = difflib.get_close_matches(at, names, n=3)
    shown = ", ".join(repr(n) for n in names[:25]) + (f", ... ({len(names)} in all)" if len(names) > 25 else "")
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"model has no submodule named {at!r} ({what}=).{hint} Valid names: {shown}")


def _select(out, output: OutputSelector, n: int, layout: str = "") -> torch.Tensor:
    """Apply the ``output`` selector and check that it gives ``(n, O)`` logits."""
    if output is None:
        y = out
    elif isinstance(output, int) and not isinstance(output, bool):
        if not isinstance(out, (tuple, list)):
            raise ValueError(f"output={output} selects a tuple element but the model returned {type(out).__name__}")
        y = out[output]
    elif callable(output):
        y = output(out)
    else:
        raise TypeError(f"output must be None, an int (tuple index) or a callable (out) -> (B, O); got {output!r}")
    if not isinstance(y, torch.Tensor):
        raise ValueError(
            f"the model's output{'' if output is None else ' after the output selector'} is a "
            f"{type(y).__name__}, not a (B, O) tensor; pass output=<index> or output=lambda out: ..."
        )
    if y.dim() != 2 or y.shape[0] != n:
        raise ValueError(
            f"the logits{'' if output is None else ' selected by output'} have shape {tuple(y.shape)}; "
            f"expected 2-D (B, O) = ({n}, O) with the samples first (e.g. output=lambda out: out[-1] "
            f"for the last position of a sequence-first model, or out[:, -1] for batch-first).{layout}"
        )
    return y


def _select_to(out, output: OutputSelector, n: int, batch_dim: int) -> torch.Tensor:
    """``to``'s output as ``(n, O)``: through ``output`` if given, else flattened per sample along ``batch_dim``."""
    if output is not None:
        return _select(out, output, n)
    y = _first_tensor(out)
    if y.dim() <= batch_dim or y.shape[batch_dim] != n:
        raise ValueError(f"the output of `to` has shape {tuple(y.shape)}, without the {n} samples along "
                         f"batch_dim={batch_dim}; pass output=... to select (B, O) from it")
    return y.movedim(batch_dim, 0).reshape(n, -1)


def _first_tensor(out) -> torch.Tensor:
    """A module's output as a tensor: the tensor itself or element 0 of a tuple (e.g. MultiheadAttention)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(
        f"its output is a {type(out).__name__}; lmn_at needs a tensor (or a tuple whose first element is one)"
    )


def _replace_first(out, new: torch.Tensor):
    if isinstance(out, torch.Tensor):
        return new
    return type(out)([new, *out[1:]]) if isinstance(out, list) else (new, *out[1:])


def _take(args: tuple[torch.Tensor, ...], index: torch.Tensor, dim: int) -> tuple[torch.Tensor, ...]:
    return tuple(x.index_select(dim, index.to(x.device)) for x in args)


# --------------------------------------------------------------------------------------------
# hooks


#: forward pre-hooks that compute a module's weights (kept even when user hooks are suspended)
def _weight_hook_types() -> tuple[type, ...]:
    import importlib

    found = []
    for mod, name in (("torch.nn.utils.weight_norm", "WeightNorm"), ("torch.nn.utils.spectral_norm", "SpectralNorm"),
                      ("torch.nn.utils.prune", "BasePruningMethod")):
        try:
            found.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):  # pragma: no cover - older/newer torch
            pass
    return tuple(found)


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


@contextmanager
def suspend_user_hooks(model: nn.Module, keep: bool = False):
    """Suspend the forward (pre-)hooks registered on ``model``'s modules; restored on exit.

    Weight-computing pre-hooks (``weight_norm``, ``spectral_norm``, pruning) stay. ``keep=True``: no-op.
    Hooks ``lmn_at`` registers inside the block go to fresh dicts and leave with them.
    """
    if keep:
        yield
        return
    weight_hooks = _weight_hook_types()
    saved = []
    for m in model.modules():
        if not (m._forward_hooks or m._forward_pre_hooks):
            continue
        state = {name: getattr(m, name) for name in _HOOK_DICTS if hasattr(m, name)}
        saved.append((m, state))
        kept = OrderedDict((k, h) for k, h in m._forward_pre_hooks.items() if isinstance(h, weight_hooks))
        for name in state:
            setattr(m, name, OrderedDict() if name != "_forward_pre_hooks" else kept)
        if hasattr(m, "_forward_pre_hooks_with_kwargs"):
            m._forward_pre_hooks_with_kwargs = OrderedDict(
                (k, v) for k, v in state["_forward_pre_hooks_with_kwargs"].items() if k in kept)
    try:
        yield
    finally:
        for m, state in saved:
            for name, d in state.items():
                setattr(m, name, d)


@contextmanager
def _hook(module: nn.Module, fn):
    handle = module.register_forward_hook(fn)
    try:
        yield
    finally:
        handle.remove()


class _Stop(Exception):
    """Raised by the hook on ``to`` to end a forward once the sub-network's output is known."""


def _call_model(model: nn.Module, args: tuple[torch.Tensor, ...]):
    """``model(*args)``; torch's own errors on the probe become a ``ValueError`` saying what to check."""
    try:
        return model(*args)
    except (RuntimeError, IndexError) as e:
        hints = []
        if any(x.is_floating_point() for x in args) and any(isinstance(m, nn.Embedding) for m in model.modules()):
            hints.append("the model embeds tokens: pass token ids as an integer tensor (e.g. probe.long())")
        if isinstance(e, IndexError) or "out of range" in str(e) or "size" in str(e) or "shape" in str(e):
            hints.append("check the probe's layout: a batch-first probe given to a sequence-first model (or the "
                         "reverse) fails like this; give the inputs in the layout forward() expects and set "
                         "input_batch_dim to the samples' axis")
        raise ValueError(f"the model failed on the probe inputs ({_shapes(args)}): {type(e).__name__}: {e}"
                         + "".join(f"; {h}" for h in hints)) from e


def _capture(model: nn.Module, module: nn.Module, name: str, args: tuple[torch.Tensor, ...],
             to: nn.Module | None = None, to_name: str | None = None):
    """Run ``model(*args)``; return ``(model output or to's output, activation of module, raw output is a tensor)``."""
    seen: list = []
    seen_to: list = []

    def grab(_m, _inp, out):
        # a copy: later in-place ops (ReLU(inplace=True), x += ...) must not rewrite the activation
        seen.append(out.clone() if isinstance(out, torch.Tensor) else out)

    def grab_to(_m, _inp, out):
        seen_to.append(out.clone() if isinstance(out, torch.Tensor) else out)

    with _hook(module, grab), (_hook(to, grab_to) if to is not None else nullcontext()):
        out = _call_model(model, args)
    if not seen:
        raise ValueError(
            f"module {name!r} ({type(module).__name__}) is never called in the model's forward, so it has no "
            "activation to interpolate; pick a module that forward() actually runs"
        )
    if len(seen) > 1:
        raise ValueError(
            f"module {name!r} is called {len(seen)} times per forward (shared weights); its output is not a "
            "single representation. Pick a module that runs once"
        )
    if to is not None:
        if len(seen_to) != 1:
            raise ValueError(f"module {to_name!r} (to=) is called {len(seen_to)} times per forward; `to` must run once")
        out = seen_to[0]
    try:
        act = _first_tensor(seen[0])
        if act is not seen[0]:
            act = act.clone()
    except ValueError as e:
        raise ValueError(f"module {name!r}: {e}") from None
    if not act.is_floating_point():
        raise ValueError(f"module {name!r} outputs {act.dtype}; only a floating-point activation can be interpolated")
    return out, act, isinstance(seen[0], torch.Tensor)


def _run_replaced(model: nn.Module, module: nn.Module, args: tuple[torch.Tensor, ...], act: torch.Tensor,
                  to: nn.Module | None = None):
    """``model(*args)`` with ``module``'s output replaced by ``act``; with ``to``: ``to``'s output (forward stopped)."""

    def replace(_m, _inp, out):
        old = _first_tensor(out)
        if old.shape != act.shape:
            raise ValueError(
                f"activation shape changed: forward gave {tuple(old.shape)}, replacement {tuple(act.shape)}"
            )
        return _replace_first(out, act.to(old.dtype, copy=True))  # a copy: the rest may work in place

    if to is None:
        with _hook(module, replace):
            return _call_model(model, args)
    got: list = []

    def stop(_m, _inp, out):
        got.append(out)
        raise _Stop

    try:
        with _hook(module, replace), _hook(to, stop):
            _call_model(model, args)
    except _Stop:
        return got[0]
    raise ValueError("module `to` was not called after `at` was replaced")


# --------------------------------------------------------------------------------------------
# layouts


def _layout_hint(args, input_batch_dim: int, rows: int) -> str:
    """Which axes of the inputs hold ``rows`` items (for errors where the sample count came out wrong)."""
    axes = sorted({d for x in args for d in range(x.dim()) if x.shape[d] == rows and d != input_batch_dim})
    if not axes:
        return ""
    return (f" N was read from the inputs along input_batch_dim={input_batch_dim} ({_shapes(args)}); {rows} is "
            f"the size of input axis {axes[0]}: if the samples are along that axis, pass input_batch_dim={axes[0]}.")


def _check_act_layout(act: torch.Tensor, at: str, n: int, batch_dim: int, input_batch_dim: int, args) -> None:
    if act.dim() > batch_dim and act.shape[batch_dim] == n:
        return
    shape = tuple(act.shape)
    match = [d for d in range(act.dim()) if shape[d] == n]
    got = f"axis {batch_dim} (batch_dim) has {shape[batch_dim]}" if act.dim() > batch_dim else f"it has no axis {batch_dim}"
    msg = (f"module {at!r} outputs shape {shape}: {got}, not the N={n} samples read from the inputs along "
           f"input_batch_dim={input_batch_dim} ({_shapes(args)}). ")
    msg += f"The activation has {n} along axis {match[0]}." if match else "No axis of the activation has N."
    hint = _layout_hint(args, input_batch_dim, shape[batch_dim]) if act.dim() > batch_dim else ""
    if hint:   # batch_dim's size is an axis of the inputs: most likely the inputs' sample axis is elsewhere
        msg += hint + " (input_batch_dim defaults to batch_dim; a model fed batch-first whose blocks run " \
                      "sequence-first needs input_batch_dim=0, batch_dim=1)"
    elif match:
        msg += (f" Pass batch_dim={match[0]} (the activation's sample axis; input_batch_dim, the inputs' sample "
                "axis, defaults to batch_dim)")
    raise ValueError(msg)


# --------------------------------------------------------------------------------------------
# cut check


def _cut_error(run_mixed, y, idx_src, idx_dst) -> float:
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
    return torch.roll(dst, 1), dst                 # input of sample i-1, activation of sample i


def check_cut(model: nn.Module, inputs, at: str, output: OutputSelector = None, batch_dim: int = 0,
              to: str | None = None, input_batch_dim: int | None = None) -> float:
    """Check that the rest of ``model`` (or the sub-network up to ``to``) depends on ``inputs`` only through ``at``.

    For ``k = min(N, 8)`` samples, sample ``i - 1``'s input is run with sample ``i``'s activation at
    ``at`` swapped in; the logits must reproduce sample ``i``'s to ``1e-4`` (fp32; ``1e-9`` fp64,
    ``4 eps`` fp16/bf16) of the largest logit. Only the *selected* logits count: with
    ``output=lambda out: out[-1]``, a sub-layer whose bypass never reaches the last position is a
    cut. Runs in eval mode without grad; mode and RNG are restored.

    Returns:
        the relative error (``max |diff| / max |logits|``).

    Raises:
        ValueError: ``at`` is not a cut (the message names an enclosing module that is, if any),
            or any of the input errors of :func:`lmn_at`.
    """
    plan = Plan(model, inputs, at, to, output, batch_dim, input_batch_dim, path="hooks")
    with plan.running():
        y, act = plan.forward()
        return plan.enforce_cut(act, y)


# --------------------------------------------------------------------------------------------
# tails


class _HookTail(nn.Module):
    """``(B, D)`` interpolated activations -> ``(B, O)`` by re-running the model with ``at`` replaced.

    The probe input of sample 0 is repeated ``B`` times (the cut check guarantees the outputs depend
    on the input only through the activation). With ``to``, the forward stops at ``to``'s output.
    """

    def __init__(self, plan: Plan):
        super().__init__()
        self.model = plan.model                  # registered: its parameters decide dtype/device checks
        self._modules_at = [plan.module, plan.to_module]   # a list: not registered twice
        for k, x in enumerate(_take(plan.args, torch.zeros(1, dtype=torch.long), plan.input_batch_dim)):
            self.register_buffer(f"_arg{k}", x, persistent=False)   # buffers: .double() converts float probes
        self._n_args = len(plan.args)
        self._act_shape = tuple(plan.act_shape)
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

    def __init__(self, graph_module: nn.Module, plan: Plan):
        super().__init__()
        self.graph = graph_module
        self._act_shape = tuple(plan.act_shape)
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
        raise ValueError(f"to={to!r} must come after at={at!r} in the model")
    return nn.Sequential(*leaves[ends[at]:stop])


def _trace_split(model: nn.Module, at: str, to: str | None) -> nn.Module | None:
    """A ``torch.fx`` GraphModule computing the output (or ``to``'s) from ``at``'s output alone, or None.

    Every module that does not contain ``at``/``to`` is a leaf; None when the model does not trace,
    ``at``/``to`` are not called exactly once in the graph, or the output needs anything of the input
    other than through ``at`` (e.g. a skip connection, an input-dependent mask).
    """
    import torch.fx as fx

    through = set()
    for name in (at, to):
        if name is not None:
            parts = name.split(".")
            through.update(".".join(parts[:k]) for k in range(1, len(parts)))

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return qualname not in through

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _Tracer().trace(model)
    except Exception:  # any failure to trace means: use the hook path
        return None
    nodes = list(graph.nodes)
    a = [n for n in nodes if n.op == "call_module" and n.target == at]
    if len(a) != 1:
        return None
    a = a[0]
    if to is None:
        out_nodes = [n for n in nodes if n.op == "output"]
        if len(out_nodes) != 1:
            return None
        result = out_nodes[0].args[0]
    else:
        b = [n for n in nodes if n.op == "call_module" and n.target == to]
        if len(b) != 1:
            return None
        result = b[0]
    needed: set = set()
    stack = []
    fx.node.map_arg(result, lambda n: stack.append(n))
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        if n is not a:
            stack.extend(n.all_input_nodes)
    if a not in needed:
        return None
    # nodes the output needs that depend on the input other than through `at`: not a split
    dep_in: set = set()
    for n in nodes:
        if n is a:
            continue
        if n.op == "placeholder" or any(m in dep_in for m in n.all_input_nodes):
            dep_in.add(n)
    if any(n in dep_in for n in needed):
        return None
    g2 = fx.Graph()
    env = {a: g2.placeholder("h")}
    for n in nodes:
        if n in needed and n is not a:
            env[n] = g2.node_copy(n, lambda m: env[m])
    g2.output(fx.node.map_arg(result, lambda m: env[m]))
    try:
        return fx.GraphModule(model, g2)
    except Exception:  # e.g. a target GraphModule cannot copy: use the hook path
        return None


# structural affinity of a traced tail: const < affine < nonlinear
_CONST, _AFFINE, _NONLINEAR = 0, 1, 2
_LINEAR_MODULES = (nn.Linear, nn.Identity, nn.Dropout, nn.Flatten, nn.Unflatten)
_LINEAR_FUNCS = {operator.add, operator.sub, operator.neg, operator.pos, operator.getitem, torch.add, torch.sub,
                 torch.cat, torch.stack, torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
                 torch.unsqueeze, torch.movedim, F.dropout, getattr}
_LINEAR_METHODS = {"reshape", "view", "permute", "transpose", "flatten", "unflatten", "contiguous", "squeeze",
                   "unsqueeze", "expand", "expand_as", "movedim", "add", "sub", "neg", "clone", "float", "double",
                   "to", "size"}
_SCALE = {operator.mul, operator.matmul, torch.mul, torch.matmul, "mul", "matmul", F.linear}
_DIV = {operator.truediv, torch.div, "div"}


def _graph_kind(gm) -> int:
    """``_CONST``/``_AFFINE``/``_NONLINEAR``: how the traced graph's output depends on its input."""
    kind: dict = {}
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


def _selector_affine(output: OutputSelector) -> bool:
    """Whether the output selector is structurally affine (None, an index, or a traceable affine callable)."""
    if output is None or isinstance(output, int):
        return True
    import torch.fx as fx

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _graph_kind(fx.symbolic_trace(output)) <= _AFFINE
    except Exception:  # an untraceable selector: unknown, the numeric check decides
        return False


def emit_affine_warning(at: str, to: str | None, how: str, stacklevel: int = 4) -> None:
    """Emit the :class:`AffineTailWarning` for ``at`` (-> ``to``), saying ``how`` it was detected."""
    target = f"module {to!r}" if to else "the output"
    warnings.warn(
        f"LMN at {at!r} is 1 at every step: the map from {at!r} to {target} is affine ({how}), so every "
        "interpolation path is a straight line. Measure at a layer with a nonlinearity after it: the residual "
        "stream before the last nonlinearity (e.g. the last block's input, or 'blocks.<k>.hook_resid_mid' before "
        "the last MLP in TransformerLens), or the first hidden layer's output of an MLP.",
        AffineTailWarning, stacklevel=stacklevel)


# --------------------------------------------------------------------------------------------
# the plan: everything decided once per (model, inputs, at, to, layout)


class Plan:
    """What ``lmn_at`` runs for one model, probe set, ``at``/``to`` and layout; built once, run many times.

    :class:`~grokfast_metrics.LMNTracker` builds one at construction (every check of the arguments
    happens there) and reuses it at every computation.

    Attributes:
        path: ``"chain"``, ``"split"`` or ``"hooks"`` (``"split"`` may fall back to ``"hooks"`` after a run).
    """

    def __init__(self, model: nn.Module, inputs, at: str, to: str | None = None, output: OutputSelector = None,
                 batch_dim: int = 0, input_batch_dim: int | None = None, path: str = "auto",
                 user_hooks: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
        for name, v in (("batch_dim", batch_dim), ("input_batch_dim", input_batch_dim)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{name} must be a non-negative int (0 batch-first, 1 sequence-first); got {v!r}")
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}; got {path!r}")
        self.model = unwrap_compiled(model)
        self.at = _plain_name(at) if isinstance(at, str) else at
        self.to = _plain_name(to) if isinstance(to, str) else to
        self.module = _find_module(self.model, self.at)
        self.to_module = None if self.to is None else _find_module(self.model, self.to, "to")
        if self.to is not None and self.to == self.at:
            raise ValueError(f"to={to!r} is at itself; `to` must be a module after `at`")
        self.output = output
        self.batch_dim = batch_dim
        self.input_batch_dim = batch_dim if input_batch_dim is None else input_batch_dim
        self.args = _as_args(inputs)
        self.n = _n_samples(self.args, self.input_batch_dim)
        if self.n < 2:
            raise ValueError(f"inputs hold {self.n} sample(s) along input_batch_dim={self.input_batch_dim}; "
                             "LMN needs at least 2")
        _check_devices(self.model, self.args)
        self.requested = path
        self.user_hooks = bool(user_hooks)
        self.path: str | None = None
        self.tail: nn.Module | None = None
        self.act_shape: tuple[int, ...] | None = None
        self.checked = False
        self.affine: bool | None = None   # structurally affine (None: unknown until L is seen)
        self.affine_warned = False

    @contextmanager
    def running(self):
        """Context of every computation: no grad, eval mode (restored), RNG forked, user hooks suspended."""
        with torch.no_grad(), eval_mode(self.model), suspend_user_hooks(self.model, self.user_hooks):
            yield

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(selected outputs (N, O), activation at at)`` of the probe; builds the tail on the first call."""
        out, act, self._raw_is_tensor = _capture(self.model, self.module, self.at, self.args, self.to_module, self.to)
        _check_act_layout(act, self.at, self.n, self.batch_dim, self.input_batch_dim, self.args)
        if self.to is not None:
            y = _select_to(out, self.output, self.n, self.batch_dim)
        else:
            y = _select(out, self.output, self.n, _layout_hint(self.args, self.input_batch_dim, _rows(out, self.output)))
        if self.path is None:
            self._build(act)
        return y, act

    def _build(self, act: torch.Tensor) -> None:
        self.act_shape = tuple(act.movedim(self.batch_dim, 0).shape[1:])
        req = self.requested
        if req in ("auto", "chain") and self.output is None and self.batch_dim == 0 and act.dim() == 2:
            tail = _chain_tail(self.model, self.at, self.to)
            if tail is not None:
                self.path, self.tail = "chain", (tail if len(tail) else nn.Identity())
                spec = parse_tail(self.tail)
                self.affine = bool(spec is not None and spec.is_affine) or isinstance(self.tail, nn.Identity)
                return
        if req == "chain":
            raise ValueError(f"path='chain' needs at={self.at!r} in plain nn.Sequential chains, output=None, "
                             "batch_dim=0 and a 2-D activation")
        if req in ("auto", "split") and self._raw_is_tensor:
            gm = _trace_split(self.model, self.at, self.to)
            if gm is not None:
                self.path, self.tail = "split", _SplitTail(gm, self)
                self.affine = _graph_kind(gm) <= _AFFINE and (self.to is not None or _selector_affine(self.output))
                if not self.affine:
                    self.affine = None
                return
        if req == "split":
            raise ValueError(f"path='split' cannot run: torch.fx does not split the model at {self.at!r} (it does "
                             "not trace, or the output needs the input other than through it); use path='hooks'")
        self.path, self.tail = "hooks", _HookTail(self)

    def enforce_cut(self, act: torch.Tensor, y: torch.Tensor) -> float:
        """The cut check (see :func:`check_cut`); raises ``ValueError`` naming an enclosing cut."""
        src, dst = _pairs(y.shape[0], y.device)
        err = _cut_error(lambda s, d: self._mixed(self.module, act, s, d), y, src, dst)
        tol = _cut_rtol(y.dtype)
        if err > tol:
            raise ValueError(self._not_a_cut_message(err, tol))
        self.checked = True
        return err

    def _mixed(self, module, act, src, dst) -> torch.Tensor:
        moved = act.index_select(self.batch_dim, dst)
        out = _run_replaced(self.model, module, _take(self.args, src, self.input_batch_dim), moved, self.to_module)
        if self.to is not None:
            return _select_to(out, self.output, len(src), self.batch_dim)
        return _select(out, self.output, len(src))

    def _not_a_cut_message(self, err: float, tol: float) -> str:
        suggestion = None
        parts = self.at.split(".")
        modules = dict(self.model.named_modules())
        for k in range(len(parts) - 1, 0, -1):
            parent = ".".join(parts[:k])
            try:
                out, act, _ = _capture(self.model, modules[parent], parent, self.args, self.to_module, self.to)
                y = (_select_to(out, self.output, self.n, self.batch_dim) if self.to is not None
                     else _select(out, self.output, self.n))
                if act.dim() <= self.batch_dim or act.shape[self.batch_dim] != self.n:
                    continue
                src, dst = _pairs(self.n, y.device)
                if _cut_error(lambda s, d, m=modules[parent], a=act: self._mixed(m, a, s, d), y, src, dst) <= _cut_rtol(y.dtype):
                    suggestion = parent
                    break
            except (ValueError, _Stop):
                continue
        hint = (f" Use an enclosing module that is a cut, e.g. at={suggestion!r}." if suggestion
                else " Use the output of a whole block (e.g. a full residual block) instead of a sub-layer.")
        target = f"module {self.to!r}'s output (to=)" if self.to else "logits"
        return (f"module {self.at!r} is not a cut of the model: feeding sample i's input with sample j's activation "
                f"at {self.at!r} does not reproduce sample j's {target} (relative error {err:.2e} > {tol:.0e}), so "
                f"part of the output bypasses it (e.g. a skip connection around it).{hint}")

    def compute(self, n_lambda: int = 21, backend: str = "auto", *, check: bool = True,
                chunk_bytes: int | None = None, warn_affine: bool = True) -> LMNResult:
        """One LMN computation on the model's current weights (see :func:`lmn_at`)."""
        n_lambda = check_n_lambda(n_lambda)
        with self.running(), torch.autocast(_device_type(self.args), enabled=False):
            y, act = self.forward()
            h = act.movedim(self.batch_dim, 0).reshape(self.n, -1)
            if self.path == "chain":
                res = lmn(h, self.tail, n_lambda, backend, chunk_bytes=chunk_bytes)
            else:
                if check and not self.checked:
                    self.enforce_cut(act, y)
                res = self._generic(h, y, n_lambda, backend, chunk_bytes)
        if warn_affine and not self.affine_warned:
            if self.affine:
                self.affine_warned = True
                emit_affine_warning(self.at, self.to, "structurally: only affine layers follow it")
            elif _all_ones(res.connectivity):
                self.affine_warned = True
                emit_affine_warning(self.at, self.to, "every entry of L is 1 to rounding")
        return res

    def _generic(self, h, y, n_lambda, backend, chunk_bytes) -> LMNResult:
        from . import generic
        from .core import _check_tail, resolve_backend

        _check_h(h)
        _check_tail(self.tail, h)
        name = resolve_backend(h, self.tail, backend)      # "triton"/"cpu" refuse a non-MLP tail here
        out_dtype = _compute_dtype(h, self.tail)
        run_dtype = _param_dtype(self.tail, h.dtype)
        y_end = generic.end_outputs(self.tail, h, run_dtype, out_dtype)
        if self.path == "split" and not _agrees(y_end, y):
            # the traced graph does not reproduce the model (e.g. an in-place op it lost): hooks from now on
            self.path, self.tail, self.affine = "hooks", _HookTail(self), None
            y_end = generic.end_outputs(self.tail, h, run_dtype, out_dtype)
        if name == "reference":
            L = torch.from_numpy(generic.reference_connectivity(h, self.tail, n_lambda)).to(h.device, out_dtype)
        else:
            L = generic.connectivity_tail(h, self.tail, n_lambda, run_dtype, out_dtype, chunk_bytes, y_end=y_end)
        groups = _identical_rows(h)
        if groups is not None:  # SPEC §1: identical representations are perfectly connected
            L[groups[:, None] == groups[None, :]] = 1.0
        return lmn_from_connectivity(L)


def _rows(out, output) -> int:
    try:
        y = out if output is None else (out[output] if isinstance(output, int) else output(out))
        return int(y.shape[0])
    except Exception:
        return -1


def _device_type(args) -> str:
    return args[0].device.type


def _agrees(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    scale = float(b.abs().max()) or 1.0
    return float((a.to(b.dtype) - b).abs().max()) / scale <= _cut_rtol(b.dtype)


def _all_ones(L: torch.Tensor) -> bool:
    """Every entry of ``L`` is 1 to rounding (64 eps of its dtype)."""
    return bool(((1.0 - L).abs() <= 64 * torch.finfo(L.dtype).eps).all())


def lmn_at(
    model: nn.Module,
    inputs,
    at: str = "blocks.0",
    to: str | None = None,
    output: OutputSelector = None,
    batch_dim: int = 0,
    input_batch_dim: int | None = None,
    n_lambda: int = 21,
    backend: str = "auto",
    *,
    check: bool = True,
    chunk_bytes: int | None = None,
    path: str = "auto",
    user_hooks: bool = False,
    warn_affine: bool = True,
) -> LMNResult:
    """Linear mapping number at the output of the submodule ``at`` of ``model``, over the probe ``inputs``.

    ``h`` is ``at``'s output with each sample's activation flattened (``(N, D)``, ``D`` the product of
    the per-sample shape, e.g. ``seq * d_model`` for a transformer block); the tail is the rest of the
    model up to the logits selected by ``output`` or, with ``to``, the sub-network up to module
    ``to``'s output (flattened per sample, or selected by ``output``).

    Args:
        model: any ``nn.Module`` (a ``torch.compile``d one is measured through its eager module, and
            its submodule names need no ``_orig_mod.``); left exactly as it was (mode, parameters,
            grads, RNG, hooks).
        inputs: the model's input (a tensor, or a tuple/list of tensors passed positionally) for the
            ``N`` probe samples, batched along ``input_batch_dim``, on the model's device.
        at: name of the submodule whose output is the representation, as in ``model.named_modules()``
            (``"layers.0"``, ``"3"``...). A module returning a tuple contributes element 0.
        to: name of the submodule whose output ends the measured sub-network (default: the model's
            output). An MLP segment of a plain ``nn.Sequential`` takes the fused kernels.
        output: how to get ``(N, O)`` from the model's output (or ``to``'s): ``None`` (it already is;
            ``to``'s output is flattened per sample), an int (tuple element) or a callable, e.g.
            ``lambda out: out[-1]`` for the last position of a sequence-first model.
        batch_dim: the samples' axis in ``at``'s (and ``to``'s) output: 1 for sequence-first blocks
            ``(seq, batch, d)``.
        input_batch_dim: the samples' axis in ``inputs`` (default ``batch_dim``): e.g. 0 for a model
            fed ``(batch, seq)`` tokens whose blocks run sequence-first (``batch_dim=1``).
        n_lambda, backend, chunk_bytes: as in :func:`grokfast_metrics.lmn`; for a tail that is not an
            MLP, ``backend="reference"`` runs the float64 per-pair loop through the module itself and
            ``chunk_bytes`` bounds the interpolated input of one tail forward.
        check: run the cut check (default True; a plain ``nn.Sequential`` child needs none).
        path: ``"auto"`` (chain, else the fx split, else hooks), ``"chain"``, ``"split"`` or ``"hooks"``.
        user_hooks: keep firing the forward hooks registered on the model's modules (default: suspended
            while LMN is computed, so a logging hook on the head does not see the interpolation batches).
        warn_affine: warn (:class:`AffineTailWarning`) when the tail is affine, so LMN is 1 at every step.

    Returns:
        :class:`LMNResult` of ``h`` through the rest of the model.

    Raises:
        ValueError: unknown ``at``/``to`` (lists valid names), ``at`` never called or called more than
            once, ``at`` is not a cut (names an enclosing module that is), logits not 2-D ``(N, O)``,
            the samples not where ``batch_dim``/``input_batch_dim`` say (names the axis that has them),
            the model failing on the probe, inputs on another device than the model, fewer than 2 samples.
        TypeError: ``model``/``inputs``/``output`` of the wrong type.
    """
    plan = Plan(model, inputs, at, to, output, batch_dim, input_batch_dim, path, user_hooks)
    return plan.compute(n_lambda, backend, check=check, chunk_bytes=chunk_bytes, warn_affine=warn_affine)
