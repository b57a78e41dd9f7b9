"""One ``sweep.csv`` row per run, and the outcome of a run (definitions in ``docs/sweeps.md``)."""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

from ..experiment.runlog import RunLogError, lmn_at_step, read_json, read_metrics, write_atomic
from .grid import Run

#: outcomes in the Omnigrok phase-diagram sense, in the order the phase diagram colours them
OUTCOMES = ("comprehension", "grokking", "memorization", "confusion")
#: a run that generalizes more than GROK_RATIO times later than it memorizes groks; earlier is comprehension
GROK_RATIO = 2.0


def classify(memorization_step: int | None, generalization_step: int | None) -> str:
    """The outcome of a run from its two phase steps.

    - confusion: never fits the training set (no memorization step);
    - memorization: fits it but never generalizes;
    - grokking: generalizes later than ``GROK_RATIO`` times its memorization step (and later than it);
    - comprehension: generalizes no later than that.
    """
    if memorization_step is None:
        return "confusion"
    if generalization_step is None:
        return "memorization"
    if generalization_step > max(GROK_RATIO * memorization_step, memorization_step):
        return "grokking"
    return "comprehension"


def _value(entry) -> float | None:
    return None if entry is None else entry.get("lmn")


def _l2_at(rows: list[dict], step: int | None) -> float | None:
    hit = lmn_at_step(rows, step, column="l2") if step is not None else None
    return None if hit is None else hit[1]


def _collapse(summary: dict) -> tuple[bool, int | None]:
    """``(collapsed, step)`` from the trainer's ``numerical_collapse`` record."""
    c = summary.get("numerical_collapse")
    return (True, c.get("step")) if isinstance(c, dict) else (False, None)


def run_row(run: Run, result: dict) -> dict:
    """The ``sweep.csv`` row of ``run``: grid values, seed, status, phase steps, accuracies, LMN and L2, wall time."""
    row = {
        **dict(run.values),
        "seed": run.seed,
        "run": run.name,
        "run_dir": str(run.run_dir),
        "status": result.get("status"),
        "error": result.get("error", ""),
    }
    path = Path(run.run_dir) / "summary.json"
    if not path.is_file():
        return row
    try:
        s = read_json(path)
        rows = read_metrics(run.run_dir) if (Path(run.run_dir) / "metrics.jsonl").is_file() else []
    except (RunLogError, OSError) as e:  # one damaged run does not stop the sweep's outputs: it is named and left out
        warnings.warn(f"run {run.name} left out: {e}", stacklevel=2)
        return {**row, "status": "damaged", "error": str(e)}
    mem, gen = s.get("memorization_step"), s.get("generalization_step")
    peak, end = s.get("lmn_peak"), s.get("lmn_final")
    collapsed, collapse_step = _collapse(s)
    row.update(
        {
            "outcome": classify(mem, gen),
            "memorization_step": mem,
            "generalization_step": gen,
            "generalization_delay": None if mem is None or gen is None else gen - mem,
            "final_train_acc": s.get("final_train_acc"),
            "final_test_acc": s.get("final_test_acc"),
            "lmn_init": _value(s.get("lmn_init")),
            "lmn_peak": _value(peak),
            "lmn_memorization": _value(s.get("lmn_at_memorization")),
            "lmn_generalization": _value(s.get("lmn_at_generalization")),
            "lmn_end": _value(end),
            "collapse": collapsed,
            "collapse_step": collapse_step,
            "l2_init": _l2_at(rows, 0),
            "l2_peak": _l2_at(rows, None if peak is None else peak["step"]),
            "l2_memorization": _l2_at(rows, mem),
            "l2_generalization": _l2_at(rows, gen),
            "l2_end": rows[-1].get("l2") if rows else None,
            "wall_s": (s.get("timings_s") or {}).get("total"),
        }
    )
    return row


def sweep_rows(runs: list[Run], results: dict[str, dict]) -> list[dict]:
    """:func:`run_row` for every run, in grid order (runs without a result count as ``not run``)."""
    return [run_row(r, results.get(r.name, {"status": "not run"})) for r in runs]


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """Write ``rows`` to ``path`` with the union of their columns (grid axes first), atomically.

    Raises:
        RunWriteError: ``path`` could not be written (it is left as it was).
    """
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    for row in rows:
        w.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
    return write_atomic(Path(path), buf.getvalue().encode("utf-8"))  # a full disk leaves the old sweep.csv whole


def lmn_drop_feature(run_dir: str | Path, memorization_step: int | None, window: int) -> tuple[float, int] | None:
    """Relative LMN drop from memorization to ``window`` steps later, and the step it is read at.

    Available before generalization whenever the run generalizes later than that step, so it can be
    used to predict grokking without a test set. ``None`` when a reading is missing.
    """
    if memorization_step is None:
        return None
    rows = read_metrics(run_dir)
    start = lmn_at_step(rows, memorization_step)
    later = lmn_at_step(rows, memorization_step + window)
    if start is None or later is None or start[1] == 0:
        return None
    return (start[1] - later[1]) / start[1], later[0]
