"""Complexity measures from the neighbouring papers, to log beside LMN.

* Weight norms (Omnigrok, Liu et al. 2022): L2 norm of all parameters, per layer, of the last layer.
* Spectral entropy / effective rank of each weight matrix (DeMoss et al. 2024): ``p = s / sum s`` over the
  singular values, ``H = -sum p log p`` (nats), effective rank ``exp(H)``; and the spectral-entropy penalty
  used as a regulariser.
* Compression-based complexity (DeMoss et al. 2024): coarse-grain the weights (low-rank truncation, then
  quantisation), serialise deterministically, compress with ``bz2`` and ``lzma``, and keep the smallest
  compressed size among the coarse-grainings whose training loss stays within ``eps`` of the original.
"""

from __future__ import annotations

import bz2
import copy
import lzma
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

# ------------------------------------------------------------------------------------------
# weight norms


def weight_norms(model: nn.Module) -> dict:
    """L2 norms of a model's parameters.

    Returns:
        ``{"l2": norm of all parameters, "layers": {module name: norm of its own parameters},
        "last": norm of the parameters of the last module (in registration order) that has any}``.
    """
    with torch.no_grad():
        names, sq = [], []
        for name, mod in model.named_modules():
            own = [p.detach().double().pow(2).sum() for p in mod.parameters(recurse=False)]
            if own:
                names.append(name or type(model).__name__)
                sq.append(torch.stack(own).sum())
        norms = torch.stack(sq).sqrt().tolist() if sq else []  # one device sync, logged every step on a GPU
        layers = dict(zip(names, norms))
        total = math.sqrt(sum(v * v for v in layers.values()))
    return {"l2": total, "layers": layers, "last": list(layers.values())[-1] if layers else 0.0}


# ------------------------------------------------------------------------------------------
# spectral entropy


def _entropy_of_singular_values(s: torch.Tensor) -> torch.Tensor:
    p = s / s.sum().clamp_min(torch.finfo(s.dtype).tiny)
    return -(p * torch.log(p.clamp_min(torch.finfo(s.dtype).tiny))).sum()


def spectral_entropy(weight: torch.Tensor) -> tuple[float, float]:
    """Spectral entropy (nats) and effective rank ``exp(H)`` of a 2-D weight ``(m, n)``.

    ``p_i = s_i / sum s`` over the singular values ``s``; ``H = -sum p log p``. A zero matrix gives ``(0, 1)``.
    """
    if weight.dim() != 2:
        raise ValueError(f"spectral_entropy needs a 2-D weight matrix; got shape {tuple(weight.shape)}")
    with torch.no_grad():
        s = torch.linalg.svdvals(weight.detach().double())
        if float(s.sum()) == 0.0:
            return 0.0, 1.0
        h = float(_entropy_of_singular_values(s))
    return h, math.exp(h)


def weight_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """The 2-D ``weight`` parameters of ``model``'s ``nn.Linear`` layers, by module name."""
    return {name: m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def spectral_entropies(model: nn.Module) -> dict[str, dict[str, float]]:
    """``{layer: {"entropy": H, "effective_rank": exp(H)}}`` for every ``nn.Linear`` of ``model``."""
    out = {}
    for name, w in weight_matrices(model).items():
        h, r = spectral_entropy(w)
        out[name] = {"entropy": h, "effective_rank": r}
    return out


def spectral_entropy_penalty(model: nn.Module) -> torch.Tensor:
    """Differentiable sum of the spectral entropies of ``model``'s Linear weights (a regulariser term)."""
    terms = [_entropy_of_singular_values(torch.linalg.svdvals(w)) for w in weight_matrices(model).values()]
    if not terms:
        raise ValueError("model has no nn.Linear layers to regularise")
    return torch.stack(terms).sum()


# ------------------------------------------------------------------------------------------
# compression-based complexity

#: default search grid: quantisation bin sizes (absolute) and kept fractions of the singular-value sum
DEFAULT_BINS: tuple[float, ...] = tuple(2.0**-k for k in range(14, -1, -1))
DEFAULT_RANK_FRACTIONS: tuple[float, ...] = (1.0, 0.99, 0.95, 0.9, 0.8, 0.6, 0.4)


@dataclass
class CompressionResult:
    """Result of :func:`compression_complexity`.

    Attributes:
        bits: ``{eps: smallest compressed size in bits whose loss stays within eps}``.
        settings: ``{eps: (rank_fraction, bin_size, compressor)}`` achieving it.
        base_loss: the loss of the unmodified model.
        raw_bits: compressed size of the finest setting searched (a naive baseline).
    """

    bits: dict[float, int]
    settings: dict[float, tuple[float, float, str]]
    base_loss: float
    raw_bits: int


def _coarse_grain(model: nn.Module, rank_fraction: float, bin_size: float) -> tuple[dict, bytes]:
    """Coarse-grained state (for evaluating the loss) and its deterministic serialisation.

    Linear weights ``(m, n)`` are replaced by their truncation to the smallest rank ``k`` whose singular
    values sum to at least ``rank_fraction`` of the total, only when the factors are smaller
    (``k (m + n) < m n``); the stored arrays (factors or full tensors) are rounded to multiples of
    ``bin_size`` and serialised as little-endian int32 codes in parameter order, with their shapes (lzma preset 6:
    for payloads under 1 MB preset 9 compresses no better and is ~10x slower).
    """
    linear_weights = {id(w) for w in weight_matrices(model).values()}
    state, chunks = {}, []
    for name, p in model.named_parameters():
        x = p.detach().double().cpu()
        stored: list[torch.Tensor]
        if id(p) in linear_weights and rank_fraction < 1.0 and min(x.shape) > 1:
            U, s, Vh = torch.linalg.svd(x, full_matrices=False)
            k = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), torch.tensor(rank_fraction, dtype=s.dtype)) + 1)
            k = min(k, s.numel())
            if k * (x.shape[0] + x.shape[1]) < x.numel():
                A, B = U[:, :k] * s[:k], Vh[:k]
                A, B = [torch.round(t / bin_size) for t in (A, B)]
                stored = [A, B]
                x = (A * bin_size) @ (B * bin_size)
            else:
                stored = [torch.round(x / bin_size)]
                x = stored[0] * bin_size
        else:
            stored = [torch.round(x / bin_size)]
            x = stored[0] * bin_size
        state[name] = x.to(p.dtype)
        for t in stored:
            codes = np.clip(t.numpy(), -(2**31), 2**31 - 1).astype("<i4")
            chunks.append(np.asarray(t.shape, dtype="<i4").tobytes() + codes.tobytes())
    return state, b"".join(chunks)


def _compressed_bits(payload: bytes, compressors: Sequence[str]) -> tuple[int, str]:
    sizes = []
    for c in compressors:
        if c == "bz2":
            sizes.append((8 * len(bz2.compress(payload, 9)), c))
        elif c == "lzma":
            sizes.append((8 * len(lzma.compress(payload, preset=6)), c))
        else:
            raise ValueError(f"unknown compressor {c!r}; use 'bz2' and/or 'lzma'")
    return min(sizes)


def compression_complexity(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], float],
    epsilons: Iterable[float] = (1e-3, 1e-2, 1e-1),
    bins: Sequence[float] = DEFAULT_BINS,
    rank_fractions: Sequence[float] = DEFAULT_RANK_FRACTIONS,
    compressors: Sequence[str] = ("bz2", "lzma"),
) -> CompressionResult:
    """Compression-based complexity of ``model`` in bits, for each loss tolerance ``eps``.

    Searches the grid ``rank_fractions x bins`` (``len(rank_fractions) * len(bins)`` loss evaluations and
    compressions, deterministic, no randomness): each setting is coarse-grained (see
    ``_coarse_grain``), its loss is ``loss_fn(copy)`` on a copy of the model carrying the coarse weights,
    and its size is the smaller of the ``bz2``/``lzma`` compressed serialisations. For every ``eps`` the
    result is the smallest size among settings with ``loss <= base_loss + eps`` (the finest setting is
    always admitted, so the result exists). Non-increasing in ``eps`` by construction.

    Args:
        model: the network (unchanged; a copy is coarse-grained).
        loss_fn: ``model -> float`` training loss (evaluate without grad).
        epsilons: loss tolerances.
        bins: quantisation bin sizes to try.
        rank_fractions: kept fractions of the singular-value sum to try (1.0 = no truncation).
        compressors: any of ``"bz2"``, ``"lzma"``.
    """
    eps_list = sorted(float(e) for e in epsilons)
    if not eps_list or eps_list[0] < 0:
        raise ValueError(f"epsilons must be non-empty and >= 0; got {eps_list}")
    if not bins or min(bins) <= 0:
        raise ValueError("bins must be positive bin sizes")
    if not rank_fractions or not all(0 < f <= 1 for f in rank_fractions):
        raise ValueError("rank_fractions must lie in (0, 1]")
    work = copy.deepcopy(model)
    with torch.no_grad():
        base = float(loss_fn(model))
        finest = (max(rank_fractions), min(bins))
        trials = []  # (loss, bits, setting)
        for f in sorted(set(rank_fractions), reverse=True):
            for b in sorted(set(bins)):
                state, payload = _coarse_grain(model, f, b)
                for name, p in work.named_parameters():
                    p.copy_(state[name])
                bits, comp = _compressed_bits(payload, compressors)
                trials.append((float(loss_fn(work)), bits, (f, b, comp)))
    raw = next(bits for loss, bits, s in trials if s[:2] == finest)
    result = CompressionResult({}, {}, base, raw)
    for eps in eps_list:
        ok = [(bits, s) for loss, bits, s in trials if loss <= base + eps or s[:2] == finest]
        bits, s = min(ok, key=lambda t: (t[0], -t[1][1]))
        result.bits[eps], result.settings[eps] = bits, s
    return result
