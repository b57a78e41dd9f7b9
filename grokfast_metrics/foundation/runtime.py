"""Runtime helpers every part of the library shares: device strings, device sync, eval mode.

Each decision here is made once: :func:`resolve_device` is the one parser of device strings
(trainer, benchmarks, CLI), :func:`synchronize` the one device sync (timers), and
:func:`eval_mode` the one way a computation runs a module without changing its mode or the RNG.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; otherwise ``torch.device(device)``, checked to exist.

    Raises:
        ValueError: unparsable device, or CUDA asked for but not available.
    """
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"bad device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for but CUDA is not available; use --device cpu")
    return dev


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued work on ``device`` (a no-op off CUDA), so a timer measures finished work."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def eval_mode(module: nn.Module):
    """Run ``module`` in eval mode and leave every submodule's mode as it was; the global RNG is forked."""
    modes = [(m, m.training) for m in module.modules()]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        module.eval()
        try:
            yield
        finally:
            for m, mode in modes:
                m.training = mode


def triton_available() -> bool:
    """True when the ``triton`` package imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` is set (it takes effect only if set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def drop_checkout_from_path() -> None:
    """Take this repository's root off ``sys.path`` (``python -m grokfast_metrics`` run from a checkout).

    ``python -m`` puts the working directory first on ``sys.path``. In a checkout of this repository that
    makes its top-level ``kernels/`` folder (installed as ``grokfast_metrics.kernels``) answer for
    ``import kernels``, the name of Hugging Face's package that ``transformers`` 5 imports. Only an entry
    that is this checkout's root is removed (recognised by ``kernels/cpu_fused.cpp`` beside ``setup.py``).
    """
    def is_checkout(entry: str) -> bool:
        root = Path(entry or os.getcwd())
        return (root / "setup.py").is_file() and (root / "kernels" / "cpu_fused.cpp").is_file()

    sys.path[:] = [e for e in sys.path if not is_checkout(e)]
