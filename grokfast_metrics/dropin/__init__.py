"""LMN at any layer of any ``nn.Module``: ``lmn_at`` and ``check_cut`` (``measure``), the plan that decides once how
the rest of the model runs (``plan``), its tails (``split``), pruning (``prune``), lowering into the fused kernels
(``lower``) and the hooks (``hooks``).

The names this module re-exported before the layer packages (``grokfast_metrics.dropin.measure.Plan``, ...) still import,
with a ``DeprecationWarning`` naming the module that defines them.
"""

from __future__ import annotations

import importlib
import warnings

#: name importable from here before the layer packages -> the module that defines it
_MOVED = {
    "lmn_at": "measure",
    "check_cut": "measure",
    "CUT_CHECK_SAMPLES": "checks",
    "PATHS": "plan",
    "AffineTailWarning": "plan",
    "Plan": "plan",
    "emit_affine_warning": "plan",
    "LastPosition": "hooks",
    "OutputSelector": "hooks",
    "suspend_user_hooks": "hooks",
    "unwrap_compiled": "hooks",
}


def __getattr__(name: str) -> object:
    if name in _MOVED:
        module = f"{__name__}.{_MOVED[name]}"
        warnings.warn(f"{__name__}.{name} is deprecated: import it from {module}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
