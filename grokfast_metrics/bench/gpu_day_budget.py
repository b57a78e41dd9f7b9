"""The GPU day's time: the budget of each stage and of the whole run (:mod:`.gpu_day`)."""

from __future__ import annotations

import time

#: seconds per stage on a GPU; the dense job gets what the others leave of ``--budget-s`` (at least its own figure)
BUDGETS = {"cuda_tests": 150.0, "timing": 150.0, "static_model": 40.0, "dense_tracking": 90.0}


#: caps, not durations: the dry run's 40-step job normally ends in seconds; a heavily loaded CI machine gets time
DRY_BUDGETS = {"cuda_tests": 30.0, "timing": 45.0, "static_model": 5.0, "dense_tracking": 120.0}


TOTAL_BUDGET_S = 450.0


#: kept back from the last stage for stopping the trainer and writing the results
RESERVE_S = 15.0


class Budget:
    """Seconds a stage may still spend: its own share, never past the run's deadline less :data:`RESERVE_S`."""

    def __init__(self, total_s: float):
        self.start = time.monotonic()
        self.deadline = self.start + total_s

    def stage(self, seconds: float) -> float:
        """Deadline (``time.monotonic``) of a stage allowed ``seconds``."""
        return min(time.monotonic() + seconds, self.deadline - RESERVE_S)

    def left(self) -> float:
        return self.deadline - time.monotonic()


def _left(deadline: float) -> float:
    return deadline - time.monotonic()
