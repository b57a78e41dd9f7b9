"""The plan of ``lmn_at``: everything decided once per model, probe set, ``at``/``to`` and layout.

:class:`Plan` checks the arguments, runs the probe once, picks the tail (chain, ``torch.fx`` split or
hooks, from :mod:`grokfast_metrics.dropin.split`), runs the cut check and computes LMN on the model's
current weights; :class:`~grokfast_metrics.LMNTracker` builds one and reuses it. The affine-tail
warning (:class:`AffineTailWarning`, :func:`emit_affine_warning`) is emitted from here.
:mod:`grokfast_metrics.dropin.measure` re-exports every public name.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.fx as fx
from torch import nn

from ..compute import core
from ..compute.core import LMNResult, _param_dtype, connectivity, lmn_from_connectivity
from ..foundation.policy import check_n_lambda
from ..foundation.runtime import eval_mode
from ..foundation.tail import parse_tail
from .affine import AffineTailWarning, emit_affine_warning
from .checks import (
    _agrees,
    _cut_error,
    _cut_rtol,
    _device_type,
    _ones_if_finite,
    _pairs,
    _read_at_one_position,
    _rows,
    _samples_hint,
    _tail_kind,
    why_not_chain,
)
from .compiled import compile_note, report_affine_shortcut, report_path, run_generic
from .hooks import (
    OutputSelector,
    _as_args,
    _as_selector,
    _capture,
    _check_act_layout,
    _check_devices,
    _find_module,
    _layout_hint,
    _n_samples,
    _plain_name,
    _run_replaced,
    _select,
    _select_to,
    _Stop,
    _take,
    model_lock,
    suspend_user_hooks,
    unwrap_compiled,
)
from .split import _AFFINE, _chain_tail, _container_split, _HookTail, _selector_affine, _SplitTail, _trace_split

if TYPE_CHECKING:
    from ..compute.generic import CompiledTail
    from .lower import Lowering

__all__ = ["PATHS", "AffineTailWarning", "Plan", "emit_affine_warning"]


#: default batch of interpolated input for a pruned tail on the CPU (bytes): 4 MiB (the unpruned tails' 1 MiB stays);
#: the measurements behind it: benchmarks/RESULTS.md, "Pruned tails: the CPU chunk size".
PRUNED_CHUNK_BYTES_CPU = 4 << 20

#: what ``path=`` accepts: ``"auto"`` (chain, else split, else hooks), or one of them explicitly
PATHS = ("auto", "chain", "split", "hooks")


# --------------------------------------------------------------------------------------------
# the plan: everything decided once per (model, inputs, at, to, layout)

_T = TypeVar("_T")


def _built(part: _T | None) -> _T:
    """A part of the plan its first forward builds (:meth:`Plan.forward`: the tail, the activation's shape) before any
    computation reads it."""
    if part is None:
        raise RuntimeError("the plan's tail was read before the probe's forward built it")
    return part


class Plan:
    """What ``lmn_at`` runs for one model, probe set, ``at``/``to`` and layout; built once, run many times.

    :class:`~grokfast_metrics.LMNTracker` builds one at construction (every check of the arguments
    happens there) and reuses it at every computation. A model whose modules change afterwards (``m[2] =
    nn.Linear(...)``, a module added or removed) is noticed at the next computation, which finds ``at`` and ``to``
    again and rebuilds the tail (and its cut check): the plan always measures the model as it is.

    Attributes:
        path: ``"chain"``, ``"split"`` or ``"hooks"`` (``"split"`` may fall back to ``"hooks"`` after a run);
            ``None`` until the first forward of the probe.
        reason: one line saying why that path runs (e.g. why the fx split was not possible), also reported by
            :func:`grokfast_metrics.compute.core.last_run_info` after each computation (``"path"``, ``"path_reason"``).
        lowering: for a split tail, :class:`~grokfast_metrics.dropin.lower.Lowering`: the tail lowered to the fused
            kernels' MLP spec (``lowering.tail``) and what it computes, or ``None`` and why it was not lowered.
        ran: what the last computation ran and why (path, lowered or not, backend), e.g. ``"split, lowered (cpu):
            position 2 of 3 -> Linear(128, 512) absorbed -> relu -> ..."``.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Any,
        at: str,
        to: str | None = None,
        output: OutputSelector = None,
        batch_dim: int = 0,
        input_batch_dim: int | None = None,
        path: str = "auto",
        user_hooks: bool = False,
        *,
        compile: bool = False,
    ):
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
        self._find_modules()
        if self.to is not None and self.to == self.at:
            raise ValueError(f"to={to!r} is at itself; `to` must be a module after `at`")
        self.output = _as_selector(output, batch_dim)
        self.batch_dim = batch_dim
        self.input_batch_dim = batch_dim if input_batch_dim is None else input_batch_dim
        self.args = _as_args(inputs)
        self.n = _n_samples(self.args, self.input_batch_dim)
        if self.n < 2:
            raise ValueError(f"inputs hold {self.n} sample(s) along input_batch_dim={self.input_batch_dim}; LMN needs at least 2")
        _check_devices(self.model, self.args)
        self.requested = path
        self.user_hooks = bool(user_hooks)
        self.compile = bool(compile)  # a split tail on the generic path runs through torch.compile (generic.CompiledTail)
        self._compiled: dict[tuple[int, int, torch.dtype], CompiledTail] = {}  # (tail id, rows, dtype) -> CompiledTail
        self.compile_info: dict[str, Any] | None = None  # what compile=True did in the last computation (last_run_info's "compile")
        self.path: str | None = None
        self.reason: str = "not built yet (the plan runs the probe at its first computation)"
        self.tail: nn.Module | None = None
        self.act_shape: tuple[int, ...] | None = None
        self.checked = False
        self.affine: bool | None = None  # structurally affine (None: unknown until L is seen)
        self.affine_warned = False
        self.prune = True  # position pruning of a split tail (False: run every position, as before)
        self.pruned = False  # whether the split tail runs pruned
        self.full_tail: _SplitTail | None = None  # the split tail at every position (the reference runs it)
        self.sliced_tail: _SplitTail | None = None  # the pruned tail taking h at its one needed position only
        self.sliced: tuple[int, int] | None = None  # (axis, position) of that slice of at's output
        self.lowering: Lowering | None = None  # of a split tail (set by _build)
        self._lowered_at: tuple[tuple[int, int], ...] | None = None  # parameter versions the lowered tail's folded weights were taken at
        self.ran = ""

    def _find_modules(self) -> None:
        """``at`` and ``to`` in the model, and the model's modules as they are now (to notice a change)."""
        self.module = _find_module(self.model, self.at)
        self.to_module = None if self.to is None else _find_module(self.model, self.to, "to")
        self._structure = tuple(self.model.named_modules())

    def _rebuild_if_changed(self) -> None:
        """A module of the model was replaced, added or removed since the plan was built: build it again."""
        now = tuple(self.model.named_modules())
        if len(now) == len(self._structure) and all(a[0] == b[0] and a[1] is b[1] for a, b in zip(now, self._structure)):
            return
        self._find_modules()
        self.path, self.tail, self.act_shape, self.checked, self.affine, self.affine_warned = None, None, None, False, None, False
        self.pruned, self.full_tail, self.sliced_tail, self.sliced = False, None, None, None
        self.lowering, self._lowered_at, self.ran, self._compiled = None, None, "", {}

    @contextmanager
    def running(self) -> Iterator[None]:
        """Context of every computation: no grad, eval mode (restored), RNG forked, user hooks suspended (in this
        thread), one computation on the model at a time (:func:`~grokfast_metrics.dropin.hooks.model_lock`)."""
        with model_lock(self.model), torch.no_grad(), eval_mode(self.model), suspend_user_hooks(self.model, self.user_hooks):
            yield

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(selected outputs (N, O), activation at at)`` of the probe; builds the tail on the first call (and again
        after the model's modules changed)."""
        self._rebuild_if_changed()
        out, act, self._raw_is_tensor = _capture(self.model, self.module, self.at, self.args, self.to_module, self.to)
        _check_act_layout(act, self.at, self.n, self.batch_dim, self.input_batch_dim, self.args)
        if self.to is not None:
            y = _select_to(out, self.output, self.n, self.batch_dim)
        else:
            rows = _rows(out, self.output)
            y = _select(
                out,
                self.output,
                self.n,
                _samples_hint(act, self.at, self.batch_dim, rows) or _layout_hint(self.args, self.input_batch_dim, rows),
            )
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
                self.reason = f"at={self.at!r} sits in plain nn.Sequential chains: the modules after it are the tail"
                spec = parse_tail(self.tail)
                self.affine = bool(spec is not None and spec.is_affine) or isinstance(self.tail, nn.Identity)
                return
        if req == "chain":
            raise ValueError(
                f"path='chain' needs at={self.at!r} in plain nn.Sequential chains, output=None, batch_dim=0 and a 2-D activation"
            )
        why_not = why_not_chain(self, act) if req == "auto" else "path='split' requested"
        if req in ("auto", "split"):
            gm, why = _trace_split(
                self.model,
                self.at,
                self.to,
                explain=True,
                args=self.args,
                input_batch_dim=self.input_batch_dim,
                tuple_at=not self._raw_is_tensor,
            )
            if gm is not None:
                self.path, self.tail = "split", _SplitTail(gm, self)
                self.full_tail = self.tail
                self.reason = (
                    f"{why_not}; torch.fx traces the model and the layers after {self.at!r} depend on the "
                    "input only through it: the traced tail runs alone"
                )
                self._lower()  # from the whole split tail, before pruning replaces self.tail
                self._prune(gm, act)
                self.affine = _tail_kind(gm) <= _AFFINE and (self.to is not None or _selector_affine(self.output))
                if not self.affine:
                    self.affine = None
                return
            if why.startswith("torch.fx cannot trace") and self.to is None:
                gm, inner = _container_split(self.model, self.at, self.args, not self._raw_is_tensor)
                if gm is not None:
                    self.path, self.tail = "split", _SplitTail(gm, self)
                    self.full_tail = self.tail
                    self.reason = (
                        f"{why_not}; torch.fx cannot trace the model ({why.split('(', 1)[-1].rstrip(')')}), "
                        f"but the model returns {inner!r}'s output as it is and {inner!r} traces: the "
                        f"layers after {self.at!r} inside it run alone"
                    )
                    self._lower()
                    self._prune(gm, act)
                    self.affine = (_tail_kind(gm) <= _AFFINE and _selector_affine(self.output)) or None
                    return
        if req == "split":
            raise ValueError(f"path='split' cannot run: torch.fx does not split the model at {self.at!r} ({why}); use path='hooks'")
        self.path, self.tail = "hooks", _HookTail(self)
        self.reason = (
            f"{why_not}; no fx split: {why}: the whole model re-runs with {self.at!r}'s output replaced"
            if req == "auto"
            else "path='hooks' requested"
        )

    def _prune(self, gm: fx.GraphModule, act: torch.Tensor) -> None:
        """Position pruning of the split tail (:mod:`grokfast_metrics.dropin.prune`): only what the selected logits need."""
        from .prune import prune_positions

        if self.to is not None or self.user_hooks or not self.prune:
            return
        pruned = prune_positions(gm, act, self.output)
        if pruned is not None:
            self.tail, self.pruned = _SplitTail(pruned, self), True
            self.reason += "; pruned to the positions the selected logits depend on"
            sliced = _read_at_one_position(pruned)
            if sliced is not None:
                gm_s, (k, p) = sliced
                self.sliced, self.sliced_tail = (k, p), _SplitTail(gm_s, self)
                shape = list(act.shape)
                shape[k] = 1
                self.sliced_tail._act_shape = tuple(torch.Size(shape)[: self.batch_dim] + torch.Size(shape)[self.batch_dim + 1 :])
                self.reason += f" (h itself only at position {p} of axis {k}: only that position is interpolated)"

    def _lower(self) -> Lowering:
        """Lower the split tail (:mod:`grokfast_metrics.dropin.lower`) unless its parameters are unchanged since the last time."""
        from .lower import Lowering, lower

        graph = _built(self.full_tail).graph  # never the pruned tail
        key = tuple((id(t), t._version) for t in [*graph.parameters(), *graph.buffers()])
        if self.lowering is not None and key == self._lowered_at:
            return self.lowering
        if self.to is not None:
            self.lowering = Lowering(None, "to= sub-networks are not lowered")
        else:
            dtype = _param_dtype(self.model, torch.float32)
            self.lowering = lower(graph, _built(self.act_shape), self.output, dtype, self.batch_dim)
        self._lowered_at = key
        return self.lowering

    def enforce_cut(self, act: torch.Tensor, y: torch.Tensor) -> float:
        """The cut check (see :func:`check_cut`); raises ``ValueError`` naming an enclosing cut."""
        src, dst = _pairs(y.shape[0], y.device)
        err = _cut_error(lambda s, d: self._mixed(self.module, act, s, d), y, src, dst)
        tol = _cut_rtol(y.dtype)
        if err > tol:
            raise ValueError(self._not_a_cut_message(err, tol))
        self.checked = True
        return err

    def _mixed(self, module: nn.Module, act: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        moved = act.index_select(self.batch_dim, dst)
        out = _run_replaced(self.model, module, _take(self.args, src, self.input_batch_dim), moved, self.to_module)
        if self.to is not None:
            return _select_to(out, self.output, len(src), self.batch_dim)
        return _select(out, self.output, len(src))

    def _is_cut(self, name: str, modules: dict[str, nn.Module]) -> bool:
        """Whether module ``name`` passes the cut check (False when it cannot be checked)."""
        try:
            out, act, _ = _capture(self.model, modules[name], name, self.args, self.to_module, self.to)
            y = _select_to(out, self.output, self.n, self.batch_dim) if self.to is not None else _select(out, self.output, self.n)
            if act.dim() <= self.batch_dim or act.shape[self.batch_dim] != self.n:
                return False
            src, dst = _pairs(self.n, y.device)
            module = modules[name]
            return _cut_error(lambda s, d: self._mixed(module, act, s, d), y, src, dst) <= _cut_rtol(y.dtype)
        except (ValueError, _Stop):
            return False

    def _affine_after(self, name: str) -> bool:
        """Whether only affine layers follow module ``name`` (known structurally from its fx split)."""
        gm = _trace_split(self.model, name, self.to, args=self.args, input_batch_dim=self.input_batch_dim)
        return gm is not None and _tail_kind(gm) <= _AFFINE and (self.to is not None or _selector_affine(self.output))

    def _earlier_modules(self, modules: dict[str, nn.Module]) -> list[str]:
        """Modules that finish before ``at`` in the forward, nearest first (ancestors of ``at`` excluded)."""
        order: list[str] = []
        handles = [m.register_forward_hook(lambda _m, _i, _o, n=n: order.append(n)) for n, m in modules.items() if n]
        try:
            _capture(self.model, self.module, self.at, self.args)
        except ValueError:
            return []
        finally:
            for h in handles:
                h.remove()
        if self.at not in order:
            return []
        before = order[: order.index(self.at)]
        return [n for n in reversed(before) if not self.at.startswith(n + ".")]

    def _not_a_cut_message(self, err: float, tol: float) -> str:
        parts = self.at.split(".")
        modules = dict(self.model.named_modules())
        enclosing = next((p for p in (".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1)) if self._is_cut(p, modules)), None)
        suggestion, note = enclosing, ""
        if enclosing is not None and self._affine_after(enclosing):
            # e.g. TransformerLens' blocks.0.mlp.hook_post: 'blocks.0' is a cut, but only the unembedding follows it
            earlier = next((n for n in self._earlier_modules(modules)[:24] if self._is_cut(n, modules) and not self._affine_after(n)), None)
            if earlier is not None:
                suggestion = earlier
                note = (
                    f" ({enclosing!r} is a cut too, but only affine layers follow it, so its LMN is 1; "
                    f"{earlier!r} is the nearest earlier module that is a cut with a nonlinearity after it)"
                )
        if suggestion is None:
            hint = " Use the output of a whole block (e.g. a full residual block) instead of a sub-layer."
        elif suggestion == enclosing:
            hint = f" Use an enclosing module that is a cut, e.g. at={suggestion!r}."
        else:
            hint = f" Use a module that is a cut, e.g. at={suggestion!r}{note}."
        target = f"module {self.to!r}'s output (to=)" if self.to else "logits"
        return (
            f"module {self.at!r} is not a cut of the model: feeding sample i's input with sample j's activation "
            f"at {self.at!r} does not reproduce sample j's {target} (relative error {err:.2e} > {tol:.0e}), so "
            f"part of the output bypasses it (e.g. a skip connection around it).{hint}"
        )

    def compute(
        self, n_lambda: int = 21, backend: str = "auto", *, check: bool = True, chunk_bytes: int | None = None, warn_affine: bool = True
    ) -> LMNResult:
        """One LMN computation on the model's current weights (see :func:`lmn_at`)."""
        return lmn_from_connectivity(self.connectivity(n_lambda, backend, check=check, chunk_bytes=chunk_bytes, warn_affine=warn_affine))

    def connectivity(
        self, n_lambda: int = 21, backend: str = "auto", *, check: bool = True, chunk_bytes: int | None = None, warn_affine: bool = True
    ) -> torch.Tensor:
        """The connectivity matrix ``L`` on the model's current weights: :meth:`compute` without the eigen step."""
        n_lambda = check_n_lambda(n_lambda)
        self.compile_info = None
        with self.running(), torch.autocast(_device_type(self.args), enabled=False):
            y, act = self.forward()
            h = act.movedim(self.batch_dim, 0).reshape(self.n, -1)
            if self.path != "chain" and check and not self.checked:
                self.enforce_cut(act, y)
            if self.affine and backend != "reference":
                # only affine layers follow: every path is a straight line and L is exactly 1 (nothing to compute)
                L = _ones_if_finite(h, y)
                report_affine_shortcut(self)
            elif self.path == "chain":
                L = connectivity(h, _built(self.tail), n_lambda, backend, chunk_bytes=chunk_bytes)
                self.ran = f"chain ({core.last_run_info().get('backend')})"
            else:
                L = self._generic(h, act, y, n_lambda, backend, chunk_bytes)
                self.ran += compile_note(self)
            numerically_affine = not self.affine and not self.affine_warned and warn_affine and self._affine_probe(h, L)
        report_path(self)
        if warn_affine and not self.affine_warned:
            if self.affine:
                self.affine_warned = True
                emit_affine_warning(
                    self.at, self.to, "structurally: only affine layers follow it; L = 1 exactly, not computed", model=self.model
                )
            elif numerically_affine:
                self.affine_warned = True
                emit_affine_warning(
                    self.at,
                    self.to,
                    "L is 1 to rounding, and in float64 the tail maps every probed path to a straight line",
                    model=self.model,
                )
        return L

    def _affine_probe(self, h: torch.Tensor, L: torch.Tensor) -> bool:
        """Whether ``L`` near 1 comes from an affine tail: its float64 copy maps the points of the pairs farthest
        from 1 onto the chord between the ends (to 1e-9 of the outputs' size; a LayerNorm or an activation
        bends it far more). fp32 rounding alone moves ``L`` off 1 by far more than 64 eps when some logits barely
        change between the samples, so a threshold on ``L`` itself cannot tell."""
        dev = (1.0 - L.double()).abs()
        if not bool(torch.isfinite(dev).all()) or float(dev.max()) > (1e-3 if L.dtype != torch.float64 else 1e-6):
            return False
        import copy

        n = h.shape[0]
        dev.fill_diagonal_(-1.0)
        h64 = h.detach().double()
        tail64 = copy.deepcopy(_built(self.tail)).double()
        lam = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64, device=h.device).view(-1, 1)
        for flat in dev.flatten().topk(min(8, n * (n - 1))).indices.tolist():
            i, j = divmod(flat, n)
            if i >= j or torch.equal(h64[i], h64[j]):
                continue
            ends = tail64(h64[[i, j]])
            mid = tail64(h64[i] + lam * (h64[j] - h64[i]))
            chord = ends[0] + lam * (ends[1] - ends[0])
            if float((mid - chord).abs().max()) > 1e-9 * max(float(ends.abs().max()), 1e-300):
                return False
        return True

    def _run_lowered(
        self, low: Lowering, h: torch.Tensor, y: torch.Tensor, n_lambda: int, backend: str, chunk_bytes: int | None
    ) -> torch.Tensor | None:
        """L through the lowered tail, or ``None`` (``low.tail`` is dropped, ``low.reason`` says why) when it did not
        lower after a parameter change or does not reproduce the model's outputs ``y``."""
        from ..compute import generic

        if low.tail is None:  # re-folded after a parameter change, it no longer lowers: low.reason says why
            return None
        # folded on the CPU in float64; runs where h is: the C++ kernel on the CPU, the Triton kernel on CUDA
        # (core._choose), else the generic path through the module
        low.tail.to(h.device)
        # the lowered tail must reproduce the model's own outputs (checked on every computation: one forward)
        try:
            y_low = generic.end_outputs(low.tail, h, _param_dtype(low.tail, h.dtype), y.dtype)
            agrees = _agrees(y_low, y)
        except Exception as e:  # e.g. non-finite outputs: the split tail decides, as before
            agrees, low.reason = False, f"{low.reason}; it failed on the probe: {type(e).__name__}: {e}"
        if not agrees:
            low.tail, low.reason = None, f"the lowered tail did not reproduce the model's outputs ({low.reason})"
            return None
        L = connectivity(h, low.tail, n_lambda, backend, chunk_bytes=chunk_bytes)
        self.ran = f"split, lowered ({core.last_run_info().get('backend')}): {low.reason}"
        return L

    def _generic(
        self, h: torch.Tensor, act: torch.Tensor, y: torch.Tensor, n_lambda: int, backend: str, chunk_bytes: int | None
    ) -> torch.Tensor:
        """L through the split or hook tail, by ``gm.connectivity`` (core chooses the backend, runs the generic path)."""
        from ..compute import generic

        if self.path == "split" and self.pruned and backend == "reference":
            # the yardstick runs every position: it checks the pruning too
            L = connectivity(h, _built(self.full_tail), n_lambda, backend, chunk_bytes=chunk_bytes)
            self.ran = f"split, generic ({core.last_run_info().get('backend')}); backend={backend!r} (every position)"
            return L
        low = self.lowering if self.path == "split" else None
        if low is not None and low.tail is not None and backend != "reference":
            low = self._lower()  # the folded weights follow the model's (re-folded when a parameter changed)
            L_low = self._run_lowered(low, h, y, n_lambda, backend, chunk_bytes)
            if L_low is not None:
                return L_low
        if self.path == "split" and self.pruned:
            h_run, tail = h, _built(self.tail)
            if self.sliced_tail is not None and self.sliced is not None:  # the tail reads h at one position only: that position
                k, p = self.sliced
                h_run, tail = act.narrow(k, p, 1).movedim(self.batch_dim, 0).reshape(self.n, -1), self.sliced_tail
            y_end = generic.end_outputs(tail, h_run, _param_dtype(tail, h_run.dtype), y.dtype)
            if _agrees(y_end, y):
                if chunk_bytes is None and h_run.device.type == "cpu":
                    chunk_bytes = PRUNED_CHUNK_BYTES_CPU
                L = run_generic(self, h_run, tail, n_lambda, backend, chunk_bytes)
                why = "" if low is None else (f"; not lowered: {low.reason}" if low.tail is None else f"; backend={backend!r}")
                self.ran = f"split, pruned, generic ({core.last_run_info().get('backend')}){why}"
                return L
            # the pruned graph does not reproduce the model: every position from now on
            self.tail, self.pruned, self.sliced_tail = self.full_tail, False, None
            self.reason = self.reason.replace(
                "; pruned to the positions the selected logits depend on", "; the pruned tail disagreed with the model: every position runs"
            )
        if self.path == "split":
            split = _built(self.tail)
            y_end = generic.end_outputs(split, h, _param_dtype(split, h.dtype), y.dtype)
            if not _agrees(y_end, y):
                # the traced graph does not reproduce the model (e.g. an in-place op it lost): hooks from now on
                self.path, self.tail, self.affine = "hooks", _HookTail(self), None
                self.reason = (
                    "the traced tail's outputs differed from the model's on the probe (e.g. an op "
                    "torch.fx lost): the whole model re-runs with at's output replaced"
                )
        L = run_generic(self, h, _built(self.tail), n_lambda, backend, chunk_bytes)
        why = "" if low is None else (f"; not lowered: {low.reason}" if low.tail is None else f"; backend={backend!r}")
        self.ran = f"{self.path}, generic ({core.last_run_info().get('backend')}){why}"
        return L
