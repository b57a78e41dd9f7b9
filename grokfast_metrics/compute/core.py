"""Public functional API: ``connectivity``, ``lmn``, ``lmn_from_connectivity``.

This module validates input, picks the one backend that runs (``_choose``; ``"auto"`` resolves to a
single name) and calls it from one table (``_DISPATCH``). The math lives in ``torch_backend``
(torch), ``grokfast_metrics.kernels.triton`` (Triton), ``grokfast_metrics.kernels.cpu_fused``
(the fused C++ CPU kernel) and ``reference`` (NumPy).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..foundation.policy import FLAGGED, check_fits, check_n_lambda
from ..foundation.runtime import eval_mode, triton_available, triton_interpreting
from ..foundation.tail import MLPTail, parse_tail
from . import torch_paths as torch_backend
from .result import LMNResult

#: what ``backend=`` accepts; every name but ``"auto"`` is also what :func:`resolve_backend` can return
BACKENDS = ("auto", "triton", "cpu", "torch", "reference")

__all__ = ["BACKENDS", "LMNResult", "backend_info", "connectivity", "last_run_info", "lmn", "lmn_from_connectivity", "resolve_backend"]


# --------------------------------------------------------------------------------------------
# validation


def _check_h(h: Any) -> None:
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"h must be a torch.Tensor of shape (N, D); got {type(h).__name__}")
    if h.dim() != 2:
        raise ValueError(f"h must be 2-D (N samples, D features); got shape {tuple(h.shape)}")
    if not h.is_floating_point():
        raise TypeError(f"h must have a floating dtype; got {h.dtype}")
    if h.device.type == "meta":
        raise ValueError("h is on the meta device, which holds no values; pass a tensor on the CPU or a GPU")
    if h.shape[0] < 2:
        raise ValueError(f"h needs at least 2 samples (rows) to form a pair; got N={h.shape[0]}")
    if h.shape[1] < 1:
        raise ValueError("h has zero features (D=0)")
    if h.device.type == "cpu" and h.dtype in (torch.float32, torch.float64) and h.numel():
        # one single-threaded NumPy pass: torch's isfinite/all are OpenMP regions, 30-40 ms on a loaded 2-core box
        hn = h.detach().resolve_conj().resolve_neg().numpy()
        if np.isfinite(hn).all():
            return
    bad = ~torch.isfinite(h).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
        raise ValueError(f"h has NaN/Inf in {len(rows)} row(s) [{shown}]; LMN is undefined for non-finite input")


def _check_tail(tail: Any, h: torch.Tensor) -> None:
    if not isinstance(tail, nn.Module):
        raise TypeError(f"tail must be an nn.Module (the network from h's layer to the logits); got {type(tail).__name__}")
    named = []
    for kind, tensors in (("parameter", tail.named_parameters()), ("buffer", tail.named_buffers())):
        for name, p in tensors:
            if p.device != h.device:
                raise ValueError(f"tail {kind} {name!r} is on {p.device} but h is on {h.device}; move one of them")
            if kind == "parameter" and p.is_floating_point():
                named.append((name, p))
    if not named:
        return
    finite = torch.stack([torch.isfinite(p).all() for _, p in named])  # one device sync for all parameters
    if not bool(finite.all()):
        name = named[int((~finite).nonzero()[0])][0]
        raise ValueError(f"tail parameter {name!r} has NaN/Inf values")


def _check_outputs(h: torch.Tensor, tail: nn.Module) -> torch.Tensor:
    """Run the tail once on the samples themselves (the t = 0 and t = 1 ends of every path), in eval mode.

    Returns:
        the outputs ``(N, O)`` in the tail's dtype (the generic path reuses them as its path ends).

    Raises:
        ValueError: the tail fails on ``h`` or does not return ``(N, O)`` real floating-point logits.
        NonFiniteOutputError: the outputs are NaN/Inf (a diverged model: LMN would be a plausible-looking
            number otherwise).
    """
    from .generic import end_outputs

    run_dtype = _param_dtype(tail, h.dtype)
    with eval_mode(tail):
        return end_outputs(tail, h, run_dtype, run_dtype)


def _param_dtype(tail: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype the tail runs in: that of its first floating-point parameter (``default`` if none)."""
    return next((p.dtype for p in tail.parameters() if p.is_floating_point()), default)


def _compute_dtype(h: torch.Tensor, tail: nn.Module) -> torch.dtype:
    """fp64 if ``h`` or the tail's parameters are fp64, else fp32 (never below fp32)."""
    if h.dtype == torch.float64 or any(p.dtype == torch.float64 for p in tail.parameters()):
        return torch.float64
    return torch.float32


# --------------------------------------------------------------------------------------------
# backends: every condition for running one lives in _unavailable, every choice in _choose


def _unavailable(name: str, h: torch.Tensor, dtype: torch.dtype, spec: MLPTail | None) -> str | None:
    """Why backend ``name`` cannot run ``h`` (compute dtype ``dtype``) through a tail with spec ``spec``.

    ``None`` when it can. The one place each backend's conditions are stated.
    """
    if name == "triton":
        if spec is None:
            return _NOT_MLP
        if not triton_available():
            return "it needs the triton package (pip install triton)"
        from ..kernels import triton_rowblock as kc

        if not h.is_cuda and not (triton_interpreting() and kc.kernel_is_interpreted()):
            return (
                "CPU tensors run only under the Triton interpreter (set TRITON_INTERPRET=1 before Python "
                "imports triton); use backend='torch' on the CPU"
            )
        reason: str | None = kc.unsupported_reason(spec)
        return reason
    if name == "cpu":
        if spec is None:
            return _NOT_MLP
        if spec.is_affine:
            return None  # L = 1 without a kernel
        from ..kernels import cpu_fused as kcpu

        cpu_reason: str | None = kcpu.unsupported_reason(spec, h.device, dtype)
        return cpu_reason
    return None  # torch and the reference run any module (the generic path for non-MLP tails)


_NOT_MLP = (
    "it needs an MLP tail: an nn.Sequential of nn.Linear and elementwise activations "
    "(SiLU, ReLU, GELU, Tanh, Sigmoid, LeakyReLU, Identity); use backend='torch' for other modules"
)


def _choose(backend: str, h: torch.Tensor, dtype: torch.dtype, spec: MLPTail | None) -> str:
    """The one backend that runs: ``backend`` itself (checked), or what ``"auto"`` picks."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend != "auto":
        reason = _unavailable(backend, h, dtype, spec)
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot run here: {reason}")
        return backend
    if spec is None or spec.is_affine:  # the generic path; or L = 1 with no kernel at all
        return "torch"
    # an MLP tail, lowered transformer tails (a skip term) included: the fused kernel of h's device, else torch ops
    # (for a lowered tail the generic path through the module)
    if h.is_cuda and _unavailable("triton", h, dtype, spec) is None:
        return "triton"
    if not h.is_cuda and _unavailable("cpu", h, dtype, spec) is None:
        return "cpu"
    return "torch"


def resolve_backend(h: torch.Tensor, tail: nn.Module, backend: str = "auto") -> str:
    """What :func:`connectivity` runs for these arguments (for logs and benchmarks).

    Returns:
        ``"triton"``, ``"cpu"`` (the fused C++ kernel), ``"torch"`` (stock torch ops: the chunked MLP
        path or, for any other module, the generic batched forward) or ``"reference"``.

    Raises:
        ValueError: the same backend errors as :func:`connectivity`.

    >>> import torch, grokfast_metrics as gm
    >>> gm.resolve_backend(torch.randn(5, 4), torch.nn.Linear(4, 3))   # an affine tail: L = 1 on torch ops
    'torch'
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 3))
    >>> gm.resolve_backend(torch.randn(5, 4), mlp) in ("cpu", "torch")   # "cpu": the fused C++ kernel, where it builds
    True
    """
    return _choose(backend, h, _compute_dtype(h, tail), parse_tail(tail))


def _runs_as_module(spec: MLPTail | None) -> bool:
    """Whether the torch and reference backends run the tail as a module (the generic path): not an MLP tail, or a
    lowered tail with a skip term (only the fused kernels take the skip term; the torch MLP path does not)."""
    return spec is None or spec.skip is not None


def _kernel_of(name: str, dtype: torch.dtype, spec: MLPTail | None, n_lambda: int) -> str | None:
    """The kernel variant backend ``name`` runs: ``"fp32"``/``"fp64"`` (the C++ kernel's instantiation), ``"v1"``/``"v2"``
    (the Triton kernel), ``"generic"`` (torch ops on a non-MLP module), ``"mlp"`` (torch ops on an MLP tail); ``None``
    when no kernel runs (an affine tail gives ``L = 1``)."""
    if spec is not None and spec.is_affine and name in ("cpu", "triton"):
        return None
    if name == "cpu":
        return "fp64" if dtype == torch.float64 else "fp32"
    if name == "triton":
        from ..kernels.triton import variant_for

        variant: str = variant_for(spec, n_lambda)
        return variant
    if name == "torch":
        return "generic" if _runs_as_module(spec) else "mlp"
    return None


def backend_info(h: torch.Tensor, tail: nn.Module, backend: str = "auto", n_lambda: int = 21) -> dict[str, Any]:
    """What :func:`connectivity` runs for these arguments, and why not the fast path, for run logs and benchmarks.

    Returns:
        ``{"requested", "backend", "kernel", "dtype", "fallback"}``: ``backend`` as :func:`resolve_backend` names it,
        ``kernel`` the variant (see below), ``dtype`` the compute dtype and ``fallback`` why ``"auto"`` did not take
        the fused kernel of ``h``'s device (the C++ kernel on the CPU, Triton on CUDA) for an MLP tail (``None``
        when it did, or when the tail is not an MLP, or the backend was named explicitly). ``kernel``: ``"fp32"`` /
        ``"fp64"`` (the C++ kernel's instantiation), ``"v1"`` / ``"v2"`` (the Triton kernel), ``"mlp"`` /
        ``"generic"`` (torch ops on an MLP tail / any other module), ``None`` (no kernel: an affine tail, or the
        reference).

    Raises:
        ValueError: the same backend errors as :func:`connectivity`.
    """
    dtype, spec = _compute_dtype(h, tail), parse_tail(tail)
    name = _choose(backend, h, dtype, spec)
    fallback = None
    if backend == "auto" and name == "torch" and spec is not None and not spec.is_affine:
        fallback = _unavailable("triton" if h.is_cuda else "cpu", h, dtype, spec)
    return {
        "requested": backend,
        "backend": name,
        "kernel": _kernel_of(name, dtype, spec, n_lambda),
        "dtype": str(dtype).replace("torch.", ""),
        "fallback": fallback,
    }


#: ``(h in its compute dtype, tail, spec, n_lambda, chunk_bytes, y_end) -> L``: one backend of :data:`_DISPATCH`
Runner = Callable[[torch.Tensor, nn.Module, "MLPTail | None", int, "int | None", torch.Tensor], torch.Tensor]


def _run_triton(
    h: torch.Tensor, tail: nn.Module, spec: MLPTail | None, n_lambda: int, chunk_bytes: int | None, y_end: torch.Tensor
) -> torch.Tensor:
    from ..kernels.triton import connectivity_triton

    assert spec is not None  # the dispatch runs Triton on MLP tails only
    # z absorbed in float64 and rounded once (as _run_cpu): a large component of h that the first Linear cancels keeps z
    # accurate relative to |z|; a lowered tail's skip term u = W_skip h is float64
    z = spec.absorb_rounded_once(h)
    L: torch.Tensor = connectivity_triton(z, spec, n_lambda, u=spec.skip_values(h))
    return L


def _run_cpu(
    h: torch.Tensor, tail: nn.Module, spec: MLPTail | None, n_lambda: int, chunk_bytes: int | None, y_end: torch.Tensor
) -> torch.Tensor:
    assert spec is not None  # _choose picks "cpu" only for an MLP tail
    if spec.is_affine:
        return torch.ones(h.shape[0], h.shape[0], dtype=h.dtype, device=h.device)
    from ..kernels.cpu_fused import absorb_f64, connectivity_cpu

    # z = W h + b in float64 (a lowered tail: its exact twin), rounded once: an h carrying a large component W cancels (a
    # residual stream's offset the MLP does not read; an offset of h that the first Linear's rows sum to 0 on) keeps fp32
    # accuracy relative to |z|, not |h|: the kernel's flag sees |z| only (absorbed in fp32, h + 1e3 read 3.6e-4 off, unflagged)
    z = absorb_f64(h, spec)  # (through the kernel's GEMM, no torch op)
    L: torch.Tensor = connectivity_cpu(z, spec, n_lambda, flag=True, u=spec.skip_values(h))
    return L


def _run_torch(
    h: torch.Tensor, tail: nn.Module, spec: MLPTail | None, n_lambda: int, chunk_bytes: int | None, y_end: torch.Tensor
) -> torch.Tensor:
    flag = h.dtype == torch.float32
    if not _runs_as_module(spec):
        assert spec is not None
        return torch_backend.connectivity_mlp(h, spec, n_lambda, chunk_bytes, flag=flag)
    from . import generic

    with eval_mode(tail):  # any other module: the generic path, in fp32 at least (bf16 models too)
        return generic.connectivity_tail(h, tail, n_lambda, h.dtype, h.dtype, chunk_bytes, y_end=y_end, flag=flag)


def _run_reference(
    h: torch.Tensor, tail: nn.Module, spec: MLPTail | None, n_lambda: int, chunk_bytes: int | None, y_end: torch.Tensor
) -> torch.Tensor:
    if _runs_as_module(spec):  # any other module: the paper-literal float64 loop through the module
        from .generic import reference_connectivity

        return torch.from_numpy(reference_connectivity(h, tail, n_lambda)).to(device=h.device, dtype=h.dtype)
    from . import reference

    return torch.from_numpy(reference.connectivity(h, tail, n_lambda)).to(device=h.device, dtype=h.dtype)


#: resolved backend name -> ``(h in its compute dtype, tail, spec, n_lambda, chunk_bytes, y_end) -> L``
#: (``y_end``: the tail's outputs on ``h`` from the output check; the generic path reuses them)
_DISPATCH: dict[str, Runner] = {"triton": _run_triton, "cpu": _run_cpu, "torch": _run_torch, "reference": _run_reference}


#: what the last :func:`connectivity` call did (for benchmarks and logs): see :func:`last_run_info`
_LAST_RUN: dict[str, Any] = {}


def last_run_info() -> dict[str, Any]:
    """``{"backend", "kernel", "pairs", "recomputed", "fraction_recomputed", "unresolved"}`` of the last
    :func:`connectivity` call in this process: the backend and kernel variant that ran (see :func:`backend_info`), how
    many pairs the fp32 backend flagged as ill-conditioned and recomputed in fp64, and how many the generic path could
    not resolve in float64 (their ``L_ij`` NaN; docs/lmn.md, "Accuracy in the corners"). After ``lmn_at`` (or a tracker) also ``"path"``
    (``"chain"``, ``"split"``, ``"hooks"``), ``"path_reason"`` (why that path ran:
    :attr:`grokfast_metrics.dropin.plan.Plan.reason`), ``"ran"`` (whether the tail was lowered to the fused kernel, and
    what it computes or why not: :attr:`grokfast_metrics.dropin.plan.Plan.ran`) and ``"compile"`` (``None`` unless
    ``compile=True``: ``{"compiled", "first_call_s", "graphs", "rows", "failed"}`` of the compiled generic tail, or
    ``{"compiled": False, "why"}``). After the ``L = 1`` shortcut of a tail known to be affine, ``"backend"`` and
    ``"kernel"`` are ``None`` (nothing ran)."""
    return dict(_LAST_RUN)


def _recompute_flagged(
    L: torch.Tensor,
    h: torch.Tensor,
    tail: nn.Module,
    spec: MLPTail | None,
    n_lambda: int,
    chunk_bytes: int | None,
    groups: torch.Tensor | None,
) -> int:
    """Recompute in fp64 every pair an fp32 backend wrote as ``FLAGGED``; returns how many.

    MLP tails on the CPU go through the C++ fp64 pair kernel (one call for all pairs; the same algebra as
    the torch path), other MLP tails (on CUDA; lowered transformer tails included, skip term and all) through the
    torch MLP path in fp64, any other module through the generic path in fp64.
    """
    n = L.shape[0]
    if L.device.type == "cpu":  # one single-threaded pass (0.2 ms at N=961; torch's eq + nonzero: 0.5-25 ms under load)
        flat = torch.from_numpy(np.flatnonzero(L.numpy().reshape(-1) == FLAGGED))
    else:
        flat = (L.reshape(-1) == FLAGGED).nonzero().squeeze(1)
    if flat.numel() == 0:
        return 0
    i, j = flat // n, flat % n
    upper = i < j
    i, j = i[upper], j[upper]
    count = int(i.numel())
    if groups is not None:  # identical rows are set to 1 by the caller: nothing to recompute
        keep = groups[i] != groups[j]
        i, j = i[keep], j[keep]
    if i.numel():
        v = None
        if spec is not None and h.device.type == "cpu":
            from ..kernels import cpu_fused as kcpu

            if kcpu.pairs_f64_unsupported(spec, h.device) is None:
                v = kcpu.pairs_f64(h, spec, i, j, n_lambda)
        if v is None:
            h64 = h.to(torch.float64)
            if spec is not None:  # a lowered tail through its float64 twin (folded weights never rounded), skip term too
                v = torch_backend.mlp_pairs(h64, spec.exact or spec, i, j, n_lambda, chunk_bytes)
            else:
                from . import generic

                with eval_mode(tail):
                    v = generic.pairs_connectivity(h64, tail, i, j, n_lambda, chunk_bytes)
        v = v.to(L.dtype)
        L[i, j] = v
        L[j, i] = v
    return count


def _identical_rows(h: torch.Tensor) -> torch.Tensor | None:
    """``(N,)`` group ids of exactly equal rows of ``h``, or None if all rows are distinct."""
    _, inverse, counts = torch.unique(h, dim=0, return_inverse=True, return_counts=True)
    return inverse if bool((counts > 1).any()) else None


def connectivity(
    h: torch.Tensor, tail: nn.Module, n_lambda: int = 21, backend: str = "auto", *, chunk_bytes: int | None = None
) -> torch.Tensor:
    """Linear connectivity matrix ``L`` of ``N`` representations through ``tail`` (docs/lmn.md, "Definition").

    ``L_ij`` is the mean over output dimensions of the squared Pearson correlation between
    ``tail(h_i + lam (h_j - h_i))`` and ``lam`` over ``n_lambda`` evenly spaced ``lam`` in [0, 1].

    Args:
        h: ``(N, D)`` representations at some layer, any float dtype, on any device.
        tail: the rest of the network, ``D -> O`` logits. An ``nn.Sequential`` of ``nn.Linear`` and
            elementwise activations takes the fused paths; any module works on the generic path
            (evaluated in eval mode; its mode is restored).
        n_lambda: interpolation points per pair (the paper uses 21).
        backend: ``"auto"`` (Triton on CUDA when possible; on the CPU the fused C++ kernel for fp32 and fp64 MLP
            tails on AVX2 machines; torch ops otherwise), ``"triton"``, ``"cpu"`` (the fused C++ kernel),
            ``"torch"`` (chunked stock torch ops on any device) or ``"reference"`` (NumPy, float64, slow).
            :func:`resolve_backend` names what ``"auto"`` picks.
        chunk_bytes: size of one chunk of interpolated activations (MLP tails: default 4 MiB on CPU, 256 MiB
            on CUDA; other modules: :func:`grokfast_metrics.compute.generic.default_chunk_bytes`); peak extra memory is
            ``O(N^2 + chunk_bytes)``.

    Returns:
        ``(N, N)`` symmetric tensor on ``h``'s device, entries in [0, 1], unit diagonal; fp64 if
        ``h`` or the tail is fp64, else fp32. On the generic path (a tail that is not an MLP) a pair that float64
        cannot resolve from outside the module is NaN, with one ``RuntimeWarning`` (docs/lmn.md, "Accuracy in the
        corners"; ``last_run_info()["unresolved"]`` counts them).

    Raises:
        TypeError: ``h`` is not a float tensor, ``tail`` not a module, ``n_lambda`` not an int.
        ValueError: non-finite input, ``N < 2``, shape/device mismatch, ``n_lambda`` out of range, a
            tail whose outputs on ``h`` are not finite real ``(N, O)`` logits (e.g. a diverged model),
            unknown backend, or a backend that cannot run here (see the message).

    Example (symmetric, entries in [0, 1], ones on the diagonal; an affine tail gives 1 everywhere):

    >>> import torch, grokfast_metrics as gm
    >>> tail = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 3))
    >>> h = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    >>> L = gm.connectivity(h, tail)
    >>> L.shape, bool(torch.equal(L, L.T)), bool(((0 <= L) & (L <= 1)).all()), L.diagonal().tolist()
    (torch.Size([5, 5]), True, True, [1.0, 1.0, 1.0, 1.0, 1.0])
    >>> gm.connectivity(h, torch.nn.Linear(4, 3)).unique().tolist()
    [1.0]
    """
    _check_h(h)
    _check_tail(tail, h)
    n_lambda = check_n_lambda(n_lambda)
    spec = parse_tail(tail)
    if spec is not None and spec.in_features is not None and spec.in_features != h.shape[1]:
        raise ValueError(f"h has {h.shape[1]} features but the tail's first Linear expects {spec.in_features}")
    dtype = _compute_dtype(h, tail)
    name = _choose(backend, h, dtype, spec)
    run = _DISPATCH[name]
    with torch.no_grad(), torch.autocast(h.device.type, enabled=False):  # autocast must not lower the precision
        y_end = _check_outputs(h, tail)
        n = h.shape[0]  # refuse before allocating an L that cannot fit (every backend allocates one)
        check_fits(n * n * torch.empty((), dtype=dtype).element_size(), 0, h.device)
        L = run(h.to(dtype), tail, spec, n_lambda, chunk_bytes, y_end)
        groups = _identical_rows(h)
        recomputed = 0
        if name != "reference" and dtype == torch.float32:  # docs/lmn.md, "Accuracy contract" (c): flagged pairs recomputed in fp64
            recomputed = _recompute_flagged(L, h, tail, spec, n_lambda, chunk_bytes, groups)
        if groups is not None:  # docs/lmn.md, "Policies for the undefined cases": identical rows give 1
            L[groups[:, None] == groups[None, :]] = 1.0
        unresolved = _warn_unresolved(L) if name == "torch" and _runs_as_module(spec) else 0
    n = h.shape[0]
    _LAST_RUN.clear()
    _LAST_RUN.update(
        backend=name,
        kernel=_kernel_of(name, dtype, spec, n_lambda),
        pairs=n * (n - 1) // 2,
        recomputed=recomputed,
        fraction_recomputed=recomputed / max(1, n * (n - 1) // 2),
        unresolved=unresolved,
    )
    return L


def _warn_unresolved(L: torch.Tensor) -> int:
    """The generic path's NaN pairs (unresolvable in float64 from outside the module), with one warning line; how many."""
    bad = int(torch.isnan(L).sum().item()) // 2  # symmetric, the diagonal is 1
    if bad:
        n = L.shape[0]
        warnings.warn(
            f"{bad} of the {n * (n - 1) // 2} pairs cannot be resolved in float64 through this tail (a unit saturated beyond "
            "float64's rounding: its variation is lost inside the module); their L_ij are NaN, so LMN is NaN. Pass the "
            "tail as a plain nn.Sequential of Linear and activation layers (the fused paths centre it and take saturating "
            "units offset free), or use grokfast_metrics.compute.exact for small N",
            RuntimeWarning,
            stacklevel=3,
        )
    return bad


def lmn_from_connectivity(L: torch.Tensor) -> LMNResult:
    """Eigen-decomposition and entropy of a connectivity matrix (docs/lmn.md, "Definition", step 4).

    ``ev = |eigvalsh(L)|`` in float64 on ``L``'s device; eigenvalues at or below
    ``N * eps64 * max(ev)`` are eigensolver rounding of exact zeros and count as 0;
    ``p = ev / sum(ev)``, ``S = -sum p log2 p``, ``LMN = 2 ** S``.

    Args:
        L: ``(N, N)`` symmetric matrix (only the lower triangle is read by the eigensolver).

    NaN entries (the pairs the generic path cannot resolve in float64: docs/lmn.md, "Accuracy in the corners") give
    ``lmn``, ``entropy_bits`` and every eigenvalue NaN: an undefined LMN, never a plausible one.

    Raises:
        TypeError: ``L`` is not a real floating-point tensor (complex, bool and integer matrices are refused).
        ValueError: ``L`` is not square, is empty, is on the meta device, is not symmetric, has Inf, or is all zeros.

    Example (two equal blocks of perfectly connected samples: LMN = 2):

    >>> import torch, grokfast_metrics as gm
    >>> res = gm.lmn_from_connectivity(torch.block_diag(torch.ones(2, 2), torch.ones(2, 2)))
    >>> round(res.lmn, 12), round(res.entropy_bits, 12), res.eigenvalues.tolist()
    (2.0, 1.0, [2.0, 2.0, 0.0, 0.0])
    """
    if not isinstance(L, torch.Tensor):
        raise TypeError(f"L must be a torch.Tensor; got {type(L).__name__}")
    if L.dim() != 2 or L.shape[0] != L.shape[1] or L.shape[0] < 1:
        raise ValueError(f"L must be a non-empty square matrix; got shape {tuple(L.shape)}")
    if not L.is_floating_point():
        raise TypeError(f"L must be a real floating-point matrix; got {L.dtype}")
    if L.device.type == "meta":
        raise ValueError("L is on the meta device, which holds no values; pass a matrix on the CPU or a GPU")
    if bool(torch.isinf(L).any()):
        raise ValueError("L has Inf entries")
    if bool(torch.isnan(L).any()):  # unresolved pairs (the generic path, which warned): LMN undefined
        nan = float("nan")
        ev = torch.full((L.shape[0],), nan, dtype=torch.float64, device=L.device)
        return LMNResult(lmn=nan, entropy_bits=nan, eigenvalues=ev, connectivity=L)
    asym = float((L - L.T).abs().max())
    if asym > 64 * torch.finfo(L.dtype).eps * max(1.0, float(L.abs().max())):
        raise ValueError(f"L is not symmetric (max |L - L^T| = {asym:.3g}); a connectivity matrix is symmetric")
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


def lmn(h: torch.Tensor, tail: nn.Module, n_lambda: int = 21, backend: str = "auto", *, chunk_bytes: int | None = None) -> LMNResult:
    """Linear mapping number of ``h`` through ``tail``: :func:`connectivity` then :func:`lmn_from_connectivity`.

    Same arguments and errors as :func:`connectivity`.

    >>> import torch, grokfast_metrics as gm
    >>> tail = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 3))
    >>> res = gm.lmn(torch.randn(6, 4), tail)                       # an LMNResult
    >>> 1.0 <= res.lmn <= 6, res.lmn == 2 ** res.entropy_bits, res.connectivity.shape
    (True, True, torch.Size([6, 6]))
    """
    return lmn_from_connectivity(connectivity(h, tail, n_lambda, backend, chunk_bytes=chunk_bytes))
