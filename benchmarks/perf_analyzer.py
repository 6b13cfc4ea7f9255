"""Triton's own load generator, perf_analyzer, installed next to the project and driven from Python.

`python -m benchmarks.perf_analyzer install` puts the binary into the virtual environment: it comes
from the `tritonclient==2.51.0` wheel (the release of the bundled server; newer wheels no longer ship
it), taken out of the wheel without installing that wheel's Python package (which would pin numpy<2
and protobuf<5 over the project's own), with the CUDA runtime library it links against (PyPI
`nvidia-cuda-runtime-cu12`; no GPU is needed) and Debian's `libb64-0d` (apt-get, as root).

`input_data(payload)` writes a study as perf_analyzer's `--input-data` JSON; `run(...)` runs one
sweep and returns its CSV rows (client and server-side latencies per concurrency level).
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks import option_types
from settings import NAMES

TRITONCLIENT_WHEEL = "tritonclient==2.51.0"
CUDA_RUNTIME = "nvidia-cuda-runtime-cu12==12.9.79"
HOME = Path(sys.prefix) / "perf_analyzer"  # inside the virtual environment: removed with it
BINARY = HOME / "bin" / "perf_analyzer"
CUDA_LIBRARIES = HOME / "cuda" / "nvidia" / "cuda_runtime" / "lib"


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer is missing, or a run failed; the message carries its output's tail."""


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(CUDA_LIBRARIES), env.get("LD_LIBRARY_PATH")) if p)
    return env


def installed() -> bool:
    if not BINARY.is_file():
        return False
    done = subprocess.run([str(BINARY), "--version"], env=environment(), capture_output=True, text=True, timeout=30)
    return done.returncode == 0


def install() -> Path:
    """Install the binary and what it links against; returns its path. Idempotent."""
    if installed():
        return BINARY
    if shutil.which("ldconfig") and b"libb64.so.0d" not in subprocess.run(["ldconfig", "-p"], capture_output=True).stdout:
        if os.geteuid() != 0:
            raise PerfAnalyzerError("perf_analyzer needs Debian's libb64-0d: run `apt-get install libb64-0d` as root")
        print("perf_analyzer: apt-get install libb64-0d", file=sys.stderr)
        apt = ["apt-get", "install", "-y", "-q", "libb64-0d"]
        if subprocess.run(apt, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=False)
            subprocess.run(apt, capture_output=True, check=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    with tempfile.TemporaryDirectory() as download:
        print(f"perf_analyzer: the binary from the {TRITONCLIENT_WHEEL} wheel (its Python package is not installed)", file=sys.stderr)
        subprocess.run([*pip, "download", "--no-deps", "-d", download, TRITONCLIENT_WHEEL], check=True)
        (wheel,) = Path(download).glob("tritonclient-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            (member,) = [name for name in archive.namelist() if name.endswith("/bin/perf_analyzer")]
            BINARY.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, open(BINARY, "wb") as target:
                shutil.copyfileobj(source, target)
    BINARY.chmod(0o755)
    print(f"perf_analyzer: libcudart.so.12 from {CUDA_RUNTIME} (no GPU needed)", file=sys.stderr)
    subprocess.run([*pip, "install", "--no-deps", "--upgrade", "--target", str(HOME / "cuda"), CUDA_RUNTIME], check=True)
    if not installed():
        raise PerfAnalyzerError(f"{BINARY} was installed but does not run")
    return BINARY


def encode_element(element: bytes) -> bytes:
    """One BYTES element as Triton serialises it: a 4-byte little-endian length, then the bytes."""
    return struct.pack("<I", len(element)) + element


def input_data(payload: Sequence[bytes]) -> dict:
    """perf_analyzer's --input-data JSON for the DICOM tensor: all elements, base64 of their serialisation."""
    content = base64.b64encode(b"".join(encode_element(element) for element in payload)).decode("ascii")
    return {"data": [{NAMES.dicom: {"content": {"b64": content}, "shape": [len(payload)]}}]}


def payload_of(data: dict) -> list[bytes]:
    """The study's elements back from an input-data JSON (what perf_analyzer will send)."""
    entry = data["data"][0][NAMES.dicom]
    raw = base64.b64decode(entry["content"]["b64"])
    elements, position = [], 0
    while position < len(raw):
        (length,) = struct.unpack_from("<I", raw, position)
        elements.append(raw[position + 4 : position + 4 + length])
        position += 4 + length
    if len(elements) != entry["shape"][0]:
        raise ValueError(f"input data holds {len(elements)} elements, its shape says {entry['shape'][0]}")
    return elements


def run(
    model: str,
    url: str,
    protocol: str,
    concurrency: int,
    csv_path: Path,
    *,
    input_json: Path | None = None,
    shared_memory: bool = False,
    metrics_url: str | None = None,
    requests: int = 16,
    timeout_s: float = 600,
) -> dict:
    """perf_analyzer at one concurrency level, for exactly `requests` requests (`--request-count`:
    bounded in time, and no stability loop to fail on a shared machine's noise). Its verbose CSV stays
    at csv_path (its console report, which breaks an ensemble down by composing model, beside it as
    .log); returns the CSV's row and `throughput`, the requests over the time from the first send to
    the last answer: perf_analyzer's own Inferences/Second divides by whole seconds of its
    measurement window under --request-count, so it is not a throughput to report."""
    if not installed():
        raise PerfAnalyzerError(f"perf_analyzer is not installed: run `python -m benchmarks.perf_analyzer install` ({BINARY})")
    profile = csv_path.with_suffix(".profile.json")
    command = [
        str(BINARY), "-m", model, "-u", url, "-i", protocol, "--async",
        "--concurrency-range", f"{concurrency}:{concurrency}", "--request-count", str(requests),
        "-f", str(csv_path), "--verbose-csv", "--profile-export-file", str(profile),
        "--input-data", str(input_json) if input_json else "zero",  # random bytes hold NaN: ct_classifier refuses them
    ]  # fmt: skip
    if shared_memory:
        command += ["--shared-memory", "system", "--output-shared-memory-size", str(1 << 20)]
    if metrics_url:
        command += ["--collect-metrics", "--metrics-url", metrics_url, "--metrics-interval", "1000"]
    try:
        done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=timeout_s)
        csv_path.with_suffix(".log").write_text(done.stdout + done.stderr)
        if done.returncode != 0 or not csv_path.is_file() or not profile.is_file():
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            what = f"{model} ({protocol}, concurrency {concurrency}, exit {done.returncode})"
            raise PerfAnalyzerError(f"perf_analyzer failed on {what}:\n{tail}")
        measured = throughput(profile)
    finally:
        profile.unlink(missing_ok=True)  # every request's inputs: 16 studies are 90 MB
    with open(csv_path, newline="") as stream:
        (row,) = list(csv.DictReader(stream))
    row = {key: _number(value) for key, value in row.items() if key}
    return {**row, **measured}


def throughput(profile: Path) -> dict:
    """From perf_analyzer's --profile-export-file (every request's send and response timestamps):
    the requests, the seconds from the first send to the last response, and their ratio."""
    text = profile.read_bytes().decode("latin-1")  # the requests' inputs are written as raw bytes, not UTF-8
    (experiment,) = json.loads(text)["experiments"]
    if not experiment["requests"] or not all(request["response_timestamps"] for request in experiment["requests"]):
        raise PerfAnalyzerError(f"{profile.name}: a request without a response")
    sent = [request["timestamp"] for request in experiment["requests"]]
    answered = [request["response_timestamps"][-1] for request in experiment["requests"]]
    elapsed_s = (max(answered) - min(sent)) / 1e9
    return {"requests": len(sent), "elapsed_s": round(elapsed_s, 4), "throughput": round(len(sent) / elapsed_s, 4)}


def _number(value: str):
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value


@option_types.entry_point
def main(argv: list[str] | None = None) -> int:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.perf_analyzer",
        description=__doc__.splitlines()[0],
        formatter_class=formatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("install", help="install perf_analyzer into the virtual environment", formatter_class=formatter)
    commands.add_parser("path", help="print the binary's path and the LD_LIBRARY_PATH it needs", formatter_class=formatter)
    args = parser.parse_args(argv)
    if args.command == "install":
        try:
            print(install())
        except (PerfAnalyzerError, subprocess.SubprocessError, OSError) as error:  # a failed pip or apt-get, a read-only or full disk
            print(f"error: {error}", file=sys.stderr)
            return 2
    else:
        print(json.dumps({"binary": str(BINARY), "LD_LIBRARY_PATH": str(CUDA_LIBRARIES), "installed": installed()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
