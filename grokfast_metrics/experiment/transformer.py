"""A one-layer transformer for modular addition in the style of Nanda et al. (progress measures for grokking).

Architecture (``--model transformer``), module and hook names as in Nanda's code::

    x = [a, b, =]                               # three tokens; "=" is token p
    resid_pre  = W_E[x] + W_pos                 # blocks.0.hook_resid_pre   (N, 3, d_model)
    resid_mid  = resid_pre + attn(resid_pre)    # blocks.0.hook_resid_mid   <- LMN cut (TRANSFORMER_LAYER)
    resid_post = resid_mid + mlp(resid_mid)     # blocks.0.hook_resid_post  (mlp: W_in, ReLU, W_out)
    logits     = (resid_post @ W_U)[:, -1]      # (N, p): read at the last position

``attn``: causal multi-head attention without biases (``W_Q``, ``W_K``, ``W_V``, ``W_O``); no LayerNorm
anywhere; the forward returns the last position's logits only, so ``lmn_at(model, x, at=...)`` needs no
``output=`` selector (and the model pickles).

LMN at ``blocks.0.hook_resid_mid`` interpolates the residual stream after attention (all three positions,
flattened per sample). The MLP and the unembedding act position by position and only the last
position's logits are read, so ``L`` is that of the last position's representation through
``x -> (x + mlp(x)) @ W_U``: a one-hidden-layer ReLU MLP with a skip connection and an unembedding.
The tail is not affine, and the cut is exact: nothing after it sees the tokens except through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

#: the LMN reading of the transformer: the residual stream before the MLP (the tail: MLP + skip + unembed)
TRANSFORMER_LAYER = "blocks.0.hook_resid_mid"
#: the transformer's readings the trainer accepts (``--lmn-layer``): the default cut, and the stream before
#: attention (its tail includes attention)
TRANSFORMER_LAYERS = (TRANSFORMER_LAYER, "blocks.0.hook_resid_pre")
#: input length: ``a b =``
N_CTX = 3


class HookPoint(nn.Module):
    """The identity, as a named place in the forward (what ``lmn_at(at=...)`` reads)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Embed(nn.Module):
    def __init__(self, d_vocab: int, d_model: int):
        super().__init__()
        self.W_E = nn.Parameter(torch.randn(d_vocab, d_model) / math.sqrt(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.W_E[x]


class PosEmbed(nn.Module):
    def __init__(self, n_ctx: int, d_model: int):
        super().__init__()
        self.W_pos = nn.Parameter(torch.randn(n_ctx, d_model) / math.sqrt(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.W_pos[: x.shape[-1]]


class Attention(nn.Module):
    """Causal multi-head attention, no biases (Nanda's ``Attention``)."""

    def __init__(self, d_model: int, n_heads: int, d_head: int, n_ctx: int):
        super().__init__()
        s = 1 / math.sqrt(d_model)
        self.W_Q = nn.Parameter(torch.randn(n_heads, d_head, d_model) * s)
        self.W_K = nn.Parameter(torch.randn(n_heads, d_head, d_model) * s)
        self.W_V = nn.Parameter(torch.randn(n_heads, d_head, d_model) * s)
        self.W_O = nn.Parameter(torch.randn(d_model, n_heads * d_head) * s)
        self.register_buffer("mask", torch.tril(torch.ones(n_ctx, n_ctx, dtype=torch.bool)), persistent=False)
        self.d_head = d_head
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_pre, self.hook_attn, self.hook_z = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.hook_q(torch.einsum("ihd,bpd->biph", self.W_Q, x))
        k = self.hook_k(torch.einsum("ihd,bpd->biph", self.W_K, x))
        v = self.hook_v(torch.einsum("ihd,bpd->biph", self.W_V, x))
        n = x.shape[-2]
        scores = torch.einsum("biph,biqh->biqp", k, q) / math.sqrt(self.d_head)
        scores = self.hook_attn_pre(scores.masked_fill(~self.mask[:n, :n], float("-inf")))
        attn = self.hook_attn(torch.softmax(scores, dim=-1))
        z = self.hook_z(torch.einsum("biph,biqp->biqh", v, attn))
        return torch.einsum("df,bqf->bqd", self.W_O, z.permute(0, 2, 1, 3).reshape(z.shape[0], n, -1))


class MLP(nn.Module):
    """``W_out ReLU(W_in x + b_in) + b_out`` at each position."""

    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.W_in = nn.Parameter(torch.randn(d_mlp, d_model) / math.sqrt(d_model))
        self.b_in = nn.Parameter(torch.zeros(d_mlp))
        self.W_out = nn.Parameter(torch.randn(d_model, d_mlp) / math.sqrt(d_model))
        self.b_out = nn.Parameter(torch.zeros(d_model))
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.hook_pre(torch.einsum("md,bpd->bpm", self.W_in, x) + self.b_in)
        post = self.hook_post(torch.relu(pre))
        return torch.einsum("dm,bpm->bpd", self.W_out, post) + self.b_out


class TransformerBlock(nn.Module):
    def __init__(self, d_model: int, d_mlp: int, n_heads: int, d_head: int, n_ctx: int):
        super().__init__()
        self.attn = Attention(d_model, n_heads, d_head, n_ctx)
        self.mlp = MLP(d_model, d_mlp)
        self.hook_resid_pre, self.hook_attn_out, self.hook_resid_mid = HookPoint(), HookPoint(), HookPoint()
        self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.attn(x)))
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(x)))


class Unembed(nn.Module):
    def __init__(self, d_model: int, d_vocab_out: int):
        super().__init__()
        self.W_U = nn.Parameter(torch.randn(d_model, d_vocab_out) / math.sqrt(d_vocab_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_U


class GrokTransformer(nn.Module):
    """Nanda-style one-layer transformer: embedding + positional embedding, one attention layer, a ReLU MLP,
    the unembedding; no LayerNorm. Input ``(N, 2)`` operands ``(a, b)``; the ``=`` token (id ``n_tokens``) is
    appended; returns ``(N, n_classes)`` logits read at the last position.

    Args:
        n_tokens: operand vocabulary size (``p``); the embedding has ``p + 1`` rows (the last is ``=``).
        n_classes: output classes.
        d_model: residual stream width.
        d_mlp: MLP hidden width.
        n_heads: attention heads; ``d_model`` must be a multiple of it (``d_head = d_model / n_heads``).

    Raises:
        ValueError: non-positive sizes or ``d_model`` not a multiple of ``n_heads``.
    """

    def __init__(self, n_tokens: int, n_classes: int, d_model: int = 128, d_mlp: int = 512, n_heads: int = 4):
        super().__init__()
        for name, v in (("n_tokens", n_tokens), ("n_classes", n_classes), ("d_model", d_model), ("d_mlp", d_mlp), ("n_heads", n_heads)):
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1; got {v}")
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        self.n_tokens = n_tokens
        self.embed = Embed(n_tokens + 1, d_model)
        self.pos_embed = PosEmbed(N_CTX, d_model)
        self.blocks = nn.ModuleList([TransformerBlock(d_model, d_mlp, n_heads, d_model // n_heads, N_CTX)])
        self.unembed = Unembed(d_model, n_classes)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 2)`` operands -> ``(N, 3)`` tokens ``a b =``."""
        eq = torch.full_like(x[:, :1], self.n_tokens)
        return torch.cat([x, eq], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 2)`` int64 operands -> ``(N, n_classes)`` logits at the last position."""
        tokens = self.tokens(x)
        resid = self.embed(tokens) + self.pos_embed(tokens)
        for block in self.blocks:
            resid = block(resid)
        return self.unembed(resid)[:, -1]


def track_transformer_lmn(
    model: GrokTransformer, x_probe: torch.Tensor, layers: list[str] | tuple[str, ...], n_lambda: int = 21, backend: str = "auto"
) -> Callable[[], dict]:
    """The trainer's LMN measurement of the transformer: ``{layer: lmn_at(model, x_probe, at=layer)}``.

    The cut check runs here, once per layer (it is structural); each call of the returned function then
    computes LMN through the public :func:`grokfast_metrics.lmn_at` (no grad; modes, parameters and RNG
    untouched), on the model's current weights.

    Raises:
        ValueError: a layer that is not a cut of ``model`` (see :func:`grokfast_metrics.check_cut`).
    """
    from ..dropin.measure import check_cut, lmn_at

    layers = list(layers)
    for layer in layers:
        check_cut(model, x_probe, layer)
    return lambda: {layer: lmn_at(model, x_probe, at=layer, n_lambda=n_lambda, backend=backend, check=False) for layer in layers}
