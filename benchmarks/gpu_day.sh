#!/usr/bin/env bash
# The GPU day: every GPU figure of the project in one command on a bare lent GPU machine (<= 8 minutes).
#
#   bash benchmarks/gpu_day.sh OUTDIR [--dry-run] [--budget-s S] [--skip-tests] [--dense-steps N]
#
# Writes OUTDIR/gpu_day.json; merge it with `grokfast-metrics bench --merge-gpu-day OUTDIR/gpu_day.json`.
# Stages and budgets: grokfast_metrics/bench/gpu_day.py. Exit code 3: the CUDA tests failed (nothing was timed).
#
# Set-up, from the repository copy alone (nothing is installed, nothing fetched, nothing needs to travel
# beyond the working tree): the GPU image's python3 has torch, triton, numpy, scipy, tqdm, matplotlib,
# mpmath, filelock, pytest and hypothesis. The package is not pip-installed: setup.py maps the top-level
# kernels/ folder to grokfast_metrics.kernels (package_dir), so a shim folder in /tmp holds a
# grokfast_metrics/ of symbolic links to the repository's modules plus kernels -> kernels/, and goes first
# on PYTHONPATH. Python runs with -P from /tmp, so the repository root (whose grokfast_metrics/ has no
# kernels/ and whose kernels/ would shadow Hugging Face's package) is never on sys.path.
# PYTHON picks the interpreter (default python3).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash benchmarks/gpu_day.sh OUTDIR [--dry-run] [--budget-s S] [--skip-tests] [--dense-steps N]" >&2
    exit 2
fi
OUTDIR=$(mkdir -p "$1" && cd "$1" && pwd)
shift
SHIM=$(mktemp -d "${TMPDIR:-/tmp}/gpu_day_shim.XXXXXX")
trap 'rm -rf "$SHIM"' EXIT
mkdir "$SHIM/grokfast_metrics"
for f in "$REPO"/grokfast_metrics/*; do
    case "$(basename "$f")" in __pycache__) ;; *) ln -s "$f" "$SHIM/grokfast_metrics/" ;; esac
done
ln -s "$REPO/kernels" "$SHIM/grokfast_metrics/kernels"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}" GROKFAST_METRICS_GPU_DAY_REPO="$REPO" PYTHONUNBUFFERED=1
cd "$SHIM"
set +e
"$PY" -P -m grokfast_metrics.bench.gpu_day "$OUTDIR" "$@"
rc=$?
set -e
exit $rc
