"""Which Triton kernel runs, chosen here once, above both kernels:

- :mod:`.triton_rowblock` (v1): any supported tail (depth 1-4, trailing activation or not), a program per row
  ``i`` and ``BLOCK_J`` columns;
- :mod:`.triton_packed_mma` (v2): depth-1 tails without a trailing activation (the default tail), ``T <= 128``,
  pairs x ``T`` points packed densely into MMA rows; every other tail runs v1.

The variant is, in order: the ``variant`` argument, the one set by :func:`use_variant` (benchmarks time both
kernels in one run this way), ``$GROKFAST_METRICS_TRITON_KERNEL`` (read in :func:`kernel_variant` only, through
``foundation.runtime.env``), :data:`DEFAULT_VARIANT`.
Both launchers take the absorbed representations ``z = spec.absorb(h)``, as the fused CPU kernel does
(:func:`grokfast_metrics.kernels.cpu_fused.connectivity_cpu`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

from ..foundation.runtime import env
from ..foundation.tail import MLPTail
from . import triton_packed_mma as v2
from . import triton_rowblock as v1
from .triton_common import LaunchConfig

#: Kernel variants (``variant=``, env ``GROKFAST_METRICS_TRITON_KERNEL``) and the default.
VARIANTS = ("v1", "v2")
DEFAULT_VARIANT = "v2"

_chosen: contextvars.ContextVar[str | None] = contextvars.ContextVar("triton_variant", default=None)


def kernel_variant(variant: str | None = None) -> str:
    """``variant``, else :func:`use_variant`'s, else ``$GROKFAST_METRICS_TRITON_KERNEL``, else :data:`DEFAULT_VARIANT`; checked
    against :data:`VARIANTS`."""
    v = variant or _chosen.get() or env("TRITON_KERNEL") or DEFAULT_VARIANT
    if v not in VARIANTS:
        raise ValueError(f"Triton kernel variant must be one of {VARIANTS}; got {v!r}")
    return v


@contextlib.contextmanager
def use_variant(variant: str) -> Iterator[None]:
    """Run ``variant`` (``"v1"`` / ``"v2"``) in this thread / context while the block runs, whatever the environment says."""
    token = _chosen.set(kernel_variant(variant))
    try:
        yield
    finally:
        _chosen.reset(token)


def variant_for(spec: MLPTail, n_lambda: int, variant: str | None = None) -> str:
    """The kernel that runs ``spec``: v2 when chosen (:func:`kernel_variant`) and it supports the tail, else v1."""
    return "v2" if kernel_variant(variant) == "v2" and v2.supported(spec, n_lambda) else "v1"


def connectivity_triton(
    z: torch.Tensor,
    spec: MLPTail,
    n_lambda: int,
    *,
    u: torch.Tensor | None = None,
    input_precision: str | None = None,
    config: LaunchConfig | None = None,
    variant: str | None = None,
) -> torch.Tensor:
    """Connectivity matrix ``L`` of an MLP tail from ``z = spec.absorb(h)`` (and a lowered tail's skip term
    ``u = spec.skip_values(h)``) with the chosen Triton kernel (v2 runs no skip term: :func:`variant_for`).

    ``config`` (a :func:`.triton_rowblock.launch_config`) runs v1 with that tiling; see
    :func:`.triton_rowblock.connectivity_rowblock` for the arguments and errors.
    """
    if config is None and variant_for(spec, n_lambda, variant) == "v2":  # v2 supports no affine tail
        v1.check_can_run(z)
        return v2.connectivity_packed_mma(z, spec, n_lambda, input_precision=input_precision)
    return v1.connectivity_rowblock(z, spec, n_lambda, u=u, input_precision=input_precision, config=config)
