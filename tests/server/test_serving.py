"""The serving path against the real tritonserver (session fixture), over HTTP and gRPC.

Every expectation is computed independently where it can be: the offline path (preprocess +
ONNX Runtime on the FP32 ONNX graph export kept beside the served IR) for probabilities, the preprocess package for error messages.
"""

from __future__ import annotations

import io
import json
import queue
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pydicom
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from helpers import TEST_SIZE, packaged_file
from tritonclient.utils import InferenceServerException

import preprocess
from client import set_threshold
from export import DEMO_PROVENANCE
from preprocess import phantom
from serve.metrics import scrape
from settings import METRICS, NAMES, OPERATING_POINT, SERVING

PROTOCOLS = ("http", "grpc")
MODULES = {"http": triton_http, "grpc": triton_grpc}
# What each protocol reports for a bad study (INVALID_ARG), a request that waited too long, and an internal fault.
INVALID = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}
TIMED_OUT = {"http": "503", "grpc": "StatusCode.UNAVAILABLE"}
INTERNAL = {"http": "500", "grpc": "StatusCode.INTERNAL"}


CLIENT_DEADLINE_S = 120  # a test fails, never hangs, if the server stops answering


def connect(server, protocol):
    module = MODULES[protocol]
    if protocol == "http":
        return module, module.InferenceServerClient(server.http_url, network_timeout=CLIENT_DEADLINE_S)
    return module, module.InferenceServerClient(server.grpc_url)


def infer(client, protocol, model, inputs, **kwargs):
    if protocol == "grpc":
        kwargs["client_timeout"] = CLIENT_DEADLINE_S
    return client.infer(model, inputs, **kwargs)


def dicom_input(module, payload):
    tensor = module.InferInput(NAMES.dicom, [len(payload)], "BYTES")
    # np.object_, not np.bytes_: the latter silently drops trailing NUL bytes of DICOM files.
    tensor.set_data_from_numpy(np.array(list(payload), dtype=np.object_).reshape(len(payload)))
    return tensor


def triage(server, protocol, payload, **kwargs) -> dict:
    """One ct_triage request; returns its outputs decoded (META parsed)."""
    module, client = connect(server, protocol)
    try:
        result = infer(client, protocol, NAMES.triage, [dicom_input(module, payload)], **kwargs)
    finally:
        client.close()
    return {
        "probability": float(result.as_numpy(NAMES.probability)[0]),
        "pathology": int(result.as_numpy(NAMES.pathology)[0]),
        "study_uid": result.as_numpy(NAMES.study_uid)[0].decode(),
        "series_uid": result.as_numpy(NAMES.series_uid)[0].decode(),
        "meta": json.loads(result.as_numpy(NAMES.meta)[0]),
    }


@pytest.fixture(scope="module")
def study_paths(tmp_path_factory) -> dict[str, Path]:
    """The same phantom volume as a folder of files, a ZIP archive and one multi-frame file."""
    root = tmp_path_factory.mktemp("phantom")
    return {form: phantom.write_study(root / form, form=form) for form in ("series", "zip", "multiframe")}


@pytest.fixture(scope="module")
def good_payload(study_paths) -> list[bytes]:
    return preprocess.read_study(study_paths["zip"])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_folder_zip_and_multiframe_give_the_same_result(triton_server, study_paths, protocol):
    results = {form: triage(triton_server, protocol, preprocess.read_study(p)) for form, p in study_paths.items()}
    reference = results["series"]
    assert 0.0 <= reference["probability"] <= 1.0
    for form, result in results.items():
        assert result["probability"] == pytest.approx(reference["probability"], abs=1e-6), form
        assert result["study_uid"] == reference["study_uid"]
        assert result["pathology"] == int(result["probability"] >= OPERATING_POINT.threshold)


def test_probability_equals_the_offline_path(triton_server, triton_repository, study_paths):
    payload = preprocess.read_study(study_paths["series"])
    study = preprocess.preprocess_study(payload, size=TEST_SIZE, mode="fast")
    graph = triton_repository.with_name(triton_repository.name + ".artifacts") / "model.onnx"
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run([NAMES.probabilities], {NAMES.volume: study.volume})
    for protocol in PROTOCOLS:
        served = triage(triton_server, protocol, payload)
        assert served["probability"] == pytest.approx(float(probabilities[0, 1]), abs=1e-5)
        assert served["study_uid"] == study.study_uid and served["series_uid"] == study.series_uid


def test_metadata_carries_series_choice_timings_operating_point_and_provenance(triton_server, good_payload):
    result = triage(triton_server, "grpc", good_payload)
    meta = result["meta"]
    assert meta["study_uid"] == result["study_uid"]
    assert meta["series_uid"] == result["series_uid"] == meta["series_selection"]["chosen"]
    assert meta["series_selection"]["reason"]
    assert meta["size"] == TEST_SIZE and meta["mode"] == "fast"
    offline = preprocess.preprocess_study(good_payload, size=TEST_SIZE).meta
    for key in ("crop_box", "output_to_original", "series_selection", "original_shape"):
        assert meta[key] == offline[key], key
    assert meta["timings_s"]["total"] > 0
    assert meta["served_by"]["instance"].startswith(NAMES.preprocess) and meta["served_by"]["threads"] >= 1
    assert meta["threshold"] == OPERATING_POINT.threshold
    provenance = meta["provenance"]
    assert isinstance(provenance, dict), provenance  # export writes JSON; a plain string means it was mangled
    assert provenance["checkpoint"] == DEMO_PROVENANCE  # demo weights must say so in every answer
    assert provenance["size"] == TEST_SIZE


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_labels_through_the_classification_extension(triton_server, protocol):
    module, client = connect(triton_server, protocol)
    volume = module.InferInput(NAMES.volume, [1, 1, TEST_SIZE, TEST_SIZE, TEST_SIZE], "FP32")
    volume.set_data_from_numpy(np.zeros((1, 1, TEST_SIZE, TEST_SIZE, TEST_SIZE), dtype=np.float32))
    try:
        result = infer(
            client,
            protocol,
            NAMES.classifier,
            [volume],
            outputs=[module.InferRequestedOutput(NAMES.probabilities, class_count=2)],
        )
    finally:
        client.close()
    entries = [e.decode().split(":") for e in result.as_numpy(NAMES.probabilities).reshape(-1)]
    assert sorted(label for _, _, label in entries) == sorted(NAMES.labels)
    assert {int(index): label for _, index, label in entries} == dict(enumerate(NAMES.labels))
    assert sum(float(p) for p, _, _ in entries) == pytest.approx(1.0, abs=1e-5)


def test_concurrent_studies_over_both_protocols_get_the_same_answer(triton_server, good_payload):
    """Batched together at the classifier or not (test_export_serving checks that it batches)."""
    requests = 8
    with ThreadPoolExecutor(requests) as pool:
        results = list(pool.map(lambda i: triage(triton_server, PROTOCOLS[i % 2], good_payload), range(requests)))
    probabilities = [r["probability"] for r in results]
    assert max(probabilities) - min(probabilities) < 1e-5


def test_a_150_mb_study_passes_the_python_backend_shared_memory(triton_server):
    """300 slices of 512x512 (~158 MB of DICOM): the size the shm-default/growth settings are for."""
    payload = phantom.study_files(form="series", slices=300, rows=512, columns=512, pixel_spacing=0.7, slice_spacing=1.0)
    assert sum(map(len, payload)) > 150e6
    results = [triage(triton_server, protocol, payload) for protocol in PROTOCOLS]
    assert results[0]["probability"] == pytest.approx(results[1]["probability"], abs=1e-6)
    assert results[0]["meta"]["original_shape"] == [300, 512, 512]


def bad_studies() -> dict[str, list[bytes]]:
    """One payload per kind of bad study; what is wrong with each is decided by preprocess itself."""
    series = phantom.study_files(form="series")
    mid = len(series) // 2
    damaged = list(series)
    damaged[mid] = damaged[mid][: len(damaged[mid]) // 2]
    return {
        "nothing sent": [],
        "empty file": [b""],
        "not DICOM": [b"this is a report, not an image\n" * 64],
        "damaged ZIP": [b"PK\x03\x04" + bytes(range(256)) * 8],
        "single slice": series[:1],
        "too few slices": series[:4],
        "truncated slice": damaged,
        "MR, not CT": [packaged_file("MR_small.dcm").read_bytes()],
    }


BAD = bad_studies()


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_study_is_invalid_argument_with_the_preprocess_message(triton_server, protocol, case):
    payload = BAD[case]
    with pytest.raises(preprocess.StudyError) as offline:
        preprocess.preprocess_study(payload, size=TEST_SIZE, mode="fast")
    with pytest.raises(InferenceServerException) as served:
        triage(triton_server, protocol, payload)
    assert served.value.status() == INVALID[protocol]
    assert str(offline.value) in served.value.message()
    assert NAMES.triage in served.value.message()  # Triton names the ensemble that failed


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_keeps_serving_after_bad_studies(triton_server, good_payload, protocol):
    for payload in BAD.values():
        with pytest.raises(InferenceServerException):
            triage(triton_server, protocol, payload)
    assert 0.0 <= triage(triton_server, protocol, good_payload)["probability"] <= 1.0


NOT_A_UID = f"the request parameter {NAMES.series_parameter} is not a SeriesInstanceUID"
FORGING_NAME = "x\n[FORGED] " + "y" * 100  # caller text: shown escaped and cut short
# Request parameters ct_preprocess cannot use, and what its one-line refusal names.
UNUSABLE_PARAMETERS = [
    ({"series_UID": "1.2.3"}, "unknown request parameter 'series_UID': the only parameter this service takes is series_uid"),
    ({"SeriesInstanceUID": "1.2.3", NAMES.series_parameter: "1.2.3"}, "unknown request parameter 'SeriesInstanceUID'"),
    ({FORGING_NAME: "1.2.3", "a": 1, "b": 2, "c": 3}, "unknown request parameters 'a', 'b', 'c' and 1 more"),
    ({FORGING_NAME: "1.2.3"}, f"unknown request parameter '{preprocess.printable(FORGING_NAME[:64])}...'"),
    ({NAMES.series_parameter: 7}, NOT_A_UID),
    ({NAMES.series_parameter: True}, NOT_A_UID),
    ({NAMES.series_parameter: ""}, NOT_A_UID),
    ({NAMES.series_parameter: "1.2\n[FORGED]"}, NOT_A_UID),
    ({NAMES.series_parameter: "1." * 600_000}, NOT_A_UID),
]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_request_parameter_the_server_cannot_use_is_refused_as_the_callers_mistake(triton_server, protocol):
    """A misspelt series_uid must not be ignored (the selection rule would answer for another series),
    and neither it nor a malformed value is counted against the study feed (SeriesNotFoundError);
    Triton's own parameters (timeout, priority, request_id, sequence_id) never reach the model."""
    payload = phantom.study_files("series", slices=24, rows=64, columns=64)
    before = scrape(triton_server.metrics_url)
    for parameters, message in UNUSABLE_PARAMETERS:
        for model in (NAMES.triage, NAMES.triage_explain):
            module, client = connect(triton_server, protocol)
            try:
                with pytest.raises(InferenceServerException) as served:
                    infer(client, protocol, model, [dicom_input(module, payload)], parameters=parameters)
            finally:
                client.close()
            assert served.value.status() == INVALID[protocol], parameters
            assert message in served.value.message() and "\n" not in served.value.message(), served.value.message()[:300]
    after = scrape(triton_server.metrics_url)
    refused = {dict(labels)["reason"]: after[name, labels] - before[name, labels] for name, labels in after if name == METRICS.refused}
    assert {reason: count for reason, count in refused.items() if count} == {"RequestParameterError": 2 * len(UNUSABLE_PARAMETERS)}
    series_uid = pydicom.dcmread(io.BytesIO(payload[0])).SeriesInstanceUID
    reserved = {"timeout": 60_000_000, "priority": 1, "request_id": "r1", "sequence_id": 7}
    assert triage(triton_server, protocol, payload, parameters={NAMES.series_parameter: series_uid}, **reserved)["series_uid"] == series_uid


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    ("probabilities", "meta", "status", "message"),
    [
        # a classifier output that is not a distribution: fails loudly as an internal fault, no decision
        ([[0.9, 0.9]], b"{}", INTERNAL, "not a probability distribution"),
        # inside the ensemble META is always preprocess's: a bad one can only come from a direct caller
        ([[0.3, 0.7]], b"not json", INVALID, f"{NAMES.postprocess}: META is not valid JSON"),
    ],
)
def test_postprocess_refuses_what_it_cannot_decide_on_in_one_line(triton_server, protocol, probabilities, meta, status, message):
    module, client = connect(triton_server, protocol)
    inputs = [module.InferInput(NAMES.probabilities, [1, 2], "FP32"), module.InferInput(NAMES.meta, [1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array(probabilities, dtype=np.float32))
    inputs[1].set_data_from_numpy(np.array([meta], dtype=np.object_))
    try:
        with pytest.raises(InferenceServerException) as served:
            infer(client, protocol, NAMES.postprocess, inputs)
    finally:
        client.close()
    assert served.value.status() == status[protocol]
    assert message in served.value.message() and "\n" not in served.value.message().strip()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_request_never_waits_in_a_queue_beyond_its_timeout(triton_server, good_payload, protocol):
    """Server-side timeout (microseconds): studies queued behind busy preprocess instances are rejected."""
    requests = 8  # more than the preprocess instances, so some must queue

    def attempt(_):
        try:
            triage(triton_server, protocol, good_payload, timeout=1000)
            return "ok"
        except InferenceServerException as error:
            assert error.status() == TIMED_OUT[protocol], error
            assert "timeout" in error.message().lower()
            return "timed out"

    with ThreadPoolExecutor(requests) as pool:
        outcomes = list(pool.map(attempt, range(requests)))
    assert "timed out" in outcomes
    assert 0.0 <= triage(triton_server, protocol, good_payload)["probability"] <= 1.0


def test_operating_point_changes_without_re_export(private_server, good_payload):
    """On a server of its own: a threshold left changed would skew every later answer. The threshold
    gauge follows each reload of ct_postprocess, and its counters go on across them. Last, the model
    control API unloads ct_triage (as a config override that no longer fits it does): Triton's
    strict readiness counts loaded models only, so /v2/health/ready still says 200 while every study
    is refused, which is why the Kubernetes readiness probe asks for each ensemble itself."""
    first = triage(private_server, "http", good_payload)
    probability = first["probability"]
    assert 0.0 < probability < 1.0
    config = set_threshold(private_server.http_url, 1.0)
    assert config["parameters"]["threshold"]["string_value"] == "1.0"
    assert scrape(private_server.metrics_url)[(METRICS.threshold, ())] == 1.0
    strict = triage(private_server, "grpc", good_payload)
    assert strict["pathology"] == 0 and strict["meta"]["threshold"] == 1.0
    set_threshold(private_server.http_url, 0.0)
    sensitive = triage(private_server, "http", good_payload)
    assert sensitive["pathology"] == 1 and sensitive["meta"]["threshold"] == 0.0
    assert strict["probability"] == sensitive["probability"] == pytest.approx(probability, abs=1e-7)
    metrics = scrape(private_server.metrics_url)
    assert metrics[(METRICS.threshold, ())] == 0.0
    decided = {label: metrics[(METRICS.decisions, (("decision", label),))] for label in NAMES.labels}
    assert decided == {"normal": 1 + (first["pathology"] == 0), "pathology": 1 + (first["pathology"] == 1)}
    assert metrics[(f"{METRICS.probability}_count", ())] == 3

    def status(path: str, data: bytes | None = None) -> int:
        try:
            with urllib.request.urlopen(f"http://{private_server.http_url}{path}", data=data, timeout=30) as answer:
                return answer.status
        except urllib.error.HTTPError as error:
            return error.code

    assert status(f"/v2/repository/models/{NAMES.triage}/unload", data=b"{}") == 200
    deadline = time.monotonic() + 30  # the unload finishes after its call returns (not ready while it runs)
    while status("/v2/health/ready") != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status("/v2/health/ready") == 200 and status(f"/v2/models/{NAMES.triage}/ready") == 400


def test_the_metrics_count_answers_by_decision_and_refusals_by_reason(triton_server, good_payload):
    """Beside Triton's nv_* counters: what the model answered and why studies were refused, with a
    series for every refusal reason from the start, and nothing from the studies in any label."""
    reasons = {name for name, kind in vars(preprocess.errors).items() if isinstance(kind, type) and issubclass(kind, preprocess.StudyError)}
    before = scrape(triton_server.metrics_url)
    answer = triage(triton_server, "grpc", phantom.study_files(form="series"))  # fake patient data in every header
    with pytest.raises(InferenceServerException):
        triage(triton_server, "http", [b"not a DICOM file"])
    after = scrape(triton_server.metrics_url)

    def added(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before[key]

    decided = NAMES.labels[answer["pathology"]]
    expected = {label: int(label == decided) for label in NAMES.labels}
    assert {label: added(METRICS.decisions, decision=label) for label in NAMES.labels} == expected
    assert added(f"{METRICS.probability}_count") == 1
    assert added(f"{METRICS.probability}_sum") == pytest.approx(answer["probability"], abs=1e-6)
    for bound in METRICS.probability_buckets:
        assert added(f"{METRICS.probability}_bucket", le=f"{bound:g}") == int(answer["probability"] <= bound), bound
    assert after[(METRICS.threshold, ())] == answer["meta"]["threshold"] == OPERATING_POINT.threshold
    assert {labels for name, labels in after if name == METRICS.refused} == {(("reason", reason),) for reason in reasons}
    assert {reason: added(METRICS.refused, reason=reason) for reason in reasons if added(METRICS.refused, reason=reason)} == {
        "NotDicomError": 1
    }
    # Triton's own counter adds 2 for the one refused study: the alert rule and the panel halve it (deploy/)
    failed = [key for key in after if key[0] == "nv_inference_request_failure" and ("model", NAMES.triage) in key[1]]
    assert sum(after[key] - before[key] for key in failed) == 2
    text = urllib.request.urlopen(triton_server.metrics_url, timeout=10).read().decode()
    assert not [value for value in phantom.FAKE_PHI.values() if value in text or value.replace("^", " ") in text]


def test_server_log_holds_no_patient_data(triton_server):
    """Studies that make the server log (a refusal, preprocess warnings) carry fake patient data in
    every header: the log says what happened, and never whose study it was."""
    series = phantom.study_files(form="series")
    damaged = list(series)
    damaged[5] = damaged[5][: len(damaged[5]) // 2]
    warned = phantom.study_files(form="zip", extras=True)  # skipped non-DICOM files: warnings
    triage(triton_server, "http", warned)
    with pytest.raises(preprocess.StudyError) as refusal:
        preprocess.preprocess_study(damaged, size=TEST_SIZE)
    with pytest.raises(InferenceServerException):
        triage(triton_server, "http", damaged)
    refused = f"{NAMES.preprocess}: study refused ({type(refusal.value).__name__}): {refusal.value}"
    deadline = time.monotonic() + 30  # the stubs' log lines reach the server's log after the answer
    while refused not in (log := triton_server.log_file.read_text(errors="replace")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert refused in log
    assert "is not a DICOM file: skipped" in log  # and so were preprocess's warnings
    for keyword, value in phantom.FAKE_PHI.items():
        for form in {value, value.replace("^", " ")}:
            assert form not in log, keyword


def test_preprocessing_runs_in_parallel_instances_behind_a_bounded_queue(triton_server):
    """Studies sent together are preprocessed at the same time by different instances."""
    # JPEG 2000 slices: small to send, a few hundred ms to decode, so each study is still being
    # preprocessed when the next arrives (uncompressed, 7 MB took longer to send than the 25 ms to
    # preprocess on a busy machine, and the studies never overlapped)
    payload = phantom.study_files(form="series", slices=96, rows=192, columns=192, transfer_syntax="jpeg2000")
    # One client sends all four at once, so they reach the server together: clients in threads each
    # encoding the study arrived one after another on a busy 2-core machine, and never overlapped.
    answers: queue.Queue = queue.Queue()
    module, client = connect(triton_server, "grpc")
    try:
        study = [dicom_input(module, payload)]
        for _ in range(4):
            client.async_infer(NAMES.triage, study, lambda result, error: answers.put((result, error)), client_timeout=CLIENT_DEADLINE_S)
        results = [answers.get(timeout=CLIENT_DEADLINE_S) for _ in range(4)]
    finally:
        client.close()
    assert [error for _, error in results] == [None] * 4
    served = [json.loads(result.as_numpy(NAMES.meta)[0])["served_by"] for result, _ in results]
    assert len({s["instance"] for s in served}) == SERVING.preprocess_instances
    overlapping = [
        (a["instance"], b["instance"])
        for a in served
        for b in served
        if a["instance"] != b["instance"] and a["started"] < b["finished"] and b["started"] < a["finished"]
    ]
    assert overlapping, served
    with urllib.request.urlopen(f"http://{triton_server.http_url}/v2/models/{NAMES.preprocess}/config", timeout=10) as r:
        policy = json.loads(r.read())["dynamic_batching"]["default_queue_policy"]
    assert policy["max_queue_size"] == SERVING.max_queue_size
    assert int(policy["default_timeout_microseconds"]) == int(SERVING.request_timeout_s * 1e6)
