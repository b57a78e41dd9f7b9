"""Lowering a traced tail to the fused kernels' MLP spec (docs/dropin.md, "Lowered split tails").

A tail traced with ``torch.fx`` (``lmn_at``'s split, or a module traced here) that computes, per sample,

    y = W_out act(W_in x_q + b_in) + W_skip x_q + c          # x_q: the representation at one position q

is an MLP tail with a skip term: :func:`lower` interprets the graph symbolically and returns a
:class:`LoweredTail` whose ``lowered_spec`` (:class:`~grokfast_metrics.foundation.tail.MLPTail` with ``select``,
``skip`` and an exact float64 twin) the fused kernels run (the C++ kernel on the CPU, the Triton kernel v1 on CUDA):
``z = W_in x + b_in`` absorbed once per sample, the hidden activations per interpolation point, one folded output
matrix, and the skip term ``u = W_skip x`` computed once per sample entering each pair as ``lam (u_j - u_i)``.

What lowers (everything else returns ``None`` and the reason; the tail keeps the generic path):

* ``nn.Linear``, ``F.linear``, ``x @ W``, two-operand ``torch.einsum`` contracting the feature axis with a
  parameter (``'md,bpd->bpm'``), scaling by constants, adding constants (biases, per-position constants);
* the elementwise activations of :data:`~grokfast_metrics.foundation.tail.ACTIVATIONS` as modules, functions or methods
  (one hidden layer: an activation of a value that already went through one does not lower);
* residual adds of the input (or of any affine value of it) and of values sharing the same hidden layer;
* position selection by indexing the position axis (``out[:, -1]``), in the graph or in the ``output=``
  selector: every position-wise op commutes with it, so only the selected position is computed;
* consecutive affine maps fold in float64 (``W_U W_out`` is one matrix); identity modules (``nn.Identity``,
  ``nn.Dropout`` in eval mode, TransformerLens-style ``HookPoint``) vanish; other modules are traced through.

Not lowered: ``LayerNorm``/``RMSNorm`` after the cut (they divide by the path's own standard deviation, which
is not affine along the interpolation path, so neither the absorption nor the skip term is exact), attention,
reshapes that mix positions and features, more than one hidden layer, more than one output position,
sequence-first layouts (``batch_dim != 0``) and ``to=``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from ..foundation.tail import IDENTITY, MLPTail
from .hooks import _Selector
from .symbolic import (
    NotLowerable,
    _Interp,
    _Sym,
    _traced_selector,
)

# --------------------------------------------------------------------------------------------
# the lowered tail


class LoweredTail(nn.Module):
    """``(B, D) -> (B, O)``: ``W_out act(W_in h[:, lo:hi] + b_in) + b_out + W_skip h[:, lo:hi]``.

    ``lowered_spec`` is what :func:`grokfast_metrics.foundation.tail.parse_tail` returns for it (the fused CPU kernel and the
    Triton kernel v1 run it; ``backend="torch"`` runs this module's forward on the generic path). ``describe`` names what it computes.
    """

    def __init__(self, sym: _Sym, in_positions: int, in_width: int, dtype: torch.dtype, describe: str):
        super().__init__()
        hidden = sym.hidden()
        if hidden is None:
            raise NotLowerable("the tail is affine (no activation reaches the selected logits)")
        hid, w_out, hidx = hidden
        q = int(sym.pos)
        hp = int(hidx)
        if int(hid.pos[hp]) != q:
            raise NotLowerable("the hidden layer reads another position than the output")
        self.select = (q * in_width, (q + 1) * in_width)
        self.in_positions = in_positions
        w_in, b_in, b_out = hid.A, hid.c[hp], sym.c.reshape(-1)
        skip = None if sym.A is None or not bool(sym.A.any()) else sym.A
        self.fc_in = _linear(w_in, b_in, dtype)
        self.fc_out = _linear(w_out, b_out, dtype)
        self.acts = list(hid.acts)
        self.skip = None if skip is None else _linear(skip, None, dtype)
        self.describe = describe
        full = in_positions * in_width

        def spec(lin_in: nn.Linear, lin_out: nn.Linear, w_skip: torch.Tensor | None, exact: MLPTail | None) -> MLPTail:
            return MLPTail(
                pre=[lin_in],
                stages=[(self.acts or [IDENTITY], lin_out)],
                final=[],
                in_features=full,
                select=self.select,
                skip=w_skip,
                exact=exact,
            )

        exact = None
        if dtype != torch.float64:
            exact = spec(_linear(w_in, b_in, torch.float64), _linear(w_out, b_out, torch.float64), skip, None)
        self.lowered_spec = spec(self.fc_in, self.fc_out, skip, exact)

    @property
    def flop_per_pair_t(self) -> int:
        """Useful FLOP of one interpolation point: the output matrix (``2 d_hidden O``)."""
        return 2 * self.fc_out.in_features * self.fc_out.out_features

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h[:, self.select[0] : self.select[1]]
        a = self.fc_in(x)
        for act in self.acts:
            a = act.torch(a)
        y: torch.Tensor = self.fc_out(a)
        if self.skip is not None:
            y = y + self.skip(x)
        return y


def _linear(W: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    lin: nn.Linear = torch.nn.utils.skip_init(  # type: ignore[no-untyped-call]  # torch leaves skip_init unannotated
        nn.Linear, W.shape[1], W.shape[0], bias=b is not None, dtype=dtype
    )
    lin.weight = nn.Parameter(W.to(dtype).contiguous(), requires_grad=False)
    if b is not None:
        lin.bias = nn.Parameter(b.to(dtype).contiguous(), requires_grad=False)
    return lin


@dataclass
class Lowering:
    """The outcome of :func:`lower`: ``tail`` (a :class:`LoweredTail`) or ``None``, and ``reason``: what it computes
    (lowered) or why it did not lower."""

    tail: LoweredTail | None
    reason: str


def lower(
    graph_module: nn.Module, act_shape: tuple[int, ...], output: _Selector = None, dtype: torch.dtype = torch.float32, batch_dim: int = 0
) -> Lowering:
    """Lower a traced tail (``h`` of per-sample shape ``act_shape``, batch first, -> its output, then ``output``).

    Args:
        graph_module: an ``fx.GraphModule`` whose one input is the representation (e.g. ``lmn_at``'s split), or
            any module (it is traced here).
        act_shape: per-sample shape of the representation, ``(F,)`` or ``(positions, F)``.
        output: ``lmn_at``'s selector: ``None``, an int (tuple element) or a traceable callable (``out[:, -1]``).
        dtype: the dtype of the model's parameters (the lowered weights are folded in float64, then cast).
        batch_dim: the samples' axis of the representation; only 0 lowers.

    Returns:
        :class:`Lowering`: the tail and what it computes, or ``None`` and the reason.
    """
    if batch_dim != 0:
        return Lowering(None, f"batch_dim={batch_dim} (sequence-first blocks are not lowered)")
    if dtype not in (torch.float32, torch.float64):
        return Lowering(None, f"the model is {dtype} (float32 and float64 models are lowered)")
    if len(act_shape) not in (1, 2):
        return Lowering(None, f"the representation has per-sample shape {tuple(act_shape)} (1 or 2 axes are lowered)")
    S, F_in = (1, act_shape[0]) if len(act_shape) == 1 else act_shape
    it = _Interp(S, F_in)
    try:
        if isinstance(graph_module, fx.GraphModule):
            out = it.run_graph(graph_module, [it.input(len(act_shape) == 2)])
        else:
            out = it.trace_through(graph_module, type(graph_module).__name__, [it.input(len(act_shape) == 2)], {})
        if isinstance(output, int) and not isinstance(output, bool):
            out = it.getitem(out, output) if not isinstance(out, _Sym) else out
            if isinstance(out, (tuple, list)):
                out = out[output]
        elif output is not None:
            sel = _traced_selector(output)
            out = it.run_graph(sel, [out])
        if not isinstance(out, _Sym):
            raise NotLowerable("the selected output is not one tensor computed from the representation")
        if out.pos.dim() != 0:
            raise NotLowerable(f"the selected logits span {out.pos.numel()} positions (one position is lowered)")
        if out.hid is None:
            raise NotLowerable("the tail is affine (no activation reaches the selected logits)")
        q = int(out.pos)
        H, O = out.hid.A.shape[0], out.width
        parts = [
            f"position {q} of {S}" if len(act_shape) == 2 else "the representation",
            f"Linear({F_in}, {H}) absorbed",
            "-".join(a.name for a in out.hid.acts),
            f"Linear({H}, {O}) folded",
        ]
        if out.A is not None and bool(out.A.any()):
            parts.append(f"skip Linear({F_in}, {O}) as lam (u_j - u_i)")
        tail = LoweredTail(out, S, F_in, dtype, " -> ".join(parts))
        return Lowering(tail, tail.describe)
    except NotLowerable as e:
        return Lowering(None, str(e))
    except Exception as e:  # a graph the interpreter does not expect must never break lmn_at: the generic path runs
        return Lowering(None, f"lowering failed ({type(e).__name__}: {e})")
