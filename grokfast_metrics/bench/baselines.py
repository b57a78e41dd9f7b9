"""What computes ``L`` in a benchmark, and the baselines every backend is compared with in the same run.

* ``reference``: the NumPy float64 reference (:mod:`grokfast_metrics.compute.reference`), timed on a small
  subset; its cost per pair does not depend on ``N``, so it is extrapolated per pair;
* ``naive``: :func:`naive_connectivity`, the torch code a user would write without this library,
  also timed on a subset and extrapolated per pair;
* ``roof``: the GFLOP/s of one large square fp32 matmul (:func:`matmul_roof`, :func:`paired_roof`; fp64 for the
  fp64 kernel's row).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..compute import core, generic, reference
from ..foundation.tail import parse_tail
from .harness import Timing, n_pairs, time_fn

#: Benchmark-only names: ``backend="triton"`` with one Triton kernel variant (``kernels.triton.use_variant``), so one
#: run times both kernels (v2 runs the tails it supports, v1 the rest: see ``kernels.triton``).
TRITON_VARIANTS = {"triton-v1": "v1", "triton-v2": "v2"}


def backend_fn(backend: str) -> Callable[[torch.Tensor, nn.Module, int], torch.Tensor]:
    """``(h, tail, n_lambda) -> L`` for a library backend name (``core.BACKENDS``), a :data:`TRITON_VARIANTS`
    name or ``"naive"`` (the baseline)."""
    if backend == "naive":
        return naive_connectivity
    if backend in TRITON_VARIANTS:
        return functools.partial(_triton_variant, variant=TRITON_VARIANTS[backend])
    return functools.partial(core.connectivity, backend=backend)


def _triton_variant(h: torch.Tensor, tail: nn.Module, n_lambda: int = 21, *, variant: str) -> torch.Tensor:
    from ..kernels.triton import use_variant  # triton: only where a Triton variant is timed

    with use_variant(variant):
        return core.connectivity(h, tail, n_lambda, backend="triton")


def backend_that_runs(backend: str, h: torch.Tensor, tail: nn.Module) -> str:
    """What ``backend`` runs here (``core.resolve_backend``); the name itself if it cannot run."""
    try:
        resolved = core.resolve_backend(h, tail, "triton" if backend in TRITON_VARIANTS else backend)
    except Exception:
        return backend
    return backend if backend in TRITON_VARIANTS and resolved == "triton" else resolved


def backend_label(backend: str, h: torch.Tensor, tail: nn.Module) -> str:
    """``backend``, or ``"<backend>-><what it runs>"`` when that differs (``auto->cpu``)."""
    resolved = backend_that_runs(backend, h[:2], tail)
    return backend if resolved == backend else f"{backend}->{resolved}"


def naive_connectivity(h: torch.Tensor, tail: nn.Module, n_lambda: int = 21, chunk_pairs: int | None = None) -> torch.Tensor:
    """BASELINE, not the library's path: ``L`` computed the way a user would write it in plain torch.

    Materialises the ``T`` interpolation points of ``chunk_pairs`` pairs in the space of ``h``,
    runs the whole ``tail`` module on them, and takes the squared Pearson correlation of each output
    with ``lam`` by the ``torch.corrcoef`` formula (``cov / (std_y std_lam)``), vectorised over
    the chunk; a constant output gets ``r2 = 1``.

    Args:
        h: ``(N, D)`` representations.
        tail: module mapping ``(B, D)`` to ``(B, O)``.
        n_lambda: interpolation points per pair.
        chunk_pairs: pairs per chunk (default 2048 on CPU, 32768 on CUDA).

    Returns:
        ``(N, N)`` matrix in ``h``'s dtype.
    """
    n = h.shape[0]
    chunk_pairs = chunk_pairs or (32768 if h.is_cuda else 2048)
    lam = torch.linspace(0, 1, n_lambda, dtype=h.dtype, device=h.device)
    L = torch.eye(n, dtype=h.dtype, device=h.device)
    iu, ju = torch.triu_indices(n, n, 1, device=h.device)
    with torch.no_grad():
        for c in range(0, iu.numel(), chunk_pairs):
            i, j = iu[c : c + chunk_pairs], ju[c : c + chunk_pairs]
            x = h[i, None, :] + lam[None, :, None] * (h[j] - h[i])[:, None, :]  # [P, T, D]
            y = tail(x.reshape(-1, h.shape[1])).reshape(len(i), n_lambda, -1)  # [P, T, O]
            yc = y - y.mean(dim=1, keepdim=True)
            lc = lam - lam.mean()
            cov = (yc * lc[None, :, None]).sum(dim=1)
            r = cov / (yc.pow(2).sum(dim=1).sqrt() * lc.pow(2).sum().sqrt())
            r2 = torch.nan_to_num(r * r, nan=1.0).clamp(0.0, 1.0)
            L[i, j] = L[j, i] = r2.mean(dim=1)
    return L


def naive_seconds_per_pair(
    h: torch.Tensor, tail: nn.Module, n_lambda: int, device: torch.device, repeats: int, budget_s: float | None = None
) -> float:
    """Median seconds per pair of :func:`naive_connectivity` on all of ``h`` (after a warm-up on 32 rows)."""
    naive_connectivity(h[:32], tail, n_lambda)  # warm-up
    timing = time_fn(functools.partial(naive_connectivity, h, tail, n_lambda), device, repeats, budget_s=budget_s)
    return timing.median / n_pairs(h.shape[0])


def reference_timed(h: torch.Tensor, tail: nn.Module, n_lambda: int = 21) -> tuple[np.ndarray, float]:
    """NumPy reference ``L`` of ``h`` and its time per pair in seconds (one timed run); any other module than an MLP
    (a lowered transformer tail with its skip term included) through the float64 loop over the module itself.

    Args:
        h: ``(n, D)`` subset of the representations (``n >= 2``; keep it small, the reference is slow).
        tail: the tail module.
        n_lambda: interpolation points per pair.

    Returns:
        ``(L, seconds_per_pair)`` with ``L`` ``(n, n)`` float64.

    Raises:
        ValueError: fewer than 2 samples.
    """
    n = h.shape[0]
    if n < 2:
        raise ValueError(f"the reference subset needs >= 2 samples; got {n}")
    t0 = time.perf_counter()
    spec = parse_tail(tail)
    if spec is None or spec.skip is not None:  # any other module, or a lowered tail: the float64 loop through it
        L = generic.reference_connectivity(h, tail, n_lambda)
    else:
        L = reference.connectivity(h, tail, n_lambda)
    return L, (time.perf_counter() - t0) / n_pairs(n)


def square_matmul(
    device: torch.device, size: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Callable[[], torch.Tensor], int]:
    """A warmed-up ``(size, size) @ (size, size)`` matmul into a preallocated output: the roof's workload.

    Args:
        device: where to run it.
        size: matrix side; default 2048 on CPU, 8192 on CUDA.
        dtype: the matrices' dtype (fp32 by default; fp64 for the roof of the fp64 kernel).

    Returns:
        ``(mm, size)``: ``mm()`` runs the matmul once.
    """
    size = size or (8192 if device.type == "cuda" else 2048)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen, dtype=dtype).to(device)
    b = torch.randn(size, size, generator=gen, dtype=dtype).to(device)
    out = torch.empty(size, size, device=device, dtype=dtype)
    mm = functools.partial(torch.mm, a, b, out=out)
    mm()  # warm-up
    return mm, size


def matmul_roof(device: torch.device, size: int | None = None, repeats: int = 5) -> tuple[float, Timing, int]:
    """GFLOP/s of a large square fp32 matmul ``(size, size) @ (size, size)``: the compute roof.

    Args:
        device: where to run it.
        size: matrix side; default 2048 on CPU, 8192 on CUDA.
        repeats: timed runs after one warm-up run.

    Returns:
        ``(gflops, timing, size)`` with ``gflops = 2 size^3 / fastest time``: the best the machine did in
        this run, so ratios against it are conservative (on a shared VM the median drifts by 15-30%).
    """
    mm, size = square_matmul(device, size)
    timing = time_fn(mm, device, repeats)
    return 2.0 * size**3 / timing.min / 1e9, timing, size


def paired_roof(
    fn: Callable[[], object], flop: float, device: torch.device, repeats: int, size: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[list[float], list[float], list[float]]:
    """Fraction of the matmul roof (a ``dtype`` matmul) with the roof and ``fn`` timed alternately, one ratio per
    repetition.

    On a shared VM the machine's speed drifts by tens of percent between seconds, so a roof timed once at the
    start of a run and a backend timed minutes later can disagree by that much; timing them back to back
    ``repeats`` times and taking each repetition's ratio cancels most of the drift.

    Returns:
        ``(ratios, fn_seconds, roof_gflops)`` per repetition.
    """
    mm, size = square_matmul(device, size, dtype)
    fn()  # warm-up
    ratios, secs, roofs = [], [], []
    for _ in range(repeats):
        t_mm = time_fn(mm, device, 1).min
        t_fn = time_fn(fn, device, 1).min
        roof = 2.0 * size**3 / t_mm / 1e9
        ratios.append(flop / t_fn / 1e9 / roof)
        secs.append(t_fn)
        roofs.append(roof)
    return ratios, secs, roofs
