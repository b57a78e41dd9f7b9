"""``compile=True`` (docs/dropin.md), the generic tail (attention after the cut: not lowered) through ``torch.compile``.

Compiling is slow (tens of seconds on a loaded CPU): one real compile runs in CI (the agreement test below), the
other real compiles are marked ``slow`` (``pytest -m slow``); the batching and the fallback are tested with
``torch.compile`` replaced (no compile at all)."""

from __future__ import annotations

import warnings

import pytest
import torch
from models import BUILDERS
from torch import nn

import grokfast_metrics as gm
from grokfast_metrics.compute import generic
from grokfast_metrics.compute.core import last_run_info
from grokfast_metrics.dropin import measure as dropin
from grokfast_metrics.dropin.plan import Plan

pytestmark = pytest.mark.usefixtures("one_thread")


def _build(name, **kw):
    model, probe, args = BUILDERS[name](**kw)
    args = dict(args)
    return model, probe, args.pop("at"), args


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _ref(model, probe, at, kw) -> torch.Tensor:
    return dropin.lmn_at(model, probe, at, backend="reference", **kw).connectivity.double()


def test_compiled_tail_agrees_with_the_reference_and_compiles_once():
    """The one real compile in CI: the Grokfast-style decoder at layers.0 (attention, LayerNorm, ln_f after the cut),
    compiled at its first computation, then reused after an in-place weight update without a new graph (the
    parameters are graph inputs, not constants: the values follow the new weights)."""
    model, probe, at, kw = _build("grokfast", n=8)
    plan = Plan(model, probe, at, **kw, compile=True)
    g0 = _graphs()
    L = plan.connectivity()
    info = last_run_info()["compile"]
    assert info["compiled"] and info["graphs"] == 1 and info["first_call_s"] > 0 and info["failed"] is None, info
    assert _graphs() - g0 == 1 and "compiled (torch.compile" in plan.ran, plan.ran
    assert float((L.double() - _ref(model, probe, at, kw)).abs().max()) < 1e-5  # observed 1.2e-06
    with torch.no_grad():
        for p in model.layers[1].parameters():  # a training step: in place, the tensors stay the same
            p.mul_(1.5)
    L2 = plan.connectivity()
    assert _graphs() - g0 == 1 and last_run_info()["compile"]["graphs"] == 1  # no recompile
    assert float((L2 - L).abs().max()) > 1e-3  # the new weights were used
    assert float((L2.double() - _ref(model, probe, at, kw)).abs().max()) < 1e-5  # observed 3.0e-07


class _Recorder(nn.Module):
    """A tail that records the batch sizes it is called with (through the 'compiled' function or eagerly)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.seen: list[int] = []

    def forward(self, x):
        self.seen.append(x.shape[0])
        return torch.tanh(self.lin(x))


def test_compiled_tail_runs_one_batch_shape(monkeypatch):
    """Every batch reaching the compiled function has exactly ``rows`` rows: longer batches are cut, a remainder of
    at least rows/4 is padded (and the padding dropped), a smaller one runs eager; outputs equal the eager tail's."""
    compiled_calls: list[int] = []
    monkeypatch.setattr(torch, "compile", lambda f, **k: lambda m, x: compiled_calls.append(x.shape[0]) or f(m, x))
    tail = _Recorder()
    ct = generic.CompiledTail(tail, rows=8)
    x = torch.randn(29, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for b in (8, 29, 17, 3, 1):  # 29 = 8 + 8 + 8 + 5 (padded); 17 = 8 + 8 + 1 (eager); 3: padded; 1: eager
            assert torch.equal(ct(x[:b]), tail(x[:b]))
    assert set(compiled_calls) == {8} and len(compiled_calls) == 1 + 4 + 2 + 1
    assert ct.graphs == 0 and ct.first_call_s is not None and ct.failed is None
    assert not ct.info()["compiled"]  # nothing was compiled (torch.compile replaced): not reported as compiled
    with torch.no_grad():
        torch.func.functional_call(ct, {k: v.double() for k, v in ct.state_dict().items()}, (x[:8].double(),))
        # another dtype (the fp64 recomputation of flagged pairs, on fp64 copies of the parameters): eager
    assert len(compiled_calls) == 8


def test_a_compile_failure_warns_once_and_runs_the_eager_tail(monkeypatch):
    """Where inductor cannot compile (here: every compile raises), one warning line and the uncompiled tail, with the
    same values; the plan reports it (``last_run_info()["compile"]``, ``plan.ran``)."""

    def broken(f, **k):
        def fn(m, x):
            raise RuntimeError("InductorError: C++ compile error\n(a long compiler log)")

        return fn

    model, probe, at, kw = _build("grok", n=6)
    L_eager = Plan(model, probe, at, **kw).connectivity()
    monkeypatch.setattr(torch, "compile", broken)
    plan = Plan(model, probe, at, **kw, compile=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        L = plan.connectivity()
        plan.connectivity()
    msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
    assert len(msgs) == 1 and "\n" not in msgs[0] and "torch.compile failed" in msgs[0], msgs
    assert "InductorError" in msgs[0] and "compiler log" not in msgs[0]
    assert float((L - L_eager).abs().max()) < 1e-6  # the eager tail ran: observed 0
    info = last_run_info()["compile"]
    assert not info["compiled"] and "InductorError" in info["failed"] and "not compiled" in plan.ran, plan.ran


def test_the_tails_own_error_is_raised_not_reported_as_a_compile_failure(monkeypatch):
    def broken(f, **k):
        def fn(m, x):
            raise RuntimeError("dynamo: something")

        return fn

    class Bad(nn.Module):
        def forward(self, x):
            raise RuntimeError("shape mismatch in the user's tail")

    monkeypatch.setattr(torch, "compile", broken)
    ct = generic.CompiledTail(Bad(), rows=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="user's tail"):
            ct(torch.zeros(4, 2))
    assert ct.failed is None


def test_compile_is_reported_where_it_does_not_apply():
    """The lowered Nanda-style tail runs the fused kernel: compile=True changes nothing and says so; the hook path is
    not compiled (it re-runs the whole model), with the reason."""
    model, probe, at, kw = _build("nanda", n=6)
    plan = Plan(model, probe, at, **kw, compile=True)
    plan.connectivity()
    if "lowered" in plan.ran:
        assert last_run_info()["compile"] is None and "compile=True not used" in plan.ran
    model, probe, at, kw = _build("mamay", n=6)
    plan = Plan(model, probe, at, **kw, compile=True, path="hooks")
    plan.connectivity()
    info = last_run_info()["compile"]
    assert not info["compiled"] and "hook tail" in info["why"] and "not compiled" in plan.ran


def test_tracker_and_lmn_at_take_compile(monkeypatch):
    """``compile=`` reaches the plans of ``LMNTracker`` and ``lmn_at`` (torch.compile replaced: no real compile)."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda f, **k: calls.append(k) or f)
    model, probe, at, kw = _build("grokfast", n=6)
    tracker = gm.LMNTracker(model, probe, at, compile=True, **kw)
    tracker.update(0)
    assert calls == [{"dynamic": False}] and last_run_info()["compile"]["rows"] > 0
    dropin.lmn_at(model, probe, at, compile=True, **kw)
    assert len(calls) == 2
    gm.LMNTracker(model, probe, at, **kw).update(0)
    assert len(calls) == 2 and last_run_info()["compile"] is None


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mamay", "grok"])
def test_other_attention_tails_compiled_agree_with_the_reference(name):
    """danielmamay-style (split inside ``layers``) and openai/grok-style (tuple blocks, masked_fill_) compiled."""
    model, probe, at, kw = _build(name, n=8)
    plan = Plan(model, probe, at, **kw, compile=True)
    L = plan.connectivity()
    assert last_run_info()["compile"]["compiled"], plan.ran
    assert float((L.double() - _ref(model, probe, at, kw)).abs().max()) < 1e-5  # observed 1.8e-06 (grok), 1.2e-06 (mamay)


@pytest.mark.slow
def test_compiled_tail_in_an_ill_conditioned_regime_matches_the_reference():
    """Logits offset by 1e3 after ln_f: every pair's fp32 r² cancels, is flagged and recomputed in fp64 (eager)."""
    model, probe, at, kw = _build("grokfast", n=10)
    with torch.no_grad():
        model.head.bias = torch.nn.Parameter(torch.full((model.head.out_features,), 1e3))
    plan = Plan(model, probe, at, **kw, compile=True)
    L = plan.connectivity()
    assert last_run_info()["compile"]["compiled"] and last_run_info()["recomputed"] > 0
    assert float((L.double() - _ref(model, probe, at, kw)).abs().max()) < 1e-5  # observed 0 (all 45 pairs recomputed in fp64)


def test_each_compiled_tail_has_its_own_code_object(monkeypatch):
    """Dynamo keeps at most 8 graphs per code object: compiled through one shared ``forward``, the 9th tail of a
    process ran uncompiled (measured: three models at three batch sizes). Each CompiledTail compiles its own copy."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda f, **k: compiled.append(f) or f)
    with torch.no_grad():
        for _ in range(2):
            generic.CompiledTail(_Recorder(), rows=2)(torch.zeros(2, 3))
    codes = {id(f.__code__) for f in compiled} | {id(generic._run_module.__code__)}
    assert len(compiled) == 2 and len(codes) == 3


def test_bench_dropin_times_the_compiled_generic_tails(monkeypatch):
    """``bench --dropin``'s compile=True columns, on tiny sizes with torch.compile replaced (no real compile): every
    generic tail gets them, lowered and chain tails do not."""
    from grokfast_metrics.bench import dropin as bench_dropin

    monkeypatch.setattr(torch, "compile", lambda f, **k: f)
    rows = bench_dropin.dropin_rows(
        n=5, n_before=4, n_small=4, n_lambda=5, log=lambda m: None, roof_size=32, dense_pairs=10, compiled=True, repeats=1
    )
    for r in rows:
        generic_tail = r["path"] == "split" and not r["ran"].startswith("split, lowered")
        assert ("compiled_us" in r) == generic_tail, r["ran"]
        if generic_tail:
            assert r["compiled_us"] > 0 and r["eager_us"] > 0 and r["compiled_n"] == 4 and r["compiled_graphs"] == 0
    assert sum("compiled_us" in r for r in rows) >= 3  # grokfast, mamay, grok (and nanda without the C++ kernel)
    table = bench_dropin.format_rows(rows)
    assert table.count("\n") == len(rows) + 1 and "not compiled: " in table  # nothing compiled: said so
