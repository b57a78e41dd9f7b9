"""A tracker (and its plan) measures the model as it is at each update, also after a module was
replaced, added or removed (``m[2] = nn.Linear(...)`` measured the old module before)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import grokfast_metrics as gm


class Net(nn.Module):
    """Not a plain Sequential: the tracker takes the traced (split) or hook path."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x):
        return self.head(self.body(x))


def _sequential():
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _replace_tail_layer(m):
    m[2] = nn.Linear(16, 16)


def _replace_at(m):
    m[1] = nn.Tanh()


def _append(m):
    m.append(nn.Tanh())
    m.append(nn.Linear(3, 3))


def _replace_head(m):
    m.head = nn.Sequential(nn.Linear(16, 8), nn.SiLU(), nn.Linear(8, 3))


@pytest.mark.parametrize(
    ("build", "at", "change"),
    [(_sequential, "1", _replace_tail_layer), (_sequential, "1", _replace_at), (_sequential, "1", _append), (Net, "body", _replace_head)],
    ids=["replace-tail-layer", "replace-at", "append", "split-path-replace-head"],
)
def test_tracker_measures_the_model_as_it_is_after_a_module_changed(build, at, change):
    torch.manual_seed(0)
    model, x = build(), torch.randn(32, 4)
    tracker = gm.LMNTracker(model, x, at=at, every=1)
    assert tracker.update(0) == gm.lmn_at(model, x, at=at).lmn
    change(model)
    fresh = gm.lmn_at(model, x, at=at).lmn
    assert tracker.update(1) == fresh  # bit-identical: the same computation on the same modules
    with torch.no_grad():  # and it keeps following the new module's weights
        for p in model.parameters():
            p.mul_(1.1)
    assert tracker.update(2) == gm.lmn_at(model, x, at=at).lmn != fresh
