"""The exported classifier served by the real tritonserver (cpu target): same numbers as the parity report."""
from __future__ import annotations

import json

import numpy as np
import tritonclient.http as httpclient

from export.parity import parity_inputs
from settings import NAMES
from tests.conftest import settled_classifier_stats


def _request(volume: np.ndarray, class_count: int = 0) -> dict:
    tensor = httpclient.InferInput(NAMES.volume, list(volume.shape), "FP32")
    tensor.set_data_from_numpy(volume)
    outputs = [httpclient.InferRequestedOutput(NAMES.probabilities, class_count=class_count)]
    return {"model_name": NAMES.classifier, "inputs": [tensor], "outputs": outputs}


def test_served_classifier_matches_parity_report_and_batches(triton_server, triton_repository):
    classifier_dir = triton_repository / NAMES.classifier
    report = json.loads((classifier_dir / "parity.json").read_text())
    provenance = json.loads((classifier_dir / "provenance.json").read_text())
    names, volumes = parity_inputs(report["size"])
    expected = np.array(report["probability_of_pathology"]["onnx_fp32"])
    client = httpclient.InferenceServerClient(triton_server.http_url.split("://")[-1], concurrency=len(names))
    try:
        config = client.get_model_config(NAMES.classifier)
        assert json.loads(config["parameters"]["provenance"]["string_value"]) == provenance
        before = settled_classifier_stats(triton_server)

        # One request per study, all at once: the dynamic batcher must merge them into fewer runs.
        pending = [client.async_infer(**_request(volumes[i : i + 1])) for i in range(len(names))]
        served = np.array([p.get_result().as_numpy(NAMES.probabilities)[0, 1] for p in pending])
        assert np.abs(served - expected).max() <= 1e-5, dict(zip(names, served - expected))
        merged = settled_classifier_stats(triton_server)  # Triton counts just after answering
        executions = int(merged["execution_count"]) - int(before.get("execution_count", 0))
        assert int(merged["inference_count"]) - int(before.get("inference_count", 0)) == len(names)
        assert executions < len(names)  # at least two of the single requests ran as one batch

        # A client-side batch of 3 gives the same per-item result.
        batch = client.infer(**_request(volumes[:3])).as_numpy(NAMES.probabilities)
        assert batch.shape == (3, 2) and np.abs(batch[:, 1] - expected[:3]).max() <= 1e-5

        # Classification extension: the label file names the class.
        top = client.infer(**_request(volumes[:1], class_count=1)).as_numpy(NAMES.probabilities)
        score, index, label = top[0, 0].decode().split(":")
        assert label == NAMES.labels[int(index)] and abs(float(score) - max(expected[0], 1 - expected[0])) < 1e-5

    finally:
        client.close()
