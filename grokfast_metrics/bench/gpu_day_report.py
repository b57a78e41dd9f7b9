"""The GPU day's results file: checking it, merging it into ``results.csv`` and ``RESULTS.md``, its Markdown.

``grokfast-metrics bench --merge-gpu-day OUTDIR/gpu_day.json`` (:func:`merge`) appends the file's rows to the CSV
(so the generated tables of ``RESULTS.md`` get a section for the device) and writes the GPU day's own block of
``RESULTS.md`` for that device (:func:`format_gpu_day`): the stages, the CUDA tests, L and end-to-end times against
the targets of docs/targets.md, eigen on the device vs host LAPACK, the static model's error, the dense-tracking total.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path

from .harness import FIELDS, BenchRow
from .report import append_csv, read_csv, replace_block, update_results_md

FORMAT = "grokfast-metrics gpu-day 1"
RESULTS_NAME = "gpu_day.json"
_KEYS = ("format", "dry_run", "run_id", "device_name", "stages", "cuda_tests", "rows", "static_model", "dense_tracking")
#: the targets of docs/targets.md, quoted beside the measured figures
TARGET_L_MS, TARGET_E2E_MS, TARGET_DENSE_S = 1.0, 5.0, 180.0


def load_results(path: str | os.PathLike) -> dict:
    """The results of ``path`` (a ``gpu_day.json`` or the folder holding it), checked.

    Raises:
        ValueError: missing, unreadable, not a GPU-day results file, or rows with unknown fields.
    """
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_NAME
    if not p.is_file():
        raise ValueError(f"{p} does not exist; give the gpu_day.json written by benchmarks/gpu_day.sh (or its folder)")
    try:
        res = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p} is not readable JSON ({e}); was the GPU day cut off before it wrote its results?") from None
    if not isinstance(res, dict) or res.get("format") != FORMAT:
        raise ValueError(
            f"{p} is not a GPU-day results file (format {res.get('format') if isinstance(res, dict) else None!r}, expected {FORMAT!r})"
        )
    missing = [k for k in _KEYS if k not in res]
    if missing:
        raise ValueError(f"{p} lacks {missing}; it was not written whole by this version's gpu_day")
    names = set(FIELDS)
    for k, r in enumerate(res["rows"]):
        extra = set(r) - names if isinstance(r, dict) else {"<not an object>"}
        if extra:
            raise ValueError(f"{p}: row {k} has fields this version's results.csv lacks: {sorted(extra)}")
    return res


def rows_of(res: dict) -> list[BenchRow]:
    """The results file's rows as :class:`BenchRow` (missing fields take their defaults)."""
    names = {f.name for f in fields(BenchRow)}
    return [BenchRow(**{k: v for k, v in r.items() if k in names}) for r in res["rows"]]


def merge(
    path: str | os.PathLike, csv_path: str | os.PathLike, md_path: str | os.PathLike | None, allow_dry_run: bool = False
) -> list[Path]:
    """Append the GPU day's rows to ``csv_path`` and refresh ``md_path`` (its generated tables and the device's block).

    Nothing is written when the file is refused.

    Raises:
        ValueError: the file is refused (:func:`load_results`), is a dry run without ``allow_dry_run``, its run is
            already in the CSV, or the CSV has another header.
    """
    res = load_results(path)
    if res["dry_run"] and not allow_dry_run:
        raise ValueError(f"{path} is a dry run (CPU, tiny sizes), not GPU figures; --allow-dry-run merges it anyway")
    csv_path = Path(csv_path)
    if csv_path.exists() and csv_path.stat().st_size:
        if any(r.get("run_id") == res["run_id"] for r in read_csv(csv_path)):
            raise ValueError(f"run {res['run_id']} is already in {csv_path}; nothing merged")
    written = [append_csv(rows_of(res), csv_path)]
    if md_path:
        update_results_md(csv_path, md_path)
        slug = "".join(c if c.isalnum() else "_" for c in res["device_name"])[:60]
        begin, end = f"<!-- gpu-day:{slug}:begin (grokfast-metrics bench --merge-gpu-day) -->", f"<!-- gpu-day:{slug}:end -->"
        written.append(replace_block(md_path, begin, end, "\n".join([begin, "", format_gpu_day(res), "", end])))
    return written


# --------------------------------------------------------------------------------------------
# Markdown


def _ms(v) -> str:
    return "-" if v is None else f"{1e3 * v:.4g}"


def _status(r: dict) -> str:
    return r.get("status") or "-"


def format_gpu_day(res: dict) -> str:
    """The GPU day's Markdown block: stages, tests, L and end-to-end vs the targets, eigen, static model, dense job."""
    m = res.get("machine") or {}
    lines = [
        f"### GPU day · {res['device_name']}{' (DRY RUN on the CPU)' if res['dry_run'] else ''}",
        "",
        f"run `{res['run_id']}` ({res.get('started', '')}), torch {m.get('torch_version', '-')}, "
        f"triton {m.get('triton_version') or '-'}, CUDA capability {res.get('cuda_capability') or '-'}, "
        f"{res.get('wall_s', '-')} s in the stages (budget {res.get('budget_s', '-')} s)",
        "",
        "| stage | budget s | spent s | status |",
        "|---|---:|---:|---|",
    ]
    lines += [f"| {s['name']} | {s['budget_s']} | {s['spent_s']} | {s['status']} |" for s in res["stages"]]
    ct = res["cuda_tests"] or {}
    lines += ["", f"CUDA tests: {ct.get('status', '-')}{': ' + ct['summary'] if ct.get('summary') else ''}"]
    lines += [f"- `{f}`" for f in ct.get("failures", [])]
    rows = res["rows"]
    conn = [r for r in rows if r["kind"] == "connectivity"]
    if conn:
        lines += [
            "",
            "| L (`connectivity`) | workload | N | median ms | GFLOP/s | of roof | x torch | status |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in conn:
            wl = (r.get("note") or "").replace("gpu day, workload ", "")
            lines.append(
                f"| {r['backend']} | {wl} | {r['N']} | {_ms(r['time_median_s'])} | "
                f"{'-' if r['gflops'] is None else format(r['gflops'], '.4g')} | "
                f"{'-' if r['frac_roof'] is None else format(r['frac_roof'], '.3f')} | "
                f"{'-' if r['speedup_vs_torch'] is None else format(r['speedup_vs_torch'], '.3g')} | {r['status']} |"
            )
        lines += _target_lines(rows)
    e2e = [r for r in rows if r["kind"] in ("lmn_e2e", "eigen")]
    if e2e:
        lines += ["", "| end to end / eigen | backend | N | total ms | L ms | eigen ms | status |", "|---|---|---:|---:|---:|---:|---|"]
        for r in e2e:
            what = "gm.lmn" if r["kind"] == "lmn_e2e" else "eigvalsh fp64"
            eig = r["time_eigen_s"] if r["kind"] == "lmn_e2e" else r["time_median_s"]
            lines.append(
                f"| {what} | {r['backend']} | {r['N']} | {_ms(r['time_median_s'])} | {_ms(r['time_L_s'])} | {_ms(eig)} | {r['status']} |"
            )
    sm = [d for d in res["static_model"] if "kernel" in d]
    lines += ["", "Static model error (measured time / static estimate of `bench --static-gpu`, same kernel and N):"]
    if sm:
        lines += [
            "",
            "| kernel | N | model | measured ms | estimate ms | measured / estimate | status |",
            "|---|---:|---|---:|---:|---:|---|",
        ]
        for d in sm:
            lines.append(
                f"| {d['kernel']} | {d['N']} | {d.get('gpu_model', '-')}{'' if d.get('loops_verified', True) else ' *'} | "
                f"{'-' if d['measured_ms'] is None else format(d['measured_ms'], '.4g')} | "
                f"{'-' if d['estimate_ms'] is None else format(d['estimate_ms'], '.4g')} | "
                f"{'-' if d['ratio'] is None else format(d['ratio'], '.3g')} | {_status(d)} |"
            )
        if not all(d.get("loops_verified", True) for d in sm):
            lines.append("\n\\* the estimate's loop trip counts could not be checked against the kernel's MMA work.")
    else:
        lines[-1] += " " + ("; ".join(_status(d) for d in res["static_model"]) or "-")
    lines += ["", _dense_line(res.get("dense_tracking") or {})]
    return "\n".join(lines)


def _target_lines(rows: list[dict]) -> list[str]:
    """The fastest Triton kernel per N (what ``kernels.triton.DEFAULT_VARIANT`` should be) and L / end to end at N=961 vs the targets."""
    out = []
    by_n: dict[int, list[dict]] = {}
    for r in rows:
        if (
            r["kind"] == "connectivity"
            and r["status"] == "ok"
            and r["backend"].startswith("triton-")
            and "workload default" in (r.get("note") or "")
        ):
            by_n.setdefault(r["N"], []).append(r)
    if by_n:
        best = ", ".join(f"N={n}: {min(rs, key=lambda r: r['time_median_s'])['backend']}" for n, rs in sorted(by_n.items()))
        out.append(f"\nFastest Triton kernel on the default tail (sets `DEFAULT_VARIANT`): {best}.")
    at = by_n.get(961, [])
    if at:
        t = min(r["time_median_s"] for r in at)
        out.append(f"L at N=961: {1e3 * t:.3f} ms (target <= {TARGET_L_MS:g} ms: {'met' if 1e3 * t <= TARGET_L_MS else 'NOT met'}).")
    e2e = [r for r in rows if r["kind"] == "lmn_e2e" and r["N"] == 961 and r["status"] == "ok"]
    if e2e:
        t = e2e[0]["time_median_s"]
        out.append(
            f"gm.lmn end to end at N=961: {1e3 * t:.3f} ms (target <= {TARGET_E2E_MS:g} ms: "
            f"{'met' if 1e3 * t <= TARGET_E2E_MS else 'NOT met'})."
        )
    return out


def _dense_line(d: dict) -> str:
    if "total_s" not in d:
        return f"Dense tracking: {d.get('status', 'not run')}."
    how = (
        f"extrapolated from {d.get('steps_done')} of {d.get('steps_planned')} steps run in {d.get('process_wall_s', 0):.0f} s"
        if d.get("extrapolated")
        else f"all {d.get('steps_planned')} steps run"
    )
    verdict = "" if d.get("meets_target") is None else f" (target <= {TARGET_DENSE_S:g} s: {'met' if d['meets_target'] else 'NOT met'})"
    return (
        f"Dense tracking (addition mod 31, LMN every step on {d.get('n_probe')} inputs, `{d.get('command', '')}`): "
        f"total {d['total_s']:.1f} s{verdict}, {how}."
    )
