"""``lmn_at``: agreement with ``gm.lmn`` on a manual split, layouts, the cut check, no side effects, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from contract import CONTRACT, check_against_reference
from helpers import Wrapped, load_example, mlp_tail
from torch import nn

import grokfast_metrics as gm
from grokfast_metrics.compute import generic, reference
from grokfast_metrics.compute import torch_paths as torch_backend
from grokfast_metrics.dropin.measure import check_cut

pytestmark = pytest.mark.usefixtures("one_thread")


def _seq_model(dtype=torch.float32) -> nn.Sequential:
    """``Linear(5,12) -> SiLU -> Linear(12,9) -> Tanh -> Linear(9,4)`` as one Sequential."""
    a, b = mlp_tail([5, 12], seed=1), mlp_tail([12, 9, 4], act="tanh", seed=2)
    return nn.Sequential(a[0], nn.SiLU(), b[0], b[1], b[2]).to(dtype)


class FCNet(nn.Module):
    """The same computation as :func:`_seq_model` behind a custom forward (hook path)."""

    def __init__(self, seq: nn.Sequential):
        super().__init__()
        self.fc1, self.act1, self.fc2, self.act2, self.fc3 = seq

    def forward(self, x):
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


class SeqFirst(nn.Module):
    """``(S, B)`` tokens -> embedding ``(S, B, d)`` -> ``enc`` (per position) -> flatten positions -> head.

    The rest after ``enc`` is ``head(tanh(x.permute(1, 0, 2).reshape(B, S * d)))``: with ``h`` the
    batch-first flattening of ``enc``'s output it is exactly ``Sequential(Tanh, head)``.
    """

    def __init__(self, vocab=6, seq=3, d=4, out=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.enc = nn.Linear(d, d)
        self.head = nn.Linear(seq * d, out)

    def forward(self, tok):
        x = self.enc(self.emb(tok))  # (S, B, d)
        return self.head(torch.tanh(x.permute(1, 0, 2).reshape(tok.shape[1], -1)))


class Residual(nn.Module):
    """``x + sub(x)`` followed by a nonlinear head: ``sub`` is not a cut, the block is."""

    def __init__(self, d=6, out=3):
        super().__init__()
        torch.manual_seed(3)
        self.block = nn.ModuleDict({"sub": nn.Sequential(nn.Linear(d, d), nn.Tanh())})
        self.head = nn.Sequential(nn.Linear(d, 8), nn.SiLU(), nn.Linear(8, out))

    def forward(self, x):
        x = x + self.block["sub"](x)
        return self.head(x)


# --------------------------------------------------------------------------------------------
# agreement


@pytest.mark.parametrize("dtype", list(CONTRACT))
@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.filterwarnings("ignore::grokfast_metrics.dropin.plan.AffineTailWarning")  # k = 3: the affine last layer
def test_sequential_equals_manual_split_fast_path(k, dtype, monkeypatch):
    model = _seq_model(dtype)
    x = torch.randn(13, 5, generator=torch.Generator().manual_seed(k), dtype=dtype)
    calls = {"mlp": 0, "generic": 0}
    for name, module, attr in (("mlp", torch_backend, "connectivity_mlp"), ("generic", generic, "connectivity_tail")):
        orig = getattr(module, attr)

        def spy(*a, _orig=orig, _name=name, **kw):
            calls[_name] += 1
            return _orig(*a, **kw)

        monkeypatch.setattr(module, attr, spy)
    res = gm.lmn_at(model, x, at=str(k), backend="torch")
    if k == 3:  # only the last Linear follows: structurally affine, L = 1 exactly without computing
        assert calls == {"mlp": 0, "generic": 0} and bool((res.connectivity == 1).all()) and res.lmn == 1.0
        return
    assert calls == {"mlp": 1, "generic": 0}  # fused MLP path, no model re-runs
    with torch.no_grad():
        h, tail = model[: k + 1](x), model[k + 1 :]
    manual = gm.lmn(h, tail, backend="torch")
    torch.testing.assert_close(res.connectivity, manual.connectivity, rtol=0, atol=0)
    assert res.lmn == manual.lmn
    check_against_reference(res.connectivity, h, tail, dtype=dtype)  # observed 5.4e-7 fp32, 1.0e-15 fp64


def test_nested_sequential_takes_fast_path(monkeypatch):
    flat = _seq_model()
    model = nn.Sequential(nn.Sequential(flat[0], flat[1]), nn.Sequential(flat[2], flat[3]), flat[4])
    x = torch.randn(10, 5, generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(generic, "connectivity_tail", None)  # any generic call would fail
    for at, k in [("0.0", 0), ("0", 1), ("1.0", 2)]:
        res = gm.lmn_at(model, x, at=at)
        torch.testing.assert_close(res.connectivity, gm.lmn_at(flat, x, at=str(k)).connectivity, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", list(CONTRACT))
@pytest.mark.parametrize("at, split", [("act1", 2), ("fc2", 3)])
def test_hook_path_equals_manual_split(at, split, dtype):
    seq = _seq_model(dtype)
    model = FCNet(seq)
    x = torch.randn(11, 5, generator=torch.Generator().manual_seed(7), dtype=dtype)
    res = gm.lmn_at(model, x, at=at)
    with torch.no_grad():
        h, tail = seq[:split](x), seq[split:]
    # observed 2.2e-7 fp32 (the contract, 1e-5, replaced a looser 2e-5), 6.7e-16 fp64
    check_against_reference(res.connectivity, h, tail, dtype=dtype)
    L_ref = reference.connectivity(h, tail, 21)
    # observed 5.3e-8 fp32, 7.6e-16 fp64 relative
    assert abs(res.lmn - reference.lmn_from_connectivity(L_ref).lmn) <= CONTRACT[dtype] * res.lmn


def test_inplace_ops_after_the_cut_do_not_corrupt_h():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    x = torch.randn(9, 5)
    res = gm.lmn_at(Wrapped(seq), x, at="inner.0")  # hook path, ReLU rewrites the Linear's output
    with torch.no_grad():
        h = seq[0](x)
    L_ref = reference.connectivity(h, nn.Sequential(nn.ReLU(), seq[2]), 21)
    np.testing.assert_allclose(res.connectivity.double().numpy(), L_ref, rtol=0, atol=2e-5)


def test_sequence_first_layout_matches_batch_first_flattening():
    torch.manual_seed(0)
    model = SeqFirst()
    tok = torch.randint(6, (3, 10))  # (S, B), distinct enough samples
    res = gm.lmn_at(model, tok, at="enc", batch_dim=1, n_lambda=9)
    with torch.no_grad():
        h = model.enc(model.emb(tok)).permute(1, 0, 2).reshape(10, -1)
    check_against_reference(res.connectivity, h, nn.Sequential(nn.Tanh(), model.head), 9)


def test_tuple_output_selector_and_callable():
    seq = _seq_model()

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = FCNet(seq)

        def forward(self, x):
            y = self.net(x)
            return y, {"aux": y.sum()}

    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(1))
    a = gm.lmn_at(Two(), x, at="net.act1", output=0)
    b = gm.lmn_at(Two(), x, at="net.act1", output=lambda out: out[0])
    c = gm.lmn_at(seq, x, at="1")
    torch.testing.assert_close(a.connectivity, b.connectivity, rtol=0, atol=0)
    torch.testing.assert_close(a.connectivity, c.connectivity, rtol=0, atol=CONTRACT[torch.float32])


# --------------------------------------------------------------------------------------------
# transformer + cut check


@pytest.fixture(scope="module")
def decoder():
    g = load_example("grokfast_transformer")
    torch.manual_seed(0)
    model = g.Decoder(dim=16, num_layers=2, num_heads=2, num_tokens=9, seq_len=5)
    data = g.modular_data(7, 7, 8)
    probe = data[:-1, torch.randperm(data.shape[1], generator=torch.Generator().manual_seed(0))[:10]]
    return model, probe


def test_transformer_block_gives_finite_lmn(decoder):
    model, probe = decoder
    res = gm.lmn_at(model, probe, at="layers.0", output=lambda out: out[-1], batch_dim=1, n_lambda=11)
    assert np.isfinite(res.lmn) and 1.0 <= res.lmn <= probe.shape[1]
    L = res.connectivity
    assert L.shape == (10, 10) and torch.equal(L, L.T) and bool(((L >= 0) & (L <= 1)).all())
    assert check_cut(model, probe, "layers.0", output=lambda out: out[-1], batch_dim=1) <= 1e-4


@pytest.mark.parametrize("at", ["layers.0.attn", "layers.0.mlp"])
def test_cut_check_rejects_residual_sublayer(decoder, at):
    model, probe = decoder
    with pytest.raises(ValueError, match=rf"'{at}' is not a cut.*at='layers\.0'"):
        gm.lmn_at(model, probe, at=at, output=lambda out: out[-1], batch_dim=1)
    assert all(not m._forward_hooks for m in model.modules())


def test_cut_check_rejects_residual_branch_in_mlp():
    model = Residual()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"'block\.sub' is not a cut.*whole block"):
        gm.lmn_at(model, x, at="block.sub")
    with pytest.raises(ValueError, match="not a cut"):
        check_cut(model, x, "block.sub.1")
    # the head is a cut: LMN through its MLP equals the manual split
    res = gm.lmn_at(model, x, at="head.0")
    with torch.no_grad():
        h = model.head[0](x + model.block["sub"](x))
    check_against_reference(res.connectivity, h, model.head[1:])


# --------------------------------------------------------------------------------------------
# no side effects


@pytest.mark.filterwarnings("ignore::grokfast_metrics.dropin.plan.AffineTailWarning")  # at="3": the affine last layer
def test_never_perturbs_the_model_or_rng():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.BatchNorm1d(16), nn.SiLU(), nn.Linear(16, 3))
    wrapped = FCNet(_seq_model())
    x = torch.randn(12, 5)
    model.train()
    wrapped.train()
    wrapped.fc2.eval()  # a mixed-mode model stays mixed
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    for m, at in [(model, "3"), (model, "2"), (wrapped, "act1")]:
        modes = [s.training for s in m.modules()]
        res = gm.lmn_at(m, x, at=at)
        assert np.isfinite(res.lmn)
        assert [s.training for s in m.modules()] == modes
        assert all(not s._forward_hooks for s in m.modules())
        assert all(p.grad is None and p.requires_grad for p in m.parameters())
        assert not res.connectivity.requires_grad
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():  # BatchNorm stats untouched
        assert torch.equal(v, state[k]), k


def test_hooks_removed_on_error():
    model = FCNet(_seq_model())
    x = torch.randn(6, 5)
    with pytest.raises(ValueError):
        gm.lmn_at(model, x, at="act1", output=lambda out: out[0])  # 1-D logits

    def boom(out):
        raise RuntimeError("selector failed")

    with pytest.raises(RuntimeError, match="selector failed"):
        gm.lmn_at(model, x, at="act1", output=boom)
    assert all(not m._forward_hooks for m in model.modules())


# --------------------------------------------------------------------------------------------
# errors


def test_unknown_name_lists_valid_ones():
    model = FCNet(_seq_model())
    with pytest.raises(ValueError, match=r"no submodule named 'fc4'.*Did you mean.*Valid names: 'fc1', 'act1'"):
        gm.lmn_at(model, torch.randn(4, 5), at="fc4")
    big = nn.Sequential(*[nn.Linear(3, 3) for _ in range(40)])
    with pytest.raises(ValueError, match=r"\.\.\. \(40 in all\)"):
        gm.lmn_at(big, torch.randn(4, 3), at="blocks.0")


def test_module_never_called():
    class Unused(FCNet):
        def __init__(self):
            super().__init__(_seq_model())
            self.spare = nn.Linear(12, 12)

    with pytest.raises(ValueError, match=r"'spare' \(Linear\) is never called"):
        gm.lmn_at(Unused(), torch.randn(4, 5), at="spare")


def test_module_called_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    with pytest.raises(ValueError, match="called 2 times"):
        gm.lmn_at(Twice(), torch.randn(4, 4), at="lin")


def test_output_not_2d():
    class Seq3(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x).unsqueeze(0).repeat(3, 1, 1)  # (S, B, O)

    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"shape \(3, 5, 4\); expected 2-D \(B, O\) = \(5, O\)"):
        gm.lmn_at(Seq3(), x, at="lin")
    with pytest.raises(ValueError, match="selected by output"):
        gm.lmn_at(Seq3(), x, at="lin", output=lambda out: out[:, 0, 0])
    with pytest.raises(ValueError, match="selects a tuple element"):
        gm.lmn_at(Seq3(), x, at="lin", output=1)
    with pytest.raises(TypeError, match="output must be"):
        gm.lmn_at(Seq3(), x, at="lin", output=2.5)
    with pytest.raises(ValueError, match="the only named selector is 'last'"):  # "last" is a selector
        gm.lmn_at(Seq3(), x, at="lin", output="first")


def test_inputs_on_other_device():
    model = FCNet(_seq_model()).to("meta")
    with pytest.raises(ValueError, match=r"inputs\[0\] is on cpu but the model is on meta"):
        gm.lmn_at(model, torch.randn(4, 5), at="act1")


def test_bad_inputs_and_batch_dim():
    model = FCNet(_seq_model())
    with pytest.raises(ValueError, match="at least 2"):
        gm.lmn_at(model, torch.randn(1, 5), at="act1")
    with pytest.raises(TypeError, match="inputs must be"):
        gm.lmn_at(model, [1, 2], at="act1")
    with pytest.raises(ValueError, match="batch_dim"):
        gm.lmn_at(model, torch.randn(4, 5), at="act1", batch_dim=-1)
    with pytest.raises(ValueError, match=r"axis 1 \(batch_dim\) has 12, not the N=5 samples"):
        gm.lmn_at(model, torch.randn(3, 5), at="act1", batch_dim=1)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        gm.lmn_at(lambda x: x, torch.randn(3, 5), at="act1")
