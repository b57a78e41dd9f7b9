"""LMN at any layer of any ``nn.Module``: :func:`lmn_at` and the cut check.

``lmn_at(model, inputs, at="blocks.0")`` takes the output of the submodule named ``at`` as the
representation ``h`` (one flattened row per sample) and *the rest of the model* as the tail:

* the activation is captured with a forward hook on ``at``;
* the tail is a small wrapper module whose forward takes a ``(B, D)`` batch of interpolated
  activations, reshapes it to the activation's shape, re-runs ``model`` on probe inputs of batch
  size ``B`` with a forward hook that *replaces* ``at``'s output by them, and selects the logits
  with ``output``; :func:`grokfast_metrics.lmn` then runs its generic path on it;
* when ``at`` sits in (nested) plain ``nn.Sequential`` chains and the activation is ``(N, D)``,
  the tail is simply the modules after it (``model[k + 1:]``) and an MLP tail takes the fused
  fast path.

Re-running the model with a replaced activation is only the rest of the model if the rest depends
on the inputs *only through* that activation (``at`` is a *cut*). A residual sub-layer
(``x + attn(x)``) is not: the skip connection bypasses it. :func:`check_cut` verifies the cut on
a few pairs and ``lmn_at`` refuses a non-cut with a ``ValueError`` naming an enclosing module
that is one.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ._runtime import eval_mode
from ._tail import is_plain_sequential
from .core import LMNResult, lmn

#: what ``output`` may be: ``None`` (the model returns ``(B, O)``), a tuple index, or a callable.
OutputSelector = int | Callable[[Any], torch.Tensor] | None

#: samples used by the cut check (pairs ``(i, i+1 mod k)`` among the first ``k`` samples).
CUT_CHECK_SAMPLES = 8


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
        f"batched along batch_dim); got {type(inputs).__name__}"
    )


def _n_samples(args: tuple[torch.Tensor, ...], batch_dim: int) -> int:
    sizes = set()
    for k, x in enumerate(args):
        if x.dim() <= batch_dim:
            raise ValueError(f"inputs[{k}] has shape {tuple(x.shape)}, which has no batch_dim={batch_dim}")
        sizes.add(x.shape[batch_dim])
    if len(sizes) != 1:
        raise ValueError(f"inputs disagree on the batch size along batch_dim={batch_dim}: {sorted(sizes)}")
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


def _find_module(model: nn.Module, at: str) -> nn.Module:
    """The submodule named ``at``; ValueError listing (close) valid names otherwise."""
    if not isinstance(at, str):
        raise TypeError(f"at must be a submodule name (str) as in model.named_modules(); got {type(at).__name__}")
    modules = dict(model.named_modules())
    if at in modules and at != "":
        return modules[at]
    names = [n for n in modules if n]
    if not names:
        raise ValueError(f"model {type(model).__name__} has no submodules; there is no layer named {at!r} to cut at")
    close = difflib.get_close_matches(at, names, n=3)
    shown = ", ".join(repr(n) for n in names[:25]) + (f", ... ({len(names)} in all)" if len(names) > 25 else "")
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"model has no submodule named {at!r}.{hint} Valid names: {shown}")


def _select(out, output: OutputSelector, n: int) -> torch.Tensor:
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
            "for the last position of a sequence-first model, or out[:, -1] for batch-first)"
        )
    return y


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


def _take(args: tuple[torch.Tensor, ...], index: torch.Tensor, batch_dim: int) -> tuple[torch.Tensor, ...]:
    return tuple(x.index_select(batch_dim, index.to(x.device)) for x in args)


# --------------------------------------------------------------------------------------------
# hooks


@contextmanager
def _hook(module: nn.Module, fn):
    handle = module.register_forward_hook(fn)
    try:
        yield
    finally:
        handle.remove()


def _capture(model: nn.Module, module: nn.Module, name: str, args: tuple[torch.Tensor, ...]):
    """Run ``model(*args)``; return ``(model output, activation of module)``. Errors if not called exactly once."""
    seen: list = []

    def grab(_m, _inp, out):
        # a copy: later in-place ops (ReLU(inplace=True), x += ...) must not rewrite the activation
        seen.append(out.clone() if isinstance(out, torch.Tensor) else out)

    with _hook(module, grab):
        out = model(*args)
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
    try:
        act = _first_tensor(seen[0])
        if act is not seen[0]:
            act = act.clone()
    except ValueError as e:
        raise ValueError(f"module {name!r}: {e}") from None
    if not act.is_floating_point():
        raise ValueError(f"module {name!r} outputs {act.dtype}; only a floating-point activation can be interpolated")
    return out, act


def _run_replaced(model: nn.Module, module: nn.Module, args: tuple[torch.Tensor, ...], act: torch.Tensor):
    """``model(*args)`` with ``module``'s output replaced by ``act`` (same shape)."""

    def replace(_m, _inp, out):
        old = _first_tensor(out)
        if old.shape != act.shape:
            raise ValueError(
                f"activation shape changed: forward gave {tuple(old.shape)}, replacement {tuple(act.shape)}"
            )
        return _replace_first(out, act.to(old.dtype, copy=True))  # a copy: the rest may work in place

    with _hook(module, replace):
        return model(*args)


# --------------------------------------------------------------------------------------------
# cut check


def _cut_error(model, module, args, act, y, output, batch_dim, idx_src, idx_dst) -> float:
    """Max |model(input i, activation j) - model(input j)| over the pairs, relative to max |logits|."""
    moved = act.index_select(batch_dim, idx_dst)
    y_mix = _select(_run_replaced(model, module, _take(args, idx_src, batch_dim), moved), output, len(idx_src))
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


def check_cut(
    model: nn.Module, inputs, at: str, output: OutputSelector = None, batch_dim: int = 0
) -> float:
    """Check that the rest of ``model`` depends on ``inputs`` only through the output of ``at``.

    For ``k = min(N, 8)`` samples, sample ``i - 1``'s input is run with sample ``i``'s activation at
    ``at`` swapped in; the logits must reproduce sample ``i``'s to ``1e-4`` (fp32; ``1e-9`` fp64,
    ``4 eps`` fp16/bf16) of the largest logit. Only the *selected* logits count: with
    ``output=lambda out: out[-1]``, a sub-layer whose bypass never reaches the last position is a
    cut. Runs in eval mode without grad; mode and RNG are restored.

    Args:
        model: the full model.
        inputs: probe inputs (tensor or tuple of tensors), ``N >= 2`` samples along ``batch_dim``.
        at: submodule name as in ``model.named_modules()``.
        output: logits selector (see :func:`lmn_at`).
        batch_dim: the samples' dimension of the inputs and of ``at``'s output.

    Returns:
        the relative error (``max |diff| / max |logits|``).

    Raises:
        ValueError: ``at`` is not a cut (the message names an enclosing module that is, if any),
            or any of the input errors of :func:`lmn_at`.
    """
    args, module, n = _prepare(model, inputs, at, batch_dim)
    with torch.no_grad(), eval_mode(model):
        y, act = _forward(model, module, at, args, output, n, batch_dim)
        return _enforce_cut(model, module, at, args, act, y, output, batch_dim)


def _enforce_cut(model, module, at, args, act, y, output, batch_dim) -> float:
    src, dst = _pairs(y.shape[0], y.device)
    err = _cut_error(model, module, args, act, y, output, batch_dim, src, dst)
    tol = _cut_rtol(y.dtype)
    if err > tol:
        raise ValueError(_not_a_cut_message(model, at, args, output, batch_dim, err, tol))
    return err


def _not_a_cut_message(model, at, args, output, batch_dim, err, tol) -> str:
    suggestion = None
    parts = at.split(".")
    modules = dict(model.named_modules())
    n = _n_samples(args, batch_dim)
    for k in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:k])
        try:
            y, act = _capture(model, modules[parent], parent, args)
            y = _select(y, output, n)
            if act.dim() <= batch_dim or act.shape[batch_dim] != n:
                continue
            src, dst = _pairs(n, y.device)
            if _cut_error(model, modules[parent], args, act, y, output, batch_dim, src, dst) <= _cut_rtol(y.dtype):
                suggestion = parent
                break
        except ValueError:
            continue
    hint = (
        f" Use an enclosing module that is a cut, e.g. at={suggestion!r}."
        if suggestion
        else " Use the output of a whole block (e.g. a full residual block) instead of a sub-layer."
    )
    return (
        f"module {at!r} is not a cut of the model: feeding sample i's input with sample j's activation at "
        f"{at!r} does not reproduce sample j's logits (relative error {err:.2e} > {tol:.0e}), so part of the "
        f"output bypasses it (e.g. a skip connection around it).{hint}"
    )


# --------------------------------------------------------------------------------------------
# the tail


class _HookTail(nn.Module):
    """``(B, D)`` interpolated activations -> ``(B, O)`` logits by re-running the model with ``at`` replaced.

    The probe input of sample 0 is repeated ``B`` times (the cut check guarantees the logits depend
    on the input only through the activation).
    """

    def __init__(self, model: nn.Module, module: nn.Module, args: tuple[torch.Tensor, ...],
                 act_shape: Sequence[int], output: OutputSelector, batch_dim: int):
        super().__init__()
        self.model = model                       # registered: its parameters decide dtype/device checks
        self._module = [module]                  # list: not registered twice
        self._args0 = _take(args, torch.zeros(1, dtype=torch.long), batch_dim)
        self._act_shape = tuple(act_shape)       # per-sample shape, batch dim removed
        self._output = output
        self._batch_dim = batch_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        act = x.reshape(B, *self._act_shape).movedim(0, self._batch_dim).contiguous()
        args = _take(self._args0, torch.zeros(B, dtype=torch.long), self._batch_dim)  # sample 0, B times
        out = _run_replaced(self.model, self._module[0], args, act)
        return _select(out, self._output, B)


def _prepare(model, inputs, at, batch_dim):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    if isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or batch_dim < 0:
        raise ValueError(f"batch_dim must be a non-negative int (0 batch-first, 1 sequence-first); got {batch_dim!r}")
    module = _find_module(model, at)
    args = _as_args(inputs)
    n = _n_samples(args, batch_dim)
    if n < 2:
        raise ValueError(f"inputs hold {n} sample(s) along batch_dim={batch_dim}; LMN needs at least 2")
    _check_devices(model, args)
    return args, module, n


def _forward(model, module, at, args, output, n, batch_dim):
    out, act = _capture(model, module, at, args)
    if act.dim() <= batch_dim or act.shape[batch_dim] != n:
        raise ValueError(
            f"module {at!r} outputs shape {tuple(act.shape)}, which does not have the {n} samples along "
            f"batch_dim={batch_dim}; check batch_dim (1 for sequence-first activations)"
        )
    return _select(out, output, n), act


def _sequential_tail(model: nn.Module, at: str) -> nn.Sequential | None:
    """The modules after ``at`` when ``at`` sits in (nested) plain ``nn.Sequential`` chains, else None.

    For ``at = "a.b"``: ``model.a[b + 1:]`` then ``model[a + 1:]``; every container on the path
    must be a plain ``nn.Sequential`` (its forward is the chain).
    """
    parts, container, rest = at.split("."), model, []
    for part in parts:
        if not is_plain_sequential(container):
            return None
        names = [name for name, _ in container.named_children()]
        if part not in names:
            return None
        k = names.index(part)
        rest.append(list(container.children())[k + 1:])
        container = getattr(container, part)
    return nn.Sequential(*[m for level in reversed(rest) for m in level])


def lmn_at(
    model: nn.Module,
    inputs,
    at: str = "blocks.0",
    output: OutputSelector = None,
    batch_dim: int = 0,
    n_lambda: int = 21,
    backend: str = "auto",
    *,
    check: bool = True,
    chunk_bytes: int | None = None,
) -> LMNResult:
    """Linear mapping number at the output of the submodule ``at`` of ``model``, over the probe ``inputs``.

    ``h`` is ``at``'s output with each sample's activation flattened (``(N, D)``, ``D`` the product of
    the per-sample shape, e.g. ``seq * d_model`` for a transformer block); the tail is the rest of the
    model up to the logits selected by ``output``. Interpolating the whole ``(seq, d)`` activation of
    a sample is the sequence-model analogue of the paper's hidden-layer interpolation.

    Args:
        model: any ``nn.Module``; left exactly as it was (mode, parameters, grads, RNG, hooks).
        inputs: the model's input (a tensor, or a tuple/list of tensors passed positionally) for the
            ``N`` probe samples, batched along ``batch_dim``, on the model's device.
        at: name of the submodule whose output is the representation, as in ``model.named_modules()``
            (``"layers.0"``, ``"3"``...). A module returning a tuple contributes element 0.
        output: how to get ``(N, O)`` logits from the model's output: ``None`` (it already is), an int
            (tuple element) or a callable, e.g. ``lambda out: out[-1]`` for the last position of a
            sequence-first model.
        batch_dim: dimension of the samples in ``inputs`` and in ``at``'s output (1 for
            sequence-first ``(seq, batch, ...)`` layouts such as ``nn.MultiheadAttention`` defaults).
        n_lambda, backend, chunk_bytes: as in :func:`grokfast_metrics.lmn`.
        check: run the cut check (default True; a plain ``nn.Sequential`` child needs none).

    Returns:
        :class:`LMNResult` of ``h`` through the rest of the model.

    Raises:
        ValueError: unknown ``at`` (lists valid names), ``at`` never called or called more than once,
            ``at`` is not a cut (names an enclosing module that is), logits not 2-D ``(N, O)``,
            inputs on another device than the model, fewer than 2 samples.
        TypeError: ``model``/``inputs``/``output`` of the wrong type.
    """
    args, module, n = _prepare(model, inputs, at, batch_dim)
    with torch.no_grad(), eval_mode(model):
        y, act = _forward(model, module, at, args, output, n, batch_dim)
        h = act.movedim(batch_dim, 0).reshape(n, -1)
        seq_tail = _sequential_tail(model, at) if output is None and batch_dim == 0 and act.dim() == 2 else None
        if seq_tail is not None:
            # a plain Sequential is a chain: every child is a cut, the tail is the modules after it
            return lmn(h, seq_tail if len(seq_tail) else nn.Identity(), n_lambda, backend, chunk_bytes=chunk_bytes)
        if check:
            _enforce_cut(model, module, at, args, act, y, output, batch_dim)
        per_sample = act.movedim(batch_dim, 0).shape[1:]
        tail = _HookTail(model, module, args, per_sample, output, batch_dim)
        return lmn(h, tail, n_lambda, backend, chunk_bytes=chunk_bytes)
