"""A sweep directory: ``sweep.json`` (axes, window and every planned run) and what ``grokfast-metrics plot`` reads back.

``sweep`` writes ``sweep.json`` before its runs start and again with the predictor statistics at the end;
:func:`load_sweep` rebuilds the runs from it (or, for a directory without the list, from the run directories'
``config.json``) and :func:`run_status` reads each run's state from its directory, so the outputs can be
(re)written from the directory alone.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..experiment.config import TrainConfig
from ..experiment.runlog import RunLogError, read_json, write_atomic
from .engines import ERROR_FILE, is_finished
from .grid import Run

#: the sweep's own file in its directory
MANIFEST = "sweep.json"


def is_sweep_dir(path: str | Path) -> bool:
    """True when ``path`` is a sweep directory (it holds ``sweep.json``)."""
    return (Path(path) / MANIFEST).is_file()


def write_manifest(out: Path, axes: list[str], runs: list[Run], window: int, lmn_predicts: dict | None = None) -> Path:
    """Write ``sweep.json``: the grid axes, the predictor window, every run (name, grid values, seed, config)."""
    manifest = {
        "axes": axes,
        "window": window,
        "lmn_predicts": lmn_predicts,
        "runs": [{"run": r.name, "values": dict(r.values), "seed": r.seed, "config": r.config_dict()} for r in runs],
    }
    return write_atomic(Path(out) / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))


def load_sweep(out: str | Path) -> tuple[list[str], list[Run], int]:
    """``(axes, runs, window)`` of the sweep in ``out``, runs in grid order.

    Raises:
        FileNotFoundError: no ``sweep.json`` in ``out``.
        RunLogError: ``sweep.json`` or a run's ``config.json`` is damaged.
    """
    out = Path(out)
    manifest = read_json(out / MANIFEST)
    axes = list(manifest.get("axes") or [])
    try:
        if "runs" in manifest:
            runs = [
                Run(tuple((a, r["values"][a]) for a in axes), r["seed"], TrainConfig(**r["config"]), out / r["run"])
                for r in manifest["runs"]
            ]
        else:  # written before the run list was kept: the run directories' own configurations
            runs = sorted(
                (_from_run_dir(d, axes) for d in out.iterdir() if (d / "config.json").is_file()),
                key=lambda r: (*(v for _, v in r.values), r.seed),
            )
    except (KeyError, TypeError) as e:
        raise RunLogError(f"{out / MANIFEST}: not a sweep manifest ({type(e).__name__}: {e})") from None
    window = manifest.get("window") or max(1, (runs[0].config.steps if runs else 10) // 10)
    return axes, runs, int(window)


def _from_run_dir(run_dir: Path, axes: list[str]) -> Run:
    config = read_json(run_dir / "config.json")["config"]
    return Run(tuple((a, config[a]) for a in axes), config["seed"], TrainConfig(**config), run_dir)


def run_status(run_dir: str | Path) -> dict:
    """A run's result as its directory shows it: done, failed (with the error), interrupted or not run."""
    d = Path(run_dir)
    if is_finished(d):
        return {"status": "done"}
    if (d / ERROR_FILE).is_file():
        lines = [line for line in (d / ERROR_FILE).read_text(encoding="utf-8").splitlines() if line.strip()]
        return {"status": "failed", "error": lines[-1] if lines else "failed"}
    return {"status": "interrupted" if (d / "summary.json").is_file() else "not run"}
