"""LMN in a plain ``nn.Sequential`` loop: the LMN paper's modular-addition MLP.

Architecture of "Grokking as Compression" (Liu, Zhong & Tegmark): each operand embedded in 32
dimensions, the two embeddings concatenated, then ``Linear(64, 100) -> SiLU -> Linear(100, 100) ->
SiLU -> Linear(100, p)`` — written as one ``nn.Sequential`` whose first layer is the embedding and
whose input is the ``(N, 2)`` operand pairs. ``at="3"`` is the post-activation output of the first
hidden layer (this project's default layer, docs/lmn.md "Which layer"), so the tail is ``Linear -> SiLU -> Linear``
and LMN takes the fused fast path. The three lines marked ``# [LMN]`` are all that is added.

Run: ``python examples/sequential_mlp.py --steps 5000`` (probe = all p^2 = 961 pairs)
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import grokfast_metrics as gm  # [LMN] 1/3


def make_model(p: int = 31, emb: int = 32, width: int = 100) -> nn.Sequential:
    """``(N, 2)`` operand indices -> ``(N, p)`` logits."""
    return nn.Sequential(
        nn.Embedding(p, emb),
        nn.Flatten(),  # 0, 1: (N, 2 * emb)
        nn.Linear(2 * emb, width),
        nn.SiLU(),  # 2, 3: first hidden layer
        nn.Linear(width, width),
        nn.SiLU(),  # 4, 5
        nn.Linear(width, p),  # 6: logits
    )


def main(
    steps: int = 5000,
    p: int = 31,
    emb: int = 32,
    width: int = 100,
    train_frac: float = 0.5,
    n_probe: int | None = None,
    every="log",
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Full-batch training on a random ``train_frac`` of all pairs; LMN of ``n_probe`` pairs (default: all)."""
    torch.manual_seed(seed)
    pairs = torch.cartesian_prod(torch.arange(p), torch.arange(p)).to(device)  # (p^2, 2)
    labels = pairs.sum(1) % p
    train = torch.randperm(p * p, device=device)[: int(train_frac * p * p)]
    model = make_model(p, emb, width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0)

    tracker = gm.LMNTracker(model, pairs[:n_probe], at="3", every=every)  # [LMN] 2/3
    losses = []
    for step in range(steps):
        loss = F.cross_entropy(model(pairs[train]), labels[train])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        tracker.update(step)  # [LMN] 3/3
    return {**tracker.as_dict(), "loss": losses}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    out = main(steps=a.steps, device=a.device)
    for s, v in zip(out["step"], out["lmn"]):
        print(f"step {s:6d}  loss {out['loss'][s]:.4f}  LMN {v:.3f}")
