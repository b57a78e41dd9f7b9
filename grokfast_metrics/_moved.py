"""Module paths from before the layer packages, kept importable with a ``DeprecationWarning``.

``import grokfast_metrics.core`` (or ``gm.core``) gives a small module whose names are looked up, on
access, in the modules that define them now (:data:`MOVED`). Nothing here imports torch: the new module
is imported at the first attribute access. Only the paths a user could have read in the README, the docs
or the examples are kept; inside the library every import names the new module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

#: old module (under ``grokfast_metrics``) -> the modules that define its names now (the first is its new place)
MOVED: dict[str, tuple[str, ...]] = {
    "core": ("compute.core",),
    "reference": ("compute.reference",),
    "exact": ("compute.exact",),
    "tracker": ("tracking.tracker", "tracking.base", "tracking.metric", "tracking.schedule"),
    "async_eigen": ("tracking.async_eigen",),
    "schedule": ("tracking.schedule",),
    "complexity": ("experiment.complexity",),
    "config": ("experiment.config",),
    "runlog": ("experiment.runlog",),
    "train": (
        "experiment.trainer",
        "experiment.run",
        "experiment.preflight",
        "experiment.config",
        "experiment.collapse",
        "experiment.checkpoint",
        "experiment.runlog",
        "experiment.trainctl",
    ),
}
_PACKAGE = __name__.rpartition(".")[0]


class MovedModule(types.ModuleType):
    """An old module path: each name is read from the first of its new modules that defines it."""

    def __init__(self, name: str, targets: tuple[str, ...]):
        super().__init__(name, f"Deprecated: moved to {_PACKAGE}.{targets[0]}.")
        self._targets = tuple(f"{_PACKAGE}.{t}" for t in targets)

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        for target in self._targets:
            module = importlib.import_module(target)
            try:
                return getattr(module, attr)
            except AttributeError:
                continue
        raise AttributeError(f"module {self.__name__!r} (moved to {self._targets[0]!r}) has no attribute {attr!r}")

    def __dir__(self) -> list[str]:
        return sorted({n for t in self._targets for n in dir(importlib.import_module(t)) if not n.startswith("_")})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old paths of :data:`MOVED` (and nothing else) and warns once per path, when it is imported."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != _PACKAGE or name not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return MovedModule(spec.name, MOVED[spec.name.rpartition(".")[2]])

    def exec_module(self, module):
        warnings.warn(f"{module.__name__} is deprecated: import from {module._targets[0]}", DeprecationWarning, stacklevel=2)


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.append(_Finder())
