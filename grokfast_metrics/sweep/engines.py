"""Where the runs of a sweep execute: a local process pool or Ray tasks. Neither is a scheduler of ours."""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from ..runlog import prepare_run_dir
from .grid import Run

ENGINES = ("local", "ray")
#: where a failed run's traceback goes, in its run directory
ERROR_FILE = "error.txt"
RAY_MISSING = "--engine ray needs ray: pip install \"grokfast_metrics[ray]\" (or pip install ray)"


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
    from ..config import TrainConfig
    from ..train import train

    path = Path(run_dir)
    prepare_run_dir(path, overwrite=True)  # an earlier unfinished attempt's run files go, nothing else
    (path / ERROR_FILE).unlink(missing_ok=True)
    try:
        res = train(TrainConfig(**config), path, progress=False, plot=plot)
    except Exception as e:
        with contextlib.suppress(OSError):  # a full disk may not take error.txt either; the result still says why
            (path / ERROR_FILE).write_text(traceback.format_exc(), encoding="utf-8")
        return {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    return _status(res)


def _status(res) -> dict:
    if res.exit_code == 1:  # train.EXIT_WRITE: a run file could not be written (disk full): not a finished run
        return {"status": "failed", "error": res.stop_reason}
    return {"status": "interrupted" if res.interrupted else "done"}


def run_task(configs: list[dict], run_dirs: list[str], plot: bool) -> list[dict]:
    """One task of a sweep: a single run (:func:`run_one`) or a stack of runs trained together
    (:func:`.batched.train_stack`, ``--batched``); the result of each run, in order.

    A stack that fails as a whole records its error in every run's ``error.txt``.
    """
    if len(configs) == 1:
        return [run_one(configs[0], run_dirs[0], plot)]
    from ..config import TrainConfig
    from .batched import train_stack

    paths = [Path(d) for d in run_dirs]
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)
        (path / ERROR_FILE).unlink(missing_ok=True)
    try:
        results = train_stack([TrainConfig(**c) for c in configs], paths, plot=plot, overwrite=True)
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
    except Exception as e:
        results = [_failed(e)] * len(task)
    for run, result in zip(task, results):
        on_done(run, result)


def run_local(tasks: list[list[Run]], workers: int, plot: bool, on_done: Callable[[Run, dict], None]) -> None:
    """Each task (a run, or a stack of runs) in a process of a pool of ``workers`` (spawned: a clean torch per process)."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(run_task, *_args(t, plot)): t for t in tasks}
        try:
            for fut in as_completed(futures):
                _report(futures[fut], fut.result, on_done)
        except KeyboardInterrupt:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


#: seconds to wait for a Ray cluster's address to accept a connection
RAY_CONNECT_TIMEOUT_S = 10.0


def check_ray_address(address: str, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Refuse an address no Ray cluster listens on, in seconds (``ray.init`` retries one for minutes).

    ``host:port`` and ``ray://host:port`` are probed with a TCP connection; ``auto`` / ``local`` are left to Ray.

    Raises:
        RuntimeError: nothing accepts a connection at the address (the message names it).
    """
    import socket

    target = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local" or a form Ray resolves itself
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise RuntimeError(f"cannot reach a Ray cluster at --ray-address {address}: {e.strerror or e} (is `ray start "
                           "--head` running there?)") from None


def run_ray(tasks: list[list[Run]], workers: int, plot: bool, on_done: Callable[[Run, dict], None],
            address: str | None = None) -> None:
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
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
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


def run_sweep(runs: list[Run], engine: str = "local", workers: int = 1, plot: bool = True,
              ray_address: str | None = None, on_done: Callable[[Run, dict], None] | None = None,
              batched: bool = False, notes: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Run every run that is not finished yet; returns ``{run name: {"status", ["error"]}}`` for all runs.

    Finished runs get ``{"status": "skipped"}`` and are not touched. ``on_done(run, result)`` is called as
    each run ends (progress bars). ``batched``: the runs that can share a stack are trained as stacks of
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
    results = {r.name: {"status": "skipped"} for r in runs if is_finished(r.run_dir)}
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
