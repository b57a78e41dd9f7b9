"""The numbers README.md and docs/training.md quote about a training run, computed from its run directory.

    python docs/quoted_numbers.py RUN_DIR [--write docs/numbers_add_default.json]

prints (or writes) them as JSON, each already formatted as the docs write it. ``docs/numbers_add_default.json``
is this script's output on the run of the README's command (``grokfast-metrics train --task add``, seed 0,
20,000 steps; the machine and date are in the file). ``tests/project/test_new_user.py`` runs this script on a short real
run (the numbers must come from the run's own files) and checks that README.md and docs/training.md quote every
number of the JSON file as written there. A 20,000-step run is not repeated by the tests: to refresh the numbers
after a change that moves them, rerun the command, then this script with ``--write``, then fix the docs until
the test passes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grokfast_metrics.experiment.runlog import read_json, read_metrics
from grokfast_metrics.figures.run import generalizing_phase, pearson


def _int(v: int | None) -> str | None:
    return None if v is None else f"{v:,}"


def _lmn(v: float | None) -> str | None:
    return None if v is None else f"{v:.2f}"


def quoted(run_dir: str | Path) -> dict:
    """The quoted numbers of the run in ``run_dir``: phase steps, LMN at the key steps and over steps 10,000-20,000,
    and the Pearson r of LMN and of the L2 norm with the test loss over the generalizing phase, formatted."""
    run_dir = Path(run_dir)
    summary = read_json(run_dir / "summary.json")
    rows = read_metrics(run_dir)
    tracked = [r for r in rows if r.get("lmn") is not None]
    late = [r["lmn"] for r in tracked if 10_000 <= r["step"] <= 20_000]
    phase = generalizing_phase(rows, summary)
    loss = [r["test_loss"] for r in phase]

    def at(key: str) -> str | None:
        v = summary.get(key)
        return None if v is None else _lmn(v["lmn"])

    r_lmn, r_l2 = pearson([r["lmn"] for r in phase], loss), pearson([r["l2"] for r in phase], loss)
    return {
        "memorization_step": _int(summary["memorization_step"]),
        "generalization_step": _int(summary["generalization_step"]),
        "generalization_step_99": _int(summary["generalization_step_99"]),
        "lmn_init": at("lmn_init"),
        "lmn_at_memorization": at("lmn_at_memorization"),
        "lmn_peak": at("lmn_peak"),
        "lmn_peak_step": _int((summary.get("lmn_peak") or {}).get("step")),
        "lmn_at_generalization": at("lmn_at_generalization"),
        "lmn_10k_20k": None if not late else f"{_lmn(min(late))}-{_lmn(max(late))}",
        "lmn_final": at("lmn_final"),
        "pearson_lmn_test_loss": None if r_lmn is None else f"{r_lmn:.3f}",
        "pearson_l2_test_loss": None if r_l2 is None else f"{r_l2:.3f}",
        "generalizing_phase_points": len(phase),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--write", default=None, help="write the JSON here (with the run's machine and date) instead of printing it")
    p.add_argument("--source", default=None, help="where the run came from, in words (recorded with --write)")
    args = p.parse_args(argv)
    numbers = quoted(args.run_dir)
    if args.write is None:
        print(json.dumps(numbers, indent=1))
        return 0
    config = read_json(Path(args.run_dir) / "config.json")
    record = {
        "source": args.source,
        "command": " ".join(["grokfast-metrics", *config.get("argv", [])[1:]]),
        "torch": config.get("torch"),
        "device_name": config.get("device_name"),
        "numbers": numbers,
    }
    Path(args.write).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
