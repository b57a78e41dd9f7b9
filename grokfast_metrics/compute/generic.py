"""The generic path for any tail module: a fast batched loop and its float64 paper-literal reference.

Both take ``h`` (``(N, D)``) and a ``tail`` module mapping a ``(B, D)`` batch to ``(B, O)`` logits
(``lmn_at``'s split or hook tails, or any user module):

* :func:`connectivity_tail` (what ``core`` runs for any tail that is not an MLP, with ``backend="torch"``
  or ``"auto"``) runs the tail once on the ``N`` samples (the ``t = 0`` and ``t = 1``
  ends of every path are the samples themselves) and on the ``T - 2`` interior points of each pair
  only, in batches of up to ``chunk_bytes`` of interpolated input (cache-sized on the CPU, as large
  as free memory allows on CUDA: see :func:`default_chunk_bytes`), reusing the shared r² reduction
  (:func:`grokfast_metrics.compute.torch_paths.r2_from_paths`, constant-path rule included). Its float64 passes (fp64
  models; the fp64 recompute of an fp32 pass's flagged pairs, :func:`pairs_connectivity`) return NaN for a pair they
  cannot resolve to the contract from outside the module (a unit saturated beyond float64's rounding).
* :func:`reference_connectivity` is the yardstick: for every pair ``i < j`` it runs the ``T``
  points ``h_i + lam_t (h_j - h_i)`` through a float64 copy of the module itself, one pair at a
  time, and reduces with the NumPy reference's :func:`grokfast_metrics.compute.reference.pair_r2`. Slow on
  purpose; ``backend="reference"`` runs it for every tail that is not an MLP (``gm.lmn``,
  ``gm.connectivity`` and ``lmn_at``'s split and hook tails alike).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..foundation import policy
from ..foundation.errors import NonFiniteOutputError
from ..foundation.policy import CONST_RTOL, FLAGGED, lambdas
from ..foundation.runtime import eval_mode
from .torch_paths import new_L, r2_from_centred, r2_from_paths, triu_pair_chunks

#: the generic path's input-rounding gain (see ``_path_r2``): its flag treats each output's error as at least
#: ``eps * IN_GAIN * |x| / |h_j - h_i|`` of its spread
IN_GAIN = 16.0
#: the generic path's float64 check for fp64 models (docs/lmn.md, "Accuracy in the corners"): a pair whose float64 error
#: estimate (the fp32 flag's, computed in float64) exceeds it cannot be resolved from outside the module to the 1e-10
#: fp64 contract; its ``L_ij`` is NaN. (The fp64 recompute of an fp32 model's flagged pairs uses ``FLAG_KAPPA``, the fp32
#: contract's threshold.)
UNRESOLVED_KAPPA = 1e-10
#: default batch of interpolated tail input per forward: CPU (bytes), CUDA (cap; also <= 1/8 of free memory)
CHUNK_BYTES_CPU = 1 << 20
CHUNK_BYTES_CUDA = 1 << 30


def default_chunk_bytes(device: torch.device) -> int:
    """Bytes of interpolated input per tail forward: 1 MiB on the CPU; on CUDA min(1 GiB, free / 8).

    On the CPU, cache-sized batches win (Grokfast-style decoder, N=64, 1 thread, first block: 0.84 s at
    0.5-2 MiB, 0.90 s at 8 MiB, 1.36 s at 32 MiB; 2 threads: best at 0.25-1 MiB); on a GPU, the larger the
    batch the better.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(CHUNK_BYTES_CUDA, free // 8))
    return CHUNK_BYTES_CPU


#: a tail: a module, or any callable ``(B, D) batch -> (B, O) logits``
Forward = Callable[[torch.Tensor], Any]


def run_tail(tail: Forward, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``tail(x)`` checked to be ``(B, O)`` real floating-point logits, cast to ``out_dtype``."""
    try:
        y = tail(x)
    except RuntimeError as e:
        raise ValueError(f"tail failed on a batch of h or its interpolations (B={x.shape[0]}, D={x.shape[1]}): {e}") from e
    if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != x.shape[0] or not y.is_floating_point():
        shape = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"tail must map a (B, {x.shape[1]}) batch to (B, O) floating-point logits; for B={x.shape[0]} it returned {shape}")
    return y.to(out_dtype)


def end_outputs(tail: Forward, h: torch.Tensor, run_dtype: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    """The tail (a module or a callable) on the samples themselves (``(N, O)``); ``NonFiniteOutputError`` when
    not finite."""
    y = run_tail(tail, h.to(run_dtype, copy=True), out_dtype)  # a copy: the tail may work in place
    bad = ~torch.isfinite(y).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise NonFiniteOutputError(
            f"the tail's outputs are NaN/Inf for {len(rows)} of the {h.shape[0]} samples (first: {rows[0]}): the "
            "model has diverged or overflows its dtype, and LMN is undefined there"
        )
    return y


def tail_params(tail: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Copies of the tail's floating parameters and buffers in ``dtype`` (the module is never mutated)."""
    out = {}
    for name, t in list(tail.named_parameters()) + list(tail.named_buffers()):
        out[name] = t.detach().to(dtype) if t.is_floating_point() else t
    return out


def widest(tail: nn.Module, d: int) -> int:
    """Widest layer of an arbitrary module, estimated from its parameters' shapes (at least ``d``)."""
    return max([d] + [int(s) for p in tail.parameters() for s in p.shape])


def _batch_rows(tail: nn.Module, h: torch.Tensor, chunk_bytes: int | None) -> int:
    """Rows of interpolated input per forward: ``chunk_bytes`` of activations of the tail's widest layer."""
    budget = default_chunk_bytes(h.device) if chunk_bytes is None else int(chunk_bytes)
    return max(1, budget // max(1, widest(tail, h.shape[1]) * h.element_size()))


def _call(tail: nn.Module, params: dict[str, torch.Tensor] | None, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    if params is None:
        return run_tail(tail, x, out_dtype)
    return run_tail(lambda b: torch.func.functional_call(tail, params, (b,)), x, out_dtype)


def connectivity_tail(
    h: torch.Tensor,
    tail: nn.Module,
    n_lambda: int,
    run_dtype: torch.dtype,
    out_dtype: torch.dtype,
    chunk_bytes: int | None = None,
    y_end: torch.Tensor | None = None,
    flag: bool = False,
) -> torch.Tensor:
    """``(N, N)`` connectivity of any tail, the ends of every path computed once.

    Args:
        h: ``(N, D)`` representations.
        tail: ``(B, D) -> (B, O)`` module (the caller sets eval mode and no-grad). It runs in
            ``run_dtype``, never below fp32: a bf16/fp16 module runs on fp32 copies of its parameters and
            buffers through ``torch.func.functional_call`` (the module itself is never touched).
        n_lambda: points per path (``>= 3``).
        run_dtype: dtype the tail runs in; ``out_dtype``: dtype of ``L``.
        chunk_bytes: bytes of activations of the tail's widest layer per forward (default
            :func:`default_chunk_bytes`): peak extra memory ``O(N^2 + chunk)`` whatever ``D``.
        y_end: ``tail(h)`` if the caller has it already (``(N, O)``; used when it is in the run dtype).
        flag: write :data:`~._policy.FLAGGED` for a pair whose fp32 result cannot meet the accuracy
            contract (``core`` recomputes it in fp64).

    Returns:
        ``L`` in ``out_dtype`` on ``h``'s device (identical rows are *not* set to 1 here). In float64 a pair whose error
        estimate exceeds :data:`UNRESOLVED_KAPPA` is NaN (docs/lmn.md, "Accuracy in the corners": the module cannot be
        centred from outside; ``core`` warns).
    """
    dev, n = h.device, h.shape[0]
    run_dtype = torch.float64 if run_dtype == torch.float64 else torch.float32
    params = None if all(p.dtype == run_dtype for p in tail.parameters() if p.is_floating_point()) else tail_params(tail, run_dtype)
    hr = h.to(run_dtype)
    if y_end is None or y_end.dtype != run_dtype:  # computed in another dtype (a bf16 module): recompute
        y_end = end_outputs(lambda b: _call(tail, params, b, run_dtype), hr, run_dtype, run_dtype)
    lam, lam_c = lambdas(n_lambda, run_dtype, dev)
    inner = lam[1:-1].view(1, -1, 1)
    eps = torch.finfo(run_dtype).eps
    chunk = max(1, _batch_rows(tail, hr, chunk_bytes) // (n_lambda - 2))
    L = new_L(n, out_dtype, dev, chunk * n_lambda * widest(tail, h.shape[1]) * hr.element_size())
    for i, j in triu_pair_chunks(n, chunk, dev):
        v = _path_r2(hr, tail, params, i, j, inner, y_end, lam_c, eps, flag)
        L[i, j] = v.to(out_dtype)
        L[j, i] = v.to(out_dtype)
    return L


def _path_r2(
    hr: torch.Tensor,
    tail: nn.Module,
    params: dict[str, torch.Tensor] | None,
    i: torch.Tensor,
    j: torch.Tensor,
    inner: torch.Tensor,
    y_end: torch.Tensor,
    lam_c: torch.Tensor,
    eps: float,
    flag: bool,
    kappa64: float | None = None,
) -> torch.Tensor:
    """``L_ij`` of the pairs ``(i, j)``: the interior points through the tail, the ends from ``y_end``. In float64 a pair
    whose error estimate exceeds ``kappa64`` (default ``UNRESOLVED_KAPPA``) is NaN."""
    hi = hr[i]
    x = torch.addcmul(hi.unsqueeze(1), inner, (hr[j] - hi).unsqueeze(1))  # [P, T-2, D]
    y_in = _call(tail, params, x.flatten(0, 1), hr.dtype).view(x.shape[0], inner.shape[1], -1)
    y = torch.cat([y_end[i].unsqueeze(1), y_in, y_end[j].unsqueeze(1)], dim=1)  # [P, T, O]
    fp64 = hr.dtype == torch.float64
    if not flag and not fp64:
        return r2_from_paths(y, lam_c, eps, flag)
    # The module cannot be centred or seen into: its input's rounding (eps |x|, and every inner Linear's eps |W||x|)
    # moves the path by about eps |x| / |h_j - h_i| of its own variation, however small max_t |y| is (an offset on h
    # cancelled inside the module: 1.4e-5 unflagged on a LeakyReLU tail at h offset 100; docs/lmn.md, "Accuracy in the corners"). Added
    # to the flag's
    # rounding scale as std_t(y) * IN_GAIN * max(|h_i|, |h_j|) / |h_j - h_i|.
    hj = hr[j]
    ratio = torch.maximum(hi.norm(dim=1), hj.norm(dim=1)) / (hj - hi).norm(dim=1)  # [P]
    if not fp64:
        return r2_from_paths(y, lam_c, eps, flag, in_ratio=IN_GAIN * ratio)
    # float64 has no wider dtype to recompute in: a pair whose estimate is still over the threshold (a unit saturated
    # beyond float64's rounding of its value: its variation is lost in the module's forward; the constant rule firing
    # on outputs of nonzero scale) is NaN, never a plausible wrong number (core warns). An output whose variation along
    # the path is within rounding and stays so far beyond its ends (``_constant_beyond``: an output that does not read
    # the coordinates the path moves, e.g. another sequence position) is constant, r2 = 1, not unresolved.
    kappa = UNRESOLVED_KAPPA if kappa64 is None else kappa64
    amax = torch.maximum(y.amax(dim=1), -y.amin(dim=1))  # [P, O]  max_t |y|
    yc = y - y.mean(dim=1, keepdim=True)
    dev = yc.abs().amax(dim=1)  # [P, O]  max_t |yc| >= std_t(y)
    scale = amax + dev * (IN_GAIN * ratio).unsqueeze(1)
    noise = dev + (CONST_RTOL * eps * math.sqrt(y.shape[1])) * scale  # what rounding may move an output by
    suspect = (eps * math.sqrt(y.shape[1])) * scale > kappa * dev  # kappa_k above the threshold: would make it NaN
    suspect &= scale > 0
    if bool(suspect.any()):
        rows = suspect.any(dim=1).nonzero().squeeze(1)
        const = torch.zeros_like(suspect)
        const[rows] = suspect[rows] & _constant_beyond(hr, tail, params, i[rows], j[rows], y[rows].mean(dim=1), NOISE_GAIN * noise[rows])
        yc = torch.where(const.unsqueeze(1), torch.zeros_like(yc), yc)
        scale = torch.where(const, torch.zeros_like(scale), scale)
    v = r2_from_centred(yc, scale, lam_c, eps, True, kappa=kappa)
    return torch.where(v == FLAGGED, torch.full_like(v, float("nan")), v)


#: how far beyond its ends (in units of ``h_j - h_i``, both ways from ``h_i``) a path whose output is constant to
#: rounding is followed to tell an output that does not depend on the path (constant there too) from a unit saturated
#: beyond float64's rounding (which leaves saturation, or saturates the other way, when moved that far)
EXTRAPOLATE = (-1e8, -1e4, -1e2, 1e2, 1e4, 1e8)
#: there, an output that moves by at most this times its rounding noise along the path counts as not depending on it
NOISE_GAIN = 4.0


def _constant_beyond(
    hr: torch.Tensor,
    tail: nn.Module,
    params: dict[str, torch.Tensor] | None,
    i: torch.Tensor,
    j: torch.Tensor,
    mean: torch.Tensor,
    band: torch.Tensor,
) -> torch.Tensor:
    """``(P, O)``: whether each output stays within ``band`` of its path mean ``mean`` at ``h_i + s (h_j - h_i)`` for
    every ``s`` in :data:`EXTRAPOLATE` (finite outputs only; a tail failing there proves nothing)."""
    s = torch.tensor(EXTRAPOLATE, dtype=hr.dtype, device=hr.device).view(1, -1, 1)
    hi = hr[i]
    x = torch.addcmul(hi.unsqueeze(1), s, (hr[j] - hi).unsqueeze(1))  # [P, S, D]
    try:
        ys = _call(tail, params, x.flatten(0, 1), hr.dtype).view(x.shape[0], s.shape[1], -1)
    except ValueError:
        return torch.zeros_like(band, dtype=torch.bool)
    return ((ys - mean.unsqueeze(1)).abs() <= band.unsqueeze(1)).all(dim=1)  # NaN/Inf: False


@torch.no_grad()
def pairs_connectivity(
    h: torch.Tensor, tail: nn.Module, i: torch.Tensor, j: torch.Tensor, n_lambda: int, chunk_bytes: int | None = None
) -> torch.Tensor:
    """``L_ij`` of the listed pairs through any module, in ``h``'s dtype (parameters converted to it).

    ``core`` recomputes the pairs an fp32 pass flagged with it, in fp64: a pair whose float64 error estimate is still
    over ``FLAG_KAPPA`` (the fp32 contract's threshold: the result is an fp32 ``L``) cannot be resolved from outside the
    module and is NaN (docs/lmn.md, "Accuracy in the corners").
    """
    params = tail_params(tail, h.dtype)
    y_end = end_outputs(lambda b: _call(tail, params, b, h.dtype), h, h.dtype, h.dtype)
    lam, lam_c = lambdas(n_lambda, h.dtype, h.device)
    inner = lam[1:-1].view(1, -1, 1)
    chunk = max(1, _batch_rows(tail, h, chunk_bytes) // (n_lambda - 2))
    eps = torch.finfo(h.dtype).eps
    return torch.cat(
        [
            _path_r2(h, tail, params, i[c : c + chunk], j[c : c + chunk], inner, y_end, lam_c, eps, False, policy.FLAG_KAPPA)
            for c in range(0, i.numel(), chunk)
        ]
    )


def reference_connectivity(h: torch.Tensor, tail: nn.Module, n_lambda: int = 21) -> np.ndarray:
    """Paper-literal float64 ``L`` through the module itself: one pair at a time, ``T`` points per pair.

    The module is deep-copied and converted with ``.double()`` (its floating-point parameters, buffers
    and, for ``lmn_at``'s tails, the probe inputs they replay), run in eval mode without grad; every
    path is reduced by the NumPy reference's ``pair_r2`` (docs/lmn.md, "Policies for the undefined cases"). Identical rows give 1.

    Returns:
        ``(N, N)`` float64 NumPy array.
    """
    from .reference import pair_r2

    tail64 = copy.deepcopy(tail).double()
    h64 = h.detach().to(torch.float64)
    n = h64.shape[0]
    lam = np.linspace(0.0, 1.0, n_lambda)
    lam_t = torch.from_numpy(lam).to(h64.device).view(-1, 1)
    L = np.eye(n)
    with torch.no_grad(), eval_mode(tail64):
        for i in range(n):
            for j in range(i + 1, n):
                if torch.equal(h64[i], h64[j]):
                    L[i, j] = L[j, i] = 1.0
                    continue
                x = h64[i] + lam_t * (h64[j] - h64[i])  # (T, D)
                y = tail64(x).detach().to(torch.float64).cpu().numpy()
                L[i, j] = L[j, i] = pair_r2(y, lam).mean()
    return L


# --------------------------------------------------------------------------------------------
# compile=True: the generic tail through torch.compile, at one batch shape


class CompiledTail(nn.Module):
    """``tail`` run through ``torch.compile`` (inductor) at one fixed batch of ``rows`` rows (``lmn_at(..., compile=True)``).

    A batch of exactly ``rows`` rows runs compiled; a longer one is cut into pieces of ``rows``; a piece of at least
    ``rows / 4`` rows is padded to ``rows`` (with copies of its first row, dropped afterwards), a smaller one runs
    eager. One shape, so dynamo compiles one graph (``dynamic=False``: the static graph ran 1.1-1.2x faster than the
    dynamic one here) and never again while the tail and its parameters' dtype stay the same; the parameters are
    inputs of the graph, so in-place updates (training) are seen without recompiling. Anything but the fp32 generic
    path (the fp64 recomputation of flagged pairs, ``functional_call`` with fp64 copies, grad mode) runs the eager
    ``tail``. Where compiling fails (no C++ compiler, an op inductor cannot lower), one warning line names the cause
    and the eager tail runs from then on; an error of the tail itself is raised as it is.

    Attributes:
        first_call_s: wall seconds of the first compiled call (tracing, inductor's code generation and C++ compile,
            one run), ``None`` before it.
        graphs: graphs dynamo compiled for this tail (1 after the first call; more would mean recompiles).
        failed: why compiling failed (the eager tail runs), else ``None``.
    """

    _fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None

    def __init__(self, tail: nn.Module, rows: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.tail = tail
        self.rows = max(1, int(rows))
        self.dtype = dtype
        self.first_call_s: float | None = None
        self.graphs = 0
        self.failed: str | None = None
        object.__setattr__(self, "_fn", None)  # not a submodule: the parameters stay the tail's, once

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fn": None}  # copies and pickles compile again at their first call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.failed is not None or x.dtype != self.dtype or torch.is_grad_enabled() or 4 * x.shape[0] < self.rows:
            return _run_module(self.tail, x)
        outs = []
        for s in range(0, x.shape[0], self.rows):
            piece = x[s : s + self.rows]
            k = piece.shape[0]
            if 4 * k < self.rows:
                outs.append(_run_module(self.tail, piece))
                continue
            if k < self.rows:
                piece = torch.cat([piece, piece[:1].expand(self.rows - k, *piece.shape[1:])])
            y = self._compiled(piece)
            outs.append(y if k == self.rows else y[:k])
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _compiled(self, piece: torch.Tensor) -> torch.Tensor:
        import time
        import warnings

        from torch._dynamo.utils import counters

        if self.failed is not None:
            return _run_module(self.tail, piece)
        if self._fn is None:
            object.__setattr__(self, "_fn", torch.compile(_own_code(_run_module), dynamic=False))
        graphs = counters["stats"]["unique_graphs"]
        t = time.perf_counter()
        try:
            y = self._fn(self.tail, piece)  # type: ignore[misc]  # set just above
        except Exception as e:
            y = _run_module(self.tail, piece)  # the tail's own error is raised here, as it is; else compiling failed
            msg = (str(e).strip().splitlines() or [""])[0][:200]
            self.failed = f"{type(e).__name__}: {msg}"
            warnings.warn(
                f"compile=True: torch.compile failed on the tail ({self.failed}); it runs uncompiled", RuntimeWarning, stacklevel=2
            )
            return y
        if self.first_call_s is None:
            self.first_call_s = time.perf_counter() - t
        self.graphs += max(0, counters["stats"]["unique_graphs"] - graphs)
        return y

    def info(self) -> dict[str, Any]:
        """``{"compiled", "first_call_s", "graphs", "rows", "failed"}`` for :func:`~grokfast_metrics.core.last_run_info`
        (``compiled``: dynamo compiled a graph of the tail and it ran)."""
        return {
            "compiled": self.failed is None and self.graphs > 0,
            "first_call_s": self.first_call_s,
            "graphs": self.graphs,
            "rows": self.rows,
            "failed": self.failed,
        }


def _run_module(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y: torch.Tensor = module(x)
    return y


def _own_code(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A copy of the function ``fn`` with a code object of its own. Dynamo keeps its compiled graphs on the code
    object, at most ``recompile_limit`` (8) per code object, then runs it uncompiled: compiling the tail modules of
    many plans through one shared ``forward`` (every split tail's is ``_SplitTail.forward``) would hit that limit
    after 8 tails in one process (measured: the 9th ran uncompiled)."""
    import types

    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def compiled_rows(tail: nn.Module, h: torch.Tensor, n_lambda: int, chunk_bytes: int | None) -> int:
    """The fixed batch of a :class:`CompiledTail` for ``connectivity_tail`` on ``h``: whole pairs (``T - 2`` rows each),
    at most ``chunk_bytes`` (as :func:`connectivity_tail` cuts them), spread evenly over the chunks the pairs need, so
    that every chunk but the last has exactly this many rows and the last (padded) hardly fewer."""
    per = n_lambda - 2
    most = max(1, _batch_rows(tail, h, chunk_bytes) // per)
    pairs = h.shape[0] * (h.shape[0] - 1) // 2
    chunks = -(-pairs // most)
    return -(-pairs // max(1, chunks)) * per


def chunk_bytes_for_rows(tail: nn.Module, h: torch.Tensor, rows: int) -> int:
    """The ``chunk_bytes`` that makes :func:`connectivity_tail` run batches of exactly ``rows`` rows."""
    return rows * max(1, widest(tail, h.shape[1]) * h.element_size())
