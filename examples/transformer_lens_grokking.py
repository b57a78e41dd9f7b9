"""LMN in a TransformerLens grokking loop: Nanda et al.'s 1-layer ``HookedTransformer`` on addition mod p.

The setup follows "Progress measures for grokking via mechanistic interpretability" (Nanda et al.,
2023): tokens ``[a, b, =]`` batch-first, one layer with ReLU MLP and no LayerNorm, logits of the
answer at the last position, full-batch AdamW with weight decay 1. The three lines marked
``# [LMN]`` are all that is added to the existing loop.

Which hook point. TransformerLens names the residual stream ``blocks.<k>.hook_resid_pre`` (block
input), ``blocks.<k>.hook_resid_mid`` (after attention, before the MLP) and
``blocks.<k>.hook_resid_post`` (block output). In a 1-layer model without a final LayerNorm only the
unembedding follows ``hook_resid_post``: that map is affine and LMN is 1 at every step (the tracker
warns). ``hook_resid_mid`` keeps the MLP, the last nonlinearity, in the measured map; it is a cut of
the last-position logits (everything after it reads the residual stream only), so ``lmn_at`` runs the
model with that activation replaced (TransformerLens' forward does not trace with ``torch.fx``).

Requires ``transformer-lens<4`` (``pip install "grokfast_metrics[transformer-lens]"``): version 4
removed ``HookedTransformer``.

Run: ``python examples/transformer_lens_grokking.py --steps 3000``
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import grokfast_metrics as gm  # [LMN] 1/3


def make_model(p: int = 113, d_model: int = 128, n_heads: int = 4, d_mlp: int = 512, seed: int = 0):
    """Nanda's 1-layer grokking transformer: ``(B, 3)`` tokens -> ``(B, 3, p)`` logits."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError as e:
        raise ImportError(
            'this example needs TransformerLens 2.x/3.x: pip install "transformer-lens<4" '
            '(or pip install "grokfast_metrics[transformer-lens]")'
        ) from e
    cfg = HookedTransformerConfig(
        n_layers=1,
        d_model=d_model,
        d_head=d_model // n_heads,
        n_heads=n_heads,
        d_mlp=d_mlp,
        d_vocab=p + 1,
        d_vocab_out=p,
        n_ctx=3,
        act_fn="relu",
        normalization_type=None,
        seed=seed,
        device="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return HookedTransformer(cfg)


def main(
    steps: int = 3000,
    p: int = 113,
    d_model: int = 128,
    n_heads: int = 4,
    d_mlp: int = 512,
    train_frac: float = 0.3,
    n_probe: int = 128,
    every="log",
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Full-batch training on ``train_frac`` of all pairs; LMN at ``blocks.0.hook_resid_mid`` of a fixed probe."""
    torch.manual_seed(seed)
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).T
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1).to(device)  # (p^2, 3), batch-first
    labels = ((a + b) % p).to(device)
    perm = torch.randperm(p * p, device=device)
    train = perm[: int(train_frac * p * p)]
    model = make_model(p, d_model, n_heads, d_mlp, seed).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98))

    probe = tokens[perm[:n_probe]]
    tracker = gm.LMNTracker(model, probe, at="blocks.0.hook_resid_mid", output=lambda out: out[:, -1], every=every)  # [LMN] 2/3
    losses = []
    for step in range(steps):
        logits = model(tokens[train])[:, -1]
        loss = F.cross_entropy(logits, labels[train])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        tracker.update(step)  # [LMN] 3/3
    return {**tracker.as_dict(), "loss": losses}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--p", type=int, default=113)
    a = ap.parse_args()
    out = main(steps=a.steps, p=a.p)
    for s, v in zip(out["step"], out["lmn"]):
        print(f"step {s:6d}  loss {out['loss'][s]:.4f}  LMN {v:.3f}")
