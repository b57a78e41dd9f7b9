"""What the trainer measures besides LMN, and what it records about the run: the weight columns (per-layer norms,
effective ranks), the compression-complexity grid and column names, ``config.json``'s contents and which backend
computes LMN (:func:`lmn_backend_info`)."""

from __future__ import annotations

import platform
import sys
from dataclasses import asdict

import torch

from ..compute.core import backend_info
from ..tracking.schedule import Schedule
from .complexity import spectral_entropies, weight_matrices, weight_norms
from .config import TrainConfig
from .model import GrokMLP, representations
from .tasks import Task
from .transformer import GrokTransformer

#: the trainer's compression-complexity grid (7 bin sizes x 4 rank fractions, ~1.6 s per evaluation on the
#: paper's model on one CPU core); ``grokfast_metrics.experiment.complexity`` has the finer default grid
COMPLEXITY_BINS = tuple(2.0**-k for k in range(12, -1, -2))
COMPLEXITY_RANK_FRACTIONS = (1.0, 0.9, 0.7, 0.5)


def weight_columns(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Column names of the per-layer norms (``l2_<module>``, ``l2_last``) and effective ranks (``erank_<linear>``)."""
    norms = [f"l2_{name}" for name in weight_norms(model)["layers"]] + ["l2_last"]
    ranks = [f"erank_{name}" for name in weight_matrices(model)]
    return norms, ranks


def weight_measures(model: torch.nn.Module, ranks: bool) -> dict[str, float]:
    """Per-layer L2 norms, the last layer's norm and (if ``ranks``) the effective rank of each Linear."""
    wn = weight_norms(model)
    row = {f"l2_{name}": v for name, v in wn["layers"].items()}
    row["l2_last"] = wn["last"]
    if ranks:
        row.update({f"erank_{name}": v["effective_rank"] for name, v in spectral_entropies(model).items()})
    return row


def lmn_backend_info(model: GrokMLP, x_probe: torch.Tensor, cfg: TrainConfig) -> dict | None:
    """What computes LMN in this run (``config.json`` and ``summary.json``'s ``lmn_backend``; ``None`` when no layer is
    tracked): the first tracked layer's :func:`grokfast_metrics.compute.core.backend_info` (``requested``, ``backend``,
    ``kernel``, ``dtype``, ``fallback``), plus ``warning``: the one-line cause-and-cost message when ``"auto"`` fell
    back to torch ops because the fused CPU kernel could not be built (no compiler, a failed build), else ``None``.
    Every tracked layer has the same tail type, so the first one stands for all. The fallback is warned once per
    process (by the kernel module)."""
    from ..kernels import cpu_fused as kcpu

    if not cfg.lmn_layers:
        return None
    if isinstance(model, GrokTransformer):  # measured through lmn_at: what its plan ran on two probe inputs
        from ..compute.core import last_run_info
        from ..dropin.measure import lmn_at

        lmn_at(model, x_probe[:2], at=cfg.lmn_layers[0], n_lambda=cfg.n_lambda, backend=cfg.lmn_backend)
        return {"requested": cfg.lmn_backend, "fallback": None, **last_run_info(), "warning": None}
    ((h, tail),) = representations(model, x_probe[:2], [cfg.lmn_layers[0]]).values()
    info = backend_info(h, tail, cfg.lmn_backend, cfg.n_lambda)
    info["warning"] = kcpu.unavailable_message() if info["fallback"] and h.device.type == "cpu" else None
    return info


def run_info(cfg: TrainConfig, task: Task, model: GrokMLP, n_probe: int, schedule: Schedule) -> dict:
    """The contents of ``config.json``."""
    device = torch.device(cfg.device)
    return {
        "config": asdict(cfg),
        "n_inputs": task.n_inputs,
        "n_train": len(task.train_idx),
        "n_test": len(task.test_idx),
        "n_classes": task.n_classes,
        "n_probe": n_probe,
        "lmn_early_steps": schedule.early_lmn_steps(),
        "n_params": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "argv": sys.argv,
    }


def complexity_column(eps: float) -> str:
    """Log column of the compression complexity at loss tolerance ``eps``."""
    return f"complexity_bits_eps{eps:g}"
