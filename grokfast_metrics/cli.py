"""Command line: ``grokfast-metrics {train,bench,plot} ...`` (also ``python -m grokfast_metrics``).

``train`` is implemented here (see :mod:`grokfast_metrics.train`). ``bench`` and ``plot`` live in
``grokfast_metrics.bench`` and ``grokfast_metrics.figures``; each exposes ``add_arguments(parser)``
and ``run(args) -> int`` and is imported only when its subcommand is used.

Exit codes: 0 success, 2 bad arguments or unavailable subcommand, 130 interrupted (logs kept).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

PROG = "grokfast-metrics"
#: lazily loaded subcommands: name -> (module, help)
LAZY = {
    "bench": ("grokfast_metrics.bench", "benchmark the LMN backends"),
    "plot": ("grokfast_metrics.figures", "plot figures from run directories"),
}


class UsageError(Exception):
    """Bad command-line arguments (reported as one line, exit 2)."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message}")


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    from .grokfast import FILTERS
    from .model import EMBEDDINGS, LAYERS
    from .tasks import TASKS
    from .train import SNAPSHOT_DEFAULT

    g = p.add_argument_group("task and model")
    g.add_argument("--task", default="add", choices=TASKS, help="add: (a+b) mod 31; s4: composition in S4; xor: 5-bit XOR (default add)")
    g.add_argument("--train-fraction", type=float, default=0.8, help="fraction of all inputs used for training, in (0, 1) (default 0.8)")
    g.add_argument("--seed", type=int, default=0, help="seed of the split and the initialization (default 0)")
    g.add_argument("--embed-dim", type=int, default=32, help="embedding width per operand (default 32)")
    g.add_argument("--hidden", type=int, default=100, help="hidden width (default 100)")
    g.add_argument("--embedding", default="shared", choices=EMBEDDINGS,
                   help="one table for both operands or one per operand (default shared)")
    g.add_argument("--init-scale", type=float, default=1.0, help="Omnigrok alpha: multiply initial parameters by it (default 1)")

    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=20_000, help="full-batch AdamW steps (default 20000)")
    g.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    g.add_argument("--weight-decay", type=float, default=0.2, help="AdamW weight decay (default 0.2)")
    g.add_argument("--grokfast", default="none", choices=FILTERS, help="Grokfast gradient filter (default none)")
    g.add_argument("--ema-alpha", type=float, default=0.98, help="grokfast ema momentum (default 0.98)")
    g.add_argument("--ema-lamb", type=float, default=2.0, help="grokfast ema amplification (default 2)")
    g.add_argument("--ma-window", type=int, default=100, help="grokfast ma window (default 100)")
    g.add_argument("--ma-lamb", type=float, default=5.0, help="grokfast ma amplification (default 5)")

    g = p.add_argument_group("LMN tracking")
    g.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N (default auto)")
    g.add_argument("--lmn-every", type=int, default=None, help="LMN every k steps, 0 = off (default: 1 on CUDA, 100 on CPU)")
    g.add_argument("--no-lmn-early", dest="lmn_early", action="store_false",
                   help="skip the extra log-spaced LMN steps (1, 2, 3, 5, ...) below --lmn-every")
    g.add_argument("--probe", default=None,
                   help="LMN samples: all, train, test or a seeded subset size n (default: all on CUDA, 256 on CPU)")
    g.add_argument("--probe-seed", type=int, default=0, help="seed of the probe subset (default 0)")
    g.add_argument("--lmn-layer", dest="lmn_layers", action="append", choices=(*LAYERS, "all"), default=None,
                   help="layer to track (repeat for several; first is the 'lmn' column; 'all' = every layer, the "
                        "default one first) (default hidden1_post)")
    g.add_argument("--n-lambda", type=int, default=21, help="interpolation points per pair (default 21)")
    g.add_argument("--lmn-backend", default="auto", choices=("auto", "triton", "torch", "reference"), help="LMN backend (default auto)")

    g = p.add_argument_group("other complexity measures")
    g.add_argument("--complexity", default="log",
                   help="compression-based complexity schedule: off, log (0 and powers of two) or every k steps (default log)")
    g.add_argument("--complexity-eps", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1],
                   help="loss tolerances of the compression complexity (default 1e-3 1e-2 1e-1)")
    g.add_argument("--spectral-entropy-weight", type=float, default=0.0,
                   help="add this times the spectral entropy of every Linear weight to the loss (default 0 = off)")
    g.add_argument("--save-connectivity", default=",".join(SNAPSHOT_DEFAULT),
                   help="steps at which to save L for Figure 4: comma-separated integers and/or memorization, "
                        "generalization, final; '' = none (default: %(default)s)")

    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="run directory (default runs/<task>-s<seed>-<time>)")
    g.add_argument("--log-every", type=int, default=None, help="log a row every k steps (default: 1 on CUDA, 10 on CPU)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plot", action="store_true", help="do not write curves.png")


def _check_out_dir(out: Path) -> None:
    """Create ``out`` and check that it is writable, or raise UsageError."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"{PROG} train: error: cannot write to output directory {str(out)!r}: {e.strerror or e}") from None


def _layers(chosen: list[str]) -> list[str]:
    """Expand ``all`` to every layer (default layer first), keeping the order and dropping repeats."""
    from .model import DEFAULT_LAYER, LAYERS

    out: list[str] = []
    for layer in chosen:
        for name in ([DEFAULT_LAYER, *LAYERS] if layer == "all" else [layer]):
            if name not in out:
                out.append(name)
    return out


def _run_train(args: argparse.Namespace) -> int:
    from .model import DEFAULT_LAYER
    from .plots import format_summary
    from .train import TrainConfig, train

    cfg = TrainConfig(
        task=args.task, steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, train_fraction=args.train_fraction,
        seed=args.seed, init_scale=args.init_scale, embed_dim=args.embed_dim, hidden=args.hidden, embedding=args.embedding,
        grokfast=args.grokfast, ema_alpha=args.ema_alpha, ema_lamb=args.ema_lamb, ma_window=args.ma_window, ma_lamb=args.ma_lamb,
        device=args.device, lmn_every=args.lmn_every, lmn_early=args.lmn_early, probe=args.probe, probe_seed=args.probe_seed,
        lmn_layers=_layers(args.lmn_layers or [DEFAULT_LAYER]), n_lambda=args.n_lambda, lmn_backend=args.lmn_backend,
        log_every=args.log_every, threads=args.threads, complexity=args.complexity, complexity_eps=args.complexity_eps,
        spectral_entropy_weight=args.spectral_entropy_weight,
        save_connectivity=[s.strip() for s in args.save_connectivity.split(",") if s.strip()],
    )
    for name in ("embed_dim", "hidden", "ma_window"):
        if getattr(args, name) < 1:
            raise UsageError(f"{PROG} train: error: --{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    try:
        cfg.validate()
        from .tasks import make_task
        from .train import parse_probe, probe_indices

        if cfg.probe is not None:
            probe_indices(make_task(cfg.task, cfg.train_fraction, cfg.seed), parse_probe(cfg.probe), cfg.probe_seed)
    except ValueError as e:
        raise UsageError(f"{PROG} train: error: {e}") from None
    out = Path(args.out) if args.out else Path("runs") / f"{args.task}-s{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    _check_out_dir(out)
    res = train(cfg, out, progress=not args.no_progress, plot=not args.no_plot)
    print(format_summary(res.summary))
    print(f"logs: {out / 'metrics.jsonl'}, {out / 'metrics.csv'}; summary: {out / 'summary.json'}"
          + ("" if args.no_plot else f"; plot: {out / 'curves.png'}"))
    return 130 if res.interrupted else 0


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
    from . import __version__

    parser = _Parser(prog=PROG, description="Fast linear mapping number (LMN) for tracking grokking at every step.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,bench,plot}", parser_class=_Parser)
    sub.required = True
    p = sub.add_parser("train", help="train on add/s4/xor with LMN tracked (the main job)",
                       description="Full-batch AdamW on an algorithmic task with LMN tracked; writes metrics.jsonl, "
                                   "metrics.csv, config.json, summary.json and curves.png into the run directory.")
    _add_train_arguments(p)
    p.set_defaults(_run=_run_train)
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
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``grokfast-metrics`` console script.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        Exit code: 0 ok, 2 bad arguments / unavailable subcommand, 130 interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv)
        args, extra = parser.parse_known_args(argv)
        reason = getattr(args, "_unavailable", None)
        if reason is not None:
            raise UsageError(f"{PROG} {args.command}: error: not available: {reason}")
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return int(args._run(args))
    except UsageError as e:
        print(str(e).splitlines()[0] if str(e) else f"{PROG}: error", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
