"""Torch backend: the linear connectivity matrix, vectorised over pairs in bounded chunks.

Two paths share one reduction (:func:`r2_from_paths`):

* :func:`connectivity_mlp` for MLP tails (``_tail.MLPTail``): the leading Linear is absorbed
  (``z = W h + b`` once per sample, interpolation on ``z``), only the upper triangle is computed,
  and a chunk of ``P`` pairs materialises ``P * T * H`` activations, never ``N^2 * T * H``.
* :func:`connectivity_generic` for any other module: the interpolation points of a chunk of pairs
  are run through the module in one batched forward.

Both run on whatever device ``h`` lives on (CPU or CUDA) in fp32 or fp64.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ._policy import CONST_RTOL, lambdas
from ._tail import MLPTail


def r2_from_paths(y: torch.Tensor, lam_c: torch.Tensor, eps: float) -> torch.Tensor:
    """Mean over output dimensions of the squared Pearson correlation of each path with lambda.

    Args:
        y: ``(P, T, O)`` outputs along ``P`` interpolation paths.
        lam_c: ``(T,)`` centred lambdas (``lam - mean(lam)``).
        eps: machine epsilon of the dtype ``y`` was computed in (constant-path rule).

    Returns:
        ``(P,)`` values of ``L_ij``.
    """
    T = y.shape[1]
    amax = torch.maximum(y.amax(dim=1), -y.amin(dim=1))         # [P, O]  max_t |y|
    yc = y - y.mean(dim=1, keepdim=True)                       # [P, T, O]
    cov = torch.matmul(lam_c, yc)                              # [P, O]
    ss = yc.square_().sum(dim=1)                               # [P, O]  T * var(y)
    ll = torch.dot(lam_c, lam_c)                               # T * var(lam)
    r2 = (cov * cov / (ss * ll)).clamp_(0.0, 1.0)
    const = (ss / T).sqrt() <= CONST_RTOL * eps * amax
    r2 = torch.where(const, torch.ones_like(r2), r2)
    return r2.mean(dim=1)


def triu_pair_chunks(n: int, chunk: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(i, j)`` index tensors covering every pair ``i < j`` of ``n`` items, ``chunk`` at a time."""
    counts = torch.arange(n - 1, -1, -1, device=device)        # pairs in row i: n - 1 - i
    offsets = torch.zeros(n + 1, dtype=torch.long, device=device)
    torch.cumsum(counts, 0, out=offsets[1:])
    total = n * (n - 1) // 2
    for p0 in range(0, total, chunk):
        p = torch.arange(p0, min(p0 + chunk, total), device=device)
        i = torch.searchsorted(offsets, p, right=True) - 1
        yield i, p - offsets[i] + i + 1


def _finish(L_upper_vals: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], n: int, like: torch.Tensor) -> torch.Tensor:
    L = torch.empty(n, n, dtype=like.dtype, device=like.device)
    for i, j, v in L_upper_vals:
        L[i, j] = v
        L[j, i] = v
    L.diagonal().fill_(1.0)
    return L


def chunk_pairs(width: int, n_lambda: int, elem_bytes: int, device: torch.device, chunk_bytes: int | None) -> int:
    """Pairs per chunk so that one ``(P, T, width)`` activation block takes about ``chunk_bytes``."""
    if chunk_bytes is None:
        chunk_bytes = (256 << 20) if device.type == "cuda" else (4 << 20)
    return max(1, chunk_bytes // max(1, n_lambda * width * elem_bytes))


def connectivity_mlp(h: torch.Tensor, spec: MLPTail, n_lambda: int, chunk_bytes: int | None = None) -> torch.Tensor:
    """Connectivity matrix ``(N, N)`` of an MLP tail with chunked stock torch ops, in ``h``'s dtype.

    Args:
        h: ``(N, D)`` representations (fp32 or fp64, any device).
        spec: normalised MLP tail.
        n_lambda: interpolation points per pair.
        chunk_bytes: size of one chunk of activations.
    """
    dtype, dev = h.dtype, h.device
    n = h.shape[0]
    if spec.is_affine:  # affine tail: every path is a straight line, r2 = 1 exactly
        return torch.ones(n, n, dtype=dtype, device=dev)
    z = spec.absorb(h)
    stages = [
        (acts, lin.weight.to(dtype).t(), None if lin.bias is None else lin.bias.to(dtype))
        for acts, lin in spec.stages
    ]
    lam, lam_c = lambdas(n_lambda, dtype, dev)
    eps = torch.finfo(dtype).eps
    width = max([z.shape[1]] + [w.shape[1] for _, w, _ in stages])
    chunk = chunk_pairs(width, n_lambda, h.element_size(), dev, chunk_bytes)
    out = []
    for i, j in triu_pair_chunks(n, chunk, dev):
        zi = z[i]
        x = torch.addcmul(zi.unsqueeze(1), lam.view(1, -1, 1), (z[j] - zi).unsqueeze(1))  # [P, T, H0]
        for acts, wt, b in stages:
            for a in acts:
                x = a.torch(x, inplace=True)
            x = torch.matmul(x, wt) if b is None else torch.addmm(b, x.flatten(0, 1), wt).view(x.shape[0], n_lambda, -1)
        for a in spec.final:
            x = a.torch(x, inplace=True)
        out.append((i, j, r2_from_paths(x, lam_c, eps)))
    return _finish(out, n, h)


def connectivity_generic(
    h: torch.Tensor, tail: nn.Module, n_lambda: int, run_dtype: torch.dtype, out_dtype: torch.dtype,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """Connectivity matrix ``(N, N)`` of any module: batched forward of the interpolation points.

    The tail runs in ``run_dtype`` (its parameters' dtype); its outputs are reduced in ``out_dtype``
    with the constant-path rule using the epsilon of ``run_dtype``.
    """
    dev = h.device
    n = h.shape[0]
    hr = h.to(run_dtype)
    lam, _ = lambdas(n_lambda, run_dtype, dev)
    _, lam_c = lambdas(n_lambda, out_dtype, dev)
    eps = torch.finfo(run_dtype).eps
    chunk = chunk_pairs(h.shape[1], n_lambda, 4 * h.element_size(), dev, chunk_bytes)
    out = []
    for i, j in triu_pair_chunks(n, chunk, dev):
        hi = hr[i]
        x = torch.addcmul(hi.unsqueeze(1), lam.view(1, -1, 1), (hr[j] - hi).unsqueeze(1))  # [P, T, D]
        y = tail(x.flatten(0, 1))
        if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != x.shape[0] * n_lambda or not y.is_floating_point():
            shape = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(
                f"tail must map a (B, {h.shape[1]}) batch to (B, O) floating-point logits; for B={x.shape[0] * n_lambda} "
                f"it returned {shape}"
            )
        out.append((i, j, r2_from_paths(y.to(out_dtype).view(x.shape[0], n_lambda, -1), lam_c, eps)))
    return _finish(out, n, h.to(out_dtype))
