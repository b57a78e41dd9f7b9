"""What :mod:`grokfast_metrics.dropin.measure` does to a model and its inputs: arguments, names, outputs, hooks, layouts.

The probe inputs (:func:`_as_args`, :func:`_n_samples`, :func:`_check_devices`), submodule names
(:func:`_find_module`, ``torch.compile`` prefixes), output selection (:func:`_select`,
:func:`_select_to`), the forward hooks that capture or replace an activation (:func:`_capture`,
:func:`_run_replaced`), the suspension of the user's hooks (:func:`suspend_user_hooks`) and the
layout checks whose errors name the axis that holds the samples.
"""

from __future__ import annotations

import difflib
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

__all__ = ["LastPosition", "OutputSelector", "model_lock", "suspend_user_hooks", "unwrap_compiled"]

#: what ``output`` may be: ``None`` (the model returns ``(B, O)``), a tuple index, ``"last"``, or a callable.
OutputSelector = int | str | Callable[[Any], torch.Tensor] | None
#: an :data:`OutputSelector` as a plan keeps it (:func:`_as_selector`: ``"last"`` is a :class:`LastPosition`).
_Selector = int | Callable[[Any], torch.Tensor] | None


class LastPosition:
    """``output="last"``: the logits at the last sequence position, a picklable selector (a lambda stored in a
    tracker on the model makes ``torch.save(model)`` fail).

    Reads the model's output, its first element for a tuple/list (openai/grok returns ``(logits, ...)``), its
    ``.logits`` for an object that has them (Hugging Face), and takes the last index along the sequence axis:
    ``out[:, -1]`` when the samples come first (``batch_dim=0``), ``out[-1]`` for sequence-first models
    (``batch_dim=1``).
    """

    def __init__(self, batch_dim: int = 0):
        self.batch_dim = batch_dim

    def __call__(self, out: Any) -> torch.Tensor:
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        elif not isinstance(out, torch.Tensor) and isinstance(getattr(out, "logits", None), torch.Tensor):
            out = out.logits
        if not isinstance(out, torch.Tensor) or out.dim() < 2:
            raise ValueError(
                f"output='last' needs a (batch, seq, ...) or (seq, batch, ...) tensor; got "
                f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
            )
        return out[-1] if self.batch_dim == 1 else out[:, -1]

    def __repr__(self) -> str:
        return f"LastPosition(batch_dim={self.batch_dim})"


def _as_selector(output: OutputSelector, batch_dim: int) -> _Selector:
    """``output`` as given, ``"last"`` as a :class:`LastPosition`; other strings are a ``ValueError``."""
    if isinstance(output, str):
        if output != "last":
            raise ValueError(
                f"output={output!r}: the only named selector is 'last' (the last sequence position); "
                "else pass None, a tuple index or a callable"
            )
        return LastPosition(batch_dim)
    return output


# --------------------------------------------------------------------------------------------
# inputs, names, outputs


def _as_args(inputs: object) -> tuple[torch.Tensor, ...]:
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
    sizes: set[int] = set()
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
        at = at[len("_orig_mod.") :]
    return at


def _find_module(model: nn.Module, at: str, what: str = "at") -> nn.Module:
    """The submodule named ``at``; ValueError listing (close) valid names otherwise."""
    if not isinstance(at, str):
        raise TypeError(f"{what} must be a submodule name (str) as in model.named_modules(); got {type(at).__name__}")
    modules = dict(model.named_modules())
    if at in modules and at != "":
        found: nn.Module = modules[at]  # (named_modules is typed loosely)
        return found
    names = [n for n in modules if n]
    if not names:
        raise ValueError(f"model {type(model).__name__} has no submodules; there is no layer named {at!r} to cut at")
    close = difflib.get_close_matches(at, names, n=3)
    shown = ", ".join(repr(n) for n in names[:25]) + (f", ... ({len(names)} in all)" if len(names) > 25 else "")
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"model has no submodule named {at!r} ({what}=).{hint} Valid names: {shown}")


def _select(out: Any, output: OutputSelector, n: int, layout: str = "") -> torch.Tensor:
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
        raise TypeError(f"output must be None, an int (tuple index), 'last' or a callable (out) -> (B, O); got {output!r}")
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


def _select_to(out: Any, output: OutputSelector, n: int, batch_dim: int) -> torch.Tensor:
    """``to``'s output as ``(n, O)``: through ``output`` if given, else flattened per sample along ``batch_dim``."""
    if output is not None:
        return _select(out, output, n)
    y = _first_tensor(out)
    if y.dim() <= batch_dim or y.shape[batch_dim] != n:
        raise ValueError(
            f"the output of `to` has shape {tuple(y.shape)}, without the {n} samples along "
            f"batch_dim={batch_dim}; pass output=... to select (B, O) from it"
        )
    return y.movedim(batch_dim, 0).reshape(n, -1)


def _first_tensor(out: object) -> torch.Tensor:
    """A module's output as a tensor: the tensor itself or element 0 of a tuple (e.g. MultiheadAttention)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(f"its output is a {type(out).__name__}; lmn_at needs a tensor (or a tuple whose first element is one)")


def _replace_first(out: torch.Tensor | tuple[Any, ...] | list[Any], new: torch.Tensor) -> object:
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
    for mod, name in (
        ("torch.nn.utils.weight_norm", "WeightNorm"),
        ("torch.nn.utils.spectral_norm", "SpectralNorm"),
        ("torch.nn.utils.prune", "BasePruningMethod"),
    ):
        try:
            found.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):  # pragma: no cover - older/newer torch
            pass
    return tuple(found)


#: per thread: how deep it is inside :func:`suspend_user_hooks` (the user's hooks skip only that thread's calls)
_SUSPENDED = threading.local()
#: one lock per model: ``lmn_at`` computations on one model run one at a time (see :func:`model_lock`)
_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock that serializes ``lmn_at`` computations on ``model`` (several threads, several trackers): its hooks,
    mode switches and hook suspension never interleave. A thread that only runs ``model``'s forward never takes it."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


class _SkipInSuspendingThread:
    """A user's hook, wrapped while ``lmn_at`` runs: it does not fire in the thread computing LMN and fires as
    usual in every other thread (a training thread's own hooks keep working)."""

    def __init__(self, hook: Callable[..., Any]):
        self.hook = hook

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if getattr(_SUSPENDED, "depth", 0):
            return None
        return self.hook(*args, **kwargs)


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")


@contextmanager
def suspend_user_hooks(model: nn.Module, keep: bool = False) -> Iterator[None]:
    """Suspend the forward (pre-)hooks registered on ``model``'s modules for the calling thread; restored on exit.

    Each hook is wrapped in place (the dicts keep their keys, so a handle still removes it) so that it does not
    fire in this thread and still fires in any other thread running the model meanwhile. Weight-computing
    pre-hooks (``weight_norm``, ``spectral_norm``, pruning) are not wrapped. ``keep=True``: no-op.
    """
    if keep:
        yield
        return
    weight_hooks = _weight_hook_types()
    wrapped: list[tuple[dict[int, Any], int, _SkipInSuspendingThread]] = []
    for m in model.modules():
        for name in _HOOK_DICTS:
            hooks = getattr(m, name, None)
            if not hooks:
                continue
            for key, h in list(hooks.items()):
                if isinstance(h, _SkipInSuspendingThread) or (name == "_forward_pre_hooks" and isinstance(h, weight_hooks)):
                    continue
                w = _SkipInSuspendingThread(h)
                hooks[key] = w  # same key: no resize, safe beside a forward iterating the dict in another thread
                wrapped.append((hooks, key, w))
    _SUSPENDED.depth = getattr(_SUSPENDED, "depth", 0) + 1
    try:
        yield
    finally:
        _SUSPENDED.depth -= 1
        for hooks, key, w in wrapped:
            if hooks.get(key) is w:  # a hook removed meanwhile stays removed
                hooks[key] = w.hook


@contextmanager
def _hook(module: nn.Module, fn: Callable[[nn.Module, Any, Any], Any]) -> Iterator[None]:
    """``fn`` as a forward hook of ``module`` that acts only on this thread's calls (another thread running the
    model meanwhile is not captured, replaced or stopped)."""
    me = threading.get_ident()

    def this_thread_only(m: nn.Module, inp: Any, out: Any) -> Any:
        return fn(m, inp, out) if threading.get_ident() == me else None

    handle = module.register_forward_hook(this_thread_only)
    try:
        yield
    finally:
        handle.remove()


class _Stop(Exception):
    """Raised by the hook on ``to`` to end a forward once the sub-network's output is known."""


def _call_model(model: nn.Module, args: tuple[torch.Tensor, ...]) -> Any:
    """``model(*args)``; torch's own errors on the probe become a ``ValueError`` saying what to check."""
    try:
        return model(*args)
    except (RuntimeError, IndexError) as e:
        hints = []
        if any(x.is_floating_point() for x in args) and any(isinstance(m, nn.Embedding) for m in model.modules()):
            hints.append("the model embeds tokens: pass token ids as an integer tensor (e.g. probe.long())")
        if isinstance(e, IndexError) or "out of range" in str(e) or "size" in str(e) or "shape" in str(e):
            hints.append(
                "check the probe's layout: a batch-first probe given to a sequence-first model (or the "
                "reverse) fails like this; give the inputs in the layout forward() expects and set "
                "input_batch_dim to the samples' axis"
            )
        raise ValueError(
            f"the model failed on the probe inputs ({_shapes(args)}): {type(e).__name__}: {e}" + "".join(f"; {h}" for h in hints)
        ) from e


def _capture(
    model: nn.Module, module: nn.Module, name: str, args: tuple[torch.Tensor, ...], to: nn.Module | None = None, to_name: str | None = None
) -> tuple[Any, torch.Tensor, bool]:
    """Run ``model(*args)``; return ``(model output or to's output, activation of module, raw output is a tensor)``."""
    seen: list[Any] = []
    seen_to: list[Any] = []

    def grab(_m: nn.Module, _inp: Any, out: Any) -> None:
        # a copy: later in-place ops (ReLU(inplace=True), x += ...) must not rewrite the activation
        seen.append(out.clone() if isinstance(out, torch.Tensor) else out)

    def grab_to(_m: nn.Module, _inp: Any, out: Any) -> None:
        seen_to.append(out.clone() if isinstance(out, torch.Tensor) else out)

    with _hook(module, grab), _hook(to, grab_to) if to is not None else nullcontext():
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


def _run_replaced(
    model: nn.Module, module: nn.Module, args: tuple[torch.Tensor, ...], act: torch.Tensor, to: nn.Module | None = None
) -> Any:
    """``model(*args)`` with ``module``'s output replaced by ``act``; with ``to``: ``to``'s output (forward stopped)."""

    def replace(_m: nn.Module, _inp: Any, out: Any) -> object:
        old = _first_tensor(out)
        if old.shape != act.shape:
            raise ValueError(f"activation shape changed: forward gave {tuple(old.shape)}, replacement {tuple(act.shape)}")
        return _replace_first(out, act.to(old.dtype, copy=True))  # a copy: the rest may work in place

    if to is None:
        with _hook(module, replace):
            return _call_model(model, args)
    got: list[Any] = []

    def stop(_m: nn.Module, _inp: Any, out: Any) -> None:
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


def _layout_hint(args: tuple[torch.Tensor, ...], input_batch_dim: int, rows: int) -> str:
    """Which axes of the inputs hold ``rows`` items (for errors where the sample count came out wrong)."""
    axes = sorted({d for x in args for d in range(x.dim()) if x.shape[d] == rows and d != input_batch_dim})
    if not axes:
        return ""
    return (
        f" N was read from the inputs along input_batch_dim={input_batch_dim} ({_shapes(args)}); {rows} is "
        f"the size of input axis {axes[0]}: if the samples are along that axis, pass input_batch_dim={axes[0]}."
    )


def _check_act_layout(act: torch.Tensor, at: str, n: int, batch_dim: int, input_batch_dim: int, args: tuple[torch.Tensor, ...]) -> None:
    if act.dim() > batch_dim and act.shape[batch_dim] == n:
        return
    shape = tuple(act.shape)
    match = [d for d in range(act.dim()) if shape[d] == n]
    got = f"axis {batch_dim} (batch_dim) has {shape[batch_dim]}" if act.dim() > batch_dim else f"it has no axis {batch_dim}"
    msg = (
        f"module {at!r} outputs shape {shape}: {got}, not the N={n} samples read from the inputs along "
        f"input_batch_dim={input_batch_dim} ({_shapes(args)}). "
    )
    msg += f"The activation has {n} along axis {match[0]}." if match else "No axis of the activation has N."
    hint = _layout_hint(args, input_batch_dim, shape[batch_dim]) if act.dim() > batch_dim else ""
    if hint:  # batch_dim's size is an axis of the inputs: most likely the inputs' sample axis is elsewhere
        msg += (
            hint + " (input_batch_dim defaults to batch_dim; a model fed batch-first whose blocks run "
            "sequence-first needs input_batch_dim=0, batch_dim=1)"
        )
    elif match:
        msg += f" Pass batch_dim={match[0]} (the activation's sample axis; input_batch_dim, the inputs' sample axis, defaults to batch_dim)"
    raise ValueError(msg)
