"""The GPU day: every GPU figure of the project from one command on a bare lent GPU machine, within its time.

Run through ``benchmarks/gpu_day.sh OUTDIR`` (which sets up the package from the repository copy, see there), or
``python -P -m grokfast_metrics.bench.gpu_day OUTDIR`` where the package is importable. Stages, each with its own
time budget (:data:`BUDGETS`, seconds; a stage starts no more work once its time is spent and skips the rows
predicted not to fit it, so the whole run ends about ``--budget-s`` after it starts, 450 s by default, inside the
8-minute target; only a single call longer than what was left can overrun it):

1. ``cuda_tests``: the tests that skip on the CPU for want of CUDA (:data:`CUDA_TESTS`) run on the GPU; when one
   fails the run stops there, with the failures in the results file (exit code 3); when they run out of time with
   no failure seen, the run goes on (every timed row is still checked against the reference first);
2. ``timing``: the 8192^2 fp32 matmul roof, then Triton v1, v2 and the torch backend at N = 961, 4096, 16384 on
   every workload (:func:`.gpu_day_timing.workloads`: the default tail, and the lowered Nanda transformer tail of
   ``workloads.transformer_tail_workload``, which Triton runs with its skip term in v1), each checked against the
   NumPy reference before it is timed, each workload with an equal share of the stage's connectivity time;
   ``gm.lmn`` end to end (L + eigen + entropy); the eigen step on the device vs host LAPACK at 1, 4 and all threads;
3. ``static_model``: measured time / static estimate (:mod:`.static_gpu`) per Triton kernel and N;
4. ``dense_tracking``: the trainer's dense job (addition mod 31, 20,000 steps, LMN every step on all 961 inputs) for
   what is left of the budget, then stopped (SIGTERM) and its total extrapolated, or whole if it fits;
5. everything goes to ``OUTDIR/gpu_day.json`` (:data:`FORMAT`), which ``grokfast-metrics bench --merge-gpu-day``
   merges into ``results.csv`` and ``RESULTS.md`` with the device name (:mod:`.gpu_day_report`).

``--dry-run`` runs the same stages on the CPU at tiny sizes (the CUDA-only parts are rows marked
``SKIPPED: no CUDA``), so the script is known to work before a GPU is lent; the tests run it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from .baselines import TRITON_VARIANTS
from .gpu_day_budget import BUDGETS, DRY_BUDGETS, RESERVE_S, TOTAL_BUDGET_S, Budget, _left
from .gpu_day_cuda_tests import SKIP_NO_CUDA, cuda_tests, repo_root
from .gpu_day_dense import DENSE_STEPS, DENSE_TARGET_S, DRY_DENSE_STEPS, dense_tracking_stage
from .gpu_day_report import FORMAT, RESULTS_NAME
from .gpu_day_timing import timing_stage
from .harness import BenchRow, machine_info
from .sweep import row_maker

# --------------------------------------------------------------------------------------------
# stage 3: the static model's error


def static_model_stage(
    rows: Sequence[BenchRow], device: torch.device, deadline: float, estimate: Callable[..., dict] | None = None
) -> list[dict]:
    """Measured time / static estimate for every timed Triton row of the default workload.

    ``estimate`` defaults to :func:`.static_gpu.estimate` for the device's architecture (sm_90 or sm_80 models;
    other GPUs: one row saying there is no model). Without CUDA: one ``SKIPPED: no CUDA`` row.
    """
    if device.type != "cuda" and estimate is None:
        return [{"status": SKIP_NO_CUDA}]
    from . import static_gpu

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        arch = 10 * major + minor
    else:
        arch = 90
    if arch not in static_gpu.GPUS:
        return [{"status": f"SKIPPED: no static model of sm_{arch} (models: {sorted(static_gpu.GPUS)})"}]
    estimate = estimate or static_gpu.estimate
    out = []
    for r in rows:
        if r.kind != "connectivity" or r.backend not in TRITON_VARIANTS or "workload default" not in r.note:
            continue
        d = {"kernel": TRITON_VARIANTS[r.backend], "N": r.N, "arch": arch, "measured_ms": None, "estimate_ms": None, "ratio": None}
        if r.status != "ok":
            d["status"] = f"not measured ({r.status})"
        elif _left(deadline) <= 0:
            d["status"] = "SKIPPED: static-model budget spent"
        else:
            try:
                e = estimate(r.N, r.H, r.O, r.depth, arch, r.T, variant=d["kernel"])
            except Exception as exc:
                d["status"] = f"estimate failed: {type(exc).__name__}: {str(exc)[:160]}"
            else:
                d.update(
                    measured_ms=1e3 * r.time_median_s,
                    estimate_ms=e["total_ms"],
                    gpu_model=e["gpu"],
                    loops_verified=e["loops_verified"],
                    ratio=1e3 * r.time_median_s / e["total_ms"],
                    status="ok",
                )
        out.append(d)
    return out or [{"status": "no Triton row was timed"}]


# --------------------------------------------------------------------------------------------
# the run


def write_results(outdir: Path, results: dict) -> Path:
    """Write ``results`` to ``outdir/gpu_day.json`` (through a temporary file: never half written)."""
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / RESULTS_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=_jsonable) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


def _stage(results: dict, name: str, budget: float, t0: float, status: str, **extra) -> None:
    results["stages"].append(
        {"name": name, "budget_s": round(budget, 1), "spent_s": round(time.monotonic() - t0, 2), "status": status, **extra}
    )


def run(
    outdir: Path, dry_run: bool = False, total_s: float = TOTAL_BUDGET_S, skip_tests: bool = False, dense_steps: int = DENSE_STEPS
) -> int:
    """All stages; returns 0 (done), 3 (the CUDA tests failed: stopped after them)."""
    budget = Budget(total_s)
    py = [sys.executable, "-P"]
    device = torch.device("cuda" if torch.cuda.is_available() and not dry_run else "cpu")
    budgets = DRY_BUDGETS if dry_run else BUDGETS
    new_row = row_maker(device)
    probe = new_row()
    info = machine_info(device)
    results: dict = {
        "format": FORMAT,
        "dry_run": dry_run,
        "run_id": probe.run_id,
        "started": probe.timestamp,
        "device_name": info["gpu"] or f"no CUDA ({info['cpu']})",
        "machine": info,
        "cuda_capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "budget_s": total_s,
        "budgets_s": budgets,
        "stages": [],
        "cuda_tests": None,
        "rows": [],
        "static_model": [],
        "dense_tracking": None,
    }
    log = _logger()
    log(
        f"gpu day{' (dry run)' if dry_run else ''}: {results['device_name']}, budget {total_s:.0f} s -> {outdir}\n"
        f"    python {sys.version.split()[0]}, torch {torch.__version__}, triton {info['triton_version'] or '-'}, "
        f"package from {Path(__file__).parents[1]}, tests from {repo_root()}"
    )

    t0 = time.monotonic()
    if skip_tests:
        results["cuda_tests"] = {"status": "SKIPPED: --skip-tests"}
    else:
        results["cuda_tests"] = cuda_tests(py, budget.stage(budgets["cuda_tests"]), dry_run)
    ct = results["cuda_tests"]
    _stage(results, "cuda_tests", budgets["cuda_tests"], t0, ct["status"], summary=ct.get("summary", ""))
    log(f"[1 cuda_tests] {ct['status']} {ct.get('summary', '')}")
    if ct["status"] == "FAILED":
        for f in ct.get("failures", []):
            log(f"    {f}")
        for name in ("timing", "static_model", "dense_tracking"):
            _stage(results, name, budgets[name], time.monotonic(), f"not run: the CUDA tests {ct['status']}")
        return _finish(outdir, results, log, 3)

    rows = _timing(results, device, dry_run, budget.stage(budgets["timing"]), new_row, log)
    _static_model(results, rows, device, budget.stage(budgets["static_model"]), log)
    _dense_tracking(results, py, device, dry_run, budget, dense_steps, new_row, log)
    return _finish(outdir, results, log, 0)


def _timing(results: dict, device: torch.device, dry_run: bool, deadline: float, new_row, log) -> list[BenchRow]:
    """Stage 2 into ``results`` (its rows), logged; returns the rows."""
    t0 = time.monotonic()
    try:
        rows = timing_stage(device, dry_run, deadline, new_row)
        status = "ok"
    except Exception as e:  # the results file still says what happened
        rows, status = [], f"FAILED: {type(e).__name__}: {str(e)[:300]}"
    results["rows"] = [asdict(r) for r in rows]
    _stage(results, "timing", results["budgets_s"]["timing"], t0, status, rows=len(rows))
    log(f"[2 timing] {status}: {len(rows)} rows")
    for r in rows:
        if r.kind in ("roof", "connectivity", "lmn_e2e", "eigen"):
            ms = "-" if r.time_median_s is None else f"{1e3 * r.time_median_s:.3f} ms"
            log(f"    {r.kind:12} {r.backend:28} N={r.N}: {ms} {'' if r.status == 'ok' else r.status}")
    return rows


def _static_model(results: dict, rows: list[BenchRow], device: torch.device, deadline: float, log) -> None:
    """Stage 3 into ``results``, logged."""
    t0 = time.monotonic()
    try:
        results["static_model"] = static_model_stage(rows, device, deadline)
        status = results["static_model"][0]["status"] if len(results["static_model"]) == 1 else "ok"
    except Exception as e:
        status = f"FAILED: {type(e).__name__}: {str(e)[:300]}"
    _stage(results, "static_model", results["budgets_s"]["static_model"], t0, status)
    log(f"[3 static_model] {status}")
    for d in results["static_model"]:
        if d.get("ratio"):
            log(f"    {d['kernel']} N={d['N']}: measured {d['measured_ms']:.3f} ms / estimate {d['estimate_ms']:.3f} ms = {d['ratio']:.2f}")


def _dense_tracking(
    results: dict, py: list[str], device: torch.device, dry_run: bool, budget: Budget, dense_steps: int, new_row, log
) -> None:
    """Stage 4 into ``results`` (and the summary rows), logged."""
    t0 = time.monotonic()
    # on a GPU the dense job takes what the other stages left; the dry run keeps to its own few seconds
    own = results["budgets_s"]["dense_tracking"]
    dense_budget = own if dry_run else max(own, budget.left() - RESERVE_S)
    try:
        dense = dense_tracking_stage(py, device, dry_run, budget.stage(dense_budget), dense_steps)
    except Exception as e:
        dense = {"status": f"FAILED: {type(e).__name__}: {str(e)[:300]}"}
    results["dense_tracking"] = dense
    _stage(results, "dense_tracking", dense_budget, t0, dense["status"])
    results["rows"] += [asdict(r) for r in summary_rows(results, new_row)]
    log(
        f"[4 dense_tracking] {dense['status']}: {dense.get('steps_done')} of {dense_steps} steps, total "
        f"{dense.get('total_s', float('nan')):.1f} s (target {DENSE_TARGET_S:.0f} s)"
    )


def summary_rows(results: dict, new_row) -> list[BenchRow]:
    """``static_model`` and ``dense_tracking`` rows for ``results.csv`` (the results file holds their details)."""
    out = []
    for d in results["static_model"]:
        if "kernel" not in d:
            continue
        r = new_row(
            kind="static_model", backend=f"triton-{d['kernel']}", N=d["N"], H=100, O=31, T=21, depth=1, dtype="float32", status=d["status"]
        )
        if d["ratio"] is not None:
            r.time_median_s = d["measured_ms"] / 1e3
            r.note = f"measured {d['measured_ms']:.4g} ms / static estimate {d['estimate_ms']:.4g} ms ({d['gpu_model']}) = {d['ratio']:.3g}"
        out.append(r)
    d = results["dense_tracking"] or {}
    r = new_row(
        kind="dense_tracking",
        backend="auto",
        N=d.get("n_probe"),
        H=100,
        O=31,
        T=21,
        depth=1,
        dtype="float32",
        status=d.get("status", "not run"),
    )
    if "total_s" in d:
        r.time_median_s = d["total_s"]
        r.note = (
            f"{d.get('steps_done')} of {d.get('steps_planned')} steps run"
            + (", total extrapolated" if d.get("extrapolated") else "")
            + f"; target {DENSE_TARGET_S:g} s"
        )
    out.append(r)
    return out


def _finish(outdir: Path, results: dict, log, code: int) -> int:
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results["wall_s"] = round(sum(s["spent_s"] for s in results["stages"]), 2)
    results["exit_code"] = code
    path = write_results(outdir, results)
    log(
        f"[5 results] {path} ({results['wall_s']:.0f} s in the stages)"
        + ("; STOPPED: the CUDA tests did not pass, nothing was timed" if code == 3 else "")
    )
    return code


def _logger():
    def log(msg: str) -> None:
        print(msg, flush=True)

    return log


def main(argv: Sequence[str] | None = None) -> int:
    """``python -P -m grokfast_metrics.bench.gpu_day OUTDIR [--dry-run] [--budget-s S] [--skip-tests]``."""
    p = argparse.ArgumentParser(prog="gpu_day", description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", help=f"folder for {RESULTS_NAME} (created)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU; CUDA-only stages say 'SKIPPED: no CUDA'")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help=f"seconds for all stages (default {TOTAL_BUDGET_S:g}; dry run {sum(DRY_BUDGETS.values()) + RESERVE_S:g})",
    )
    p.add_argument("--skip-tests", action="store_true", help="skip stage 1 (the CUDA tests)")
    p.add_argument(
        "--dense-steps", type=int, default=None, help=f"steps of the dense job (default {DENSE_STEPS}; dry run {DRY_DENSE_STEPS})"
    )
    args = p.parse_args(argv)
    total = args.budget_s or (sum(DRY_BUDGETS.values()) + RESERVE_S if args.dry_run else TOTAL_BUDGET_S)
    dense_steps = args.dense_steps or (DRY_DENSE_STEPS if args.dry_run else DENSE_STEPS)
    if total < RESERVE_S + 5 or dense_steps < 2:
        print(f"gpu_day: error: --budget-s must be >= {RESERVE_S + 5:g} and --dense-steps >= 2", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_day: error: no CUDA device here; use --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    return run(Path(args.outdir), args.dry_run, total, args.skip_tests, dense_steps)


if __name__ == "__main__":
    sys.exit(main())
