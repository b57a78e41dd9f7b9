"""The GPU day (``benchmarks/gpu_day.sh``): its dry run on the CPU, the results file, the merge, the budget rules.

The dry run is the same script a lent GPU machine runs, at tiny sizes, with the CUDA-only parts marked
``SKIPPED: no CUDA``; it runs in a child process exactly as on the GPU machine (package from the shim, ``python -P``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from grokfast_metrics.bench import gpu_day, gpu_day_cuda_tests, gpu_day_dense, gpu_day_report, gpu_day_timing
from grokfast_metrics.bench.harness import ATOL, BenchRow
from grokfast_metrics.bench.report import read_csv
from grokfast_metrics.bench.sweep import row_maker
from grokfast_metrics.bench.workloads import Workload
from grokfast_metrics.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["cuda_tests", "timing", "static_model", "dense_tracking"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, dict, float]:
    """``bash benchmarks/gpu_day.sh OUT --dry-run`` with CUDA hidden: (results file, its contents, seconds)."""
    out = tmp_path_factory.mktemp("gpu_day") / "out"
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_day.sh"), str(out), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, f"dry run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    path = out / "gpu_day.json"
    return path, json.loads(path.read_text(encoding="utf-8")), seconds


def test_dry_run_results_file(dry_run):
    _path, res, seconds = dry_run
    print(f"dry run took {seconds:.1f} s")
    assert res["format"] == gpu_day_report.FORMAT and res["dry_run"] is True and res["exit_code"] == 0
    assert [s["name"] for s in res["stages"]] == STAGES
    assert all(s["spent_s"] <= s["budget_s"] + 30 for s in res["stages"][1:]), res["stages"]
    # the CUDA tests' command collects them here (unless a loaded machine runs out of the stage's time first)
    ct = res["cuda_tests"]
    assert ct["status"] == gpu_day.SKIP_NO_CUDA and re.search(r"collect only: (\d+ tests collected|not finished)", ct["summary"])
    assert res["static_model"] == [{"status": gpu_day.SKIP_NO_CUDA}]
    rows = res["rows"]
    kinds = {r["kind"] for r in rows}
    assert {"roof", "connectivity", "lmn_e2e", "eigen", "dense_tracking"} <= kinds
    conn = {(r["backend"], r["N"]): r for r in rows if r["kind"] == "connectivity" and "workload default" in r["note"]}
    assert set(conn) == {(b, n) for b in gpu_day_timing.BACKENDS for n in gpu_day_timing.DRY_NS}
    # the lowered transformer tail: every backend and N, the torch rows checked against the reference first
    # (observed ~3e-7); on a loaded machine its torch rows may find the timing budget spent
    tr = {(r["backend"], r["N"]): r for r in rows if r["kind"] == "connectivity" and "workload transformer" in r["note"]}
    assert set(tr) == set(conn)
    for n in gpu_day_timing.DRY_NS:
        assert tr[("torch", n)]["status"] in ("ok", "SKIPPED: timing budget spent"), tr[("torch", n)]
        assert tr[("torch", n)]["max_abs_diff"] <= ATOL[torch.float32] / 5 and tr[("torch", n)]["O"] == 113
        assert all(tr[(b, n)]["status"] == gpu_day.SKIP_NO_CUDA for b in ("triton-v1", "triton-v2"))
    for n in gpu_day_timing.DRY_NS:
        torch_row = conn[("torch", n)]
        # checked against the reference before it was timed (observed max abs diff ~1e-7 here)
        assert torch_row["status"] == "ok" and torch_row["max_abs_diff"] <= ATOL[torch.float32] / 5
        assert torch_row["time_median_s"] > 0 and torch_row["gflops"] > 0
        for b in ("triton-v1", "triton-v2"):
            assert conn[(b, n)]["status"] == gpu_day.SKIP_NO_CUDA and conn[(b, n)]["time_median_s"] is None
    e2e = [r for r in rows if r["kind"] == "lmn_e2e"]
    assert [r["N"] for r in e2e] == list(gpu_day_timing.DRY_NS) and all(r["time_L_s"] > 0 and r["time_eigen_s"] > 0 for r in e2e)
    eig = [r for r in rows if r["kind"] == "eigen"]
    assert eig and all(r["backend"].startswith("eigvalsh-host-lapack-") and r["threads"] >= 1 for r in eig)
    dense = res["dense_tracking"]
    # whole, or (a loaded machine) stopped at its budget and extrapolated from the steps it logged
    assert dense["status"] in ("ok: ran whole", "ok: extrapolated"), dense
    assert dense["total_s"] > 0 and (dense["extrapolated"] or dense["steps_done"] == gpu_day.DRY_DENSE_STEPS)


def _bench(*args: str) -> int:
    return cli.main(["bench", *args])


def test_merge_into_csv_and_results_md(dry_run, tmp_path, capsys):
    path, res, _ = dry_run
    csv, md = tmp_path / "results.csv", tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\nhand-written text\n", encoding="utf-8")
    # a dry run is not GPU figures: refused unless asked for, nothing written
    assert _bench("--merge-gpu-day", str(path), "--csv", str(csv), "--results-md", str(md)) == 2
    assert "dry run" in capsys.readouterr().err and not csv.exists()
    assert _bench("--merge-gpu-day", str(path.parent), "--csv", str(csv), "--results-md", str(md), "--allow-dry-run") == 0
    merged = read_csv(csv)
    assert len(merged) == len(res["rows"]) and {r["run_id"] for r in merged} == {res["run_id"]}
    text = md.read_text(encoding="utf-8")
    assert "hand-written text" in text and f"### GPU day · {res['device_name']} (DRY RUN" in text
    assert "| cuda_tests |" in text and "Dense tracking" in text and "<!-- bench:begin" in text
    # the same run twice: refused, the CSV untouched
    before = csv.read_bytes()
    assert _bench("--merge-gpu-day", str(path), "--csv", str(csv), "--results-md", str(md), "--allow-dry-run") == 2
    assert "already in" in capsys.readouterr().err and csv.read_bytes() == before


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not readable JSON"),
        ('{"format": "something else"}', "not a GPU-day results file"),
        (json.dumps({"format": gpu_day_report.FORMAT}), "lacks"),
    ],
)
def test_merge_refuses_bad_files_in_one_line(tmp_path, capsys, content, message):
    bad = tmp_path / "gpu_day.json"
    bad.write_text(content, encoding="utf-8")
    csv = tmp_path / "results.csv"
    csv.write_text("kept\n", encoding="utf-8")
    assert _bench("--merge-gpu-day", str(bad), "--csv", str(csv), "--results-md", "") == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert csv.read_text(encoding="utf-8") == "kept\n"


def test_cuda_test_list_is_complete():
    """Every test file that runs on CUDA when it is there (and skips or interprets without) is in the GPU day's list."""
    uses_cuda = re.compile(r'skipif\(not torch\.cuda\.is_available\(\)|"cuda" if torch\.cuda\.is_available\(\)')
    found = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("test_*.py") if uses_cuda.search(p.read_text(encoding="utf-8"))}
    assert found == set(gpu_day_cuda_tests.CUDA_TESTS)


def test_extrapolate_steady_steps_and_remaining_complexity():
    # 0.01 s per step; each complexity step (0, powers of two) costs 0.5 s more
    rows, t = [], 0.0
    for step in range(0, 101):
        t += 0.01 + (0.5 if step in (1, 2, 4, 8, 16, 32, 64) else 0.0)
        rows.append({"step": step, "time_s": t})
    ex = gpu_day_dense.extrapolate(rows, 20_000)
    remaining = [s for s in gpu_day_dense.complexity_steps(20_000) if s > 100]
    assert remaining == [128, 256, 512, 1024, 2048, 4096, 8192, 16384, 20000]
    assert ex["median_step_s"] == pytest.approx(0.01) and ex["complexity_extra_s"] == pytest.approx(0.5)
    assert ex["total_s"] == pytest.approx(t + 19_900 * 0.01 + 9 * 0.5)
    with pytest.raises(ValueError, match="too few"):
        gpu_day_dense.extrapolate(rows[:2], 20_000)


def test_static_model_ratio_per_kernel_and_n():
    rows = [
        BenchRow(
            kind="connectivity",
            backend="triton-v1",
            N=961,
            H=100,
            O=31,
            T=21,
            depth=1,
            time_median_s=2e-3,
            note="gpu day, workload default",
        ),
        BenchRow(
            kind="connectivity",
            backend="triton-v2",
            N=961,
            H=100,
            O=31,
            T=21,
            depth=1,
            status="REFUSED: disagrees",
            note="gpu day, workload default",
        ),
        BenchRow(kind="connectivity", backend="torch", N=961, note="gpu day, workload default"),
    ]
    calls = []

    def fake_estimate(n, h, o, depth, arch, t, variant):
        calls.append((n, h, o, depth, arch, t, variant))
        return {"total_ms": 0.5, "gpu": "H100 SXM (sm_90)", "loops_verified": True}

    out = gpu_day.static_model_stage(rows, torch.device("cpu"), time.monotonic() + 60, estimate=fake_estimate)
    assert calls == [(961, 100, 31, 1, 90, 21, "v1")]
    assert out[0]["ratio"] == pytest.approx(4.0) and out[0]["status"] == "ok"
    assert out[1]["kernel"] == "v2" and out[1]["ratio"] is None and out[1]["status"].startswith("not measured")
    assert gpu_day.static_model_stage(rows, torch.device("cpu"), time.monotonic() + 60) == [{"status": gpu_day.SKIP_NO_CUDA}]


def test_timing_rows_skip_once_the_budget_is_spent(one_thread):
    new_row = row_maker(torch.device("cpu"))
    w = gpu_day_timing.default_workload()
    rows = gpu_day_timing.time_workload(w, torch.device("cpu"), (8, 12), 21, 1, None, time.monotonic() - 1, new_row, n_ref=6)
    torch_rows = [r for r in rows if r.backend == "torch"]
    assert [r.status for r in torch_rows] == ["SKIPPED: timing budget spent"] * 2
    assert all(r.max_abs_diff <= ATOL[torch.float32] / 5 for r in torch_rows)  # still checked (observed ~1e-7)


def test_transformer_hook_adds_a_workload(monkeypatch):
    from grokfast_metrics.bench import workloads as wl

    assert gpu_day_timing.workloads()[0].name == "default"
    fake = Workload("transformer", gpu_day_timing.default_workload().make, 100, 31, 1, 1)
    monkeypatch.setattr(wl, "transformer_tail_workload", lambda n_lambda: fake, raising=False)
    assert [w.name for w in gpu_day_timing.workloads()] == ["default", "transformer"]


def test_v2_rows_skip_the_tails_v2_leaves_to_v1():
    """``triton-v2`` is timed only on a tail v2 runs (its import named a kernel module renamed since: on a GPU this
    stage raised ImportError before timing anything)."""
    pytest.importorskip("triton")
    from grokfast_metrics.bench.workloads import make_tail

    assert gpu_day_timing._variant_skips("triton-v2", make_tail(100, 31), 21) is None
    assert gpu_day_timing._variant_skips("triton-v2", make_tail(16, 100), 21).startswith("SKIPPED: v2 leaves")  # > 64 outputs
    assert gpu_day_timing._variant_skips("triton-v1", make_tail(16, 100), 21) is None
