"""The torch-gpu target on the bundled server: export writes model.pt and its provenance, and the
Python-backend model serves it with dynamic batching (tests/library/test_torch_model.py checks its
refusals; the gpu_check smoke test sends studies through the ensemble on it).

No GPU here: the rendered copy's classifier runs on a KIND_CPU instance at FP32, the same code that
runs on a GPU instance at FP16 (benchmarks/gpu_check.sh measures that one on the GPU).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as httpclient
from google.protobuf import text_format
from helpers import counted_stats, discard, model_stats
from tritonclient.grpc import model_config_pb2

import export
from export.parity import parity_inputs
from serve import start_on_free_ports
from settings import NAMES

SIZE = 16  # the network is fully convolutional: S=16 runs every code path of S=256


@pytest.fixture(scope="module")
def torch_repository(tmp_path_factory):
    out = tmp_path_factory.mktemp("torch_gpu") / "repository"
    result = export.write_repository(out, target="torch-gpu", size=SIZE, max_batch_size=4, demo_weights=True)
    config_file = out / NAMES.classifier / "config.pbtxt"
    config = export.parse_config(config_file.read_text(), str(config_file))
    config.instance_group[0].kind = model_config_pb2.ModelInstanceGroup.KIND_CPU
    config.parameters["precision"].string_value = "fp32"
    config_file.write_text(text_format.MessageToString(config))
    return out, result


@pytest.fixture(scope="module")
def torch_server(torch_repository, tmp_path_factory):
    log_file = tmp_path_factory.mktemp("torch_log") / "tritonserver.log"
    # ct_classifier alone: the tests send it volumes (the gpu_check smoke test serves the whole repository)
    server = start_on_free_ports(torch_repository[0], log_file=log_file, exit_timeout_s=5, models=[NAMES.classifier])
    try:
        yield server
    finally:
        discard(server)


def test_export_writes_the_weights_pytorch_serves_with_their_provenance_and_parity(torch_repository):
    repository, result = torch_repository
    version = repository / NAMES.classifier / "1"
    assert sorted(p.name for p in version.iterdir() if p.is_file()) == ["model.pt", "provenance.json", "torch_model.py"]
    assert sorted(p.name for p in result.artifacts.iterdir()) == [".ct-triage-export.json", "parity.json", "provenance.json", "weights.pt"]
    provenance = json.loads((version / "provenance.json").read_text())
    assert provenance["target"] == "torch-gpu" and provenance["precision"] == "fp16" and "opset" not in provenance
    assert provenance["served_sha256"] == {"model.pt": provenance["weights_sha256"]} and provenance["weights_sha256"] == export.file_sha256(
        version / "model.pt"
    )
    report = json.loads((result.artifacts / "parity.json").read_text())
    assert report["passed"] and report["device"] == "cpu" and report["batch_vs_single_max_abs_diff"] <= 1e-5
    assert list(report["comparisons"]) == ["served_fp32_vs_torch"] and report["comparisons"]["served_fp32_vs_torch"]["max_abs_diff"] <= 1e-4
    (reason,) = report["not_checked"]  # FP16 on a CPU is not checked, and the report says so
    assert "fp16" in reason and "CUDA" in reason and "not checked" in result.parity.summary()


def test_served_torch_classifier_matches_the_reference_and_batches(torch_server, torch_repository):
    report = json.loads((torch_repository[1].artifacts / "parity.json").read_text())
    names, volumes = parity_inputs(report["size"])
    expected = np.array(report["probability_of_pathology"]["torch_fp32"])
    triton = httpclient.InferenceServerClient(torch_server.http_url, concurrency=len(names))
    try:
        before = model_stats(torch_server, NAMES.classifier)
        pending = []
        for volume in volumes:
            tensor = httpclient.InferInput(NAMES.volume, [1, *volume.shape], "FP32")
            tensor.set_data_from_numpy(volume[None])
            pending.append(triton.async_infer(NAMES.classifier, [tensor]))
        served = np.array([p.get_result().as_numpy(NAMES.probabilities)[0, 1] for p in pending])
        assert np.abs(served - expected).max() <= 1e-4, dict(zip(names, served - expected))
        after = counted_stats(torch_server, NAMES.classifier, int(before.get("inference_count", 0)) + len(names))
        assert int(after["execution_count"]) - int(before.get("execution_count", 0)) < len(names), "no dynamic batch"
    finally:
        triton.close()
