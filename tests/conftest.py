"""Session fixtures shared by the serving and client tests: one real Triton server per pytest run.

`triton_repository` exports a complete repository (demo weights, CPU target) at a small S so the
suite stays fast; `triton_server` runs the bundled tritonserver on it on free ports and stops it
at the end of the session.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from settings import NAMES

# Small S for speed: the network is fully convolutional, so every code path is the same as at 256.
TEST_SIZE = 64
ROOT = Path(__file__).resolve().parents[1]


def classifier_stats(server) -> dict:
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{NAMES.classifier}/stats", timeout=10) as r:
        return json.loads(r.read())["model_stats"][0]


def settled_classifier_stats(server, quiet_s: float = 3.0, limit_s: float = 120.0) -> dict:
    """The classifier's statistics once nothing has reached it for quiet_s. Studies that earlier
    tests abandoned (a client interrupted mid-run) still finish on the shared server, and Triton
    updates the counts just after answering: both would otherwise leak into a test's window."""
    last, since = classifier_stats(server), time.monotonic()
    deadline = since + limit_s
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = classifier_stats(server)
        if now.get("inference_count") != last.get("inference_count"):
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now
    raise AssertionError(f"the classifier did not go idle within {limit_s} s")


def run_module(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m module args` from the project root, as a user runs the CLIs (text output captured)."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def triton_repository(tmp_path_factory) -> Path:
    import export

    out = tmp_path_factory.mktemp("model_repository")
    export.write_repository(out, target="cpu", size=TEST_SIZE, demo_weights=True)
    return out


@pytest.fixture(scope="session")
def triton_server(triton_repository, tmp_path_factory):
    from serve import ServerError, TritonServer, free_ports

    log_dir = tmp_path_factory.mktemp("tritonserver")
    last_error = None
    for attempt in range(3):  # free ports can be taken by someone else before the server binds them
        http_port, grpc_port, metrics_port = free_ports(3)
        server = TritonServer(
            triton_repository,
            http_port=http_port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            log_file=log_dir / f"tritonserver-{attempt}.log",
            exit_timeout_s=5,  # tests close their clients; do not wait 30 s for stray keep-alive connections
        )
        try:
            server.start()
            break
        except ServerError as error:
            if "in use" not in str(error).lower():
                raise
            last_error = error
    else:
        raise last_error
    try:
        yield server
    finally:
        server.stop()
