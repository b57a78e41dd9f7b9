"""``grokfast-metrics sweep``: every ``train`` option, plus the grid, the seeds and the engine."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import warnings
from contextlib import ExitStack
from dataclasses import asdict, fields
from pathlib import Path

from ..experiment.config import TrainConfig
from ..experiment.options import add_train_arguments, given_options, train_config
from ..experiment.runlog import RunLogError, RunWriteError, read_json
from ..experiment.trainctl import SignalCatcher
from ..foundation.dirlock import SWEEP_LOCK, DirLockedError, locked
from .engines import ENGINES, is_finished, run_sweep
from .grid import Run, parse_axis, plan_runs
from .manifest import load_sweep, run_status, write_manifest
from .outcomes import OUTCOMES, sweep_rows, write_csv


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``train`` options (each run's settings; a grid axis overrides one) and the sweep's own options."""
    add_train_arguments(parser, sweep=True)
    g = parser.add_argument_group("sweep")
    g.add_argument(
        "--grid",
        nargs="+",
        default=[],
        metavar="NAME=V1,V2",
        help="grid axes: any train option and its values, e.g. init_scale=0.5,1,2 weight_decay=0,0.2 "
        "(the first two axes are the phase diagram's)",
    )
    g.add_argument("--seeds", type=int, default=1, help="seeds per grid point: 0 .. SEEDS-1 (default 1)")
    g.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help='local: a process pool on this machine (default); ray: Ray tasks (pip install "grokfast_metrics[ray]")',
    )
    g.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="runs at a time (default: the core count; each run uses one thread on the CPU)",
    )
    g.add_argument("--ray-address", default=None, help="address of an existing Ray cluster (default: start Ray locally)")
    g.add_argument(
        "--batched",
        action="store_true",
        help="train the runs that share architecture, task and steps as stacks of models in one process "
        "each (torch.func vmap; lr, weight decay, adam eps, init scale, seed, probe and schedules may "
        "vary within a stack); other runs run one by one (docs/sweeps.md)",
    )
    return parser


def _plan(args: argparse.Namespace, parser: argparse.ArgumentParser):
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1; got {args.seeds}")
    axes = [parse_axis(spec, parser) for spec in args.grid]
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{args.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    return axes, out, plan_runs(train_config(args), axes, list(range(args.seeds)), out)


def _progress(total: int, quiet: bool):
    if quiet:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="runs", unit="run", dynamic_ncols=True)


def write_outputs(out: Path, axes: list[str], runs: list[Run], results: dict[str, dict], window: int) -> tuple[list[dict], dict]:
    """``sweep.csv``, ``phase.png``, ``lmn_predicts.png`` and ``sweep.json`` in ``out``; returns the rows and the
    predictor statistics."""
    from .figures import plot_lmn_predicts, plot_phase

    rows = sweep_rows(runs, results)
    write_csv(rows, out / "sweep.csv")
    plot_phase(rows, axes, out / "phase.png")
    stats = plot_lmn_predicts(rows, window, out / "lmn_predicts.png")
    write_manifest(out, axes, runs, window, stats)
    return rows, stats


def replot(out: str | Path) -> tuple[list[dict], dict]:
    """(Re)write the outputs of the sweep in ``out`` from the directory alone (``grokfast-metrics plot OUT``): the runs
    from ``sweep.json``, each run's status from its directory (finished, failed, interrupted, not run).

    Raises:
        FileNotFoundError: no ``sweep.json`` in ``out``.
        RunLogError: a damaged ``sweep.json`` or run file.
    """
    out = Path(out)
    axes, runs, window = load_sweep(out)
    return write_outputs(out, axes, runs, {r.name: run_status(r.run_dir) for r in runs}, window)


#: train options that mean nothing to a sweep: each run's seed comes from --seeds, a sweep resumes by running again
_NOT_SWEEP_OPTIONS = {
    "resume": "a sweep resumes by running the same command again (finished runs are skipped)",
    "seed": "each run's seed comes from --seeds (0 .. SEEDS-1)",
}


def _inapplicable(args: argparse.Namespace) -> str | None:
    """The first option given that a sweep cannot honour, as an error message (``None``: none)."""
    given = given_options(args)
    for name, why in _NOT_SWEEP_OPTIONS.items():
        if name in given or (name == "resume" and getattr(args, "resume", None) is not None):
            return f"--{name} does not apply to a sweep: {why}"
    if args.ray_address is not None and args.engine != "ray":
        return "--ray-address needs --engine ray"
    return None


def recorded_elsewise(runs: list[Run]) -> list[tuple[Run, str]]:
    """The finished runs whose directory holds a run trained with other options than the sweep plans, each with the
    first difference in words (``steps 300 (this sweep: 500)``)."""
    defaults = asdict(TrainConfig())
    out = []
    for run in runs:
        if not is_finished(run.run_dir):
            continue
        try:
            stored = read_json(Path(run.run_dir) / "config.json")["config"]
        except (OSError, RunLogError, KeyError, TypeError) as e:
            out.append((run, f"its config.json cannot be read ({e})"))
            continue
        planned = asdict(run.config.resolved())
        for f in fields(TrainConfig):
            was = stored.get(f.name, defaults[f.name])
            if str(planned[f.name]) != str(was):
                out.append((run, f"{f.name} {was} (this sweep: {planned[f.name]})"))
                break
    return out


class _Stop(SignalCatcher):
    """SIGINT and SIGTERM in the sweep's process: the first, while ``armed`` (the runs are going), raises
    ``KeyboardInterrupt`` (the sweep stops its runs and writes its outputs); any other is only recorded, so it cannot
    cut the outputs short. Main thread only."""

    def __init__(self):
        super().__init__()
        self.armed = True

    def _handle(self, signum, frame):
        self.received.append(signal.Signals(signum).name)
        if len(self.received) == 1 and self.armed:
            raise KeyboardInterrupt(self.received[0])
        print(f"{self.received[-1]} received: the sweep is stopping its runs and writing its outputs", file=sys.stderr, flush=True)


def _truthful(run: Run, result: dict | None) -> dict:
    """A run's status as its directory shows it (done, interrupted, not run), unless this sweep skipped it or saw it
    fail: what a worker reported can be overtaken (a signal after it ended, a worker killed after the run finished)."""
    if result is not None and result.get("status") in ("skipped", "failed"):
        return result
    return run_status(run.run_dir)


def run(args: argparse.Namespace) -> int:
    """Run the sweep; write its outputs (also after Ctrl-C / SIGTERM). Exit 0 all done, 1 some runs failed, 2 bad
    options (or another sweep writing to ``--out``, or finished runs there trained with other options, without
    ``--overwrite``), 130 / 143 interrupted by SIGINT / SIGTERM."""
    parser = getattr(args, "_parser", None) or add_arguments(argparse.ArgumentParser())
    problem = _inapplicable(args)
    try:
        if problem is not None:
            raise ValueError(problem)
        axes, out, runs = _plan(args, parser)
    except ValueError as e:
        print(f"grokfast-metrics sweep: error: {e}", file=sys.stderr)
        return 2
    with ExitStack() as held:
        try:
            held.enter_context(locked(out, SWEEP_LOCK, "sweep"))
        except DirLockedError as e:
            print(f"grokfast-metrics sweep: error: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            print(f"grokfast-metrics sweep: error: cannot write to {out}: {e.strerror or e}", file=sys.stderr)
            return 2
        return _run_locked(args, axes, out, runs)


def _run_locked(args: argparse.Namespace, axes: list, out: Path, runs: list[Run]) -> int:
    differ = recorded_elsewise(runs)
    if differ and not args.overwrite:
        run, what = differ[0]
        print(
            f"grokfast-metrics sweep: error: {len(differ)} finished run(s) in {out} were trained with other options "
            f"({run.name}: {what}); pass --overwrite to re-run them with this sweep's options, or choose another --out",
            file=sys.stderr,
        )
        return 2
    window = max(1, (runs[0].config.steps if runs else 10) // 10)  # the runs' steps (per model when not given)
    try:
        write_manifest(out, [name for name, _ in axes], runs, window)
    except OSError as e:
        print(f"grokfast-metrics sweep: error: {RunWriteError.of(out, e)}", file=sys.stderr)
        return 2
    bar = _progress(len(runs), args.no_progress)
    interrupted = False
    results: dict[str, dict] = {}
    with _Stop() as stop:
        try:
            run_sweep(
                runs,
                args.engine,
                args.workers,
                plot=not args.no_plot,
                ray_address=args.ray_address,
                on_done=lambda run, res: bar.update(1) if bar is not None else None,
                batched=args.batched,
                notes=lambda m: print(m, file=sys.stderr),
                rerun={run.name for run, _ in differ},
                results=results,
            )
        except KeyboardInterrupt:
            interrupted = True
        except (RuntimeError, ValueError) as e:
            print(f"grokfast-metrics sweep: error: {e}", file=sys.stderr)
            return 2
        finally:
            stop.armed = False
            if bar is not None:
                bar.close()
        interrupted = interrupted or bool(stop.received)
        final = {run.name: _truthful(run, results.get(run.name)) for run in runs}
        try:
            rows, stats = write_outputs(out, [name for name, _ in axes], runs, final, window)
        except OSError as e:  # disk full: the outputs are written atomically, so the previous ones stay whole
            print(f"grokfast-metrics sweep: error: {RunWriteError.of(out, e)}", file=sys.stderr)
            return 1
        _report(rows, out, stats)
    if interrupted:
        return 143 if stop.received[:1] == ["SIGTERM"] else 130
    return 1 if any(r["status"] == "failed" for r in rows) else 0


def plot_sweep(out: str | Path) -> int:
    """``grokfast-metrics plot SWEEP_DIR``: :func:`replot` and the sweep's report; 0, or 2 on a damaged directory."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows, stats = replot(out)
    except (FileNotFoundError, RunLogError, OSError) as e:
        why = e if not isinstance(e, OSError) or isinstance(e, FileNotFoundError) else RunWriteError.of(out, e)
        print(f"grokfast-metrics plot: error: {why}", file=sys.stderr)
        return 2
    for w in caught:  # one line each: a run left out for a damaged file
        print(f"grokfast-metrics plot: warning: {w.message}", file=sys.stderr)
    _report(rows, Path(out), stats)
    return 0


def _report(rows: list[dict], out: Path, stats: dict) -> None:
    status = {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "failed", "interrupted", "damaged", "not run")}
    outcome = {o: sum(r.get("outcome") == o for r in rows) for o in OUTCOMES}
    print(f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in status.items() if n))
    print("outcomes: " + ", ".join(f"{n} {o}" for o, n in outcome.items() if n))
    for r in rows:
        if r["status"] == "failed":
            print(f"  failed: {r['run']}: {r['error']} (see {Path(r['run_dir']) / 'error.txt'})")
    print(f"LMN drop vs generalization delay: n={stats['n']}, Pearson {stats['pearson']}, Spearman {stats['spearman']}")
    print(f"wrote {out / 'sweep.csv'}, {out / 'phase.png'}, {out / 'lmn_predicts.png'}")
