"""The numerical policies of SPEC §1 that every backend shares, defined once.

- :data:`CONST_RTOL`: the constant-path rule. A path whose output varies by no more than
  rounding (``std_t(y) <= CONST_RTOL * eps * max_t |y|``) is a degenerate linear map: r² = 1.
- :func:`check_n_lambda`: what counts as a valid number of interpolation points.
- :func:`lambdas`: the interpolation grid ``lam_t = t / (T - 1)`` and its centred copy.
"""
from __future__ import annotations

import numbers

import torch

#: Constant-path rule (SPEC §1): ``std_t(y) <= CONST_RTOL * eps * max_t |y|`` counts as constant (r² = 1).
CONST_RTOL = 16.0
#: Most interpolation points per pair accepted (the paper uses 21; each point costs a tail forward per pair).
MAX_N_LAMBDA = 10_000


def check_n_lambda(n_lambda) -> int:
    """Validate the number of interpolation points per pair and return it as a plain ``int``.

    Raises:
        TypeError: not an integer (bools are refused).
        ValueError: fewer than 3 points (r² of 2 points is always 1) or more than :data:`MAX_N_LAMBDA`.
    """
    if isinstance(n_lambda, bool) or not isinstance(n_lambda, numbers.Integral):
        raise TypeError(f"n_lambda must be an int; got {type(n_lambda).__name__}")
    if n_lambda < 3:
        raise ValueError(f"n_lambda must be >= 3 (r2 of 2 points is always 1); got {n_lambda}")
    if n_lambda > MAX_N_LAMBDA:
        raise ValueError(f"n_lambda must be <= {MAX_N_LAMBDA} (the paper uses 21); got {n_lambda}")
    return int(n_lambda)


def lambdas(n_lambda: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``lam_t = t / (T - 1)`` and its centred copy ``lam_t - 1/2`` (exact in binary floating point)."""
    lam = torch.arange(n_lambda, dtype=torch.float64, device=device) / (n_lambda - 1)
    return lam.to(dtype), (lam - 0.5).to(dtype)
