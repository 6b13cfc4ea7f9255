"""Faults against a supervised server (its own, shared by this module): a Python-backend stub killed
mid-request, requests far over the limits, the server process killed.

Triton 2.51 neither restarts a dead stub nor marks its model unready, and copies a request of any size
into the shared memory of the stub it goes to before the model can refuse it; the launcher's watchdog
(`supervise=True`) reloads the model in both cases (a region past what serve.sizing gives that model),
and restarts a server that exited. Memory is compared with both ct_preprocess instances warm (each has
served a study), before and after.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from helpers import TEST_SIZE, TRIAGE_ONLY
from tritonclient.utils import InferenceServerException

from benchmarks.http_faults import form_typed_request
from client import TriageClient
from preprocess import phantom
from serve import ServerError, start_on_free_ports
from serve.metrics import scrape
from settings import METRICS, NAMES, SERVING

# the module's server: the instances a reload replaced have this long to go (healthy ones go in 2 to 4 s
# on a busy machine; the test that keeps a version waits this long for its restart)
DRAIN_TIMEOUT_S = 10
RSS_TOLERANCE = 0.10  # allocator caches and lazily loaded code move it by a few %; a leak of the payload is >100%
BATCH = [100_000, 1, TEST_SIZE, TEST_SIZE, TEST_SIZE]


@pytest.fixture(scope="module")
def server(triton_repository, tmp_path_factory):
    log_file = tmp_path_factory.mktemp("faults") / "tritonserver.log"
    server = start_on_free_ports(
        triton_repository, log_file=log_file, exit_timeout_s=2, drain_timeout_s=DRAIN_TIMEOUT_S, supervise=True, models=TRIAGE_ONLY
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def study() -> list[bytes]:
    return phantom.study_files(form="series")


@pytest.fixture(scope="module")
def answer(server, study) -> float:
    """The study's probability from the server before any fault."""
    result = classify(server, study)
    assert result.processing_status == "Success", result.error
    return result.probability_of_pathology


def classify(server, payload):
    with TriageClient(server.grpc_url, "grpc", timeout_s=120) as client:
        return client.classify(payload)


def warm(server, study) -> list[float]:
    """Two studies at once: both ct_preprocess instances serve one."""
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: classify(server, study), range(2)))
    assert all(r.processing_status == "Success" for r in results), [r.error for r in results]
    return [r.probability_of_pathology for r in results]


def recovery(server, count: int, limit_s: float = 180):
    """The watchdog's `count`-th recovery, once it has happened."""
    deadline = time.monotonic() + limit_s
    while len(server.recoveries) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(server.recoveries) >= count, f"no recovery within {limit_s} s:\n{server.log_tail()}"
    return server.recoveries[count - 1]


def settled(server, shm_bytes: int, stubs: int, limit_s: float = 60) -> int:
    """This server's /dev/shm pages once the instances a reload replaced are gone (their regions removed,
    their stubs exited: a stub keeps the pages of a removed region mapped until it exits)."""
    deadline = time.monotonic() + limit_s
    while (server.shm_bytes() != shm_bytes or len(server.stubs()) != stubs) and time.monotonic() < deadline:
        time.sleep(0.1)
    return server.shm_bytes()


def infer_classifier(server, body: bytes, headers: dict | None = None):
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/{NAMES.classifier}/infer", data=body, headers=headers or {})
    return urllib.request.urlopen(request, timeout=60)


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_requests_far_over_the_limits_are_refused_and_leave_memory_as_it_was(server, study, answer):
    assert warm(server, study) == pytest.approx([answer, answer], abs=1e-6)
    shm_before, rss_before, stubs = server.shm_bytes(), sum(server.resident_bytes().values()), len(server.stubs())
    done = len(server.recoveries)
    too_large = (METRICS.refused, (("reason", "InputTooLargeError"),))
    refused_before = scrape(server.metrics_url)[too_large]

    # 100,000 files: ct_preprocess refuses on the count, before copying one
    many = classify(server, [b"DICM"] * 100_000)
    assert many.processing_status == "Failure"
    assert many.error == f"in ensemble '{NAMES.triage}', the request holds 100000 files, more than the limit of 10000 per study"

    # a batch of 100,000 volumes declared with 4 bytes of data: Triton checks the batch size first
    refusal = "inference request batch-size must be <= 4 for 'ct_classifier'"
    header = json.dumps({"inputs": [{"name": NAMES.volume, "shape": BATCH, "datatype": "FP32", "parameters": {"binary_data_size": 4}}]})
    headers = {"Inference-Header-Content-Length": str(len(header))}
    with pytest.raises(urllib.error.HTTPError) as http:
        infer_classifier(server, header.encode() + bytes(4), headers)
    assert http.value.code == 400 and refusal in json.loads(http.value.read())["error"]
    volume = triton_grpc.InferInput(NAMES.volume, BATCH, "FP32")
    volume._raw_content = bytes(4)  # tritonclient checks shapes against data; a hostile client does not
    with triton_grpc.InferenceServerClient(server.grpc_url) as client, pytest.raises(InferenceServerException) as grpc:
        client.infer(NAMES.classifier, [volume])
    assert grpc.value.status() == "StatusCode.INVALID_ARGUMENT" and refusal in grpc.value.message()

    # 1 GiB in one element: Triton 2.51 copies it into a ct_preprocess region, the model refuses it on its size
    huge = classify(server, [bytes(2**30)])
    assert huge.processing_status == "Failure"
    assert huge.error == f"in ensemble '{NAMES.triage}', the request holds 1024 MiB of files, more than the limit of 600 MiB per study"
    assert classify(server, study).processing_status == "Success"  # the small study right after

    # ... and the watchdog reloads ct_preprocess, whose grown region held the gigabyte
    reload = recovery(server, done + 1)
    assert reload.ok and reload.action == f"reload {NAMES.preprocess}" and "grew to" in reload.reason, reload
    warm(server, study)
    assert scrape(server.metrics_url)[too_large] == refused_before + 2  # both refusals counted, across the reload
    assert settled(server, shm_before, stubs) == shm_before
    deadline = time.monotonic() + 30  # freed buffers go back as the server's threads release them
    while sum((rss_after := server.resident_bytes()).values()) > rss_before * (1 + RSS_TOLERANCE) and time.monotonic() < deadline:
        time.sleep(0.5)
    server_memory = [line for line in Path(f"/proc/{server.pid}/status").read_text().splitlines() if line.startswith("Rss")]
    assert sum(rss_after.values()) <= rss_before * (1 + RSS_TOLERANCE), (rss_before, rss_after, server_memory)  # new stubs may hold less
    assert len(server.recoveries) == done + 1  # one reload, nothing else


def test_a_huge_request_straight_to_ct_postprocess_gets_it_reloaded_at_its_own_limit(server, study, answer):
    """ct_postprocess's region is sized for its small tensors: a META as large as that whole region
    cannot fit in it, so the region grows past its limit though it stays far below ct_preprocess's."""
    limit = server.shm_region_limits[NAMES.postprocess]
    shm_before, stubs, done = server.shm_bytes(), len(server.stubs()), len(server.recoveries)
    probabilities = triton_grpc.InferInput(NAMES.probabilities, [1, 2], "FP32")
    probabilities.set_data_from_numpy(np.array([[0.3, 0.7]], np.float32))
    meta = triton_grpc.InferInput(NAMES.meta, [1], "BYTES")
    meta.set_data_from_numpy(np.array([bytes(limit)], dtype=np.object_))
    with triton_grpc.InferenceServerClient(server.grpc_url) as client, pytest.raises(InferenceServerException):
        client.infer(NAMES.postprocess, [probabilities, meta])  # not JSON: refused

    reload = recovery(server, done + 1)
    assert reload.ok and reload.action == f"reload {NAMES.postprocess}", reload
    assert reload.reason.startswith(f"the shared memory of {NAMES.postprocess}_0_0 grew to"), reload
    assert reload.reason.endswith(f"MiB, over the {limit >> 20} MiB {NAMES.postprocess} needs"), reload
    assert classify(server, study).probability_of_pathology == pytest.approx(answer, abs=1e-6)
    assert settled(server, shm_before, stubs) == shm_before
    assert len(server.recoveries) == done + 1


def test_a_stopped_stub_is_killed_and_its_model_reloaded(server, study, answer):
    """A stub stopped by SIGSTOP stays alive: Triton kept routing every other study to it, each failing
    after seconds, and nothing noticed."""
    # A stub of an instance an earlier reload replaced exits anyway (no reload follows): wait for those to go
    deadline = time.monotonic() + 60
    while len(stubs := [s for s in server.stubs() if s.model == NAMES.preprocess]) > SERVING.preprocess_instances:
        assert time.monotonic() < deadline, f"replaced ct_preprocess instances still running: {stubs}"
        time.sleep(0.1)
    stub = stubs[0]
    done = len(server.recoveries)
    os.kill(stub.pid, signal.SIGSTOP)
    try:
        reload = recovery(server, done + 1, limit_s=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stub.pid, signal.SIGCONT)  # never left stopped, whatever happened
    assert reload.ok and reload.action == f"reload {NAMES.preprocess}", reload
    assert reload.reason == f"the stub of {stub.instance} (pid {stub.pid}) died"
    assert f"the stub of {stub.instance} (pid {stub.pid}) is stopped (SIGSTOP): killing it" in server.log_file.read_text()
    assert warm(server, study) == pytest.approx([answer, answer], abs=1e-6)


def test_a_stub_killed_mid_request_fails_that_request_clearly_and_the_model_is_reloaded(server, study, answer):
    # JPEG 2000 slices: about half a second of decoding on two cores (uncompressed, the study took 40 ms,
    # over before the kill could land)
    long_study = phantom.study_files(form="series", slices=200, rows=256, columns=256, transfer_syntax="jpeg2000")
    stubs = [s for s in server.stubs() if s.model == NAMES.preprocess]
    idle = {s.pid: cpu_ticks(s.pid) for s in stubs}
    done = len(server.recoveries)

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(classify, server, long_study)
        deadline = time.monotonic() + 60
        busy = []
        while not busy and time.monotonic() < deadline:  # the instance that took the study is using the CPU
            busy = [s for s in stubs if cpu_ticks(s.pid) - idle[s.pid] >= 5]
            time.sleep(0.01)
        assert busy, "no ct_preprocess instance started on the study"
        os.kill(busy[0].pid, signal.SIGKILL)
        failed = pending.result()

    assert failed.processing_status == "Failure"
    assert failed.error == (
        f"a worker process of the server ({busy[0].instance}) died: the study was not processed; send it again once the server recovered"
    )
    reload = recovery(server, done + 1)
    assert reload.ok and reload.action == f"reload {NAMES.preprocess}", reload
    assert reload.reason == f"the stub of {busy[0].instance} (pid {busy[0].pid}) died"
    assert f"ct-triage watchdog: {reload.reason}: reload {NAMES.preprocess} done" in server.log_file.read_text()
    assert warm(server, study) == pytest.approx([answer, answer], abs=1e-6)  # both instances answer, correctly
    assert busy[0].pid not in {s.pid for s in server.stubs()}

    # Triton 2.51 never unloads the version whose stub died mid-request: its other stub (~260 MB) and
    # both regions stayed until the server exited. The watchdog restarts the server DRAIN_TIMEOUT_S after
    # the reload if so; either way, only the current instances are left.
    while time.time() < reload.at + DRAIN_TIMEOUT_S + 5:
        time.sleep(0.2)
    if "still hold their memory" in server.log_file.read_text():
        restart = recovery(server, done + 2)
        assert restart.ok and restart.action == "restart", restart
        assert restart.reason == (
            f"the {NAMES.preprocess} instances a reload replaced still hold their memory {DRAIN_TIMEOUT_S} s later"
            " (Triton keeps a model version whose stub died mid-request)"
        )
    preprocess = [s for s in server.stubs() if s.model == NAMES.preprocess]
    assert len(preprocess) == SERVING.preprocess_instances, preprocess
    assert sorted(server.leaked_shm()) == sorted(s.region for s in server.stubs())  # one region per live stub
    assert warm(server, study) == pytest.approx([answer, answer], abs=1e-6)


# Requests that kill Triton 2.51 itself, each by a bug of its own: the watchdog restarts it.
# Each is (model, body, HTTP headers, the server's exit status).
_KILLING_REQUESTS = {
    # the HTTP front end allocates a JSON `data` tensor by its declared shape before checking the batch
    # size: 100,000 x 64^3 FP32 (100 GB) aborts the server (SIGABRT)
    "json-shape": (
        NAMES.classifier,
        json.dumps({"inputs": [{"name": NAMES.volume, "shape": BATCH, "datatype": "FP32", "data": [0.0]}]}).encode(),
        {},
        -6,
    ),
    # classification asked of a BYTES output (META, the UIDs) divides by its element size, 0 (SIGFPE)
    "classification": (
        NAMES.postprocess,
        json.dumps(
            {
                "inputs": [
                    {"name": NAMES.probabilities, "shape": [1, 2], "datatype": "FP32", "data": [0.3, 0.7]},
                    {"name": NAMES.meta, "shape": [1], "datatype": "BYTES", "data": ["{}"]},
                ],
                "outputs": [{"name": NAMES.meta, "parameters": {"classification": 1}}],
            }
        ).encode(),
        {},
        -8,
    ),
    # Content-Type application/x-www-form-urlencoded (curl's default for --data-binary, urllib's for any
    # body) on a body of 4 MiB or more: the HTTP front end crashes (SIGSEGV; 2 MiB passes) whatever the model
    "form-body": (NAMES.triage, *form_typed_request(8), -11),
}


@pytest.mark.parametrize("kind", _KILLING_REQUESTS)
def test_a_request_that_kills_tritonserver_gets_it_restarted(server, study, answer, kind):
    """Any caller of the inference API can send these (documented in serve/README.md, "Faults")."""
    model, body, headers, code = _KILLING_REQUESTS[kind]
    done = len(server.recoveries)
    old = server.pid
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/{model}/infer", data=body, headers=headers)
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(request, timeout=60)
    restart = recovery(server, done + 1)
    assert restart.ok and restart.action == "restart" and restart.reason == f"tritonserver exited with code {code}", restart
    assert server.pid != old and server.is_running()
    assert classify(server, study).probability_of_pathology == pytest.approx(answer, abs=1e-6)
    assert f"ct-triage watchdog: tritonserver exited with code {code}: restart done" in server.log_file.read_text()


def test_a_log_file_that_can_no_longer_be_written_does_not_end_supervision(server, study, answer):
    """Its folder removed (a tmp cleaner, a rotation) or a full disk: the watchdog's note to it failed,
    the exception ended the watchdog thread, and the dead stub was never replaced. The module's server,
    after the tests that read its log."""
    done = len(server.recoveries)
    shutil.rmtree(server.log_file.parent)
    (victim,) = [s for s in server.stubs() if s.model == NAMES.postprocess]
    os.kill(victim.pid, signal.SIGKILL)
    reload = recovery(server, done + 1)
    assert reload.ok and reload.action == f"reload {NAMES.postprocess}", reload
    assert warm(server, study) == pytest.approx([answer, answer], abs=1e-6)


def test_a_log_file_that_cannot_be_written_is_one_line_before_anything_starts(triton_repository, tmp_path):
    (tmp_path / "a-file").write_text("")
    for path, reason in ((tmp_path, "Is a directory"), (tmp_path / "a-file" / "server.log", "File exists")):
        with pytest.raises(ServerError) as refused:
            start_on_free_ports(triton_repository, log_file=path, models=TRIAGE_ONLY)
        assert str(refused.value) == f"log file {path} cannot be written ({reason})"


def test_a_hung_server_is_restarted_and_stop_does_not_wait_on_the_watchdog(triton_repository, tmp_path, study):
    """A tritonserver that is alive but answers nothing (here SIGSTOPped) never exits, so only the
    health checks notice it. And stop() must not wait for a watchdog request to such a server, which
    lasts startup_timeout_s (a reload's config request here): the server is ended under it."""
    log_file = tmp_path / "server.log"
    startup_timeout_s = 150
    server = start_on_free_ports(
        triton_repository,
        log_file=log_file,
        exit_timeout_s=2,
        startup_timeout_s=startup_timeout_s,
        hang_timeout_s=4,
        supervise=True,
        models=TRIAGE_ONLY,
    )
    try:
        answer = classify(server, study).probability_of_pathology
        hung = server.pid
        os.kill(hung, signal.SIGSTOP)
        restart = recovery(server, 1, limit_s=60)
        assert restart.ok and restart.action == "restart", restart
        assert restart.reason == "tritonserver answered no health check for 4 s", restart
        assert server.pid != hung and not Path(f"/proc/{hung}").exists()  # killed, not left stopped
        assert classify(server, study).probability_of_pathology == pytest.approx(answer, abs=1e-6)

        # hung again, and a stub killed: the watchdog's reload waits on the server, and stop() comes
        os.kill(server.pid, signal.SIGSTOP)
        (victim,) = [s for s in server.stubs() if s.model == NAMES.postprocess]
        os.kill(victim.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while f"reloading {NAMES.postprocess}" not in log_file.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert f"reloading {NAMES.postprocess}" in log_file.read_text(), server.log_tail()
    finally:
        started = time.monotonic()
        server.stop()
        stopped_in = time.monotonic() - started
    assert stopped_in < startup_timeout_s / 2, stopped_in
    assert not server.is_running() and server.orphans() == [] and server.leaked_shm() == []
    assert len(server.recoveries) == 1  # the cut-short reload is not a failure, nor followed by a restart


def test_a_server_that_cannot_be_brought_back_is_given_up_with_its_reason(triton_repository, tmp_path):
    """Restarts that fail (here the repository broke while the server ran: a model no longer loads, so
    tritonserver exits during start-up) are not retried for ever: after 3 in a row the watchdog gives
    up, serving() turns False (`python -m serve` then exits 1), and nothing of the server is left."""
    repository = tmp_path / "repository"
    shutil.copytree(triton_repository, repository)
    # ct_postprocess alone: each start and each failed restart takes a second or two, not seven
    server = start_on_free_ports(repository, log_file=tmp_path / "server.log", exit_timeout_s=2, supervise=True, models=[NAMES.postprocess])
    try:
        (repository / NAMES.postprocess / "1" / "model.py").write_text("this is not Python\n")
        os.kill(server.pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while server.serving() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not server.serving(), server.log_tail()
        restarts = [(r.action, r.ok) for r in server.recoveries]
        assert restarts == [("restart", False)] * 3, server.recoveries
        assert server.recoveries[0].reason.startswith("tritonserver exited with code -9; "), server.recoveries[0]
        cause = f"failed to load {NAMES.postprocess} version 1: Internal: NameError: name 'this' is not defined"
        for failed in server.recoveries:  # Triton 2.51 exits with 1, or crashes on its way out (-6, -11)
            restart_failed = rf"; the restart failed \(tritonserver exited with code -?\d+ during start-up \({re.escape(cause)}\)\)$"
            assert re.search(restart_failed, failed.reason), failed
        assert server.orphans() == [] and server.leaked_shm() == []
    finally:
        server.stop()
