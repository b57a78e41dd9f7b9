"""Public functional API: ``connectivity``, ``lmn``, ``lmn_from_connectivity``.

This module validates input, picks a backend and calls it; the math lives in
``torch_backend`` (torch), ``grokfast_metrics.kernels.connectivity`` (Triton) and ``reference`` (NumPy).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from . import torch_backend
from ._tail import MLPTail, parse_tail

BACKENDS = ("auto", "triton", "torch", "reference")


@dataclass
class LMNResult:
    """Result of :func:`lmn` / :func:`lmn_from_connectivity`.

    Attributes:
        lmn: linear mapping number ``2 ** entropy_bits``.
        entropy_bits: von Neumann-style entropy ``S`` of the normalised eigenvalues, in bits.
        eigenvalues: ``(N,)`` float64 absolute eigenvalues of ``L``, descending.
        connectivity: ``(N, N)`` linear connectivity matrix ``L``.
    """

    lmn: float
    entropy_bits: float
    eigenvalues: torch.Tensor
    connectivity: torch.Tensor


# --------------------------------------------------------------------------------------------
# validation


def _check_h(h) -> None:
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"h must be a torch.Tensor of shape (N, D); got {type(h).__name__}")
    if h.dim() != 2:
        raise ValueError(f"h must be 2-D (N samples, D features); got shape {tuple(h.shape)}")
    if not h.is_floating_point():
        raise TypeError(f"h must have a floating dtype; got {h.dtype}")
    if h.shape[0] < 2:
        raise ValueError(f"h needs at least 2 samples (rows) to form a pair; got N={h.shape[0]}")
    if h.shape[1] < 1:
        raise ValueError("h has zero features (D=0)")
    bad = ~torch.isfinite(h).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
        raise ValueError(f"h has NaN/Inf in {len(rows)} row(s) [{shown}]; LMN is undefined for non-finite input")


def _check_tail(tail, h: torch.Tensor) -> None:
    if not isinstance(tail, nn.Module):
        raise TypeError(f"tail must be an nn.Module (the network from h's layer to the logits); got {type(tail).__name__}")
    named = []
    for name, p in tail.named_parameters():
        if p.device != h.device:
            raise ValueError(f"tail parameter {name!r} is on {p.device} but h is on {h.device}; move one of them")
        if p.is_floating_point():
            named.append((name, p))
    if not named:
        return
    finite = torch.stack([torch.isfinite(p).all() for _, p in named])  # one device sync for all parameters
    if not bool(finite.all()):
        name = named[int((~finite).nonzero()[0])][0]
        raise ValueError(f"tail parameter {name!r} has NaN/Inf values")


def _check_n_lambda(n_lambda) -> None:
    if isinstance(n_lambda, bool) or not isinstance(n_lambda, int):
        raise TypeError(f"n_lambda must be an int; got {type(n_lambda).__name__}")
    if n_lambda < 3:
        raise ValueError(f"n_lambda must be >= 3 (r2 of 2 points is always 1); got {n_lambda}")


def _compute_dtype(h: torch.Tensor, tail: nn.Module) -> torch.dtype:
    """fp64 if ``h`` or the tail's parameters are fp64, else fp32 (never below fp32)."""
    if h.dtype == torch.float64 or any(p.dtype == torch.float64 for p in tail.parameters()):
        return torch.float64
    return torch.float32


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextmanager
def _eval_mode(module: nn.Module):
    """Run ``module`` in eval mode and leave every submodule's mode as it was; RNG untouched."""
    modes = [(m, m.training) for m in module.modules()]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        module.eval()
        try:
            yield
        finally:
            for m, mode in modes:
                m.training = mode


# --------------------------------------------------------------------------------------------
# backends


def _resolve_backend(backend: str, h: torch.Tensor, spec: MLPTail | None) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        if h.is_cuda and spec is not None and _triton_available():
            from .kernels import connectivity as kc

            if kc.unsupported_reason(spec) is None:
                return "triton"
        return "torch"
    if backend == "triton":
        if spec is None:
            raise ValueError(
                "backend='triton' needs an MLP tail: an nn.Sequential of nn.Linear and elementwise "
                "activations (SiLU, ReLU, GELU, Tanh, Sigmoid, LeakyReLU, Identity); use backend='torch' for other modules"
            )
        if not _triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install triton)")
        from .kernels import connectivity as kc

        if not h.is_cuda and not (_interpreting() and kc.kernel_is_interpreted()):
            raise ValueError(
                "backend='triton' on CPU tensors runs only under the Triton interpreter "
                "(set TRITON_INTERPRET=1 before Python imports triton); use backend='torch' on the CPU"
            )

        reason = kc.unsupported_reason(spec)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run this tail: {reason}")
    return backend


def resolve_backend(h: torch.Tensor, tail: nn.Module, backend: str = "auto") -> str:
    """What :func:`connectivity` would run for these arguments (for logs and benchmarks).

    Returns:
        ``"triton"``, ``"cpu-kernel"`` (the fused C++ kernel), ``"torch"`` (MLP tail, torch ops),
        ``"torch-generic"`` (any other module) or ``"reference"``.

    Raises:
        ValueError: the same backend errors as :func:`connectivity`.
    """
    spec = parse_tail(tail)
    chosen = _resolve_backend(backend, h, spec)
    if chosen != "torch":
        return chosen
    if spec is None:
        return "torch-generic"
    if backend == "auto" and torch_backend.cpu_kernel_reason(h.to(_compute_dtype(h, tail)), spec) is None:
        return "cpu-kernel"
    return "torch"


def _identical_rows(h: torch.Tensor) -> torch.Tensor | None:
    """``(N,)`` group ids of exactly equal rows of ``h``, or None if all rows are distinct."""
    _, inverse, counts = torch.unique(h, dim=0, return_inverse=True, return_counts=True)
    return inverse if bool((counts > 1).any()) else None


def connectivity(
    h: torch.Tensor, tail: nn.Module, n_lambda: int = 21, backend: str = "auto", *, chunk_bytes: int | None = None
) -> torch.Tensor:
    """Linear connectivity matrix ``L`` of ``N`` representations through ``tail`` (SPEC §1).

    ``L_ij`` is the mean over output dimensions of the squared Pearson correlation between
    ``tail(h_i + lam (h_j - h_i))`` and ``lam`` over ``n_lambda`` evenly spaced ``lam`` in [0, 1].

    Args:
        h: ``(N, D)`` representations at some layer, any float dtype, on any device.
        tail: the rest of the network, ``D -> O`` logits. An ``nn.Sequential`` of ``nn.Linear`` and
            elementwise activations takes the fused paths; any module works on the generic path
            (evaluated in eval mode; its mode is restored).
        n_lambda: interpolation points per pair (the paper uses 21).
        backend: ``"auto"`` (Triton on CUDA when possible; on the CPU the fused C++ kernel for fp32 MLP
            tails on AVX2 machines; torch ops otherwise), ``"triton"``, ``"torch"`` (chunked stock torch ops
            on any device) or ``"reference"`` (NumPy, float64, slow).
        chunk_bytes: size of one chunk of interpolated activations (default 4 MiB on CPU,
            256 MiB on CUDA); peak extra memory is ``O(N^2 + chunk_bytes)``.

    Returns:
        ``(N, N)`` symmetric tensor on ``h``'s device, entries in [0, 1], unit diagonal; fp64 if
        ``h`` or the tail is fp64, else fp32.

    Raises:
        TypeError: ``h`` is not a float tensor, ``tail`` not a module, ``n_lambda`` not an int.
        ValueError: non-finite input, ``N < 2``, shape/device mismatch, unknown backend, or a
            backend that cannot run here (see the message).
    """
    _check_h(h)
    _check_tail(tail, h)
    _check_n_lambda(n_lambda)
    spec = parse_tail(tail)
    if spec is not None and spec.in_features is not None and spec.in_features != h.shape[1]:
        raise ValueError(f"h has {h.shape[1]} features but the tail's first Linear expects {spec.in_features}")
    fused_cpu = backend == "auto"  # the fused CPU kernel is taken only when the caller let us choose
    backend = _resolve_backend(backend, h, spec)
    dtype = _compute_dtype(h, tail)
    with torch.no_grad():
        if backend == "reference":
            from . import reference

            L = torch.from_numpy(reference.connectivity(h, tail, n_lambda)).to(device=h.device, dtype=dtype)
            return L
        hc = h.to(dtype)
        if backend == "triton":
            from .kernels.connectivity import connectivity_triton

            L = connectivity_triton(hc, spec, n_lambda)
        elif spec is not None:
            # "auto" may take the fused CPU kernel (fp32, AVX2); "torch" is always the stock torch-op path
            L = torch_backend.connectivity_mlp(hc, spec, n_lambda, chunk_bytes, use_cpu_kernel=None if fused_cpu else False)
        else:
            params = [p for p in tail.parameters() if p.is_floating_point()]
            run_dtype = params[0].dtype if params else dtype
            with _eval_mode(tail):
                try:
                    L = torch_backend.connectivity_generic(h, tail, n_lambda, run_dtype, dtype, chunk_bytes)
                except RuntimeError as e:
                    raise ValueError(f"tail failed on a batch of interpolated h (D={h.shape[1]}): {e}") from e
        groups = _identical_rows(h)
        if groups is not None:  # SPEC §1: identical representations are perfectly connected
            L[groups[:, None] == groups[None, :]] = 1.0
    return L


def lmn_from_connectivity(L: torch.Tensor) -> LMNResult:
    """Eigen-decomposition and entropy of a connectivity matrix (SPEC §1 step 4).

    ``ev = |eigvalsh(L)|`` in float64 on ``L``'s device; eigenvalues at or below
    ``N * eps64 * max(ev)`` are eigensolver rounding of exact zeros and count as 0;
    ``p = ev / sum(ev)``, ``S = -sum p log2 p``, ``LMN = 2 ** S``.

    Args:
        L: ``(N, N)`` symmetric matrix (only the lower triangle is read by the eigensolver).

    Raises:
        ValueError: ``L`` is not square, is empty, has NaN/Inf, or is all zeros.
    """
    if not isinstance(L, torch.Tensor):
        raise TypeError(f"L must be a torch.Tensor; got {type(L).__name__}")
    if L.dim() != 2 or L.shape[0] != L.shape[1] or L.shape[0] < 1:
        raise ValueError(f"L must be a non-empty square matrix; got shape {tuple(L.shape)}")
    if not bool(torch.isfinite(L).all()):
        raise ValueError("L has NaN/Inf entries")
    with torch.no_grad():
        ev = torch.linalg.eigvalsh(L.detach().to(torch.float64)).abs()
        top = ev.max()
        if float(top) == 0.0:
            raise ValueError("L is all zeros; its entropy is undefined")
        ev = torch.where(ev <= L.shape[0] * torch.finfo(torch.float64).eps * top, torch.zeros_like(ev), ev)
        p = ev / ev.sum()
        terms = torch.where(p > 0, -p * torch.log2(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
        s = max(float(terms.sum()), 0.0)
    return LMNResult(lmn=2.0**s, entropy_bits=s, eigenvalues=ev.sort(descending=True).values, connectivity=L)


def lmn(
    h: torch.Tensor, tail: nn.Module, n_lambda: int = 21, backend: str = "auto", *, chunk_bytes: int | None = None
) -> LMNResult:
    """Linear mapping number of ``h`` through ``tail``: :func:`connectivity` then :func:`lmn_from_connectivity`.

    Same arguments and errors as :func:`connectivity`.
    """
    return lmn_from_connectivity(connectivity(h, tail, n_lambda, backend, chunk_bytes=chunk_bytes))


