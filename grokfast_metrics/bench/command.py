"""``grokfast-metrics bench`` (and ``python -m grokfast_metrics.bench``): options, the run, the output.

:func:`add_arguments` and :func:`run` are what the CLI loads lazily; :func:`run_benchmarks` is the
whole measurement (roof, sweep, exponents, rows after the sweep) without any output.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ..foundation import runtime as _runtime
from ..foundation.policy import check_n_lambda
from .extras import extra_rows
from .harness import BenchRow
from .report import DEFAULT_CSV, DEFAULT_MD, append_csv, format_table, update_results_md
from .sweep import (
    FULL_DEPTH,
    FULL_HIDDEN,
    FULL_N,
    FULL_N_GPU,
    QUICK_DEPTH,
    QUICK_HIDDEN,
    QUICK_N,
    BenchConfig,
    check_backends,
    default_backends,
    roof_row,
    row_maker,
    scaling_rows,
    sweep_shapes,
)

DESCRIPTION = "Benchmark harness: throughput of the LMN paths against baselines measured in the same run."


def run_benchmarks(cfg: BenchConfig, device: torch.device) -> list[BenchRow]:
    """Run the sweep of ``cfg`` on ``device`` and return its rows (nothing is written).

    Rows, in order: the matmul roof; for every (H, depth) and N the reference and naive baselines (per
    pair, on subsets, extrapolated to each N) and each backend's ``L`` time (refused if its agreement
    check on the reference subset failed, done before any timing; skipped if a small-N probe predicts one
    call above ``cfg.max_row_seconds``, or if the shape is not the default one and N > ``cfg.max_n_other``);
    the fitted exponent of time vs N; the paired roof; the end-to-end split (L from the sweep, eigen and the
    rest of ``lmn_from_connectivity`` timed on that L); the training overhead.

    Raises:
        ValueError: an unknown backend name.
    """
    backends = check_backends(cfg.backends or default_backends(device))
    new_row = row_maker(device)
    roof = roof_row(cfg, device, new_row)
    rows, state = sweep_shapes(cfg, device, backends, roof.gflops, new_row)
    return [roof, *rows, *scaling_rows(cfg, state.l_times, new_row), *extra_rows(cfg, device, state, new_row)]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``bench`` options to ``parser`` (used by ``grokfast-metrics bench`` and ``python -m``)."""
    add = parser.add_argument
    add(
        "--n",
        type=int,
        nargs="+",
        default=None,
        help=f"sample counts N (default {list(FULL_N)}; on CUDA up to 16384; --quick: {list(QUICK_N)})",
    )
    add("--hidden", type=int, nargs="+", default=None, help=f"hidden widths H (default {list(FULL_HIDDEN)}; --quick: {list(QUICK_HIDDEN)})")
    add("--depth", type=int, nargs="+", default=None, help=f"nonlinear stages after the absorbed first Linear (default {list(FULL_DEPTH)})")
    add(
        "--backends",
        nargs="+",
        default=None,
        help="backends to time: torch (stock torch ops), cpu (the fused C++ kernel), triton, triton-v1, triton-v2 "
        "(triton with one kernel variant), auto (the fused C++ kernel on CPU, Triton on CUDA) (default: torch "
        "auto on CPU, torch triton-v1 triton-v2 auto on CUDA; "
        "an auto that resolves to a listed backend is timed once)",
    )
    add("--out", type=int, default=31, help="output logits O (default 31: addition mod 31)")
    add("--n-lambda", type=int, default=21, help="interpolation points T (default 21)")
    add("--repeats", type=int, default=None, help="timed runs per row (default 5, --quick 2)")
    add("--quick", action="store_true", help="smoke run: N 64 256, H 100, depth 1 2, 2 repeats, small baselines and training overhead")
    add("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    add(
        "--out-dir",
        default=None,
        help="directory of the results (results.csv, RESULTS.md and its plots); default: the checkout's benchmarks/ "
        "when run from inside this package's source checkout, else ./bench-results",
    )
    add("--csv", default=None, help=f"CSV to append rows to (default --out-dir/{DEFAULT_CSV})")
    add("--no-csv", action="store_true", help="do not append to the CSV (nor update --results-md)")
    add(
        "--results-md",
        default=None,
        help=f"markdown file whose generated section is refreshed from the CSV (default --out-dir/{DEFAULT_MD}; '' to skip)",
    )
    add(
        "--max-row-seconds",
        type=float,
        default=None,
        help="skip a row whose call is predicted (small-N probe) to take longer (default 60 CPU, 30 CUDA)",
    )
    add("--n-ref", type=int, default=24, help="samples for the reference check/baseline (default 24)")
    add("--n-naive", type=int, default=None, help="samples for the naive baseline (default 128, --quick 64)")
    add(
        "--train-n",
        type=int,
        default=None,
        help="inputs tracked per training step in the overhead ratio (default 961, --quick 64; 0 skips)",
    )
    add("--all-n", action="store_true", help="on CPU, also run shapes other than H=100 depth=1 above N=961 (default: capped)")
    add("--no-e2e", action="store_true", help="skip the end-to-end L/eigen/entropy split")
    add(
        "--no-paired-roof",
        action="store_true",
        help="skip the N=961 fraction of the roof timed alternately with the matmul (robust to machine drift)",
    )
    add(
        "--no-fp64-roof",
        action="store_true",
        help="skip the fp64 row: the fused CPU kernel on an fp64 model at N=961 against an fp64 matmul timed "
        "alternately, and its speed-up over the torch-op fp64 path",
    )
    add("--roof-size", type=int, default=None, help="side of the roof matmul (default 2048 CPU, 8192 CUDA)")
    add("--threads", type=int, default=None, help="torch.set_num_threads for the run (default: torch's)")
    add("--seed", type=int, default=0)
    _add_mode_arguments(add)
    return parser


def _add_mode_arguments(add) -> None:
    """The options that run one other measurement instead of the LMN rows (static GPU estimate, tracking overhead,
    GPU-day merge, sweep throughput, drop-in)."""
    add(
        "--static-gpu",
        action="store_true",
        help="no GPU needed: compile the Triton kernels (v1 and v2 where v2 runs the shape) for sm_90 and sm_80, "
        "count their SASS instructions per "
        "execution unit and print a static estimate of L's time per resource (N from --n, default 961 "
        "4096; H, depth from --hidden, --depth); writes its own block of --results-md",
    )
    add(
        "--async-tracking",
        action="store_true",
        help="only the training-step time of the paper's MLP with LMN of --train-n inputs (default 961) every "
        "step: no tracking vs synchronous vs asynchronous tracker (eigen step on a host thread), same run, "
        "--repeats rounds (default 3) of 5 steps per mode; backend: the first of --backends (default auto)",
    )
    add("--no-progress", action="store_true", help="no progress bar or per-row log")
    add(
        "--merge-gpu-day",
        metavar="RESULTS",
        default=None,
        help="instead of measuring: append the rows of a GPU day's gpu_day.json (written by benchmarks/gpu_day.sh; "
        "a file or its folder) to --csv and write its block of --results-md, with the device name",
    )
    add("--allow-dry-run", action="store_true", help="--merge-gpu-day: merge a --dry-run results file too")
    add(
        "--sweep-throughput",
        action="store_true",
        help="instead of the LMN rows: runs per hour of a 16-run sweep grid (add, LMN every 100 steps on 128 inputs; "
        "--quick: 4 runs) trained sequentially, with sweep --engine local and with sweep --batched, in this run",
    )
    add(
        "--dropin",
        action="store_true",
        help="only lmn_at on the test models shaped like the public grokking codebases (tests/support/models.py): each timed "
        "before/after (the tail lowered into the fused kernel vs the generic path) in this run, µs per pair and "
        "the fraction of the matmul roof for lowered tails, and the tails left on the generic path with compile=True "
        "(torch.compile) vs eager, alternately; N from --n (default 961 for the Nanda-style tail)",
    )
    add("--sweep-steps", type=int, default=None, help="steps per run of --sweep-throughput (default 2000, --quick 200)")
    add("--sweep-workers", type=int, default=2, help="processes of the two sweep modes of --sweep-throughput (default 2)")


def config_from_args(args: argparse.Namespace, device: torch.device) -> BenchConfig:
    """:class:`BenchConfig` from parsed :func:`add_arguments` options.

    Raises:
        ValueError: a size is out of range.
    """
    gpu = device.type == "cuda"
    ns = args.n or (QUICK_N if args.quick else (FULL_N_GPU if gpu else FULL_N))
    hiddens = args.hidden or (QUICK_HIDDEN if args.quick else FULL_HIDDEN)
    depths = args.depth or (QUICK_DEPTH if args.quick else FULL_DEPTH)
    if min(ns) < 2:
        raise ValueError(f"--n values must be >= 2; got {list(ns)}")
    if min(hiddens) < 1 or min(depths) < 1 or args.out < 1:
        raise ValueError("--hidden, --depth and --out must be >= 1")
    try:
        check_n_lambda(args.n_lambda)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--n-lambda: {e}") from None
    if args.n_ref < 2:
        raise ValueError(f"--n-ref must be >= 2; got {args.n_ref}")
    repeats = args.repeats or (2 if args.quick else 5)
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1; got {repeats}")
    train_n = args.train_n if args.train_n is not None else (64 if args.quick else 961)
    return BenchConfig(
        ns=sorted(set(ns)),
        hiddens=list(dict.fromkeys(hiddens)),
        depths=sorted(set(depths)),
        backends=args.backends,
        out=args.out,
        n_lambda=args.n_lambda,
        repeats=repeats,
        device=str(device),
        n_ref=args.n_ref,
        n_naive=args.n_naive or (64 if args.quick else 128),
        max_n_other=None if (gpu or args.all_n) else 961,
        max_row_seconds=args.max_row_seconds or (30.0 if gpu else 60.0),
        roof_size=args.roof_size,
        lmn_parts=not args.no_e2e,
        paired_roof=not args.no_paired_roof,
        fp64_roof=not args.no_fp64_roof,
        train_n=train_n or None,
        seed=args.seed,
        progress=not args.no_progress,
    )


def checkout_benchmarks(cwd: Path | None = None) -> Path | None:
    """The ``benchmarks/`` folder of the source checkout this package runs from, when ``cwd`` (default: the current
    directory) is inside that checkout; ``None`` otherwise (an installed package, or run from elsewhere)."""
    root = Path(__file__).resolve().parents[2]
    bench = root / "benchmarks"
    if not ((root / "setup.py").is_file() and (bench / "RESULTS.md").is_file()):
        return None
    here = (cwd or Path.cwd()).resolve()
    return bench if here == root or root in here.parents else None


def output_paths(args: argparse.Namespace, cwd: Path | None = None) -> tuple[Path, Path | None, str]:
    """``(csv, results_md or None, why there)`` of ``args``: ``--csv`` / ``--results-md`` when given, else in
    ``--out-dir``, else in the checkout's ``benchmarks/`` (:func:`checkout_benchmarks`), else ``./bench-results``."""
    if args.out_dir is not None:
        base, why = Path(args.out_dir), "--out-dir"
    elif (bench := checkout_benchmarks(cwd)) is not None:
        base, why = bench, "run from the source checkout"
    else:
        base, why = (cwd or Path.cwd()) / "bench-results", "not in a source checkout; --out-dir to choose"
    csv_path = Path(args.csv) if args.csv else base / DEFAULT_CSV
    why = "--csv" if args.csv else why
    md = args.results_md if args.results_md is not None else str(base / DEFAULT_MD)
    return csv_path, (Path(md) if md else None), why


def bench_device(name: str) -> torch.device | None:
    """``"auto"`` -> cuda if available else cpu; ``"cuda"`` without CUDA -> ``None`` (caller skips).

    Raises:
        ValueError: ``name`` is not a torch device string.
    """
    try:
        return _runtime.resolve_device(name)
    except ValueError as e:
        if name.startswith("cuda") and not torch.cuda.is_available():
            return None
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:<index>; got {name!r}") from e


def _error(msg: str) -> int:
    print(f"grokfast-metrics bench: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``; print the table; append to the CSV. Returns the exit code.

    ``--device cuda`` without CUDA prints that the GPU benchmarks are skipped and returns 0.
    Bad options print the error and return 2.
    """
    try:
        device = bench_device(args.device)
    except ValueError as e:
        return _error(str(e))
    if args.merge_gpu_day:
        return _merge_gpu_day(args)
    if device is None:
        print(f"no CUDA device available: GPU benchmarks skipped (--device {args.device})", file=sys.stderr)
        return 0
    if args.static_gpu:
        return _run_static_gpu(args)
    if args.sweep_throughput:
        return _run_sweep_throughput(args, device)
    if args.threads is not None:
        if args.threads < 1:
            return _error(f"--threads must be >= 1; got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.async_tracking:
        return _run_async_tracking(args, device)
    if args.dropin:
        from .dropin import run_dropin

        return run_dropin(n=(args.n or [961])[0], n_lambda=args.n_lambda, quiet=args.no_progress)
    try:
        rows = run_benchmarks(config_from_args(args, device), device)
    except ValueError as e:
        return _error(str(e))
    print(format_table(rows))
    if not args.no_csv:
        csv_path, md, why = output_paths(args)
        try:
            path = append_csv(rows, csv_path)
        except ValueError as e:
            return _error(str(e))
        print(f"\nappended {len(rows)} rows to {path.resolve()} ({why})")
        if md is not None:
            print(f"updated {update_results_md(path, md).resolve()}")
    return 0


def _merge_gpu_day(args: argparse.Namespace) -> int:
    """``--merge-gpu-day``: the GPU day's rows into ``--csv``, its block into ``--results-md`` (nothing on refusal)."""
    from .gpu_day_report import merge

    try:
        written = merge(args.merge_gpu_day, args.csv, args.results_md or None, allow_dry_run=args.allow_dry_run)
    except ValueError as e:
        return _error(str(e))
    print("merged the GPU day into " + ", ".join(map(str, written)))
    return 0


def _run_static_gpu(args: argparse.Namespace) -> int:
    """``--static-gpu``: print (and record in ``--results-md``) the static estimate for the asked shapes."""
    from . import static_gpu

    try:
        rows = [
            static_gpu.estimate(n, h, args.out, d, arch, args.n_lambda, variant=v)
            for arch in (90, 80)
            for h in (args.hidden or [100])
            for d in (args.depth or [1])
            for v in static_gpu.variants_for(h, args.out, d, args.n_lambda)
            for n in (args.n or [961, 4096])
        ]
    except (RuntimeError, ValueError) as e:
        return _error(f"static GPU estimate unavailable: {e}")
    print("static estimate (not a measurement): SASS instructions x programs / per-SM throughput, perfect overlap")
    print(static_gpu.format_estimates(rows))
    _, md, why = output_paths(args)
    if md is not None and not args.no_csv:
        print(f"updated {static_gpu.update_results_md(rows, md).resolve()} ({why})")
    return 0


def _run_async_tracking(args: argparse.Namespace, device: torch.device) -> int:
    """``--async-tracking``: print the sync vs async tracking overhead (not written to the CSV)."""
    from .async_track import async_tracking, format_async_tracking

    n = 961 if args.train_n is None else args.train_n
    if not 2 <= n <= 961 or (args.repeats is not None and args.repeats < 1):
        return _error(f"--async-tracking needs 2 <= --train-n <= 961 and --repeats >= 1; got {n}, {args.repeats}")
    res = async_tracking(
        device, n_track=n, rounds=args.repeats or 3, backend=(args.backends or ["auto"])[0], seed=args.seed, n_lambda=args.n_lambda
    )
    print(format_async_tracking(res))
    return 0


def _run_sweep_throughput(args: argparse.Namespace, device: torch.device) -> int:
    """``--sweep-throughput``: print the markdown table of :func:`.sweep_throughput.sweep_throughput`."""
    from .sweep_throughput import format_table, sweep_throughput

    steps = args.sweep_steps or (200 if args.quick else 2000)
    if steps < 1 or args.sweep_workers < 1:
        return _error("--sweep-steps and --sweep-workers must be >= 1")
    rows = sweep_throughput(
        steps, args.sweep_workers, args.quick, device, log=(lambda m: None) if args.no_progress else (lambda m: print(m, file=sys.stderr))
    )
    print(format_table(rows))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m grokfast_metrics.bench [options]``."""
    parser = add_arguments(argparse.ArgumentParser(prog="grokfast-metrics bench", description=DESCRIPTION))
    return run(parser.parse_args(argv))
