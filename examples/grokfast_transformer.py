"""LMN in a Grokfast-style training loop: modular arithmetic with a sequence-first transformer.

The model and the data follow Grokfast's ``main.py`` (Lee et al., 2024): tokens ``[x, op, y, =]``
in sequence-first layout ``(seq, batch)``, ``nn.MultiheadAttention`` blocks, logits of the answer at
the last position (``model(input)[-1]``). The three lines marked ``# [LMN]`` are all that is added
to the existing loop.

Run: ``python examples/grokfast_transformer.py --steps 2000``
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import grokfast_metrics as gm  # [LMN] 1/3


class Block(nn.Module):
    """Grokfast's block (note: the residual adds to the *normalised* input, as in the original)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 4), nn.GELU(), nn.Linear(dim * 4, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn_mask = torch.full((len(x), len(x)), -float("Inf"), device=x.device, dtype=x.dtype)
        attn_mask = torch.triu(attn_mask, diagonal=1)
        x = self.ln_1(x)
        a, _ = self.attn(x, x, x, attn_mask=attn_mask, need_weights=False)
        x = x + a
        m = self.mlp(self.ln_2(x))
        return x + m


class Decoder(nn.Module):
    """Token + position embeddings, ``num_layers`` blocks, final LayerNorm and head. ``(seq, B) -> (seq, B, V)``."""

    def __init__(self, dim: int = 128, num_layers: int = 2, num_heads: int = 4, num_tokens: int = 99, seq_len: int = 5):
        super().__init__()
        self.token_embeddings = nn.Embedding(num_tokens, dim)
        self.position_embeddings = nn.Embedding(seq_len, dim)
        self.layers = nn.ModuleList([Block(dim, num_heads) for _ in range(num_layers)])
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_tokens, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.token_embeddings(x)
        positions = torch.arange(x.shape[0], device=x.device).unsqueeze(-1)
        h = h + self.position_embeddings(positions).expand_as(h)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.ln_f(h))


def modular_data(p: int, eq_token: int, op_token: int) -> torch.Tensor:
    """``(5, p * p)`` rows ``x, op, y, =, (x + y) mod p`` (Grokfast uses x * y; addition here)."""
    x, y = torch.cartesian_prod(torch.arange(p), torch.arange(p)).T
    eq = torch.full_like(x, eq_token)
    op = torch.full_like(x, op_token)
    return torch.stack([x, op, y, eq, (x + y) % p])


def main(
    steps: int = 2000,
    p: int = 97,
    dim: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    batch_size: int = 512,
    n_probe: int = 128,
    every="log",
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Train and track LMN at the output of the first block. Returns ``tracker.as_dict()`` plus losses."""
    torch.manual_seed(seed)
    eq_token, op_token = p, p + 1
    data = modular_data(p, eq_token, op_token).to(device)
    perm = torch.randperm(data.shape[1], device=device)
    train = data[:, perm[: data.shape[1] // 2]]
    model = Decoder(dim, num_layers, num_heads, num_tokens=p + 2, seq_len=5).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98))

    probe = data[:-1, perm[:n_probe]]  # (4, n_probe) tokens, sequence-first: fixed probe set
    tracker = gm.LMNTracker(model, probe, at="layers.0", output=lambda o: o[-1], batch_dim=1, every=every)  # [LMN] 2/3
    losses = []
    for step in range(steps):
        batch = train[:, torch.randint(train.shape[1], (batch_size,), device=device)]
        model.train()
        logits = model(batch[:-1])
        loss = F.cross_entropy(logits[-1], batch[-1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        tracker.update(step)  # [LMN] 3/3  (then log tracker.compute() wherever losses go)
    return {**tracker.as_dict(), "loss": losses}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--p", type=int, default=97)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    out = main(steps=a.steps, p=a.p, device=a.device)
    for s, v in zip(out["step"], out["lmn"]):
        print(f"step {s:6d}  loss {out['loss'][s]:.4f}  LMN {v:.3f}")
