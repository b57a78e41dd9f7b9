"""grokfast_metrics: the linear mapping number (LMN), fast enough to track at every training step.

>>> import torch, grokfast_metrics as gm
>>> tail = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 3))
>>> res = gm.lmn(torch.randn(32, 8), tail)
>>> res.lmn >= 1.0
True
"""
from .core import BACKENDS, LMNResult, connectivity, lmn, lmn_from_connectivity
from .dropin import lmn_at
from .tracker import LMNTracker

__version__ = "0.1.0"

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
