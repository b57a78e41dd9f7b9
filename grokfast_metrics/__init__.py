"""grokfast_metrics: the linear mapping number (LMN), fast enough to track at every training step.

>>> import torch, grokfast_metrics as gm
>>> tail = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 3))
>>> res = gm.lmn(torch.randn(32, 8), tail)
>>> res.lmn >= 1.0
True

The public names (and the layer packages, ``gm.compute``, ``gm.dropin``, ...) are imported on first use:
``import grokfast_metrics`` alone does not import torch, so the ``grokfast-metrics`` command answers Ctrl-C during its start-up
with one line (its ``main`` handles it) instead of a traceback from inside torch's import.
"""
from __future__ import annotations

import importlib

from . import _moved  # noqa: F401  (installs the finder of the module paths from before the layer packages)
from .foundation.version import __version__

#: public name -> the module that defines it
_EXPORTS = {
    "BACKENDS": "compute.core",
    "LMNResult": "compute.core",
    "connectivity": "compute.core",
    "lmn": "compute.core",
    "lmn_from_connectivity": "compute.core",
    "lmn_at": "dropin.measure",
    "LMNTracker": "tracking.tracker",
}

__all__ = [
    "BACKENDS",
    "LMNResult",
    "LMNTracker",
    "__version__",
    "connectivity",
    "lmn",
    "lmn_at",
    "lmn_from_connectivity",
]


def __getattr__(name: str):
    """The public names and the subpackages (``gm.compute``, ``gm.dropin``, ...), imported on first access.

    A module path from before the layer packages (``gm.core``, ``gm.tracker``, ...) still imports, with a
    ``DeprecationWarning`` naming its new place (:mod:`grokfast_metrics._moved`).
    """
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
