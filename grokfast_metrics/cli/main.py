"""Command line: ``grokfast-metrics {train,bench,plot,sweep,build-kernel} ...`` (also ``python -m grokfast_metrics``).

``train`` is implemented here (see :mod:`grokfast_metrics.experiment.trainer`); its options are generated from
the fields of :class:`~grokfast_metrics.experiment.config.TrainConfig` (:mod:`grokfast_metrics.experiment.options`).
``bench``, ``plot`` and ``sweep`` live in ``grokfast_metrics.bench.command``, ``grokfast_metrics.cli.plot`` and
``grokfast_metrics.sweep.command``; each exposes ``add_arguments(parser)`` and ``run(args) -> int`` and is imported
only when its subcommand is used. Every import of the package here is inside a function: this module is imported
before torch (``__main__``), so that Ctrl-C during start-up is one line.

Exit codes: 0 success, 1 a run file could not be written (disk full, directory made read-only: one line naming
the file and the cause; the rows and the last checkpoint written are kept whole), 2 bad arguments or unavailable
subcommand, 3 training diverged (non-finite loss), 130 interrupted by SIGINT, 143 stopped by SIGTERM (logs, summary
and plot kept in every case).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

PROG = "grokfast-metrics"
#: lazily loaded subcommands: name -> (module, help)
LAZY = {
    "bench": ("grokfast_metrics.bench.command", "benchmark the LMN backends"),
    "plot": ("grokfast_metrics.cli.plot", "plot figures from run directories"),
    "sweep": ("grokfast_metrics.sweep.command", "train a grid of runs (local process pool or Ray) and draw the phase diagram"),
}


class UsageError(Exception):
    """Bad command-line arguments (reported as one line, exit 2)."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message}")


def _check_out_dir(out: Path) -> None:
    """Create ``out`` and check that it is writable, or raise UsageError."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"{PROG} train: error: cannot write to output directory {str(out)!r}: {e.strerror or e}") from None


def _resume_steps(args: argparse.Namespace, cfg) -> int | None:
    """``--steps`` for a resumed run (given: the run is extended or shortened to it); refuses any other option given
    whose value differs from the run's recorded config (``config.json``), whether or not it equals the default."""
    from ..experiment.config import TrainConfig
    from ..experiment.options import given_options
    from ..experiment.runlog import RunLogError, read_json

    run_dir = Path(args.resume)
    if args.out is not None and Path(args.out).resolve() != run_dir.resolve():
        raise UsageError(f"{PROG} train: error: --resume {run_dir} continues that directory; do not give another --out")
    if args.overwrite:
        raise UsageError(f"{PROG} train: error: --resume continues the run in {run_dir}; --overwrite would replace it (give one of them)")
    try:
        stored = read_json(run_dir / "config.json")["config"]
        recorded = TrainConfig(**stored)
    except (FileNotFoundError, RunLogError, KeyError, TypeError) as e:
        raise UsageError(f"{PROG} train: error: cannot resume {str(run_dir)!r}: {e}") from None
    given = given_options(args)
    for f in fields(TrainConfig):
        if f.name == "steps" or f.name not in given:
            continue
        value, was = getattr(cfg, f.name), stored.get(f.name)
        try:  # compared as the run resolved it (device auto -> cpu, probe "8" -> 8)
            mine = getattr(TrainConfig(**{**vars(recorded), f.name: value}).resolved(), f.name)
        except (TypeError, ValueError):
            mine = value
        if str(mine) != str(was):
            flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
            raise UsageError(
                f"{PROG} train: error: {flag} {value} differs from the resumed run's config ({was}); a "
                "resumed run keeps its configuration (only --steps may change)"
            )
    return cfg.steps if "steps" in given else None


def _run_train(args: argparse.Namespace) -> int:
    from ..experiment.collapse import NumericalCollapseWarning
    from ..experiment.options import train_config
    from ..experiment.runlog import RunDirError, RunLogError, RunWriteError
    from ..experiment.trainer import resume, train

    cfg = train_config(args)
    if args.resume is not None:
        steps = _resume_steps(args, cfg)
        try:
            with warnings.catch_warnings():  # _report prints the collapse warning itself
                warnings.simplefilter("ignore", NumericalCollapseWarning)
                res = resume(args.resume, steps=steps, progress=not args.no_progress, plot=not args.no_plot)
        except (FileNotFoundError, RunLogError, ValueError) as e:
            raise UsageError(f"{PROG} train: error: cannot resume {args.resume!r}: {e}") from None
        return _report(res, Path(args.resume), args.no_plot)
    for name in ("embed_dim", "hidden", "ma_window", "d_model", "d_mlp", "n_heads"):
        if getattr(args, name) < 1:
            raise UsageError(f"{PROG} train: error: --{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    try:
        cfg.validate()
        from ..experiment.config import parse_probe
        from ..experiment.run import probe_indices
        from ..experiment.tasks import make_task

        if cfg.probe is not None:
            probe_indices(make_task(cfg.task, cfg.train_fraction, cfg.seed, cfg.p), parse_probe(cfg.probe), cfg.probe_seed)
        from ..experiment.preflight import preflight

        preflight(cfg.resolved())  # memory and the LMN backend, before the run directory is created
    except (ValueError, MemoryError) as e:
        raise UsageError(f"{PROG} train: error: {e}") from None
    name = args.task if cfg.model == "mlp" else f"{cfg.model}-{args.task}"
    out = Path(args.out) if args.out else Path("runs") / f"{name}-s{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    _check_out_dir(out)
    try:
        with warnings.catch_warnings():  # _report prints the collapse warning itself
            warnings.simplefilter("ignore", NumericalCollapseWarning)
            res = train(cfg, out, progress=not args.no_progress, plot=not args.no_plot, overwrite=args.overwrite)
    except RunDirError as e:
        raise UsageError(f"{PROG} train: error: {e}") from None
    except RunWriteError as e:  # before the first step (config.json, the log files): one line, exit 1
        print(f"{PROG} train: error: {e} (errno {e.errno})", file=sys.stderr)
        return 1
    return _report(res, out, args.no_plot)


def _report(res, out: Path, no_plot: bool) -> int:
    """Print the summary (and why the run stopped); the run's exit code."""
    from ..experiment.runlog import collapse_message, format_summary

    print(format_summary(res.summary))
    print(
        f"logs: {out / 'metrics.jsonl'}, {out / 'metrics.csv'}; summary: {out / 'summary.json'}"
        + ("" if no_plot else f"; plot: {out / 'curves.png'}")
    )
    if res.summary.get("numerical_collapse") is not None:  # the warning, last, where it is seen
        print(f"{PROG} train: warning: {collapse_message(res.summary)}", file=sys.stderr)
    if res.stop_reason is not None:
        print(f"{PROG} train: stopped early: {res.stop_reason} (exit code {res.exit_code})", file=sys.stderr)
    return res.exit_code


def _run_build_kernel(args: argparse.Namespace) -> int:
    """``build-kernel``: compile the fused CPU kernel into its cache now; exit 0 built or cached, 1 unavailable."""
    from ..kernels import cpu_fused as kcpu

    info = kcpu.build(force=True)
    if info["error"] is not None:
        print(f"{PROG} build-kernel: {kcpu.unavailable_message()}", file=sys.stderr)
        return 1
    how = "cached" if info["build_seconds"] is None else f"built in {info['build_seconds']:.1f} s"
    print(f"fused CPU kernel {how}: {info['path']}")
    return 0


def _one_line_kernel_warning() -> None:
    """Show the fused-kernel fallback warning as one line (cause and cost), not a source location in library code."""
    from ..kernels.cpu_fused import CPUKernelUnavailableWarning

    plain = warnings.formatwarning
    if getattr(plain, "one_line_kernel_warning", False):
        return

    def fmt(message, category, filename, lineno, line=None):
        if issubclass(category, CPUKernelUnavailableWarning):
            return f"{PROG}: warning: {message}\n"
        return plain(message, category, filename, lineno, line)

    fmt.one_line_kernel_warning = True
    warnings.formatwarning = fmt


def _selected_command(argv: list[str]) -> str | None:
    """First non-option token (the subcommand), if any."""
    for a in argv:
        if not a.startswith("-"):
            return a
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The top-level parser; lazy subcommands get their arguments only when selected in ``argv``.

    A lazy subcommand whose module cannot be imported is kept with a ``_unavailable`` reason.
    """
    from ..experiment.options import add_train_arguments
    from ..foundation.version import __version__

    parser = _Parser(prog=PROG, description="Fast linear mapping number (LMN) for tracking grokking at every step.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,bench,plot,sweep,build-kernel}", parser_class=_Parser)
    sub.required = True
    p = sub.add_parser(
        "train",
        help="train on add/s4/xor with LMN tracked (the main job)",
        description="Full-batch AdamW on an algorithmic task with LMN tracked; writes metrics.jsonl, "
        "metrics.csv, config.json, summary.json and curves.png into the run directory.",
    )
    add_train_arguments(p)
    p.set_defaults(_run=_run_train, _parser=p)
    p = sub.add_parser(
        "build-kernel",
        help="compile the fused CPU kernel now (else it is built on first use)",
        description="Compile the fused C++ CPU kernel into its cache (TORCH_EXTENSIONS_DIR, else torch's "
        "default build root) so that the first LMN does not wait for it; with CXX set, that "
        "compiler. Exit 1, with the reason, where it cannot be built: LMN then runs on torch "
        "ops, about 10-20x slower.",
    )
    p.set_defaults(_run=_run_build_kernel)
    selected = _selected_command(argv or [])
    for name, (module, help_) in LAZY.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name != selected:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            reason = f"{module} is not installed" if e.name == module else f"{module} needs {e.name!r} ({e})"
            p.set_defaults(_unavailable=reason)
            continue
        except ImportError as e:
            p.set_defaults(_unavailable=f"{module} failed to import: {e}")
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _parser=p)
    return parser


def _interrupted_at_start(signum, frame):
    """SIGINT while the command starts (imports, parsing): nothing to keep, so one line and exit 130 now (a
    ``KeyboardInterrupt`` raised inside torch's or NumPy's import surfaces as an unrelated ImportError)."""
    print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
    os._exit(130)


@contextmanager
def starting():
    """While the command starts (imports, argument parsing), Ctrl-C exits at once with one line and code 130.

    Only in the main thread (elsewhere signals are not ours); the previous handler is restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, _interrupted_at_start)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``grokfast-metrics`` console script.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        Exit code: 0 ok, 2 bad arguments / unavailable subcommand, 130 interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with starting():  # the kernel warning's import (torch, NumPy) too: a Ctrl-C there is one line and 130
            _one_line_kernel_warning()
            parser = build_parser(argv)
            args, extra = parser.parse_known_args(argv)
            reason = getattr(args, "_unavailable", None)
            if reason is not None:
                raise UsageError(f"{PROG} {args.command}: error: not available: {reason}")
            if extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            if args._run is _run_train:
                importlib.import_module("grokfast_metrics.experiment.trainer")  # torch and the trainer, still under starting()
            args._argv = argv
        return int(args._run(args))
    except UsageError as e:
        print(str(e).splitlines()[0] if str(e) else f"{PROG}: error", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
