"""``grokfast-metrics bench --sweep-throughput``: runs per hour of one sweep grid trained three ways in the same run.

The grid is the README's phase diagram, ``init_scale`` x ``weight_decay`` (4 x 4 = 16 runs; ``--quick``: 2 x 2), on
addition mod 31 for ``steps`` steps with LMN every 100 steps on 128 probe inputs (the trainer's early log-spaced
LMN steps included), compression complexity off and no plots. The same runs are trained

- ``sequential``: one :func:`grokfast_metrics.experiment.trainer.train` call after the other in this process (a shell loop
  around ``grokfast-metrics train`` without the process starts);
- ``local``: ``sweep --engine local`` with ``workers`` processes;
- ``batched``: ``sweep --batched`` with ``workers`` processes, each training one stack of models;
- ``batched-1``: ``sweep --batched --workers 1``: all runs in one stack in one process (the stacking gain alone,
  beside ``sequential``'s one process).

Each mode is timed wall-clock from the first run's start to the last run's end, in a fresh directory, and by the CPU
seconds it used (this process and its finished worker processes, ``getrusage``): on a machine shared with other jobs
the wall time depends on the load, CPU seconds per run much less. The rows also give the share of the time spent
on LMN (the trainer's own timers) and, for the two sweep modes, how many
runs reach the same memorization and generalization steps as the sequential ones.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from ..experiment.config import TrainConfig
from ..sweep.engines import run_sweep
from ..sweep.grid import Run, plan_runs

#: the grid of the benchmark (the README's phase diagram); ``--quick`` takes the first two values of each axis
GRID = (("init_scale", (0.5, 1.0, 2.0, 4.0)), ("weight_decay", (0.05, 0.2, 0.5, 1.0)))
#: mode -> (processes, batched); ``None``: ``workers`` processes (``sequential`` runs in this process)
MODES = {"sequential": (1, False), "batched-1": (1, True), "local": (None, False), "batched": (None, True)}


def plan(out: Path, steps: int, quick: bool, device: torch.device) -> list[Run]:
    """The benchmark's runs in ``out`` (LMN every 100 steps on 128 inputs, no complexity, one seed)."""
    base = TrainConfig(task="add", steps=steps, lmn_every=100, probe=128, complexity="off", device=str(device))
    axes = [(name, list(values[:2] if quick else values)) for name, values in GRID]
    return plan_runs(base, axes, [0], out)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its waited-for children."""
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def _time_mode(mode: str, runs: list[Run], workers: int) -> tuple[float, float]:
    """Wall and CPU seconds of training ``runs`` in ``mode``."""
    from ..experiment.trainer import train

    t0, c0 = time.perf_counter(), _cpu_seconds()
    if mode == "sequential":
        for r in runs:
            train(r.config, r.run_dir, progress=False, plot=False)
    else:
        processes, batched = MODES[mode]
        results = run_sweep(runs, "local", processes or workers, plot=False, batched=batched, notes=lambda m: None)
        failed = [name for name, res in results.items() if res["status"] != "done"]
        if failed:
            raise RuntimeError(f"sweep-throughput: {mode}: runs did not finish: {failed}")
    return time.perf_counter() - t0, _cpu_seconds() - c0


def _summaries(runs: list[Run]) -> dict[str, dict]:
    return {r.name: json.loads((Path(r.run_dir) / "summary.json").read_text(encoding="utf-8")) for r in runs}


def _lmn_share(summaries: dict[str, dict], mode: str) -> float:
    """LMN seconds / training-loop seconds from the runs' timers (a stack's timers are shared by its runs)."""
    timings = [s["timings_s"] for s in summaries.values()]
    if MODES[mode][1]:  # one timer per stack: count each distinct one once
        timings = list({(t["total"], t["lmn"]): t for t in timings}.values())
    return sum(t["lmn"] for t in timings) / sum(t["total"] for t in timings)


def _same_phases(a: dict[str, dict], b: dict[str, dict]) -> int:
    keys = ("memorization_step", "generalization_step")
    return sum(all(a[n][k] == b[n][k] for k in keys) for n in a)


def sweep_throughput(steps: int = 2000, workers: int = 2, quick: bool = False, device: torch.device | None = None, log=print) -> list[dict]:
    """Time the grid in each of :data:`MODES`; one dict per mode (runs, wall seconds, runs per hour, speed-up over
    ``sequential``, LMN share, runs whose phase steps match the sequential runs')."""
    device = device or torch.device("cpu")
    rows, reference = [], None
    with tempfile.TemporaryDirectory(prefix="gm-sweep-bench-") as tmp:
        for mode in MODES:
            runs = plan(Path(tmp) / mode, steps, quick, device)
            log(f"sweep throughput: {mode}: {len(runs)} runs x {steps} steps ...")
            wall, cpu = _time_mode(mode, runs, workers)
            summaries = _summaries(runs)
            reference = reference or summaries
            row = {
                "mode": mode,
                "runs": len(runs),
                "steps": steps,
                "workers": MODES[mode][0] or workers,
                "wall_s": wall,
                "runs_per_hour": len(runs) / wall * 3600,
                "cpu_s_per_run": cpu / len(runs),
                "lmn_share": _lmn_share(summaries, mode),
                "same_phase_steps": _same_phases(reference, summaries),
            }
            row["speedup"] = rows[0]["wall_s"] / wall if rows else 1.0
            row["cpu_speedup"] = rows[0]["cpu_s_per_run"] / row["cpu_s_per_run"] if rows else 1.0
            rows.append(row)
            log(format_row(row))
    return rows


def format_row(r: dict) -> str:
    """One row of :func:`format_table`."""
    return (
        f"| {r['mode']} | {r['runs']} x {r['steps']} | {r['workers']} | {r['wall_s']:.1f} | {r['runs_per_hour']:.0f} | "
        f"{r['speedup']:.2f} | {r['cpu_s_per_run']:.2f} | {r['cpu_speedup']:.2f} | {100 * r['lmn_share']:.0f}% | "
        f"{r['same_phase_steps']}/{r['runs']} |"
    )


def format_table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    head = (
        "| mode | runs x steps | processes | wall s | runs/hour | x sequential (wall) | CPU s per run | x sequential "
        "(CPU) | LMN share | same phase steps as sequential |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    return "\n".join([head, *map(format_row, rows)])
