"""Generic-path speed-up of ``lmn_at`` on a Grokfast-style transformer (docs/dropin.md, "How the rest of the model is run"),
same run.

Three ways to compute the same LMN at the output of the first and of the last block of Grokfast's
decoder (dim 128, 2 blocks, 4 heads, p = 97, probe of N sequence-first ``[x, op, y, =]`` inputs):

- ``hooks_v1``: what ``lmn_at`` ran before: the whole model re-run per interpolation point with a
  hook replacing the block's output (prefix recomputed), through ``gm.lmn``'s generic path (every
  one of the 21 points per pair, 4 MiB chunks);
- ``hooks``: the same hook tail through the new generic loop (path ends once, 1 MiB batches);
- ``auto``: the new default, the ``torch.fx`` split: only the layers after ``at`` run.

Run under pytest-benchmark (``pytest benchmarks/test_dropin_speed.py --benchmark-only``) or directly
(``python benchmarks/test_dropin_speed.py [--n 64 128] [--repeats 3]``), which alternates the three
per repeat and prints the median (and min) table recorded in ``benchmarks/RESULTS.md``. On a shared
machine the min is the steadier figure (other jobs only ever add time).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import pytest
import torch

import grokfast_metrics as gm
from grokfast_metrics.dropin.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
ATS = ("layers.0", "layers.1")  # first and last block
LAST = lambda out: out[-1]


def _decoder_and_probe(n: int):
    spec = importlib.util.spec_from_file_location("_gf_bench", ROOT / "examples" / "grokfast_transformer.py")
    g = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(g)
    torch.manual_seed(0)
    model = g.Decoder(dim=128, num_layers=2, num_heads=4, num_tokens=99, seq_len=5)
    data = g.modular_data(97, 97, 98)
    probe = data[:-1, torch.randperm(data.shape[1], generator=torch.Generator().manual_seed(0))[:n]]
    return model, probe


def run(model, probe, at: str, how: str) -> gm.LMNResult:
    """One LMN computation by ``how`` in ``("hooks_v1", "hooks", "auto")``."""
    if how != "hooks_v1":
        return gm.lmn_at(model, probe, at=at, output=LAST, batch_dim=1, path=how)
    plan = Plan(model, probe, at, None, LAST, 1, path="hooks")
    with plan.running():
        y, act = plan.forward()
        plan.enforce_cut(act, y)
        h = act.movedim(1, 0).reshape(plan.n, -1)
        return gm.lmn(h, plan.tail, 21, "torch")


@pytest.mark.parametrize("how", ["hooks_v1", "hooks", "auto"])
@pytest.mark.parametrize("at", ATS)
@pytest.mark.parametrize("n", [64])
def test_dropin_generic_path(benchmark, n, at, how):
    model, probe = _decoder_and_probe(n)
    res = benchmark.pedantic(run, args=(model, probe, at, how), rounds=1, iterations=1)
    ref = run(model, probe, at, "auto") if how != "auto" else res
    assert float((res.connectivity - ref.connectivity).abs().max()) <= 1e-5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| N | at | hooks_v1 s | hooks s | auto (fx split) s | speed-up auto vs hooks_v1 (median / min) | max abs diff of L |")
    print("|---|---|---|---|---|---|---|")
    for n in a.n:
        model, probe = _decoder_and_probe(n)
        for at in ATS:
            times: dict[str, list[float]] = {k: [] for k in ("hooks_v1", "hooks", "auto")}
            out = {}
            for _ in range(a.repeats):  # alternate, so load changes hit all three alike
                for how in times:
                    t = time.perf_counter()
                    out[how] = run(model, probe, at, how)
                    times[how].append(time.perf_counter() - t)
            med = {k: statistics.median(v) for k, v in times.items()}
            low = {k: min(v) for k, v in times.items()}
            diff = max(float((out[k].connectivity - out["auto"].connectivity).abs().max()) for k in out)
            cell = {k: f"{med[k]:.2f} (min {low[k]:.2f})" for k in med}
            print(
                f"| {n} | {at} | {cell['hooks_v1']} | {cell['hooks']} | {cell['auto']} | "
                f"{med['hooks_v1'] / med['auto']:.1f}x / {low['hooks_v1'] / low['auto']:.1f}x | {diff:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
