"""Benchmark harness: throughput of the LMN paths against baselines measured in the same run.

One harness serves the pytest-benchmark files in ``benchmarks/`` and the ``grokfast-metrics bench``
command. Every result is a :class:`BenchRow` (machine, device, versions, shape, time median and
spread, pairs/s, useful GFLOP/s and the ratio to each baseline of the same run); rows are appended
to ``benchmarks/results.csv``.

Baselines, all measured in the same run as the rows they are compared with:

* ``reference``: the NumPy float64 reference (:mod:`grokfast_metrics.reference`) on the first
  ``n_ref`` samples, extrapolated per pair (its cost per pair does not depend on ``N``);
* ``naive``: :func:`naive_connectivity`, the torch code a user would write without this library
  (interpolation points materialised in chunks, the whole tail module run on them, a
  ``torch.corrcoef``-style r2), on the first ``n_naive`` samples, extrapolated per pair;
* ``roof``: the GFLOP/s of one large square fp32 matmul (:func:`matmul_roof`), the compute roof;
* on CUDA, ``torch`` is also the baseline of ``triton``; on the CPU, of the fused kernel (``auto->cpu``).

Useful work per pair is ``2 * T * (H * O + (depth - 1) * H * H)`` FLOP: the multiply-adds of every
Linear applied after the interpolation (the absorbed first Linear runs once per sample and is not
counted). For the default depth-1 tail this is ``2 * T * H * O`` (docs/targets.md).

Refusal rule: before any timing, each backend's ``L`` on the first ``n_ref`` samples is compared
with the reference's ``L`` on the same samples and the same tail; a max abs difference above
``atol`` (1e-5 for fp32), or an exception, gives the row ``status = "REFUSED: <why>"`` and no
speed fields.

Modules: :mod:`.harness` (rows, accounting, timing, refusal), :mod:`.baselines` (what computes ``L``,
the reference / naive / roof baselines), :mod:`.workloads` (seeded tails and inputs, the training
step), :mod:`.sweep` and :mod:`.extras` (the rows of a run), :mod:`.report` (CSV, tables, plot,
``RESULTS.md``), :mod:`.command` (the ``bench`` subcommand).
"""
from .baselines import backend_fn, matmul_roof, naive_connectivity, paired_roof, reference_timed, square_matmul
from .command import add_arguments, main, run, run_benchmarks
from .harness import (
    ATOL,
    FIELDS,
    SPEED_FIELDS,
    BenchRow,
    Timing,
    check_agreement,
    estimate_seconds,
    fill_speed,
    fit_exponent,
    max_abs_diff,
    n_pairs,
    refusal,
    refuse,
    time_fn,
    useful_flops_per_pair,
    useful_gflops,
)
from .report import MD_BEGIN, MD_END, append_csv, format_table, plot_time_vs_n, read_csv, update_results_md
from .sweep import BenchConfig
from .workloads import TrainingWorkload, addition_training, make_inputs, make_tail, mlp_tail, train_overhead

__all__ = [
    "ATOL", "FIELDS", "MD_BEGIN", "MD_END", "SPEED_FIELDS", "BenchConfig", "BenchRow", "Timing", "TrainingWorkload",
    "add_arguments", "addition_training", "append_csv", "backend_fn", "check_agreement", "estimate_seconds",
    "fill_speed", "fit_exponent", "format_table", "main", "make_inputs", "make_tail", "matmul_roof", "max_abs_diff",
    "mlp_tail", "n_pairs", "naive_connectivity", "paired_roof", "plot_time_vs_n", "read_csv", "reference_timed",
    "refusal", "refuse", "run", "run_benchmarks", "square_matmul", "time_fn", "train_overhead",
    "update_results_md", "useful_flops_per_pair", "useful_gflops",
]
