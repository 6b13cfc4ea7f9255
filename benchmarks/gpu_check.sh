#!/usr/bin/env bash
# The project's GPU checks in one run: classifier speed per batch and precision, memory under an
# 8 GB cap, FP16/BF16 parity, GPU preprocessing, and the served ensemble when the bundled server is
# there. Results (JSON, markdown, plot) go to $OUT, or to benchmarks/results/ when OUT is unset.
#
#   bash benchmarks/gpu_check.sh            on a machine with a CUDA GPU (S=256; sections stop at a 7-minute budget
#                                           counted from here, the install below included)
#   bash benchmarks/gpu_check.sh --smoke    anywhere, on the CPU at S=16 (the test suite runs this)
#
# On a GPU machine without the project's dependencies (no network), first run
# `bash benchmarks/gpu_carry.sh` on a machine with one: what it writes to .gpu-carry/ (the trimmed
# bundled server and the wheels the checks need) is installed here from the files alone.
set -euo pipefail
# the budget's start (epoch seconds), read by benchmarks.gpu_check
GPU_CHECK_STARTED=$(date +%s.%N)
export GPU_CHECK_STARTED
cd "$(dirname "$0")/.."
# the checkout's venv where `make setup` made one; the GPU machine's python3 otherwise
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
out=${OUT:-benchmarks/results}
# the carried packages, only where the project's own are missing (the GPU machine, not a set-up checkout)
if [ -d .gpu-carry ] && ! "$python" -c "import pydicom, pytriton, tritonclient.http, captum" 2>/dev/null; then
    carried=$(mktemp -d)
    exports=$(bash benchmarks/gpu_carry.sh --install "$carried")
    eval "$exports"
fi
export PYTHONUNBUFFERED=1
exec "$python" -m benchmarks.gpu_check --out "$out" "$@"
