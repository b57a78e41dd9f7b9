"""Where the runs of a sweep execute: a local process pool or Ray tasks. Neither is a scheduler of ours."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import traceback
from collections.abc import Callable, Collection
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from ..experiment.runlog import prepare_run_dir
from .grid import Run

ENGINES = ("local", "ray")
#: where a failed run's traceback goes, in its run directory
ERROR_FILE = "error.txt"
RAY_MISSING = '--engine ray needs ray: pip install "grokfast_metrics[ray]" (or pip install ray)'
#: written into a run directory by the worker process that starts the run (its pid), removed when the task returns:
#: after a worker died, the runs that still hold it were running in it
WORKER_FILE = ".sweep-worker"

# In a worker process of the local pool (set by _worker_init): the sweep's stop event, whether a signal reached
# this process, whether a run is starting (a signal then interrupts it; once train() runs, its own handler does).
_STOP = None
_STOPPED = False
_IN_RUN = False


def _worker_init(stop) -> None:
    """Initializer of a local worker: SIGINT / SIGTERM outside a run only mark the worker stopped (no traceback, and
    it starts no further run); ``stop`` is set by the sweep when it is interrupted."""
    global _STOP
    _STOP = stop
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _note_signal)


def _note_signal(signum, frame) -> None:
    global _STOPPED
    _STOPPED = True
    if _IN_RUN:
        raise KeyboardInterrupt(signal.Signals(signum).name)


def _stopping() -> bool:
    return _STOPPED or (_STOP is not None and _STOP.is_set())


def is_finished(run_dir: Path) -> bool:
    """True when ``run_dir`` holds a run that ran to its end (``summary.json`` not interrupted, no error)."""
    summary = Path(run_dir) / "summary.json"
    if not summary.is_file() or (Path(run_dir) / ERROR_FILE).exists():
        return False
    try:
        return not json.loads(summary.read_text(encoding="utf-8")).get("interrupted", True)
    except (OSError, ValueError):
        return False


def run_one(config: dict, run_dir: str, plot: bool) -> dict:
    """Train one run into ``run_dir`` (the run files of an unfinished earlier attempt are removed first).

    Runs in a worker process or a Ray task, so it takes and returns plain data. An exception in the
    run is caught, written to ``run_dir/error.txt`` and returned as ``{"status": "failed", "error": ...}``.
    """
    from ..experiment.config import TrainConfig
    from ..experiment.trainer import train

    global _IN_RUN, _STOPPED
    path = Path(run_dir)
    prepare_run_dir(path, overwrite=True)  # an earlier unfinished attempt's run files go, nothing else
    (path / ERROR_FILE).unlink(missing_ok=True)
    _IN_RUN = True
    try:
        if _stopping():
            raise KeyboardInterrupt
        res = train(TrainConfig(**config), path, progress=False, plot=plot)
    except KeyboardInterrupt:  # a signal before train() took over (or a second one inside it): stopped
        _IN_RUN = False
        _STOPPED = True
        return {"status": "interrupted"}
    except Exception as e:
        with contextlib.suppress(OSError):  # a full disk may not take error.txt either; the result still says why
            (path / ERROR_FILE).write_text(traceback.format_exc(), encoding="utf-8")
        return {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    finally:
        _IN_RUN = False
    return _status(res)


def _status(res) -> dict:
    global _STOPPED
    if res.interrupted:  # train() took the signal: this worker starts nothing more
        _STOPPED = True
    if res.exit_code == 1:  # train.EXIT_WRITE: a run file could not be written (disk full): not a finished run
        return {"status": "failed", "error": res.stop_reason}
    return {"status": "interrupted" if res.interrupted else "done"}


def run_task(configs: list[dict], run_dirs: list[str], plot: bool) -> list[dict]:
    """One task of a sweep: a single run (:func:`run_one`) or a stack of runs trained together
    (:func:`.batched.train_stack`, ``--batched``); the result of each run, in order.

    A stack that fails as a whole records its error in every run's ``error.txt``. A worker that was signalled, or
    whose sweep is stopping, starts no run (``not run``, the directories untouched).
    """
    if _stopping():
        return [{"status": "not run"}] * len(configs)
    marks = [Path(d) / WORKER_FILE for d in run_dirs]
    for mark in marks:
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.write_text(str(os.getpid()), encoding="utf-8")
    try:
        return _run_task(configs, run_dirs, plot)
    finally:
        for mark in marks:
            mark.unlink(missing_ok=True)


def _run_task(configs: list[dict], run_dirs: list[str], plot: bool) -> list[dict]:
    global _STOPPED
    if len(configs) == 1:
        return [run_one(configs[0], run_dirs[0], plot)]
    from ..experiment.config import TrainConfig
    from .batched import train_stack

    paths = [Path(d) for d in run_dirs]
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)
        (path / ERROR_FILE).unlink(missing_ok=True)
    try:
        results = train_stack([TrainConfig(**c) for c in configs], paths, plot=plot, overwrite=True)
    except KeyboardInterrupt:
        _STOPPED = True
        return [{"status": "interrupted"}] * len(paths)
    except Exception as e:
        results = [e] * len(paths)
    out = []
    for path, res in zip(paths, results):
        if isinstance(res, Exception):
            text = "".join(traceback.format_exception(res))
            (path / ERROR_FILE).write_text(text, encoding="utf-8")
            out.append(_failed(res))
        else:
            out.append(_status(res))
    return out


def _failed(e: BaseException) -> dict:
    return {"status": "failed", "error": f"{type(e).__name__}: {e}"}


def _args(task: list[Run], plot: bool, resolve: bool = False) -> tuple[list[dict], list[str], bool]:
    """:func:`run_task`'s arguments for ``task`` (plain data)."""
    dirs = [str(Path(r.run_dir).resolve() if resolve else r.run_dir) for r in task]
    return [r.config_dict() for r in task], dirs, plot


def _report(task: list[Run], get: Callable[[], list[dict]], on_done: Callable[[Run, dict], None]) -> None:
    """``on_done`` for each run of a finished task (every run failed if the task itself raised)."""
    try:
        results = get()
    except KeyboardInterrupt:  # raised in the worker by a second signal: the run was stopped (its directory tells)
        results = [{"status": "interrupted"}] * len(task)
    except Exception as e:  # the task itself failed (a Ray worker that died, a result that did not come back)
        results = []
        for run in task:
            if is_finished(run.run_dir):  # it finished before: its directory says so
                results.append({"status": "done"})
                continue
            Path(run.run_dir).mkdir(parents=True, exist_ok=True)
            (Path(run.run_dir) / ERROR_FILE).write_text("".join(traceback.format_exception(e)), encoding="utf-8")
            results.append(_failed(e))
    for run, result in zip(task, results):
        on_done(run, result)


def run_local(tasks: list[list[Run]], workers: int, plot: bool, on_done: Callable[[Run, dict], None]) -> None:
    """Each task (a run, or a stack of runs) in a process of a pool of ``workers`` (spawned: a clean torch per process).

    A worker that dies (``kill -9``, the out-of-memory killer) fails the run it was running (``error.txt`` names the
    cause); the runs that finished keep their results and the runs not started yet go on in a new pool. Ctrl-C /
    SIGTERM (``KeyboardInterrupt`` here): the workers are told to stop (their runs end as interrupted, with their
    summaries), no queued run starts, the results that came in are reported, then ``KeyboardInterrupt`` is re-raised.
    """
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    remaining = list(tasks)
    while remaining:
        for task in remaining:
            for run in task:
                (Path(run.run_dir) / WORKER_FILE).unlink(missing_ok=True)
        pool = ProcessPoolExecutor(max_workers=min(workers, len(remaining)), mp_context=ctx, initializer=_worker_init, initargs=(stop,))
        futures = {pool.submit(run_task, *_args(t, plot)): t for t in remaining}
        procs = dict(getattr(pool, "_processes", None) or {})
        broken = False
        try:
            for fut in as_completed(futures):
                procs.update(getattr(pool, "_processes", None) or {})
                if isinstance(fut.exception(), BrokenProcessPool):
                    broken = True
                    break
                _report(futures.pop(fut), fut.result, on_done)
        except KeyboardInterrupt:
            stop.set()
            for proc in procs.values():  # a Ctrl-C at the terminal reached them already; a signal to this process did not
                if proc.is_alive():
                    try:
                        os.kill(proc.pid, signal.SIGINT)
                    except OSError:
                        pass
            pool.shutdown(wait=True, cancel_futures=True)
            for fut, task in futures.items():
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    _report(task, fut.result, on_done)
            raise
        pool.shutdown(wait=True, cancel_futures=True)
        if not broken:
            return
        remaining = _after_broken_pool(futures, procs, on_done)


def _after_broken_pool(futures: dict, procs: dict, on_done: Callable[[Run, dict], None]) -> list[list[Run]]:
    """A worker died and broke the pool: report what finished (read back from the run directories where the result
    was lost), fail the tasks that were running (``error.txt`` names the cause); the tasks not started are returned."""
    retry, settled = [], False
    for fut, task in futures.items():
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            _report(task, fut.result, on_done)
            settled = True
            continue
        marks = [Path(r.run_dir) / WORKER_FILE for r in task]
        if not any(m.is_file() for m in marks) and not any(is_finished(r.run_dir) for r in task):
            retry.append(task)
            continue
        settled = True
        cause = _death_cause(next((m for m in marks if m.is_file()), None), procs)
        for run, mark in zip(task, marks):
            mark.unlink(missing_ok=True)
            if is_finished(run.run_dir):
                on_done(run, {"status": "done"})
                continue
            (Path(run.run_dir) / ERROR_FILE).write_text(cause + "\n", encoding="utf-8")
            on_done(run, {"status": "failed", "error": cause})
    if not settled:  # the pool broke before any run started: it would again
        cause = "the process pool broke before any run started (its worker processes could not start)"
        for task in retry:
            for run in task:
                Path(run.run_dir).mkdir(parents=True, exist_ok=True)
                (Path(run.run_dir) / ERROR_FILE).write_text(cause + "\n", encoding="utf-8")
                on_done(run, {"status": "failed", "error": cause})
        return []
    return retry


def _death_cause(mark: Path | None, procs: dict) -> str:
    """Why the worker that held ``mark`` (its pid) ended, from its exit code."""
    try:
        pid = int(mark.read_text(encoding="utf-8")) if mark is not None else None
    except (OSError, ValueError):
        pid = None
    code = getattr(procs.get(pid), "exitcode", None)
    what = f"the worker process (pid {pid})" if pid is not None else "its worker process"
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (kill -9, or the out-of-memory killer)" if name == "SIGKILL" else ""
        return f"WorkerDied: {what} running this run was killed by {name}{hint}"
    if code is not None:
        return f"WorkerDied: {what} running this run exited with code {code}"
    return f"WorkerDied: {what} running this run ended abruptly"


#: seconds to wait for a Ray cluster's address to accept a connection
RAY_CONNECT_TIMEOUT_S = 10.0


def check_ray_address(address: str, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Refuse an address no Ray cluster listens on, in seconds (``ray.init`` retries one for minutes).

    ``host:port`` and ``ray://host:port`` are probed with a TCP connection; ``auto`` / ``local`` are left to Ray.

    Raises:
        RuntimeError: nothing accepts a connection at the address (the message names it).
    """
    import socket

    target = address[len("ray://") :] if address.startswith("ray://") else address
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local" or a form Ray resolves itself
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise RuntimeError(
            f"cannot reach a Ray cluster at --ray-address {address}: {e.strerror or e} (is `ray start --head` running there?)"
        ) from None


def run_ray(tasks: list[list[Run]], workers: int, plot: bool, on_done: Callable[[Run, dict], None], address: str | None = None) -> None:
    """Each task (a run, or a stack of runs) as a Ray task (one CPU each); a local Ray with ``workers`` CPUs unless
    ``address`` names a cluster.

    On a multi-node cluster the sweep directory must be on storage every node sees.

    Raises:
        RuntimeError: ray is not installed (the message says how to install it), or nothing answers at ``address``.
    """
    try:
        import ray
    except ImportError:
        raise RuntimeError(RAY_MISSING) from None
    started = not ray.is_initialized()
    if started and address:
        check_ray_address(address)
    if started:
        ray.init(
            address=address, num_cpus=None if address else workers, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
    remote = ray.remote(num_cpus=1)(run_task)
    refs = {remote.remote(*_args(t, plot, resolve=True)): t for t in tasks}
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                _report(refs[ref], lambda ref=ref: ray.get(ref), on_done)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)
        raise
    finally:
        if started:
            ray.shutdown()


def run_sweep(
    runs: list[Run],
    engine: str = "local",
    workers: int = 1,
    plot: bool = True,
    ray_address: str | None = None,
    on_done: Callable[[Run, dict], None] | None = None,
    batched: bool = False,
    notes: Callable[[str], None] | None = None,
    rerun: Collection[str] = (),
    results: dict[str, dict] | None = None,
) -> dict[str, dict]:
    """Run every run that is not finished yet; returns ``{run name: {"status", ["error"]}}`` for all runs.

    Finished runs get ``{"status": "skipped"}`` and are not touched, except those named in ``rerun`` (trained
    again). ``on_done(run, result)`` is called as each run ends (progress bars). ``results``: the dict to fill (the
    caller keeps what came in when ``KeyboardInterrupt`` propagates). ``batched``: the runs that can share a stack are trained as stacks of
    models, one stack per task (:func:`.batched.plan_stacks`; what it decided goes to ``notes``).

    Raises:
        ValueError: unknown engine or ``workers < 1``.
        RuntimeError: ``engine="ray"`` without ray installed.
        KeyboardInterrupt: Ctrl-C; every run finished before it stays intact.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    results = {} if results is None else results
    results.update({r.name: {"status": "skipped"} for r in runs if r.name not in rerun and is_finished(r.run_dir)})
    todo = [r for r in runs if r.name not in results]

    def done(run: Run, result: dict) -> None:
        results[run.name] = result
        if on_done is not None:
            on_done(run, result)

    if not todo:
        return results
    tasks = [[r] for r in todo]
    if batched:
        from .batched import plan_stacks

        tasks, messages = plan_stacks(todo, workers)
        for message in messages:
            (notes or print)(message)
    if engine == "local":
        run_local(tasks, min(workers, len(tasks)), plot, done)
    else:
        run_ray(tasks, workers, plot, done, ray_address)
    return results
