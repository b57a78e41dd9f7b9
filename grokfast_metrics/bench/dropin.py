"""``grokfast-metrics bench --dropin``: ``lmn_at`` on models shaped like the public grokking codebases, before/after.

For each model of ``tests/support/models.py`` (the repository checkout's; the package does not ship them) one run times

* **after**: ``lmn_at``'s plan as it is now (a tail lowered into the fused C++ kernel when it lowers:
  :mod:`grokfast_metrics.dropin.lower`), at ``N``;
* **before**: the same plan with the lowering switched off (the fx split or hook tail on the generic path, what
  ``lmn_at`` ran before the pruning and lowering of docs/dropin.md), at a smaller ``N`` when the full one is too slow, scaled per pair.

For a lowered tail it also reports the fraction of the matmul roof (useful FLOP ``2 T d_hidden O`` per pair, as for
the MLP; the roof is a large square fp32 matmul timed right before and after, the better of the two) and the same
kernel with every hidden unit through the GEMM (``dense``: ReLU replaced by LeakyReLU(0), the same function), since
the ReLU kernel computes only the units whose path crosses 0 (``crossing``: their share of units per pair, sampled).

With ``compiled`` (``bench --dropin`` sets it), a tail that stays on the generic path (attention after the cut) is
also timed with ``compile=True`` (:class:`~grokfast_metrics.generic.CompiledTail`): the first call (compiling
included), then ``repeats`` computations alternating with the eager plan in the same process, the best of each
(``compiled_us`` vs ``eager_us``); ``compiled_graphs`` counts the graphs dynamo compiled after the first call (0: no
recompiles).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch

from .harness import cpu_name

#: the Nanda-style tail of the targets: d_model 128, d_mlp 512, p = 113 at N = 961
NANDA_FULL = dict(p=113, d_model=128, d_mlp=512)


def _models():
    """``tests/support/models.py`` of the repository checkout (it imports ``tests/support/helpers.py`` and ``examples/``)."""
    root = Path(__file__).resolve().parents[2]
    support = root / "tests" / "support"
    path = support / "models.py"
    if not path.exists():
        raise FileNotFoundError(f"bench --dropin needs the repository checkout's tests/support/models.py (not found at {path})")
    sys.path.insert(0, str(support))
    try:
        spec = importlib.util.spec_from_file_location("_gm_bench_models", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(support))
    return mod


def _roof_gflops(size: int = 2048, repeats: int = 3) -> tuple[float, float]:
    """GFLOP/s of a large square fp32 matmul: by wall clock and by process CPU time (the better of ``repeats``)."""
    a = torch.randn(size, size)
    a @ a
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        a @ a
        best, best_cpu = min(best, time.perf_counter() - t), min(best_cpu, time.process_time() - c)
    flop = 2 * size**3
    return flop / best / 1e9, flop / best_cpu / 1e9


def _plan(model, probe, kw, lowered: bool):
    from ..dropin.lower import Lowering
    from ..dropin.plan import Plan

    kw = dict(kw)
    plan = Plan(model, probe, kw.pop("at"), **kw)
    plan.connectivity(n_lambda=3, warn_affine=False)  # builds the plan (probe, cut check, lowering)
    if not lowered and plan.lowering is not None:
        plan.lowering = Lowering(None, "switched off (bench --dropin 'before')")
        plan._lowered_at = None
        plan._lower = lambda: plan.lowering
    return plan


def _time_plan(plan, n_lambda: int) -> tuple[float, float]:
    """Wall-clock and process CPU seconds (all threads) of one computation of ``L``."""
    t, c = time.perf_counter(), time.process_time()
    plan.connectivity(n_lambda, warn_affine=False)
    return time.perf_counter() - t, time.process_time() - c


def _compiled_timing(builder, n: int, extra: dict, n_lambda: int, repeats: int) -> dict:
    """``compile=True`` vs the eager generic path on the same model and probe, alternately (see the module docstring)."""
    from torch._dynamo.utils import counters

    from ..dropin.plan import Plan

    model, probe, kw = _subset(builder, n, **extra)
    kw = dict(kw)
    at = kw.pop("at")
    eager, comp = Plan(model, probe, at, **kw), Plan(model, probe, at, **kw, compile=True)
    t, c = time.perf_counter(), time.process_time()
    comp.connectivity(n_lambda, warn_affine=False)
    first, first_cpu = time.perf_counter() - t, time.process_time() - c
    info = comp.compile_info or {}
    graphs = counters["stats"]["unique_graphs"]
    eager.connectivity(n_lambda, warn_affine=False)
    best = {"eager": (float("inf"), float("inf")), "compiled": (float("inf"), float("inf"))}
    for _ in range(repeats):
        for key, plan in (("eager", eager), ("compiled", comp)):
            w, cpu = _time_plan(plan, n_lambda)
            best[key] = (min(best[key][0], w), min(best[key][1], cpu))
    pairs = n * (n - 1) // 2
    return dict(
        compiled_n=n,
        compiled_ok=bool(info.get("compiled")),
        compiled_why=info.get("why") or info.get("failed"),
        compiled_first_s=first,
        compiled_first_cpu_s=first_cpu,
        compiled_rows=info.get("rows"),
        compiled_graphs=counters["stats"]["unique_graphs"] - graphs,
        eager_us=best["eager"][0] / pairs * 1e6,
        eager_cpu_us=best["eager"][1] / pairs * 1e6,
        compiled_us=best["compiled"][0] / pairs * 1e6,
        compiled_cpu_us=best["compiled"][1] / pairs * 1e6,
    )


def _subset(builder, n: int, **kw):
    model, probe, args = builder(n=n, **kw)
    return model, probe, args


def _crossing(spec, h: torch.Tensor, samples: int = 20000) -> float:
    z = spec.exact.absorb(h.double()) if spec.exact is not None else spec.absorb(h.double())
    g = torch.Generator().manual_seed(0)
    i = torch.randint(z.shape[0], (samples,), generator=g)
    j = torch.randint(z.shape[0], (samples,), generator=g)
    return float(((z[i] > 0) != (z[j] > 0)).double().mean())


def _dense_us_per_pair(plan, n_pairs_max: int, n_lambda: int) -> float | None:
    """µs per pair of the lowered kernel with every hidden unit through the GEMM (LeakyReLU(0) = ReLU)."""
    import copy

    from ..foundation.tail import Act
    from ..kernels.cpu_fused import connectivity_cpu

    spec = plan.lowering.tail.lowered_spec
    acts = spec.stages[0][0]
    if [a.name for a in acts] != ["relu"]:
        return None
    with plan.running():
        h = plan.forward()[1].reshape(plan.n, -1)
    n = min(h.shape[0], int((2 * n_pairs_max) ** 0.5) + 1)
    h = h[:n]
    dense = copy.copy(spec)
    dense.stages = [([Act("leaky_relu", 0.0)], spec.stages[0][1])]
    z, u = spec.absorb(h).contiguous(), spec.skip_values(h)
    t = time.perf_counter()
    connectivity_cpu(z, dense, n_lambda, flag=True, u=u)
    return (time.perf_counter() - t) / (n * (n - 1) // 2) * 1e6


def dropin_rows(
    n: int = 961,
    n_before: int = 48,
    n_small: int = 32,
    n_lambda: int = 21,
    log=print,
    roof_size: int = 2048,
    dense_pairs: int = 40000,
    compiled: bool = False,
    repeats: int = 3,
) -> list[dict]:
    """Measure every model (see the module docstring); returns one dict per model.

    ``n``: samples of the Nanda-style tail of the targets; ``n_before``: at most this many for the generic path
    ("before"); ``n_small``: samples of the test-size models; ``roof_size``: side of the roof matmul;
    ``dense_pairs``: at most this many pairs for the dense kernel; ``compiled``: time ``compile=True`` too (generic tails
    only, at ``n_small``; ``repeats`` alternations)."""
    models = _models()
    cases = [("nanda (d_model 128, d_mlp 512, p 113)", models.nanda, NANDA_FULL, n)]
    cases += [(name, b, {}, n_small) for name, b in sorted(models.BUILDERS.items())]
    rows = []
    for name, builder, extra, n_after in cases:
        log(f"{name}: N={n_after} ...")
        plan = _plan(*_subset(builder, n_after, **extra), lowered=True)
        roof0 = _roof_gflops(roof_size)
        t_after, c_after = _time_plan(plan, n_lambda)
        roof1 = _roof_gflops(roof_size)
        ran = plan.ran
        pairs = n_after * (n_after - 1) // 2
        row = dict(
            model=name,
            n=n_after,
            path=plan.path,
            ran=ran,
            after_s=t_after,
            after_us=t_after / pairs * 1e6,
            after_cpu_s=c_after,
            after_cpu_us=c_after / pairs * 1e6,
            roof_gflops=max(roof0[0], roof1[0]),
            roof_cpu_gflops=max(roof0[1], roof1[1]),
        )
        low = plan.lowering.tail if plan.lowering is not None else None
        if low is not None and "lowered" in ran:
            flop = n_lambda * low.flop_per_pair_t
            row.update(useful_gflops=flop * pairs / t_after / 1e9)
            row.update(frac_roof=row["useful_gflops"] / row["roof_gflops"])
            row.update(frac_roof_cpu=flop * pairs / c_after / 1e9 / row["roof_cpu_gflops"])  # both per CPU second
            with plan.running():
                h = plan.forward()[1].reshape(plan.n, -1)
            row.update(crossing=_crossing(low.lowered_spec, h))
            dense = _dense_us_per_pair(plan, dense_pairs, n_lambda)
            if dense is not None:
                row.update(dense_us=dense, dense_frac_roof=flop / (dense * 1e-6) / 1e9 / row["roof_gflops"])
        nb = min(n_before, n_after)
        before = _plan(*_subset(builder, nb, **extra), lowered=False)
        t_before, c_before = _time_plan(before, n_lambda)
        nbp = nb * (nb - 1) // 2
        row.update(before_n=nb, before_ran=before.ran, before_us=t_before / nbp * 1e6, before_cpu_us=c_before / nbp * 1e6)
        row.update(speedup=row["before_us"] / row["after_us"], speedup_cpu=row["before_cpu_us"] / row["after_cpu_us"])
        if compiled and plan.path == "split" and not ran.startswith("split, lowered"):
            log(f"  compile=True at N={n_small} (the first call compiles) ...")
            row.update(_compiled_timing(builder, n_small, extra, n_lambda, repeats))
            log(f"  compiled {row['compiled_us']:.1f} us/pair vs eager {row['eager_us']:.1f} (first call {row['compiled_first_s']:.1f} s)")
        rows.append(row)
        log(f"  after {row['after_us']:.1f} us/pair ({ran[:60]}), before {row['before_us']:.1f} us/pair")
    return rows


def format_rows(rows: list[dict]) -> str:
    """Markdown table of :func:`dropin_rows`."""
    head = (
        "| model | path after (what ran) | N | L after: wall s (CPU s) | µs/pair after: wall (CPU) | "
        "µs/pair before: wall (CPU) (N; path) | speedup: wall (CPU) | useful GFLOP/s | roof GFLOP/s | "
        "frac. roof: wall (CPU) | dense µs/pair (frac. roof) | crossing units | compile=True: µs/pair wall (CPU) vs "
        "eager, alternated (N) | compile=True: speedup wall (CPU) | compile=True: first call s (recompiles after) |"
    )
    out = [head, "|" + "---|" * 15]
    for r in rows:
        fr = f"{r['frac_roof']:.2f} ({r['frac_roof_cpu']:.2f})" if "frac_roof" in r else "-"
        ug = f"{r['useful_gflops']:.1f}" if "useful_gflops" in r else "-"
        dn = f"{r['dense_us']:.1f} ({r['dense_frac_roof']:.2f})" if "dense_us" in r else "-"
        cr = f"{100 * r['crossing']:.1f}%" if "crossing" in r else "-"
        out.append(
            f"| {r['model']} | {r['ran']} | {r['n']} | {r['after_s']:.2f} ({r['after_cpu_s']:.2f}) | "
            f"{r['after_us']:.1f} ({r['after_cpu_us']:.1f}) | {r['before_us']:.1f} ({r['before_cpu_us']:.1f}) "
            f"({r['before_n']}; {r['before_ran'].split(';')[0]}) | {r['speedup']:.1f}x ({r['speedup_cpu']:.1f}x) | "
            f"{ug} | {r['roof_gflops']:.1f} | {fr} | {dn} | {cr} | {_compiled_cells(r)} |"
        )
    return "\n".join(out)


def _compiled_cells(r: dict) -> str:
    if "compiled_us" not in r:
        return "- | - | -"
    if not r["compiled_ok"]:
        return f"not compiled: {r['compiled_why']} | - | -"
    return (
        f"{r['compiled_us']:.1f} ({r['compiled_cpu_us']:.1f}) vs {r['eager_us']:.1f} ({r['eager_cpu_us']:.1f}) "
        f"({r['compiled_n']}) | {r['eager_us'] / r['compiled_us']:.2f}x ({r['eager_cpu_us'] / r['compiled_cpu_us']:.2f}x) | "
        f"{r['compiled_first_s']:.1f} ({r['compiled_graphs']})"
    )


def run_dropin(n: int = 961, n_before: int = 48, n_small: int = 32, n_lambda: int = 21, quiet: bool = False, compiled: bool = True) -> int:
    """``bench --dropin``: print the table (and the machine)."""
    try:
        rows = dropin_rows(
            n, n_before, n_small, n_lambda, log=(lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr)), compiled=compiled
        )
    except FileNotFoundError as e:
        print(f"grokfast-metrics bench: error: {e}", file=sys.stderr)
        return 2
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(format_rows(rows))
    return 0
