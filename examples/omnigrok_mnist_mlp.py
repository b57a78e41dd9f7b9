"""LMN in an Omnigrok-style MNIST loop: a wide-init ReLU MLP trained with MSE and weight decay.

The model follows Omnigrok's MNIST setup (Liu, Michaud & Tegmark, 2023): ``Flatten -> Linear(784, w)
-> ReLU -> Linear(w, w) -> ReLU -> Linear(w, 10)`` with every weight scaled by ``init_scale`` (the
large-init regime in which MNIST groks), MSE loss on one-hot targets, AdamW. To stay offline the
data are *random* images of MNIST's shape ``(N, 1, 28, 28)`` with random labels; swap in
``torchvision.datasets.MNIST`` for the real thing. The three lines marked ``# [LMN]`` are all that
is added to the existing loop.

The model is an ``nn.Sequential`` and ``at="2"`` (output of the first ReLU) leaves the MLP tail
``Linear -> ReLU -> Linear``, so LMN takes the fused fast path.

Run: ``python examples/omnigrok_mnist_mlp.py --steps 5000``
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import grokfast_metrics as gm  # [LMN] 1/3


def make_mlp(width: int = 200, init_scale: float = 8.0) -> nn.Sequential:
    """Omnigrok's MNIST MLP, ``(N, 1, 28, 28) -> (N, 10)``, weights multiplied by ``init_scale``."""
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    with torch.no_grad():
        for p in mlp.parameters():
            p.mul_(init_scale)
    return mlp


def main(
    steps: int = 5000,
    n_train: int = 1000,
    width: int = 200,
    init_scale: float = 8.0,
    batch_size: int = 200,
    n_probe: int = 256,
    every="log",
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Train on random MNIST-shaped data and track LMN after the first hidden layer."""
    torch.manual_seed(seed)
    x = torch.rand(n_train, 1, 28, 28, device=device)
    y = torch.randint(10, (n_train,), device=device)
    model = make_mlp(width, init_scale).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

    tracker = gm.LMNTracker(model, x[:n_probe], at="2", every=every)  # [LMN] 2/3
    losses = []
    for step in range(steps):
        idx = torch.randint(n_train, (batch_size,), device=device)
        loss = F.mse_loss(model(x[idx]), F.one_hot(y[idx], 10).float())
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
