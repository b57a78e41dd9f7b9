"""``lmn_at`` (docs/dropin.md): affine warning, mixed layouts, ``to=``, the split tail, the generic reference, hooks, compile."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from contract import CONTRACT, check_backend
from helpers import load_example, mlp_tail
from torch import nn

import grokfast_metrics as gm
from grokfast_metrics.compute import core, generic, reference
from grokfast_metrics.dropin.plan import AffineTailWarning, Plan

pytestmark = pytest.mark.usefixtures("one_thread")

G = load_example("grokfast_transformer")
LAST = lambda out: out[-1]


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    model = G.Decoder(dim=8, num_layers=2, num_heads=2, num_tokens=9, seq_len=5)
    data = G.modular_data(7, 7, 8)
    probe = data[:-1, torch.randperm(data.shape[1], generator=torch.Generator().manual_seed(0))[:7]]  # (4, 7)
    return model, probe


class ResBlock(nn.Module):
    """``x + mlp(ln(x))``."""

    def __init__(self, d):
        super().__init__()
        self.ln, self.mlp = nn.LayerNorm(d), mlp_tail([d, 16, d], "gelu")

    def forward(self, x):
        return x + self.mlp(self.ln(x))


class OneLayer(nn.Module):
    """Nanda-style 1-layer model, batch-first: embed + pos -> one residual block -> unembed (no final LN)."""

    def __init__(self, vocab=7, d=8, seq=3):
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.3)
        self.blocks = nn.ModuleList([ResBlock(d)])
        self.unembed = nn.Linear(d, vocab, bias=False)

    def forward(self, tok):
        x = self.embed(tok) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.unembed(x)[:, -1]


class Mixed(nn.Module):
    """Fed ``(batch, seq)`` tokens; the blocks run sequence-first ``(seq, batch, d)``; logits of the last position."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.emb = nn.Embedding(9, 8)
        self.layers = nn.ModuleList([G.Block(8, 2), G.Block(8, 2)])
        self.head = nn.Linear(8, 9)

    def forward(self, tok):
        x = self.emb(tok).transpose(0, 1)
        for layer in self.layers:
            x = layer(x)
        return self.head(x[-1])


# --------------------------------------------------------------------------------------------
# 1: affine tails


def test_affine_tail_warns_structurally_and_numerically():
    model, tok = OneLayer(), torch.randint(7, (6, 3), generator=torch.Generator().manual_seed(0))
    with pytest.warns(AffineTailWarning, match=r"'blocks\.0'.*affine \(structurally.*hook_resid_mid"):
        assert gm.lmn_at(model, tok, at="blocks.0", n_lambda=5).lmn == pytest.approx(1.0, abs=1e-6)
    with pytest.warns(AffineTailWarning, match="L is 1 to rounding"):
        gm.lmn_at(model, tok, at="blocks.0", n_lambda=5, path="hooks")
    with pytest.warns(AffineTailWarning, match="structurally"):
        gm.LMNTracker(model, tok, at="blocks.0", n_lambda=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AffineTailWarning)
        res = gm.lmn_at(model, tok, at="embed", n_lambda=5, check=False)  # LN + GELU after it
        assert res.lmn > 1.0


# --------------------------------------------------------------------------------------------
# 2: batch-first inputs, sequence-first blocks


def test_mixed_layout_input_batch_dim():
    model = Mixed()
    tok = torch.randint(9, (6, 4), generator=torch.Generator().manual_seed(3))  # (batch 6, seq 4)
    res = gm.lmn_at(model, tok, at="layers.0", batch_dim=1, input_batch_dim=0, n_lambda=7)
    m64 = __import__("copy").deepcopy(model).double().eval()
    with torch.no_grad():
        h = m64.layers[0](m64.emb(tok).transpose(0, 1))  # (4, 6, 8)

    class Rest(nn.Module):  # (B, 32) -> (B, 9), by hand
        def forward(self, x):
            return m64.head(m64.layers[1](x.reshape(-1, 4, 8).transpose(0, 1))[-1])

    L_ref = torch.from_numpy(generic.reference_connectivity(h.transpose(0, 1).reshape(6, -1), Rest(), 7))
    # observed worst 4.5e-7 (fp32 vs the float64 module loop): 22x margin
    check_backend(res.connectivity, L_ref)
    with pytest.raises(ValueError, match=r"axis 0 \(batch_dim\) has 4, not the N=6 samples.*has 6 along axis 1"):
        gm.lmn_at(model, tok, at="layers.0", batch_dim=0)
    with pytest.raises(ValueError, match=r"axis 1 \(batch_dim\) has 6, not the N=4 samples.*pass input_batch_dim=0"):
        gm.lmn_at(model, tok, at="layers.0", batch_dim=1)


# --------------------------------------------------------------------------------------------
# to=: sub-networks


def test_to_on_an_mlp_segment_keeps_the_fused_path(monkeypatch):
    a, b = mlp_tail([5, 12, 9, 7], act="tanh", seed=4), mlp_tail([7, 4], seed=5)
    model = nn.Sequential(a[0], nn.SiLU(), a[1], a[2], a[3], a[4], nn.ReLU(), b[0])  # 0..7
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(6))
    monkeypatch.setattr(generic, "connectivity_tail", None)  # no generic path at all
    res = gm.lmn_at(model, x, at="1", to="4")
    with torch.no_grad():
        h = model[:2](x)
    L_ref = reference.connectivity(h, model[2:5], 21)
    # observed worst 6.1e-7: 16x margin
    check_backend(res.connectivity, L_ref)
    plan = Plan(model, x, "1", "4")
    with plan.running():
        plan.forward()
    assert plan.path == "chain" and core.resolve_backend(h, plan.tail) in ("cpu", "torch", "triton")
    with pytest.raises(ValueError, match="must come after"):
        gm.lmn_at(model, x, at="4", to="1")


def _brute_force_segment(model, probe, at, to, n_lambda):
    """float64, per pair and per lambda: sample i's input, at's output replaced, to's output flattened."""
    m = __import__("copy").deepcopy(model).double().eval()
    mods = dict(m.named_modules())
    lam = np.linspace(0, 1, n_lambda)
    with torch.no_grad():
        acts = []
        hk = mods[at].register_forward_hook(lambda _m, _i, o: acts.append(o.clone()))
        m(probe)
        hk.remove()
        act = acts[0]  # (S, N, d)
        n = act.shape[1]
        L = np.eye(n)
        for i in range(n):
            for j in range(i + 1, n):
                ys = []
                for t in lam:
                    rep = act[:, i : i + 1] + t * (act[:, j : j + 1] - act[:, i : i + 1])
                    got = []
                    h1 = mods[at].register_forward_hook(lambda _m, _i, o, r=rep: r)
                    h2 = mods[to].register_forward_hook(lambda _m, _i, o: got.append(o))
                    m(probe[:, i : i + 1])
                    h1.remove()
                    h2.remove()
                    ys.append(got[0].reshape(-1).numpy())
                L[i, j] = L[j, i] = reference.pair_r2(np.stack(ys), lam).mean()
    return L


def test_to_on_a_transformer_segment_matches_brute_force(decoder):
    model, probe = decoder
    probe = probe[:, :5]
    res = gm.lmn_at(model, probe, at="layers.0", to="layers.1", batch_dim=1, n_lambda=5)
    L_bf = _brute_force_segment(model, probe, "layers.0", "layers.1", 5)
    # observed worst 4.8e-7 (both paths): 20x margin
    check_backend(res.connectivity, L_bf)
    hooks = gm.lmn_at(model, probe, at="layers.0", to="layers.1", batch_dim=1, n_lambda=5, path="hooks")
    check_backend(hooks.connectivity, L_bf)


# --------------------------------------------------------------------------------------------
# 4: only the tail runs, the path ends once


def test_split_tail_skips_the_prefix_and_computes_ends_once(decoder, monkeypatch):
    model, probe = decoder
    n, T = probe.shape[1], 5
    emb_rows, tail_rows = [], []
    emb_forward = model.token_embeddings.forward
    monkeypatch.setattr(model.token_embeddings, "forward", lambda x: (emb_rows.append(x.shape[1]), emb_forward(x))[1])
    run_tail = generic.run_tail
    monkeypatch.setattr(generic, "run_tail", lambda t, x, d: (tail_rows.append(x.shape[0]), run_tail(t, x, d))[1])
    results = {}
    for path in ("split", "hooks"):
        emb_rows.clear()
        tail_rows.clear()
        for at in ("layers.0", "layers.1"):
            results[path, at] = gm.lmn_at(model, probe, at=at, output=LAST, batch_dim=1, n_lambda=T, path=path)
        if path == "split":
            assert sum(emb_rows) == 2 * (n + min(n, 8))  # capture + cut check per call; no re-runs
        else:
            assert sum(emb_rows) > 2 * n * (n - 1) // 2 * (T - 2)  # the prefix re-runs per interpolation point
        # interior points once per pair; the ends (the samples themselves) a few times per call at most: core's
        # output check, the path ends, and for a split tail its agreement check with the model's own output
        interior = n * (n - 1) // 2 * (T - 2)
        assert 2 * (interior + n) <= sum(tail_rows) <= 2 * (interior + 3 * n)
    for at in ("layers.0", "layers.1"):
        a, b = results["split", at].connectivity, results["hooks", at].connectivity
        assert float((a - b).abs().max()) <= 2e-6  # observed 0 (same ops and batches); 2e-6: batch-size rounding


def test_split_falls_back_to_hooks_when_it_does_not_trace(decoder):
    model, probe = decoder
    plan = Plan(model, probe, "layers.0.mlp", None, LAST, 1, path="auto")  # Block.forward uses len(x)
    with plan.running():
        plan.forward()
    assert plan.path == "hooks"
    with pytest.raises(ValueError, match="path='split' cannot run"):
        gm.lmn_at(model, probe, at="layers.0.ln_1", output=LAST, batch_dim=1, path="split")


# --------------------------------------------------------------------------------------------
# 5: the float64 reference of the generic path


def test_reference_backend_on_hook_and_split_tails(decoder):
    seq = mlp_tail([5, 12, 9, 4], act="gelu", seed=7).double()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = seq[:2], seq[2:]

        def forward(self, x):
            return self.b(self.a(x))

    x = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    for path in ("split", "hooks"):
        res = gm.lmn_at(Net(), x, at="a", backend="reference", path=path)
        with torch.no_grad():
            L_np = reference.connectivity(seq[:2](x), seq[2:], 21)
        # observed worst 2.1e-15 (module vs NumPy float64 ops): 47x margin
        np.testing.assert_allclose(res.connectivity.numpy(), L_np, rtol=0, atol=1e-13)
    model, probe = decoder
    m64 = __import__("copy").deepcopy(model).double()
    ref = gm.lmn_at(m64, probe, at="layers.0", output=LAST, batch_dim=1, n_lambda=7, backend="reference")
    fast = gm.lmn_at(m64, probe, at="layers.0", output=LAST, batch_dim=1, n_lambda=7)
    # observed worst 7.1e-15 (L), 2.7e-16 relative (LMN): >1e4x margin
    check_backend(fast.connectivity, ref.connectivity)
    assert abs(ref.lmn - fast.lmn) <= CONTRACT[torch.float64] * ref.lmn


# --------------------------------------------------------------------------------------------
# 7: user hooks, torch.compile


def test_user_hooks_are_suspended_unless_asked(decoder):
    model, probe = decoder
    calls = []
    handle = model.head.register_forward_hook(lambda _m, _i, out: calls.append(out.shape))
    pre = model.ln_f.register_forward_pre_hook(lambda _m, _i: calls.append("pre"))
    try:
        gm.lmn_at(model, probe, at="layers.1", output=LAST, batch_dim=1, n_lambda=5)
        assert calls == []
        gm.lmn_at(model, probe, at="layers.1", output=LAST, batch_dim=1, n_lambda=5, user_hooks=True)
        assert len(calls) > 2
        calls.clear()
        with torch.no_grad():
            model(probe)
        assert len(calls) == 2  # still registered afterwards
    finally:
        handle.remove()
        pre.remove()


def test_weight_norm_prehook_still_runs():
    torch.manual_seed(0)
    plain = mlp_tail([5, 9, 3], act="tanh", seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        normed = __import__("copy").deepcopy(plain)
        nn.utils.weight_norm(normed[2])
        with torch.no_grad():
            normed[2].weight_g.mul_(2.0)  # weight recomputed by the pre-hook
            plain[2].weight.mul_(2.0)
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))

    class Net(nn.Module):
        def __init__(self, seq):
            super().__init__()
            self.seq = seq

        def forward(self, x):
            return self.seq(x)

    a = gm.lmn_at(Net(normed), x, at="seq.0", path="hooks").connectivity
    b = gm.lmn_at(Net(plain), x, at="seq.0", path="hooks").connectivity
    assert float((a - b).abs().max()) <= CONTRACT[torch.float32]


def test_torch_compile_plain_names():
    model = mlp_tail([5, 9, 3], act="silu", seed=3)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            return self.body(x)

    net = Net()
    compiled = torch.compile(net)  # lazy: never compiled here
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    want = gm.lmn_at(net, x, at="body.0").connectivity
    for at in ("body.0", "_orig_mod.body.0"):
        assert torch.equal(gm.lmn_at(compiled, x, at=at).connectivity, want)
