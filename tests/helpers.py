"""Helpers shared by the library and server tests (importable as `helpers`: pytest's `pythonpath`)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom

from settings import NAMES

ROOT = Path(__file__).resolve().parents[1]
# Small S for the server tests: the network is fully convolutional, so every code path is the one of S=256.
TEST_SIZE = 64
TRIAGE_ONLY = (NAMES.triage,)  # the models a site that never asks for explanations loads (TritonServer(models=...))


def served_configs(destination: Path, preprocess_device: str, preprocess_instances: int) -> Path:
    """The committed model_repository/'s configs (no weights: the configs are what the launcher reads),
    with ct_preprocess as `python -m export --preprocess-device D --preprocess-instances N` renders it:
    the repository a deployment file's launcher serves, for the flags it would give Triton."""
    from google.protobuf import text_format

    from export import parse_config

    shutil.copytree(ROOT / "model_repository", destination, ignore=shutil.ignore_patterns("1"))
    path = destination / NAMES.preprocess / "config.pbtxt"
    config = parse_config(path.read_text(), str(path))
    config.parameters["device"].string_value = preprocess_device
    config.instance_group[0].count = preprocess_instances
    path.write_text(text_format.MessageToString(config))
    return destination


def run_module(module: str, *args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m module args` as a user runs the CLIs (text output captured), from `cwd` (default the
    project root)."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout)


def discard(server) -> None:
    """Stop a server whose shutdown the test does not check: SIGKILL of its process group (stubs
    included), as a crash would, then `stop()` removes what it left (shared memory, work folder).
    Triton's graceful stop unloads the stubs one by one at about a second each: 5 s a server, over a
    minute a suite. Graceful stops are tested where they matter (test_serving_lifecycle, the CLI)."""
    if server.pid is not None:
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    server.stop()


def packaged_file(name: str) -> Path:
    """A test file shipped by pydicom or pydicom-data, found on disk (get_testdata_files may hit the network)."""
    import data_store
    import pydicom.data

    for folder in (Path(pydicom.data.__file__).parent / "test_files", Path(data_store.__file__).parent / "data"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(name)


def edit(files: list[bytes], change: Callable[[pydicom.Dataset, int], None]) -> list[bytes]:
    """Re-encode each file after change(dataset, index): a phantom with one defect."""
    out = []
    for k, data in enumerate(files):
        ds = pydicom.dcmread(io.BytesIO(data))
        change(ds, k)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def position(ds: pydicom.Dataset) -> float:
    return float(ds.ImagePositionPatient[2])


def bytes_under(folder: Path) -> int:
    """What the files under `folder` hold: a benchmark's scratch folder must be back near 0."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def model_stats(server, model: str) -> dict:
    """Triton's statistics of one model (its only version)."""
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/stats", timeout=10) as response:
        return json.loads(response.read())["model_stats"][0]


def counted_stats(server, model: str, inferences: int, limit_s: float = 30.0) -> dict:
    """A model's statistics once they count at least `inferences`: Triton updates them just after
    answering, so a client can see its answers before the counts."""
    deadline = time.monotonic() + limit_s
    while True:
        stats = model_stats(server, model)
        if int(stats.get("inference_count", 0)) >= inferences or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def report_row(path: str, status: str = "Success", probability: float | None = 0.25, threshold: float | None = 0.5) -> dict:
    """A report row as the client writes it, for the report and journal tests: a Success row carries
    the threshold its decision was taken at."""
    ok = status == "Success"
    return {
        "path_to_study": path,
        "study_uid": "1.2.3" if ok else None,
        "series_uid": "1.2.3.4" if ok else None,
        "probability_of_pathology": probability if ok else None,
        "pathology": 0 if ok else None,
        "processing_status": status,
        "time_of_processing": 1.5,
        "error": None if ok else "bad study",
        "model": "demo",
        "threshold": threshold if ok else None,
    }


@contextlib.contextmanager
def black_hole() -> Iterator[str]:
    """HOST:PORT of a socket that accepts every connection and never answers (a hung server)."""
    listener = socket.create_server(("127.0.0.1", 0))
    held = []

    def hold() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:  # the listener closed: the test is over
                return

    threading.Thread(target=hold, daemon=True).start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        for connection in held:
            connection.close()


def answering(reply: bytes, received: list[bytes] | None = None) -> tuple[str, socket.socket]:
    """HOST:PORT of a local socket that answers each connection with `reply` (b"": nothing) and closes
    it, and its listener (close it when done): a port that is not what the caller thinks (gRPC's, a web
    page, a server gone mid-request). What each connection sent is appended to `received`."""
    listener = socket.create_server(("127.0.0.1", 0))

    def answer_each():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # the listener closed: the test is over
                return
            with connection:
                request = connection.recv(65536)
                if received is not None:
                    received.append(request)
                connection.sendall(reply)

    threading.Thread(target=answer_each, daemon=True).start()
    return f"127.0.0.1:{listener.getsockname()[1]}", listener
