"""Benchmark harness: throughput of the LMN paths against baselines measured in the same run.

One harness serves the pytest-benchmark files in ``benchmarks/`` and the ``grokfast-metrics bench``
command. Every result is a :class:`BenchRow` (machine, device, versions, shape, time median and
spread, pairs/s, useful GFLOP/s and the ratio to each baseline of the same run); rows are appended
to ``benchmarks/results.csv``.

Baselines, all measured in the same run as the rows they are compared with:

* ``reference``: the NumPy float64 reference (:mod:`grokfast_metrics.compute.reference`) on the first
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

Modules (import from them; this package re-exports nothing): :mod:`.harness` (rows, accounting, timing,
refusal), :mod:`.baselines` (what computes ``L``, the reference / naive / roof baselines), :mod:`.workloads`
(seeded tails and inputs, the training step), :mod:`.sweep` and :mod:`.extras` (the rows of a run),
:mod:`.report` (CSV, tables, plot, ``RESULTS.md``), :mod:`.command` (the ``bench`` subcommand).
"""
