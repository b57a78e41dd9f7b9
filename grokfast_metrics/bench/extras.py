"""The rows after the sweep: fraction of the roof timed alternately (fp32, and the fp64 kernel against an fp64
roof), the end-to-end split, the training overhead."""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..compute import core
from ..experiment.tasks import ADD_MODULUS, make_task
from .baselines import backend_fn, backend_label, backend_that_runs, paired_roof, reference_timed
from .harness import (
    ATOL,
    BenchRow,
    Timing,
    check_agreement,
    fraction_recomputed,
    n_pairs,
    ran_kernel,
    refuse,
    time_fn,
    useful_flops_per_pair,
)
from .sweep import DEFAULT_SHAPE, BenchConfig, NewRow, SweepState, e2e_shape, log
from .workloads import TRAIN_FRACTION, make_inputs, make_tail, train_overhead

#: N of the paired-roof rows: the key shape of docs/targets.md (all 961 inputs of addition mod 31)
PAIRED_N = 961


def extra_rows(cfg: BenchConfig, device: torch.device, state: SweepState, new_row: NewRow) -> list[BenchRow]:
    """The paired-roof, end-to-end and training-overhead rows ``cfg`` asks for.

    Paired roof and training overhead take the timed backends of the sweep's last shape; the paired roof
    runs only when the sweep has N=961, H=100 and depth 1, and leaves out backends refused in the sweep.
    """
    rows: list[BenchRow] = []
    H, depth = DEFAULT_SHAPE
    if cfg.paired_roof and PAIRED_N in cfg.ns and H in cfg.hiddens and depth in cfg.depths:
        rows += paired_roof_rows(cfg, device, [b for b in state.timed if b not in state.refused], new_row)
        if cfg.fp64_roof and device.type == "cpu":
            rows += fp64_roof_rows(cfg, device, new_row)
    if cfg.lmn_parts:
        rows += lmn_parts_rows(cfg, device, state.e2e_L, state.e2e_skip, new_row)
    if cfg.train_n:
        rows += train_overhead_rows(cfg, device, state.timed, new_row, state.refused)
    return rows


def paired_roof_rows(cfg: BenchConfig, device: torch.device, backends: list[str], new_row: NewRow) -> list[BenchRow]:
    """One ``roof_paired`` row per backend for the key shape of docs/targets.md (N=961, default tail)."""
    out = []
    (H, depth), n, T = DEFAULT_SHAPE, PAIRED_N, cfg.n_lambda
    tail = make_tail(H, cfg.out, depth, cfg.seed, device)
    h = make_inputs(n, H, cfg.seed + 1, device)
    flop = useful_flops_per_pair(T, H, cfg.out, depth) * n_pairs(n)
    for b in backends:
        row = _paired_row(
            cfg,
            device,
            new_row,
            functools.partial(backend_fn(b), h, tail, T),
            flop,
            dict(backend=backend_label(b, h, tail), N=n, H=H, O=cfg.out, T=T, depth=depth, dtype="float32"),
            torch.float32,
        )
        row.fraction_recomputed = fraction_recomputed(b)  # of the backend's last call, the last one timed
        row.kernel = ran_kernel(b)
        if row.fraction_recomputed is not None:
            row.note += f"; {100 * row.fraction_recomputed:.2f}% of pairs recomputed in fp64"
        out.append(row)
    return out


def _paired_row(cfg: BenchConfig, device: torch.device, new_row: NewRow, fn, flop: float, shape: dict, dtype: torch.dtype) -> BenchRow:
    """A ``roof_paired`` row: ``fn`` and a ``dtype`` matmul timed alternately (``fn`` runs last)."""
    ratios, secs, roofs = paired_roof(fn, flop, device, max(cfg.repeats, 5), cfg.roof_size, dtype)
    q = np.percentile(ratios, [25, 50, 75])
    log(
        f"paired roof ({shape['backend']}, {shape['dtype']}, N={shape['N']}): median ratio {q[1]:.3f} (IQR {q[0]:.3f}-{q[2]:.3f})",
        cfg.progress,
    )
    return new_row(
        kind="roof_paired",
        **shape,
        repeats=len(ratios),
        time_median_s=float(np.median(secs)),
        time_min_s=min(secs),
        time_max_s=max(secs),
        frac_roof=float(q[1]),
        note=f"roof ({shape['dtype']} matmul) and backend timed alternately {len(ratios)}x; per-repetition ratio IQR "
        f"{q[0]:.3f}-{q[2]:.3f}, min-max {min(ratios):.3f}-{max(ratios):.3f}; roof {min(roofs):.0f}-{max(roofs):.0f} GFLOP/s",
    )


def fp64_roof_rows(cfg: BenchConfig, device: torch.device, new_row: NewRow) -> list[BenchRow]:
    """The fused CPU kernel on an fp64 model (``auto``) at the key shape (N=961, default tail): its fraction of
    the fp64 matmul roof, timed alternately, and its speed-up over the torch-op fp64 path (``backend="torch"``) at
    the same N in the same run. Checked against the NumPy reference (fp64 tolerance) before any timing."""
    (H, depth), n, T = DEFAULT_SHAPE, PAIRED_N, cfg.n_lambda
    tail = make_tail(H, cfg.out, depth, cfg.seed, device).double()
    h = make_inputs(n, H, cfg.seed + 1, device).double()
    shape = dict(backend=backend_label("auto", h, tail), N=n, H=H, O=cfg.out, T=T, depth=depth, dtype="float64")
    if backend_that_runs("auto", h[:2], tail) != "cpu":
        return [new_row(kind="roof_paired", **shape, status="SKIPPED: the fused CPU kernel does not run fp64 here")]
    L_ref, _ = reference_timed(h[: cfg.n_ref], tail, T)
    diff, why = check_agreement(lambda: core.connectivity(h[: cfg.n_ref], tail, T), L_ref, ATOL[torch.float64])
    if why is not None:
        return [refuse(new_row(kind="roof_paired", **shape, check_n=cfg.n_ref, max_abs_diff=diff), why)]
    flop = useful_flops_per_pair(T, H, cfg.out, depth) * n_pairs(n)
    kernel = functools.partial(core.connectivity, h, tail, T)
    row = _paired_row(cfg, device, new_row, kernel, flop, shape, torch.float64)
    row.kernel = ran_kernel("auto")
    ops = functools.partial(core.connectivity, h, tail, T, "torch")
    # the torch-op path timed alternately with the kernel too (one ratio per repetition: drift cancels)
    times = [(time_fn(ops, device, 1).min, time_fn(kernel, device, 1).min) for _ in range(max(2, cfg.repeats // 2))]
    t_ops = float(np.median([a for a, _ in times]))
    row.check_n, row.max_abs_diff = cfg.n_ref, diff
    row.speedup_vs_torch = float(np.median([a / b for a, b in times]))
    row.note += (
        f"; torch-op fp64 path (backend='torch') {t_ops:.3g} s median, timed alternately with the kernel "
        f"{len(times)}x: speed-up {row.speedup_vs_torch:.1f}x"
    )
    log(f"fp64 kernel N={n}: {row.time_median_s:.3g} s, torch ops {t_ops:.3g} s", cfg.progress)
    return [row]


def lmn_parts_rows(
    cfg: BenchConfig, device: torch.device, e2e_L: dict[int, tuple[BenchRow, torch.Tensor]], e2e_skip: dict[int, str], new_row: NewRow
) -> list[BenchRow]:
    """End-to-end ``gm.lmn`` split into L / eigen / the rest, for every N of the sweep.

    ``time_L_s`` is the sweep's median ``gm.connectivity`` time of that N (the backend ``"auto"``
    picks, else the first timed one; shape :func:`~.sweep.e2e_shape`); ``time_eigen_s`` times
    ``torch.linalg.eigvalsh`` of that ``L`` in float64; ``time_median_s`` is L plus the measured
    ``gm.lmn_from_connectivity(L)``; ``time_entropy_s`` is the rest of ``lmn_from_connectivity``
    (checks, conversion, threshold, normalisation, entropy, sort): its median minus eigen's, at least 0.
    The eigensolver is warmed up once first.

    Eigen and ``lmn_from_connectivity`` are timed in pairs, one after the other, from the same samples
    (:func:`e2e_split`), so the parts add up: ``total = L + eigen + entropy`` and ``eigen_share <= 1`` whatever the
    load (timed separately, a loaded 2-core machine once gave an eigen share of 1.263 and a total below L + eigen).
    """
    H, depth = e2e_shape(cfg)
    shape = {"H": H, "O": cfg.out, "T": cfg.n_lambda, "depth": depth, "dtype": "float32"}
    core.lmn_from_connectivity(torch.eye(2, device=device))  # warm-up: the eigensolver's first call loads its library
    out = []
    for N in cfg.ns:
        if N not in e2e_L:
            out.append(new_row(kind="lmn_e2e", N=N, **shape, status=e2e_skip.get(N) or "SKIPPED: no L time for this N"))
            continue
        src, L = e2e_L[N]
        t_eig, t_post = [], []
        for _ in range(cfg.repeats):  # paired samples: eigen, then the whole lmn_from_connectivity, each repetition
            t_eig.append(time_fn(functools.partial(torch.linalg.eigvalsh, L.to(torch.float64)), device, 1).times[0])
            t_post.append(time_fn(functools.partial(core.lmn_from_connectivity, L), device, 1).times[0])
            if sum(t_eig) + sum(t_post) > cfg.max_row_seconds:
                break
        split = e2e_split(src.time_median_s, Timing(t_eig), Timing(t_post))
        r = new_row(
            kind="lmn_e2e",
            backend=src.backend,
            N=N,
            **shape,
            pairs=n_pairs(N),
            repeats=min(src.repeats, len(t_post)),
            time_iqr_s=src.time_iqr_s + Timing(t_post).iqr,
            time_min_s=src.time_min_s + min(t_post),
            time_max_s=src.time_max_s + max(t_post),
            **split,
            kernel=src.kernel,
            note="total = L (sweep row's median) + eigen + entropy (medians over the same paired samples); "
            "eigen = eigvalsh(float64); entropy = the rest of lmn_from_connectivity (its time - eigen in "
            "the same repetition, >= 0); spread summed over L and lmn_from_connectivity",
        )
        out.append(r)
        log(
            f"lmn e2e N={N}: L {src.time_median_s * 1e3:.2f} ms, eigen {r.time_eigen_s * 1e3:.2f} ms, "
            f"entropy {r.time_entropy_s * 1e3:.3f} ms, eigen share {r.eigen_share:.3f}",
            cfg.progress,
        )
    return out


def e2e_split(l_median: float, eigen: Timing, post: Timing) -> dict[str, float]:
    """The end-to-end fields of an ``lmn_e2e`` row from L's median and paired samples of eigen and of the whole
    ``lmn_from_connectivity`` (``eigen.times[i]`` and ``post.times[i]`` from the same repetition).

    ``time_entropy_s`` is the median over repetitions of ``max(post_i - eigen_i, 0)``; ``time_median_s`` is
    ``L + eigen + entropy``, so ``time_median_s >= time_L_s + time_eigen_s`` and ``0 <= eigen_share <= 1`` always.
    """
    n = min(len(eigen.times), len(post.times))
    rest = [max(p - e, 0.0) for e, p in zip(eigen.times[:n], post.times[:n])]
    t_eig, t_rest = float(np.median(eigen.times[:n])), float(np.median(rest))
    total = l_median + t_eig + t_rest
    return {
        "time_median_s": total,
        "time_L_s": l_median,
        "time_eigen_s": t_eig,
        "time_entropy_s": t_rest,
        "eigen_share": t_eig / total if total > 0 else 0.0,
    }


def train_overhead_rows(
    cfg: BenchConfig, device: torch.device, backends: list[str], new_row: NewRow, refused: dict[str, str] | None = None
) -> list[BenchRow]:
    """One ``train_overhead`` row per backend: step time with LMN tracking / without.

    A backend in ``refused`` (failed its agreement check in this run) gets a refused row, untimed.
    """
    out = []
    n = min(cfg.train_n, ADD_MODULUS**2)
    n_train = len(make_task("add", TRAIN_FRACTION, cfg.seed).train_idx)
    for b in backends:
        r = new_row(kind="train_overhead", backend=b, N=n, H=100, O=ADD_MODULUS, T=cfg.n_lambda, depth=1, dtype="float32")
        if refused and b in refused:
            out.append(refuse(r, refused[b]))
            continue
        try:
            plain, tracked = train_overhead(
                device, n_track=n, backend=b, steps=cfg.repeats, seed=cfg.seed, budget_s=cfg.max_row_seconds, n_lambda=cfg.n_lambda
            )
        except Exception as e:
            out.append(refuse(r, f"training step with tracking raised {type(e).__name__}: {str(e)[:160]}"))
            continue
        r.time_median_s, r.time_min_s, r.time_max_s, r.time_iqr_s = tracked.median, tracked.min, tracked.max, tracked.iqr
        r.repeats = len(tracked.times)
        r.overhead_ratio = tracked.median / plain.median
        r.kernel = ran_kernel(b)
        r.note = (
            f"addition mod 31, GrokMLP (shared embedding), full-batch AdamW on {n_train} samples; "
            f"LMN of layer-1 output on {n} inputs every step; plain step {plain.median * 1e3:.3f} ms"
        )
        out.append(r)
        log(
            f"train overhead ({b}, N={n}): step {plain.median * 1e3:.2f} ms, with LMN {tracked.median * 1e3:.2f} ms, "
            f"ratio {r.overhead_ratio:.1f}",
            cfg.progress,
        )
    return out
