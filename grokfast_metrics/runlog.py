"""A run directory's files, written by the trainer and read by ``grokfast-metrics plot`` (no plotting here).

- ``metrics.jsonl`` / ``metrics.csv``: one row per logged step (:class:`MetricsLog`, :func:`read_metrics`);
- ``config.json`` / ``summary.json``: :func:`write_json`; the summary is built by :func:`summarize` and
  printed by :func:`format_summary`;
- ``connectivity/step_<step>_<layer>.pt``: connectivity snapshots (:func:`save_connectivity`,
  :func:`load_connectivity`).
"""
from __future__ import annotations

import csv
import json
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import TrainConfig

SNAPSHOT_DIR = "connectivity"
#: the files a run writes into its directory (``grokfast-metrics plot`` adds :data:`FIGURE_FILES`)
RUN_FILES = ("config.json", "metrics.jsonl", "metrics.csv", "summary.json", "curves.png", "checkpoint.pt", "checkpoint.tmp")
FIGURE_FILES = ("fig2_curves.png", "fig3_layers.png", "fig4_connectivity.png", "scatter_test_loss.png", "figures.json")


class RunDirError(ValueError):
    """The run directory already holds a run (refused without ``--overwrite`` / ``--resume``)."""


class RunLogError(ValueError):
    """A run file is damaged; the message names the file and the line."""


def existing_run_files(run_dir: str | Path) -> list[str]:
    """Names of the run files (and the ``connectivity/`` snapshots) already in ``run_dir``."""
    d = Path(run_dir)
    found = [name for name in (*RUN_FILES, *FIGURE_FILES) if (d / name).exists()]
    if any((d / SNAPSHOT_DIR).glob("step_*.pt")):
        found.append(f"{SNAPSHOT_DIR}/")
    return found


def prepare_run_dir(run_dir: str | Path, overwrite: bool = False) -> None:
    """Create ``run_dir``; refuse one that holds a run unless ``overwrite``, which removes that run's files first.

    Only the files a run writes are removed (:data:`RUN_FILES`, :data:`FIGURE_FILES`, ``connectivity/step_*.pt``);
    anything else in the directory is left alone. A run directory is therefore never a mix of two runs.

    Raises:
        RunDirError: ``run_dir`` holds a run and ``overwrite`` is False.
    """
    d = Path(run_dir)
    found = existing_run_files(d)
    if found and not overwrite:
        raise RunDirError(f"{d} already holds a run ({', '.join(found)}); pass --overwrite to replace it or "
                          f"--resume {d} to continue it")
    for name in (*RUN_FILES, *FIGURE_FILES):
        (d / name).unlink(missing_ok=True)
    snaps = d / SNAPSHOT_DIR
    if snaps.is_dir():
        for p in snaps.glob("step_*.pt"):
            p.unlink()
    d.mkdir(parents=True, exist_ok=True)


def drop_snapshots_after(run_dir: str | Path, step: int) -> None:
    """Remove the connectivity snapshots of steps after ``step`` (a resumed run writes them again)."""
    for p in (Path(run_dir) / SNAPSHOT_DIR).glob("step_*.pt"):
        if int(p.name.split("_")[1]) > step:
            p.unlink()


# ------------------------------------------------------------------------------------------
# metrics.jsonl / metrics.csv


class MetricsLog:
    """Append-only ``metrics.jsonl`` + ``metrics.csv`` with periodic flushing.

    Args:
        run_dir: directory to write into (created by the caller).
        columns: CSV header.
        flush_s: flush at most this often (and always on :meth:`close`).
    """

    def __init__(self, run_dir: Path, columns: list[str], flush_s: float = 1.0, rows: list[dict] | None = None):
        self.columns = columns
        self.flush_s = flush_s
        self._jsonl = open(run_dir / "metrics.jsonl", "w", encoding="utf-8")
        self._csv_file = open(run_dir / "metrics.csv", "w", encoding="utf-8", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=columns, extrasaction="raise")
        self._csv.writeheader()
        self._last_flush = time.perf_counter()
        self.rows: list[dict] = []
        for row in rows or ():  # a resumed run: its rows so far, written again exactly as they were
            self._write(row)
        self.flush()

    def write(self, row: dict) -> None:
        """Write one row (keys must be a subset of ``columns``; missing ones are null)."""
        self._write(row)
        now = time.perf_counter()
        if now - self._last_flush >= self.flush_s:
            self.flush()
            self._last_flush = now

    def _write(self, row: dict) -> None:
        full = {c: row.get(c) for c in self.columns}
        self._jsonl.write(json.dumps(full) + "\n")
        self._csv.writerow({c: ("" if v is None else v) for c, v in full.items()})
        self.rows.append(full)  # last: a signal between these lines never leaves rows ahead of the files

    def flush(self) -> None:
        """Flush both files."""
        self._jsonl.flush()
        self._csv_file.flush()

    def close(self) -> None:
        """Flush and close both files (a second call does nothing)."""
        if not self._jsonl.closed:
            self.flush()
            self._jsonl.close()
            self._csv_file.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Rows of ``run_dir/metrics.jsonl``.

    A truncated last line (no final newline: the process died while writing it) is skipped with a
    warning; any other bad line is an error that names the file and the line.

    Raises:
        FileNotFoundError: no ``metrics.jsonl`` in ``run_dir``.
        RunLogError: a line that is not a JSON object with an integer ``step``, or steps not increasing.
    """
    path = Path(run_dir) / "metrics.jsonl"
    rows: list[dict] = []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) and not line.endswith("\n"):
                warnings.warn(f"{path}, line {i}: truncated last line skipped ({e.msg})", stacklevel=2)
                break
            raise RunLogError(f"{path}, line {i}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise RunLogError(f"{path}, line {i}: not a metrics row (a JSON object with an integer 'step')")
        if rows and row["step"] <= rows[-1]["step"]:
            raise RunLogError(f"{path}, line {i}: step {row['step']} does not follow step {rows[-1]['step']}")
        rows.append(row)
    return rows


def read_json(path: str | Path) -> dict:
    """A JSON object file (``summary.json``, ``config.json``).

    Raises:
        FileNotFoundError: no such file.
        RunLogError: not valid JSON (names the file and the line).
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RunLogError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise RunLogError(f"{path}: not a JSON object")
    return obj


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON with a final newline."""
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------
# summary.json


def lmn_at_step(rows: list[dict], step: int | None, column: str = "lmn") -> tuple[int, float] | None:
    """``(step, value)`` of the first row at or after ``step`` whose ``column`` was computed.

    (Not :func:`grokfast_metrics.lmn_at`, which computes LMN at a layer of a model.)
    """
    if step is None:
        return None
    for r in rows:
        if r["step"] >= step and r.get(column) is not None:
            return r["step"], r[column]
    return None


def summarize(rows: list[dict], cfg: TrainConfig, phases: dict, collapse: dict | None, timings: dict, interrupted: bool,
              steps_done: int, stop_reason: str | None = None) -> dict:
    """Summary dict: key steps, LMN at init / peak / phase steps / end, numerical collapse, timings.

    Args:
        phases: ``{"memorization": step, "generalization": step, "generalization_99": step}`` (``None``: not reached).
        collapse: the numerical-collapse event (``Collapse.summary()``) or ``None``.
        stop_reason: why the run stopped early (``None``: it completed).
    """
    tracked = [r for r in rows if r.get("lmn") is not None]
    peak = max(tracked, key=lambda r: r["lmn"]) if tracked else None
    last = rows[-1] if rows else {}
    collapse_step = None if collapse is None else collapse["step"]

    def at(step):
        hit = lmn_at_step(rows, step)
        return None if hit is None else {"step": hit[0], "lmn": hit[1]}

    final = None if not tracked else {"step": tracked[-1]["step"], "lmn": tracked[-1]["lmn"]}
    if final is not None:
        final["after_collapse"] = collapse_step is not None and final["step"] >= collapse_step
    return {
        "task": cfg.task,
        "dtype": cfg.dtype,
        "steps_done": steps_done,
        "steps_planned": cfg.steps,
        "interrupted": interrupted,
        "stop_reason": stop_reason,
        "memorization_step": phases.get("memorization"),
        "generalization_step": phases.get("generalization"),
        "generalization_step_99": phases.get("generalization_99"),
        "best_test_acc": max((r["test_acc"] for r in rows if r.get("test_acc") is not None), default=None),
        "numerical_collapse": collapse,
        "final_after_collapse": collapse_step is not None and steps_done >= collapse_step,
        "final_train_acc": last.get("train_acc"),
        "final_test_acc": last.get("test_acc"),
        "final_l2": last.get("l2"),
        "lmn_layer": cfg.lmn_layers[0],
        "lmn_probe": cfg.probe,
        "lmn_init": at(0),
        "lmn_peak": None if peak is None else {"step": peak["step"], "lmn": peak["lmn"]},
        "lmn_at_memorization": at(phases.get("memorization")),
        "lmn_at_generalization": at(phases.get("generalization")),
        "lmn_at_generalization_99": at(phases.get("generalization_99")),
        "lmn_before_collapse": None if collapse_step is None else _last_before(tracked, collapse_step),
        "lmn_final": final,
        "lmn_evaluations": len(tracked),
        "timings_s": timings,
    }


def _last_before(tracked: list[dict], step: int) -> dict | None:
    before = [r for r in tracked if r["step"] < step]
    return None if not before else {"step": before[-1]["step"], "lmn": before[-1]["lmn"]}


def collapse_message(summary: dict) -> str:
    """The end-of-run warning for a numerical collapse (``summary["numerical_collapse"]`` set)."""
    c = summary["numerical_collapse"]
    why = []
    if c.get("p1_fraction_step") is not None:
        why.append(f"from step {c['p1_fraction_step']} at least {c['p1_fraction_threshold']:.0%} of the training samples "
                   f"have correct-class probability exactly 1 in {summary.get('dtype', 'the training dtype')}")
    if c.get("loss_spike_step") is not None:
        why.append(f"at step {c['loss_spike_step']} the train loss spiked above {c['loss_spike_factor']:g}x its lowest value")
    before = summary.get("lmn_before_collapse")
    return (f"numerical collapse at step {c['step']}: " + "; ".join(why) + ". The final values (step "
            f"{summary.get('steps_done')}) come after it" + (f"; LMN before it: {before['lmn']:.2f} (step {before['step']})"
                                                             if before else "")
            + ". Train in --dtype float64 (or with a larger --adam-eps) to avoid it.")


def format_summary(summary: dict) -> str:
    """Human-readable multi-line summary of :func:`summarize`'s dict."""

    def lm(key):
        v = summary.get(key)
        return "-" if v is None else f"{v['lmn']:.2f} (step {v['step']})"

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    t = summary.get("timings_s", {})
    after = "  [after the numerical collapse]" if summary.get("final_after_collapse") else ""
    lines = [
        (f"task {summary.get('task')}: {summary.get('steps_done')}/{summary.get('steps_planned')} steps"
         + (f"  [{summary['stop_reason']}]" if summary.get("stop_reason") else
            "  [interrupted]" if summary.get("interrupted") else "")),
        f"  memorization step (train acc 100%):     {summary.get('memorization_step')}",
        f"  generalization step (test acc 100%):    {summary.get('generalization_step')}",
        f"  generalization step (test acc >= 99%):  {summary.get('generalization_step_99')}",
        f"  final accuracy train {pct(summary.get('final_train_acc'))}, test {pct(summary.get('final_test_acc'))}"
        f" (best test {pct(summary.get('best_test_acc'))}){after}",
        (f"  LMN ({summary.get('lmn_layer')}): init {lm('lmn_init')}, peak {lm('lmn_peak')}, "
         f"at memorization {lm('lmn_at_memorization')}, at generalization {lm('lmn_at_generalization')}, "
         f"final {lm('lmn_final')}{after}"),
    ]
    if summary.get("numerical_collapse") is not None:
        lines.append("  WARNING: " + collapse_message(summary))
    lines.append(
        f"  time {t.get('total', 0):.1f} s (train {t.get('train', 0):.1f} s, LMN {t.get('lmn', 0):.1f} s "
        f"over {summary.get('lmn_evaluations')} evaluations, complexity/norms {t.get('complexity', 0):.1f} s, "
        f"logging {t.get('log', 0):.1f} s)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# connectivity snapshots


def save_connectivity(run_dir: str | Path, step: int, layer: str, L: torch.Tensor, lmn: float) -> Path:
    """Save ``L`` (``(N, N)``) of ``layer`` at ``step`` under ``run_dir/connectivity/``."""
    d = Path(run_dir) / SNAPSHOT_DIR
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step_{step:07d}_{layer.replace(':', '-to-')}.pt"
    torch.save({"step": int(step), "layer": layer, "lmn": float(lmn), "L": L.detach().to("cpu", torch.float32)}, path)
    return path


def load_connectivity(run_dir: str | Path, layer: str | None = None) -> list[dict]:
    """Saved snapshots (dicts with ``step``, ``layer``, ``lmn``, ``L``), sorted by step; optionally one layer."""
    d = Path(run_dir) / SNAPSHOT_DIR
    snaps = [torch.load(p, weights_only=True) for p in sorted(d.glob("step_*.pt"))] if d.is_dir() else []
    return sorted((s for s in snaps if layer is None or s["layer"] == layer), key=lambda s: s["step"])
