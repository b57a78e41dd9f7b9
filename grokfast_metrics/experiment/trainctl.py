"""Around the training loop of :mod:`grokfast_metrics.experiment.trainer`: section timers, the progress bar, signals.

:class:`Timer` accumulates the seconds of each section of a step (``summary.json``'s timings),
:class:`_Progress` is the tqdm bar (imported only when shown) and :class:`_Signals` turns SIGINT and
SIGTERM into a clean stop of the run.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager

import torch

from ..foundation.runtime import synchronize
from .config import TrainConfig

__all__ = ["Timer"]


class Timer:
    """Seconds spent per section of the loop, accumulated: ``with timer("lmn"): ...``.

    Args:
        device: the device whose queued work a ``sync=True`` section waits for.
        sections: section names (``totals`` starts at 0 for each).
    """

    def __init__(self, device: torch.device, sections: tuple[str, ...] = ("train", "lmn", "complexity", "log")):
        self.device = device
        self.totals = dict.fromkeys(sections, 0.0)

    @contextmanager
    def __call__(self, section: str, sync: bool = False):
        """Add the time the block takes to ``totals[section]`` (after a device sync if ``sync``)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                synchronize(self.device)
            self.totals[section] += time.perf_counter() - t0


class _Progress:
    """tqdm bar on stderr with a loss / accuracy / LMN postfix refreshed at most every 0.5 s."""

    def __init__(self, cfg: TrainConfig, initial: int = 0):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=cfg.steps, initial=initial, desc=f"{cfg.task}", unit="step", dynamic_ncols=True, mininterval=0.5)
        self.last_postfix = 0.0

    def update(self, metrics: dict, lmn_value: float | None, final: bool, now: float) -> None:
        """Advance one step (not past the last) and refresh the postfix if due."""
        if not final:
            self.bar.update(1)
        if now - self.last_postfix > 0.5 or final:
            self.last_postfix = now
            m, lm = metrics, "-" if lmn_value is None else f"{lmn_value:.2f}"
            self.bar.set_postfix_str(
                f"loss {m['train_loss']:.3g}/{m['test_loss']:.3g} acc {m['train_acc']:.3f}/{m['test_acc']:.3f} LMN {lm}", refresh=False
            )

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()


class SignalCatcher:
    """SIGINT and SIGTERM handled by ``self._handle`` inside the ``with`` block (names recorded in ``received``).

    Installed only in the main thread (elsewhere, signals are not ours to handle); the old handlers restored on exit.
    The trainer's :class:`_Signals` and the sweep's stop (``sweep.command._Stop``) say what a signal does.
    """

    def __init__(self):
        self.received: list[str] = []
        self._old: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum, frame):
        raise NotImplementedError


class _Signals(SignalCatcher):
    """SIGINT and SIGTERM stop training the same way (as ``KeyboardInterrupt``); while the run's summary is
    written (:meth:`deferred`) they are only recorded, so a second Ctrl-C cannot lose it.
    """

    def __init__(self):
        super().__init__()
        self._defer = False

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        self.received.append(name)
        if self._defer:
            print(f"{name} received: still writing the run's summary and plot", file=sys.stderr, flush=True)
            return
        raise KeyboardInterrupt(name)

    @contextmanager
    def deferred(self):
        """Signals arriving inside the block are recorded, not raised."""
        self._defer = True
        try:
            yield
        finally:
            self._defer = False
