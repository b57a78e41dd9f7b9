"""Sweeps: many tracked training runs over a grid, on this machine by default or on a Ray cluster.

``grokfast-metrics sweep --task add --grid init_scale=0.5,1,2,4 weight_decay=0,0.05,0.2,1 --seeds 2
--steps 5000 --out runs/phase`` trains every grid point and seed with :func:`grokfast_metrics.experiment.trainer.train`
(each run writes the same run directory as ``grokfast-metrics train``), then writes ``sweep.csv``,
``phase.png`` and ``lmn_predicts.png`` in the sweep directory.

- :mod:`.grid`: the grid (axes from the ``train`` options), the runs and their directories.
- :mod:`.engines`: where runs execute: a process pool (``local``, default) or Ray tasks (``ray``, optional
  extra ``pip install "grokfast_metrics[ray]"``). No scheduler of our own: the pool and Ray schedule.
- :mod:`.outcomes`: one ``sweep.csv`` row per run from its summary and metrics; the outcome of a run
  (comprehension, grokking, memorization, confusion; see ``docs/sweeps.md``).
- :mod:`.figures`: the phase diagram and the LMN-predicts-grokking scatter.
- :mod:`.batched`: ``--batched``: runs that share an architecture and task trained as one stack of models.
- :mod:`.manifest`: ``sweep.json`` (the planned runs), read back by ``grokfast-metrics plot SWEEP_DIR``.
- :mod:`.command`: the ``sweep`` subcommand.

A finished run (``summary.json`` not interrupted) is never re-run; a run that fails is recorded with
its error (``error.txt``, ``status`` in ``sweep.csv``) and the others continue; Ctrl-C leaves every
finished run intact.
"""

from __future__ import annotations

from .command import add_arguments, run
from .engines import ENGINES, run_sweep
from .grid import Run, parse_axis, plan_runs
from .outcomes import OUTCOMES, classify, sweep_rows

__all__ = ["ENGINES", "OUTCOMES", "Run", "add_arguments", "classify", "parse_axis", "plan_runs", "run", "run_sweep", "sweep_rows"]
