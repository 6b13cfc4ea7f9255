#!/usr/bin/env bash
# The lent GPU machine's software, rehearsed on this CPU before a GPU session spends its minutes:
# Python 3.12 with PyTorch 2.11 (its CUDA build, which runs on the CPU), numpy 2 and that machine's
# other packages, none of the project's own; then `gpu_check.sh --smoke` from a copy of what the device
# call carries (the tracked and untracked-not-ignored files, .gpu-carry/) in an environment holding
# nothing else. It catches what `make test` cannot: the project's code on numpy 2, Python 3.12 and
# torch 2.11; the carried packages installed from the files alone; the server's 3.12 stub with numpy
# 1.26 beside the machine's torch and scipy.
#
#   bash benchmarks/gpu_rehearsal.sh      (after `make setup`; the first run downloads about 5 GB into
#                                          build/gpu-rehearsal/ and builds .gpu-carry/ if missing)
#
# Environment: GPU_REHEARSAL_PYTHON (a CPython 3.12 with its shared libpython, as the machine's;
# default python3.12, or pyenv's 3.12), OUT (the results; default a new temporary folder).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$ROOT/build/gpu-rehearsal
VENV=$WORK/venv
# The packages gpu_check and the carried ones use that the machine has: pinned where the device tool's
# notes give the machine's version (2026-11), PyPI's latest otherwise.
MACHINE_PACKAGES=(torch==2.11.0 numpy==2.5.2 onnx==1.23.1 onnxruntime==1.30.0
    scipy matplotlib grpcio protobuf aiohttp requests tqdm rich pillow psutil pyyaml)

say() { printf 'gpu_rehearsal: %s\n' "$*" >&2; }

python312() {
    local candidate candidates=(python3.12)
    if [[ -n ${GPU_REHEARSAL_PYTHON:-} ]]; then
        candidates=("$GPU_REHEARSAL_PYTHON")
    elif command -v pyenv >/dev/null; then
        candidates+=("$(pyenv root)"/versions/3.12*/bin/python3.12)
    fi
    for candidate in "${candidates[@]}"; do
        if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
            printf '%s\n' "$candidate"
            return
        fi
    done
    say "no Python 3.12 found: set GPU_REHEARSAL_PYTHON"
    return 1
}

stamp=$VENV/.installed-$(printf '%s\n' "${MACHINE_PACKAGES[@]}" | sha256sum | cut -c1-12)
if [[ ! -f $stamp ]]; then
    say "building the machine's environment in $VENV"
    base=$(python312)
    rm -rf "$VENV"
    "$base" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet "${MACHINE_PACKAGES[@]}"
    touch "$stamp"
fi
[[ -f $ROOT/.gpu-carry/MANIFEST.txt ]] || bash "$ROOT/benchmarks/gpu_carry.sh"

copy=$(mktemp -d "${TMPDIR:-/tmp}/gpu-rehearsal-XXXXXX")
out=${OUT:-$copy.out}
trap 'rm -rf "$copy"' EXIT
git -C "$ROOT" ls-files -z --cached --others --exclude-standard | (cd "$ROOT" && tar --null -T - -cf -) | tar -xf - -C "$copy"
cp -r "$ROOT/.gpu-carry" "$copy/"
say "gpu_check.sh --smoke in $copy, results to $out"
cd "$copy"
env -i HOME="$HOME" PATH="$VENV/bin:/usr/local/bin:/usr/bin:/bin" OUT="$out" bash benchmarks/gpu_check.sh --smoke
