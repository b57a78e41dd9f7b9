"""Command line: ``grokfast-metrics {train,bench,plot,sweep,build-kernel} ...`` (also ``python -m grokfast_metrics``).

``train`` is implemented here (see :mod:`grokfast_metrics.train`); its options are generated from the
fields of :class:`~grokfast_metrics.config.TrainConfig` (help, choices and defaults in one place).
``bench`` and ``plot`` live in ``grokfast_metrics.bench`` and ``grokfast_metrics.figures``; each exposes
``add_arguments(parser)`` and ``run(args) -> int`` and is imported only when its subcommand is used.

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
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

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


def _add_train_arguments(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    """One option per :class:`~grokfast_metrics.config.TrainConfig` field (from its metadata), then the run options.

    ``sweep``: the options as ``sweep`` has them (each run's settings; ``--out`` is the sweep directory, no
    ``--overwrite`` / ``--resume``, whose text is about one run); ``sweep`` adds its own options after these.
    """
    from ..experiment.config import GROUPS, TrainConfig

    groups = {name: p.add_argument_group(name) for name in GROUPS}
    hints = get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        kw = _argument(f, hints[f.name])
        if sweep and f.metadata.get("sweep_help"):
            kw["help"] = f.metadata["sweep_help"] + kw["help"][len(f.metadata["help"]):]
        groups[f.metadata["group"]].add_argument(f.metadata.get("flag", "--" + f.name.replace("_", "-")), **kw)
    g = groups["output"]
    if sweep:
        g.add_argument("--out", default=None, help="sweep directory (default runs/sweep-<task>-<time>): one run directory "
                       "per grid point and seed, plus sweep.csv, sweep.json, phase.png, lmn_predicts.png; a run already "
                       "finished there is kept, not re-run")
        g.add_argument("--no-progress", action="store_true", help="no progress bar")
        g.add_argument("--no-plot", action="store_true", help="do not write each run's curves.png")
        g.add_argument("--overwrite", action="store_true", help="re-run the finished runs in --out that were trained "
                       "with other options than this sweep's (without it such a sweep is refused)")
        g.add_argument("--resume", default=None, help=argparse.SUPPRESS)  # refused with its reason (sweep.command)
        return
    g.add_argument("--out", default=None, help="run directory (default runs/<task>-s<seed>-<time>); one that already "
                   "holds a run is refused unless --overwrite or --resume")
    g.add_argument("--overwrite", action="store_true", help="replace the run in --out (its run files are removed first)")
    g.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR from its checkpoint (--checkpoint-every); its config is kept, --steps "
                        "may extend it")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plot", action="store_true", help="do not write curves.png")


def _default(f: Field):
    """The dataclass default of field ``f``."""
    return f.default_factory() if f.default is MISSING else f.default


def _argument(f: Field, hint) -> dict:
    """``add_argument`` keywords of a ``TrainConfig`` field: type, default and help from the dataclass.

    ``bool`` fields are switches (``--no-<name>`` when the default is True); list fields take several
    values (``nargs="+"``), a ``sep``-separated string (``sep`` metadata) or a repeated option
    (``action="append"`` metadata, default filled in by :func:`_train_config`).
    """
    meta, default = f.metadata, _default(f)
    kw = {"dest": f.name, "help": meta["help"] + _default_help(default, meta.get("sep", " "))}
    if meta.get("choices") is not None:
        kw["choices"] = meta["choices"]
    if hint is bool:
        return {**kw, "action": "store_false" if default else "store_true", "help": meta["help"]}
    if meta.get("action") is not None:
        return {**kw, "action": meta["action"], "default": None}
    if get_origin(hint) is list:
        item = get_args(hint)[0]
        if "sep" in meta:
            return {**kw, "default": default, "type": lambda s: [x.strip() for x in s.split(meta["sep"]) if x.strip()]}
        return {**kw, "default": default, "type": item, "nargs": "+"}
    types = [t for t in get_args(hint) if t is not type(None)] or [hint]  # X | None -> X; str | int -> str
    return {**kw, "default": default, "type": types[0]}


def _default_help(default, sep: str) -> str:
    if default is None:  # device-dependent: the help says what it resolves to
        return ""
    shown = sep.join(map(str, default)) if isinstance(default, list) else str(default)
    return f" (default {shown})".replace("%", "%%")


def _train_config(args: argparse.Namespace):
    """The :class:`~grokfast_metrics.config.TrainConfig` of parsed ``train`` arguments (``all`` layers expanded)."""
    from ..experiment.config import TrainConfig

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    for f in fields(TrainConfig):
        if f.metadata.get("action") is not None and values[f.name] is None:
            values[f.name] = _default(f)
    if values["lmn_layers"] is not None:
        values["lmn_layers"] = _layers(values["lmn_layers"], values["model"])
    return TrainConfig(**values)


def _check_out_dir(out: Path) -> None:
    """Create ``out`` and check that it is writable, or raise UsageError."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"{PROG} train: error: cannot write to output directory {str(out)!r}: {e.strerror or e}") from None


def _layers(chosen: list[str], model: str = "mlp") -> list[str]:
    """Expand ``all`` to every layer (default layer first) and ``fig3`` to Fig. 3's readings; ``A:logits`` is ``A``;
    keeps the order and drops repeats. For the transformer ``all`` is its readings (``fig3`` is the mlp's)."""
    from ..experiment.model import DEFAULT_LAYER, FIG3_READINGS, LAYERS, canonical_spec
    from ..experiment.transformer import TRANSFORMER_LAYERS

    every = list(TRANSFORMER_LAYERS) if model == "transformer" else [DEFAULT_LAYER, *LAYERS]
    out: list[str] = []
    for layer in chosen:
        expanded = every if layer == "all" else list(FIG3_READINGS) if layer == "fig3" else [layer]
        for name in expanded:
            name = canonical_spec(name)
            if name not in out:
                out.append(name)
    return out


def given_options(args: argparse.Namespace) -> set[str]:
    """The destinations of the options given on the command line (not left at their defaults), for the subcommand
    ``args`` was parsed by (``args._parser`` and ``args._argv``, set by :func:`main`); empty when unknown."""
    parser, argv = getattr(args, "_parser", None), getattr(args, "_argv", None)
    if parser is None or argv is None:
        return set()
    rest = argv[argv.index(args.command) + 1:] if args.command in argv else argv
    saved = {}
    for action in parser._actions:
        saved[action] = action.default
        action.default = argparse.SUPPRESS
    try:
        ns, _ = argparse.ArgumentParser.parse_known_args(parser, rest, argparse.Namespace())
    finally:
        for action, default in saved.items():
            action.default = default
    return {k for k in vars(ns) if not k.startswith("_")}


def _resume_steps(args: argparse.Namespace, cfg) -> int | None:
    """``--steps`` for a resumed run (given: the run is extended or shortened to it); refuses any other option given
    whose value differs from the run's recorded config (``config.json``), whether or not it equals the default."""
    from dataclasses import fields

    from ..experiment.config import TrainConfig
    from ..experiment.runlog import RunLogError, read_json

    run_dir = Path(args.resume)
    if args.out is not None and Path(args.out).resolve() != run_dir.resolve():
        raise UsageError(f"{PROG} train: error: --resume {run_dir} continues that directory; do not give another --out")
    if args.overwrite:
        raise UsageError(f"{PROG} train: error: --resume continues the run in {run_dir}; --overwrite would replace it "
                         "(give one of them)")
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
            raise UsageError(f"{PROG} train: error: {flag} {value} differs from the resumed run's config ({was}); a "
                             "resumed run keeps its configuration (only --steps may change)")
    return cfg.steps if "steps" in given else None


def _run_train(args: argparse.Namespace) -> int:
    from ..experiment.collapse import NumericalCollapseWarning
    from ..experiment.runlog import RunDirError, RunLogError, RunWriteError
    from ..experiment.trainer import resume, train

    cfg = _train_config(args)
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
    print(f"logs: {out / 'metrics.jsonl'}, {out / 'metrics.csv'}; summary: {out / 'summary.json'}"
          + ("" if no_plot else f"; plot: {out / 'curves.png'}"))
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
    from .. import __version__

    parser = _Parser(prog=PROG, description="Fast linear mapping number (LMN) for tracking grokking at every step.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,bench,plot,sweep,build-kernel}", parser_class=_Parser)
    sub.required = True
    p = sub.add_parser("train", help="train on add/s4/xor with LMN tracked (the main job)",
                       description="Full-batch AdamW on an algorithmic task with LMN tracked; writes metrics.jsonl, "
                                   "metrics.csv, config.json, summary.json and curves.png into the run directory.")
    _add_train_arguments(p)
    p.set_defaults(_run=_run_train, _parser=p)
    p = sub.add_parser("build-kernel", help="compile the fused CPU kernel now (else it is built on first use)",
                       description="Compile the fused C++ CPU kernel into its cache (TORCH_EXTENSIONS_DIR, else torch's "
                                   "default build root) so that the first LMN does not wait for it; with CXX set, that "
                                   "compiler. Exit 1, with the reason, where it cannot be built: LMN then runs on torch "
                                   "ops, about 10-20x slower.")
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
        _one_line_kernel_warning()
        with starting():
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
