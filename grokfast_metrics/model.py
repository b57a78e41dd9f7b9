"""The LMN paper's 3-layer SiLU MLP and the (representation, tail) split LMN is measured on.

Architecture (seed 001, Section 3)::

    e  = concat(E_a[a], E_b[b])          # (N, 64)   "embeddings"
    z1 = fc1(e)                          # (N, 100)  "hidden1_pre"
    h1 = SiLU(z1)                        # (N, 100)  "hidden1_post"   <- default LMN layer
    z2 = fc2(h1)                         # (N, 100)  "hidden2_pre"
    h2 = SiLU(z2)                        # (N, 100)  "hidden2_post"
    logits = fc3(h2)                     # (N, O)

LMN at a layer interpolates that layer's representation and pushes it through the rest of the
network. Interpolating the input of a Linear equals interpolating its output, so
``embeddings == hidden1_pre`` and ``hidden1_post == hidden2_pre`` give the same ``L``, and the
tail after ``hidden2_post`` is the affine ``fc3`` (LMN = 1 always). See ``docs/training.md``.
"""
from __future__ import annotations

import torch
from torch import nn

#: layers LMN can be taken at, in forward order
LAYERS = ("embeddings", "hidden1_pre", "hidden1_post", "hidden2_pre", "hidden2_post")
DEFAULT_LAYER = "hidden1_post"
#: embedding layouts: one table shared by both operands, or one table per operand
EMBEDDINGS = ("shared", "separate")


class GrokMLP(nn.Module):
    """Two operand embeddings (concatenated) -> Linear -> SiLU -> Linear -> SiLU -> Linear.

    Args:
        n_tokens: operand vocabulary size.
        n_classes: number of output classes ``O``.
        embed_dim: embedding width per operand (paper: 32).
        hidden: hidden width (paper: 100).
        embedding: ``"shared"`` (one table ``E`` for both operands) or ``"separate"`` (``E_a``, ``E_b``).

    Raises:
        ValueError: non-positive sizes or unknown ``embedding``.
    """

    def __init__(self, n_tokens: int, n_classes: int, embed_dim: int = 32, hidden: int = 100, embedding: str = "shared"):
        super().__init__()
        for name, v in (("n_tokens", n_tokens), ("n_classes", n_classes), ("embed_dim", embed_dim), ("hidden", hidden)):
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1; got {v}")
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}; got {embedding!r}")
        self.embedding = embedding
        self.embed_a = nn.Embedding(n_tokens, embed_dim)
        self.embed_b = self.embed_a if embedding == "shared" else nn.Embedding(n_tokens, embed_dim)
        self.fc1 = nn.Linear(2 * embed_dim, hidden)
        self.act1 = nn.SiLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = nn.SiLU()
        self.fc3 = nn.Linear(hidden, n_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 2)`` int64 operands -> ``(N, 2 * embed_dim)`` concatenated embeddings."""
        return torch.cat([self.embed_a(x[:, 0]), self.embed_b(x[:, 1])], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 2)`` int64 operands -> ``(N, O)`` logits."""
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(self.embed(x))))))

    def tail(self, layer: str) -> nn.Sequential:
        """The rest of the network after ``layer``, built from this model's own modules (no copies).

        Raises:
            ValueError: unknown layer name.
        """
        _check_layer(layer)
        mods: list[nn.Module] = [self.fc1, self.act1, self.fc2, self.act2, self.fc3]
        start = {"embeddings": 0, "hidden1_pre": 1, "hidden1_post": 2, "hidden2_pre": 3, "hidden2_post": 4}[layer]
        return nn.Sequential(*mods[start:])


def _check_layer(layer: str) -> None:
    if layer not in LAYERS:
        raise ValueError(f"unknown layer {layer!r}; choose one of {', '.join(LAYERS)}")


def representations(model: GrokMLP, x: torch.Tensor, layers: list[str] | tuple[str, ...]) -> dict[str, tuple[torch.Tensor, nn.Sequential]]:
    """Representations of ``x`` at each of ``layers`` and the tail from there to the logits.

    One forward pass under ``torch.no_grad()``; the model's mode, parameters and the RNG are not touched.

    Args:
        model: the network.
        x: ``(N, 2)`` int64 probe inputs.
        layers: names from :data:`LAYERS`.

    Returns:
        ``{layer: (h, tail)}`` with ``h`` of shape ``(N, D_layer)`` (detached) and ``tail`` an
        ``nn.Sequential`` of the model's own modules, ``D_layer -> O``, ready for ``gm.lmn(h, tail)``.

    Raises:
        ValueError: unknown layer name.
    """
    for layer in layers:
        _check_layer(layer)
    with torch.no_grad():
        acts: dict[str, torch.Tensor] = {}
        acts["embeddings"] = e = model.embed(x)
        acts["hidden1_pre"] = z1 = model.fc1(e)
        acts["hidden1_post"] = h1 = model.act1(z1)
        if any(layer in ("hidden2_pre", "hidden2_post") for layer in layers):
            acts["hidden2_pre"] = z2 = model.fc2(h1)
            acts["hidden2_post"] = model.act2(z2)
    return {layer: (acts[layer], model.tail(layer)) for layer in layers}


def representation(model: GrokMLP, x: torch.Tensor, layer: str = DEFAULT_LAYER) -> tuple[torch.Tensor, nn.Sequential]:
    """``(h, tail)`` for one layer; see :func:`representations`."""
    return representations(model, x, [layer])[layer]


def scale_init(model: nn.Module, alpha: float) -> None:
    """Omnigrok init scale: multiply every initial parameter by ``alpha`` (in place, no grad).

    Raises:
        ValueError: ``alpha`` not a positive finite number.
    """
    if not (alpha > 0 and alpha != float("inf")):
        raise ValueError(f"init scale alpha must be a positive finite number; got {alpha}")
    if alpha == 1.0:
        return
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(alpha)

