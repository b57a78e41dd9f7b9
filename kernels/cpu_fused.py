"""Fused CPU kernel for the connectivity matrix of an MLP tail (AVX2 + FMA, C++ via ctypes).

The kernel (``cpu_fused.cpp`` beside this file) does per pair what the Triton kernel does
per block: interpolate on the absorbed ``z``, run the activations and the remaining Linears on a
``[T, H]`` tile held in L1 (register-blocked 6 x 16 GEMM micro-kernel), reduce to ``L_ij`` with
the constant-path rule, and write only ``L``. It runs in float32 (flagging the pairs fp32 cannot resolve) or in
float64 (an fp64 model; the same GEMM micro-kernel and SiLU exp chain instantiated for double, 6 x 8, no flags);
the float64 instantiation also recomputes the flagged pairs (:func:`pairs_f64`). It is plain C++ with a C ABI (no torch headers), so
the first build takes seconds; the shared library is cached under the torch extensions directory
(``$TORCH_EXTENSIONS_DIR/grokfast_metrics_cpu``, else torch's default build root, e.g.
``~/.cache/torch_extensions/<python-torch tag>/grokfast_metrics_cpu``) keyed by a hash of the source, the flags and
the compiler. ``grokfast-metrics build-kernel`` (:func:`build`) compiles it ahead of the first use; ``CXX`` names the
compiler (``g++``, ``c++``, ``clang++`` are tried when it is unset; a ``CXX`` that names no executable is an error, not
a reason to pick another compiler).

When the CPU lacks AVX2/FMA, no C++ compiler is found, the build fails, the tail is not supported (see
:func:`unsupported_reason`) or ``GROKFAST_METRICS_CPU_KERNEL=0`` is set, :func:`available` /
:func:`unsupported_reason` say so and the caller uses torch ops instead. A missing compiler or a failed build is
warned once (:class:`CPUKernelUnavailableWarning`, one line naming the cause and the cost: LMN 10-20x slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from grokfast_metrics.foundation.policy import CONST_RTOL, FLAG_KAPPA, check_fits, check_n_lambda, lambdas
from grokfast_metrics.foundation.runtime import cpu_kernel_switched_off, env
from grokfast_metrics.foundation.tail import ACT_CODES, MLPTail

_SOURCE = Path(__file__).with_name("cpu_fused.cpp")
#: compiler flags; the activation codes of the C++ ``ActCode`` enum come from ``foundation.tail.ACT_CODES``
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fno-math-errno"] + [
    f"-DGM_ACT_{name.upper()}={code}" for name, code in ACT_CODES.items()
]
_ENV_SWITCH = "GROKFAST_METRICS_CPU_KERNEL"  # read by foundation.runtime.cpu_kernel_switched_off

_lock = threading.Lock()


def initial_state() -> dict:
    """The loader's state before the first use (tests install a fresh one to rebuild or fail a build)."""
    return {"lib": None, "tried": False, "error": None, "build_seconds": None, "path": None, "avx512": False}


_state: dict = initial_state()


def _cpu_has_avx2_fma() -> bool:
    get_cap = getattr(torch.backends.cpu, "get_cpu_capability", None)
    cap = get_cap() if get_cap is not None else ""
    if cap in ("AVX2", "AVX512"):
        return True
    try:  # torch may be built or forced (ATEN_CPU_CAPABILITY) below AVX2; ask the CPU itself
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


#: what a machine without the kernel pays (measured: README, "The CPU kernel and a machine without a C++ compiler")
SLOWDOWN = "LMN runs on torch ops instead, about 10-20x slower"


class CPUKernelUnavailableWarning(RuntimeWarning):
    """The fused C++ CPU kernel could not be built or loaded (no compiler, a failed build); torch ops run instead."""


def _cache_dir() -> Path:
    """Where the compiled library is cached: ``$TORCH_EXTENSIONS_DIR/grokfast_metrics_cpu`` when set (as torch's own
    extensions do), else under torch's default build root."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    return Path(root).expanduser() / "grokfast_metrics_cpu"


def _compiler() -> str:
    """The C++ compiler: ``$CXX`` when set (it must be an executable: never silently replaced), else the first of
    g++, c++, clang++ on ``PATH``. Raises ``RuntimeError`` saying which is missing."""
    cxx = os.environ.get("CXX")
    if cxx:
        found = shutil.which(cxx)
        if found is None:
            raise RuntimeError(f"CXX={cxx!r} is not an executable C++ compiler (fix or unset CXX)")
        return found
    for name in ("g++", "c++", "clang++"):
        if shutil.which(name):
            return shutil.which(name)
    raise RuntimeError("no C++ compiler found (install g++ or clang++, or set CXX)")


def _build() -> ctypes.CDLL:
    """Compile (or reuse the cached) shared library and load it. Raises ``RuntimeError`` on failure."""
    cxx = _compiler()
    src = _SOURCE.read_bytes()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{cxx} --version failed: {e}") from e
    key = hashlib.sha256(src + " ".join(_FLAGS).encode() + version.encode()).hexdigest()[:16]
    out_dir = _cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib_path = out_dir / f"connectivity_cpu_{key}.so"
    if not lib_path.exists():
        t0 = time.perf_counter()
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            res = subprocess.run([cxx, *_FLAGS, str(_SOURCE), "-o", tmp], capture_output=True, text=True, timeout=600, check=False)
            if res.returncode != 0:
                raise RuntimeError(f"compiling {_SOURCE.name} failed:\n{res.stderr[-4000:]}")
            os.replace(tmp, lib_path)  # atomic: concurrent builders never see a partial file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _state["build_seconds"] = time.perf_counter() - t0
    lib = ctypes.CDLL(str(lib_path))
    lib.gm_cpu_supported.restype = ctypes.c_int
    lib.gm_cpu_supported.argtypes = []
    if not lib.gm_cpu_supported():
        raise RuntimeError("the CPU lacks AVX2/FMA")
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.gm_connectivity_mlp.restype = ctypes.c_int
    lib.gm_connectivity_mlp.argtypes = [i64, i32, i32, p, p, p, p, p, p, p, p, i32, p, p, p, f32, f32, f32, p, i32, p, p, f32, p]
    f64 = ctypes.c_double
    lib.gm_mlp_f64.restype = ctypes.c_int
    lib.gm_mlp_f64.argtypes = [i64, i64, p, p, i32, i32, p, p, p, p, p, p, p, p, i32, p, p, p, f64, f64, f64, p, i32, p, p, p]
    lib.gm_affine_f64.restype = ctypes.c_int
    lib.gm_affine_f64.argtypes = [i64, i32, i32, p, p, p, p]
    lib.gm_set_avx512.restype = ctypes.c_int
    lib.gm_set_avx512.argtypes = [i32]
    _state["path"] = str(lib_path)
    use_avx512(env("CPU_AVX512") not in ("0", "false", "False"), lib)
    return lib


def use_avx512(want: bool, lib: ctypes.CDLL | None = None) -> bool:
    """Run the GEMMs (fp32 and fp64) in 512-bit registers (AVX-512F) when ``want`` and the CPU has them; returns whether
    they do.

    The default where the CPU has AVX-512F (``GROKFAST_METRICS_CPU_AVX512=0`` turns it off at load). Both GEMMs add the
    same products in the same order per output, so ``L`` is bitwise the same either way (``tests/kernels``); only the
    speed differs (``benchmarks/RESULTS.md``). Not thread-safe against a running call: switch between calls.
    """
    lib = lib or _library()
    _state["avx512"] = bool(lib.gm_set_avx512(int(want))) if lib is not None else False
    return bool(_state["avx512"])


def _library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; ``None`` (warned once) if unavailable."""
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if _state["tried"]:
            return _state["lib"]
        if not _cpu_has_avx2_fma():
            _state["error"] = "the CPU lacks AVX2/FMA"
        elif not _SOURCE.exists():
            _state["error"] = f"kernel source {_SOURCE} is missing from the installation"
        else:
            try:
                _state["lib"] = _build()
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                _state["error"] = str(e)
                # one line wherever it is shown: no library file and source line under it (lineno 0 has no source)
                warnings.warn_explicit(unavailable_message(), CPUKernelUnavailableWarning, "grokfast_metrics", 0, module="grokfast_metrics")
        _state["tried"] = True
    return _state["lib"]


def unavailable_message() -> str | None:
    """One line: why the kernel is unavailable and what that costs (``None`` when it built or was never tried)."""
    if _state["error"] is None:
        return None
    cause = _state["error"].strip().splitlines()[0]
    return f"grokfast_metrics: fused CPU kernel unavailable ({cause}); {SLOWDOWN}"


def build(force: bool = False) -> dict:
    """Build (or find in the cache) and load the kernel now, e.g. after installing; :func:`build_info` of the result.

    ``force``: forget an earlier failed attempt in this process and try again (a compiler installed since).
    ``error`` is set (and nothing raised) when it cannot be built; no warning is emitted.
    """
    with _lock:
        if force or not _state["tried"]:
            _state.update(lib=None, tried=False, error=None, build_seconds=None, path=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CPUKernelUnavailableWarning)
        _library()
    return build_info()


def available() -> bool:
    """True when the fused CPU kernel can run here (builds it on first call)."""
    if cpu_kernel_switched_off():
        return False
    return _library() is not None


def build_info() -> dict:
    """``{"path", "build_seconds", "error", "cache_dir", "avx512"}`` of the kernel library (``build_seconds`` is ``None``
    when it came from the cache or was not built in this process; ``avx512``: the GEMMs run in 512-bit registers)."""
    return {**{k: _state[k] for k in ("path", "build_seconds", "error", "avx512")}, "cache_dir": str(_cache_dir())}


def unsupported_reason(spec: MLPTail, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the fused CPU kernel cannot run ``spec`` on input on ``device`` in compute dtype ``dtype``.

    ``None`` when it can (the library is then built and loaded). Every activation of the
    activation table is implemented, so only the device, the dtype and the structure matter.
    float32 needs float32 weights; float64 takes weights of any float dtype (computed in float64).
    """
    if dtype not in (torch.float32, torch.float64):
        return f"only float32 and float64 are fused on the CPU (got {dtype})"
    for _, lin in spec.stages:
        if lin.weight.device.type != "cpu":
            return "tail weights must be on the CPU"
        if dtype == torch.float32 and lin.weight.dtype != torch.float32:
            return "tail weights must be float32 for the float32 kernel"
    return _shared_reason(spec, device)


def _skip_reason(spec: MLPTail) -> str | None:
    """A skip term (lowered tails) needs the centred last projection: a tail ending in a Linear."""
    if spec.skip is not None and spec.final:
        return "a skip term needs a tail that ends in a Linear (no trailing activation)"
    return None


def _shared_reason(spec: MLPTail, device: torch.device) -> str | None:
    """What every entry point (the fp32 and fp64 kernels, the fp64 pair recompute) needs: the CPU, a Linear
    after the first activation, the switch on, the library built."""
    if torch.device(device).type != "cpu":
        return f"h is on {device}, not the CPU"
    if not spec.stages:
        return "the tail has no Linear after its first activation"
    if _skip_reason(spec) is not None:
        return _skip_reason(spec)
    if cpu_kernel_switched_off():
        return f"disabled by {_ENV_SWITCH}=0"
    if _library() is None:
        return f"kernel unavailable: {_state['error']}"
    return None


def _act_arrays(spec: MLPTail) -> tuple[list[int], list[float], list[int]]:
    """The kernel's activation arrays: codes and slopes stage by stage (then the final ones), and the offsets
    of each stage's run (``act_code[act_off[s] : act_off[s + 1]]``)."""
    codes, slopes, offs = [], [], [0]
    for acts in [acts for acts, _ in spec.stages] + [list(spec.final)]:
        codes += [a.code for a in acts]
        slopes += [float(a.slope) for a in acts]
        offs.append(len(codes))
    return codes, slopes, offs


def _lanes(dtype: torch.dtype) -> int:
    """SIMD lanes of the kernel's vectors (AVX2): 8 floats, 4 doubles; widths are padded to a multiple of it."""
    return 8 if dtype == torch.float32 else 4


def _pad(n: int, dtype: torch.dtype) -> int:
    lanes = _lanes(dtype)
    return (n + lanes - 1) // lanes * lanes


def _pack(weight: torch.Tensor, kp: int, np_: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W^T`` zero-padded to ``(kp, np_)`` and laid out as column panels of two vectors (fp32: 16, fp64: 8; the
    last may be one vector), the GEMM micro-kernel's ``B``."""
    out_f, in_f = weight.shape
    wt = torch.zeros(kp, np_, dtype=dtype)
    wt[:in_f, :out_f] = weight.detach().to(device="cpu", dtype=dtype).t()
    w = 2 * _lanes(dtype)
    return torch.cat([wt[:, c : c + w].contiguous().flatten() for c in range(0, np_, w)])


class _Packed:
    """The stages of ``spec`` as the kernel reads them in ``dtype``: padded widths, packed weights, padded biases,
    the packed ``|W|`` of the last stage and ``wnorm`` (``sum_h |W_kh|``, then ``|W_k|_2``, each padded to np + 8),
    and the C arrays of all of them (kept alive with this object)."""

    def __init__(self, spec: MLPTail, dtype: torch.dtype):
        self.kps, self.kins, self.nps, self.packs, self.biases = [], [], [], [], []
        for _, lin in spec.stages:
            kp, np_ = _pad(lin.in_features, dtype), _pad(lin.out_features, dtype)
            self.kps.append(kp)
            self.kins.append(lin.in_features)
            self.nps.append(np_)
            self.packs.append(_pack(lin.weight, kp, np_, dtype))
            b = torch.zeros(np_, dtype=dtype)
            if lin.bias is not None:
                b[: lin.out_features] = lin.bias.detach().to(device="cpu", dtype=dtype)
            self.biases.append(b)
        last = spec.stages[-1][1]
        self.out_dim = last.out_features
        self.wabs = _pack(last.weight.detach().abs(), self.kps[-1], self.nps[-1], dtype)
        self.wnorm = torch.zeros(2, self.nps[-1] + 8, dtype=dtype)
        w64 = last.weight.detach().to(device="cpu", dtype=torch.float64)
        self.wnorm[0, : last.out_features] = w64.abs().sum(dim=1).to(dtype)
        self.wnorm[1, : last.out_features] = w64.square().sum(dim=1).sqrt().to(dtype)
        codes, slopes, offs = _act_arrays(spec)
        self.c_kp, self.c_kin, self.c_np = _ints(self.kps), _ints(self.kins), _ints(self.nps)
        self.c_off, self.c_codes = _ints(offs), _ints(codes)
        ctype = ctypes.c_float if dtype == torch.float32 else ctypes.c_double
        self.c_slopes = (ctype * max(1, len(slopes)))(*slopes)
        self.c_packs = (ctypes.c_void_p * len(self.packs))(*[t.data_ptr() for t in self.packs])
        self.c_biases = (ctypes.c_void_p * len(self.biases))(*[t.data_ptr() for t in self.biases])

    def head(self) -> list:
        """The arguments every kernel entry point takes after ``T``: stages, widths, weights, activations, O."""
        addr = ctypes.addressof
        return [
            len(self.packs),
            addr(self.c_kp),
            addr(self.c_kin),
            addr(self.c_np),
            addr(self.c_packs),
            addr(self.c_biases),
            addr(self.c_off),
            addr(self.c_codes),
            addr(self.c_slopes),
            self.out_dim,
        ]


def _ints(v: list[int]) -> ctypes.Array:
    return (ctypes.c_int * max(1, len(v)))(*v)


def _threads(num_threads: int | None) -> int:
    return max(1, int(num_threads if num_threads is not None else torch.get_num_threads()))


def connectivity_cpu(
    z: torch.Tensor, spec: MLPTail, n_lambda: int, num_threads: int | None = None, flag: bool = False, u: torch.Tensor | None = None
) -> torch.Tensor:
    """Connectivity matrix of an MLP tail from the absorbed representations, fused on the CPU.

    Args:
        z: ``(N, H0)`` float32 or float64 CPU tensor, ``h`` through ``spec.pre`` (``spec.absorb(h)``).
        spec: normalised MLP tail with at least one stage.
        n_lambda: interpolation points ``T`` per pair (>= 3).
        num_threads: worker threads (default ``torch.get_num_threads()``).
        flag: float32 only: write ``foundation.policy.FLAGGED`` for pairs whose estimated fp32 error exceeds
            ``foundation.policy.FLAG_KAPPA`` (``core`` recomputes them in fp64). The estimate is that of the torch path with a
            coarser rounding scale per hidden unit (``max_t |a| (1 + max(|z_i|, |z_j|))``). float64 never flags.
        u: ``(N, O)`` skip term ``u = W_skip h`` (float64; ``spec.skip_values(h)``), required when ``spec.skip`` is
            set: each pair's output gains ``lam (u_j - u_i)``, the difference taken in float64.

    Returns:
        ``(N, N)`` matrix ``L`` in ``z``'s dtype: symmetric, unit diagonal, entries in ``[0, 1]``.

    Raises:
        ValueError: unsupported input (see :func:`unsupported_reason`), bad ``z`` shape or ``n_lambda < 3``.
        MemoryError: ``L`` cannot fit, or the kernel ran out of memory (reported by the C++ code, never an abort).
        TypeError: ``n_lambda`` is not an int.
    """
    reason = unsupported_reason(spec, z.device, z.dtype)
    if reason is not None:
        raise ValueError(f"fused CPU kernel cannot run this tail: {reason}")
    lib = _library()
    if z.dim() != 2 or z.shape[1] != spec.stages[0][1].in_features:
        raise ValueError(f"z must be (N, {spec.stages[0][1].in_features}) (the first stage's input width); got {tuple(z.shape)}")
    n_lambda = check_n_lambda(n_lambda)
    if z.shape[0] < 2:
        raise ValueError(f"z needs at least 2 rows (samples); got {z.shape[0]}")
    width = z.shape[1]
    for _, lin in spec.stages:
        if lin.in_features != width:
            raise ValueError(f"tail stage expects {lin.in_features} features but receives {width}")
        width = lin.out_features
    u64 = _skip_array(spec, u, z.shape[0])
    if z.dtype == torch.float64:
        return torch.from_numpy(_run_f64(lib, z.detach().numpy(), spec, None, None, n_lambda, num_threads, u64))
    n, h0 = z.shape
    pk = _Packed(spec, torch.float32)
    zp = torch.zeros(n, pk.kps[0], dtype=torch.float32)
    zp[:, :h0] = z
    lam32, lam_c = lambdas(n_lambda, torch.float32)
    ll = float((lam_c.double() ** 2).sum())
    check_fits(4 * n * n, 4 * (n + 8) * pk.kps[0] * 3, "cpu")
    out = torch.empty(n, n, dtype=torch.float32)
    rc = lib.gm_connectivity_mlp(
        n,
        n_lambda,
        *pk.head(),
        zp.data_ptr(),
        lam32.data_ptr(),
        lam_c.data_ptr(),
        ll,
        torch.finfo(torch.float32).eps,
        CONST_RTOL,
        out.data_ptr(),
        _threads(num_threads),
        pk.wabs.data_ptr(),
        pk.wnorm.data_ptr(),
        FLAG_KAPPA if flag else 0.0,
        None if u64 is None else u64.ctypes.data,
    )
    _check_rc(rc, "fused CPU kernel", n, [*pk.kins, pk.out_dim])
    return out


def _check_rc(rc: int, what: str, n: int, widths: list[int]) -> None:
    """The kernels' return codes: 0 ok, 2 out of memory (a ``MemoryError``), anything else a ``RuntimeError``."""
    if rc == 2:
        raise MemoryError(f"{what} ran out of memory (N={n}, widths {widths})")
    if rc != 0:
        raise RuntimeError(f"{what} failed with code {rc}")


def _skip_array(spec: MLPTail, u: torch.Tensor | np.ndarray | None, n: int) -> np.ndarray | None:
    """``u`` as the kernel reads it: a C-contiguous float64 ``(n, O)`` array, or ``None`` without a skip term."""
    if spec.skip is None:
        return None
    if u is None:
        raise ValueError("this tail has a skip term: pass u = spec.skip_values(h)")
    arr = np.ascontiguousarray(u.detach().cpu().numpy() if isinstance(u, torch.Tensor) else u, dtype=np.float64)
    if arr.shape != (n, spec.stages[-1][1].out_features):
        raise ValueError(f"u must be (N, O) = ({n}, {spec.stages[-1][1].out_features}); got {arr.shape}")
    return arr


def pairs_f64_unsupported(spec: MLPTail, device: torch.device) -> str | None:
    """Why :func:`pairs_f64` cannot recompute pairs of ``spec`` on ``device`` (``None`` when it can)."""
    return _shared_reason(spec, device)


def pairs_f64(
    h: torch.Tensor, spec: MLPTail, i: torch.Tensor, j: torch.Tensor, n_lambda: int, num_threads: int | None = None
) -> torch.Tensor:
    """``L_ij`` of the pairs ``(i[p], j[p])`` in float64, in one C++ call (``core``'s recompute of flagged pairs).

    The float64 kernel of :func:`connectivity_cpu` (the algebra of ``compute.torch_paths._pairs_values`` in float64:
    centred last projection, offset-free saturating activation before it, constant-path rule on the same
    rounding scale) on the listed pairs only: no per-op dispatch, no chunk of activations held in memory.

    Args:
        h: ``(N, D)`` representations on the CPU (any float dtype; computed in float64).
        spec: normalised MLP tail with at least one stage (weights of any float dtype, on the CPU).
        i, j: ``(P,)`` integer indices of the pairs.
        n_lambda: interpolation points per pair.

    Returns:
        ``(P,)`` float64 values.

    Raises:
        ValueError: unsupported (see :func:`pairs_f64_unsupported`).
        MemoryError: the kernel ran out of memory.
    """
    reason = pairs_f64_unsupported(spec, h.device)
    if reason is not None:
        raise ValueError(f"fp64 pair kernel cannot run this tail: {reason}")
    lib = _library()
    n_lambda = check_n_lambda(n_lambda)
    # NumPy and C++ only from here: a torch op over more than 32768 elements is an OpenMP region, and on a
    # loaded 2-core box each one waited a scheduler tick (4-24 ms for the fp64 absorb of N=961 alone).
    pij = np.concatenate(
        [np.asarray(i.detach().cpu().numpy(), dtype=np.int64).reshape(-1), np.asarray(j.detach().cpu().numpy(), dtype=np.int64).reshape(-1)]
    )
    n_pairs = pij.size // 2
    if n_pairs == 0:
        return torch.from_numpy(np.empty(0, dtype=np.float64))
    rows, inv = np.unique(pij, return_inverse=True)  # absorb only the rows that occur
    spec = spec.exact or spec  # a lowered tail's float64 twin (its folded weights never rounded to float32)
    x = _selected_f64(h, spec)[rows]
    u = None if spec.skip is None else x @ spec.skip.to(torch.float64).numpy().T  # before absorbing: W_skip h_sel
    z = _absorb_rows_f64(lib, x, spec)
    pi, pj = np.ascontiguousarray(inv[:n_pairs], dtype=np.int64), np.ascontiguousarray(inv[n_pairs:], dtype=np.int64)
    return torch.from_numpy(_run_f64(lib, z, spec, pi, pj, n_lambda, num_threads, _skip_array(spec, u, z.shape[0])))


def _selected_f64(h: torch.Tensor, spec: MLPTail) -> np.ndarray:
    """The columns of ``h`` the tail reads, as a C-contiguous float64 array."""
    hd = h.detach()
    hn = hd.numpy() if hd.dtype in (torch.float32, torch.float64) else hd.to(torch.float64).numpy()
    if spec.select is not None:
        hn = hn[:, spec.select[0] : spec.select[1]]
    return np.ascontiguousarray(hn, dtype=np.float64)


def _absorb_rows_f64(lib: ctypes.CDLL, x: np.ndarray, spec: MLPTail) -> np.ndarray:
    z = x
    for lin in spec.pre:
        z = _affine_f64(lib, z, lin)
    return z


def absorb_f64(h: torch.Tensor, spec: MLPTail) -> torch.Tensor:
    """``z = spec.absorb(h)`` computed in float64 (a lowered tail: through its exact twin) and rounded once to ``h``'s
    dtype: what :func:`connectivity_cpu` is given by ``core``. Its flag sees ``|z|`` only, so a large component of ``h``
    that the absorbed Linear cancels must not be rounded at ``|h|``. Through the kernel's float64 GEMM on one thread,
    no torch op (on a loaded 2-core box torch's F.linear took 15 ms of CPU in fp32 and 32 ms in fp64 for N=961, H=100,
    this 1.3 ms). ``h``: ``(N, D)`` on the CPU; needs the library (:func:`available`)."""
    lib = _library()
    spec = spec.exact or spec
    z = _absorb_rows_f64(lib, _selected_f64(h, spec), spec)
    return torch.from_numpy(np.ascontiguousarray(z, dtype=np.float64 if h.dtype == torch.float64 else np.float32))


def _run_f64(
    lib: ctypes.CDLL,
    z: np.ndarray,
    spec: MLPTail,
    pi: np.ndarray | None,
    pj: np.ndarray | None,
    n_lambda: int,
    num_threads: int | None,
    u: np.ndarray | None = None,
) -> np.ndarray:
    """The float64 kernel on the rows of ``z`` (``(n, H0)``, absorbed): ``L`` ``(n, n)`` when ``pi`` is ``None``,
    else the ``(P,)`` values of the pairs ``(pi[p], pj[p])``."""
    pk = _Packed(spec, torch.float64)
    n = z.shape[0]
    zp = np.zeros((n, pk.kps[0]), dtype=np.float64)
    zp[:, : z.shape[1]] = z
    lam = np.arange(n_lambda, dtype=np.float64) / (n_lambda - 1)  # = foundation.policy.lambdas in float64
    lam_c = lam - 0.5
    ll = float((lam_c**2).sum())
    if pi is None:
        check_fits(8 * n * n, 8 * (n + 8) * pk.kps[0] * 3, "cpu")
        out = np.empty((n, n), dtype=np.float64)
        n_pairs, p_i, p_j = 0, None, None
    else:
        out = np.empty(pi.size, dtype=np.float64)
        n_pairs, p_i, p_j = pi.size, pi.ctypes.data, pj.ctypes.data
    rc = lib.gm_mlp_f64(
        n,
        n_pairs,
        p_i,
        p_j,
        n_lambda,
        *pk.head(),
        zp.ctypes.data,
        lam.ctypes.data,
        lam_c.ctypes.data,
        ll,
        float(np.finfo(np.float64).eps),
        CONST_RTOL,
        out.ctypes.data,
        _threads(num_threads),
        pk.wabs.data_ptr(),
        pk.wnorm.data_ptr(),
        None if u is None else u.ctypes.data,
    )
    _check_rc(rc, "fp64 CPU kernel", n, [*pk.kins, pk.out_dim])
    return out


def _affine_f64(lib: ctypes.CDLL, x: np.ndarray, lin: torch.nn.Linear) -> np.ndarray:
    """``x W^T + b`` in float64 through the kernel's GEMM (one thread, no OpenMP region)."""
    k, n_out = lin.in_features, lin.out_features
    np_ = _pad(n_out, torch.float64)
    wpack = _pack(lin.weight, k, np_, torch.float64)
    b = torch.zeros(np_, dtype=torch.float64)
    if lin.bias is not None:
        b[:n_out] = lin.bias.detach().to(device="cpu", dtype=torch.float64)
    x = np.ascontiguousarray(x, dtype=np.float64)
    y = np.empty((x.shape[0], np_), dtype=np.float64)
    rc = lib.gm_affine_f64(x.shape[0], k, np_, x.ctypes.data, wpack.data_ptr(), b.data_ptr(), y.ctypes.data)
    if rc != 0:
        raise RuntimeError(f"fp64 affine map failed with code {rc}")
    return np.ascontiguousarray(y[:, :n_out])
