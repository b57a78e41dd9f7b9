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
#: the end point of a segment that reaches the output (``"A:logits"`` is the same reading as ``"A"``)
OUTPUT = "logits"
#: position of each representation in the chain ``fc1, act1, fc2, act2, fc3`` (the modules after it)
_POSITION = {**{name: i for i, name in enumerate(LAYERS)}, OUTPUT: len(LAYERS)}
#: Fig. 3's readings: each of the paper's three layers (embedding, first hidden, second hidden) to the output
#: and to the next layer (``--lmn-layer fig3``), the default reading first
FIG3_READINGS = ("hidden1_post", "embeddings", "hidden2_post", "embeddings:hidden1_post", "hidden1_post:hidden2_post")
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
        return self.segment(layer, OUTPUT)

    def segment(self, from_layer: str, to_layer: str = OUTPUT) -> nn.Sequential:
        """The modules between two representations, ``from_layer -> to_layer``, as an ``nn.Sequential``
        of this model's own modules (no copies): an MLP segment, so LMN takes the MLP paths.

        ``to_layer`` is one of :data:`LAYERS` after ``from_layer`` or ``"logits"`` (the default: the tail).

        Raises:
            ValueError: unknown names or ``to_layer`` not after ``from_layer``.
        """
        _check_layer(from_layer)
        if to_layer not in _POSITION:
            raise ValueError(f"unknown layer {to_layer!r}; choose one of {', '.join((*LAYERS, OUTPUT))}")
        start, stop = _POSITION[from_layer], _POSITION[to_layer]
        if stop <= start:
            raise ValueError(
                f"segment {from_layer}:{to_layer}: {to_layer} must come after {from_layer} (order: {', '.join((*LAYERS, OUTPUT))})"
            )
        mods: list[nn.Module] = [self.fc1, self.act1, self.fc2, self.act2, self.fc3]
        return nn.Sequential(*mods[start:stop])


def _check_layer(layer: str) -> None:
    if layer not in LAYERS:
        raise ValueError(f"unknown layer {layer!r}; choose one of {', '.join(LAYERS)}")


def split_spec(spec: str) -> tuple[str, str]:
    """``"A"`` -> ``(A, "logits")``; ``"A:B"`` -> ``(A, B)`` (names not checked)."""
    a, sep, b = spec.partition(":")
    return a, (b if sep else OUTPUT)


def check_layer_spec(spec: str) -> None:
    """Check an LMN reading ``"A"`` (layer A to the logits) or ``"A:B"`` (layer A to layer B).

    Raises:
        ValueError: what is wrong, with the valid names.
    """
    a, b = split_spec(spec)
    if a not in LAYERS:
        raise ValueError(
            f"unknown LMN layer {a!r} in {spec!r}; choose from {', '.join(LAYERS)} "
            f"(or FROM:TO with TO one of {', '.join((*LAYERS, OUTPUT))})"
        )
    if b not in _POSITION:
        raise ValueError(f"unknown LMN target layer {b!r} in {spec!r}; choose from {', '.join((*LAYERS, OUTPUT))}")
    if _POSITION[b] <= _POSITION[a]:
        raise ValueError(f"LMN segment {spec!r}: {b} must come after {a} (order: {', '.join((*LAYERS, OUTPUT))})")


def canonical_spec(spec: str) -> str:
    """``"A:logits"`` -> ``"A"``; other readings unchanged."""
    a, b = split_spec(spec)
    return a if b == OUTPUT else spec


def segment_of(model: GrokMLP, spec: str) -> nn.Sequential:
    """The modules of the reading ``spec`` (``"A"`` or ``"A:B"``); see :meth:`GrokMLP.segment`."""
    return model.segment(*split_spec(spec))


def layer_target(spec: str) -> str:
    """Where the reading ``spec`` ends: ``"the logits"`` or the target layer's name."""
    b = split_spec(spec)[1]
    return "the logits" if b == OUTPUT else b


def representations(model: GrokMLP, x: torch.Tensor, layers: list[str] | tuple[str, ...]) -> dict[str, tuple[torch.Tensor, nn.Sequential]]:
    """Representations of ``x`` at each of ``layers`` and the tail from there to the logits.

    A reading ``"A:B"`` gives the representation at A and the segment ``A -> B`` instead of the tail.

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
        check_layer_spec(layer)
    with torch.no_grad():
        acts: dict[str, torch.Tensor] = {}
        acts["embeddings"] = e = model.embed(x)
        acts["hidden1_pre"] = z1 = model.fc1(e)
        acts["hidden1_post"] = h1 = model.act1(z1)
        if any(split_spec(layer)[0] in ("hidden2_pre", "hidden2_post") for layer in layers):
            acts["hidden2_pre"] = z2 = model.fc2(h1)
            acts["hidden2_post"] = model.act2(z2)
    return {layer: (acts[split_spec(layer)[0]], segment_of(model, layer)) for layer in layers}


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
