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
from collections.abc import Hashable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .core import LMNResult, lmn_from_connectivity


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


def _eigen_job(host: torch.Tensor, event: torch.cuda.Event | None) -> LMNResult:
    if event is not None:
        event.synchronize()  # waits for the copy only, on this worker thread
    return lmn_from_connectivity(host)


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
        self._pending: deque[tuple[Hashable, Future]] = deque()
        self._lock = threading.Lock()

    def submit(self, key: Hashable, L: torch.Tensor) -> None:
        """Queue ``L`` (e.g. keyed by its training step); returns without waiting for the device.

        ``L`` must not be modified afterwards (on the host it is used as it is, not copied).
        """
        if not isinstance(L, torch.Tensor) or L.dim() != 2:
            raise ValueError(f"L must be a 2-D tensor; got {type(L).__name__}")
        host, event = _host_copy(L)
        with self._lock:
            self._pending.append((key, self._pool.submit(_eigen_job, host, event)))

    def pending(self) -> int:
        """How many submitted matrices have not been collected yet."""
        return len(self._pending)

    def ready(self) -> list[tuple[Hashable, LMNResult]]:
        """The finished results at the head of the queue, in submission order, without waiting.

        Raises:
            the exception of a failed computation (e.g. ``ValueError`` for a NaN matrix) when it is at the
            head of the queue; results before it are returned first, by this call.
        """
        return self._collect(block=False)

    def wait(self) -> list[tuple[Hashable, LMNResult]]:
        """Every pending result, in submission order (waits for them). Errors as in :meth:`ready`."""
        return self._collect(block=True)

    def _collect(self, block: bool) -> list[tuple[Hashable, LMNResult]]:
        out = []
        with self._lock:
            while self._pending and (block or self._pending[0][1].done()):
                key, fut = self._pending[0]
                error = fut.exception()  # waits for this one
                if error is not None and out:
                    break  # hand over what came before it; the next call raises
                self._pending.popleft()
                if error is not None:
                    raise error
                out.append((key, fut.result()))
        return out

    def close(self) -> None:
        """Stop the workers (pending computations finish first)."""
        self._pool.shutdown(wait=True)

    def __enter__(self) -> AsyncEigen:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
