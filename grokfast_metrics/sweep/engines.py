"""Where the runs of a sweep execute: a local process pool or Ray tasks. Neither is a scheduler of ours."""
from __future__ import annotations

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
        (path / ERROR_FILE).write_text(traceback.format_exc(), encoding="utf-8")
        return {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    return {"status": "interrupted" if res.interrupted else "done"}


def _failed(e: BaseException) -> dict:
    return {"status": "failed", "error": f"{type(e).__name__}: {e}"}


def run_local(runs: list[Run], workers: int, plot: bool, on_done: Callable[[Run, dict], None]) -> None:
    """Each run in a process of a pool of ``workers`` (spawned: a clean torch per process)."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(run_one, r.config_dict(), str(r.run_dir), plot): r for r in runs}
        try:
            for fut in as_completed(futures):
                try:
                    result = fut.result()
                except Exception as e:
                    result = _failed(e)
                on_done(futures[fut], result)
        except KeyboardInterrupt:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def run_ray(runs: list[Run], workers: int, plot: bool, on_done: Callable[[Run, dict], None],
            address: str | None = None) -> None:
    """Each run as a Ray task (one CPU each); a local Ray with ``workers`` CPUs unless ``address`` names a cluster.

    On a multi-node cluster the sweep directory must be on storage every node sees.

    Raises:
        RuntimeError: ray is not installed (the message says how to install it).
    """
    try:
        import ray
    except ImportError:
        raise RuntimeError(RAY_MISSING) from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    task = ray.remote(num_cpus=1)(run_one)
    refs = {task.remote(r.config_dict(), str(Path(r.run_dir).resolve()), plot): r for r in runs}
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    result = ray.get(ref)
                except Exception as e:
                    result = _failed(e)
                on_done(refs[ref], result)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)
        raise
    finally:
        if started:
            ray.shutdown()


def run_sweep(runs: list[Run], engine: str = "local", workers: int = 1, plot: bool = True,
              ray_address: str | None = None, on_done: Callable[[Run, dict], None] | None = None) -> dict[str, dict]:
    """Run every run that is not finished yet; returns ``{run name: {"status", ["error"]}}`` for all runs.

    Finished runs get ``{"status": "skipped"}`` and are not touched. ``on_done(run, result)`` is called as
    each run ends (progress bars).

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

    if todo:
        if engine == "local":
            run_local(todo, min(workers, len(todo)), plot, done)
        else:
            run_ray(todo, workers, plot, done, ray_address)
    return results
