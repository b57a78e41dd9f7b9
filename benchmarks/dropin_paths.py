"""µs per pair of ``lmn_at`` on models shaped like the public grokking codebases, before/after the pruning and the
untraceable-model split (docs/dropin.md, "How the rest of the model is run").

"before": the path each model took before (the hook path for danielmamay's and openai/grok's models, whose
forward fx could not trace; the unpruned fx split for Nanda's and Grokfast's); "after": what ``lmn_at`` runs
now (``plan.path``, pruned where the selected logits allow). Both in the same run, on the same machine.

    nice python benchmarks/dropin_paths.py --n 32 --threads 1

:func:`time_plan` is the function the ``bench --dropin`` section can call per model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

#: issue-sized models (d_model 128; Nanda d_mlp 512, p=113)
SIZES = {
    "nanda": dict(p=113, d_model=128, d_mlp=512),
    "grokfast": dict(p=97, dim=128),
    "mamay": dict(p=97, dim=128),
    "grok": dict(p=97, d_model=128),
    "omnigrok": dict(width=200),
}
#: the path each model took before the pruning and the untraceable-model split (None: the split, unpruned)
BEFORE = {"nanda": "split", "grokfast": "split", "mamay": "hooks", "grok": "hooks", "omnigrok": "chain"}


def time_plan(model, probe, at, *, prune: bool = True, path: str = "auto", repeats: int = 2, **kw) -> dict:
    """Best of ``repeats`` seconds for one ``L`` through a :class:`~grokfast_metrics.dropin.plan.Plan` (built and
    warmed first), and µs per pair. Returns ``{"path", "pruned", "reason", "seconds", "us_per_pair", "L"}``."""
    from grokfast_metrics.dropin.plan import Plan

    plan = Plan(model, probe, at, path=path, **kw)
    plan.prune = prune
    L = plan.connectivity(warn_affine=False)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        L = plan.connectivity(warn_affine=False)
        best = min(best, time.perf_counter() - t)
    n = plan.n
    return {
        "path": plan.path,
        "pruned": plan.pruned,
        "reason": plan.reason,
        "seconds": best,
        "us_per_pair": best * 1e6 / (n * (n - 1) / 2),
        "L": L,
    }


def main(argv=None) -> list[dict]:
    import models

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default=",".join(SIZES))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    for name in a.models.split(","):
        model, probe, kw = models.BUILDERS[name](n=a.n, **SIZES[name])
        kw = dict(kw)
        at = kw.pop("at")
        before = time_plan(model, probe, at, prune=False, path="auto" if BEFORE[name] != "hooks" else "hooks", **kw)
        after = time_plan(model, probe, at, **kw)
        diff = float((before["L"].double() - after["L"].double()).abs().max())
        rows.append(dict(model=name, before=before, after=after, diff=diff))
        print(
            f"{name:9s} before {before['path']:5s} {before['us_per_pair']:9.1f} us/pair | after {after['path']:5s}"
            f"{' pruned' if after['pruned'] else '       '} {after['us_per_pair']:9.1f} us/pair | "
            f"x{before['us_per_pair'] / after['us_per_pair']:.2f} | max|dL| {diff:.1e}",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
