"""deploy/verify.py against endpoints that are not a working Triton, without a server: a hung one
(accepts connections, never answers), another service's port, a tool failing with several lines of
output. Each check reports in one line, and nothing waits out timeouts after `ready` has failed."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time

import pytest
from helpers import ROOT, answering, black_hole


def _verify_module():
    spec = importlib.util.spec_from_file_location("deploy_verify", ROOT / "deploy" / "verify.py")
    verify = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verify)
    return verify


def test_a_server_that_never_answers_fails_ready_and_the_other_checks_are_skipped():
    """verify.sh against ports that accept and never answer: ready fails on its own short timeout, the
    others are SKIP with the reason instead of each waiting out its own. The subprocess timeout only
    guards against a hang."""
    verify = _verify_module()
    with black_hole() as http, black_hole() as grpc, black_hole() as metrics:
        command = ["bash", "deploy/verify.sh", "--local", "--http", http, "--grpc", grpc, "--metrics", metrics]
        done = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=60)
    lines = done.stdout.splitlines()
    assert done.returncode == 1 and len(lines) == 6, done.stdout + done.stderr[-3000:]
    assert re.fullmatch(
        rf"FAIL  ready: http {http}: Triton server at {http} \(http\) is not usable: no answer within the request timeout "
        rf"\({verify.READY_TIMEOUT_S} s\)",
        lines[0],
    ), lines[0]
    assert lines[1:5] == [f"SKIP  {name}: not run: the server did not answer ready" for name in ("studies", "parity", "sweep", "metrics")]
    assert lines[5] == "verify: 0/1 checks passed; FAILED: ready; SKIPPED: studies, parity, sweep, metrics"


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.0 404 File not found\r\nContent-Type: text/html\r\n\r\n<html>Error response</html>",  # python -m http.server
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n# HELP nv_inference_request_success Number\n",  # Triton's metrics port
    ],
    ids=["web-server", "metrics-port"],
)
def test_ready_at_a_port_that_answers_but_not_as_triton_fails_at_once(monkeypatch, reply):
    """Waiting cannot make another service Triton: one line at the first answer, not READY_WAIT_S of retries."""
    verify = _verify_module()
    monkeypatch.setattr(verify, "READY_WAIT_S", 3)
    http, listener = answering(reply)
    started = time.monotonic()
    try:
        with pytest.raises(AssertionError) as failed:
            verify._ready(http, "127.0.0.1:1")
    finally:
        listener.close()
    assert time.monotonic() - started < 2
    not_triton = "it answers, but not with Triton's server metadata: is it another port, such as Triton's metrics port?"
    assert str(failed.value) == f"http {http}: Triton server at {http} (http) is not usable: {not_triton}"


def test_ready_waits_for_a_server_still_starting(monkeypatch):
    """A proxy's 503 while Triton starts behind it (as a refused connection) is waited for, READY_WAIT_S at most."""
    verify = _verify_module()
    monkeypatch.setattr(verify, "READY_WAIT_S", 1)
    monkeypatch.setattr(verify.time, "sleep", lambda seconds: None)
    http, listener = answering(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/html\r\n\r\n<html>starting</html>")
    started = time.monotonic()
    try:
        with pytest.raises(AssertionError) as failed:
            verify._ready(http, "127.0.0.1:1")
    finally:
        listener.close()
    assert time.monotonic() - started >= 1
    assert str(failed.value).startswith(f"http {http}: Triton server at {http} (http) is not usable: 503: "), failed.value


def test_parity_against_a_port_that_is_not_tritons_http_says_what_it_answered(tmp_path):
    """--http at Triton's metrics port, which answers every path with its metrics: one line naming the
    answer, not a JSONDecodeError."""
    verify = _verify_module()
    reply = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n# HELP nv_inference_request_success Number of successful requests\n"
    http, listener = answering(reply)
    try:
        with pytest.raises(AssertionError) as failed:
            verify._parity(http, tmp_path, tmp_path, {"target": "cpu", "precision": "fp32"}, 1)
    finally:
        listener.close()
    assert str(failed.value) == (
        f"{http} answered ct_classifier's config with b'# HELP nv_inference_request_success Number of successful req', "
        "not JSON: is it Triton's HTTP port?"
    )


def test_a_failure_with_several_lines_of_output_is_reported_on_one_line(tmp_path, monkeypatch, capsys):
    """perf_analyzer's error carries its output's tail: the sweep's FAIL line holds all of it, on one line."""
    from benchmarks import perf_analyzer

    verify = _verify_module()

    def fails(model, url, protocol, *args, **kwargs):
        raise perf_analyzer.PerfAnalyzerError(
            f"perf_analyzer failed on {model} ({protocol}, concurrency 1, exit 99):\n"
            f"error: failed to get model metadata: failed to connect to all addresses\n"
        )

    monkeypatch.setattr(perf_analyzer, "installed", lambda: True)
    monkeypatch.setattr(perf_analyzer, "run", fails)
    results = []
    verify.check(results, "sweep", lambda: verify._sweep("localhost:1", tmp_path))
    assert capsys.readouterr().out.splitlines() == [
        "FAIL  sweep: PerfAnalyzerError: perf_analyzer failed on ct_triage (grpc, concurrency 1, exit 99): "
        "error: failed to get model metadata: failed to connect to all addresses"
    ]
