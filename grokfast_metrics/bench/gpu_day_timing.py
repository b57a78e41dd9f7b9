"""The GPU day's timing stage (stage 2 of :mod:`.gpu_day`): the matmul roof, every workload's ``connectivity`` rows
on Triton v1, v2 and the torch backend, ``gm.lmn`` end to end, and the eigen step on the device vs host LAPACK.

Every row is checked against the NumPy reference before it is timed; a row predicted not to fit the time left is
skipped with the reason in its status.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence

import torch
from torch import nn

from ..compute import core
from .baselines import TRITON_VARIANTS, backend_fn, reference_timed
from .gpu_day_budget import _left
from .gpu_day_cuda_tests import SKIP_NO_CUDA
from .harness import BenchRow, Timing, check_agreement, fill_speed, fraction_recomputed, n_pairs, refuse, time_fn
from .sweep import measured_roof_row
from .workloads import Workload, make_inputs, make_tail

GPU_NS = (961, 4096, 16384)
DRY_NS = (12, 20)
#: N of the end-to-end and eigen rows (eigen at 16384 alone takes seconds on the host)
GPU_E2E_NS = (961, 4096)
#: timed in this order (the figures that decide ``DEFAULT_VARIANT`` first, should the budget run short)
BACKENDS = ("triton-v2", "triton-v1", "torch")


# --------------------------------------------------------------------------------------------
# workloads


def default_workload(n_lambda: int = 21) -> Workload:
    """The default tail (docs/lmn.md, "Which layer"): ``Linear(100,100) -> SiLU -> Linear(100,31)`` (seeded), paper-like inputs."""

    def make(n: int, device: torch.device):
        return make_inputs(n, 100, 1, device), make_tail(100, 31, 1, 0, device)

    return Workload("default", make, 100, 31, 1, 2 * n_lambda * 100 * 31)


def workloads(n_lambda: int = 21) -> list[Workload]:
    """The default tail, then the lowered transformer tail where ``workloads.transformer_tail_workload`` exists.

    The hook: ``transformer_tail_workload(n_lambda) -> Workload`` in :mod:`.workloads` (the transformer issue's
    lowering provides it); nothing else needs changing for the GPU day to time it on every backend and N.
    """
    from . import workloads as wl

    out = [default_workload(n_lambda)]
    hook = getattr(wl, "transformer_tail_workload", None)
    if hook is not None:
        out.append(hook(n_lambda))
    return out


# --------------------------------------------------------------------------------------------
# stage 2: timing


def backend_can_run(b: str, device: torch.device) -> str | None:
    """Why backend ``b`` is not timed here (``SKIPPED: no CUDA`` for Triton without CUDA or the interpreter)."""
    if b in TRITON_VARIANTS and device.type != "cuda":
        from ..kernels import triton_rowblock as kc

        if not kc.kernel_is_interpreted():
            return SKIP_NO_CUDA
    return None


def _variant_skips(b: str, tail: nn.Module, T: int) -> str | None:
    """``triton-v2`` on a tail v2 leaves to v1 (a lowered tail's skip term): not timed (it would time v1 again)."""
    if b != "triton-v2":
        return None
    from ..foundation.tail import parse_tail
    from ..kernels.triton import variant_for

    spec = parse_tail(tail)
    if spec is None or variant_for(spec, T, "v2") != "v2":
        return "SKIPPED: v2 leaves this tail to v1 (the triton-v1 row)"
    return None


def _row(new_row, w: Workload, T: int, **kw) -> BenchRow:
    return new_row(H=w.H, O=w.O, T=T, depth=w.depth, dtype="float32", **kw)


def _fill(row: BenchRow, timing: Timing, w: Workload, roof: float | None) -> BenchRow:
    fill_speed(row, timing, roof)
    assert row.pairs is not None  # fill_speed sets it
    row.gflop = w.flop_per_pair * row.pairs / 1e9  # the workload's own useful FLOP (not the MLP formula)
    row.gflops = row.gflop / timing.median
    row.frac_roof = row.gflops / roof if roof else None
    return row


def time_workload(
    w: Workload, device: torch.device, ns: Sequence[int], T: int, repeats: int, roof: float | None, deadline: float, new_row, n_ref: int
) -> list[BenchRow]:
    """``connectivity`` rows of each backend of :data:`BACKENDS` at each N of workload ``w``.

    Each backend's L on the first ``n_ref`` inputs is checked against the reference first (refused rows are not
    timed); a row whose time, predicted from the last N by pairs, would not fit the time left is skipped.
    """
    h_all, tail = w.make(max(ns), device)
    n_ref = min(n_ref, max(ns))
    L_ref, _ = reference_timed(h_all[:n_ref], tail, T)
    rows: list[BenchRow] = []
    todo = [(b, N) for b in BACKENDS for N in ns]
    last: dict[str, tuple[int, float]] = {}
    checks: dict[str, tuple[float, str | None]] = {}
    for k, (b, N) in enumerate(todo):
        r = _row(new_row, w, T, kind="connectivity", backend=b, N=N, check_n=n_ref, note=f"gpu day, workload {w.name}")
        why = backend_can_run(b, device) or _variant_skips(b, tail, T)
        if why:
            r.status = why
            rows.append(r)
            continue
        fn = backend_fn(b)
        if b not in checks:
            checks[b] = check_agreement(functools.partial(fn, h_all[:n_ref], tail, T), L_ref)
            if checks[b][1] is None:
                fn(h_all[: min(256, max(ns))], tail, T)  # warm-up: compilation, autotuning, allocator
        r.max_abs_diff, refused = checks[b]
        if refused:
            rows.append(refuse(r, refused))
            continue
        share = _left(deadline) / max(1, len(todo) - k)  # this row's fair share of what is left
        if b in last:
            n0, t0 = last[b]
            predicted = t0 * n_pairs(N) / n_pairs(n0)
            if predicted > max(share, _left(deadline) / 2):
                r.status = f"SKIPPED: predicted {predicted:.2f} s per call, {max(_left(deadline), 0):.0f} s left"
                rows.append(r)
                continue
        if _left(deadline) <= 0:
            r.status = "SKIPPED: timing budget spent"
            rows.append(r)
            continue
        h = h_all[:N]
        timing = time_fn(functools.partial(fn, h, tail, T), device, repeats, budget_s=share)
        r.fraction_recomputed = fraction_recomputed(b)
        rows.append(_fill(r, timing, w, roof))
        last[b] = (N, timing.median)
    torch_t = {r.N: r.time_median_s for r in rows if r.backend == "torch" and r.status == "ok" and r.time_median_s}
    for r in rows:
        if r.status == "ok" and r.backend != "torch" and r.N in torch_t and r.time_median_s:
            r.speedup_vs_torch = torch_t[r.N] / r.time_median_s
    return rows


def e2e_rows(device: torch.device, ns: Sequence[int], T: int, repeats: int, deadline: float, new_row) -> list[BenchRow]:
    """``gm.lmn`` end to end on the default tail (backend ``auto``), split into L / eigen / the rest, per N.

    ``time_median_s`` is the measured ``gm.lmn`` call; ``time_L_s`` ``gm.connectivity``; ``time_eigen_s``
    ``eigvalsh`` of L in float64 on L's device; ``time_entropy_s`` ``lmn_from_connectivity`` minus eigen (>= 0).
    """
    w = default_workload(T)
    rows = []
    core.lmn_from_connectivity(torch.eye(2, device=device))  # loads the eigensolver's library
    for k, N in enumerate(ns):
        r = _row(new_row, w, T, kind="lmn_e2e", backend=core.resolve_backend(*w.make(2, device), "auto"), N=N, pairs=n_pairs(N))
        share = _left(deadline) / (len(ns) - k) / 4
        if share <= 0:
            r.status = "SKIPPED: timing budget spent"
            rows.append(r)
            continue
        h, tail = w.make(N, device)
        core.lmn(h, tail, T)  # warm-up
        total = time_fn(functools.partial(core.lmn, h, tail, T), device, repeats, budget_s=share)
        t_L = time_fn(functools.partial(core.connectivity, h, tail, T), device, repeats, budget_s=share)
        L = t_L.result
        assert isinstance(L, torch.Tensor)
        t_eig = time_fn(functools.partial(_eig, L, None), device, repeats, budget_s=share)
        t_post = time_fn(functools.partial(core.lmn_from_connectivity, L), device, repeats, budget_s=share)
        r.repeats = len(total.times)
        r.time_median_s, r.time_iqr_s, r.time_min_s, r.time_max_s = total.median, total.iqr, total.min, total.max
        r.time_L_s, r.time_eigen_s = t_L.median, t_eig.median
        r.time_entropy_s = max(t_post.median - t_eig.median, 0.0)
        r.eigen_share = t_eig.median / total.median
        r.note = "gpu day: total = gm.lmn measured; L = gm.connectivity; eigen = eigvalsh(float64) on L's device"
        rows.append(r)
    return rows


def _eig(L: torch.Tensor, device: str | None) -> torch.Tensor:
    """``eigvalsh`` of ``L`` in float64, on ``device`` (``None``: L's own)."""
    return torch.linalg.eigvalsh(L.to(device=device or L.device, dtype=torch.float64))


def eigen_rows(device: torch.device, ns: Sequence[int], T: int, repeats: int, deadline: float, new_row) -> list[BenchRow]:
    """The eigen step (``eigvalsh`` in float64) of a real L on the device vs on the host (LAPACK) at 1, 4, all threads.

    Host rows include the device-to-host copy of L. ``kind="eigen"``; ``threads`` says how many host threads.
    """
    w = default_workload(T)
    host_threads = sorted({1, min(4, os.cpu_count() or 1), os.cpu_count() or 1})
    before = torch.get_num_threads()
    rows = []
    last: dict[str, tuple[int, float]] = {}
    try:
        for k, N in enumerate(ns):
            h, tail = w.make(N, device)
            L = core.connectivity(h, tail, T)
            where = ([("device", None)] if device.type == "cuda" else []) + [("host", t) for t in host_threads]
            for j, (place, threads) in enumerate(where):
                label = f"eigvalsh-{device.type}" if place == "device" else f"eigvalsh-host-lapack-{threads}t"
                r = _row(new_row, w, T, kind="eigen", backend=label, N=N)
                r.threads = threads
                share = _left(deadline) / ((len(ns) - k) * len(where) - j)
                if share <= 0:
                    r.status = "SKIPPED: timing budget spent"
                    rows.append(r)
                    continue
                seen = last.get(label)  # the same solver at a smaller N: predicted by N^3
                if seen and seen[1] * (N / seen[0]) ** 3 > share:
                    r.status = f"SKIPPED: predicted {seen[1] * (N / seen[0]) ** 3:.1f} s per call > {share:.1f} s left for it"
                    rows.append(r)
                    continue
                if threads is not None:
                    torch.set_num_threads(threads)
                fn = functools.partial(_eig, L, None if place == "device" else "cpu")
                if place == "device":
                    fn()  # warm-up (the host solver was loaded by the end-to-end rows)
                t = time_fn(fn, device, repeats, budget_s=share)
                r.repeats = len(t.times)
                r.time_median_s, r.time_iqr_s, r.time_min_s, r.time_max_s = t.median, t.iqr, t.min, t.max
                r.note = (
                    "eigvalsh(float64) of a real L on the device"
                    if place == "device"
                    else f"eigvalsh(float64) on the host, {threads} LAPACK threads, device-to-host copy included"
                )
                rows.append(r)
                last[label] = (N, t.median)
    finally:
        torch.set_num_threads(before)
    return rows


def timing_stage(device: torch.device, dry_run: bool, deadline: float, new_row, T: int = 21) -> list[BenchRow]:
    """The roof, every workload's connectivity rows, the end-to-end and eigen rows (stage 2)."""
    ns = DRY_NS if dry_run else GPU_NS
    e2e_ns = DRY_NS if dry_run else GPU_E2E_NS
    repeats = 2 if dry_run else 5
    roof_row, roof, _ = measured_roof_row(device, 256 if dry_run else 8192, 3 if dry_run else 5, new_row)
    rows = [roof_row]
    conn_deadline = time.monotonic() + 0.6 * _left(deadline)
    ws = workloads(T)
    for k, w in enumerate(ws):  # an equal share of what is left each: the default tail cannot starve the next one
        share = (conn_deadline - time.monotonic()) / (len(ws) - k)
        rows += time_workload(w, device, ns, T, repeats, roof, time.monotonic() + share, new_row, n_ref=8 if dry_run else 24)
    rows += e2e_rows(device, e2e_ns, T, repeats, time.monotonic() + 0.5 * _left(deadline), new_row)
    rows += eigen_rows(device, e2e_ns, T, repeats, deadline, new_row)
    return rows
