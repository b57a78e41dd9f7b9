"""What a new user hits: which backend ran, the kernel build, bench outputs, help and advice texts,
and the docs' backend policy against the code."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from grokfast_metrics.kernels import cpu_fused as kc
from helpers import PYTHON, TINY_BENCH, mlp_tail
from torch import nn

import grokfast_metrics as gm
from grokfast_metrics.bench import command as bench_command
from grokfast_metrics.bench import extras
from grokfast_metrics.bench import report as bench_report
from grokfast_metrics.bench import sweep as bench_sweep
from grokfast_metrics.bench.harness import FIELDS, BenchRow, Timing
from grokfast_metrics.cli import main as cli
from grokfast_metrics.compute import core
from grokfast_metrics.dropin.plan import AffineTailWarning
from grokfast_metrics.experiment.config import TrainConfig
from grokfast_metrics.experiment.trainer import train

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "task": "add",
    "device": "cpu",
    "hidden": 16,
    "embed_dim": 8,
    "log_every": 1,
    "probe": 12,
    "threads": 1,
    "steps": 4,
    "lmn_every": 2,
    "complexity": "off",
}
needs_kernel = pytest.mark.skipif(not kc.available(), reason=f"fused CPU kernel unavailable: {kc.build_info()['error']}")


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """The kernel module as in a new process (nothing tried yet), caching into ``tmp_path``."""
    monkeypatch.setattr(kc, "_state", kc.initial_state())
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    return tmp_path / "ext"


# ------------------------------------------------------------------------------ the kernel build


def test_cxx_that_names_no_compiler_is_an_error_not_ignored(monkeypatch, fresh_kernel):
    """``CXX=/nonexistent`` used to fall through to g++ silently; now the kernel is unavailable, saying why."""
    monkeypatch.setenv("CXX", "/nonexistent")
    with pytest.raises(RuntimeError, match=r"CXX='/nonexistent' is not an executable"):
        kc._compiler()
    with pytest.warns(kc.CPUKernelUnavailableWarning) as rec:
        assert not kc.available()
    msg = str(rec[0].message)
    assert "\n" not in msg and "CXX='/nonexistent'" in msg and "10-20x slower" in msg
    h, tail = torch.randn(5, 4), mlp_tail([4, 6, 3], "silu", seed=1)
    info = core.backend_info(h, tail)
    assert info["backend"] == "torch" and info["kernel"] == "mlp" and "CXX='/nonexistent'" in info["fallback"]


def test_torch_extensions_dir_is_honoured(fresh_kernel):
    """The docstring promised ``TORCH_EXTENSIONS_DIR``; torch's ``get_default_build_root`` ignores it."""
    assert kc._cache_dir() == fresh_kernel / "grokfast_metrics_cpu"


@needs_kernel
def test_build_kernel_command_builds_into_the_cache_then_reuses_it(fresh_kernel, capsys):
    assert cli.main(["build-kernel"]) == 0
    out = capsys.readouterr().out
    assert "built in" in out and str(fresh_kernel) in out
    assert list((fresh_kernel / "grokfast_metrics_cpu").glob("connectivity_cpu_*.so"))
    assert cli.main(["build-kernel"]) == 0
    assert "cached" in capsys.readouterr().out


def test_build_kernel_command_without_compiler_says_why_in_one_line(monkeypatch, fresh_kernel, capsys):
    monkeypatch.setenv("CXX", "/nonexistent")
    assert cli.main(["build-kernel"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CXX='/nonexistent'" in err[0] and "10-20x" in err[0]


# ------------------------------------------------------------------------------ which backend ran, in the run directory


@needs_kernel
def test_run_records_the_fused_kernel_in_config_and_summary(tmp_path):
    res = train(TrainConfig(**TINY), tmp_path / "run", progress=False, plot=False)
    for name in ("config.json", "summary.json"):
        rec = json.loads((tmp_path / "run" / name).read_text())["lmn_backend"]
        assert rec == {"requested": "auto", "backend": "cpu", "kernel": "fp32", "dtype": "float32", "fallback": None, "warning": None}, name
    assert res.summary["lmn_backend"]["backend"] == "cpu"
    rec = json.loads(
        (
            train(TrainConfig(**{**TINY, "dtype": "float64"}), tmp_path / "f64", progress=False, plot=False).run_dir / "config.json"
        ).read_text()
    )["lmn_backend"]
    assert (rec["backend"], rec["kernel"]) == ("cpu", "fp64")  # fp64 runs the kernel's fp64 instantiation


def test_run_without_compiler_warns_once_in_one_line_and_records_it(tmp_path):
    """A fresh process without a usable compiler: one warning line (cause and cost) and the fallback in the run."""
    env = {**os.environ, "CXX": "/nonexistent", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    out = tmp_path / "run"
    p = subprocess.run(
        [
            *PYTHON,
            "-m",
            "grokfast_metrics",
            "train",
            "--task",
            "add",
            "--steps",
            "3",
            "--lmn-every",
            "2",
            "--probe",
            "8",
            "--hidden",
            "8",
            "--embed-dim",
            "4",
            "--complexity",
            "off",
            "--device",
            "cpu",
            "--no-plot",
            "--no-progress",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    warned = [line for line in p.stderr.splitlines() if "kernel" in line]
    assert warned == [
        "grokfast-metrics: warning: grokfast_metrics: fused CPU kernel unavailable (CXX='/nonexistent' "
        "is not an executable C++ compiler (fix or unset CXX)); LMN runs on torch ops instead, about "
        "10-20x slower"
    ], p.stderr
    for name in ("config.json", "summary.json"):
        rec = json.loads((out / name).read_text())["lmn_backend"]
        assert rec["backend"] == "torch" and "CXX='/nonexistent'" in rec["fallback"], name
        assert rec["warning"] == warned[0].removeprefix("grokfast-metrics: warning: ")


# ------------------------------------------------------------------------------ bench


def test_e2e_split_parts_add_up_under_load(monkeypatch):
    """Eigen timed while the machine was busier than for lmn_from_connectivity: the share stays <= 1 and the total
    is at least L + eigen (timed apart, the old split gave share 1.263 on a loaded box; here it would be 1.67)."""
    samples = iter([1.0, 0.5] * 3)  # eigen 1.0 s, then the whole lmn_from_connectivity 0.5 s, per repetition
    monkeypatch.setattr(extras, "time_fn", lambda fn, device, repeats, budget_s=None: Timing([next(samples)]))
    cfg = bench_sweep.BenchConfig(ns=[4], hiddens=[5], depths=[1], backends=["torch"], repeats=3, lmn_parts=True, progress=False)
    src = BenchRow(backend="torch", time_median_s=0.1, time_iqr_s=0.0, time_min_s=0.1, time_max_s=0.1, repeats=3, kernel="torch/mlp")
    (r,) = extras.lmn_parts_rows(cfg, torch.device("cpu"), {4: (src, torch.eye(4))}, {}, BenchRow)
    assert 0 < r.eigen_share <= 1
    assert r.time_median_s >= r.time_L_s + r.time_eigen_s
    assert r.time_median_s == pytest.approx(r.time_L_s + r.time_eigen_s + r.time_entropy_s)
    assert r.kernel == "torch/mlp"


def _parse(argv):
    return bench_command.add_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_bench_outputs_go_to_the_checkout_only_from_inside_it(tmp_path):
    inside = bench_command.output_paths(_parse([]), cwd=ROOT)
    assert inside[0] == ROOT / "benchmarks" / "results.csv" and inside[1] == ROOT / "benchmarks" / "RESULTS.md"
    outside = bench_command.output_paths(_parse([]), cwd=tmp_path)
    assert outside[0] == tmp_path / "bench-results" / "results.csv" and outside[1].parent == tmp_path / "bench-results"
    chosen = bench_command.output_paths(_parse(["--out-dir", str(tmp_path / "o"), "--results-md", ""]), cwd=ROOT)
    assert chosen[0] == tmp_path / "o" / "results.csv" and chosen[1] is None


def test_bench_run_outside_a_checkout_writes_bench_results_and_records_kernels(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [
        *TINY_BENCH,
    ]
    assert bench_command.run(_parse(argv)) == 0
    out = capsys.readouterr().out
    assert f"to {tmp_path / 'bench-results' / 'results.csv'} (not in a source checkout" in out
    assert not (tmp_path / "benchmarks").exists() and (tmp_path / "bench-results" / "RESULTS.md").is_file()
    rows = bench_report.read_csv(tmp_path / "bench-results" / "results.csv")
    kernels = {(r["kind"], r["backend"]): r["kernel"] for r in rows}
    assert kernels[("connectivity", "torch")] == "torch/mlp" and kernels[("train_overhead", "torch")] == "torch/mlp"
    assert kernels[("connectivity", "naive")] == "" and kernels[("roof", "torch.mm")] == ""
    auto = [k for (kind, b), k in kernels.items() if kind == "connectivity" and b.startswith("auto")]
    isa = "+avx512" if kc.build_info()["avx512"] else ""
    assert auto == ([f"cpu/fp32{isa}"] if kc.available() else ["torch/mlp"])
    assert all(float(r["eigen_share"]) <= 1 for r in rows if r["kind"] == "lmn_e2e" and r["eigen_share"])


def test_csv_of_the_previous_version_gains_the_new_column(tmp_path):
    old = tmp_path / "results.csv"
    old.write_text(",".join(FIELDS[:-1]) + "\n" + ",".join(["r0"] + [""] * (len(FIELDS) - 2)) + "\n")
    bench_report.append_csv([BenchRow(run_id="r1", kernel="cpu/fp32")], old)
    rows = bench_report.read_csv(old)
    assert [(r["run_id"], r["kernel"]) for r in rows] == [("r0", ""), ("r1", "cpu/fp32")]


# ------------------------------------------------------------------------------ help and advice texts


def test_sweep_help_has_no_train_only_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["sweep", "--help"])
    text = capsys.readouterr().out
    # sweep's own --overwrite (re-run runs trained with other options) is described as such; --resume is hidden
    assert "replace the run in --out" not in text and "[--resume" not in text and "--resume DIR" not in text
    assert "refused unless --overwrite or --resume" not in text and "sweep directory" in text
    assert cli.main(["sweep", "--resume", "x"]) == 2  # not silently ignored
    assert "--resume does not apply to a sweep" in capsys.readouterr().err


def test_affine_advice_fits_an_mlp_and_a_transformer():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 3))
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    with pytest.warns(AffineTailWarning) as rec:
        gm.lmn_at(mlp, x, at="3", n_lambda=5)
    msg = str(rec[0].message)
    assert "hidden layer" in msg and "hook_resid_mid" not in msg and "residual" not in msg

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 1, batch_first=True)
            self.out = nn.Linear(4, 3)

        def forward(self, t):
            return self.out(t + self.attn(t, t, t, need_weights=False)[0])[:, -1]

    with pytest.warns(AffineTailWarning) as rec:
        gm.lmn_at(Block(), torch.randn(5, 2, 4), at="attn", n_lambda=5, check=False)
    assert "hook_resid_mid" in str(rec[0].message)


# ------------------------------------------------------------------------------ the docs against the code


def _policy_table() -> list[tuple[str, str]]:
    """The rows of the ``auto`` policy table in docs/lmn.md: (case, what runs)."""
    text = (ROOT / "docs" / "lmn.md").read_text()
    block = text.split("<!-- auto-policy:begin -->", 1)[1].split("<!-- auto-policy:end -->", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines() if line.startswith("|")]
    return [(case, ran.strip("`")) for case, ran in rows[2:]]


def _policy_case(case: str):
    """``(h, tail, env, skip reason)`` of a docs table row."""
    mlp = mlp_tail([4, 6, 3], "silu", seed=2)
    h = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    cases = {
        "CPU, fp32 MLP tail, kernel built": (h, mlp, {}),
        "CPU, fp64 MLP tail, kernel built": (h.double(), mlp_tail([4, 6, 3], "silu", seed=2).double(), {}),
        "CPU, MLP tail, no C++ compiler (or a failed build)": (h, mlp, {"CXX": "/nonexistent"}),
        "CPU, MLP tail, `GROKFAST_METRICS_CPU_KERNEL=0`": (h, mlp, {"GROKFAST_METRICS_CPU_KERNEL": "0"}),
        "CPU without AVX2/FMA, MLP tail": (h, mlp, {"no_avx2": True}),
        "any device, affine tail (only Linears)": (h, nn.Sequential(nn.Linear(4, 3)), {}),
        "any device, other module (not an MLP `nn.Sequential`)": (h, nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)), {}),
        "CUDA, MLP tail, triton installed": (None, mlp, {}),
        "CUDA, MLP tail, no triton": (None, mlp, {}),
    }
    return cases[case]


def test_docs_auto_policy_table_matches_resolve_backend(monkeypatch, tmp_path):
    """Every row of docs/lmn.md's ``auto`` table is what ``core.backend_info`` resolves (CUDA rows need a GPU)."""
    rows = _policy_table()
    assert len(rows) == 9
    for case, ran in rows:
        h, tail, env = _policy_case(case)
        if h is None:
            continue  # CUDA rows: checked on a GPU machine only (no device here)
        if not kc.available() and "kernel built" in case:
            continue
        with monkeypatch.context() as m:
            m.setattr(kc, "_state", kc.initial_state())
            m.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
            for k, v in env.items():
                if k == "no_avx2":
                    m.setattr(kc, "_cpu_has_avx2_fma", lambda: False)
                else:
                    m.setenv(k, v)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", kc.CPUKernelUnavailableWarning)
                info = core.backend_info(h, tail)
        got = info["backend"] + (f" ({info['kernel']})" if info["kernel"] in ("fp32", "fp64") else "")
        assert got == ran, case


def test_docs_do_not_repeat_the_fixed_contradictions():
    lmn_md, training_md, readme = ((ROOT / p).read_text() for p in ("docs/lmn.md", "docs/training.md", "README.md"))
    assert "Triton on CUDA, torch otherwise" not in lmn_md
    assert not re.search(r"fp64 takes the torch backend", training_md)
    # one run, one set of numbers: the default run's generalization step and Pearson r, as the README quotes them
    assert "7,273" in readme and "7,273" in training_md and "141-7,437" not in training_md
    assert "r 0.989" in readme and "0.988" not in training_md


def _quoted_numbers():
    spec = importlib.util.spec_from_file_location("quoted_numbers", ROOT / "docs" / "quoted_numbers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quoted_numbers_script_reads_a_real_run(tmp_path):
    """The script behind docs/numbers_add_default.json, on a short real run: each number from the run's own files."""
    res = train(
        TrainConfig(**{**TINY, "hidden": 64, "steps": 80, "lr": 1e-2, "lmn_every": 5}), tmp_path / "run", progress=False, plot=False
    )
    q, s = _quoted_numbers().quoted(tmp_path / "run"), res.summary
    assert s["memorization_step"] is not None  # observed: step 58 (the phase below is not empty)
    assert q["memorization_step"] == f"{s['memorization_step']:,}"
    assert q["lmn_init"] == f"{s['lmn_init']['lmn']:.2f}" and q["lmn_final"] == f"{s['lmn_final']['lmn']:.2f}"
    assert q["lmn_peak"] == f"{max(r['lmn'] for r in res.rows if r.get('lmn') is not None):.2f}"
    phase = [
        r
        for r in res.rows
        if r.get("lmn") is not None
        and r["step"] >= s["memorization_step"]
        and (s["generalization_step"] is None or r["step"] <= s["generalization_step"])
    ]
    assert q["generalizing_phase_points"] == len(phase) >= 3
    r = np.corrcoef([p["lmn"] for p in phase], [p["test_loss"] for p in phase])[0, 1]
    assert q["pearson_lmn_test_loss"] == f"{r:.3f}"


def test_docs_quote_the_recorded_numbers_of_the_default_run():
    """README.md and docs/training.md quote the default run as recorded in docs/numbers_add_default.json (the
    script's output on a 20,000-step run, not repeated here: see the JSON's ``source``)."""
    n = json.loads((ROOT / "docs" / "numbers_add_default.json").read_text())["numbers"]
    readme, training = (" ".join((ROOT / p).read_text().split()) for p in ("README.md", "docs/training.md"))
    lo, hi = n["lmn_10k_20k"].split("-")
    for phrase in (
        f"memorizes at step {n['memorization_step']} and generalizes (test accuracy 100%, the paper's definition) at "
        f"step {n['generalization_step']};",
        f"Test accuracy first reaches 99% at step {n['generalization_step_99']}.",
        f"LMN rises from {n['lmn_init']} at initialization to a peak of {n['lmn_peak']} (step {n['lmn_peak_step']})",
        f"falls to {n['lmn_at_generalization']} by generalization and stays between {lo} and {hi} from step 10,000 to 20,000",
        f"(Pearson r {n['pearson_lmn_test_loss']}; the L2 norm {n['pearson_l2_test_loss']})",
    ):
        assert phrase in readme, phrase
    for phrase in (
        f"memorization at step {n['memorization_step']}, generalization (test accuracy 100%) at step **{n['generalization_step']}**",
        f"test accuracy ≥ 99% at step {n['generalization_step_99']}.",
        f"{n['lmn_init']} at init, {n['lmn_at_memorization']} at memorization, a peak of {n['lmn_peak']} at step "
        f"{n['lmn_peak_step']}, {n['lmn_at_generalization']} at generalization, {n['lmn_10k_20k']} from step 10,000 to "
        f"20,000, {n['lmn_final']} at the end",
        f"(Pearson r {n['pearson_lmn_test_loss']}; L2: {n['pearson_l2_test_loss']})",
        f"(steps {n['memorization_step']}-{n['generalization_step']}, {n['generalizing_phase_points']} logged LMN points)",
        f"**{n['pearson_lmn_test_loss']} for LMN and {n['pearson_l2_test_loss']} for L2**",
        f"at step 20,000 99.8% (LMN {n['lmn_final']};",
        f"separate tables at {n['generalization_step_99']} (100% at {n['generalization_step']}; the paper: 7,600)",
    ):
        assert phrase in training, phrase
