"""ct_classifier's torch-gpu model file without a server: it serves the weights export recorded and
nothing else, and refuses a GPU instance it cannot run (a stand-in replaces Triton's stub-only module)."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch
from helpers import ROOT

import export
from classifier import ResNet34Classifier, TorchClassifier


class _ModelException(Exception):
    pass


@pytest.fixture
def torch_model(monkeypatch):
    stand_in = types.ModuleType("triton_python_backend_utils")
    stand_in.TritonModelException = _ModelException
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stand_in)
    spec = importlib.util.spec_from_file_location(
        "ct_classifier_torch", ROOT / "model_repository" / "ct_classifier" / "1" / "torch_model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory, demo_weights):
    """A version folder as export writes it: model.pt and the provenance that names its SHA-256."""
    folder = tmp_path_factory.mktemp("ct_classifier") / "1"
    folder.mkdir()
    torch.save(demo_weights.state_dict, folder / "model.pt")
    (folder / "provenance.json").write_text(json.dumps({"served_sha256": {"model.pt": export.file_sha256(folder / "model.pt")}}))
    return folder


def _args(folder, kind="CPU", precision="fp32") -> dict:
    config = {
        "input": [{"name": "VOLUME"}],
        "output": [{"name": "PROBABILITIES"}],
        "parameters": {"precision": {"string_value": precision}},
    }
    return {
        "model_config": json.dumps(config),
        "model_repository": str(folder.parent),
        "model_version": folder.name,
        "model_instance_kind": kind,
        "model_instance_device_id": "0",
    }


def test_the_model_loads_the_recorded_weights_on_a_cpu_instance(torch_model, exported, demo_weights):
    model = torch_model.TritonPythonModel()
    model.initialize(_args(exported))
    assert model.engine.device == torch.device("cpu") and model.engine.precision == "fp32"
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (2, 1, 16, 16, 16)).astype(np.float32))
    with torch.no_grad():
        expected = torch.softmax(ResNet34Classifier.from_state_dict(demo_weights.state_dict)(x), dim=1)
    assert torch.allclose(model.engine(x), expected, atol=1e-5)


def test_weights_that_export_did_not_record_are_refused(torch_model, exported, tmp_path):
    folder = tmp_path / "1"
    folder.mkdir()
    (folder / "provenance.json").write_text((exported / "provenance.json").read_text())
    data = bytearray((exported / "model.pt").read_bytes())
    data[-100] ^= 0xFF
    (folder / "model.pt").write_bytes(bytes(data))
    with pytest.raises(_ModelException, match=r"is not the file export recorded in provenance\.json"):
        torch_model.TritonPythonModel().initialize(_args(folder))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_gpu_instance_without_cuda_is_refused(torch_model, exported):
    with pytest.raises(_ModelException, match="KIND_GPU instance but this PyTorch sees no CUDA device"):
        torch_model.TritonPythonModel().initialize(_args(exported, kind="GPU"))


def test_an_unknown_precision_is_refused(torch_model, exported):
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16, bf16, not 'fp8'"):
        torch_model.TritonPythonModel().initialize(_args(exported, precision="fp8"))


def test_the_engine_casts_and_returns_fp32_probabilities_on_its_device(demo_weights):
    engine = TorchClassifier(ResNet34Classifier.from_state_dict(demo_weights.state_dict), device="cpu", precision="fp32")
    probabilities = engine(torch.zeros((1, 1, 16, 16, 16), dtype=torch.float64))
    assert probabilities.dtype == torch.float32 and probabilities.shape == (1, 2)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(1))


def test_a_volume_out_of_range_fails_its_request_and_the_rest_of_the_batch_is_answered(torch_model, exported):
    triton = sys.modules["triton_python_backend_utils"]  # the stand-in, given what execute uses

    class Error:
        INVALID_ARG, INTERNAL, UNAVAILABLE = "INVALID_ARG", "INTERNAL", "UNAVAILABLE"

        def __init__(self, message, code):
            self.message, self.code = message, code

    class Request:
        def __init__(self, volume):
            self.volume = volume

        def is_cpu(self):
            return True

        def as_numpy(self):
            return self.volume

    triton.TritonError = Error
    triton.Tensor = lambda name, array: array
    triton.InferenceResponse = lambda output_tensors=None, error=None: (output_tensors, error)
    triton.get_input_tensor_by_name = lambda request, name: request
    model = torch_model.TritonPythonModel()
    model.initialize(_args(exported))
    rng = np.random.default_rng(0)
    good = [rng.uniform(-1, 1, (batch, 1, 16, 16, 16)).astype(np.float32) for batch in (1, 2)]
    nan = np.full((1, 1, 16, 16, 16), np.nan, np.float32)

    responses = model.execute([Request(good[0]), Request(nan), Request(good[1])])

    assert responses[1][0] is None and responses[1][1].code == "INVALID_ARG"
    assert responses[1][1].message == "ct_classifier: VOLUME holds non-finite values (NaN or infinite)"
    for (outputs, error), volume in zip((responses[0], responses[2]), good):
        assert error is None and np.allclose(outputs[0], model.engine(torch.from_numpy(volume)).numpy(), atol=1e-5)
    assert model.execute([Request(nan)])[0][1].code == "INVALID_ARG"  # a batch of refusals runs nothing
