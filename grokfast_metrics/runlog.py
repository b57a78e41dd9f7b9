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
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import TrainConfig

SNAPSHOT_DIR = "connectivity"


# ------------------------------------------------------------------------------------------
# metrics.jsonl / metrics.csv


class MetricsLog:
    """Append-only ``metrics.jsonl`` + ``metrics.csv`` with periodic flushing.

    Args:
        run_dir: directory to write into (created by the caller).
        columns: CSV header.
        flush_s: flush at most this often (and always on :meth:`close`).
    """

    def __init__(self, run_dir: Path, columns: list[str], flush_s: float = 1.0):
        self.columns = columns
        self.flush_s = flush_s
        self._jsonl = open(run_dir / "metrics.jsonl", "w", encoding="utf-8")
        self._csv_file = open(run_dir / "metrics.csv", "w", encoding="utf-8", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=columns, extrasaction="raise")
        self._csv.writeheader()
        self._last_flush = time.perf_counter()
        self.rows: list[dict] = []

    def write(self, row: dict) -> None:
        """Write one row (keys must be a subset of ``columns``; missing ones are null)."""
        full = {c: row.get(c) for c in self.columns}
        self.rows.append(full)
        self._jsonl.write(json.dumps(full) + "\n")
        self._csv.writerow({c: ("" if v is None else v) for c, v in full.items()})
        now = time.perf_counter()
        if now - self._last_flush >= self.flush_s:
            self.flush()
            self._last_flush = now

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
    """Rows of ``run_dir/metrics.jsonl`` (skips a truncated last line, e.g. after a crash).

    Raises:
        FileNotFoundError: no ``metrics.jsonl`` in ``run_dir``.
    """
    rows = []
    with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


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


def summarize(rows: list[dict], cfg: TrainConfig, memorization_step: int | None, generalization_step: int | None,
              timings: dict, interrupted: bool, steps_done: int) -> dict:
    """Summary dict: key steps, LMN at init / peak / memorization / generalization / end, timings."""
    tracked = [r for r in rows if r.get("lmn") is not None]
    peak = max(tracked, key=lambda r: r["lmn"]) if tracked else None
    last = rows[-1] if rows else {}

    def at(step):
        hit = lmn_at_step(rows, step)
        return None if hit is None else {"step": hit[0], "lmn": hit[1]}

    return {
        "task": cfg.task,
        "steps_done": steps_done,
        "steps_planned": cfg.steps,
        "interrupted": interrupted,
        "memorization_step": memorization_step,
        "generalization_step": generalization_step,
        "final_train_acc": last.get("train_acc"),
        "final_test_acc": last.get("test_acc"),
        "final_l2": last.get("l2"),
        "lmn_layer": cfg.lmn_layers[0],
        "lmn_probe": cfg.probe,
        "lmn_init": at(0),
        "lmn_peak": None if peak is None else {"step": peak["step"], "lmn": peak["lmn"]},
        "lmn_at_memorization": at(memorization_step),
        "lmn_at_generalization": at(generalization_step),
        "lmn_final": None if not tracked else {"step": tracked[-1]["step"], "lmn": tracked[-1]["lmn"]},
        "lmn_evaluations": len(tracked),
        "timings_s": timings,
    }


def format_summary(summary: dict) -> str:
    """Human-readable multi-line summary of :func:`summarize`'s dict."""

    def lm(key):
        v = summary.get(key)
        return "-" if v is None else f"{v['lmn']:.2f} (step {v['step']})"

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    t = summary.get("timings_s", {})
    lines = [
        (f"task {summary.get('task')}: {summary.get('steps_done')}/{summary.get('steps_planned')} steps"
         + ("  [interrupted]" if summary.get("interrupted") else "")),
        f"  memorization step (train acc 100%):   {summary.get('memorization_step')}",
        f"  generalization step (test acc >= 99%): {summary.get('generalization_step')}",
        f"  final accuracy train {pct(summary.get('final_train_acc'))}, test {pct(summary.get('final_test_acc'))}",
        (f"  LMN ({summary.get('lmn_layer')}): init {lm('lmn_init')}, peak {lm('lmn_peak')}, "
         f"at memorization {lm('lmn_at_memorization')}, at generalization {lm('lmn_at_generalization')}, "
         f"final {lm('lmn_final')}"),
        (f"  time {t.get('total', 0):.1f} s (train {t.get('train', 0):.1f} s, LMN {t.get('lmn', 0):.1f} s "
         f"over {summary.get('lmn_evaluations')} evaluations, complexity/norms {t.get('complexity', 0):.1f} s, "
         f"logging {t.get('log', 0):.1f} s)"),
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# connectivity snapshots


def save_connectivity(run_dir: str | Path, step: int, layer: str, L: torch.Tensor, lmn: float) -> Path:
    """Save ``L`` (``(N, N)``) of ``layer`` at ``step`` under ``run_dir/connectivity/``."""
    d = Path(run_dir) / SNAPSHOT_DIR
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step_{step:07d}_{layer}.pt"
    torch.save({"step": int(step), "layer": layer, "lmn": float(lmn), "L": L.detach().to("cpu", torch.float32)}, path)
    return path


def load_connectivity(run_dir: str | Path, layer: str | None = None) -> list[dict]:
    """Saved snapshots (dicts with ``step``, ``layer``, ``lmn``, ``L``), sorted by step; optionally one layer."""
    d = Path(run_dir) / SNAPSHOT_DIR
    snaps = [torch.load(p, weights_only=True) for p in sorted(d.glob("step_*.pt"))] if d.is_dir() else []
    return sorted((s for s in snaps if layer is None or s["layer"] == layer), key=lambda s: s["step"])
