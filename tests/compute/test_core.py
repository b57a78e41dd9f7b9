"""torch backend and public API against the NumPy reference, the properties of docs/lmn.md, input errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from contract import CONTRACT, check_against_reference
from helpers import ACTS, Wrapped, abs_tail, mlp_tail
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import grokfast_metrics as gm
from grokfast_metrics.compute import core, reference
from grokfast_metrics.compute.torch_paths import triu_pair_chunks
from grokfast_metrics.foundation.tail import parse_tail


def _compare(h, tail, backend="torch", n_lambda=21, **kw):
    """The torch path's ``L`` and LMN through :func:`contract.check_against_reference` (every backend's invariants)."""
    L = gm.connectivity(h, tail, n_lambda=n_lambda, backend=backend, **kw)
    dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    check_against_reference(L, h, tail, n_lambda, dtype=dtype, lmn=True)
    return L


@pytest.mark.parametrize("dtype", list(CONTRACT))
@pytest.mark.parametrize("n, widths", [(2, [5, 7, 3]), (3, [4, 37, 1]), (17, [9, 100, 31]), (40, [6, 13, 11, 5]), (23, [8, 19, 10, 7, 3])])
def test_torch_matches_reference_shapes(n, widths, dtype):
    h = torch.randn(n, widths[0], generator=torch.Generator().manual_seed(n), dtype=dtype)
    _compare(h, mlp_tail(widths, "silu", dtype=dtype, seed=n))


@pytest.mark.parametrize("dtype", list(CONTRACT))
@pytest.mark.parametrize("act", sorted(ACTS))
def test_torch_matches_reference_activations(act, dtype):
    h = torch.randn(19, 6, generator=torch.Generator().manual_seed(1), dtype=dtype)
    _compare(h, mlp_tail([6, 21, 12, 4], act, dtype=dtype))


@pytest.mark.parametrize("dtype", list(CONTRACT))
@pytest.mark.parametrize("bias, final_act", [(False, None), (True, "sigmoid"), (False, "tanh")])
def test_bias_and_trailing_activation(bias, final_act, dtype):
    h = torch.randn(15, 5, generator=torch.Generator().manual_seed(2), dtype=dtype)
    _compare(h, mlp_tail([5, 11, 3], "gelu", bias=bias, final_act=final_act, dtype=dtype))


@pytest.mark.parametrize("dtype", list(CONTRACT))
def test_tail_starting_with_activation(dtype):
    """h = pre-activation of a layer: the tail starts with an activation, nothing is absorbed."""
    tail = nn.Sequential(nn.SiLU(), *mlp_tail([9, 14, 4], "tanh", dtype=dtype)).to(dtype)
    h = torch.randn(13, 9, generator=torch.Generator().manual_seed(3), dtype=dtype)
    _compare(h, tail)


@pytest.mark.parametrize("dtype", list(CONTRACT))
def test_generic_path_matches_reference(dtype):
    inner = mlp_tail([7, 16, 5], "silu", dtype=dtype)
    h = torch.randn(21, 7, generator=torch.Generator().manual_seed(4), dtype=dtype)
    check_against_reference(gm.connectivity(h, Wrapped(inner), backend="torch"), h, inner)


@pytest.mark.parametrize("n_lambda", [3, 8, 33])
def test_other_n_lambda(n_lambda):
    h = torch.randn(11, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    _compare(h, mlp_tail([4, 10, 3], "relu", dtype=torch.float64), n_lambda=n_lambda)


@pytest.mark.parametrize("chunk_bytes", [1, 3000, 10**9])
def test_result_independent_of_chunking(chunk_bytes):
    h = torch.randn(30, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    tail = mlp_tail([6, 12, 4], "silu", dtype=torch.float64)
    L = gm.connectivity(h, tail, backend="torch", chunk_bytes=chunk_bytes)
    L0 = gm.connectivity(h, tail, backend="torch")
    torch.testing.assert_close(L, L0, rtol=0, atol=1e-14)
    Lg = gm.connectivity(h, Wrapped(tail), backend="torch", chunk_bytes=chunk_bytes)
    torch.testing.assert_close(Lg, L0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n, chunk", [(2, 1), (3, 2), (10, 7), (33, 1000)])
def test_triu_pair_chunks_cover_each_pair_once(n, chunk):
    got = [(int(i), int(j)) for a, b in triu_pair_chunks(n, chunk, torch.device("cpu")) for i, j in zip(a, b)]
    assert got == list(itertools.combinations(range(n), 2))


def test_reference_backend_returns_reference():
    h = torch.randn(9, 4, generator=torch.Generator().manual_seed(7))
    tail = mlp_tail([4, 8, 2])
    L = gm.connectivity(h, tail, backend="reference")
    np.testing.assert_allclose(L.numpy(), reference.connectivity(h, tail).astype(np.float32))


def test_low_precision_input_computes_in_fp32():
    h = torch.randn(8, 4, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    tail = mlp_tail([4, 8, 2])
    check_against_reference(gm.connectivity(h, tail), h.float(), tail, dtype=torch.float32)


# ------------------------------------------------------------------------------------------
# the properties every implementation satisfies (docs/lmn.md)


@pytest.mark.parametrize(
    "tail",
    [nn.Linear(6, 3), nn.Sequential(nn.Linear(6, 9), nn.Identity(), nn.Linear(9, 2)), nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 4))],
)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_affine_tail_gives_exactly_one(tail, backend):
    h = torch.randn(25, 6, generator=torch.Generator().manual_seed(9))
    res = gm.lmn(h, tail, backend=backend)
    assert bool((res.connectivity == 1).all())
    assert res.lmn == 1.0 and res.entropy_bits == 0.0


def test_affine_generic_module_gives_one():
    h = torch.randn(12, 6, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    res = gm.lmn(h, Wrapped(nn.Linear(6, 3).double()))
    assert torch.allclose(res.connectivity, torch.ones(12, 12, dtype=torch.float64), atol=1e-12)
    assert res.lmn == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("m", [1, 4])
def test_two_unconnected_clusters_give_lmn_two(backend, m):
    """Samples at -1 and +1 through |x|: paths across are symmetric Vs (r2 = 0), within are identical."""
    h = torch.tensor([[-1.0]] * m + [[1.0]] * m)
    res = gm.lmn(h, abs_tail(), backend=backend)
    assert res.lmn == pytest.approx(2.0, rel=1e-9)
    assert float(res.connectivity[0, -1]) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("c, m", [(1, 5), (2, 3), (3, 4), (7, 2)])
def test_block_connectivity_gives_c(c, m):
    L = torch.block_diag(*[torch.ones(m, m, dtype=torch.float64)] * c)
    perm = torch.randperm(c * m, generator=torch.Generator().manual_seed(c))
    res = gm.lmn_from_connectivity(L[perm][:, perm])
    assert res.lmn == pytest.approx(c, rel=1e-12)
    assert res.lmn == pytest.approx(reference.lmn_from_connectivity(L).lmn, rel=1e-12)


def test_duplicate_samples_are_connected():
    h = torch.randn(9, 5, generator=torch.Generator().manual_seed(11))
    h[6] = h[2]
    h[8] = h[2]
    tail = mlp_tail([5, 12, 4], "tanh")
    for L in (gm.connectivity(h, tail), gm.connectivity(h, Wrapped(tail)), gm.connectivity(h, tail, backend="reference")):
        assert L[2, 6] == 1 and L[6, 8] == 1 and L[8, 2] == 1


def test_constant_output_dimension_counts_as_linear():
    """An output that ignores the input (zero weight row) is constant along every path: r2 = 1."""
    tail = mlp_tail([4, 9, 3], "silu", dtype=torch.float64)
    with torch.no_grad():
        tail[2].weight[1] = 0.0
    h = torch.randn(10, 4, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    _compare(h, tail)
    tail1 = nn.Sequential(tail[0], tail[1], nn.Linear(9, 1).double())
    with torch.no_grad():
        tail1[2].weight.zero_()
    assert bool((gm.connectivity(h, tail1) == 1).all())


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(2, 24),
    d=st.integers(1, 6),
    hid=st.integers(1, 20),
    o=st.integers(1, 5),
    act=st.sampled_from(sorted(ACTS)),
    seed=st.integers(0, 10**6),
)
def test_properties_hypothesis(n, d, hid, o, act, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    tail = mlp_tail([d, hid, o], act, dtype=torch.float64, seed=seed)
    L = gm.connectivity(h, tail)
    assert torch.equal(L, L.T)
    assert bool((L >= 0).all()) and bool((L <= 1).all())
    assert bool((L.diagonal() == 1).all())
    perm = torch.randperm(n, generator=g)
    Lp = gm.connectivity(h[perm], tail)
    torch.testing.assert_close(Lp, L[perm][:, perm], rtol=0, atol=1e-10)
    r, rp = gm.lmn_from_connectivity(L), gm.lmn_from_connectivity(Lp)
    assert rp.lmn == pytest.approx(r.lmn, rel=1e-9)
    assert 1.0 - 1e-12 <= r.lmn <= n + 1e-9


def test_lmn_from_connectivity_matches_reference_and_sorts():
    g = torch.Generator().manual_seed(13)
    A = torch.rand(30, 30, generator=g, dtype=torch.float64)
    L = (A + A.T) / 2
    L.diagonal().fill_(1.0)
    res = gm.lmn_from_connectivity(L)
    ref = reference.lmn_from_connectivity(L)  # an LMNResult too, eigenvalues descending
    assert res.lmn == pytest.approx(ref.lmn, rel=1e-12) and res.entropy_bits == pytest.approx(ref.entropy_bits, rel=1e-12)
    np.testing.assert_allclose(res.eigenvalues.numpy(), ref.eigenvalues.numpy(), rtol=1e-12)
    assert res.lmn == pytest.approx(2.0**res.entropy_bits)


# ------------------------------------------------------------------------------------------
# side effects


@pytest.mark.parametrize("wrap", [False, True])
def test_no_graph_no_mode_change_no_rng_change(wrap):
    inner = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Dropout(0.5), nn.Linear(8, 3)) if wrap else mlp_tail([4, 8, 3])
    tail = Wrapped(inner) if wrap else inner
    tail.train()
    h = torch.randn(10, 4, requires_grad=True)
    before = [p.detach().clone() for p in tail.parameters()]
    rng = torch.get_rng_state()
    L = gm.connectivity(h, tail)
    assert not L.requires_grad and L.grad_fn is None
    assert torch.equal(rng, torch.get_rng_state())
    assert all(m.training for m in tail.modules())
    assert all(torch.equal(a, b) for a, b in zip(before, tail.parameters()))
    if wrap:  # evaluated in eval mode: dropout is off, so the result is deterministic
        torch.testing.assert_close(L, gm.connectivity(h, tail))


# ------------------------------------------------------------------------------------------
# bad input


def _tail():
    return mlp_tail([4, 8, 3])


class _IntLogits(nn.Module):
    def forward(self, x):
        return (x * 10).long()


class _ComplexLogits(nn.Module):
    def forward(self, x):
        return torch.complex(x, x)


def test_reference_runs_any_module_through_itself():
    """backend='reference' on a tail that is not an MLP (Softmax) is the float64 per-pair loop through the module."""
    torch.manual_seed(3)
    h, tail = torch.randn(7, 4, dtype=torch.float64), nn.Sequential(nn.Linear(4, 6), nn.Softmax(dim=1)).double()
    L_ref = gm.connectivity(h, tail, backend="reference")
    L_torch = gm.connectivity(h, tail, backend="torch")
    assert float((L_ref - L_torch).abs().max()) <= CONTRACT[torch.float64]  # worst observed 1.0e-15


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_a_tail_working_in_place_never_changes_h(backend):
    h = torch.randn(8, 4)
    before = h.clone()
    tail = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    L = gm.connectivity(h, tail, backend=backend)
    assert torch.equal(h, before)
    assert float((L - gm.connectivity(before.clone(), tail, backend="reference")).abs().max()) <= CONTRACT[torch.float32]


def test_numpy_integer_n_lambda_is_accepted():
    h = torch.randn(6, 4)
    assert torch.equal(gm.connectivity(h, _tail(), n_lambda=np.int64(21)), gm.connectivity(h, _tail(), n_lambda=21))


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
@pytest.mark.parametrize("wrap", [False, True])
def test_diverged_model_is_an_error_not_a_number(backend, wrap):
    """Logits that overflow (a diverged run) must not come back as a plausible L (it used to read LMN = N)."""
    tail = _tail()
    with torch.no_grad():
        tail[2].weight.fill_(1e38)  # finite weights, logits overflow fp32 to inf
    with pytest.raises(ValueError, match="NaN/Inf for"):
        gm.connectivity(torch.randn(6, 4) * 10, Wrapped(tail) if wrap else tail, backend=backend)


def test_tail_buffer_on_another_device_is_refused():
    tail = _tail()
    tail.register_buffer("scale", torch.ones(1, device="meta"))
    with pytest.raises(ValueError, match="buffer 'scale' is on meta"):
        gm.connectivity(torch.randn(5, 4), tail)


def test_autocast_does_not_lower_the_precision():
    h, tail = torch.randn(12, 4), Wrapped(_tail())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        L = gm.connectivity(h, tail)
    assert L.dtype == torch.float32
    torch.testing.assert_close(L, gm.connectivity(h, tail), rtol=0, atol=0)


@pytest.mark.parametrize(
    "h, tail, kwargs, exc, match",
    [
        ([[1.0, 2.0]], _tail(), {}, TypeError, "torch.Tensor"),
        (torch.randn(5), _tail(), {}, ValueError, "2-D"),
        (torch.randn(1, 4), _tail(), {}, ValueError, "at least 2"),
        (torch.ones(5, 4, dtype=torch.long), _tail(), {}, TypeError, "floating"),
        (torch.randn(5, 3), _tail(), {}, ValueError, "expects 4"),
        (torch.randn(5, 4), "not a module", {}, TypeError, "nn.Module"),
        (torch.randn(5, 4), _tail(), {"n_lambda": 2}, ValueError, "n_lambda"),
        (torch.randn(5, 4), _tail(), {"n_lambda": 21.0}, TypeError, "n_lambda"),
        (torch.randn(5, 4), _tail(), {"backend": "cuda"}, ValueError, "backend must be one of"),
        (torch.randn(5, 4), Wrapped(_tail()), {"backend": "triton"}, ValueError, "MLP tail"),
        (torch.randn(5, 3), Wrapped(_tail()), {}, ValueError, "tail failed"),
        (torch.randn(5, 4), Wrapped(nn.Flatten(0)), {}, ValueError, r"\(B, O\)"),
        (torch.randn(5, 4), _tail(), {"n_lambda": 10**9}, ValueError, "n_lambda must be <="),
        (torch.empty(5, 4, device="meta"), _tail(), {}, ValueError, "meta device"),
        (torch.randn(5, 4), _IntLogits(), {}, ValueError, "floating-point logits"),
        (torch.randn(5, 4), _ComplexLogits(), {}, ValueError, "floating-point logits"),
    ],
)
def test_bad_input_raises(h, tail, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        gm.connectivity(h, tail, **kwargs)


def test_nonfinite_h_names_rows():
    h = torch.randn(6, 4)
    h[1, 0] = float("nan")
    h[4, 2] = float("inf")
    with pytest.raises(ValueError, match=r"2 row\(s\) \[1, 4\]"):
        gm.lmn(h, _tail())


def test_nonfinite_parameter_named():
    tail = _tail()
    with torch.no_grad():
        tail[2].bias[0] = float("nan")
    with pytest.raises(ValueError, match=r"'2\.bias'"):
        gm.connectivity(torch.randn(5, 4), tail)


def test_triton_on_cpu_without_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        gm.connectivity(torch.randn(5, 4), _tail(), backend="triton")


@pytest.mark.parametrize(
    "L, exc, match",
    [
        (torch.ones(3, 4), ValueError, "square"),
        (torch.full((3, 3), float("inf")), ValueError, "Inf"),
        (torch.zeros(3, 3), ValueError, "all zeros"),
        (torch.eye(3, dtype=torch.bool), TypeError, "real floating"),
        (torch.eye(3, dtype=torch.complex64), TypeError, "real floating"),
        (torch.eye(3, dtype=torch.long), TypeError, "real"),
        (torch.tensor([[1.0, 0.5], [0.2, 1.0]]), ValueError, "not symmetric"),
    ],
)
def test_lmn_from_connectivity_bad_input(L, exc, match):
    with pytest.raises(exc, match=match):
        gm.lmn_from_connectivity(L)


def test_lmn_from_connectivity_nan_entries_give_nan():
    """NaN entries (pairs the generic path cannot resolve in float64) make LMN NaN, not an error (it raised before):
    an asynchronous tracker's eigen step records it."""
    L = torch.eye(4)
    L[1, 2] = L[2, 1] = float("nan")
    res = gm.lmn_from_connectivity(L)
    assert np.isnan(res.lmn) and np.isnan(res.entropy_bits) and res.eigenvalues.shape == (4,)
    assert bool(torch.isnan(res.eigenvalues).all()) and res.connectivity is L


def test_resolve_backend_names_what_runs(monkeypatch):
    h = torch.randn(5, 4)
    tail = _tail()
    assert core.resolve_backend(h, tail, "torch") == "torch"
    assert core.resolve_backend(h, Wrapped(tail), "auto") == "torch"  # generic path: torch ops
    assert core.resolve_backend(h, tail, "reference") == "reference"
    fp64 = "cpu" if core._unavailable("cpu", h, torch.float64, parse_tail(tail)) is None else "torch"
    assert core.resolve_backend(h.double(), tail, "auto") == fp64  # fp64: the fused CPU kernel where it runs
    monkeypatch.setenv("GROKFAST_METRICS_CPU_KERNEL", "0")
    assert core.resolve_backend(h, tail, "auto") == "torch"


def test_resolve_backend_agrees_with_dispatch_for_low_precision_input():
    """bf16 h is computed in fp32, so it takes the same path as fp32 h."""
    h = torch.randn(6, 4)
    tail = _tail()
    assert core.resolve_backend(h.to(torch.bfloat16), tail, "auto") == core.resolve_backend(h, tail, "auto")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4])
def test_h_offset_cancelled_by_the_first_linear(offset: float, backend: str) -> None:
    """An offset of ``h`` on which the first Linear's rows sum to 0 (``z = W h + b`` small, ``W h`` not): the fused paths
    absorb in float64 and round ``z`` once (docs/lmn.md, "Accuracy contract"), as their error estimate sees ``|z|`` only.
    Absorbed in fp32 the pairs read 3.8e-5 / 3.6e-4 / 2.3e-3 (C++ kernel) and 1.9e-5 / 2.4e-4 / 3.6e-3 (torch) off at
    offsets 1e2 / 1e3 / 1e4, unflagged; worst observed after (against the reference): 6.2e-7 (C++) / 4.8e-7 (torch), 16x."""
    import copy

    from grokfast_metrics.kernels import cpu_fused

    if backend == "cpu" and not cpu_fused.available():
        pytest.skip(f"fused CPU kernel unavailable: {cpu_fused.build_info()['error']}")
    torch.manual_seed(0)
    tail = nn.Sequential(nn.Linear(20, 16), nn.SiLU(), nn.Linear(16, 5))
    with torch.no_grad():
        tail[0].weight -= tail[0].weight.mean(dim=1, keepdim=True)
    h = torch.randn(24, 20) + offset
    L = gm.connectivity(h, tail, backend=backend).numpy()
    L64 = reference.connectivity(h.double(), copy.deepcopy(tail).double())
    err = np.abs(L - L64).max()
    assert err <= CONTRACT[torch.float32], f"max |L - L_ref| = {err:.3g} at h offset {offset:g}"
