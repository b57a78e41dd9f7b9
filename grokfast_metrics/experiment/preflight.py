"""What a run is refused for before its directory is touched: the memory estimate and the LMN backend on the device."""

from __future__ import annotations

from dataclasses import asdict

import torch

from ..compute.core import resolve_backend
from ..foundation.policy import available_bytes
from .config import TrainConfig
from .model import representations
from .run import TORCH_DTYPES, build_model
from .tasks import Task, make_task
from .transformer import track_transformer_lmn


def n_parameters(cfg: TrainConfig, task: Task) -> int:
    """Parameters of the model ``cfg`` builds for ``task`` (:class:`~grokfast_metrics.experiment.model.GrokMLP`, or an upper
    bound for :class:`~grokfast_metrics.experiment.transformer.GrokTransformer`), without building it."""
    if cfg.model == "transformer":  # embeddings (tokens and '=', 3 positions), Q K V O, the MLP, the unembedding
        d, m, c = cfg.d_model, cfg.d_mlp, task.n_classes
        return (task.n_tokens + 1 + 3) * d + 4 * d * d + 2 * d * m + m + d + d * c
    e, h, c = cfg.embed_dim, cfg.hidden, task.n_classes
    tables = task.n_tokens * e * (1 if cfg.embedding == "shared" else 2)
    return tables + (2 * e * h + h) + (h * h + h) + (h * c + c)


def estimate_bytes(cfg: TrainConfig, task: Task | None = None) -> int:
    """Memory a run of ``cfg`` needs, from the sizes alone: the weights, their gradients, AdamW's two moments and
    the Grokfast filter's state (one gradient for EMA, ``ma_window`` for MA), the activations of the full-batch
    forward and backward, and ``L`` of the probe."""
    task = task if task is not None else make_task(cfg.task, cfg.train_fraction, cfg.seed, cfg.p)
    elem = torch.empty((), dtype=TORCH_DTYPES[cfg.dtype]).element_size()
    copies = 4 + {"ema": 1, "ma": cfg.ma_window}.get(cfg.grokfast, 0)
    width = 2 * cfg.embed_dim + 4 * cfg.hidden + 2 * task.n_classes  # per sample: embeddings, hidden pre/post, logits
    if cfg.model == "transformer":  # per sample, 3 positions: residual streams, Q K V, MLP pre/post, scores, logits
        width = 3 * (6 * cfg.d_model + 2 * cfg.d_mlp + 3 * cfg.n_heads) + 2 * task.n_classes
    probe = task.n_inputs if not isinstance(cfg.probe, int) else min(int(cfg.probe), task.n_inputs)
    return n_parameters(cfg, task) * elem * copies + 3 * task.n_inputs * width * elem + 8 * probe * probe


def preflight(cfg: TrainConfig) -> None:
    """What can be known about a resolved ``cfg`` before the run directory is touched: the run fits in memory and
    the LMN backend runs on this device (a stand-in model of the same layers, at most 8 wide, is asked).

    Raises:
        MemoryError: the run needs more memory than the device leaves (free memory, ``ulimit -v``, the cgroup).
        ValueError: the LMN backend cannot run here (the message says why).
    """
    task = make_task(cfg.task, cfg.train_fraction, cfg.seed, cfg.p)
    need, free = estimate_bytes(cfg, task), available_bytes(cfg.device)
    if free is not None and need > free:
        raise MemoryError(
            f"the run needs about {need / 2**30:.1f} GiB ({n_parameters(cfg, task):,} parameters in {cfg.dtype}, with their "
            f"gradients, AdamW moments and filter state, and the activations) but {cfg.device} has {free / 2**30:.1f} GiB "
            "available (free memory, the address-space and cgroup limits); use a smaller --hidden / --embed-dim"
        )
    if not cfg.lmn_every:
        return
    if cfg.model == "transformer":  # measured through lmn_at: its cut check and one LMN on two inputs
        model = build_model(task, cfg, torch.device(cfg.device))
        track_transformer_lmn(model, task.x[:2].to(cfg.device), list(cfg.lmn_layers), cfg.n_lambda, cfg.lmn_backend)()
        return
    small = TrainConfig(**{**asdict(cfg), "embed_dim": min(cfg.embed_dim, 8), "hidden": min(cfg.hidden, 8)})
    model = build_model(task, small, torch.device(cfg.device))
    for h, tail in representations(model, task.x[:2].to(cfg.device), list(cfg.lmn_layers)).values():
        resolve_backend(h, tail, cfg.lmn_backend)
