"""Module paths from before the layer packages still import, each with a DeprecationWarning naming its new place."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import grokfast_metrics as gm
from grokfast_metrics import _moved

#: the 8 top-level names and the modules users imported them from before the layer packages
OLD_PATHS = {
    "BACKENDS": "core",
    "LMNResult": "core",
    "connectivity": "core",
    "lmn": "core",
    "lmn_from_connectivity": "core",
    "lmn_at": "dropin",
    "LMNTracker": "tracker",
}


def _fresh(name: str):
    sys.modules.pop(name, None)
    return importlib.import_module(name)


@pytest.mark.parametrize("name", sorted(OLD_PATHS))
def test_old_paths_of_the_top_level_names(name):
    module = f"grokfast_metrics.{OLD_PATHS[name]}"
    with pytest.warns(DeprecationWarning, match="deprecated"):
        old = getattr(_fresh(module), name)
    assert old is getattr(gm, name)


def test_gm_core_attribute_access_warns_and_works():
    sys.modules.pop("grokfast_metrics.core", None)
    gm.__dict__.pop("core", None)
    with pytest.warns(DeprecationWarning, match=r"grokfast_metrics\.compute\.core"):
        resolve = gm.core.resolve_backend
    from grokfast_metrics.compute.core import resolve_backend

    assert resolve is resolve_backend


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_every_moved_path_imports_and_names_its_new_module(old):
    with pytest.warns(DeprecationWarning, match=_moved.MOVED[old][0].replace(".", r"\.")):
        module = _fresh(f"grokfast_metrics.{old}")
    assert dir(module)  # every new module imports
    with pytest.raises(AttributeError, match="moved to"):
        module.no_such_name


def test_old_train_path_keeps_what_it_re_exported():
    with pytest.warns(DeprecationWarning):
        train = _fresh("grokfast_metrics.train")
    from grokfast_metrics.experiment.config import TrainConfig
    from grokfast_metrics.experiment.trainer import resume

    assert train.TrainConfig is TrainConfig and train.resume is resume


def test_an_unknown_module_is_still_an_import_error():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("grokfast_metrics.no_such_module")


def test_importing_the_package_imports_no_torch():
    code = "import sys, grokfast_metrics as gm; gm.__version__; import grokfast_metrics._moved; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
