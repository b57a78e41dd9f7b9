"""The long fuzz run of docs/lmn.md, "Accuracy in the corners", in the background:
 ``nice python benchmarks/fuzz_corners.py fp64 3000 --log run.log``.

Draws the corners of ``tests/compute/test_corners.py`` (``_corner``: activation, width 1-5, weight / ``h`` scale, saturating
bias, ``h`` offset; N = 5) and checks every CPU backend against the cheap yardstick (``yardstick``: the float64 reference
where the torch fp64 error estimate and the two float64 paths vouch for it, ``exact`` elsewhere), auditing every
``--audit``-th draw against ``exact`` on all pairs. One line per draw goes to the log; the worst error per regime and
backend (the generic path: over its resolved pairs, its NaN pairs counted as ``nan:generic``) is printed (and written
as JSON with ``--json``) at the end and every 250 draws.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "support"))
import corners as tc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dtype", choices=["fp32", "fp64"])
    ap.add_argument("draws", type=int)
    ap.add_argument("--seed", type=int, default=24, help="the rng seed (fp64 adds 1, as the pytest fuzz)")
    ap.add_argument("--audit", type=int, default=20, help="audit every n-th draw against exact (0: never)")
    ap.add_argument("--log", default=None, help="append one line per draw here")
    ap.add_argument("--json", default=None, help="write the summary here")
    ap.add_argument(
        "--backends",
        default=None,
        help="comma-separated, instead of every CPU backend (e.g. triton, "
        "under TRITON_INTERPRET=1; GROKFAST_METRICS_TRITON_KERNEL picks v1 / v2)",
    )
    a = ap.parse_args()
    torch.set_num_threads(1)
    dtype = torch.float32 if a.dtype == "fp32" else torch.float64
    logf = open(a.log, "a") if a.log else sys.stdout
    t0 = time.time()

    def summary(stats: dict) -> dict:
        return {
            "dtype": a.dtype,
            "seed": a.seed + (dtype == torch.float64),
            "seconds": round(time.time() - t0, 1),
            **{k: v for k, v in stats.items() if k != "worst"},
            "failures": tc.fuzz_failures(stats, dtype),
            "worst": {k: {b: float(f"{v:.3g}") for b, v in w.items()} for k, w in sorted(stats["worst"].items())},
        }

    def log(k, key, e, sent):
        logf.write(f"{k} {key} exact_pairs={sent} " + " ".join(f"{b}={v:.2e}" for b, v in e.items()) + "\n")
        logf.flush()

    backends = tuple(a.backends.split(",")) if a.backends else None
    stats = tc.fuzz_run(a.draws, dtype, a.seed + (dtype == torch.float64), audit_every=a.audit, log=log, backends_=backends)
    out = summary(stats)
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        pathlib.Path(a.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
