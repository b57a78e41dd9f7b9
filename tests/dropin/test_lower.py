"""MLP-like transformer tails (docs/dropin.md, "Lowered split tails") lowered into the fused C++ kernel (``grokfast_metrics.dropin.lower``).

Every lowered value is compared with the module's own float64 reference (``backend="reference"``: the paper-literal
loop through the traced, un-lowered tail). Models: ``tests/support/models.py`` (shaped like the public codebases).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from grokfast_metrics.kernels import cpu_fused as kcpu
from models import BUILDERS, nanda, nanda_offset
from torch import nn

import grokfast_metrics as gm
from grokfast_metrics.compute import core, generic
from grokfast_metrics.dropin import lower as _lower
from grokfast_metrics.dropin.plan import Plan
from grokfast_metrics.foundation.tail import Act

pytestmark = pytest.mark.usefixtures("one_thread")

needs_kernel = pytest.mark.skipif(not kcpu.available(), reason="the fused C++ CPU kernel cannot build here")


def _plan(model, probe, kw):
    kw = dict(kw)
    return Plan(model, probe, kw.pop("at"), **kw)


def _ref(plan, n_lambda=21):
    """L of the un-lowered split tail by the float64 paper-literal loop."""
    return plan.connectivity(n_lambda, backend="reference").double().numpy()


def _h(plan):
    with plan.running():
        return plan.forward()[1].reshape(plan.n, -1)


# --------------------------------------------------------------------------------------------
# the Nanda-style tail lowers and agrees with the reference


@needs_kernel
@pytest.mark.parametrize("act", ["ReLU", "GELU"])
def test_nanda_tail_lowered_agrees_with_reference(act):
    torch.manual_seed(0)
    model, probe, kw = nanda(n=14)
    if act == "GELU":
        model.blocks[0].mlp.act_type = "GELU"
    plan = _plan(model, probe, kw)
    L = plan.connectivity().double().numpy()
    assert plan.ran.startswith("split, lowered (cpu)"), plan.ran
    assert core.last_run_info()["ran"] == plan.ran
    desc = plan.lowering.reason
    assert "position 2 of 3" in desc and "Linear(32, 128) absorbed" in desc and "Linear(128, 13) folded" in desc
    assert act.lower() in desc and "skip Linear(32, 13)" in desc
    L_ref = _ref(plan)
    assert plan.ran.startswith("split, generic (reference)")
    # observed worst 4.8e-7 (ReLU) / 7.2e-7 (GELU): >= 13x margin
    np.testing.assert_allclose(L, L_ref, rtol=0, atol=1e-5)
    assert not np.allclose(L, 1.0)


def test_lowered_tail_runs_without_the_kernel(monkeypatch):
    """Where the C++ kernel cannot run, the lowered module takes the generic path (still only the last position)."""
    model, probe, kw = nanda(n=10)
    plan = _plan(model, probe, kw)
    monkeypatch.setenv("GROKFAST_METRICS_CPU_KERNEL", "0")
    L = plan.connectivity(n_lambda=9).double().numpy()
    assert plan.ran.startswith("split, lowered (torch)"), plan.ran
    # observed worst 1.5e-6: 6.5x margin
    np.testing.assert_allclose(L, _ref(plan, 9), rtol=0, atol=1e-5)


@needs_kernel
def test_fp64_model_lowered():
    model, probe, kw = nanda(n=10)
    model = model.double()
    plan = _plan(model, probe, kw)
    L = plan.connectivity(n_lambda=11).numpy()
    assert L.dtype == np.float64 and plan.ran.startswith("split, lowered (cpu)")
    # observed worst 2.9e-15
    np.testing.assert_allclose(L, _ref(plan, 11), rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------------
# ill-conditioned regimes through the skip term


@needs_kernel
@pytest.mark.parametrize("scale", [1e3, 1e5])
def test_large_common_logit_offset_through_the_skip(scale):
    plan = _plan(*nanda_offset(scale))
    L = plan.connectivity().double().numpy()
    info = core.last_run_info()
    assert plan.ran.startswith("split, lowered (cpu)")
    # the offset cancels exactly in u_j - u_i (taken in float64): no pair needs the fp64 recompute for it
    assert info["recomputed"] < info["pairs"]
    # observed worst 2.4e-7 (1e3) / 4.2e-7 (1e5): >= 24x margin (3.6e-2 with the absorb in fp32)
    np.testing.assert_allclose(L, _ref(plan), rtol=0, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("rel", [1e-3, 1e-5])
def test_nearly_identical_representations(rel):
    model, probe, kw = nanda(n=10)
    plan = _plan(model, probe, kw)
    plan.connectivity(n_lambda=3)
    h = _h(plan)
    g = torch.Generator().manual_seed(3)
    hn = h[:1] + rel * h.abs().max() * torch.randn(h.shape, generator=g)
    low = plan.lowering.tail
    L = gm.connectivity(hn, low).double().numpy()
    assert core.last_run_info()["backend"] == "cpu"
    L_ref = gm.connectivity(hn, plan.tail, backend="reference").double().numpy()
    # observed worst 6.0e-8 (1e-3) / 0 (1e-5, every pair recomputed in fp64): >= 160x margin
    np.testing.assert_allclose(L, L_ref, rtol=0, atol=1e-5)


@needs_kernel
def test_mlp_cancelling_the_skip_is_flagged():
    """An MLP whose linear part cancels the skip term to 1e-5 (relu(v) - relu(-v) = v), leaving a 1e-4 nonlinear part:
    the skip's |u_j - u_i| enters the rounding scale, so the pairs fp32 cannot resolve are recomputed in fp64."""
    model, probe, kw = nanda(n=10, d_model=16, d_mlp=64)
    plan = _plan(model, probe, kw)
    x_mean = _h(plan).reshape(10, 3, 16)[:, 2].mean(0)
    mlp = model.blocks[0].mlp
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        W = torch.randn(32, 16, generator=g)
        mlp.W_in.copy_(torch.cat([W, -W]))
        mlp.b_in.copy_(-mlp.W_in @ x_mean)  # units centred on the probe: they cross 0 along the paths
        P = torch.linalg.pinv(W)
        Q = torch.randn(16, 32, generator=g)
        mlp.W_out.copy_(torch.cat([-P, P], dim=1) * (1 - 1e-5) + 1e-4 * torch.cat([Q, torch.zeros(16, 32)], dim=1))
    plan = _plan(model, probe, kw)
    L = plan.connectivity().double().numpy()
    info = core.last_run_info()
    assert plan.ran.startswith("split, lowered (cpu)") and info["recomputed"] > 0
    # observed: every pair recomputed in fp64 (45 of 45), worst 0
    np.testing.assert_allclose(L, _ref(plan), rtol=0, atol=1e-5)
    assert L.min() < 0.99


# --------------------------------------------------------------------------------------------
# the kernel's ReLU path (crossing units only) and the skip term, against the general path


@needs_kernel
def test_relu_crossing_path_matches_general_path():
    """ReLU runs only the units whose ends differ in sign through the GEMM; LeakyReLU(0) (the same function) runs
    every unit through the general path."""
    model, probe, kw = nanda(n=16)
    plan = _plan(model, probe, kw)
    plan.connectivity(n_lambda=3)
    low = plan.lowering.tail
    h = _h(plan)
    spec = low.lowered_spec
    z, u = spec.absorb(h).contiguous(), spec.skip_values(h)
    L_relu = kcpu.connectivity_cpu(z, spec, 21, flag=False, u=u)
    leaky = copy.copy(spec)
    leaky.stages = [([Act("leaky_relu", 0.0)], spec.stages[0][1])]
    L_gen = kcpu.connectivity_cpu(z, leaky, 21, flag=False, u=u)
    # observed worst 3.0e-7: 6.7x margin
    np.testing.assert_allclose(L_relu.numpy(), L_gen.numpy(), rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="skip term"):
        kcpu.connectivity_cpu(z, spec, 21)


@needs_kernel
def test_pairs_f64_with_skip_matches_reference():
    model, probe, kw = nanda(n=8)
    plan = _plan(model, probe, kw)
    plan.connectivity(n_lambda=3)
    h = _h(plan)
    i, j = torch.triu_indices(8, 8, 1)
    v = kcpu.pairs_f64(h, plan.lowering.tail.lowered_spec, i, j, 21).numpy()
    L_ref = generic.reference_connectivity(h, plan.tail, 21)
    # observed worst 1.9e-15 (the exact float64 twin of the folded weights)
    np.testing.assert_allclose(v, L_ref[i, j], rtol=0, atol=1e-12)


def test_lowered_tail_on_the_torch_backend_is_named_generic():
    """``backend="torch"`` runs a lowered tail (skip term) as a module, on the generic path: ``backend_info`` and
    ``last_run_info`` say so (they said ``"mlp"``, the torch MLP path, which does not take the skip term)."""
    model, probe, kw = nanda(n=6)
    plan = _plan(model, probe, kw)
    plan.connectivity(n_lambda=3)
    h, low = _h(plan), plan.lowering.tail
    assert low is not None, plan.lowering.reason
    assert core.backend_info(h, low, "torch")["kernel"] == "generic"
    gm.connectivity(h, low, n_lambda=3, backend="torch")
    assert core.last_run_info()["kernel"] == "generic"


# --------------------------------------------------------------------------------------------
# weights change: the folded weights follow


@needs_kernel
def test_lowered_weights_follow_the_model():
    model, probe, kw = nanda(n=10)
    plan = _plan(model, probe, kw)
    L0 = plan.connectivity(n_lambda=11).double().numpy()
    with torch.no_grad():
        model.blocks[0].mlp.W_in.mul_(-1.5)
        model.unembed.W_U.add_(0.3)
    L1 = plan.connectivity(n_lambda=11).double().numpy()
    assert plan.ran.startswith("split, lowered (cpu)")
    assert np.abs(L1 - L0).max() > 1e-2
    # observed worst 1.2e-7: 83x margin
    np.testing.assert_allclose(L1, _ref(plan, 11), rtol=0, atol=1e-5)


@needs_kernel
def test_refold_after_a_training_step_does_not_trace_again(monkeypatch):
    """Re-folding the lowered tail after a parameter change reuses its fx traces: tracing patches ``torch.nn.Module``
    for the whole process, and a training loop in another thread ran into the tracer (fx's "parameter is not a member
    of this module", docs/dropin.md, "Threads"). The folded values still follow the weights."""
    import torch.fx as fx

    model, probe, kw = nanda(n=8)
    plan = _plan(model, probe, kw)
    plan.connectivity(n_lambda=7)
    traced = []
    real = fx.Tracer.trace
    monkeypatch.setattr(fx.Tracer, "trace", lambda self, *a, **k: traced.append(1) or real(self, *a, **k))
    with torch.no_grad():
        model.blocks[0].mlp.W_in.mul_(-1.5)
    L = plan.connectivity(n_lambda=7).double().numpy()
    assert plan.ran.startswith("split, lowered (cpu)") and traced == []
    np.testing.assert_allclose(L, _ref(plan, 7), rtol=0, atol=1e-5)  # observed worst 2.4e-7


# --------------------------------------------------------------------------------------------
# what lowers and what does not, and why


class _ResMLP(nn.Module):
    def __init__(self, d=6, hdim=10, o=4, depth=1, norm=False):
        super().__init__()
        torch.manual_seed(11)
        self.fc1, self.fc2, self.head = nn.Linear(d, hdim), nn.Linear(hdim, d), nn.Linear(d, o)
        self.extra = nn.Sequential(nn.Linear(d, d), nn.Tanh()) if depth > 1 else nn.Identity()
        self.norm = nn.LayerNorm(d) if norm else nn.Identity()

    def forward(self, x):
        x = x + 0.5 * self.fc2(torch.relu(self.fc1(x))) - 2.0
        return self.head(self.norm(self.extra(x)))


def test_plain_module_lowers_and_matches_its_forward():
    m = _ResMLP()
    low = _lower.lower(m, (6,))
    assert low.tail is not None, low.reason
    assert "relu" in low.reason and "skip Linear(6, 4)" in low.reason
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # observed 1.2e-7
        torch.testing.assert_close(low.tail(x), m(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        (dict(depth=2), "more than one nonlinear layer"),
        (dict(norm=True), "LayerNorm 'norm' follows the cut"),
    ],
)
def test_not_lowered_says_why(kwargs, why):
    low = _lower.lower(_ResMLP(**kwargs), (6,))
    assert low.tail is None and why in low.reason


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_test_model_says_whether_it_lowered(name):
    model, probe, kw = BUILDERS[name]()
    plan = _plan(model, probe, kw)
    plan.connectivity(n_lambda=5)
    assert plan.ran.startswith(plan.path)
    if plan.path == "split":
        assert ("lowered" in plan.ran) and plan.lowering.reason in plan.ran
    if name == "nanda" and kcpu.available():
        assert plan.ran.startswith("split, lowered (cpu)")


@needs_kernel
def test_bench_dropin_rows_before_and_after():
    """``bench --dropin`` on tiny sizes: every model gets both timings, the lowered ones a roof fraction."""
    from grokfast_metrics.bench import dropin as bench_dropin

    rows = bench_dropin.dropin_rows(n=6, n_before=4, n_small=4, n_lambda=5, log=lambda m: None, roof_size=64, dense_pairs=10)
    assert {r["model"].split(" ")[0] for r in rows} == set(BUILDERS)
    for r in rows:
        assert r["after_us"] > 0 and r["before_us"] > 0 and r["before_n"] == 4
        assert ("frac_roof" in r) == r["ran"].startswith("split, lowered")
        assert r["before_ran"].split(" ")[0].strip(",") in ("split", "hooks", "chain") and "lowered (" not in r["before_ran"]
    lowered = [r for r in rows if "frac_roof" in r]
    assert len(lowered) == 2 and all(0 < r["crossing"] < 1 and r["dense_us"] > 0 for r in lowered)
    table = bench_dropin.format_rows(rows)
    assert table.count("\n") == len(rows) + 1 and "d_mlp 512" in table


def test_a_lowering_failure_never_breaks_lmn_at(monkeypatch):
    """An op the interpreter does not expect (here: any function raising) leaves the generic path, with the reason."""
    model, probe, kw = nanda(n=8)

    def boom(self, f, a, kw):
        raise KeyError("unexpected")

    monkeypatch.setattr(_lower._Interp, "function", boom)
    plan = _plan(model, probe, kw)
    L = plan.connectivity(n_lambda=5).double().numpy()
    assert plan.lowering.tail is None and "lowering failed (KeyError" in plan.lowering.reason
    assert "generic" in plan.ran and "lowering failed" in plan.ran
    # observed worst 2.4e-7
    np.testing.assert_allclose(L, _ref(plan, 5), rtol=0, atol=1e-5)


class _GainMLP(nn.Module):
    """``fc2(relu(gain * relu(fc1 h)))``: one hidden layer (lowered) while ``gain`` is 1, two once it moves."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(12)
        self.fc0, self.act = nn.Linear(5, 6), nn.Tanh()
        self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 3)
        self.gain = nn.Parameter(torch.ones(10))

    def forward(self, x):
        return self.fc2(torch.relu(self.gain * torch.relu(self.fc1(self.act(self.fc0(x))))))


def test_a_tail_that_stops_lowering_after_a_step_says_why():
    """Re-folded after a parameter change, a tail may no longer lower: the run reports the lowering's reason (it used to
    run the missing tail on the probe and report a ``TypeError``)."""
    model = _GainMLP()
    plan = Plan(model, torch.randn(7, 5, generator=torch.Generator().manual_seed(2)), "act")
    plan.connectivity(n_lambda=5)
    assert plan.path == "split" and plan.lowering.tail is not None, plan.lowering.reason
    with torch.no_grad():
        model.gain.mul_(2.0)
    L = plan.connectivity(n_lambda=5).double().numpy()
    assert plan.lowering.tail is None and "more than one nonlinear layer" in plan.lowering.reason
    assert "not lowered: more than one nonlinear layer" in plan.ran and "failed on the probe" not in plan.ran, plan.ran
    # observed worst 6.0e-7 (this 2-core CPU): 17x margin
    np.testing.assert_allclose(L, _ref(plan, 5), rtol=0, atol=1e-5)
