"""The exported classifier served by the real tritonserver (cpu target): the parity report's numbers,
the dynamic batcher merging single-study requests into one run, and volumes no preprocessing makes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as httpclient
from helpers import TEST_SIZE, counted_stats, model_stats
from tritonclient.utils import InferenceServerException

from export.parity import parity_inputs
from settings import NAMES


def _request(volume: np.ndarray) -> dict:
    tensor = httpclient.InferInput(NAMES.volume, list(volume.shape), "FP32")
    tensor.set_data_from_numpy(volume)
    return {"model_name": NAMES.classifier, "inputs": [tensor], "outputs": [httpclient.InferRequestedOutput(NAMES.probabilities)]}


def test_served_classifier_matches_parity_report_and_batches(triton_server, triton_repository):
    report = json.loads(triton_repository.with_name(triton_repository.name + ".artifacts").joinpath("parity.json").read_text())
    names, volumes = parity_inputs(report["size"])
    expected = np.array(report["probability_of_pathology"]["openvino_fp32"])
    client = httpclient.InferenceServerClient(triton_server.http_url, concurrency=len(names))
    try:
        before = model_stats(triton_server, NAMES.classifier)
        # One request per volume, all at once: the dynamic batcher must merge them into fewer runs.
        pending = [client.async_infer(**_request(volumes[i : i + 1])) for i in range(len(names))]
        served = np.array([p.get_result().as_numpy(NAMES.probabilities)[0, 1] for p in pending])
        assert np.abs(served - expected).max() <= 1e-5, dict(zip(names, served - expected))
        after = counted_stats(triton_server, NAMES.classifier, int(before.get("inference_count", 0)) + len(names))
        inferences = int(after["inference_count"]) - int(before.get("inference_count", 0))
        executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
        assert inferences >= len(names)
        assert executions < inferences, "dynamic batching never combined two requests"

        # A client-side batch of 3 gives the same per-item result.
        batch = client.infer(**_request(volumes[:3])).as_numpy(NAMES.probabilities)
        assert batch.shape == (3, 2) and np.abs(batch[:, 1] - expected[:3]).max() <= 1e-5
    finally:
        client.close()


def test_a_volume_no_preprocessing_makes_is_refused_and_the_rest_of_its_batch_is_answered(triton_server):
    """A client that preprocesses itself: NaN, infinities or HU left unwindowed get a named INVALID_ARG,
    not the confident probability the network would give them."""
    size = TEST_SIZE
    good = np.random.default_rng(0).uniform(-1, 1, (1, 1, size, size, size)).astype(np.float32)
    bad = [
        (np.full_like(good, np.nan), "holds non-finite values"),
        (np.where(good > 0.9, np.inf, good).astype(np.float32), "holds non-finite values"),
        ((good * 1000).astype(np.float32), r"holds values from -1000 to 1000, outside the model's \[-1, 1\]"),  # HU, not windowed
    ]
    client = httpclient.InferenceServerClient(triton_server.http_url, concurrency=len(bad) + 1)
    try:
        # all at once: the bad ones may share a dynamic batch with the good one, which is answered
        pending = [(client.async_infer(**_request(volume)), message) for volume, message in bad]
        answered = client.async_infer(**_request(good)).get_result().as_numpy(NAMES.probabilities)
        assert answered.shape == (1, 2) and np.isfinite(answered).all()
        for request, message in pending:
            with pytest.raises(InferenceServerException, match=f"ct_classifier: VOLUME {message}") as refused:
                request.get_result()
            assert refused.value.status() == "400" and "\n" not in refused.value.message()
    finally:
        client.close()
