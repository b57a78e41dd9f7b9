"""A run directory's files, written by the trainer and read by ``grokfast-metrics plot`` (no plotting here).

- ``metrics.jsonl`` / ``metrics.csv``: one row per logged step (:class:`MetricsLog`, :func:`read_metrics`);
- ``config.json`` / ``summary.json``: :func:`write_json`; the summary is built by :func:`summarize` and
  printed by :func:`format_summary`;
- ``connectivity/step_<step>_<layer>.pt``: connectivity snapshots (:func:`save_connectivity`,
  :func:`load_connectivity`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
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


class RunWriteError(OSError):
    """A run file could not be written (disk full, directory made read-only): ``str()`` is one line naming the
    file and the cause; ``errno`` is the system's. Nothing half-written is left looking whole: files are replaced
    atomically, and ``metrics.jsonl`` / ``metrics.csv`` keep whole rows only."""

    def __init__(self, path: str | Path, cause: OSError):
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.path = str(path)
        self.cause = cause

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.strerror or self.cause}"

    @classmethod
    def of(cls, path: str | Path, e: OSError) -> RunWriteError:
        """``e`` as a :class:`RunWriteError` naming ``path`` (one already naming its file is kept)."""
        return e if isinstance(e, RunWriteError) else cls(path, e)


def _write_fd(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (the one place run files' bytes are written; tests make it fail)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_atomic(path: str | Path, data: bytes, tmp: str | Path | None = None) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file beside it (``tmp``, default ``.<name>.tmp``), fsync,
    then ``os.replace``. On failure the temporary file is removed and ``path`` is left as it was.

    Raises:
        RunWriteError: the file could not be written (names ``path`` and the cause).
    """
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_fd(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise RunWriteError.of(path, e) from None
    return path


def torch_bytes(obj) -> bytes:
    """``torch.save(obj)`` into memory (written by :func:`write_atomic`: torch's own file writer reports a full disk
    as ``unexpected pos ...`` and leaves a partial file)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


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
        raise RunDirError(f"{d} already holds a run ({', '.join(found)}); pass --overwrite to replace it or --resume {d} to continue it")
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
    """Append-only ``metrics.jsonl`` + ``metrics.csv`` with periodic flushing; whole rows only on disk.

    Rows are encoded in memory and written at :meth:`flush` (every ``flush_s`` and on :meth:`close`). A write
    that fails (disk full, directory made read-only) truncates both files back to the rows of the last good
    flush, keeps :attr:`rows` equal to them and raises :class:`RunWriteError`; the log then takes no more rows.

    Args:
        run_dir: directory to write into (created by the caller).
        columns: CSV header.
        flush_s: flush at most this often (and always on :meth:`close`).
        rows: rows already logged (a resumed run): written again exactly as they were.

    Raises:
        RunWriteError: the files cannot be created or written.
    """

    def __init__(self, run_dir: Path, columns: list[str], flush_s: float = 1.0, rows: list[dict] | None = None):
        self.columns = columns
        self.flush_s = flush_s
        self.paths = (Path(run_dir) / "metrics.jsonl", Path(run_dir) / "metrics.csv")
        self._fds: list[int] = []
        for path in self.paths:
            try:
                self._fds.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
            except OSError as e:
                self._close_fds()
                raise RunWriteError.of(path, e) from None
        self._pending: tuple[list[bytes], list[bytes]] = ([], [self._csv_line(columns)])
        self._sizes = [0, 0]  # bytes of whole rows on disk
        self._on_disk = 0  # rows on disk
        self.failed: RunWriteError | None = None
        self._last_flush = time.perf_counter()
        self.rows: list[dict] = []
        for row in rows or ():
            self._write(row)
        self.flush()

    @staticmethod
    def _csv_line(values) -> bytes:
        buf = io.StringIO()
        csv.writer(buf).writerow(values)
        return buf.getvalue().encode("utf-8")

    @property
    def closed(self) -> bool:
        return not self._fds

    def write(self, row: dict) -> None:
        """Write one row (keys must be a subset of ``columns``; missing ones are null)."""
        self._write(row)
        now = time.perf_counter()
        if now - self._last_flush >= self.flush_s:
            self.flush()
            self._last_flush = now

    def _write(self, row: dict) -> None:
        if self.failed is not None:
            raise self.failed
        unknown = [k for k in row if k not in self.columns]
        if unknown:
            raise ValueError(f"row has columns not in the log: {unknown}")
        full = {c: row.get(c) for c in self.columns}
        jsonl = (json.dumps(full) + "\n").encode("utf-8")
        line = self._csv_line(["" if v is None else v for v in full.values()])
        self._pending[0].append(jsonl)
        self._pending[1].append(line)
        self.rows.append(full)  # last: a signal between these lines never leaves rows ahead of the files

    def flush(self) -> None:
        """Write the pending rows to both files; on failure both are truncated back to whole rows.

        Raises:
            RunWriteError: a file could not be written (also on every later call).
        """
        if self.failed is not None:
            raise self.failed
        if self.closed or not (self._pending[0] or self._pending[1]):
            return
        n_rows = len(self._pending[0])
        data = [b"".join(p) for p in self._pending]
        for k, (fd, path) in enumerate(zip(self._fds, self.paths)):
            try:
                _write_fd(fd, data[k])
            except OSError as e:
                for j in range(len(self._fds)):  # back to the last whole rows, in both files
                    with contextlib.suppress(OSError):
                        os.ftruncate(self._fds[j], self._sizes[j])
                        os.lseek(self._fds[j], self._sizes[j], os.SEEK_SET)
                del self.rows[self._on_disk :]
                self._pending[0].clear()
                self._pending[1].clear()
                self.failed = RunWriteError.of(path, e)
                raise self.failed from None
        self._sizes = [size + len(d) for size, d in zip(self._sizes, data)]
        self._on_disk += n_rows
        self._pending[0].clear()
        self._pending[1].clear()

    def _close_fds(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []

    def close(self) -> None:
        """Flush and close both files (a second call does nothing; the files are closed even if the flush fails)."""
        if self.closed:
            return
        try:
            if self.failed is None:
                self.flush()
        finally:
            self._close_fds()


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
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start, line_no = data.rfind(b"\n", 0, e.start) + 1, data.count(b"\n", 0, e.start) + 1
        raise RunLogError(
            f"{path}, line {line_no}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {e.start - line_start + 1}); the file is damaged"
        ) from None
    parts = text.replace("\r\n", "\n").split("\n")
    lines = [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
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
    except UnicodeDecodeError as e:
        raise RunLogError(f"{path}: not UTF-8 text (byte {e.start}); the file is damaged") from None
    if not isinstance(obj, dict):
        raise RunLogError(f"{path}: not a JSON object")
    return obj


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON with a final newline, atomically (:func:`write_atomic`).

    Raises:
        RunWriteError: the file could not be written (``path`` is left as it was).
    """
    write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


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


def summarize(
    rows: list[dict],
    cfg: TrainConfig,
    phases: dict,
    collapse: dict | None,
    timings: dict,
    interrupted: bool,
    steps_done: int,
    stop_reason: str | None = None,
) -> dict:
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
        why.append(
            f"from step {c['p1_fraction_step']} at least {c['p1_fraction_threshold']:.0%} of the training samples "
            f"have correct-class probability exactly 1 in {summary.get('dtype', 'the training dtype')}"
        )
    if c.get("loss_spike_step") is not None:
        why.append(f"at step {c['loss_spike_step']} the train loss spiked above {c['loss_spike_factor']:g}x its lowest value")
    before = summary.get("lmn_before_collapse")
    return (
        f"numerical collapse at step {c['step']}: " + "; ".join(why) + ". The final values (step "
        f"{summary.get('steps_done')}) come after it"
        + (f"; LMN before it: {before['lmn']:.2f} (step {before['step']})" if before else "")
        + ". Train in --dtype float64 (or with a larger --adam-eps) to avoid it."
    )


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
        (
            f"task {summary.get('task')}: {summary.get('steps_done')}/{summary.get('steps_planned')} steps"
            + (f"  [{summary['stop_reason']}]" if summary.get("stop_reason") else "  [interrupted]" if summary.get("interrupted") else "")
        ),
        f"  memorization step (train acc 100%):     {summary.get('memorization_step')}",
        f"  generalization step (test acc 100%):    {summary.get('generalization_step')}",
        f"  generalization step (test acc >= 99%):  {summary.get('generalization_step_99')}",
        f"  final accuracy train {pct(summary.get('final_train_acc'))}, test {pct(summary.get('final_test_acc'))}"
        f" (best test {pct(summary.get('best_test_acc'))}){after}",
        (
            f"  LMN ({summary.get('lmn_layer')}): init {lm('lmn_init')}, peak {lm('lmn_peak')}, "
            f"at memorization {lm('lmn_at_memorization')}, at generalization {lm('lmn_at_generalization')}, "
            f"final {lm('lmn_final')}{after}"
        ),
    ]
    if summary.get("numerical_collapse") is not None:
        lines.append("  WARNING: " + collapse_message(summary))
    lines.append(
        f"  time {t.get('total', 0):.1f} s (train {t.get('train', 0):.1f} s, LMN {t.get('lmn', 0):.1f} s "
        f"over {summary.get('lmn_evaluations')} evaluations, complexity/norms {t.get('complexity', 0):.1f} s, "
        f"logging {t.get('log', 0):.1f} s)"
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# connectivity snapshots


def save_connectivity(run_dir: str | Path, step: int, layer: str, L: torch.Tensor, lmn: float) -> Path:
    """Save ``L`` (``(N, N)``) of ``layer`` at ``step`` under ``run_dir/connectivity/``."""
    d = Path(run_dir) / SNAPSHOT_DIR
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunWriteError.of(d, e) from None
    path = d / f"step_{step:07d}_{layer.replace(':', '-to-')}.pt"
    data = torch_bytes({"step": int(step), "layer": layer, "lmn": float(lmn), "L": L.detach().to("cpu", torch.float32)})
    return write_atomic(path, data)


def load_snapshot(path: str | Path) -> dict:
    """One connectivity snapshot (``step``, ``layer``, ``lmn``, ``L``).

    Raises:
        RunLogError: not a snapshot (truncated, empty, random bytes, other contents): names the file.
    """
    path = Path(path)
    try:
        snap = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # torch.load raises what its readers raise: RuntimeError, EOFError, UnpicklingError, ...
        raise RunLogError(f"{path}: not a connectivity snapshot ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not (
        isinstance(snap, dict)
        and isinstance(snap.get("L"), torch.Tensor)
        and snap["L"].dim() == 2
        and isinstance(snap.get("step"), int)
        and isinstance(snap.get("layer"), str)
    ):
        raise RunLogError(f"{path}: not a connectivity snapshot (a dict with step, layer, lmn and a 2-D L)")
    return snap


def load_connectivity(run_dir: str | Path, layer: str | None = None, *, skip_damaged: bool = False) -> list[dict]:
    """Saved snapshots (dicts with ``step``, ``layer``, ``lmn``, ``L``), sorted by step; optionally one layer.

    Raises:
        RunLogError: a damaged snapshot (names it); with ``skip_damaged`` it is skipped with a warning instead.
    """
    d = Path(run_dir) / SNAPSHOT_DIR
    snaps = []
    for p in sorted(d.glob("step_*.pt")) if d.is_dir() else []:
        try:
            snaps.append(load_snapshot(p))
        except RunLogError as e:
            if not skip_damaged:
                raise
            warnings.warn(f"{e}; skipped", stacklevel=2)
    return sorted((s for s in snaps if layer is None or s["layer"] == layer), key=lambda s: s["step"])
