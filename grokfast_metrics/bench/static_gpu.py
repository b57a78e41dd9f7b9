"""A static cost model of the Triton kernels on NVIDIA GPUs, with no GPU: ``grokfast-metrics bench --static-gpu``.

Each kernel variant (v1 ``kernels.triton_rowblock``, v2 ``kernels.triton_packed_mma``) is compiled for sm_90 (H100)
and sm_80 (A100) with the exact launch configuration its ``launch_config`` picks for a shape (pointers marked
16-byte aligned, as the JIT does). The cubin's SASS (``cuobjdump -sass``, shipped with triton) is parsed into
instructions; the loops are found from their backward branches and given the trip counts of the kernel's own
loops (:func:`schedule`: v1's ``K`` loop inside the layer-1 and layer-2 column-block loops; v2's ``K`` loop inside
its persistent tile loop, ``n_tiles / programs`` trips on average), so every instruction is counted as often as a
program issues it. Multiplied by the number of programs that do work (v1's others exit after a handful of
instructions; v2 has none idle), each execution pipe's busy time follows from its throughput, and the issue
slots give the issue-bound time. v2's per-sample pre-pass ``a0 = act(z)`` (``N x H`` elements) is not counted.

Every number here is a **static estimate**: it assumes perfect overlap between pipes, no memory
stalls and full occupancy of every SM, so it is a lower bound of what the kernel can do, not a
measurement. It is checked against a measured timing whenever a GPU is lent (``RESULTS.md``).
"""

from __future__ import annotations

import itertools
import math
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

import torch

from ..foundation.tail import parse_tail
from .harness import n_pairs
from .workloads import make_tail


@dataclass(frozen=True)
class GPU:
    """Throughputs of one SM per clock (lanes = threads; a warp instruction uses 32 lanes)."""

    name: str
    arch: int
    sms: int
    clock_ghz: float
    fp32_lanes: int  # FFMA/FADD/FMUL/FMNMX/FSETP/FSEL
    int_lanes: int  # IMAD/IADD3/LOP3/SHF/LEA/SEL/ISETP/...
    fp64_lanes: int
    mufu_lanes: int  # MUFU (ex2, rcp, rsq, ...)
    shfl_lanes: int  # SHFL
    lsu_lanes: int  # LDS/STS/LDSM/STSM/LDG/STG/LDGSTS
    tensor_fma_tf32: int  # dense tf32 multiply-adds per SM per clock
    tensor_fma_fp64: int  # dense fp64 multiply-adds per SM per clock (DMMA)
    issue_per_clock: int = 4  # one warp instruction per SM sub-partition per clock
    max_regs: int = 65536
    max_threads: int = 2048
    max_ctas: int = 32
    smem_bytes: int = 228 * 1024


#: H100 SXM5 (boost clock) and A100 SXM4, from NVIDIA's published per-SM throughputs.
GPUS = {
    90: GPU("H100 SXM (sm_90)", 90, 132, 1.83, 128, 64, 64, 16, 32, 32, 1024, 128, smem_bytes=228 * 1024),
    80: GPU("A100 SXM (sm_80)", 80, 108, 1.41, 64, 64, 32, 16, 32, 32, 512, 64, smem_bytes=164 * 1024),
}

#: SASS opcode (before the first '.') -> execution resource
_PIPES = {
    "fp32": {"FFMA", "FADD", "FMUL", "FMNMX", "FSETP", "FSEL", "FSWZADD", "FCHK", "FRND", "FSET", "FMNMX3"},
    "int": {
        "IMAD",
        "IADD3",
        "LOP3",
        "SHF",
        "LEA",
        "SEL",
        "ISETP",
        "IMNMX",
        "PRMT",
        "SGXT",
        "I2FP",
        "F2I",
        "I2F",
        "F2F",
        "FLO",
        "POPC",
        "BREV",
        "IABS",
        "PLOP3",
        "LOP",
        "IADD",
        "SHL",
        "SHR",
        "BMSK",
        "VIMNMX",
        "F2FP",
    },
    "fp64": {"DFMA", "DADD", "DMUL", "DSETP", "DMNMX"},
    "mufu": {"MUFU"},
    "shfl": {"SHFL"},
    "shared": {"LDS", "STS", "LDSM", "STSM", "ATOMS"},
    "global": {"LDG", "STG", "LDGSTS", "LDGDEPBAR", "RED", "ATOMG", "UTMALDG", "UTMASTG", "LDC"},
    "tensor": {"HGMMA", "HMMA", "DMMA", "IMMA", "WARPGROUP"},
    "sync": {"BAR", "DEPBAR", "WARPSYNC", "MEMBAR", "FENCE", "BSSY", "BSYNC", "ERRBAR", "CCTL"},
}
_PIPE_OF = {op: pipe for pipe, ops in _PIPES.items() for op in ops}
_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Za-z0-9_]+)*)\s*([^;]*);")
_MMA_SHAPE = re.compile(r"\.(\d+)x(\d+)x(\d+)|\.(\d{3,5})\b")  # HGMMA.64x32x8; HMMA.1688 / .16816; DMMA.884


@dataclass
class Sass:
    """Parsed SASS of one kernel: ``(address, opcode, modifiers, operands)`` per instruction and its loops."""

    instructions: list[tuple[int, str, str, str]]
    loops: list[tuple[int, int]] = field(default_factory=list)  # (first, last) instruction index, by nesting


def parse_sass(text: str) -> Sass:
    """Instructions of ``cuobjdump -sass`` output and the loops (backward branches), innermost first."""
    ins = [(int(m[1], 16), m[2], m[3], m[4].strip()) for m in map(_LINE.match, text.splitlines()) if m]
    index = {addr: k for k, (addr, *_rest) in enumerate(ins)}
    loops = []
    for k, (addr, op, _mods, operands) in enumerate(ins):
        if op == "BRA":
            target = int(operands.split()[-1].rstrip(";"), 16) if operands else addr
            if target < addr and target in index:  # a backward branch closes a loop
                loops.append((index[target], k))
    loops.sort(key=lambda lp: lp[1] - lp[0])
    return Sass(ins, loops)


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.exists(path):
        return path
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found (it ships with triton in triton/backends/nvidia/bin)")
    return found


def kernel_module(variant: str):
    """The module of a kernel variant (``"v1"``: ``kernels.triton_rowblock``, ``"v2"``: ``kernels.triton_packed_mma``)."""
    from ..kernels import triton_packed_mma as kc2
    from ..kernels import triton_rowblock as kc

    return {"v1": kc, "v2": kc2}[variant]


def kernel_fn(variant: str):
    """The jit function of a kernel variant."""
    m = kernel_module(variant)
    return m._connectivity_fwd_kernel if variant == "v1" else m._connectivity_v2_kernel


def compile_kernel(spec, dtype: torch.dtype, n_lambda: int, arch: int, input_precision: str | None = None, variant: str = "v1"):
    """``(compiled kernel, LaunchConfig)`` for ``spec`` on ``sm_<arch>``, as the launcher would pick on a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = kernel_module(variant).launch_config(spec, dtype, n_lambda, interpret=False, input_precision=input_precision, arch=arch)
    fn = kernel_fn(variant)
    # the JIT marks 16-byte aligned pointers (every fresh torch allocation) as divisible by 16
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in cfg.signature.items() if t.startswith("*")}
    src = ASTSource(fn=fn, signature=cfg.signature, constexprs=cfg.constexprs, attrs=attrs)
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts), cfg


def sass_of(compiled) -> tuple[str, dict[str, int]]:
    """SASS text and resource usage (``REG``, ``SHARED``, ``LOCAL`` bytes = spills) of a compiled kernel."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    res = {k: int(v) for k, v in re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", usage)}
    return sass, res


def loop_trips(cfg) -> list[int]:
    """Trip counts of the kernel's loops that run more than once, innermost first (K, layer-1 blocks, layer-2 blocks)."""
    c = cfg.constexprs
    trips = [c["K0"] // c["BLOCK_K"]]
    if c["DEPTH"] >= 2:
        trips += [c["P1"] // c["BLOCK_N1"], c["P2"] // c["BLOCK_N2"]]
    return [t for t in trips if t > 1]


def _mma_fma(op: str, mods: str, warps: int) -> int:
    """Multiply-adds one warp's MMA instruction contributes to its program.

    ``HGMMA`` (sm_90 ``wgmma``) is issued by the 4 warps of a warpgroup together: each warp's issue is a
    quarter of the ``m x n x k`` product. ``HMMA``/``DMMA`` (``mma.sync``) are per warp.
    """
    m = _MMA_SHAPE.search(mods)
    if op not in ("HGMMA", "HMMA", "DMMA") or m is None:
        return 0
    if m.group(1):
        a, b, k = int(m.group(1)), int(m.group(2)), int(m.group(3))
    elif op == "HMMA":  # HMMA.1688 = m16n8k8, HMMA.16816 = m16n8k16
        a, b, k = 16, 8, int(m.group(4)[3:])
    else:  # DMMA.884 = m8n8k4
        a, b, k = (int(c) for c in m.group(4))
    return a * b * k // 4 if op == "HGMMA" else a * b * k


def dynamic_counts(sass: Sass, loop_trip: list[int], warps: int) -> tuple[dict[str, float], float]:
    """Warp instructions one warp of a program issues per pipe, and the program's MMA multiply-adds.

    ``loop_trip[l]`` is the trip count of ``sass.loops[l]``; an instruction inside several loops is
    counted the product of their trips.
    """
    mult = [1.0] * len(sass.instructions)
    for (first, last), t in zip(sass.loops, loop_trip):
        for k in range(first, last + 1):
            mult[k] *= t
    pipes: dict[str, float] = {}
    fma = 0.0
    for m, (_addr, op, mods, _ops) in zip(mult, sass.instructions):
        pipe = _PIPE_OF.get(op, "uniform" if op.startswith("U") else "other")
        pipes[pipe] = pipes.get(pipe, 0.0) + m
        fma += m * warps * _mma_fma(op, mods, warps)
    return pipes, fma


def map_loops(sass: Sass, trips: list[int], warps: int, expected_fma: int, one_each: bool = False) -> tuple[list[int], bool]:
    """Trip counts for the SASS loops, and whether the MMA work they imply equals the kernel's ``expected_fma``.

    The compiler may unroll a short loop or add loops of its own, so the kernel's loops (``trips``) are
    matched to the SASS loops by trying every assignment (a loop the kernel does not have runs once)
    and keeping the first whose counted multiply-adds equal what the ``tl.dot`` calls perform. When none
    does, the loops are taken by nesting (innermost first) and the estimate is marked unverified.
    """
    options = sorted(set(trips) | {1})
    # ``one_each`` (v2): first the assignments that give each kernel loop one SASS loop (a loop without MMAs,
    # such as v2's ``_pair_bounds`` one, matches any trip count), then any
    exact = [list(p) for p in itertools.permutations(trips)] if one_each and len(trips) == len(sass.loops) else []
    for assignment in [*exact, *itertools.product(options, repeat=len(sass.loops))]:
        if math.isclose(dynamic_counts(sass, list(assignment), warps)[1], expected_fma, rel_tol=1e-9):
            return list(assignment), True
    return (trips + [1] * len(sass.loops))[: len(sass.loops)], False


def occupancy(gpu: GPU, regs: int, smem: int, threads: int) -> int:
    """Resident CTAs per SM, from registers (allocated per warp in units of 256), shared memory and threads."""
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = gpu.max_regs // max(1, regs_per_warp * (threads // 32))
    by_smem = gpu.smem_bytes // max(1, smem) if smem else gpu.max_ctas
    return max(0, min(by_regs, by_smem, gpu.max_threads // threads, gpu.max_ctas))


def active_programs(n: int, block_j: int) -> tuple[int, int]:
    """``(programs that compute, grid size)`` of v1's ``(N, cdiv(N - 1, BLOCK_J))`` grid."""
    grid = n * -(-(n - 1) // block_j)
    active = sum(-(-(n - 1 - i) // block_j) for i in range(n - 1))
    return active, grid


def v2_tiles(n: int, bp: int) -> int:
    """Tiles of v2's triangular list (``kernels.triton_packed_mma.pair_tiles``): ``cdiv(N - 1 - i, BP)`` per row ``i``."""
    return sum(-(-(n - 1 - i) // bp) for i in range(n - 1))


def schedule(cfg, variant: str, n: int, gpu: GPU) -> tuple[list, int, int, float]:
    """``(kernel loop trips innermost first, programs that compute, grid size, MMA multiply-adds per program)``.

    v1: :func:`loop_trips`, :func:`active_programs`. v2: the ``K`` loop, the ``_pair_bounds`` loop over ``K0`` in
    ``BLOCK_KE`` chunks (when more than one), then the persistent tile loop with
    ``n_tiles / programs`` trips on average (``programs = min(n_tiles, 8 SMs)``, as ``default_programs``).
    """
    if variant == "v1":
        active, grid = active_programs(n, cfg.block_j)
        return loop_trips(cfg), active, grid, _expected_mma_fma(cfg)
    c = cfg.constexprs
    tiles = v2_tiles(n, c["BP"])
    programs = min(tiles, 8 * gpu.sms)
    per = tiles / programs
    passes, sum_passes = (3, 2) if c["HILO"] else (1, 1)
    # _tile_stats: the mean and its broadcast back, the per-pair scale and its broadcast back (one pass each), the sums
    per_tile = c["M"] * c["K0"] * c["PO"] * passes + (4 + 2 * sum_passes) * 2 * c["BPP"] * c["M"] * c["PO"]
    trips = [t for t in (c["K0"] // c["BLOCK_K"], -(-c["K0"] // c["BLOCK_KE"]), per) if t > 1]
    return trips, programs, programs, per * per_tile


def estimate(
    n: int,
    hidden: int,
    out: int,
    depth: int,
    arch: int,
    n_lambda: int = 21,
    dtype: torch.dtype = torch.float32,
    input_precision: str | None = None,
    variant: str = "v1",
) -> dict:
    """Static estimate of the kernel's time for ``N`` samples and the benchmark tail (see module docstring).

    Returns:
        a dict with the launch configuration, resources (registers, spills, shared memory, CTAs/SM),
        per-program dynamic instruction counts per pipe, estimated milliseconds per resource, the
        issue-bound and total (the slowest resource) estimates, and the roofline floors of the useful work.
    """
    gpu = GPUS[arch]
    tail = make_tail(hidden, out, depth)
    spec = parse_tail(tail)
    compiled, cfg = compile_kernel(spec, dtype, n_lambda, arch, input_precision, variant)
    text, res = sass_of(compiled)
    sass = parse_sass(text)
    trips, active, grid, expected_fma = schedule(cfg, variant, n, gpu)
    loop_trip, verified = map_loops(sass, trips, cfg.num_warps, expected_fma, one_each=variant == "v2")
    pipes, mma_fma = dynamic_counts(sass, loop_trip, cfg.num_warps)
    threads = 32 * cfg.num_warps
    exit_instr = _instructions_before_exit(sass)
    warps = cfg.num_warps
    clock = gpu.clock_ghz * 1e9

    def ms(warp_instr_total: float, lanes_per_clock: int) -> float:
        return 1e3 * warp_instr_total * 32 / (lanes_per_clock * gpu.sms * clock)

    per_pipe_ms = {}
    lanes = {
        "fp32": gpu.fp32_lanes,
        "int": gpu.int_lanes,
        "fp64": gpu.fp64_lanes,
        "mufu": gpu.mufu_lanes,
        "shfl": gpu.shfl_lanes,
        "shared": gpu.lsu_lanes,
        "global": gpu.lsu_lanes,
    }
    for pipe, count in pipes.items():
        if pipe in lanes:
            per_pipe_ms[pipe] = ms(count * warps * active, lanes[pipe])
    tensor_rate = gpu.tensor_fma_fp64 if dtype == torch.float64 else gpu.tensor_fma_tf32
    per_pipe_ms["tensor"] = 1e3 * mma_fma * active / (tensor_rate * gpu.sms * clock)
    issued = sum(pipes.values()) * warps * active + exit_instr * warps * (grid - active)
    issue_ms = 1e3 * issued / (gpu.issue_per_clock * gpu.sms * clock)
    floors = _floors(gpu, n, hidden, out, depth, n_lambda, dtype, input_precision)
    return {
        "gpu": gpu.name,
        "arch": arch,
        "n": n,
        "hidden": hidden,
        "out": out,
        "depth": depth,
        "variant": variant,
        "config": {
            k: v
            for k, v in cfg.constexprs.items()
            if k in ("BLOCK_J", "T_PAD", "BLOCK_K", "BLOCK_N1", "BLOCK_N2", "K0", "P1", "M", "BP", "PO", "FAST_ACT")
        },
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        "precision": cfg.constexprs["PREC"],
        "registers": res.get("REG"),
        "spill_bytes": res.get("LOCAL", 0) + res.get("STACK", 0),
        "shared_bytes": compiled.metadata.shared,
        "ctas_per_sm": occupancy(gpu, res.get("REG", 0), compiled.metadata.shared, threads),
        "programs_active": active,
        "programs_grid": grid,
        "static_instructions": len(sass.instructions),
        "loop_trips": loop_trip,
        "loops_verified": verified,
        "per_program_warp_instructions": {k: round(v) for k, v in sorted(pipes.items())},
        "mma_fma_per_program": mma_fma,
        "mma_fma_expected": round(expected_fma, 3),
        "ms": {k: round(v, 4) for k, v in sorted(per_pipe_ms.items())},
        "issue_ms": round(issue_ms, 4),
        "total_ms": round(max(max(per_pipe_ms.values()), issue_ms), 4),
        "floors_ms": floors,
    }


def _expected_mma_fma(cfg) -> int:
    """Multiply-adds a program's ``tl.dot`` calls perform, from the launch configuration (checks the loop mapping)."""
    c = cfg.constexprs
    rows = c["BLOCK_J"] * c["T_PAD"]
    passes = 3 if c["PREC"] == "tf32x3" else 1
    if c["DEPTH"] == 1:
        return rows * c["K0"] * c["P1"] * passes
    layer1 = c["K0"] * c["P1"] * (c["P2"] // c["BLOCK_N2"])  # recomputed per layer-2 column block
    layer2 = c["P1"] * c["P2"]
    layer3 = c["P2"] * c["P3"] if c["DEPTH"] >= 3 else 0
    layer4 = c["P3"] * c["P4"] if c["DEPTH"] >= 4 else 0
    return rows * (layer1 + layer2 + layer3 + layer4) * passes


def _instructions_before_exit(sass: Sass) -> int:
    """Instructions a program runs before its early ``EXIT`` (programs past the last column)."""
    for k, (_a, op, _m, _o) in enumerate(sass.instructions):
        if op == "EXIT":
            return k + 1
    return len(sass.instructions)


def _floors(gpu: GPU, n: int, hidden: int, out: int, depth: int, n_lambda: int, dtype: torch.dtype, input_precision: str | None) -> dict:
    """Roofline floors (ms) of the useful work: the tensor cores on the Linears, the MUFU on SiLU (ex2 + rcp)."""
    from .harness import useful_flops_per_pair

    pairs = n_pairs(n)
    fma = pairs * useful_flops_per_pair(n_lambda, hidden, out, depth) / 2
    passes = 1 if dtype == torch.float64 or input_precision in ("ieee", "tf32") else 3
    rate = gpu.tensor_fma_fp64 if dtype == torch.float64 else gpu.tensor_fma_tf32
    clock = gpu.clock_ghz * 1e9
    acts = pairs * n_lambda * hidden * depth
    return {
        "tensor": round(1e3 * fma * passes / (rate * gpu.sms * clock), 4),
        "activation_unit": round(1e3 * acts * 2 / (gpu.mufu_lanes * gpu.sms * clock), 4),
    }


def variants_for(hidden: int, out: int, depth: int, n_lambda: int = 21) -> list[str]:
    """The kernel variants that run this benchmark shape: v1 always, v2 where it supports the tail."""
    from ..kernels import triton_packed_mma as kc2

    return ["v1", "v2"] if kc2.supported(parse_tail(make_tail(hidden, out, depth)), n_lambda) else ["v1"]


def estimate_rows(ns=(961, 4096), hidden: int = 100, out: int = 31, depth: int = 1, archs=(90, 80)) -> list[dict]:
    """:func:`estimate` for every ``N``, architecture and kernel variant (the default benchmark shape)."""
    return [estimate(n, hidden, out, depth, arch, variant=v) for arch in archs for v in variants_for(hidden, out, depth) for n in ns]


MD_BEGIN = "<!-- static-gpu:begin (generated by grokfast-metrics bench --static-gpu; static estimates, not measurements) -->"
MD_END = "<!-- static-gpu:end -->"


def update_results_md(rows: list[dict], md_path) -> object:
    """Write the estimates into their own marked block of ``md_path`` (separate from measured timings)."""
    from .report import replace_block

    verified = all(r["loops_verified"] for r in rows)
    note = (
        ""
        if verified
        else "\nRows marked * could not be checked: the MMA work counted from their SASS loops "
        "differs from what the kernel's dots perform, so their loop trip counts are a guess.\n"
    )
    block = "\n".join([MD_BEGIN, "", format_estimates(rows), note, MD_END])
    return replace_block(md_path, MD_BEGIN, MD_END, block)


def format_estimates(rows: list[dict]) -> str:
    """A Markdown table of static estimates, every number labelled as such."""
    head = (
        "| GPU (static estimate) | kernel | N | regs | spills | CTAs/SM | tensor ms | MUFU ms | FP32 ms | INT ms | "
        "shuffle ms | shared ms | issue ms | **estimate ms** | floors: tensor / MUFU ms |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        m = r["ms"]
        lines.append(
            f"| {r['gpu']}{'' if r['loops_verified'] else ' *'} | {r.get('variant', 'v1')} | {r['n']} | {r['registers']} | "
            f"{r['spill_bytes']} | {r['ctas_per_sm']} | "
            f"{m.get('tensor', 0):.3f} | {m.get('mufu', 0):.3f} | {m.get('fp32', 0):.3f} | {m.get('int', 0):.3f} | "
            f"{m.get('shfl', 0):.3f} | {m.get('shared', 0):.3f} | {r['issue_ms']:.3f} | **{r['total_ms']:.3f}** | "
            f"{r['floors_ms']['tensor']:.3f} / {r['floors_ms']['activation_unit']:.3f} |"
        )
    return "\n".join(lines)
