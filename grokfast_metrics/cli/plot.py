"""``grokfast-metrics plot RUN_DIR | SWEEP_DIR``: a run's figures (:mod:`grokfast_metrics.figures.run`), or a
sweep's outputs rewritten (:func:`grokfast_metrics.sweep.command.plot_sweep`)."""

from __future__ import annotations

import argparse
import sys
import warnings

from ..experiment.runlog import RunLogError, RunWriteError
from ..figures.run import make_figures
from ..sweep.command import plot_sweep
from ..sweep.manifest import is_sweep_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run",
        help="run directory written by 'grokfast-metrics train', or a sweep directory written by "
        "'grokfast-metrics sweep' (its sweep.csv, phase.png and lmn_predicts.png are rewritten)",
    )
    parser.add_argument("--out", default=None, help="where to write a run's figures (default: the run directory)")


def run(args: argparse.Namespace) -> int:
    if is_sweep_dir(args.run):
        if args.out is not None:
            print("grokfast-metrics plot: error: --out is for a run directory; a sweep's outputs stay in it", file=sys.stderr)
            return 2
        return plot_sweep(args.run)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = make_figures(args.run, args.out)
    except (FileNotFoundError, RunLogError, RunWriteError) as e:
        print(f"grokfast-metrics plot: error: {e}", file=sys.stderr)
        return 2
    for w in caught:  # one line each: a skipped snapshot, a damaged summary
        print(f"grokfast-metrics plot: warning: {w.message}", file=sys.stderr)
    for key in ("fig2", "fig3", "fig4"):
        print(f"{key}: {res[key] or 'skipped (nothing logged for it)'}")
    sc = res["scatter"]
    fmt = lambda v: "n/a" if v is None else f"{v:+.3f}"
    print(
        f"generalizing phase: {sc['phase_points']} points; Pearson r with test loss: "
        f"LMN {fmt(sc['pearson_lmn_test_loss'])}, L2 {fmt(sc['pearson_l2_test_loss'])}  ({sc['path']})"
    )
    return 0
