"""classifier.OpenVINOClassifier's precision: FP32 unless BF16 is asked for, and what OpenVINO
actually compiled read back (a CPU without BF16 instructions computes in FP32 whatever is asked)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
import pytest

from classifier import OpenVINOClassifier, convert_to_openvino, openvino_engine
from export import build_classifier, demo_weights, onnx_graph
from export.parity import FP16_BOUND, FP32_BOUND, parity_inputs, reference_probabilities

SIZE = 16


def cpu_has_bf16() -> bool:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@pytest.fixture(scope="module")
def network_and_ir(tmp_path_factory):
    network = build_classifier(demo_weights())
    folder = tmp_path_factory.mktemp("ir")
    onnx_graph.export_fp32(network, folder / "model.onnx")
    convert_to_openvino(folder / "model.onnx", folder / "model.xml")
    return network, folder / "model.xml"


def test_fp32_is_the_default_and_matches_pytorch(network_and_ir):
    network, ir = network_and_ir
    engine = OpenVINOClassifier(ir, size=SIZE, threads=1)
    assert (engine.precision, engine.precision_in_use) == ("fp32", "fp32")
    _, inputs = parity_inputs(SIZE)
    assert np.abs(engine(inputs) - reference_probabilities(network, inputs)).max() <= FP32_BOUND


def test_bf16_computes_in_bf16_where_the_cpu_has_it_and_stays_within_the_half_precision_bound(network_and_ir):
    _, ir = network_and_ir
    fp32 = OpenVINOClassifier(ir, size=SIZE, threads=1)
    bf16 = OpenVINOClassifier(ir, size=SIZE, threads=1, precision="bf16")
    assert bf16.precision == "bf16"
    assert bf16.precision_in_use == ("bf16" if cpu_has_bf16() else "fp32")
    _, inputs = parity_inputs(SIZE)
    assert np.abs(bf16(inputs) - fp32(inputs)).max() <= FP16_BOUND


def test_a_cpu_without_bf16_is_reported_as_computing_in_fp32(network_and_ir, monkeypatch):
    """OpenVINO's CPU plugin ignores a bf16 hint on such a CPU and reports f32: the engine says what it reads back."""
    _, ir = network_and_ir

    class Compiled:
        def __init__(self, compiled):
            self.compiled = compiled

        def get_property(self, name):
            return ov.Type.f32 if name == "INFERENCE_PRECISION_HINT" else self.compiled.get_property(name)

        def create_infer_request(self):
            return self.compiled.create_infer_request()

    class Core(ov.Core):
        def compile_model(self, *args, **kwargs):
            return Compiled(super().compile_model(*args, **kwargs))

    monkeypatch.setattr(openvino_engine.ov, "Core", Core)
    engine = OpenVINOClassifier(ir, size=SIZE, threads=1, precision="bf16")
    assert (engine.precision, engine.precision_in_use) == ("bf16", "fp32")


@pytest.mark.parametrize("precision", ["fp16", "f32", "BF16", None])
def test_a_precision_the_engine_does_not_offer_is_refused(network_and_ir, precision):
    _, ir = network_and_ir
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        OpenVINOClassifier(ir, size=SIZE, threads=1, precision=precision)
