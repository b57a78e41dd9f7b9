"""One writer per directory: ``train``/``resume`` lock their run directory, ``sweep`` its sweep directory.

The lock is ``filelock``'s (an OS advisory lock, ``flock`` on POSIX, released by the OS when the process dies,
so a killed run never leaves a stale lock); the lock file itself stays in the directory, empty.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

__all__ = ["RUN_LOCK", "SWEEP_LOCK", "DirLockedError", "locked"]

#: lock file of a run directory (held by ``train`` and ``resume``) and of a sweep directory (held by ``sweep``)
RUN_LOCK, SWEEP_LOCK = ".run.lock", ".sweep.lock"


class DirLockedError(RuntimeError):
    """Another process holds the directory's lock."""


@contextmanager
def locked(directory: str | Path, name: str, what: str, error: type[Exception] = DirLockedError) -> Iterator[None]:
    """Hold ``directory/name`` for the block; another holder makes it raise :class:`DirLockedError` at once.

    ``what`` names the writer in the message (``"run"``, ``"sweep"``); ``error`` is the exception raised (default
    :class:`DirLockedError`). The directory is created if missing.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(d / name))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise error(f"another {what} is writing to {d} (it holds {d / name}); wait for it to end or choose another directory") from None
    try:
        yield
    finally:
        lock.release()
