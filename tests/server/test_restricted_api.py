"""A server started with an admin key: Triton refuses its model-control, shared-memory, trace and
logging APIs to requests without the key, over HTTP and gRPC, while inference and health stay open;
the operating point still changes for a holder of the key, and the key reaches no log.

One private server for the module (the session one has no key), started as `python -m serve` does,
with CT_TRIAGE_ADMIN_KEY in its environment.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from helpers import TRIAGE_ONLY, discard
from tritonclient.utils import InferenceServerException

import client
from preprocess import phantom
from serve import TritonServer, process_tree, start_on_free_ports
from settings import ADMIN, NAMES, OPERATING_POINT

KEY = secrets.token_urlsafe(24)
WRONG = secrets.token_urlsafe(24)
REFUSED = {"http": "This API is restricted", "grpc": "This protocol is restricted"}
KEY_HEADERS = {"http": ADMIN.header, "grpc": ADMIN.grpc_metadata}


@pytest.fixture(scope="module")
def keyed_server(triton_repository, tmp_path_factory):
    log_file = tmp_path_factory.mktemp("restricted") / "tritonserver.log"
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv(ADMIN.key_env, KEY)  # as a deployment sets it: the launcher must not pass it on
        server = start_on_free_ports(triton_repository, log_file=log_file, exit_timeout_s=5, admin_key=KEY, models=TRIAGE_ONLY)
    try:
        yield server
    finally:
        discard(server)


@pytest.fixture(scope="module")
def study() -> list[bytes]:
    return phantom.study_files(form="series")


def _triton(server, protocol: str):
    if protocol == "http":
        return triton_http.InferenceServerClient(server.http_url)
    return triton_grpc.InferenceServerClient(server.grpc_url)


def _admin_calls(triton) -> dict:
    """One call per restricted API group (model-repository, trace, logging, shared-memory)."""
    return {
        "load": lambda headers: triton.load_model(NAMES.postprocess, headers=headers),
        "unload": lambda headers: triton.unload_model(NAMES.postprocess, headers=headers),
        "repository index": lambda headers: triton.get_model_repository_index(headers=headers),
        "trace settings": lambda headers: triton.update_trace_settings(settings={"trace_rate": "1"}, headers=headers),
        "log settings": lambda headers: triton.update_log_settings({"log_verbose_level": 1}, headers=headers),
        "shared-memory registration": lambda headers: triton.register_system_shared_memory("probe", "/probe", 16, headers=headers),
        "CUDA shared-memory status": lambda headers: triton.get_cuda_shared_memory_status(headers=headers),
    }


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_admin_apis_are_refused_without_the_right_key(keyed_server, protocol):
    attempts = {
        "no key": None,
        "a wrong key": {KEY_HEADERS[protocol]: WRONG},
        # over gRPC the plain header name is not enough: Triton expects its prefixed metadata key
        "the key under another name": {(ADMIN.header if protocol == "grpc" else "admin-key"): KEY},
    }
    triton = _triton(keyed_server, protocol)
    accepted = []
    try:
        for name, call in _admin_calls(triton).items():
            for attempt, headers in attempts.items():
                try:
                    call(headers)
                except InferenceServerException as error:
                    assert REFUSED[protocol] in error.message(), (name, attempt, error)
                    assert KEY not in error.message() and WRONG not in error.message()
                else:
                    accepted.append(f"{name} with {attempt}")
        assert accepted == []
        assert triton.is_model_ready(NAMES.postprocess)  # the unload never happened
    finally:
        triton.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_key_opens_them(keyed_server, protocol):
    triton = _triton(keyed_server, protocol)
    headers = {KEY_HEADERS[protocol]: KEY}
    try:
        triton.load_model(NAMES.postprocess, headers=headers)  # the running config, reloaded in place
        assert triton.is_model_ready(NAMES.postprocess)
        assert triton.get_log_settings(headers=headers)
        triton.get_system_shared_memory_status(headers=headers)
    finally:
        triton.close()


def test_inference_health_and_statistics_need_no_key(keyed_server, study):
    for protocol, url in (("grpc", keyed_server.grpc_url), ("http", keyed_server.http_url)):
        with client.TriageClient(url, protocol) as triage:
            triage.check_ready()
            result = triage.classify(study)
            assert result.ok, (protocol, result.error)
            assert result.meta["threshold"] == OPERATING_POINT.threshold
            assert triage.triton.get_inference_statistics(NAMES.triage)


def test_a_shared_memory_client_without_the_key_gets_one_clear_failure(keyed_server, study):
    """Registration is refused, so the study is a Failure naming the restriction, and its region is freed."""
    with client.TriageClient(keyed_server.http_url, "http", shared_memory=True) as triage:
        result = triage.classify(study)
    assert result.processing_status == client.FAILURE
    assert REFUSED["http"] in result.error and ADMIN.header in result.error
    assert not list(Path("/dev/shm").glob(f"ct_triage_client_{os.getpid()}_*"))


def test_set_threshold_needs_the_key(keyed_server, study):
    for admin_key, which in ((None, "without the admin key"), (WRONG, "with this admin key")):
        with pytest.raises(PermissionError) as refusal:
            client.set_threshold(keyed_server.http_url, 1.0, admin_key=admin_key)
        assert str(refusal.value) == f"the server refuses model-repository changes {which} ({ADMIN.key_env})"
    try:
        config = client.set_threshold(keyed_server.http_url, 1.0, admin_key=KEY)
        assert config["parameters"]["threshold"]["string_value"] == "1.0"
        with client.TriageClient(keyed_server.grpc_url, "grpc") as triage:
            strict = triage.classify(study)
        assert strict.ok, strict.error
        assert strict.meta["threshold"] == 1.0 and strict.pathology == 0
    finally:
        client.set_threshold(keyed_server.http_url, OPERATING_POINT.threshold, admin_key=KEY)


def _set_threshold_cli(server, value: str, key: str | None) -> subprocess.CompletedProcess:
    environment = {name: text for name, text in os.environ.items() if name != ADMIN.key_env}
    if key is not None:
        environment[ADMIN.key_env] = key
    command = [sys.executable, "-m", "client", "set-threshold", value, "--url", server.http_url]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=60)


def test_set_threshold_cli_reads_the_key_from_the_environment_and_a_plain_reload_keeps_the_override(keyed_server, study):
    refused = _set_threshold_cli(keyed_server, "1", None)
    assert (refused.returncode, refused.stdout) == (2, "")
    assert refused.stderr == f"error: the server refuses model-repository changes without the admin key ({ADMIN.key_env})\n"
    try:
        done = _set_threshold_cli(keyed_server, "1", KEY)
        assert done.returncode == 0 and json.loads(done.stdout) == {"model": NAMES.postprocess, "threshold": 1.0}, done.stderr
        # a load without a config, as after editing config.pbtxt, still answers with the override: Triton
        # reuses the config it was last given until the server restarts (what serve/README.md says)
        with triton_http.InferenceServerClient(keyed_server.http_url) as triton:
            triton.load_model(NAMES.postprocess, headers={ADMIN.header: KEY})
        with client.TriageClient(keyed_server.grpc_url, "grpc") as triage:
            assert triage.classify(study).meta["threshold"] == 1.0
    finally:
        back = _set_threshold_cli(keyed_server, str(OPERATING_POINT.threshold), KEY)
    assert back.returncode == 0 and json.loads(back.stdout)["threshold"] == OPERATING_POINT.threshold, back.stderr


def test_the_key_reaches_neither_the_log_nor_the_models(keyed_server):
    """Runs after the others: the log holds their refusals and loads."""
    log = keyed_server.log_file.read_text(errors="replace")
    assert "successfully loaded" in log and KEY not in log and WRONG not in log
    stubs = process_tree(keyed_server.pid) - {keyed_server.pid}
    assert stubs
    for pid in stubs:
        assert KEY.encode() not in Path(f"/proc/{pid}/environ").read_bytes()


@pytest.mark.parametrize("key", ["", f" {KEY}", f"{KEY}\n", KEY * 100], ids=["empty", "padded", "two lines", "100 x"])
def test_an_unusable_key_is_refused_without_being_repeated(tmp_path, key):
    """By the launcher and by set_threshold alike (one rule): a 3 kB key reached Triton, whose HTTP front
    end drops such headers, and an unsendable header's own error quoted the key."""
    with pytest.raises(ValueError) as refusal:
        TritonServer(tmp_path, admin_key=key)
    with pytest.raises(ValueError) as sent:
        client.set_threshold("localhost:1", 0.3, admin_key=key)
    assert KEY not in str(refusal.value) + str(sent.value) and str(refusal.value) == str(sent.value)


@pytest.mark.parametrize("key", ["", f"{KEY}\n"], ids=["empty", "two lines"])
def test_python_m_serve_refuses_an_unusable_key_before_starting(tmp_path, key):
    """Set but empty (a missing Secret) or not carriable: one line that does not repeat it, exit 2, never served open."""
    done = subprocess.run(
        [sys.executable, "-m", "serve", "--repository", str(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, ADMIN.key_env: key},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: {ADMIN.key_env}: ") and len(done.stderr.splitlines()) == 1
    assert KEY not in done.stdout + done.stderr
