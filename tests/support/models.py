"""Small test models shaped like the public grokking codebases, shared by the test files.

Each builder returns ``(model, probe, kwargs)``: the model (eval-ready, seeded), a probe set of token ids
in the layout its forward expects, and the ``lmn_at`` keyword arguments a user of that codebase passes
(``at``, ``output``, ``batch_dim``, ``input_batch_dim``). Sizes are small (d_model 32) for tests; pass
larger ones for benchmarks.

- :class:`NandaTransformer`: Nanda et al.'s progress-measures 1-layer transformer (einsum weights,
  ``HookPoint`` identity modules named like ``blocks.0.hook_resid_mid``, no LayerNorm), batch-first.
- :class:`GrokfastDecoder`: ironjr/grokfast's sequence-first decoder (``nn.MultiheadAttention``, LayerNorm,
  ``ln_f``), tokens ``(seq, B)`` (the example's ``Decoder``, imported here under that name).
- :class:`MamayTransformer`: danielmamay/grokking's mixed layout: tokens ``(B, seq)``, blocks ``(seq, B, d)``,
  the blocks + final LayerNorm + head in one ``nn.Sequential`` named ``layers``.
- :class:`GrokTransformer`: openai/grok's decoder: blocks return tuples ``(x, attentions, values)``,
  a ``save_activations`` flag and a ``pos`` argument on the forward, post-LN residual blocks, hand-written
  attention heads with an in-place ``masked_fill_``.
- :func:`omnigrok_mlp`: Omnigrok's MNIST MLP, a plain ``nn.Sequential``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from helpers import load_example
from torch import nn

_G = load_example("grokfast_transformer")
GrokfastDecoder = _G.Decoder


# --------------------------------------------------------------------------------------------
# Nanda et al. (progress measures for grokking): einsum weights, hook points, no LayerNorm


class HookPoint(nn.Module):
    """TransformerLens-style identity module: a place to attach hooks (``hook_resid_mid``, ``hook_post``...)."""

    def __init__(self):
        super().__init__()
        self.fwd_hooks: list = []
        self.name = None

    def give_name(self, name: str) -> None:
        self.name = name

    def forward(self, x):
        return x


class Embed(nn.Module):
    def __init__(self, d_vocab, d_model):
        super().__init__()
        self.W_E = nn.Parameter(torch.randn(d_model, d_vocab) / math.sqrt(d_model))

    def forward(self, x):
        return torch.einsum("dbp -> bpd", self.W_E[:, x])


class Unembed(nn.Module):
    def __init__(self, d_vocab, d_model):
        super().__init__()
        self.W_U = nn.Parameter(torch.randn(d_model, d_vocab) / math.sqrt(d_vocab))

    def forward(self, x):
        return x @ self.W_U


class PosEmbed(nn.Module):
    def __init__(self, max_ctx, d_model):
        super().__init__()
        self.W_pos = nn.Parameter(torch.randn(max_ctx, d_model) / math.sqrt(d_model))

    def forward(self, x):
        return x + self.W_pos[: x.shape[-2]]


class NandaAttention(nn.Module):
    def __init__(self, d_model, num_heads, d_head, n_ctx):
        super().__init__()
        self.W_K = nn.Parameter(torch.randn(num_heads, d_head, d_model) / math.sqrt(d_model))
        self.W_Q = nn.Parameter(torch.randn(num_heads, d_head, d_model) / math.sqrt(d_model))
        self.W_V = nn.Parameter(torch.randn(num_heads, d_head, d_model) / math.sqrt(d_model))
        self.W_O = nn.Parameter(torch.randn(d_model, d_head * num_heads) / math.sqrt(d_model))
        self.register_buffer("mask", torch.tril(torch.ones((n_ctx, n_ctx))))
        self.d_head = d_head
        self.hook_k, self.hook_q, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_z, self.hook_attn, self.hook_attn_pre = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x):
        k = self.hook_k(torch.einsum("ihd,bpd->biph", self.W_K, x))
        q = self.hook_q(torch.einsum("ihd,bpd->biph", self.W_Q, x))
        v = self.hook_v(torch.einsum("ihd,bpd->biph", self.W_V, x))
        attn_scores_pre = torch.einsum("biph,biqh->biqp", k, q)
        attn_scores_masked = torch.tril(attn_scores_pre) - 1e10 * (1 - self.mask[: x.shape[-2], : x.shape[-2]])
        attn_matrix = self.hook_attn(F.softmax(self.hook_attn_pre(attn_scores_masked / math.sqrt(self.d_head)), dim=-1))
        z = self.hook_z(torch.einsum("biph,biqp->biqh", v, attn_matrix))
        z_flat = z.permute(0, 2, 1, 3).reshape(z.shape[0], z.shape[2], -1)  # einops 'b i q h -> b q (i h)'
        return torch.einsum("df,bqf->bqd", self.W_O, z_flat)


class NandaMLP(nn.Module):
    def __init__(self, d_model, d_mlp, act_type="ReLU"):
        super().__init__()
        self.W_in = nn.Parameter(torch.randn(d_mlp, d_model) / math.sqrt(d_model))
        self.b_in = nn.Parameter(torch.zeros(d_mlp))
        self.W_out = nn.Parameter(torch.randn(d_model, d_mlp) / math.sqrt(d_model))
        self.b_out = nn.Parameter(torch.zeros(d_model))
        self.act_type = act_type
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x):
        x = self.hook_pre(torch.einsum("md,bpd->bpm", self.W_in, x) + self.b_in)
        x = F.relu(x) if self.act_type == "ReLU" else F.gelu(x)
        x = self.hook_post(x)
        return torch.einsum("dm,bpm->bpd", self.W_out, x) + self.b_out


class NandaBlock(nn.Module):
    def __init__(self, d_model, d_mlp, d_head, num_heads, n_ctx, act_type="ReLU"):
        super().__init__()
        self.attn = NandaAttention(d_model, num_heads, d_head, n_ctx)
        self.mlp = NandaMLP(d_model, d_mlp, act_type)
        self.hook_attn_out, self.hook_mlp_out = HookPoint(), HookPoint()
        self.hook_resid_pre, self.hook_resid_mid, self.hook_resid_post = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x):
        x = self.hook_resid_mid(x + self.hook_attn_out(self.attn(self.hook_resid_pre(x))))
        x = self.hook_resid_post(x + self.hook_mlp_out(self.mlp(x)))
        return x


class NandaTransformer(nn.Module):
    """``(B, 3)`` tokens ``[a, b, =]`` -> ``(B, 3, p)`` logits (read the last position)."""

    def __init__(self, p=13, d_model=32, d_mlp=128, num_heads=4, n_ctx=3, num_layers=1, act_type="ReLU"):
        super().__init__()
        self.embed = Embed(p + 1, d_model)
        self.pos_embed = PosEmbed(n_ctx, d_model)
        self.blocks = nn.ModuleList(
            [NandaBlock(d_model, d_mlp, d_model // num_heads, num_heads, n_ctx, act_type) for _ in range(num_layers)]
        )
        self.unembed = Unembed(p, d_model)
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.give_name(name)

    def forward(self, x):
        x = self.embed(x)
        x = self.pos_embed(x)
        for block in self.blocks:
            x = block(x)
        return self.unembed(x)


def nanda(n=12, p=13, d_model=32, d_mlp=128, seed=0):
    torch.manual_seed(seed)
    model = NandaTransformer(p=p, d_model=d_model, d_mlp=d_mlp)
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(p, (n,), generator=g), torch.randint(p, (n,), generator=g)
    probe = torch.stack([a, b, torch.full_like(a, p)], dim=1)  # (n, 3) batch-first
    return model, probe, dict(at="blocks.0.hook_resid_mid", output=lambda out: out[:, -1])


class _Offset(nn.Module):
    """``inner(x) + offset``: a constant added to a block's output."""

    def __init__(self, inner, offset):
        super().__init__()
        self.inner = inner
        self.register_buffer("offset", offset)

    def forward(self, x):
        return self.inner(x) + self.offset


def nanda_offset(scale: float, n: int = 12):
    """Nanda-style model whose last-position residual carries a large common offset ``scale v`` the MLP cannot see
    (``W_in v = 0``): the skip term ``W_U x`` holds a logit offset shared by all samples, ``u_j - u_i`` does not."""
    model, probe, kw = nanda(n=n)
    mlp = model.blocks[0].mlp
    g = torch.Generator().manual_seed(7)
    v = torch.randn(mlp.W_in.shape[1], generator=g)
    v /= v.norm()
    with torch.no_grad():
        mlp.W_in -= (mlp.W_in @ v)[:, None] * v[None, :]
    offset = torch.zeros(3, v.numel())
    offset[2] = scale * v
    model.blocks[0].attn = _Offset(model.blocks[0].attn, offset)  # before the cut: resid_mid gains the offset
    return model, probe, kw


# --------------------------------------------------------------------------------------------
# ironjr/grokfast: sequence-first decoder with LayerNorm and ln_f (examples/grokfast_transformer.py)


def grokfast(n=12, p=11, dim=32, num_layers=2, seed=0):
    torch.manual_seed(seed)
    model = GrokfastDecoder(dim=dim, num_layers=num_layers, num_heads=4, num_tokens=p + 2, seq_len=5)
    data = _G.modular_data(p, p, p + 1)
    probe = data[:-1, torch.randperm(data.shape[1], generator=torch.Generator().manual_seed(seed))[:n]]  # (4, n)
    return model, probe, dict(at="layers.0", output=lambda out: out[-1], batch_dim=1)


# --------------------------------------------------------------------------------------------
# danielmamay/grokking: tokens (B, seq), blocks (seq, B, d), blocks + LayerNorm + head in one Sequential


def rearrange_sbd(x):
    """einops' ``rearrange(x, 'b s d -> s b d')``, which (like einops) rejects a ``torch.fx`` Proxy: the
    reason the real model does not trace."""
    if not isinstance(x, torch.Tensor):
        raise RuntimeError(f"Tensor type unknown to einops {type(x)}")
    return x.permute(1, 0, 2)


class MamayBlock(nn.Module):
    def __init__(self, dim_model, n_heads):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim_model, n_heads)
        self.self_attn_norm = nn.LayerNorm(dim_model)
        self.ffn = nn.Sequential(nn.Linear(dim_model, dim_model * 4), nn.GELU(), nn.Linear(dim_model * 4, dim_model))
        self.ffn_norm = nn.LayerNorm(dim_model)

    def forward(self, x):
        attn_mask = torch.full((len(x), len(x)), -float("Inf"), device=x.device, dtype=x.dtype)
        attn_mask = torch.triu(attn_mask, diagonal=1)
        a1, _ = self.self_attn(x, x, x, attn_mask=attn_mask)
        a1 = self.self_attn_norm(x + a1)
        a2 = self.ffn(a1)
        a2 = self.ffn_norm(a1 + a2)
        return a2


class MamayTransformer(nn.Module):
    """``(B, 4)`` tokens -> ``(4, B, V)`` logits, sequence-first (read ``out[-1]``)."""

    def __init__(self, num_layers=2, dim_model=32, num_heads=4, num_tokens=13, seq_len=4):
        super().__init__()
        self.token_embeddings = nn.Embedding(num_tokens, dim_model)
        self.position_embeddings = nn.Embedding(seq_len, dim_model)
        self.layers = nn.Sequential(
            *[MamayBlock(dim_model, num_heads) for _ in range(num_layers)], nn.LayerNorm(dim_model), nn.Linear(dim_model, num_tokens)
        )

    def forward(self, inputs):
        batch_size, context_len = inputs.shape
        token_embedding = self.token_embeddings(inputs)
        positions = torch.arange(context_len, device=inputs.device).unsqueeze(0).expand(batch_size, context_len)
        embedding = token_embedding + self.position_embeddings(positions)
        embedding = rearrange_sbd(embedding)
        return self.layers(embedding)


def mamay(n=12, p=11, dim=32, seed=0):
    torch.manual_seed(seed)
    model = MamayTransformer(dim_model=dim, num_tokens=p + 2)
    data = _G.modular_data(p, p, p + 1)
    probe = data[:-1, torch.randperm(data.shape[1], generator=torch.Generator().manual_seed(seed))[:n]].T  # (n, 4)
    return model, probe.contiguous(), dict(at="layers.0", output=lambda out: out[-1], batch_dim=1, input_batch_dim=0)


# --------------------------------------------------------------------------------------------
# openai/grok: tuple-returning blocks, save_activations flag, post-LN residuals, hand-written heads


class GrokHead(nn.Module):
    def __init__(self, d_model, d_key):
        super().__init__()
        self.d_key = d_key
        self.Wq = nn.Linear(d_model, d_key, bias=False)
        self.Wk = nn.Linear(d_model, d_key, bias=False)
        self.Wv = nn.Linear(d_model, d_key, bias=False)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, queries, keys, values, mask=None, save_activations=False):
        queries, keys, values = self.Wq(queries), self.Wk(keys), self.Wv(values)
        attn = torch.matmul(queries, torch.transpose(keys, -2, -1))
        attn = attn / math.sqrt(self.d_key)
        if mask is not None:
            attn.masked_fill_(mask == 0, float("-inf"))
        attn = self.softmax(attn)
        result = torch.matmul(attn, values)
        if save_activations:
            return result, attn.detach().clone(), values.detach().clone()
        return result, None, None


class GrokMultiHead(nn.Module):
    def __init__(self, d_model, heads):
        super().__init__()
        d_key = d_model // heads
        self.attn_heads = nn.ModuleList([GrokHead(d_model, d_key) for _ in range(heads)])
        self.Wo = nn.Linear(d_model, d_model, bias=False)

    def forward(self, queries, keys, values, mask=None, save_activations=False):
        head_outputs = [h(queries=queries, keys=keys, values=values, mask=mask, save_activations=save_activations) for h in self.attn_heads]
        head_results = [output[0] for output in head_outputs]
        if save_activations:
            layer_attns = torch.cat([output[1] for output in head_outputs])
            layer_values = torch.cat([output[2] for output in head_outputs])
        else:
            layer_attns, layer_values = None, None
        multihead_result = torch.cat(head_results, dim=-1)
        return self.Wo(multihead_result), layer_attns, layer_values


class GrokFFN(nn.Module):
    def __init__(self, d_model, multiplier=4, non_linearity="relu"):
        super().__init__()
        d_ff = int(multiplier * d_model)
        act = {"relu": nn.ReLU, "gelu": nn.GELU}[non_linearity]
        self.ffn = nn.Sequential(nn.Linear(d_model, d_ff, bias=False), act(), nn.Linear(d_ff, d_model, bias=False))

    def forward(self, x):
        return self.ffn(x)


class GrokBlock(nn.Module):
    def __init__(self, d_model, heads, dropout=0.0):
        super().__init__()
        self.self_attn = GrokMultiHead(d_model, heads)
        self.self_attn_norm = nn.LayerNorm(d_model)
        self.ffn = GrokFFN(d_model)
        self.ffn_drop = nn.Dropout(p=dropout)
        self.ffn_norm = nn.LayerNorm(d_model)

    def forward(self, x, self_attn_mask=None, save_activations=False):
        a1, layer_attns, layer_values = self.self_attn(x, x, x, self_attn_mask, save_activations=save_activations)
        a1 = self.self_attn_norm(x + a1)
        a2 = self.ffn(a1)
        a2 = self.ffn_drop(a2)
        a2 = self.ffn_norm(a1 + a2)
        return a2, layer_attns, layer_values


class GrokDecoder(nn.Module):
    def __init__(self, d_model, heads, num_blocks):
        super().__init__()
        self.blocks = nn.ModuleList([GrokBlock(d_model, heads) for _ in range(num_blocks)])

    def forward(self, x, self_attn_mask=None, save_activations=False):
        a = x
        attentions, values = [], []
        for block in self.blocks:
            a, layer_attentions, attn_values = block(a, self_attn_mask, save_activations=save_activations)
            if save_activations:
                attentions.append(layer_attentions)
                values.append(attn_values)
        return a, attentions, values


class GrokTransformer(nn.Module):
    """``(B, S)`` tokens -> ``(logits (B, S, V), attentions, values)``."""

    def __init__(self, n_layers=2, n_heads=4, d_model=32, max_context_len=16, vocab_len=13):
        super().__init__()
        self.embedding = nn.Embedding(vocab_len, d_model)
        self.register_buffer("position_encoding", self._position_encoding(max_context_len, d_model))
        self.register_buffer("self_attn_mask", torch.ones(max_context_len, max_context_len).tril())
        self.decoder = GrokDecoder(d_model, n_heads, n_layers)
        self.linear = nn.Linear(d_model, vocab_len)

    @staticmethod
    def _position_encoding(context_len, d_model):
        rows = [
            [math.sin(pos / 10000 ** (i / d_model)) if i % 2 == 0 else math.cos(pos / 10000 ** ((i - 1) / d_model)) for i in range(d_model)]
            for pos in range(context_len)
        ]
        return torch.tensor(rows)

    def embed(self, indices):
        context_len = indices.shape[-1]
        pe = self.position_encoding[:context_len, :]
        return pe + self.embedding(indices)

    def forward(self, x, pos=None, save_activations=False):
        x = x.to(self.embedding.weight.device)
        this_max_context_len = x.shape[-1]
        self_attn_mask = self.self_attn_mask[:this_max_context_len, :this_max_context_len]
        x = self.embed(x)
        decoded, attentions, values = self.decoder(x, self_attn_mask, save_activations=save_activations)
        if pos is not None:
            decoded = decoded[:, pos, :]
        y_hat = self.linear(decoded)
        return y_hat, attentions, values


def grok(n=12, p=11, d_model=32, seed=0):
    torch.manual_seed(seed)
    model = GrokTransformer(d_model=d_model, vocab_len=p + 2)
    data = _G.modular_data(p, p, p + 1)
    probe = data[:-1, torch.randperm(data.shape[1], generator=torch.Generator().manual_seed(seed))[:n]].T  # (n, 4)
    return model, probe.contiguous(), dict(at="decoder.blocks.0", output=lambda out: out[0][:, -1])


# --------------------------------------------------------------------------------------------
# Omnigrok: MNIST MLP as one nn.Sequential


def omnigrok_mlp(n=12, width=64, depth=3, seed=0):
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(784, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    probe = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    return model, probe, dict(at="2")


#: name -> builder, for parametrized tests and benchmarks
BUILDERS = {"nanda": nanda, "grokfast": grokfast, "mamay": mamay, "grok": grok, "omnigrok": omnigrok_mlp}
