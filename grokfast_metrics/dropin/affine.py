"""The affine-tail warning: LMN at a layer whose map to the output is affine is 1 at every step, which is never what the
user meant to measure (:class:`AffineTailWarning`, raised by :func:`emit_affine_warning` with advice that fits the model)."""

from __future__ import annotations

import warnings

from torch import nn


class AffineTailWarning(UserWarning):
    """The map from ``at`` to the output is affine, so LMN is 1 at every step (choose another layer).

    >>> import warnings, torch, grokfast_metrics as gm
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 3))
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     res = gm.lmn_at(model, torch.randn(5, 4), "1")     # only a Linear after the SiLU
    >>> res.lmn, [type(w.message).__name__ for w in caught]
    (1.0, ['AffineTailWarning'])
    """


def _has_attention(model: nn.Module) -> bool:
    """Whether ``model`` looks like a transformer or another residual network rather than an MLP: a module whose
    class name says attention, normalization or block (``MultiheadAttention``, ``LayerNorm``, ``TransformerBlock``)."""
    return any(w in type(m).__name__.lower() for m in model.modules() for w in ("attention", "norm", "block"))


def emit_affine_warning(at: str, to: str | None, how: str, stacklevel: int = 4, model: nn.Module | None = None) -> None:
    """Emit the :class:`AffineTailWarning` for ``at`` (-> ``to``), saying ``how`` it was detected.

    The advice fits ``model``: a model with attention gets the residual-stream advice, any other (an MLP) the
    hidden-layer advice; without ``model``, both.
    """
    target = f"module {to!r}" if to else "the output"
    mlp = (
        "the output of a hidden layer's activation that has another Linear and activation after it (the paper's "
        "choice: the first hidden layer's post-activation)"
    )
    transformer = (
        "the residual stream before the last nonlinearity (e.g. the last block's input, or "
        "'blocks.<k>.hook_resid_mid' before the last MLP in TransformerLens)"
    )
    advice = (
        mlp
        if model is not None and not _has_attention(model)
        else transformer
        if model is not None
        else f"{transformer}, or in an MLP {mlp}"
    )
    warnings.warn(
        f"LMN at {at!r} is 1 at every step: the map from {at!r} to {target} is affine ({how}), so every "
        f"interpolation path is a straight line. Measure at a layer with a nonlinearity after it: {advice}.",
        AffineTailWarning,
        stacklevel=stacklevel,
    )
