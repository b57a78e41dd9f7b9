"""Rows, accounting, timing and the refusal rule of the benchmark harness.

Every result is a :class:`BenchRow`. A backend is timed only after its ``L`` agreed with the NumPy
reference (:func:`check_agreement`); a row that did not agree is :func:`refuse`-d: its status says
why and every speed field is cleared.
"""

from __future__ import annotations

import functools
import math
import platform
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from ..foundation.runtime import synchronize

#: fp32 agreement tolerance with the NumPy reference (docs/targets.md).
ATOL = {torch.float32: 1e-5, torch.float64: 1e-10}


# --------------------------------------------------------------------------------------------
# rows


@dataclass
class BenchRow:
    """One benchmark result (one CSV line). Speed fields are ``None`` unless ``status == "ok"``.

    ``kind`` is one of ``connectivity`` (a backend or a baseline computing ``L``), ``roof`` (large
    matmul), ``roof_paired`` (fraction of the roof with the matmul and the backend timed alternately),
    ``lmn_e2e`` (L + eigen + entropy, split), ``train_overhead``, ``scaling`` (fitted exponent of time vs N).
    """

    # what ran where
    run_id: str = ""
    timestamp: str = ""
    machine: str = ""
    platform: str = ""
    cpu: str = ""
    gpu: str = ""
    device: str = ""
    threads: int | None = None
    torch_version: str = ""
    triton_version: str = ""
    kind: str = ""
    backend: str = ""
    # the workload
    N: int | None = None
    H: int | None = None
    O: int | None = None
    T: int | None = None
    depth: int | None = None
    dtype: str = ""
    pairs: int | None = None
    repeats: int | None = None
    # speed (SPEED_FIELDS, cleared by refuse)
    time_median_s: float | None = None
    time_iqr_s: float | None = None
    time_min_s: float | None = None
    time_max_s: float | None = None
    pairs_per_s: float | None = None
    gflop: float | None = None
    gflops: float | None = None
    frac_roof: float | None = None
    speedup_vs_reference: float | None = None
    speedup_vs_naive: float | None = None
    speedup_vs_torch: float | None = None
    time_L_s: float | None = None
    time_eigen_s: float | None = None
    time_entropy_s: float | None = None
    eigen_share: float | None = None
    overhead_ratio: float | None = None
    exponent: float | None = None
    # the agreement check and the outcome
    check_n: int | None = None
    max_abs_diff: float | None = None
    measured_pairs: int | None = None
    #: share of the pairs an fp32 backend flagged as ill-conditioned and recomputed in fp64 (core.last_run_info)
    fraction_recomputed: float | None = None
    status: str = "ok"
    note: str = ""
    #: what ran, as ``<backend>/<kernel variant>`` of the library call timed (``core.last_run_info``): ``cpu/fp32``,
    #: ``cpu/fp64``, ``triton/v1``, ``triton/v2``, ``torch/mlp``, ``torch/generic``; empty for baselines and the roof
    kernel: str = ""


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(BenchRow))
SPEED_FIELDS = (
    "time_median_s",
    "time_iqr_s",
    "time_min_s",
    "time_max_s",
    "pairs_per_s",
    "gflops",
    "frac_roof",
    "speedup_vs_reference",
    "speedup_vs_naive",
    "speedup_vs_torch",
    "time_L_s",
    "time_eigen_s",
    "time_entropy_s",
    "eigen_share",
    "overhead_ratio",
    "exponent",
)


# --------------------------------------------------------------------------------------------
# accounting


def n_pairs(n: int) -> int:
    """Number of pairs ``i < j`` of ``n`` samples: ``n (n - 1) / 2``."""
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    return n * (n - 1) // 2


def useful_flops_per_pair(n_lambda: int, hidden: int, out: int, depth: int) -> int:
    """Useful FLOP of one pair: ``2 * T * (H * O + (depth - 1) * H * H)``.

    Args:
        n_lambda: ``T``, interpolation points per pair.
        hidden: ``H``, width of the hidden layers (and of ``h``).
        out: ``O``, number of logits.
        depth: number of nonlinear stages after the absorbed first Linear (1 = default tail).

    Raises:
        ValueError: a size is < 1.
    """
    for name, v in (("n_lambda", n_lambda), ("hidden", hidden), ("out", out), ("depth", depth)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1; got {v}")
    return 2 * n_lambda * (hidden * out + (depth - 1) * hidden * hidden)


def useful_gflops(n: int, n_lambda: int, hidden: int, out: int, depth: int, seconds: float) -> float:
    """Useful GFLOP/s of computing the ``n x n`` connectivity matrix in ``seconds``.

    Raises:
        ValueError: ``seconds <= 0`` or a size is < 1.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0; got {seconds}")
    return useful_flops_per_pair(n_lambda, hidden, out, depth) * n_pairs(n) / seconds / 1e9


def fill_speed(row: BenchRow, timing: Timing, roof_gflops: float | None) -> BenchRow:
    """Fill time, pairs/s, GFLOP and GFLOP/s of a ``connectivity`` row from ``timing`` (needs N, H, O, T, depth)."""
    pairs = n_pairs(row.N)
    row.pairs = pairs
    row.repeats = len(timing.times)
    row.time_median_s, row.time_iqr_s = timing.median, timing.iqr
    row.time_min_s, row.time_max_s = timing.min, timing.max
    row.pairs_per_s = pairs / timing.median
    row.gflop = useful_flops_per_pair(row.T, row.H, row.O, row.depth) * pairs / 1e9
    row.gflops = row.gflop / timing.median
    row.frac_roof = row.gflops / roof_gflops if roof_gflops else None
    return row


def fit_exponent(ns: Sequence[float], ts: Sequence[float]) -> float:
    """Least-squares slope of ``log t`` vs ``log n`` (time ~ n ** slope).

    Raises:
        ValueError: fewer than two distinct ``n`` or a non-positive value.
    """
    n_arr, t_arr = np.asarray(ns, dtype=float), np.asarray(ts, dtype=float)
    if n_arr.shape != t_arr.shape or len(np.unique(n_arr)) < 2:
        raise ValueError("fit_exponent needs >= 2 distinct n with one time each")
    if (n_arr <= 0).any() or (t_arr <= 0).any():
        raise ValueError("fit_exponent needs positive n and times")
    return float(np.polyfit(np.log(n_arr), np.log(t_arr), 1)[0])


# --------------------------------------------------------------------------------------------
# machine


def cpu_name() -> str:
    """CPU model name from ``/proc/cpuinfo`` (Linux) or :func:`platform.processor`."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, object]:
    """Fields of :class:`BenchRow` that describe the machine and the software versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return {
        "machine": socket.gethostname() or platform.node(),
        "platform": platform.platform(terse=True),
        "cpu": cpu_name(),
        "gpu": gpu,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "triton_version": triton_version,
    }


# --------------------------------------------------------------------------------------------
# timing


@dataclass
class Timing:
    """Wall-clock times of repeated runs, in seconds, and the last run's return value."""

    times: list[float]
    result: object = None

    @property
    def median(self) -> float:
        return float(np.median(self.times))

    @property
    def iqr(self) -> float:
        q1, q3 = np.percentile(self.times, [25, 75])
        return float(q3 - q1)

    @property
    def min(self) -> float:
        return float(min(self.times))

    @property
    def max(self) -> float:
        return float(max(self.times))


def time_fn(fn: Callable[[], object], device: torch.device, repeats: int, budget_s: float | None = None) -> Timing:
    """Time ``repeats`` calls of ``fn`` (synchronising the device around each).

    With ``budget_s``, stops early (after at least one call) when one more call like the last
    would take the total past ``budget_s``.

    Raises:
        ValueError: ``repeats < 1``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    times: list[float] = []
    result = None
    for _ in range(repeats):
        result = None  # free the previous result before the next call
        synchronize(device)
        t0 = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        if budget_s is not None and sum(times) + times[-1] > budget_s:
            break
    return Timing(times, result)


def estimate_seconds(call: Callable[[int], object], n: int, device: torch.device, budget_s: float, start: int = 128) -> float:
    """Predicted seconds of ``call(n)`` from timing ``call(m)`` on ``m = start, 2 start, ...`` rows, scaled by pairs.

    Small probes overestimate (fixed costs per call), so the probe doubles while the prediction is above
    ``budget_s``, ``2 m <= n`` and the next probe is cheap (``4 x`` the last one below ``budget_s / 10``).
    """
    m = min(n, start)
    while True:
        t = time_fn(functools.partial(call, m), device, 2).min
        est = t * n_pairs(n) / max(1, n_pairs(m))
        if est <= budget_s or 2 * m > n or 4 * t > budget_s / 10:
            return est
        m *= 2


# --------------------------------------------------------------------------------------------
# the refusal rule


def max_abs_diff(L: torch.Tensor | np.ndarray, L_ref: torch.Tensor | np.ndarray) -> float:
    """``max |L - L_ref|`` in float64 (``inf`` if shapes differ or ``L`` has NaN)."""
    a = L.detach().cpu().double().numpy() if isinstance(L, torch.Tensor) else np.asarray(L, dtype=np.float64)
    b = L_ref.detach().cpu().double().numpy() if isinstance(L_ref, torch.Tensor) else np.asarray(L_ref, dtype=np.float64)
    if a.shape != b.shape or not np.isfinite(a).all():
        return math.inf
    return float(np.abs(a - b).max())


def refusal(diff: float, atol: float) -> str | None:
    """``"REFUSED: ..."`` when ``diff`` exceeds ``atol`` (or is NaN), else ``None``."""
    if not diff <= atol:
        return f"REFUSED: L disagrees with the NumPy reference (max abs diff {diff:.3g} > {atol:g})"
    return None


def check_agreement(
    compute: Callable[[], torch.Tensor], L_ref: torch.Tensor | np.ndarray, atol: float = ATOL[torch.float32]
) -> tuple[float, str | None]:
    """Run ``compute`` (an ``L`` on the reference subset) and compare it with ``L_ref``: the check before any timing.

    ``atol`` defaults to the fp32 tolerance (:data:`ATOL`).

    Returns:
        ``(max_abs_diff, why)``: ``why`` is ``None`` when ``L`` agrees within ``atol``, else the
        ``"REFUSED: ..."`` status (also when ``compute`` raised; the diff is then NaN).
    """
    try:
        with torch.no_grad():
            diff = max_abs_diff(compute(), L_ref)
    except Exception as e:
        return math.nan, f"REFUSED: backend raised {type(e).__name__}: {str(e)[:160]}"
    return diff, refusal(diff, atol)


def refuse(row: BenchRow, why: str) -> BenchRow:
    """Mark ``row`` refused: ``status = why`` (prefixed ``REFUSED:``) and every speed field cleared."""
    row.status = why if why.startswith("REFUSED") else f"REFUSED: {why}"
    for name in SPEED_FIELDS:
        setattr(row, name, None)
    return row


def ran_kernel(backend: str) -> str:
    """``<backend>/<kernel>`` of the last library call (``core.last_run_info``); ``""`` for a baseline (``naive``). The
    C++ kernel with its GEMMs in AVX-512F registers is ``cpu/fp32+avx512`` (``cpu/fp32``: AVX2)."""
    if backend == "naive":
        return ""
    from ..compute import core
    from ..kernels import cpu_fused

    info = core.last_run_info()
    if not info:
        return ""
    if not info.get("kernel"):
        return str(info["backend"])
    isa = "+avx512" if info["backend"] == "cpu" and cpu_fused.build_info()["avx512"] else ""
    return f"{info['backend']}/{info['kernel']}{isa}"


def fraction_recomputed(backend: str) -> float | None:
    """Share of pairs the last call of library backend ``backend`` recomputed in fp64 (``None`` for baselines)."""
    if backend == "naive":
        return None
    from ..compute import core

    return core.last_run_info().get("fraction_recomputed")
