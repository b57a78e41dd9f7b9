"""docs/dropin.md, "How the rest of the model is run", and the drop-in defects: which path runs and why, position
pruning, the split of models fx could not trace, and the defects found on the way. Models: ``tests/support/models.py`` (shaped
like the public codebases)."""

from __future__ import annotations

import pytest
import torch
from contract import check_backend
from models import BUILDERS

from grokfast_metrics.compute.core import last_run_info
from grokfast_metrics.dropin import measure as dropin
from grokfast_metrics.dropin.plan import AffineTailWarning, Plan

pytestmark = pytest.mark.usefixtures("one_thread")


def _build(name, **kw):
    model, probe, args = BUILDERS[name](**kw)
    args = dict(args)
    return model, probe, args.pop("at"), args


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_plan_says_which_path_ran_and_why(name):
    model, probe, at, kw = _build(name)
    plan = Plan(model, probe, at, **kw)
    assert plan.path is None and "not built" in plan.reason
    plan.compute()
    info = last_run_info()
    assert plan.path in ("chain", "split", "hooks")
    assert info["path"] == plan.path and info["path_reason"] == plan.reason and len(plan.reason) > 20
    if plan.path == "hooks":
        assert "no fx split" in plan.reason


def test_forced_split_says_why_it_cannot_run():
    model, probe, at, kw = _build("mamay")
    with pytest.raises(ValueError, match="einops"):
        dropin.lmn_at(model, probe, at, to="layers.1", path="split", **kw)


def test_untraceable_model_splits_inside_the_module_it_returns():
    """danielmamay's forward calls einops (no fx trace), then returns ``self.layers(x)`` as it is: the tail is
    traced inside ``layers`` alone and the embeddings never re-run (before: hooks, the whole model per batch)."""
    model, probe, at, kw = _build("mamay")
    plan = Plan(model, probe, at, **kw)
    calls = []
    emb = model.token_embeddings
    emb.forward = lambda x, f=emb.forward: calls.append(1) or f(x)  # counted even while user hooks are suspended
    plan.connectivity()
    assert plan.path == "split" and "'layers' traces" in plan.reason, plan.reason
    n_forwards = len(calls)
    plan.connectivity()
    assert len(calls) == n_forwards + 1  # the probe forward only: no embedding per interpolation batch


def test_openai_grok_tuple_blocks_split_instead_of_hooks():
    """openai/grok's forward branches on ``save_activations``/``pos`` and slices a mask buffer by the sequence
    length; its blocks return tuples. All of it traces now: the layers before ``at`` never re-run."""
    model, probe, at, kw = _build("grok")
    plan = Plan(model, probe, at, **kw)
    L = plan.connectivity()
    assert plan.path == "split", plan.reason
    ref = dropin.lmn_at(model, probe, at, backend="reference", **kw).connectivity.double()
    check_backend(L, ref)  # observed 1.4e-06


# --------------------------------------------------------------------------------------------
# item 1: position pruning


@pytest.mark.parametrize("name", ["nanda", "grokfast", "grok", "mamay", "omnigrok"])
def test_every_model_agrees_with_the_float64_reference(name):
    """L of the path each model takes (pruned where possible) vs ``backend="reference"``, which runs the tail at
    every position in float64, one pair at a time."""
    model, probe, at, kw = _build(name, n=10)
    plan = Plan(model, probe, at, **kw)
    L = plan.connectivity()
    assert plan.pruned == (name != "omnigrok"), plan.reason
    ref = dropin.lmn_at(model, probe, at, backend="reference", **kw).connectivity.double()
    check_backend(L, ref)  # observed worst 3.0e-06 (mamay, hooks)


@pytest.mark.parametrize(
    "name,module", [("grokfast", "head"), ("grok", "linear"), ("grokfast", "layers.1.mlp.0"), ("grok", "decoder.blocks.1.ffn.ffn.0")]
)
def test_pruned_tail_runs_the_layers_after_attention_at_one_position(name, module):
    model, probe, at, kw = _build(name)
    plan = Plan(model, probe, at, **kw)
    with plan.running():
        _, act = plan.forward()
    seen = []
    mod = dict(model.named_modules())[module]
    handle = mod.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    try:
        with torch.no_grad():
            plan.tail(act.movedim(plan.batch_dim, 0).reshape(act.shape[plan.batch_dim], -1))
    finally:
        handle.remove()
    seq_axis = 0 if kw.get("batch_dim", 0) == 1 else 1
    assert len(seen) == 1 and seen[0][seq_axis] == 1, seen


class _FlatHead(torch.nn.Module):
    """A head reading every position (``flatten``): nothing can be pruned."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(7, 8)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
        self.head = torch.nn.Linear(3 * 8, 7)

    def forward(self, tok):
        return self.head(self.mlp(self.emb(tok)).flatten(1))


def test_no_pruning_where_every_position_reaches_the_logits():
    model = _FlatHead()
    probe = torch.randint(7, (6, 3), generator=torch.Generator().manual_seed(0))
    plan = Plan(model, probe, "emb")
    L = plan.connectivity()
    assert plan.path == "split" and not plan.pruned
    ref = dropin.lmn_at(model, probe, "emb", backend="reference").connectivity.double()
    check_backend(L, ref)  # observed 4.8e-07


class _AttentionOut(torch.nn.Module):
    """A tail that returns ``nn.MultiheadAttention``'s own ``(output, weights)`` tuple, read by the selector."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.act = torch.nn.Linear(4, 8), torch.nn.Tanh()
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        h = self.act(self.emb(x))
        return self.attn(h, h, h)


def test_a_selector_reading_inside_a_leaf_modules_tuple_runs_unpruned():
    """The selected element lies inside one node's value (the attention's tuple): pruning leaves the tail whole (it used
    to walk into the node and raise ``TypeError: 'Node' object is not subscriptable``)."""
    model, probe = _AttentionOut(), torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0))
    plan = Plan(model, probe, "act", output=lambda out: out[0][:, -1])
    L = plan.connectivity()
    assert plan.path == "split" and not plan.pruned
    ref = dropin.lmn_at(model, probe, "act", output=lambda out: out[0][:, -1], backend="reference").connectivity.double()
    check_backend(L, ref)  # observed 5.4e-07


# --------------------------------------------------------------------------------------------
# drop-in defects


def test_affine_tail_on_the_hooks_path_warns_in_fp32_at_n64():
    """openai/grok's last block is followed by the unembedding only. In fp32 at N=64 (d_model 128, p=97), rounding
    moves L off 1 by 4.9e-05, far above the old threshold (64 eps = 7.6e-06): it went unwarned."""
    model, probe, _, kw = _build("grok", n=64, d_model=128, p=97)
    with pytest.warns(AffineTailWarning, match="float64"):
        plan = Plan(model, probe, "decoder.blocks.1", path="hooks", **kw)
        L = plan.connectivity()
    assert float((1 - L).abs().max()) > 64 * torch.finfo(torch.float32).eps  # the old threshold missed it


def test_nonlinear_tail_near_one_does_not_warn():
    """A LayerNorm after the cut bends the paths a little (L within 1e-3 of 1): no warning."""
    model, probe, _, kw = _build("mamay", n=16)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", AffineTailWarning)
        L = Plan(model, probe, "layers.1", **kw).connectivity()
    assert float((1 - L).abs().max()) > 0


def test_structurally_affine_tail_returns_exactly_one_without_computing(monkeypatch):
    model, probe, _, kw = _build("grokfast")
    from grokfast_metrics.dropin import plan as plan_mod

    monkeypatch.setattr(plan_mod, "connectivity", lambda *a, **k: pytest.fail("computed an affine tail"))
    with pytest.warns(AffineTailWarning, match="not computed"):
        r = dropin.lmn_at(model, probe, "ln_f", **kw)
    assert r.lmn == 1.0 and bool((r.connectivity == 1).all())


def test_affine_shortcut_reports_itself_not_the_previous_run():
    """After a known-affine tail's L = 1 shortcut, ``last_run_info()`` said what the *previous* computation ran (its
    backend, kernel and pair counts: here the 12-sample Nanda run's) and the plan's ``ran`` was empty."""
    model, probe, at, kw = _build("nanda", n=12)
    dropin.lmn_at(model, probe, at, **kw)  # a real computation first: 66 pairs, the fused kernel
    assert last_run_info()["pairs"] == 66
    model, probe, _, kw = _build("grokfast", n=7)
    with pytest.warns(AffineTailWarning):
        dropin.lmn_at(model, probe, "ln_f", **kw)
    info = last_run_info()
    assert info["backend"] is None and info["kernel"] is None, info
    assert info["pairs"] == 21 and info["recomputed"] == 0 and info["fraction_recomputed"] == 0.0, info
    assert "affine" in info["ran"] and "not computed" in info["ran"], info


@pytest.mark.parametrize("at", ["blocks.0.mlp.hook_post", "blocks.0.mlp.hook_pre"])
def test_not_a_cut_suggests_a_cut_with_a_nonlinearity_after_it(at):
    """Nanda's MLP hook points are not cuts; 'blocks.0' is, but only the unembedding follows it (LMN = 1)."""
    model, probe, _, kw = _build("nanda")
    with pytest.raises(ValueError, match=r"e\.g\. at='blocks\.0\.hook_resid_mid'"):
        dropin.lmn_at(model, probe, at, **kw)


def test_last_layer_of_a_sequential_says_so_not_to_none():
    model, probe, _, _ = _build("omnigrok")
    with pytest.raises(ValueError, match=r"at='5' is the model's last layer.*e\.g\. at='2'") as e:
        dropin.lmn_at(model, probe, "5")
    assert "to=None" not in str(e.value)


def test_sequence_first_without_batch_dim_is_told_batch_dim_not_input_batch_dim():
    model, probe, at, kw = _build("grokfast")
    with pytest.raises(ValueError, match="pass batch_dim=1") as e:
        dropin.lmn_at(model, probe, at, output=kw["output"])
    assert "input_batch_dim=1" not in str(e.value)


class _LightningLike(torch.nn.Module):
    """A LightningModule-style model: the tracker is built in ``__init__`` and stored on the module; the trainer
    casts the model (``precision=64``) after ``__init__``."""

    def __init__(self, lazy):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)
        )
        probe = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
        import grokfast_metrics as gm

        self.tracker = gm.LMNTracker(self.net, probe, at="1", every=1, lazy=lazy)


def test_lazy_tracker_checks_at_the_first_update_after_the_trainer_casts_the_model():
    module = _LightningLike(lazy=True).double()  # what the trainer does after __init__
    assert module.tracker._plans is None  # nothing ran at construction
    v = module.tracker.update(0)
    assert v > 1.0 and module.tracker._plans["1"].args[0].dtype == torch.float64
    eager = _LightningLike(lazy=False).double()  # the eager tracker checked a float32 model
    with pytest.raises((RuntimeError, ValueError), match=r"[Dd]ouble|dtype|float"):
        eager.tracker.update(0)


def test_lazy_tracker_raises_its_errors_at_the_first_update():
    import grokfast_metrics as gm

    model, probe, _, _ = _build("omnigrok")
    tracker = gm.LMNTracker(model, probe, at="no_such_layer", lazy=True)
    with pytest.raises(ValueError, match="no submodule named 'no_such_layer'"):
        tracker.update(0)


@pytest.mark.parametrize("name", ["nanda", "grok", "mamay"])  # (grokfast's class lives in an example: not importable)
def test_output_last_is_picklable_and_selects_the_last_position(name, tmp_path):
    import grokfast_metrics as gm

    model, probe, at, kw = _build(name)
    lam = dropin.lmn_at(model, probe, at, **kw)
    kw["output"] = "last"
    assert dropin.lmn_at(model, probe, at, **kw).lmn == pytest.approx(lam.lmn, rel=1e-6)
    model.tracker = gm.LMNTracker(model, probe, at, **kw)
    model.tracker.update(0)
    torch.save(model, tmp_path / "model.pt")  # a lambda output= made this fail
    back = torch.load(tmp_path / "model.pt", weights_only=False)
    assert back.tracker.compute() == model.tracker.compute()


def test_nanda_tail_interpolates_only_the_last_position():
    """After the MLP hook point nothing mixes positions: h itself is needed at the last position only, so only
    that slice of h is interpolated (a third of the rows' width) and L still matches the full reference."""
    model, probe, at, kw = _build("nanda")
    plan = Plan(model, probe, at, **kw)
    L = plan.connectivity()
    assert plan.sliced == (1, 2), plan.reason
    ref = dropin.lmn_at(model, probe, at, backend="reference", **kw).connectivity.double()
    check_backend(L, ref)  # observed 1.3e-06


@pytest.mark.parametrize("name", ["grokfast", "nanda"])
def test_pruned_tails_in_ill_conditioned_regimes_match_the_reference(name):
    """Grokfast-style: logits offset by 1e3 after ln_f (every pair's fp32 r² cancels: flagged, recomputed in fp64);
    Nanda-style: the unembedding scaled by 1e-3 after the MLP's skip term."""
    model, probe, at, kw = _build(name, n=16)
    with torch.no_grad():
        if name == "grokfast":
            model.head.bias = torch.nn.Parameter(torch.full((model.head.out_features,), 1e3))
        else:
            model.unembed.W_U.mul_(1e-3)
    plan = Plan(model, probe, at, **kw)
    L = plan.connectivity()
    assert plan.pruned
    ref = dropin.lmn_at(model, probe, at, backend="reference", **kw).connectivity.double()
    check_backend(L, ref)  # observed 0 (grokfast, all pairs fp64), 1.6e-06 (nanda)
