"""The benchmark sweep: for every tail shape and N, each backend beside the baselines of the same run.

:func:`sweep_shapes` runs the (H, depth, N) grid of a :class:`BenchConfig`: per (H, depth) the
reference and naive baselines and every backend's agreement check, before any timing
(:func:`prepare_shape`), then per N each backend's ``L`` time (:func:`n_rows`). The roof row
(:func:`roof_row`) comes before it and the exponents (:func:`scaling_rows`) after it.
"""

from __future__ import annotations

import functools
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..compute import core
from .baselines import TRITON_VARIANTS, backend_fn, backend_that_runs, matmul_roof, naive_seconds_per_pair, reference_timed
from .harness import (
    BenchRow,
    Timing,
    check_agreement,
    estimate_seconds,
    fill_speed,
    fit_exponent,
    fraction_recomputed,
    machine_info,
    n_pairs,
    ran_kernel,
    refuse,
    time_fn,
)
from .workloads import make_inputs, make_tail

FULL_N = (64, 256, 961, 2048, 4096)
FULL_N_GPU = (64, 256, 961, 2048, 4096, 8192, 16384)
FULL_HIDDEN = (100, 256, 512)
FULL_DEPTH = (1, 2)
QUICK_N = (64, 256)
QUICK_HIDDEN = (100,)
QUICK_DEPTH = (1, 2)
#: the default tail (docs/lmn.md, "Which layer"): H=100, depth 1 (never capped by ``max_n_other``)
DEFAULT_SHAPE = (100, 1)

NewRow = Callable[..., BenchRow]


@dataclass
class BenchConfig:
    """What one benchmark run measures (see ``add_arguments`` of the command for the meaning of each field)."""

    ns: Sequence[int] = FULL_N
    hiddens: Sequence[int] = FULL_HIDDEN
    depths: Sequence[int] = FULL_DEPTH
    backends: Sequence[str] | None = None
    out: int = 31
    n_lambda: int = 21
    repeats: int = 5
    device: str = "auto"
    n_ref: int = 24
    n_naive: int = 128
    max_row_seconds: float = 60.0
    max_n_other: int | None = None
    roof_size: int | None = None
    lmn_parts: bool = True
    paired_roof: bool = True
    fp64_roof: bool = True
    train_n: int | None = 961
    seed: int = 0
    progress: bool = True


def default_backends(device: torch.device) -> list[str]:
    """``["torch", "auto"]`` on CPU (``auto`` = the fused C++ kernel there); on CUDA ``torch``, both Triton kernel
    variants (``triton-v1``, ``triton-v2``: ``baselines.TRITON_VARIANTS``) and ``auto``.

    An ``auto`` that resolves to another listed backend is timed once.
    """
    return ["torch", *TRITON_VARIANTS, "auto"] if device.type == "cuda" else ["torch", "auto"]


def check_backends(names: Sequence[str]) -> list[str]:
    """``names`` without repeats, each checked to be a library backend other than ``reference``.

    Raises:
        ValueError: an unknown backend name.
    """
    backends = list(dict.fromkeys(names))
    allowed = [x for x in core.BACKENDS if x != "reference"] + list(TRITON_VARIANTS)
    for b in backends:
        if b not in allowed:
            raise ValueError(f"--backends takes names from {allowed}; got {b!r}")
    return backends


def row_maker(device: torch.device) -> NewRow:
    """``new_row(**fields)``: a :class:`BenchRow` of this run (one run id, the machine's fields, a timestamp)."""
    meta = machine_info(device)
    run_id = time.strftime("%Y%m%dT%H%M%SZ-", time.gmtime()) + uuid.uuid4().hex[:6]

    def new_row(**kw) -> BenchRow:
        return BenchRow(run_id=run_id, timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **meta, **kw)

    return new_row


def log(msg: str, progress: bool) -> None:
    """Write ``msg`` to stderr above the progress bar when ``progress``."""
    if progress:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)


def e2e_shape(cfg: BenchConfig) -> tuple[int, int]:
    """(H, depth) of the end-to-end split: H=100 if swept else the first H, the smallest depth."""
    return (100 if 100 in cfg.hiddens else cfg.hiddens[0]), min(cfg.depths)


def roof_row(cfg: BenchConfig, device: torch.device, new_row: NewRow) -> BenchRow:
    """The ``roof`` row: the large fp32 matmul's GFLOP/s in this run (``max(3, repeats)`` timed runs)."""
    row, roof, size = measured_roof_row(device, cfg.roof_size, max(3, cfg.repeats), new_row)
    log(f"matmul roof {size}^2 fp32: {roof:.1f} GFLOP/s ({torch.get_num_threads()} threads)", cfg.progress)
    return row


def measured_roof_row(device: torch.device, size: int, repeats: int, new_row: NewRow) -> tuple[BenchRow, float, int]:
    """Time the ``size``-square fp32 matmul (:func:`matmul_roof`) and make its ``roof`` row: ``(row, GFLOP/s, size)``
    (the bench's sweep and the GPU day's timing stage both start with it)."""
    roof, t, size = matmul_roof(device, size, repeats=repeats)
    note = f"({size},{size}) @ ({size},{size}) fp32"
    if device.type == "cuda":
        note += f", allow_tf32={torch.backends.cuda.matmul.allow_tf32}"
    row = new_row(
        kind="roof",
        backend="torch.mm",
        N=size,
        dtype="float32",
        repeats=len(t.times),
        time_median_s=t.median,
        time_iqr_s=t.iqr,
        time_min_s=t.min,
        time_max_s=t.max,
        gflop=2 * size**3 / 1e9,
        gflops=roof,
        frac_roof=1.0,
        note=note,
    )
    return row, roof, size


# --------------------------------------------------------------------------------------------
# one tail shape


@dataclass
class ShapeRun:
    """One (H, depth) of the sweep, prepared before any backend is timed.

    Attributes:
        H, depth, out, n_lambda: the tail's shape.
        tail: the seeded tail; ``h``: ``(max N, H)`` inputs (each N takes the first N rows).
        n_ref, ref_per_pair: reference subset size and the reference's seconds per pair.
        n_naive, naive_per_pair: naive subset size and its seconds per pair (``None`` if refused).
        checks: backend (and ``"naive"``) -> ``(max abs diff, REFUSED status or None)`` on the reference subset.
        resolved: backend -> what it runs here.
        timed: the backends timed (``auto`` is dropped when it resolves to another listed backend).
        e2e_backend: the timed backend whose L feeds the end-to-end split (the one ``auto`` picks, else the first).
    """

    H: int
    depth: int
    out: int
    n_lambda: int
    tail: nn.Module
    h: torch.Tensor
    n_ref: int
    ref_per_pair: float
    n_naive: int
    naive_per_pair: float | None
    checks: dict[str, tuple[float, str | None]]
    resolved: dict[str, str]
    timed: list[str]
    e2e_backend: str | None

    @property
    def shape(self) -> dict[str, object]:
        return {"H": self.H, "O": self.out, "T": self.n_lambda, "depth": self.depth, "dtype": "float32"}

    def label(self, b: str) -> str:
        """``b``, or ``"b->what it runs"`` when they differ."""
        return b if self.resolved[b] == b else f"{b}->{self.resolved[b]}"

    def note(self, b: str) -> str:
        """Says so on the row of the backend an untimed ``auto`` resolves to."""
        if "auto" in self.resolved and "auto" not in self.timed and self.resolved["auto"] == b:
            return f"backend 'auto' resolves to {b!r} here"
        return ""

    def compute(self, b: str, n: int) -> Callable[[], torch.Tensor]:
        """``L`` of the first ``n`` inputs with backend (or baseline) ``b``, as a call with no arguments."""
        return functools.partial(backend_fn(b), self.h[:n], self.tail, self.n_lambda)


def prepare_shape(cfg: BenchConfig, device: torch.device, backends: Sequence[str], H: int, depth: int) -> ShapeRun:
    """Build the tail and inputs of (H, depth), time the baselines and check every backend against the reference.

    The reference runs on the first ``cfg.n_ref`` inputs; the naive baseline and each backend compute ``L``
    on the same inputs and are refused when they disagree (:func:`check_agreement`). The naive baseline is
    then timed on the first ``cfg.n_naive`` inputs.
    """
    T, n_max = cfg.n_lambda, max(cfg.ns)
    tail = make_tail(H, cfg.out, depth, cfg.seed, device)
    h = make_inputs(n_max, H, cfg.seed + 1, device)
    n_ref, n_naive = min(cfg.n_ref, n_max), min(cfg.n_naive, n_max)
    L_ref, ref_pp = reference_timed(h[:n_ref], tail, T)
    checks = {b: check_agreement(functools.partial(backend_fn(b), h[:n_ref], tail, T), L_ref) for b in ["naive", *backends]}
    naive_pp = None
    if checks["naive"][1] is None:
        naive_pp = naive_seconds_per_pair(h[:n_naive], tail, T, device, cfg.repeats, budget_s=cfg.max_row_seconds / 4)
    resolved = {b: backend_that_runs(b, h[:2], tail) for b in backends}
    timed = [b for b in backends if not (b == "auto" and resolved[b] != b and resolved[b] in backends)]
    auto_is = backend_that_runs("auto", h[:2], tail)
    e2e_backend = next((b for b in timed if resolved[b] == auto_is), timed[0] if timed else None)
    return ShapeRun(H, depth, cfg.out, T, tail, h, n_ref, ref_pp, n_naive, naive_pp, checks, resolved, timed, e2e_backend)


# --------------------------------------------------------------------------------------------
# one N of one shape


@dataclass
class SweepState:
    """What the sweep collects across shapes for the rows after it.

    Attributes:
        e2e_shape: (H, depth) whose L times feed the end-to-end split.
        l_times: (H, depth, label) -> {N: median L seconds} (for the exponents).
        e2e_L: N -> (the e2e backend's row, its L) on ``e2e_shape``.
        e2e_skip: N -> the status of the e2e backend's row when it was not timed.
        refused: backend -> first refusal (with its shape) in this run.
        timed: the timed backends of the last shape.
    """

    e2e_shape: tuple[int, int]
    timed: list[str]
    l_times: dict[tuple[int, int, str], dict[int, float]] = field(default_factory=dict)
    e2e_L: dict[int, tuple[BenchRow, torch.Tensor]] = field(default_factory=dict)
    e2e_skip: dict[int, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    def start_shape(self, s: ShapeRun) -> None:
        """Record the refusals and the timed backends of a new shape."""
        for b, (_, why) in s.checks.items():
            if why:
                self.refused.setdefault(b, f"{why} (H={s.H}, depth={s.depth})")
        self.timed = s.timed

    def record(self, s: ShapeRun, b: str, N: int, row: BenchRow, timing: Timing | None) -> None:
        """Keep the L time of a timed row (and its L for the e2e split), or why the e2e backend was not timed."""
        is_e2e = (s.H, s.depth) == self.e2e_shape and b == s.e2e_backend
        if timing is None:
            if is_e2e:
                self.e2e_skip[N] = row.status
            return
        self.l_times.setdefault((s.H, s.depth, row.backend), {})[N] = row.time_median_s
        if is_e2e:
            self.e2e_L[N] = (row, timing.result)


def baseline_rows(s: ShapeRun, N: int, roof: float, new_row: NewRow) -> tuple[list[BenchRow], float, float | None]:
    """The ``reference`` and ``naive`` rows of N, extrapolated per pair from their subsets.

    Returns:
        ``(rows, reference seconds, naive seconds or None)``.
    """
    base = {"N": N, **s.shape, "check_n": s.n_ref}
    ref_t = s.ref_per_pair * n_pairs(N)
    nv_t = s.naive_per_pair * n_pairs(N) if s.naive_per_pair else None
    ref = fill_speed(new_row(kind="connectivity", backend="reference", **base), Timing([ref_t]), roof)
    ref.measured_pairs, ref.max_abs_diff, ref.speedup_vs_reference = n_pairs(s.n_ref), 0.0, 1.0
    ref.speedup_vs_naive = nv_t / ref_t if nv_t else None
    ref.note = f"NumPy float64, extrapolated per pair from N={s.n_ref}"
    naive = new_row(kind="connectivity", backend="naive", **base, max_abs_diff=s.checks["naive"][0])
    if s.checks["naive"][1]:
        return [ref, refuse(naive, s.checks["naive"][1])], ref_t, nv_t
    fill_speed(naive, Timing([nv_t]), roof)
    naive.measured_pairs = n_pairs(s.n_naive)
    naive.speedup_vs_reference, naive.speedup_vs_naive = ref_t / nv_t, 1.0
    naive.note = f"plain torch baseline (bench.naive_connectivity), extrapolated per pair from N={s.n_naive}"
    return [ref, naive], ref_t, nv_t


def skip_reason(cfg: BenchConfig, device: torch.device, s: ShapeRun, b: str, N: int) -> str | None:
    """Why backend ``b`` is not timed at N: a non-default shape above ``cfg.max_n_other``, or a predicted call too long."""
    if (s.H, s.depth) != DEFAULT_SHAPE and cfg.max_n_other and N > cfg.max_n_other:
        return f"SKIPPED: shapes other than H=100 depth=1 run up to N={cfg.max_n_other} here (--all-n to run them)"
    fn = backend_fn(b)
    est = estimate_seconds(lambda m: fn(s.h[:m], s.tail, s.n_lambda), N, device, cfg.max_row_seconds)
    if est > cfg.max_row_seconds:
        why = f"SKIPPED: estimated {est:.0f} s per call > max_row_seconds={cfg.max_row_seconds:g}"
        log(f"{s.label(b)} N={N} H={s.H} depth={s.depth}: {why}", cfg.progress)
        return why
    return None


def backend_row(
    cfg: BenchConfig, device: torch.device, s: ShapeRun, b: str, N: int, roof: float, new_row: NewRow
) -> tuple[BenchRow, Timing | None]:
    """Backend ``b``'s ``connectivity`` row at N: refused (failed its check), skipped, or timed (``repeats`` calls).

    Returns:
        ``(row, timing)``, ``timing`` ``None`` when not timed.
    """
    r = new_row(kind="connectivity", backend=s.label(b), N=N, **s.shape, check_n=s.n_ref, max_abs_diff=s.checks[b][0], note=s.note(b))
    if s.checks[b][1]:
        return refuse(r, s.checks[b][1]), None
    why = skip_reason(cfg, device, s, b, N)
    if why:
        r.status = why
        return r, None
    timing = time_fn(s.compute(b, N), device, cfg.repeats, budget_s=cfg.max_row_seconds)
    r.fraction_recomputed, r.kernel = fraction_recomputed(b), ran_kernel(b)
    return fill_speed(r, timing, roof), timing


def n_rows(cfg: BenchConfig, device: torch.device, s: ShapeRun, N: int, roof: float, new_row: NewRow, state: SweepState) -> list[BenchRow]:
    """The rows of N on one shape: reference, naive, then each timed backend with its speed-ups.

    ``speedup_vs_torch`` is set on the backends after ``torch`` in the list (same N, same shape).
    """
    rows, ref_t, nv_t = baseline_rows(s, N, roof, new_row)
    torch_t = None
    for b in s.timed:
        r, timing = backend_row(cfg, device, s, b, N, roof, new_row)
        rows.append(r)
        state.record(s, b, N, r, timing)
        if timing is None:
            continue
        r.speedup_vs_reference = ref_t / r.time_median_s
        r.speedup_vs_naive = nv_t / r.time_median_s if nv_t else None
        if s.resolved[b] == "torch":
            torch_t = r.time_median_s
        elif torch_t is not None:
            r.speedup_vs_torch = torch_t / r.time_median_s
        log(
            f"{r.backend:>8} N={N:>5} H={s.H:>3} depth={s.depth}: {r.time_median_s * 1e3:10.2f} ms  "
            f"{r.gflops:7.2f} GFLOP/s  {r.frac_roof:.3f} of roof  x{r.speedup_vs_reference:.1f} vs reference"
            + (f"  x{r.speedup_vs_naive:.2f} vs naive" if r.speedup_vs_naive else ""),
            cfg.progress,
        )
    return rows


def scaling_rows(cfg: BenchConfig, l_times: dict[tuple[int, int, str], dict[int, float]], new_row: NewRow) -> list[BenchRow]:
    """One ``scaling`` row per (shape, backend) timed at >= 2 N: the exponent over N >= 256 (all N if fewer than two)."""
    rows = []
    for (H, depth, label), by_n in l_times.items():
        ns = sorted(by_n)
        if len(ns) < 2:
            continue
        big = [n for n in ns if n >= 256]
        fit_ns = big if len(big) >= 2 else ns
        rows.append(
            new_row(
                kind="scaling",
                backend=label,
                H=H,
                O=cfg.out,
                T=cfg.n_lambda,
                depth=depth,
                dtype="float32",
                exponent=fit_exponent(fit_ns, [by_n[n] for n in fit_ns]),
                note="log-log least-squares slope of L time vs N over N=" + ",".join(map(str, fit_ns)),
            )
        )
    return rows


def sweep_shapes(
    cfg: BenchConfig, device: torch.device, backends: Sequence[str], roof: float, new_row: NewRow
) -> tuple[list[BenchRow], SweepState]:
    """The ``connectivity`` rows of every (H, depth) and N of ``cfg`` (H outermost, N innermost).

    Returns:
        ``(rows, state)``: the rows and what the rows after the sweep need (:class:`SweepState`).
    """
    from tqdm import tqdm

    rows: list[BenchRow] = []
    state = SweepState(e2e_shape(cfg), timed=list(backends))
    bar = tqdm(
        total=len(cfg.hiddens) * len(cfg.depths) * len(cfg.ns), desc="bench", disable=None if cfg.progress else True, file=sys.stderr
    )
    for H in cfg.hiddens:
        for depth in cfg.depths:
            s = prepare_shape(cfg, device, backends, H, depth)
            state.start_shape(s)
            for N in cfg.ns:
                rows += n_rows(cfg, device, s, N, roof, new_row, state)
                bar.update(1)
    bar.close()
    return rows, state
