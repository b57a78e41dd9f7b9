"""The eigen step off the training thread: L in, LMN results out, in submission order.

On a GPU the eigen-decomposition of an ``N x N`` connectivity matrix is latency-bound (``N`` sequential
steps of the tridiagonalisation) and can cost more than the fused kernel that computed ``L``. Dense
tracking should not stall training on it: :class:`AsyncEigen` takes ``L`` where it was computed, copies
it to (pinned) host memory without a device sync, and computes the eigenvalues and the entropy with
:func:`grokfast_metrics.lmn_from_connectivity` on host worker threads (LAPACK releases the GIL), while
the caller goes on. Results come back in the order they were submitted; nothing waits unless asked.

On the CPU it is the same pipeline (the copy is skipped), which is how it is tested.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Hashable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..compute.core import LMNResult, lmn_from_connectivity


def _host_copy(L: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """``L`` in host memory: a non-blocking copy into pinned memory and the event that marks it done (CUDA),
    or ``L`` itself (already on the host; the caller hands it over)."""
    if L.device.type != "cuda":
        return L.detach(), None
    host = torch.empty(L.shape, dtype=L.dtype, pin_memory=True)
    host.copy_(L.detach(), non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(L.device))
    return host, event


class EigenStepError(RuntimeError):
    """The eigen step of a submitted matrix failed (e.g. NaN entries); ``key`` says which, ``__cause__`` why."""

    def __init__(self, message: str, key: Hashable):
        super().__init__(message)
        self.key = key


def _eigen_job(copies: dict, events: list) -> dict[str, LMNResult]:
    for event in events:
        event.synchronize()  # waits for the copies only, on this worker thread
    return {name: lmn_from_connectivity(host) for name, host in copies.items()}


class AsyncEigen:
    """Eigen-decomposition and entropy of submitted connectivity matrices on host worker threads.

    Args:
        workers: host threads computing eigenvalues (default 1: results are produced in order anyway, and
            LAPACK itself may use several cores).

    Example::

        eig = AsyncEigen()
        eig.submit(step, gm.connectivity(h, tail))      # returns at once
        for step, res in eig.ready():                   # finished ones, in step order, no waiting
            log(step, res.lmn)
        eig.wait()                                      # everything, in order (e.g. at the end)
    """

    def __init__(self, workers: int = 1):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1; got {workers!r}")
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grokfast-eigen")
        self._pending: deque[tuple[Hashable, bool, Future]] = deque()
        self._lock = threading.Lock()

    def submit(self, key: Hashable, L: torch.Tensor | Mapping[str, torch.Tensor]) -> None:
        """Queue ``L`` (e.g. keyed by its training step); returns without waiting for the device.

        ``L`` is one matrix (its result is an :class:`LMNResult`) or ``{name: matrix}`` (its result is
        ``{name: LMNResult}``, one job). It must not be modified afterwards (on the host it is used as it
        is, not copied).
        """
        mats = dict(L) if isinstance(L, Mapping) else {None: L}
        for m in mats.values():
            if not isinstance(m, torch.Tensor) or m.dim() != 2:
                raise ValueError(f"L must be a 2-D tensor or a mapping of them; got {type(m).__name__}")
        copies, events = {}, []
        for name, m in mats.items():
            copies[name], event = _host_copy(m)
            events += [event] if event is not None else []
        with self._lock:
            self._pending.append((key, isinstance(L, Mapping), self._pool.submit(_eigen_job, copies, events)))

    def pending(self) -> int:
        """How many submitted matrices have not been collected yet."""
        return len(self._pending)

    def ready(self) -> list[tuple[Hashable, LMNResult]]:
        """The finished results at the head of the queue, in submission order, without waiting.

        Raises:
            EigenStepError: a failed computation (its ``key``; the cause, e.g. ``ValueError`` for a NaN
                matrix, chained) at the head of the queue; results before it are returned first, by this call.
        """
        return self._collect(block=False)

    def wait(self) -> list[tuple[Hashable, LMNResult]]:
        """Every pending result, in submission order (waits for them). Errors as in :meth:`ready`."""
        return self._collect(block=True)

    def _collect(self, block: bool) -> list[tuple[Hashable, LMNResult]]:
        out: list[tuple[Hashable, LMNResult]] = []
        with self._lock:
            while self._pending and (block or self._pending[0][2].done()):
                key, many, fut = self._pending[0]
                error = fut.exception()  # waits for this one
                if error is not None and out:
                    break  # hand over what came before it; the next call raises
                self._pending.popleft()
                if error is not None:
                    raise EigenStepError(f"the eigen step of {key!r} failed: {type(error).__name__}: {error}", key) from error
                result = fut.result()
                out.append((key, result if many else result[None]))
        return out

    def close(self) -> None:
        """Stop the workers (pending computations finish first; collect them with :meth:`wait` before)."""
        self._pool.shutdown(wait=True)

    def discard(self) -> None:
        """Drop every pending result and stop the workers without waiting (a running computation ends unseen)."""
        with self._lock:
            self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> AsyncEigen:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
