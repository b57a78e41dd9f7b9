"""Stage 4 of the GPU day (:mod:`.gpu_day`): the trainer's dense job (addition mod 31, 20,000 steps, LMN every step on
all 961 inputs) for what is left of the budget, then stopped (SIGTERM) and its total extrapolated, or whole if it fits."""

from __future__ import annotations

import itertools
import json
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .gpu_day_budget import RESERVE_S, _left

DENSE_STEPS = 20_000


#: the dry run's dense job: short enough to run whole on a loaded CPU (tracking 16 inputs, complexity off)
DRY_DENSE_STEPS = 40


DENSE_TARGET_S = 180.0


def _read_rows(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by the stop
    return rows


def complexity_steps(steps: int) -> list[int]:
    """Steps the trainer's default ``--complexity log`` computes the complexity at: 0, powers of two, the last."""
    out = {0, steps}
    p = 1
    while p < steps:
        out.add(p)
        p *= 2
    return sorted(out)


def extrapolate(rows: list[dict], steps: int) -> dict:
    """Total seconds of a ``steps``-step run from the rows (``step``, ``time_s``) of its first steps.

    ``time at the last row + remaining steps x median seconds per step over the second half of the rows +
    remaining complexity evaluations x their mean extra cost`` (extra = the step's time above the median, over the
    complexity steps seen in the second half, else all seen).
    """
    pts = [(r["step"], r["time_s"]) for r in rows if r.get("time_s") is not None]
    if len(pts) < 3:
        raise ValueError(f"too few logged steps to extrapolate ({len(pts)})")
    dts = [(s1, (t1 - t0) / (s1 - s0)) for (s0, t0), (s1, t1) in itertools.pairwise(pts) if s1 > s0]
    half = dts[len(dts) // 2 :]
    per_step = statistics.median(d for _, d in half)
    cx = set(complexity_steps(steps))
    extras = [d - per_step for s, d in dts if s in cx and s > 1]
    extra = max(0.0, statistics.mean(extras[-3:])) if extras else 0.0
    last_step, last_t = pts[-1]
    remaining_cx = sum(1 for s in cx if s > last_step)
    total = last_t + (steps - last_step) * per_step + remaining_cx * extra
    return {
        "steps_done": last_step,
        "time_at_last_step_s": last_t,
        "median_step_s": per_step,
        "complexity_extra_s": extra,
        "complexity_evals_remaining": remaining_cx,
        "total_s": total,
    }


def dense_tracking_stage(py: Sequence[str], device: torch.device, dry_run: bool, deadline: float, steps: int = DENSE_STEPS) -> dict:
    """Run ``grokfast-metrics train --task add`` with LMN every step on all inputs until done or ``deadline``.

    On CUDA the trainer's defaults are the dense job (``--lmn-every 1``, ``--probe all``, a row per step); the dry run
    tracks 16 inputs on the CPU. A run stopped at the deadline (SIGTERM, which the trainer handles: it writes its
    rows and summary) is extrapolated to ``steps`` (:func:`extrapolate`).
    """
    args = ["--task", "add", "--steps", str(steps), "--no-progress", "--no-plot", "--overwrite"]
    if dry_run or device.type != "cuda":
        args += ["--device", "cpu", "--lmn-every", "1", "--probe", "16", "--log-every", "1", "--complexity", "off"]
    else:
        args += ["--device", str(device), "--lmn-every", "1", "--probe", "all", "--log-every", "1"]
    with tempfile.TemporaryDirectory(prefix="gpu_day_dense_") as d:
        run_dir = Path(d) / "run"
        cmd = [*py, "-m", "grokfast_metrics", "train", *args, "--out", str(run_dir)]
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tempfile.gettempdir())
        stopped = False
        try:
            out, _ = proc.communicate(timeout=max(1.0, _left(deadline)))
        except subprocess.TimeoutExpired:
            stopped = True
            proc.send_signal(signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=RESERVE_S - 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
        wall = time.monotonic() - t0
        rows = _read_rows(run_dir / "metrics.jsonl")
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else {}
    res = {
        "command": " ".join(cmd[len(py) :]),
        "steps_planned": steps,
        "process_wall_s": wall,
        "stopped": stopped,
        "returncode": proc.returncode,
        "target_s": DENSE_TARGET_S,
        "timings_s": summary.get("timings_s"),
        "n_probe": 16 if (dry_run or device.type != "cuda") else 961,
    }
    if not rows:
        res.update(status=f"FAILED: no step logged (exit {proc.returncode})", output_tail=(out or "")[-2000:])
        return res
    done = rows[-1]["step"]
    trainer_total = (summary.get("timings_s") or {}).get("total")
    startup = wall - trainer_total if trainer_total is not None else None  # imports, set-up, stop, summary
    res.update(steps_done=done, startup_s=startup)
    if not stopped and done == steps:
        total = (summary.get("timings_s") or {}).get("total", rows[-1]["time_s"])
        res.update(status="ok: ran whole", total_s=total, extrapolated=False)
    else:
        try:
            ex = extrapolate(rows, steps)
        except ValueError as e:
            res.update(status=f"FAILED: {e}", output_tail=(out or "")[-2000:])
            return res
        res.update(status="ok: extrapolated", total_s=ex["total_s"], extrapolated=True, extrapolation=ex)
    res["meets_target"] = bool(res["total_s"] <= DENSE_TARGET_S) if not dry_run else None
    return res
