"""The load tools against the real server, at a tiny scale: perf_analyzer on both models, a bounded
locust run, and the FastAPI baseline answering what the offline model answers."""

from __future__ import annotations

import json
import re
import tempfile
import urllib.request
from pathlib import Path

import pytest
import torch
from helpers import TEST_SIZE, bytes_under, discard

import preprocess
from benchmarks import baseline, serving
from benchmarks import perf_analyzer as pa
from preprocess import phantom
from serve import start_on_free_ports
from settings import NAMES


@pytest.fixture(scope="module")
def reloaded_server(triton_repository, tmp_path_factory):
    """A server of this module's own, with the explanation models, for the benchmarks that reload models,
    which the shared one must keep as they are: explain_opt_in unloads the explanation models (it starts
    from them loaded: it runs first), batching_wait reloads ct_classifier alone. One start for both."""
    log_file = tmp_path_factory.mktemp("reloaded") / "tritonserver.log"
    server = start_on_free_ports(triton_repository, log_file=log_file, exit_timeout_s=5)
    try:
        yield server
    finally:
        discard(server)


@pytest.fixture(scope="module")
def study_zip(tmp_path_factory) -> Path:
    return phantom.write_study(tmp_path_factory.mktemp("bench") / "study.zip", "zip", slices=24, rows=64, columns=64, pixel_spacing=5.0)


def test_perf_analyzer_runs_one_level_on_the_classifier_and_the_ensemble(triton_server, study_zip, tmp_path):
    classifier = pa.run(NAMES.classifier, triton_server.grpc_url, "grpc", 2, tmp_path / "classifier.csv", requests=6)
    assert classifier["Concurrency"] == 2 and classifier["requests"] == 6 and classifier["Server Compute Infer"] > 0
    # the throughput over the elapsed time, not over whole seconds: at most what the mean latency allows
    # at this concurrency, and near it (the loop's only idle time is its start and its end)
    assert 0.5 < classifier["throughput"] / (2 / (classifier["Avg latency"] / 1e6)) <= 1.01, classifier
    assert not list(tmp_path.glob("*.profile.json"))  # every request's inputs: not kept
    input_json = tmp_path / "input.json"
    input_json.write_text(json.dumps(pa.input_data([study_zip.read_bytes()])))
    before = serving.statistics_of(triton_server.http_url)
    triage = pa.run(
        NAMES.triage,
        triton_server.http_url,
        "http",
        1,
        tmp_path / "triage.csv",
        input_json=input_json,
        shared_memory=True,
        requests=3,
    )
    assert triage["throughput"] > 0 and triage["p95 latency"] > 0
    per_model = serving.breakdown(before, serving.statistics_of(triton_server.http_url))
    assert per_model[NAMES.preprocess]["requests"] >= 2 and per_model[NAMES.preprocess]["compute_infer_ms"] > 0
    assert sum(per_model[NAMES.classifier]["executions_per_batch_size"].values()) >= 1
    assert (tmp_path / "triage.log").read_text()  # perf_analyzer's own report, kept beside its CSV


def test_the_overhead_reference_alternates_served_and_in_process_studies(triton_server, triton_repository, study_zip):
    reference = serving.overhead_c1(triton_server, triton_repository, [study_zip.read_bytes()], TEST_SIZE, rounds=2)
    assert reference["rounds"] == 2 and reference["served_failures"] == 0
    assert reference["served_s"] > 0 and reference["total_s"] == pytest.approx(
        reference["preprocess_s"] + reference["classifier_s"], rel=0.5
    )


def test_shared_memory_benchmark_alternates_the_transports(triton_server, study_zip):
    from benchmarks import shared_memory

    urls = {"grpc": triton_server.grpc_url, "http": triton_server.http_url}
    rows = shared_memory.measure([study_zip.read_bytes()], urls, repeats=2)
    assert [(row["protocol"], row["transport"]) for row in rows] == [
        ("grpc", "wire"),
        ("grpc", "shared memory"),
        ("http", "wire"),
        ("http", "shared memory"),
    ]
    assert all(row["status"] == "Success" and row["failures"] == 0 and 0 < row["min_s"] <= row["median_s"] for row in rows)
    assert all(row["paired_shm_over_wire"] > 0 for row in rows if row["transport"] == "shared memory")


def test_locust_scenario_completes_a_bounded_run_without_failures(triton_server, study_zip, tmp_path):
    result = serving.locust_run(triton_server, users=2, seconds=4, prefix=tmp_path / "locust", study=study_zip)
    assert result["exit_code"] == 0 and result["failures"] == 0
    assert result["requests"] >= 1 and set(result["requests_per_type"]) <= {"http", "grpc"}  # 4 s: one study on a busy machine
    assert result["succeeded"] == result["requests"] and result["succeeded_per_s"] > 0
    assert 0 < result["succeeded_p50_ms"] <= result["succeeded_p95_ms"]


def test_locust_exits_non_zero_when_studies_fail(triton_server, tmp_path):
    not_a_study = tmp_path / "notes.txt"
    not_a_study.write_text("not DICOM")
    result = serving.locust_run(triton_server, users=1, seconds=2, prefix=tmp_path / "locust", study=not_a_study)
    assert result["failures"] >= 1 and result["exit_code"] != 0
    # refusals are not throughput: no study answered with a result, so no rate and no latency of one
    assert result["succeeded"] == 0 and result["succeeded_per_s"] == 0 and result["succeeded_p50_ms"] is None


def test_baseline_answers_what_the_offline_model_answers(triton_repository, study_zip):
    weights = triton_repository.with_name(triton_repository.name + ".artifacts") / "weights.pt"
    study = study_zip.read_bytes()
    volume = preprocess.preprocess_study([study], size=TEST_SIZE, mode="reference").volume
    classifier = baseline.load_classifier(str(weights))
    with torch.inference_mode():
        expected = float(torch.softmax(classifier(torch.from_numpy(volume)), dim=1)[0, 1])
    with serving.baseline_service(weights, TEST_SIZE) as url:
        request = urllib.request.Request(f"http://{url}/classify", data=study, method="POST")
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        bad = urllib.request.Request(f"http://{url}/classify", data=b"not DICOM", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=60)
    assert answer["probability_of_pathology"] == pytest.approx(expected, abs=1e-6)
    assert answer["pathology"] == int(expected >= 0.5) and answer["study_uid"]
    assert refused.value.code == 400 and "DICOM" in json.loads(refused.value.read())["error"]


def test_cpu_engines_compares_every_engine_and_the_served_one(tmp_path, monkeypatch, capsys):
    from benchmarks import cpu_engines

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    options = ["--size", "16", "--parity-size", "16", "--repeat", "1", "--matmul-n", "512", "--no-compile"]
    assert cpu_engines.main([*options, "--out", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])  # one JSON object last, as every benchmark prints
    assert bytes_under(scratch) < 2**20, sorted(scratch.iterdir())  # the graphs and both rendered repositories (2.4 GB) are removed
    result = json.loads((tmp_path / "cpu-engines.json").read_text())
    assert set(result["engines"]) == {"onnxruntime", "openvino", "openvino-bf16", "openvino-int8", "pytorch", "pytorch-channels-last"}
    int8 = result["parity"].pop("openvino-int8")  # held to the FP16 bound, but not offered: its parity is reported, not required
    assert all(row["passed"] and row["decisions_agree"] for row in result["parity"].values())
    assert result["parity"]["openvino-bf16"]["bound"] == 1e-2 and result["parity"]["openvino"]["bound"] == 1e-4 and int8["bound"] == 1e-2
    assert len(int8["abs_dp"]) == 7 and max(int8["abs_dp"].values()) == pytest.approx(int8["max_abs_dp"], abs=1e-6)
    assert result["precision_in_use"]["openvino"] == "fp32" and result["precision_in_use"]["openvino-bf16"] in ("bf16", "fp32")
    assert re.fullmatch(r"int8 in [1-9]\d* of 33 convolutions", result["precision_in_use"]["openvino-int8"])
    assert result["fastest_passing"] in result["engines"] and result["served"]["median_s"] > 0 and result["served_bf16"]["median_s"] > 0
    assert len(result["served"]["runs_s"]) == len(result["served_bf16"]["runs_s"]) == len(result["engines"]["onnxruntime"]["runs_s"])
    assert printed["fastest_passing"] == result["fastest_passing"] and printed["engines"].keys() == {
        *result["engines"],
        "served",
        "served_bf16",
    }
    assert all(row["gflops"] > 0 for row in result["engines"].values()) and min(result["matmul_gflops"]) > 0
    assert set(result["cpu_flags"]) >= {"avx2", "avx512_bf16", "amx_bf16"}
    text = (tmp_path / "cpu-engines.md").read_text()
    assert "| GFLOP/s | vs float32 matmul |" in text
    assert "| openvino (served) [fp32 in use] |" in text and "| openvino-bf16 [" in text and "Served at bf16" in text
    assert re.search(r"\| openvino-int8 \[int8 in \d+ of 33 convolutions in use\] \(not offered; FP16 bound\) \|", text)
    assert "|dP| per parity volume: uniform-0 " in text


def test_explain_opt_in_compares_ct_triage_with_and_without_the_explanation_models(reloaded_server):
    from benchmarks import explain_opt_in

    payload = phantom.study_files("series", slices=24, rows=64, columns=64, pixel_spacing=5.0, slice_spacing=5.0)
    results = explain_opt_in.measure(reloaded_server, payload, levels=[1], requests=2, rounds=1, repeats=1)
    (level,) = results["levels"]
    assert level["failures"] == 0 and level["studies_per_s_loaded"] > 0 and level["studies_per_s_unloaded"] > 0
    assert [r["explanations_loaded"] for r in results["rounds"]] == [True, False]  # both states on one server
    memory = results["memory_mib"]
    assert memory["explanations_loaded"][f"stub {NAMES.explain}"] > 100  # PyTorch and its own copy of the weights
    assert not {f"stub {model}" for model in explain_opt_in.EXPLANATION_MODELS} & memory["explanations_unloaded"].keys()
    assert results["one_study_s"][NAMES.triage_explain] > 0 and results["one_study_s"][NAMES.triage] > 0
    study = {"slices": 24, "rows": 64, "columns": 64, "megabytes": 0.2}
    host = serving.machine(TEST_SIZE, reloaded_server.http_url)
    command = "python -m benchmarks.explain_opt_in --levels 1"
    text = explain_opt_in.markdown({"command": command, "machine": host, "study": study, **results})
    assert "ct_triage throughput unchanged" in text and f"`{command}` on " in text
    assert f"Triton {host['triton']};" in text and host["triton"].startswith("2.")  # the server's own /v2 metadata


def test_batching_wait_measures_each_wait_on_one_server(reloaded_server):
    from benchmarks import batching_wait

    payload = phantom.study_files("series", slices=24, rows=64, columns=64, pixel_spacing=5.0, slice_spacing=5.0)
    results = batching_wait.measure(reloaded_server, payload, waits=[1000, 0], levels=[1], requests=2, rounds=2)
    assert [(r["round"], r["wait_us"]) for r in results["rounds"]] == [(0, 1000), (0, 0), (1, 0), (1, 1000)]  # order reversed
    assert [(s["wait_us"], s["failures"]) for s in results["summary"]] == [(1000, 0), (0, 0)]
    assert all(s["studies_per_s"] > 0 and 0 < s["p50_s"] <= s["p95_s"] for s in results["summary"])
    with urllib.request.urlopen(f"http://{reloaded_server.http_url}/v2/models/{NAMES.classifier}/config") as response:
        assert int(json.loads(response.read())["dynamic_batching"]["max_queue_delay_microseconds"]) == 1000  # the last one measured
    study = {"slices": 24, "rows": 64, "columns": 64, "megabytes": 0.2}
    command = "python -m benchmarks.batching_wait --waits 1000 0"
    host = serving.machine(TEST_SIZE, reloaded_server.http_url)
    text = batching_wait.markdown({"command": command, "machine": host, "target": "cpu", "requests": 2, "study": study, **results})
    assert "| 1 | 0 |" in text and "medians over 2 rounds" in text and f"`{command}` on " in text


def test_http_faults_measures_the_crash_by_size_and_the_growth_by_chunks(tmp_path):
    """The documented Triton 2.51 faults (serve/README.md), as the benchmark measures them: a 1 MiB
    form-typed request is answered, an 8 MiB one kills the server; 110,000 one-byte chunks grow it; a
    gzip-compressed 64 MiB study is inflated whole (tritonserver's peak grows by more than it) and refused."""
    from benchmarks import http_faults

    options = ["--form-mib", "1", "8", "--chunks", "109999", "--gzip-mib", "64"]
    assert http_faults.main([*options, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "http-faults.json").read_text())
    small, large = result["form_typed"]
    assert small["server_running"] and small["answer"].startswith("HTTP/1.1 400"), small
    assert not large["server_running"], large
    chunked = result["chunked"]
    assert chunked["mb_sent"] == 0.7 and chunked["server_running"]  # every chunk, 6 bytes each (whole blocks of 10,000: 0.6)
    assert chunked["rss_after_mib"] - chunked["rss_before_mib"] > 50, chunked  # about 1 KB a chunk
    compressed = result["gzip"]
    assert compressed["mib"] == 64 and compressed["mib_sent"] < 1 and compressed["answer"].startswith("HTTP/1.1 400"), compressed
    assert compressed["after"]["rss_peak_mib"] - compressed["before"]["rss_peak_mib"] > 64, compressed  # inflated inside tritonserver
    text = (tmp_path / "http-faults.md").read_text()
    assert "| 8 | " in text and "One gzip-compressed request (`Content-Encoding: gzip`) of a 64 MiB study" in text
