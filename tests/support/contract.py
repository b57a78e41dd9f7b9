"""The accuracy contract and the invariants every backend must satisfy, in one place (docs/lmn.md, "Accuracy contract").

:data:`CONTRACT` is the one table of tolerances: every backend returns each ``L_ij`` within it of the exact value, or
recomputes that pair in fp64. :func:`check_backend` is the one tester: for an ``L`` from any backend (``gm.connectivity``
or a kernel's direct output) against a float64 yardstick (the NumPy reference, or the exact mpmath one) it asserts

- shape ``(N, N)`` and the compute dtype (fp64 stays fp64, everything else is computed in fp32);
- exact symmetry and a unit diagonal;
- flags: a kernel's direct output may hold ``FLAGGED`` pairs (left to ``core``'s fp64 recompute) only in fp32, and
  ``gm.connectivity`` never returns one (every pair recomputed);
- range: every resolved entry finite and in ``[0, 1]``;
- agreement with the yardstick within the contract of ``L``'s dtype (or a tighter ``atol``) over the resolved pairs;
- optionally (``lmn=True``) the LMN against the reference's eigen step on the yardstick, relative ``LMN_RTOL``.

It returns the worst error, for the callers that assert a tighter bound (each with its observed worst beside it).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import grokfast_metrics as gm
from grokfast_metrics.compute import reference
from grokfast_metrics.foundation.policy import FLAGGED

#: max |L_ij - exact L_ij| of every backend, by compute dtype (docs/lmn.md; the one place the tests read it)
CONTRACT = {torch.float32: 1e-5, torch.float64: 1e-10}
#: ``pytest.mark.parametrize("dtype, atol", DTYPES)``: each compute dtype with its contract
DTYPES = list(CONTRACT.items())
#: LMN against the reference's eigen step on the yardstick's L (relative, both dtypes)
LMN_RTOL = 1e-5


def max_err(L, want, mask=None) -> float:
    """``max |L - want|`` in float64 (tensors or arrays), over ``mask`` when given."""
    L = L.detach().double().cpu().numpy() if isinstance(L, torch.Tensor) else np.asarray(L, dtype=np.float64)
    want = want.detach().double().cpu().numpy() if isinstance(want, torch.Tensor) else np.asarray(want, dtype=np.float64)
    diff = np.abs(L - want)
    return float(diff[np.asarray(mask)].max() if mask is not None else diff.max())


def check_backend(
    L: torch.Tensor, want, *, atol: float | None = None, dtype: torch.dtype | None = None, direct: bool = False, lmn: bool = False
) -> float:
    """Assert the invariants of one backend's ``L`` against the float64 yardstick ``want``; return the worst error.

    ``atol``: default the contract of ``L``'s dtype (a caller may pass a tighter bound, never a looser one without its
    reason beside it). ``dtype``: the expected dtype of ``L`` (default: ``L``'s own, fp32 or fp64). ``direct``: ``L`` is
    a kernel's direct output, whose fp32 ``FLAGGED`` pairs are skipped (``core`` recomputes them in fp64).
    """
    dtype = dtype or L.dtype
    assert L.dtype == dtype and dtype in CONTRACT, (L.dtype, dtype)
    want = want.detach().double().cpu().numpy() if isinstance(want, torch.Tensor) else np.asarray(want, np.float64)
    n = want.shape[0]
    assert tuple(L.shape) == (n, n), (tuple(L.shape), n)
    L = L.detach().cpu()
    assert torch.equal(L, L.T), "L is not exactly symmetric"
    assert bool((L.diagonal() == 1).all()), "the diagonal is not exactly 1"
    flagged = L == FLAGGED
    if direct:
        assert dtype == torch.float32 or not bool(flagged.any()), "fp64 never flags"
    else:
        assert not bool(flagged.any()), "a FLAGGED pair was returned (not recomputed in fp64)"
    ok = ~flagged
    assert bool(torch.isfinite(L[ok]).all()), "a pair was never written (NaN poison survived)"
    assert float(L[ok].min()) >= 0.0 and float(L[ok].max()) <= 1.0, (float(L[ok].min()), float(L[ok].max()))
    err = max_err(L, want, ok.numpy())
    tol = CONTRACT[dtype] if atol is None else atol
    assert err <= tol, f"max |L - L_ref| = {err:.3g} > {tol} over the resolved pairs"
    if lmn:
        v, v_ref = gm.lmn_from_connectivity(L).lmn, reference.lmn_from_connectivity(want).lmn
        assert abs(v - v_ref) <= LMN_RTOL * v_ref, (v, v_ref)
    return err


def check_against_reference(L: torch.Tensor, h: torch.Tensor, tail: nn.Module, n_lambda: int = 21, **kw) -> float:
    """:func:`check_backend` against the float64 NumPy reference of ``(h, tail)``."""
    return check_backend(L, reference.connectivity(h, tail, n_lambda), **kw)
