"""The generated repository: layout, configs for every target, provenance, parity, safe output folder."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import export
from export.repository import TEMPLATES, _copy_model_files
from settings import NAMES
from tests.conftest import TEST_SIZE, run_module

SIZE = TEST_SIZE  # small S: the graph has dynamic spatial axes, so nothing here depends on S


@dataclass(frozen=True)
class Exported:
    repository: Path
    provenance: dict


@pytest.fixture(scope="module")
def exported(triton_repository) -> Exported:
    """The session's repository (conftest: write_repository, cpu target, demo weights, TEST_SIZE)."""
    provenance = json.loads((triton_repository / NAMES.classifier / "provenance.json").read_text())
    return Exported(triton_repository, provenance)


def test_template_caches_are_not_copied(tmp_path):
    """Bytecode beside a template's model.py stays behind (the session repository itself gains a
    __pycache__ once the server has imported its model.py, so this is checked on its own)."""
    template = tmp_path / "ct_example"
    (template / "1" / "__pycache__").mkdir(parents=True)
    (template / "1" / "model.py").write_text("")
    (template / "1" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"")
    destination = tmp_path / "out"
    config = 'name: "ct_example"\nbackend: "python"\n'
    _copy_model_files(template, destination, config)
    assert sorted(p.relative_to(destination).as_posix() for p in destination.rglob("*")) == ["1", "1/model.py"]


def test_layout(exported):
    repo = exported.repository
    assert (repo / export.MARKER).is_file()
    templates = sorted(p.name for p in TEMPLATES.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == templates
    for model in templates:
        assert (repo / model / "config.pbtxt").is_file()
        assert not list((repo / model).glob("config.*.pbtxt"))  # templates are rendered, not copied
    classifier = repo / NAMES.classifier
    for name in ("1/model.onnx", "1/model.py", "labels.txt", "weights.pt", "provenance.json", "parity.json",
                 "model.fp16.onnx"):
        assert (classifier / name).is_file(), name
    assert (classifier / "labels.txt").read_text().split() == ["normal", "pathology"]


def test_every_config_parses_and_agrees_on_size(exported):
    for config_path in exported.repository.glob("*/config.pbtxt"):
        config = export.parse_config(config_path.read_text(), str(config_path))
        assert config.name == config_path.parent.name
    classifier = export.parse_config((exported.repository / NAMES.classifier / "config.pbtxt").read_text(), "cpu")
    assert classifier.backend == "python" and list(classifier.input[0].dims) == [1, SIZE, SIZE, SIZE]
    assert "${" not in "".join(p.read_text() for p in exported.repository.glob("*/config.pbtxt"))


def test_no_absolute_paths_in_repository(exported):
    for path in exported.repository.rglob("*"):
        if path.is_file() and path.suffix in (".pbtxt", ".json", ".txt", ".py"):
            assert str(exported.repository) not in path.read_text() and "/work/" not in path.read_text(), path


@pytest.mark.parametrize("target", export.TARGETS)
def test_configs_for_every_target_parse_as_triton_model_config(target):
    provenance = {"checkpoint": "demo, untrained", "note": 'quotes " and \\ backslashes'}
    values = export.template_values(size=256, provenance=provenance, max_batch_size=4,
                                    max_queue_delay_microseconds=20000, preprocess_instances=2, threshold=0.35)
    configs = export.render_configs(target, values)
    assert NAMES.classifier in configs
    config = export.parse_config(configs[NAMES.classifier], target)
    assert config.max_batch_size == 4 and config.dynamic_batching.max_queue_delay_microseconds == 20000
    (volume,), (probabilities,) = config.input, config.output
    assert (volume.name, list(volume.dims)) == (NAMES.volume, [1, 256, 256, 256])
    assert (probabilities.name, list(probabilities.dims), probabilities.label_filename) == (
        NAMES.probabilities, [2], "labels.txt")
    assert json.loads(config.parameters["provenance"].string_value) == provenance
    kind = config.instance_group[0].kind
    if target == "cpu":
        assert config.backend == "python" and kind == config.instance_group[0].KIND_CPU
    else:
        assert kind == config.instance_group[0].KIND_GPU
    if target == "onnx-gpu":
        (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
        assert config.platform == "onnxruntime_onnx" and accelerator.name == "tensorrt"
        assert accelerator.parameters["precision_mode"] == "FP16"
        assert accelerator.parameters["trt_engine_cache_enable"] == "1"
    if target == "tensorrt":
        assert config.platform == "tensorrt_plan"


def test_provenance_is_served_with_the_config(exported):
    provenance = exported.provenance
    assert provenance["checkpoint"] == export.DEMO_PROVENANCE and provenance["size"] == SIZE
    assert provenance["precision"] == "fp32" and provenance["target"] == "cpu" and "exported_at" in provenance
    config = export.parse_config((exported.repository / NAMES.classifier / "config.pbtxt").read_text(), "cpu")
    assert json.loads(config.parameters["provenance"].string_value) == provenance


def test_parity_report_within_bounds(exported):
    report = json.loads((exported.repository / NAMES.classifier / "parity.json").read_text())
    assert report["passed"] and report["size"] == SIZE and len(report["inputs"]) >= 6
    assert report["onnx_fp32_vs_torch"]["max_abs_diff"] <= 1e-4
    assert report["onnx_fp16_vs_onnx_fp32"]["max_abs_diff"] <= 1e-2
    assert report["onnx_fp32_vs_torch"]["decisions_agree"] and report["onnx_fp16_vs_onnx_fp32"]["decisions_agree"]
    assert report["batch_size"] > 1 and report["batch_vs_single_max_abs_diff"] <= 1e-5
    fp32, fp16 = report["graphs"]
    assert fp32["opset"] == 17 and fp32["input_shape"] == ["batch", 1, "depth", "height", "width"]
    assert fp16["output_shape"] == ["batch", 2]


def test_kept_weights_load_safely_and_match_the_onnx_graph_at_another_size(exported):
    classifier_dir = exported.repository / NAMES.classifier
    state = torch.load(classifier_dir / "weights.pt", weights_only=True)
    assert export.file_sha256(classifier_dir / "weights.pt") == exported.provenance["weights_sha256"]
    model = export.build_classifier(export.Weights(state, "kept", "state_dict", False))
    x = np.random.default_rng(3).uniform(-1, 1, (2, 1, 24, 40, 48)).astype(np.float32)  # not the export S
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()
    session = ort.InferenceSession(str(classifier_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    actual = session.run([NAMES.probabilities], {NAMES.volume: x})[0]
    assert np.abs(actual - expected).max() <= 1e-4 and np.allclose(actual.sum(axis=1), 1, atol=1e-6)


def test_parity_detects_a_graph_that_is_not_the_checkpoint(exported):
    classifier_dir = exported.repository / NAMES.classifier
    state = torch.load(classifier_dir / "weights.pt", weights_only=True)
    state["fc.bias"] = state["fc.bias"] + torch.tensor([0.0, 0.5])  # a different head
    other = export.build_classifier(export.Weights(state, "other", "state_dict", False))
    report = export.check_parity(other, classifier_dir / "1" / "model.onnx", classifier_dir / "model.fp16.onnx",
                                 size=16, threshold=0.5)
    assert not report.passed and report.onnx_fp32_vs_torch.max_abs_diff > 1e-2
    assert any("onnx_fp32_vs_torch" in failure for failure in report.failures)


def test_user_folder_is_never_replaced(tmp_path):
    folder = tmp_path / "my_models"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(export.OutputFolderError, match="not written by export"):
        export.write_repository(folder, target="cpu", size=32, demo_weights=True)
    assert (folder / "notes.txt").read_text() == "mine" and len(list(folder.iterdir())) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_models"]  # no staging left behind


@pytest.mark.parametrize("size", [30, 8, 0, 1024])
def test_bad_sizes(tmp_path, size):
    with pytest.raises(export.InvalidSizeError, match="multiple of 8 between 16 and 512"):
        export.write_repository(tmp_path / "repo", target="cpu", size=size, demo_weights=True)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "option, value, message",
    [("threshold", 1.5, r"threshold must be a number in \[0, 1\]"), ("threshold", "high", "threshold must be a number"),
     ("max_batch_size", 0, "max batch size must be an integer of at least 1"),
     ("max_queue_delay_microseconds", -1, "max queue delay must be an integer of at least 0")],
)
def test_bad_serving_options_are_refused_before_any_work(tmp_path, option, value, message):
    """The operating point follows the one rule ct_postprocess and set_threshold apply."""
    with pytest.raises(export.ExportError, match=message):
        export.write_repository(tmp_path / "repo", target="cpu", size=16, demo_weights=True, **{option: value})
    assert not list(tmp_path.iterdir())


def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_module("export", *args, timeout=600)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--checkpoint", "missing.pth", "--size", "32"], "checkpoint not found"),
        (["--demo-weights", "--size", "36"], "size 36 is not usable"),
        (["--demo-weights", "--size", "32", "--target", "tensorrt"], "needs the TensorRT Python API"),
    ],
)
def test_cli_bad_input_is_one_clear_line(tmp_path, args, message):
    if "--target" not in args:
        args = [*args, "--target", "cpu"]
    result = _cli(*args, "--out", str(tmp_path / "repo"))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("export: error:"), result.stderr
    assert not (tmp_path / "repo").exists()


def test_cli_exports_a_medicalnet_checkpoint_over_an_earlier_export(exported, tmp_path):
    """End to end: MedicalNet release format in, repository replaced in place, loud warning out."""
    state = torch.load(exported.repository / NAMES.classifier / "weights.pt", weights_only=True)
    backbone = {f"module.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    seg_head = {"module.conv_seg.0.weight": torch.randn(512, 32, 2, 2, 2), "module.conv_seg.6.weight": torch.randn(2, 32, 1, 1, 1)}
    checkpoint = tmp_path / "resnet_34.pth"
    torch.save({"state_dict": {**backbone, **seg_head}}, checkpoint)
    repo = tmp_path / "repo"
    shutil.copytree(exported.repository, repo)  # an earlier export (it carries the marker)
    result = _cli("--checkpoint", str(checkpoint), "--target", "onnx-gpu", "--size", "16", "--out", str(repo))
    assert result.returncode == 0, result.stderr
    assert "UNTRAINED" in result.stderr and "PASSED" in result.stdout
    provenance = json.loads((repo / NAMES.classifier / "provenance.json").read_text())
    assert provenance["checkpoint"] == "sha256:" + export.file_sha256(checkpoint)
    assert provenance["checkpoint_format"] == "medicalnet" and provenance["target"] == "onnx-gpu"
    assert not (repo / NAMES.classifier / "1" / "model.py").exists()  # the ONNX Runtime backend runs model.onnx
    config = export.parse_config((repo / NAMES.classifier / "config.pbtxt").read_text(), "onnx-gpu")
    assert config.platform == "onnxruntime_onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo", "resnet_34.pth"]  # old export removed
