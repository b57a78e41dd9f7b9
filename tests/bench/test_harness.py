"""Unit tests of the benchmark harness (grokfast_metrics.bench) at tiny sizes; no timed assertions."""

from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import time

import numpy as np
import pytest
import torch
from grokfast_metrics.kernels import cpu_fused as cpu_kernel
from helpers import PYTHON, TINY_BENCH
from torch import nn

import grokfast_metrics as gm
from grokfast_metrics.bench import baselines as bench_baselines
from grokfast_metrics.bench import command as bench_command
from grokfast_metrics.bench import harness as bench_harness
from grokfast_metrics.bench import report as bench_report
from grokfast_metrics.bench import sweep as bench_sweep
from grokfast_metrics.bench import workloads as bench_workloads
from grokfast_metrics.compute import core, reference
from grokfast_metrics.experiment.model import GrokMLP

TINY = bench_sweep.BenchConfig(
    ns=(5, 9),
    hiddens=(6,),
    depths=(1, 2),
    out=3,
    n_lambda=5,
    repeats=1,
    n_ref=5,
    n_naive=9,
    max_row_seconds=60.0,
    roof_size=32,
    lmn_parts=True,
    train_n=None,
    progress=False,
)
CPU = torch.device("cpu")


def _rows(kind: str, rows, **match):
    return [r for r in rows if r.kind == kind and all(getattr(r, k) == v for k, v in match.items())]


@pytest.fixture(scope="module")
def tiny_rows():
    return bench_command.run_benchmarks(TINY, CPU)


# ------------------------------------------------------------------------------ accounting


@pytest.mark.parametrize("n, pairs", [(2, 1), (3, 3), (961, 461280), (0, 0)])
def test_n_pairs(n, pairs):
    assert bench_harness.n_pairs(n) == pairs == sum(1 for i in range(n) for j in range(i + 1, n))


@pytest.mark.parametrize("hidden, out, depth", [(100, 31, 1), (7, 1, 2), (16, 5, 3)])
def test_useful_flops_counts_every_linear_after_the_absorbed_one(hidden, out, depth):
    tail = bench_workloads.make_tail(hidden, out, depth)
    linears = [m for m in tail if isinstance(m, nn.Linear)]
    assert len(linears) == depth + 1
    direct = sum(2 * 21 * m.in_features * m.out_features for m in linears[1:])  # the first one is absorbed
    assert bench_harness.useful_flops_per_pair(21, hidden, out, depth) == direct


def test_useful_flops_default_tail_matches_spec():
    # about 60 GFLOP in total (docs/targets.md) for N=961, default tail (2*T*H*O per pair)
    total = bench_harness.useful_flops_per_pair(21, 100, 31, 1) * bench_harness.n_pairs(961)
    assert total == 2 * 21 * 100 * 31 * 961 * 960 // 2
    assert 55e9 < total < 65e9
    assert bench_harness.useful_gflops(961, 21, 100, 31, 1, 2.0) == pytest.approx(total / 2.0 / 1e9)


@pytest.mark.parametrize("bad", [{"n_lambda": 0}, {"hidden": 0}, {"out": 0}, {"depth": 0}])
def test_useful_flops_rejects_bad_sizes(bad):
    kw = {"n_lambda": 21, "hidden": 4, "out": 2, "depth": 1} | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        bench_harness.useful_flops_per_pair(**kw)


def test_fill_speed_fields_follow_the_formulas():
    row = bench_harness.BenchRow(N=50, H=8, O=3, T=21, depth=2)
    timing = bench_harness.Timing([0.4, 0.2, 0.3, 0.5])
    bench_harness.fill_speed(row, timing, roof_gflops=10.0)
    pairs = 50 * 49 // 2
    assert row.pairs == pairs and row.repeats == 4
    assert row.time_median_s == pytest.approx(0.35)
    assert row.time_min_s == 0.2 and row.time_max_s == 0.5
    assert row.time_iqr_s == pytest.approx(np.percentile([0.2, 0.3, 0.4, 0.5], 75) - np.percentile([0.2, 0.3, 0.4, 0.5], 25))
    assert row.pairs_per_s == pytest.approx(pairs / 0.35)
    flop = 2 * 21 * (8 * 3 + 8 * 8) * pairs
    assert row.gflops == pytest.approx(flop / 0.35 / 1e9)
    assert row.frac_roof == pytest.approx(row.gflops / 10.0)


def test_e2e_split_adds_up(tiny_rows):
    # entropy = the rest of lmn_from_connectivity (its time minus eigen, >= 0): L + eigen + entropy = total
    for r in _rows("lmn_e2e", tiny_rows):
        assert r.time_entropy_s >= 0
        assert r.time_L_s + r.time_eigen_s + r.time_entropy_s == pytest.approx(max(r.time_median_s, r.time_L_s + r.time_eigen_s))


def test_fit_exponent_recovers_power_law():
    ns = [64, 256, 961, 4096]
    assert bench_harness.fit_exponent(ns, [3e-9 * n**2 for n in ns]) == pytest.approx(2.0)
    assert bench_harness.fit_exponent(ns, [1e-6 * n**1.5 for n in ns]) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="distinct"):
        bench_harness.fit_exponent([10, 10], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        bench_harness.fit_exponent([10, 20], [0.0, 2.0])


def test_estimate_seconds_scales_by_pairs_and_refines():
    sizes = []

    def call(m):  # a fixed ~10 ms per call, nothing per pair: small probes overestimate, doubling refines
        sizes.append(m)
        time.sleep(0.01)

    # probe 128 rows: ~0.01 * 8386560 / 8128 = 10 s > budget 5 -> probe 256: ~2.6 s <= budget
    est = bench_harness.estimate_seconds(call, 4096, CPU, budget_s=5.0, start=128)
    assert sorted(set(sizes)) == [128, 256] and est <= 5.0
    sizes.clear()
    assert bench_harness.estimate_seconds(call, 64, CPU, budget_s=100.0) < 100.0 and set(sizes) == {64}


def test_time_fn_budget_and_result():
    calls = []
    t = bench_harness.time_fn(lambda: calls.append(1) or len(calls), CPU, repeats=3)
    assert len(t.times) == 3 and t.result == 3 and all(x >= 0 for x in t.times)
    t = bench_harness.time_fn(lambda: calls.append(1), CPU, repeats=50, budget_s=0.0)
    assert len(t.times) == 1  # a zero budget still times one call
    with pytest.raises(ValueError, match="repeats"):
        bench_harness.time_fn(lambda: None, CPU, repeats=0)


# ------------------------------------------------------------------------------ baselines


@pytest.mark.parametrize("depth", [1, 2])
def test_naive_baseline_agrees_with_reference(depth):
    tail = bench_workloads.make_tail(6, 4, depth, seed=3)
    h = bench_workloads.make_inputs(9, 6, seed=4)
    L = bench_baselines.naive_connectivity(h, tail, n_lambda=7, chunk_pairs=5)  # several chunks, one partial
    L_ref = reference.connectivity(h, tail, 7)
    assert L.shape == (9, 9)
    np.testing.assert_allclose(L.double().numpy(), L_ref, atol=1e-5, rtol=0)


def test_make_inputs_prefix_stable_and_tail_seeded():
    assert torch.equal(bench_workloads.make_inputs(5, 4, seed=1), bench_workloads.make_inputs(9, 4, seed=1)[:5])
    state = torch.random.get_rng_state()
    a, b = bench_workloads.make_tail(4, 2, 1, seed=7), bench_workloads.make_tail(4, 2, 1, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_reference_timed_matches_reference():
    tail, h = bench_workloads.make_tail(5, 2, 1), bench_workloads.make_inputs(4, 5)
    L, per_pair = bench_baselines.reference_timed(h, tail, 5)
    np.testing.assert_array_equal(L, reference.connectivity(h, tail, 5))
    assert per_pair > 0
    with pytest.raises(ValueError, match=">= 2"):
        bench_baselines.reference_timed(h[:1], tail, 5)


# ------------------------------------------------------------------------------ refusal rule


def test_refusal_threshold_and_nan():
    assert bench_harness.refusal(1e-5, 1e-5) is None
    assert bench_harness.refusal(2e-5, 1e-5).startswith("REFUSED")
    assert bench_harness.refusal(math.nan, 1e-5).startswith("REFUSED")
    assert bench_harness.max_abs_diff(torch.full((2, 2), math.nan), np.zeros((2, 2))) == math.inf
    assert bench_harness.max_abs_diff(torch.zeros(2, 2), np.zeros((3, 3))) == math.inf


def test_refuse_clears_every_speed_field():
    row = bench_harness.fill_speed(bench_harness.BenchRow(N=10, H=4, O=2, T=5, depth=1), bench_harness.Timing([0.1]), 1.0)
    row.speedup_vs_reference = row.speedup_vs_naive = row.speedup_vs_torch = 2.0
    bench_harness.refuse(row, "L disagrees")
    assert row.status == "REFUSED: L disagrees"
    assert all(getattr(row, f) is None for f in bench_harness.SPEED_FIELDS)


def test_sweep_rows_ok(tiny_rows):
    torch_rows = _rows("connectivity", tiny_rows, backend="torch")
    assert len(torch_rows) == 4  # 2 N x 2 depths
    for r in torch_rows:
        assert r.status == "ok", r.status
        assert r.max_abs_diff <= 1e-5 and r.check_n == 5
        assert r.gflops == pytest.approx(bench_harness.useful_flops_per_pair(5, 6, 3, r.depth) * r.pairs / r.time_median_s / 1e9)
        ref = _rows("connectivity", tiny_rows, backend="reference", N=r.N, depth=r.depth)[0]
        naive = _rows("connectivity", tiny_rows, backend="naive", N=r.N, depth=r.depth)[0]
        assert r.speedup_vs_reference == pytest.approx(ref.time_median_s / r.time_median_s)
        assert r.speedup_vs_naive == pytest.approx(naive.time_median_s / r.time_median_s)
        assert r.frac_roof == pytest.approx(r.gflops / _rows("roof", tiny_rows)[0].gflops)
        assert r.machine and r.cpu and r.torch_version == torch.__version__ and r.device == "cpu"
    fused = _rows("connectivity", tiny_rows, backend="auto->cpu")
    assert len(fused) == (4 if cpu_kernel.available() else 0)
    for r in fused:  # the fused CPU kernel vs torch ops
        t = _rows("connectivity", tiny_rows, backend="torch", N=r.N, depth=r.depth)[0]
        assert r.status == "ok" and r.max_abs_diff <= 1e-5
        assert r.speedup_vs_torch == pytest.approx(t.time_median_s / r.time_median_s)
    for r in _rows("connectivity", tiny_rows, backend="reference"):  # extrapolated per pair from n_ref rows
        assert r.measured_pairs == bench_harness.n_pairs(5)
    scaling = _rows("scaling", tiny_rows, backend="torch")
    assert len(scaling) == 2 and all(math.isfinite(r.exponent) for r in scaling)
    e2e = _rows("lmn_e2e", tiny_rows)
    assert [r.N for r in e2e] == [5, 9] and all(0 <= r.eigen_share <= 1 for r in e2e)
    assert len({r.run_id for r in tiny_rows}) == 1


def test_sweep_refuses_backend_that_disagrees(monkeypatch):
    real = core.connectivity

    def off_by_1e3(h, tail, n_lambda=21, backend="auto", **kw):
        L = real(h, tail, n_lambda, backend, **kw)
        return L - 1e-3 if backend == "torch" else L

    monkeypatch.setattr(core, "connectivity", off_by_1e3)
    cfg = bench_sweep.BenchConfig(**{**TINY.__dict__, "depths": (1,), "lmn_parts": False, "train_n": 6})
    rows = bench_command.run_benchmarks(cfg, CPU)
    train = _rows("train_overhead", rows, backend="torch")[0]
    assert train.status.startswith("REFUSED: L disagrees") and train.overhead_ratio is None
    torch_rows = _rows("connectivity", rows, backend="torch")
    assert torch_rows and all(r.status.startswith("REFUSED: L disagrees") for r in torch_rows)
    assert all(getattr(r, f) is None for r in torch_rows for f in bench_harness.SPEED_FIELDS)
    assert all(r.max_abs_diff == pytest.approx(1e-3, rel=1e-3) for r in torch_rows)
    assert not _rows("scaling", rows, backend="torch")  # no speed, no exponent
    assert all(r.status == "ok" for r in _rows("connectivity", rows, backend="naive"))


def test_sweep_refuses_backend_that_raises():
    cfg = bench_sweep.BenchConfig(**{**TINY.__dict__, "ns": (5,), "depths": (1,), "backends": ("triton",), "lmn_parts": False})
    rows = bench_command.run_benchmarks(cfg, CPU)  # triton on CPU tensors without the interpreter raises
    r = _rows("connectivity", rows, backend="triton")[0]
    assert r.status.startswith("REFUSED: backend raised") and r.time_median_s is None


def test_triton_variants_are_bench_backends(monkeypatch):
    """``triton-v1`` / ``triton-v2`` time ``backend="triton"`` with one kernel variant each (both on CUDA by default)."""
    from grokfast_metrics.bench import baselines, sweep

    assert sweep.check_backends(["triton-v1", "triton-v2"]) == ["triton-v1", "triton-v2"]
    assert sweep.default_backends(torch.device("cuda")) == ["torch", "triton-v1", "triton-v2", "auto"]
    pytest.importorskip("triton")
    from grokfast_metrics.kernels.triton import kernel_variant

    seen = []
    monkeypatch.setattr(baselines.core, "connectivity", lambda h, tail, n_lambda, backend: seen.append((backend, kernel_variant())))
    monkeypatch.setenv("GROKFAST_METRICS_TRITON_KERNEL", "v2")
    baselines.backend_fn("triton-v1")(None, None, 21)
    # the variant is chosen by argument for the call only: the environment is never edited
    assert seen == [("triton", "v1")] and kernel_variant() == "v2" and os.environ["GROKFAST_METRICS_TRITON_KERNEL"] == "v2"


def test_sweep_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backends"):
        bench_command.run_benchmarks(bench_sweep.BenchConfig(**{**TINY.__dict__, "backends": ("numba",)}), CPU)


# ------------------------------------------------------------------------------ output


def test_append_csv_roundtrip_and_header_check(tmp_path, tiny_rows):
    path = tmp_path / "sub" / "results.csv"
    bench_report.append_csv(tiny_rows, path)
    bench_report.append_csv(tiny_rows[:2], path)
    lines = path.read_text().splitlines()
    assert lines[0].split(",") == list(bench_harness.FIELDS)
    assert sum(1 for x in lines if x.startswith("run_id")) == 1
    back = bench_report.read_csv(path)
    assert len(back) == len(tiny_rows) + 2
    first = tiny_rows[0]
    assert float(back[0]["gflops"]) == pytest.approx(first.gflops) and back[0]["kind"] == first.kind
    bad = tmp_path / "bad.csv"
    with bad.open("w", newline="") as f:
        csv.writer(f).writerow(["run_id", "time"])
    with pytest.raises(ValueError, match="different header"):
        bench_report.append_csv(tiny_rows, bad)


def test_table_shows_refused_without_speed():
    row = bench_harness.refuse(bench_harness.BenchRow(kind="connectivity", backend="torch", N=4, H=2, O=1, depth=1), "broken")
    table = bench_report.format_table([row])
    assert "REFUSED: broken" in table and "| torch | 4 | 2 | 1 | 1 | - |" in table


def test_results_md_keeps_text_outside_markers(tmp_path, tiny_rows):
    csv_path = bench_report.append_csv(tiny_rows, tmp_path / "results.csv")
    md = tmp_path / "RESULTS.md"
    md.write_text(f"# Results\n\nhand-written intro\n\n{bench_report.MD_BEGIN}\nold\n{bench_report.MD_END}\n\nfooter\n")
    bench_report.update_results_md(csv_path, md)
    text = md.read_text()
    assert "hand-written intro" in text and "footer" in text and "\nold\n" not in text
    assert "| torch | 9 | 6 | 3 | 2 |" in text
    pngs = list(tmp_path.glob("time_vs_n_*.png"))
    assert len(pngs) == 1 and pngs[0].name in text


def test_failed_figure_save_leaves_the_previous_figure(tmp_path, tiny_rows, monkeypatch):
    """The time-vs-N figure is written atomically (the run log's write_atomic): a save that fails half-way (a full
    disk) leaves the previous PNG as it was, and no temporary file. Before: savefig wrote the target in place."""
    from matplotlib.figure import Figure

    png = tmp_path / "time_vs_n.png"
    png.write_bytes(b"previous figure")

    def half_written(self, fname, *a, **k):
        (open(fname, "wb") if isinstance(fname, (str, os.PathLike)) else fname).write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(OSError):
        bench_report.plot_time_vs_n(tiny_rows, png)
    assert png.read_bytes() == b"previous figure"
    assert [p.name for p in tmp_path.iterdir()] == ["time_vs_n.png"]


# ------------------------------------------------------------------------------ CLI and training overhead


def _parse(argv):
    return bench_command.add_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_cli_run_writes_csv(tmp_path, capsys):
    out = tmp_path / "r.csv"
    argv = [
        *TINY_BENCH,
        "--csv",
        str(out),
        "--results-md",
        str(tmp_path / "R.md"),
    ]
    assert bench_command.run(_parse(argv)) == 0
    text = capsys.readouterr().out
    assert "| torch | 6 | 5 | 2 | 1 |" in text
    kinds = {r["kind"] for r in bench_report.read_csv(out)}
    assert kinds == {"roof", "connectivity", "scaling", "lmn_e2e", "train_overhead"}
    assert (tmp_path / "R.md").exists()


def test_cli_bad_option_returns_2(capsys):
    assert bench_command.run(_parse(["--n", "1", "--no-csv", "--no-progress"])) == 2
    assert "--n values must be >= 2" in capsys.readouterr().err
    assert bench_command.run(_parse(["--device", "tpu9", "--no-csv"])) == 2
    assert "--device must be" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA skip")
def test_cli_cuda_without_gpu_skips_cleanly(capsys, tmp_path):
    assert bench_command.run(_parse(["--device", "cuda", "--csv", str(tmp_path / "x.csv")])) == 0
    assert "GPU benchmarks skipped" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_train_overhead_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    plain, tracked = bench_workloads.train_overhead(CPU, n_track=12, steps=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert len(plain.times) == 1 and len(tracked.times) == 1


def test_auto_timed_once_and_wide_shapes_capped(monkeypatch):
    monkeypatch.setenv("GROKFAST_METRICS_CPU_KERNEL", "0")  # fused CPU kernel off: auto resolves to torch ops
    cfg = bench_sweep.BenchConfig(**{**TINY.__dict__, "depths": (1,), "backends": ("torch", "auto"), "max_n_other": 5})
    rows = bench_command.run_benchmarks(cfg, CPU)
    conn = _rows("connectivity", rows)
    assert {r.backend for r in conn} == {"reference", "naive", "torch"}  # auto -> torch: one row per N
    small, big = _rows("connectivity", rows, backend="torch", N=5)[0], _rows("connectivity", rows, backend="torch", N=9)[0]
    assert small.status == "ok" and "auto" in small.note
    assert big.status.startswith("SKIPPED: shapes other than H=100") and big.time_median_s is None
    e2e = {r.N: r for r in _rows("lmn_e2e", rows)}
    assert e2e[5].status == "ok" and e2e[5].time_L_s == small.time_median_s
    assert e2e[9].status == big.status


def test_paired_roof_ratio_formula():
    calls = []

    def fn():
        calls.append(1)
        return sum(range(1000))

    ratios, secs, roofs = bench_baselines.paired_roof(fn, 1e6, CPU, repeats=3, size=32)
    assert len(ratios) == len(secs) == len(roofs) == 3 and len(calls) == 4  # one warm-up
    for r, s, g in zip(ratios, secs, roofs):
        assert r == pytest.approx(1e6 / s / 1e9 / g)


def test_paired_roof_row_in_sweep():
    cfg = bench_sweep.BenchConfig(
        **{
            **TINY.__dict__,
            "ns": (5, 961),
            "hiddens": (100,),
            "depths": (1,),
            "out": 31,
            "n_lambda": 21,
            "backends": ("auto",),
            "max_row_seconds": 0.0,
            "repeats": 1,
            "fp64_roof": False,
        }
    )
    rows = bench_command.run_benchmarks(cfg, CPU)
    paired = _rows("roof_paired", rows)
    assert len(paired) == 1 and paired[0].N == 961 and paired[0].repeats == 5 and 0 < paired[0].frac_roof
    assert 0.0 <= paired[0].fraction_recomputed <= 0.05  # the Done-when: reported; observed 0.0031 (fp32 CPU)
    assert "timed alternately" in bench_report.format_table(rows)
    assert "recomputed in fp64" in bench_report.format_table(rows)


@pytest.mark.skipif(not cpu_kernel.available(), reason="fused CPU kernel unavailable")
def test_fp64_roof_row(monkeypatch):
    """The fp64 kernel's row (at a small N here): checked against the reference, fraction of an fp64 roof, speed-up
    over the torch-op fp64 path; refused (no speed) when it disagrees."""
    from grokfast_metrics.bench import extras

    monkeypatch.setattr(extras, "PAIRED_N", 24)
    cfg = bench_sweep.BenchConfig(**{**TINY.__dict__, "out": 31, "n_lambda": 21, "repeats": 1, "roof_size": 64, "n_ref": 6})
    (row,) = extras.fp64_roof_rows(cfg, CPU, bench_sweep.row_maker(CPU))
    assert row.status == "ok" and row.dtype == "float64" and row.backend == "auto->cpu" and row.N == 24
    assert row.frac_roof > 0 and row.speedup_vs_torch > 0 and row.max_abs_diff <= 1e-10  # observed ~4e-16
    assert "fp64 roof" in bench_report.format_table([row]) and "torch-op fp64 path" in row.note
    monkeypatch.setattr(extras.core, "connectivity", lambda h, tail, T, backend="auto": torch.zeros(h.shape[0], h.shape[0]))
    (bad,) = extras.fp64_roof_rows(cfg, CPU, bench_sweep.row_maker(CPU))
    assert bad.status.startswith("REFUSED") and bad.frac_roof is None


def test_addition_training_is_the_paper_mlp_on_addition():
    state = torch.random.get_rng_state()
    work = bench_workloads.addition_training(CPU, n_track=961, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert isinstance(work.model, GrokMLP) and work.model.embedding == "shared"
    assert work.n_train == 480 and work.x_track.shape == (961, 2)
    h = work.model.act1(work.model.fc1(work.model.embed(work.x_track[:20])))
    work.x_track = work.x_track[:20]
    res = work.track("torch", 7)
    assert res.lmn == pytest.approx(gm.lmn(h.detach(), work.model.tail("hidden1_post"), 7, backend="torch").lmn)


def test_mlp_tail_layout_and_seed():
    tail = bench_workloads.mlp_tail([6, 5, 4, 3], nn.Tanh, bias=False, final_act=nn.ReLU, seed=None)
    assert [type(m) for m in tail] == [nn.Linear, nn.Tanh, nn.Linear, nn.Tanh, nn.Linear, nn.ReLU]
    assert [m.weight.shape for m in tail if isinstance(m, nn.Linear)] == [(5, 6), (4, 5), (3, 4)]
    assert all(m.bias is None for m in tail if isinstance(m, nn.Linear))
    a, b = bench_workloads.make_tail(4, 2, 2, seed=3), bench_workloads.mlp_tail([4, 4, 4, 2], seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="widths"):
        bench_workloads.mlp_tail([4])


def test_bench_does_not_import_the_trainer():
    code = "import sys, grokfast_metrics.bench.command; sys.exit('grokfast_metrics.experiment.trainer' in sys.modules)"
    assert subprocess.run([*PYTHON, "-c", code], check=False).returncode == 0
