"""classifier.OpenVINOClassifier's precision: FP32 unless BF16 is asked for, and what OpenVINO
actually compiled read back (a CPU without BF16 instructions computes in FP32 whatever is asked);
and OpenVINO used through it never calls home."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT

from classifier import OpenVINOClassifier, convert_to_openvino, openvino_engine
from classifier.openvino_engine import ov  # never `import openvino` first: that import alone sends telemetry
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


def test_openvino_through_the_project_sends_no_telemetry(tmp_path):
    """`import openvino` and its converter send usage events to Google Analytics when no consent file
    in $HOME says no (the CI variables also stop it, so they are removed here). Through
    classifier.openvino_engine, a conversion and a compile leave the telemetry package unimported and
    write no client ID under a fresh $HOME."""
    home = tmp_path / "home"
    home.mkdir()
    environment = {key: value for key, value in os.environ.items() if key not in ("CI", "TF_BUILD", "JENKINS_URL")}
    environment["HOME"] = str(home)
    would_send = (
        "from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker;"
        "print(OptInChecker().check(enable_opt_in_dialog=False, disable_in_ci=True) == ConsentCheckResult.NO_FILE)"
    )  # what ovc asks: NO_FILE is consent to send (checked without importing openvino, which would send)
    asked = subprocess.run([sys.executable, "-c", would_send], env=environment, capture_output=True, text=True, check=True)
    assert asked.stdout.strip() == "True", asked.stderr
    graph = tmp_path / "relu.onnx"
    _write_relu_graph(graph)
    converts = (
        "import sys; from classifier import openvino_engine as engine;"
        f"engine.convert({str(graph)!r}, {str(tmp_path / 'relu.xml')!r});"
        f"engine.ov.Core().compile_model({str(tmp_path / 'relu.xml')!r}, 'CPU');"
        "from openvino.tools.ovc import telemetry_utils;"
        "print(sys.modules['openvino_telemetry'], telemetry_utils.tm.__name__)"
    )
    done = subprocess.run([sys.executable, "-c", converts], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "openvino.tools.ovc.telemetry_stub"]
    assert (tmp_path / "relu.xml").is_file() and list(home.iterdir()) == [], sorted(home.rglob("*"))


def _write_relu_graph(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    shape = [1, 1, 4, 4, 4]
    graph = helper.make_graph(
        [helper.make_node("Relu", ["volume"], ["out"])],
        "relu",
        [helper.make_tensor_value_info("volume", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_only_the_engine_module_imports_openvino():
    """The telemetry block works only if OpenVINO is first imported through classifier.openvino_engine."""

    def imports_openvino(path: Path) -> bool:
        return any(line.lstrip().startswith(("import openvino", "from openvino ")) for line in path.read_text().splitlines())

    importers = [path.relative_to(ROOT).as_posix() for path in ROOT.rglob("*.py") if ".venv" not in path.parts and imports_openvino(path)]
    assert importers == ["classifier/openvino_engine.py"]
