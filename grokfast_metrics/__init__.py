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
import importlib.util

from . import _moved  # noqa: F401  (installs the finder of the module paths from before the layer packages)
from .foundation.version import __version__  # noqa: F401  (listed in __all__)

#: public name -> the module that defines it (docs/api.md documents each)
_EXPORTS = {
    "BACKENDS": "compute.core",
    "LMNResult": "compute.core",
    "NonFiniteOutputError": "foundation.errors",
    "connectivity": "compute.core",
    "lmn": "compute.core",
    "lmn_from_connectivity": "compute.core",
    "resolve_backend": "compute.core",
    "AffineTailWarning": "dropin.affine",
    "check_cut": "dropin.measure",
    "lmn_at": "dropin.measure",
    "EigenStepError": "tracking.async_eigen",
    "LMNTracker": "tracking.tracker",
    "LMNMetric": "tracking.metric",  # only with torchmetrics installed: otherwise an ImportError says what to install
}

#: optional public names -> the package they need (listed in ``__all__`` only when it is installed, so that
#: ``from grokfast_metrics import *`` works without it)
_OPTIONAL = {"LMNMetric": "torchmetrics"}

__all__ = sorted(["__version__", *(n for n in _EXPORTS if n not in _OPTIONAL or importlib.util.find_spec(_OPTIONAL[n]) is not None)])


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
