#!/usr/bin/env bash
# What the lent GPU machine lacks to serve the ensemble and call it with the project's client, built
# here (PyPI) into .gpu-carry/ (git-ignored: name it in the device call's `carry`) and unpacked there
# (no network). That machine has Python 3.12 with torch, numpy 2, grpcio, protobuf, aiohttp, tqdm and
# requests (and matplotlib, which captum imports); it lacks the bundled tritonserver, numpy<2 for
# the server's stubs, tritonclient's HTTP side, pydicom, openpyxl and captum.
#
#   bash benchmarks/gpu_carry.sh                      here: build .gpu-carry/ (about 5 minutes: xz -9e)
#   bash benchmarks/gpu_carry.sh --server-only DIR    here: only the trimmed server tree, unpacked, in DIR
#   exports=$(bash benchmarks/gpu_carry.sh --install DEST) && eval "$exports"
#                                                     there: unpack into DEST, check, print the exports
#
# .gpu-carry/ holds xz archives of folders pip installed here for CPython $GPU_CARRY_PYTHON x86-64
# (pip install --target with --platform): unpacking them there is the same install, from half the
# bytes of the wheels (xz over the files, not zip's per-file deflate), and needs no pip there.
#   server.tar.xz         pytriton/ + nvidia_pytriton.libs/: the tritonserver binary, the Python
#                         backend, the stub of each version in GPU_CARRY_STUBS, and the libraries those
#                         load (found with ldd, so nothing they need is left out); PYTHONPATH finds it
#   stub-site.tar.xz      numpy 1.26 for the stubs only (numpy 2 crashes them on BYTES inputs)
#   site.tar.xz           pydicom, tritonclient and what our client needs of its gRPC and HTTP extras,
#                         captum (explain.Explainer, gpu_check's explain section; 1.4 MB wheel)
#   grpc-fallback.tar.xz  grpcio + protobuf, unpacked only if the machine's are older than
#                         tritonclient's generated code accepts (it refuses to import then)
#   MANIFEST.txt          versions, wheel and archive sizes
#
# Environment: GPU_CARRY_PYTHON (the GPU machine's Python version, 3.12; another one rehearses the
# install here), GPU_CARRY_DIR (instead of .gpu-carry/), GPU_CARRY_STUBS (the stubs to keep, default that version; a test adds this machine's
# to start the trimmed server here), PYTHON (here: the project's venv, which has nvidia-pytriton;
# there: python3, the one that runs the checks).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CARRY=${GPU_CARRY_DIR:-$ROOT/.gpu-carry}
WORK=$ROOT/build/gpu-carry # downloads and staging (git-ignored); not carried
TARGET_PYTHON=${GPU_CARRY_PYTHON:-3.12}
read -r -a STUBS <<<"${GPU_CARRY_STUBS:-$TARGET_PYTHON}"
LIMIT_BYTES=60000000 # .gpu-carry/ + the tracked repository: what travels to the GPU machine
# The packages the GPU machine lacks. Versions: numpy, pydicom and tritonclient as pinned in
# pyproject.toml, the others as the project's venv has them (the set the tests run with).
STUB_PACKAGES=(numpy)
CLIENT_PACKAGES=(
    tritonclient pydicom
    python-rapidjson                                                   # tritonclient.http's JSON
    geventhttpclient gevent greenlet zope.event zope.interface brotli # tritonclient.http's transport
    openpyxl et-xmlfile                                                # client.report (the xlsx report)
    captum                                                             # explain.Explainer (matplotlib, tqdm: the machine's)
)
FALLBACK_PACKAGES=(grpcio protobuf)
# pip matches manylinux_2_N tags exactly: name every one our wheels carry (all below the machine's glibc).
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
    manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64)

say() { printf '%s\n' "$*" >&2; }
die() {
    say "gpu_carry: $*"
    exit 1
}

default_python() {
    if [[ -n ${PYTHON:-} ]]; then
        printf '%s\n' "$PYTHON"
    elif [[ -x $ROOT/.venv/bin/python ]]; then
        printf '%s\n' "$ROOT/.venv/bin/python"
    else
        printf 'python3\n'
    fi
}

# The libraries an ELF file loads, by name, with where the loader finds them ("not found" if nowhere).
loads() {
    env -u LD_LIBRARY_PATH ldd "$1" | awk '$2 == "=>" { print $1, $3 }'
}

# Here: DIR = the trimmed server, importable as `pytriton` when DIR is on PYTHONPATH.
server_tree() {
    local dest=$1 python site server libs version elf name where
    python=$(default_python)
    site=$("$python" -c 'import importlib.util, pathlib
spec = importlib.util.find_spec("pytriton")
print(pathlib.Path(spec.origin).resolve().parent.parent if spec and spec.origin else "")')
    [[ -n $site ]] || die "$python has no nvidia-pytriton: run \`make setup\` (or set PYTHON)"
    server=$site/pytriton/tritonserver
    libs=$site/nvidia_pytriton.libs
    rm -rf "$dest"
    mkdir -p "$dest/pytriton/tritonserver/bin" "$dest/pytriton/tritonserver/backends/python" "$dest/nvidia_pytriton.libs"
    # serve.find_installation only locates the package: none of pytriton's Python is needed.
    : >"$dest/pytriton/__init__.py"
    cp -p "$server/bin/tritonserver" "$dest/pytriton/tritonserver/bin/"
    find "$server/backends/python" -maxdepth 1 -type f -exec cp -p {} "$dest/pytriton/tritonserver/backends/python/" \;
    local elves=("$dest/pytriton/tritonserver/bin/tritonserver" "$dest/pytriton/tritonserver/backends/python/libtriton_python.so")
    for version in "${STUBS[@]}"; do
        [[ -f $server/python_backend_stubs/$version/triton_python_backend_stub ]] || die "the wheel has no stub for Python $version"
        mkdir -p "$dest/pytriton/tritonserver/python_backend_stubs/$version"
        cp -p "$server/python_backend_stubs/$version/triton_python_backend_stub" "$dest/pytriton/tritonserver/python_backend_stubs/$version/"
        elves+=("$dest/pytriton/tritonserver/python_backend_stubs/$version/triton_python_backend_stub")
    done
    # ldd on the wheel's own files lists every bundled library they load, directly or through another.
    for elf in "${elves[@]}"; do loads "${elf/#"$dest"/"$site"}"; done | sort -u | while read -r name where; do
        if [[ -f $libs/$name ]]; then cp -p "$libs/$name" "$dest/nvidia_pytriton.libs/"; fi
    done
    # The copies' RPATH ($ORIGIN/../../../nvidia_pytriton.libs) points into the trimmed tree: there all
    # must resolve, but the interpreter's own libpython (the machine's Python provides it).
    for elf in "${elves[@]}"; do loads "$elf"; done | sort -u | while read -r name where; do
        if [[ $where == not && $name != libpython* ]]; then die "$name, which the server loads, is missing"; fi
    done
    say "server tree: $(du -sb "$dest" | cut -f1) bytes, stubs ${STUBS[*]}, $(find "$dest/nvidia_pytriton.libs" -type f | wc -l) of $(find "$libs" -type f | wc -l) bundled libraries"
}

pack() { # folder -> .tar.xz; the x86 filter helps the shared libraries, 9e the ICU data
    tar -C "$1" --sort=name --owner=0 --group=0 --numeric-owner -cf - . | xz --x86 --lzma2=preset=9e --threads=1 >"$2"
}

# Here: download one group's wheels and install them into a folder as pip would there.
install_group() {
    local into=$1 python=$2 pins
    shift 2
    pins=$("$python" - "$ROOT/pyproject.toml" "$@" <<'EOF'
import re
import sys
import tomllib
from importlib.metadata import version

with open(sys.argv[1], "rb") as f:
    pinned = {}
    for requirement in tomllib.load(f)["project"]["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)", requirement)
        if match:
            pinned[match[1].lower()] = match[3]
print(" ".join(f"{name}=={pinned.get(name.lower()) or version(name)}" for name in sys.argv[2:]))
EOF
    )
    local target=(--only-binary=:all: --no-deps --python-version "$TARGET_PYTHON" --implementation cp)
    local platform
    for platform in "${PLATFORMS[@]}"; do target+=(--platform "$platform"); done
    rm -rf "$WORK/wheels/$into"
    # shellcheck disable=SC2086  # pins: one word per package
    "$python" -m pip download -q "${target[@]}" -d "$WORK/wheels/$into" $pins
    "$python" -m pip install -q --no-index --no-compile "${target[@]}" --target "$WORK/stage/$into" "$WORK/wheels/$into"/*.whl
    rm -rf "$WORK/stage/$into/bin" # console scripts, whose first line names this machine's Python
}

build() {
    local python
    python=$(default_python)
    rm -rf "$CARRY" "$WORK/stage"
    mkdir -p "$CARRY" "$WORK/stage"
    server_tree "$WORK/stage/server"
    install_group stub-site "$python" "${STUB_PACKAGES[@]}"
    install_group site "$python" "${CLIENT_PACKAGES[@]}"
    install_group grpc-fallback "$python" "${FALLBACK_PACKAGES[@]}"
    [[ ! -e $WORK/stage/site/numpy ]] || die "numpy got into site: the main process must keep the machine's numpy 2"
    local name
    for name in server stub-site site grpc-fallback; do pack "$WORK/stage/$name" "$CARRY/$name.tar.xz"; done

    local tracked=0 carried size file
    while IFS= read -r -d '' file; do
        if [[ -f $ROOT/$file ]]; then tracked=$((tracked + $(stat -c %s "$ROOT/$file"))); fi
    done < <(git -C "$ROOT" ls-files -z)
    {
        printf 'For CPython %s x86-64 (manylinux), built %s from %s\n\nwheels (installed here, carried as the archives below):\n' \
            "$TARGET_PYTHON" "$(date -u +%FT%TZ)" "$(git -C "$ROOT" rev-parse --short HEAD)"
        for file in "$WORK"/wheels/*/*.whl; do printf '  %10d  %s/%s\n' "$(stat -c %s "$file")" "$(basename "$(dirname "$file")")" "$(basename "$file")"; done
        printf '\nserver.tar.xz: stubs %s; libraries:\n' "${STUBS[*]}"
        find "$WORK/stage/server/nvidia_pytriton.libs" -type f -printf '  %10s  %f\n' | sort -k2
        printf '\narchives:\n'
        for file in "$CARRY"/*.tar.xz; do printf '  %10d  %s\n' "$(stat -c %s "$file")" "$(basename "$file")"; done
    } >"$CARRY/MANIFEST.txt"
    carried=$(du -sb "$CARRY" | cut -f1)
    size=$((carried + tracked))
    cat "$CARRY/MANIFEST.txt"
    printf '\n.gpu-carry: %d bytes; tracked repository: %d bytes; together %d bytes (limit %d)\n' "$carried" "$tracked" "$size" "$LIMIT_BYTES"
    ((size <= LIMIT_BYTES)) || die "over the limit of what travels to the GPU machine"
}

unpack() { # archive -> folder, with Python's tarfile: no xz binary needed
    "$PYTHON" -c 'import sys, tarfile
with tarfile.open(sys.argv[1]) as archive:
    archive.extractall(sys.argv[2], **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))' "$1" "$2"
}

# There: unpack into DEST, check what can be checked without the server, print the exports.
install() {
    local dest=$1 version error name answer ld_path=''
    PYTHON=${PYTHON:-python3}
    for name in server stub-site site grpc-fallback; do
        [[ -f $CARRY/$name.tar.xz ]] || die "$CARRY/$name.tar.xz is missing: run benchmarks/gpu_carry.sh on a machine with PyPI"
    done
    mkdir -p "$dest"
    dest=$(cd "$dest" && pwd)
    rm -rf "$dest/server" "$dest/stub-site" "$dest/site"
    for name in server stub-site site; do unpack "$CARRY/$name.tar.xz" "$dest/$name"; done
    # The main process: the project, the client's packages, the server; its numpy stays the machine's 2.x.
    local pythonpath=$ROOT:$dest/site:$dest/server${PYTHONPATH:+:$PYTHONPATH}
    version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [[ $version != "$TARGET_PYTHON" ]]; then
        say "gpu_carry: unpacked, not checked: $PYTHON is Python $version, the packages are for $TARGET_PYTHON"
    else
        if ! error=$(PYTHONPATH=$pythonpath "$PYTHON" -c 'import tritonclient.grpc' 2>&1); then
            say "gpu_carry: tritonclient.grpc fails with this machine's grpcio/protobuf (${error##*$'\n'}): using the carried ones"
            unpack "$CARRY/grpc-fallback.tar.xz" "$dest/site"
        fi
        PYTHONPATH=$pythonpath "$PYTHON" - "$dest" >&2 <<'EOF' || die "the client's packages do not import (above)"
import sys

import captum.attr  # noqa: F401  (explain.Explainer; imports the machine's matplotlib)
import client  # noqa: F401  (tritonclient gRPC and HTTP, sync and asyncio, openpyxl)
import numpy
import pydicom  # noqa: F401
import tritonclient.grpc.aio  # noqa: F401
import tritonclient.http.aio  # noqa: F401
from serve import find_installation

binary = find_installation().binary
assert binary.is_relative_to(f"{sys.argv[1]}/server"), f"pytriton found elsewhere: {binary}"
assert not numpy.__file__.startswith(sys.argv[1]), f"the main process got the stubs' numpy {numpy.__version__}"
EOF
        # The server's checks: a server that cannot run here costs the served section only, not the run.
        if answer=$(check_server "$dest" "$version" "$pythonpath"); then
            say "gpu_carry: checked: the client imports; the stubs get numpy<2 and the project; the server's libraries resolve"
            ld_path=$answer # the folder of the machine's libpython the loader must be given, or nothing
        else
            say "gpu_carry: the bundled server cannot run here ($answer): the served section will say so"
            pythonpath=${pythonpath/":$dest/server"/}
        fi
    fi
    printf 'export PYTHONPATH=%q\n' "$pythonpath"
    printf 'export CT_TRIAGE_STUB_PYTHONPATH=%q\n' "$dest/stub-site"
    if [[ -n $ld_path ]]; then printf 'export LD_LIBRARY_PATH=%q\n' "$ld_path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; fi
}

# There: whether the unpacked server can run with this Python. Prints the folder the loader must be
# given for the machine's libpython (nothing when it finds it anyway) and succeeds, or prints what is
# wrong and fails.
check_server() {
    local dest=$1 version=$2 pythonpath=$3 stub_bin stub libdir ld_path='' elf name where missing=''
    # What the stubs will see, set up as the launcher sets it up for them (an isolated interpreter in an
    # environment of their own, CT_TRIAGE_STUB_PYTHONPATH first): numpy<2, the project, torch on it.
    rm -rf "$dest/stub-python"
    stub_bin=$(PYTHONPATH=$pythonpath "$PYTHON" -c 'import sys
from serve.launcher import prepare_stub_python
print(prepare_stub_python(sys.argv[1], [sys.argv[2]]))' "$dest/stub-python" "$dest/stub-site")
    if ! "$stub_bin/python3" -I - >&2 <<'EOF'; then
import importlib.util

import numpy
import preprocess  # noqa: F401  (ct_preprocess: the project, pydicom)

assert numpy.__version__.startswith("1."), f"the stubs get numpy {numpy.__version__}"
if importlib.util.find_spec("torch"):  # the machine's, for preprocessing on the device
    import torch

    torch.from_numpy(numpy.zeros(2))
EOF
        rm -rf "$dest/stub-python"
        printf "the stubs' packages do not import (above)"
        return 1
    fi
    rm -rf "$dest/stub-python"
    # The stub embeds the machine's Python: the loader must find its libpython, else we point it there.
    stub=$dest/server/pytriton/tritonserver/python_backend_stubs/$version/triton_python_backend_stub
    if ! command -v ldd >/dev/null; then
        printf "no ldd here: cannot check the server's libraries"
        return 1
    fi
    if [[ $(ldd "$stub") == *"libpython$version.so.1.0 => not found"* ]]; then
        for libdir in $("$PYTHON" -c 'import sys, sysconfig; print(sysconfig.get_config_var("LIBDIR") or "", sys.base_prefix + "/lib")'); do
            if [[ -z $ld_path && -f $libdir/libpython$version.so.1.0 ]]; then ld_path=$libdir; fi
        done
        if [[ -z $ld_path ]]; then
            printf "no libpython%s.so.1.0 for the server's stub: this Python has no shared library" "$version"
            return 1
        fi
    fi
    for elf in "$dest/server/pytriton/tritonserver/bin/tritonserver" "$dest/server/pytriton/tritonserver/backends/python/libtriton_python.so" "$stub"; do
        while read -r name where; do
            if [[ $where == not ]]; then missing+=" $name"; fi
        done < <(LD_LIBRARY_PATH=$ld_path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} ldd "$elf" | awk '$2 == "=>" { print $1, $3 }')
    done
    if [[ -n $missing ]]; then
        printf "the server would not load:%s" "$missing"
        return 1
    fi
    printf '%s' "$ld_path"
}

case ${1:-} in
"") build ;;
--server-only) server_tree "${2:?--server-only DIR}" ;;
--install) install "${2:?--install DEST}" ;;
*) die "usage: gpu_carry.sh [--server-only DIR | --install DEST]" ;;
esac
