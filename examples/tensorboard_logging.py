"""LMN next to the loss in TensorBoard: ``tracker.compute()`` to ``SummaryWriter.add_scalar``.

The LMN paper's addition-mod-p MLP (as in ``sequential_mlp.py``) trained full-batch; the loss is
logged every step and LMN at the steps the tracker computes it (``update`` returns the new value, or
``None`` when nothing was due; ``tracker.last_step`` is the step the value belongs to). The three
lines marked ``# [LMN]`` are the tracker; the TensorBoard lines are the loop's own logging.

Requires ``tensorboard`` (``pip install "grokfast_metrics[tensorboard]"``).

Run: ``python examples/tensorboard_logging.py --steps 3000 --logdir runs/tb`` then ``tensorboard --logdir runs/tb``
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import grokfast_metrics as gm  # [LMN] 1/3


def make_model(p: int = 31, emb: int = 32, width: int = 100) -> nn.Sequential:
    """``(N, 2)`` operand indices -> ``(N, p)`` logits (embedding 2x32 -> 100 -> 100 -> p, SiLU)."""
    return nn.Sequential(
        nn.Embedding(p, emb), nn.Flatten(), nn.Linear(2 * emb, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, p)
    )


def main(
    logdir: str, steps: int = 3000, p: int = 31, emb: int = 32, width: int = 100, train_frac: float = 0.5, every="log", seed: int = 0
) -> dict:
    """Train, log ``train/loss`` every step and ``lmn/hidden1`` when computed; returns the tracker's history."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError('this example needs tensorboard: pip install tensorboard (or pip install "grokfast_metrics[tensorboard]")') from e
    torch.manual_seed(seed)
    pairs = torch.cartesian_prod(torch.arange(p), torch.arange(p))
    labels = pairs.sum(1) % p
    train = torch.randperm(p * p)[: int(train_frac * p * p)]
    model = make_model(p, emb, width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0)
    writer = SummaryWriter(logdir)

    tracker = gm.LMNTracker(model, pairs, at="3", every=every)  # [LMN] 2/3
    losses = []
    for step in range(steps):
        loss = F.cross_entropy(model(pairs[train]), labels[train])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        writer.add_scalar("train/loss", loss.item(), step)
        if tracker.update(step) is not None:  # [LMN] 3/3
            writer.add_scalar("lmn/hidden1", tracker.compute(), tracker.last_step)
    writer.close()
    return {**tracker.as_dict(), "loss": losses}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--logdir", default="runs/tb")
    a = ap.parse_args()
    out = main(a.logdir, steps=a.steps)
    print(f"logged {len(out['step'])} LMN values to {a.logdir}")
