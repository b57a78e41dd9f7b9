"""Issue 20 items 1 and 3 and the drop-in defects: which path runs and why, position pruning, the split of models
fx could not trace, and the defects found on the way. Models: ``tests/models.py`` (shaped like the public codebases)."""
from __future__ import annotations

import pytest
from models import BUILDERS

from grokfast_metrics import dropin
from grokfast_metrics.core import last_run_info
from grokfast_metrics.dropin import Plan

pytestmark = pytest.mark.usefixtures("one_thread")


def _build(name, **kw):
    model, probe, args = BUILDERS[name](**kw)
    args = dict(args)
    return model, probe, args.pop("at"), args


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_plan_says_which_path_ran_and_why(name):
    model, probe, at, kw = _build(name)
    plan = Plan(model, probe, at, **kw)
    assert plan.path is None and "not built" in plan.reason
    plan.compute()
    info = last_run_info()
    assert plan.path in ("chain", "split", "hooks")
    assert info["path"] == plan.path and info["path_reason"] == plan.reason and len(plan.reason) > 20
    if plan.path == "hooks":
        assert "no fx split" in plan.reason


def test_forced_split_says_why_it_cannot_run():
    model, probe, at, kw = _build("mamay")
    with pytest.raises(ValueError, match="einops"):
        dropin.lmn_at(model, probe, at, path="split", **kw)


def test_openai_grok_tuple_blocks_split_instead_of_hooks():
    """openai/grok's forward branches on ``save_activations``/``pos`` and slices a mask buffer by the sequence
    length; its blocks return tuples. All of it traces now: the layers before ``at`` never re-run."""
    model, probe, at, kw = _build("grok")
    plan = Plan(model, probe, at, **kw)
    L = plan.connectivity()
    assert plan.path == "split", plan.reason
    ref = dropin.lmn_at(model, probe, at, backend="reference", **kw).connectivity.double()
    assert float((L.double() - ref).abs().max()) < 1e-5     # observed 1.4e-06
