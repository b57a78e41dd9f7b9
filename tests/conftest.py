"""Shared fixtures and the hypothesis profiles.

The tests mirror the package's layers: ``tests/<layer>/`` (foundation, kernels, lmn, dropin, tracking, experiment,
sweep, figures, bench, cli) and ``tests/project/`` (README, environment, examples, what a new user meets). The shared
helpers are in ``tests/support/`` (on ``sys.path`` through pytest.ini's ``pythonpath``): ``helpers``, ``models``,
``regimes``, and ``contract`` (the accuracy contract's one table and the one backend tester).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# No example database: a failing draw saved on one machine must not be replayed on every later run.
# In CI (``CI`` set) the draws are derandomized, so every CI run tests the same examples.
settings.register_profile("dev", database=None)
settings.register_profile("ci", database=None, derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is ~10x faster than two on a shared, loaded CPU; restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
