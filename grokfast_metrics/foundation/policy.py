"""The numerical policies every backend shares, defined once (docs/lmn.md, "Policies for the undefined cases").

- :data:`CONST_RTOL`: the constant-path rule. A path whose output varies by no more than
  rounding (``std_t(y) <= CONST_RTOL * eps * max_t |y|``) is a degenerate linear map: r² = 1.
- :data:`UNDERFLOW_TINY`: the underflow policy. An output whose spread over the path is below
  ``UNDERFLOW_TINY * sum_h |W_kh|`` (``W``: the tail's last Linear; 1 for a tail ending in an activation) is constant.
- :data:`FLAGGED`, :data:`FLAG_KAPPA`: the fp32 condition rule. A pair whose estimated condition
  error ``mean_k ~kappa_k``, ``kappa_k = eps * scale_k / std_t(yc_k)``, exceeds ``FLAG_KAPPA`` is written as ``FLAGGED`` by
  every fp32 backend and recomputed in fp64 by ``core`` (one mechanism for all backends).
- :func:`check_fits`: refuse before allocating what cannot fit.
- :func:`check_n_lambda`: what counts as a valid number of interpolation points.
- :func:`lambdas`: the interpolation grid ``lam_t = t / (T - 1)`` and its centred copy.
"""

from __future__ import annotations

import numbers
from pathlib import Path

import torch

#: Constant-path rule (docs/lmn.md, "Policies for the undefined cases"): ``std_t(y) <= CONST_RTOL * eps * max_t |y|`` counts as
#: constant (r² = 1).
CONST_RTOL = 16.0
#: Underflow policy (docs/lmn.md): ``std_t(y_k) <= UNDERFLOW_TINY * sum_h |W_kh|`` counts as constant (r² = 1), in every
#: float64 computation and in the yardstick (``exact.TINY``). Below it exp/erfc-based units have crossed the float64
#: underflow threshold (absolute error ~2.2e-308 |x|, flushed to 0 by some libraries) and no backend meets the 1e-10
#: contract; above it that error is below 1e-14 of the spread. Relative to the last Linear's row: invariant under
#: scaling an output, like r². (fp32 never reaches it: such pairs are flagged and recomputed in float64.)
UNDERFLOW_TINY = 1e-290
#: Sentinel an fp32 backend writes for a pair it cannot resolve to the accuracy contract (recomputed in fp64).
FLAGGED = -1.0
#: fp32 condition threshold (see docs/lmn.md, "Accuracy contract"): a pair whose estimated error
#: ``mean_k min(1, 2 sqrt(r2_k (1 - r2_k)) kappa_k + kappa_k^2)``, ``kappa_k = eps * scale_k / std_t(yc_k)``,
#: exceeds it is recomputed in fp64. 3e-5 keeps a 5x margin to the 1e-5 contract on the tested regimes at a 7%
#: cost on the default case: the measurements of each setting are in benchmarks/RESULTS.md, "Choosing FLAG_KAPPA".
FLAG_KAPPA = 3e-5
#: Most interpolation points per pair accepted (the paper uses 21; each point costs a tail forward per pair).
MAX_N_LAMBDA = 10_000


def check_n_lambda(n_lambda: object) -> int:
    """Validate the number of interpolation points per pair and return it as a plain ``int``.

    Raises:
        TypeError: not an integer (bools are refused).
        ValueError: fewer than 3 points (r² of 2 points is always 1) or more than :data:`MAX_N_LAMBDA`.
    """
    if isinstance(n_lambda, bool) or not isinstance(n_lambda, numbers.Integral):
        raise TypeError(f"n_lambda must be an int; got {type(n_lambda).__name__}")
    n_lambda = int(n_lambda)
    if n_lambda < 3:
        raise ValueError(f"n_lambda must be >= 3 (r2 of 2 points is always 1); got {n_lambda}")
    if n_lambda > MAX_N_LAMBDA:
        raise ValueError(f"n_lambda must be <= {MAX_N_LAMBDA} (the paper uses 21); got {n_lambda}")
    return n_lambda


def lambdas(n_lambda: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``lam_t = t / (T - 1)`` and its centred copy ``lam_t - 1/2`` (exact in binary floating point)."""
    lam = torch.arange(n_lambda, dtype=torch.float64, device=device) / (n_lambda - 1)
    return lam.to(dtype), (lam - 0.5).to(dtype)


def _meminfo_available() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (``None`` where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _address_space_left() -> int | None:
    """What ``RLIMIT_AS`` (``ulimit -v``) leaves this process: the limit minus its mapped size (``None``: no limit)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft == resource.RLIM_INFINITY or soft < 0:
            return None
        with open("/proc/self/status") as f:
            mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        return max(0, soft - mapped)
    except (ImportError, OSError, ValueError, StopIteration):
        return None


def _cgroup_roots() -> list[Path]:
    """This process's memory cgroup directories (v2 ``0::/path``, v1 ``memory:/path``), innermost first."""
    roots: list[Path] = []
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                base = (
                    Path("/sys/fs/cgroup")
                    if controllers == ""
                    else Path("/sys/fs/cgroup/memory")
                    if "memory" in controllers.split(",")
                    else None
                )
                if base is not None:
                    roots += [base / path.lstrip("/"), base]
    except (OSError, ValueError):
        return []
    return roots


def _cgroup_left(roots: list[Path] | None = None) -> int | None:
    """What the memory cgroup leaves: ``memory.max - memory.current`` (v2) or ``memory.limit_in_bytes -
    memory.usage_in_bytes`` (v1), the smallest over ``roots`` (``None``: no limit found)."""
    left = None
    for root in _cgroup_roots() if roots is None else roots:
        for limit_name, usage_name in (("memory.max", "memory.current"), ("memory.limit_in_bytes", "memory.usage_in_bytes")):
            try:
                limit = (Path(root) / limit_name).read_text().strip()
                if limit == "max" or int(limit) >= 1 << 60:  # v1 writes "no limit" as a huge number
                    continue
                usage = int((Path(root) / usage_name).read_text().strip())
            except (OSError, ValueError):
                continue
            room = max(0, int(limit) - usage)
            left = room if left is None else min(left, room)
    return left


def available_bytes(device: torch.device | str) -> int | None:
    """Free memory on ``device`` in bytes, ``None`` if unknown.

    CUDA: ``mem_get_info``. CPU: the smallest of ``MemAvailable``, what the address-space limit
    (``RLIMIT_AS``, ``ulimit -v``) leaves the process and what its memory cgroup (``memory.max``) leaves.
    """
    device = torch.device(device)
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
    except (RuntimeError, ValueError):
        return None
    if device.type != "cpu":
        return None
    known = [v for v in (_meminfo_available(), _address_space_left(), _cgroup_left()) if v is not None]
    return min(known) if known else None


def check_fits(out_bytes: int, work_bytes: int, device: torch.device | str) -> None:
    """Raise ``MemoryError`` before allocating an ``out_bytes`` result plus ``work_bytes`` of working memory
    when the device does not have that much free."""
    free = available_bytes(device)
    need = int(out_bytes) + int(work_bytes)
    if free is not None and need > free:
        raise MemoryError(
            f"connectivity needs about {need / 2**20:.0f} MiB on {torch.device(device)} (L: {out_bytes / 2**20:.0f} MiB, "
            f"working chunk: {work_bytes / 2**20:.0f} MiB) but only {free / 2**20:.0f} MiB is free (free memory, the "
            "process's address-space limit and its cgroup's memory limit, whichever is smallest); use fewer samples "
            "(a fixed random subset) or a smaller chunk_bytes"
        )
