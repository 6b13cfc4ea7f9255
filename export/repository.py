"""Writes a complete Triton model repository for one target from the committed templates.

Every folder under model_repository/ is copied, its config template rendered with the same values
(S, batching, threshold, provenance) so all models agree; ct_classifier gets the exported graph,
its labels, the weights it was exported from and the parity report. The result holds no absolute
paths, so it can be copied into a container or a volume as is.
"""
from __future__ import annotations

import json
import shutil
import string
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from serve.decision import DecisionError, parse_threshold
from settings import NAMES, OPERATING_POINT, PREPROCESSING, SERVING

from . import onnx_graph, parity, tensorrt_engine
from .checkpoint import DEMO_PROVENANCE, Weights, build_classifier, file_sha256, load_checkpoint
from .checkpoint import demo_weights as make_demo_weights
from .errors import ExportError, InvalidSizeError, OutputFolderError

TEMPLATES = Path(__file__).resolve().parent.parent / "model_repository"
TARGETS = ("cpu", "onnx-gpu", "tensorrt")
PRECISION = {"cpu": "fp32", "onnx-gpu": "fp32 graph, fp16 TensorRT accelerator", "tensorrt": "fp16"}
MARKER = ".ct-triage-export.json"  # says "export wrote this folder": only such folders are ever replaced
SIZE_MULTIPLE = 8  # stem stride 2, max-pool stride 2, layer2 stride 2
MIN_SIZE = 16  # below this the dilated layers see almost only padding
MAX_SIZE = 512
WEIGHTS_FILE = "weights.pt"
PROVENANCE_FILE = "provenance.json"
PARITY_FILE = "parity.json"
LABELS_FILE = "labels.txt"
FP16_FILE = "model.fp16.onnx"


@dataclass(frozen=True)
class ExportResult:
    """What write_repository produced."""

    repository: Path
    provenance: dict
    parity: parity.ParityReport
    timings_s: dict


def validate_size(size: int, what: str = "size") -> int:
    """S must survive the network's three stride-2 stages and leave the dilated layers real voxels."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise InvalidSizeError(f"{what} must be an integer, got {size!r}")
    if size % SIZE_MULTIPLE or not MIN_SIZE <= size <= MAX_SIZE:
        raise InvalidSizeError(
            f"{what} {size} is not usable: it must be a multiple of {SIZE_MULTIPLE} between {MIN_SIZE} and {MAX_SIZE}"
        )
    return size


def _check_integer(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ExportError(f"{name} must be an integer of at least {minimum}, got {value!r}")


def pbtxt_string(text: str) -> str:
    """Escape text for the inside of a double-quoted protobuf text-format string."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def template_values(*, size: int, provenance: dict, max_batch_size: int, max_queue_delay_microseconds: int,
                    preprocess_instances: int, threshold: float) -> dict[str, str]:
    """The placeholders every config.pbtxt template may use; queue bounds and the TensorRT workspace come
    from settings.SERVING."""
    return {
        "queue_timeout_microseconds": str(int(SERVING.request_timeout_s * 1_000_000)),
        "max_queue_size": str(SERVING.max_queue_size),
        "postprocess_queue_timeout_microseconds": str(int(SERVING.postprocess_queue_timeout_s * 1_000_000)),
        "postprocess_max_queue_size": str(SERVING.postprocess_max_queue_size),
        "tensorrt_workspace_bytes": str(SERVING.tensorrt_workspace_bytes),
        "size": str(size),
        "max_batch_size": str(max_batch_size),
        "max_queue_delay_microseconds": str(max_queue_delay_microseconds),
        "preprocess_instances": str(preprocess_instances),
        "threshold": repr(float(threshold)),
        "provenance": pbtxt_string(json.dumps(provenance, sort_keys=True, separators=(",", ":"))),
    }


def _model_folders(templates: Path) -> list[Path]:
    folders = sorted(p for p in templates.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if not any(folder.name == NAMES.classifier for folder in folders):
        raise ExportError(f"template folder {templates} has no {NAMES.classifier} model")
    return folders


def _template_for(folder: Path, target: str) -> Path:
    for candidate in (folder / f"config.{target}.pbtxt", folder / "config.pbtxt"):
        if candidate.is_file():
            return candidate
    raise ExportError(f"model template {folder.name} has neither config.{target}.pbtxt nor config.pbtxt")


def parse_config(text: str, source: str) -> model_config_pb2.ModelConfig:
    """Parse as Triton's ModelConfig protobuf: what the server will do at load time, done now."""
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as error:
        raise ExportError(f"{source} is not a valid Triton model config: {error}") from None


def render_configs(target: str, values: dict[str, str], templates: Path = TEMPLATES) -> dict[str, str]:
    """model name -> rendered, parsed and name-checked config.pbtxt text for this target."""
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    rendered = {}
    for folder in _model_folders(templates):
        template = _template_for(folder, target)
        try:
            text = string.Template(template.read_text()).substitute(values)
        except (KeyError, ValueError) as error:
            raise ExportError(f"{folder.name}/{template.name}: unknown or malformed placeholder {error}") from None
        config = parse_config(text, f"{folder.name}/{template.name}")
        if config.name and config.name != folder.name:
            raise ExportError(f"{folder.name}/{template.name} names the model {config.name!r}, not {folder.name!r}")
        rendered[folder.name] = text
    return rendered


def _copy_model_files(folder: Path, destination: Path, config_text: str) -> None:
    """Copy a model's committed files; a model.py only where the rendered config runs the Python backend."""
    python_backend = parse_config(config_text, folder.name).backend == "python"
    for source in sorted(folder.rglob("*")):
        relative = source.relative_to(folder)
        if (
            not source.is_file()
            or "__pycache__" in relative.parts
            or source.suffix == ".pyc"
            or (len(relative.parts) == 1 and source.name.startswith("config") and source.suffix == ".pbtxt")
            or (source.name == "model.py" and not python_backend)
        ):
            continue
        (destination / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination / relative)


def _check_output_folder(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputFolderError(f"output {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
        raise OutputFolderError(
            f"output folder {out_dir} exists, is not empty and was not written by export: refusing to replace it"
        )


def _install(staging: Path, out_dir: Path) -> None:
    """Move the finished repository into place; an older export there is replaced only at the end."""
    if out_dir.is_dir() and any(out_dir.iterdir()):
        retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        out_dir.rename(retired / out_dir.name)
        staging.rename(out_dir)
        shutil.rmtree(retired)
    else:
        if out_dir.is_dir():
            out_dir.rmdir()  # empty: nothing of the user's is lost
        staging.rename(out_dir)


def write_repository(
    out_dir: str | Path,
    *,
    target: str,
    size: int = PREPROCESSING.size,
    checkpoint: str | Path | None = None,
    demo_weights: bool = False,
    max_batch_size: int = SERVING.max_batch_size,
    max_queue_delay_microseconds: int = SERVING.max_queue_delay_microseconds,
    preprocess_instances: int = SERVING.preprocess_instances,
    threshold: float = OPERATING_POINT.threshold,
    parity_size: int | None = None,
    templates: Path = TEMPLATES,
) -> ExportResult:
    """Export the classifier and write a complete Triton repository for `target` into out_dir.

    Fails (ExportError) before writing anything if the inputs are wrong, and without touching
    out_dir if the export or the parity check fails.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    validate_size(size)
    parity_size = validate_size(min(size, parity.MAX_PARITY_SIZE) if parity_size is None else parity_size,
                                "parity size")
    if (checkpoint is None) == (not demo_weights):
        raise ExportError("give exactly one of a checkpoint or demo weights")
    _check_integer("max batch size", max_batch_size, 1)
    _check_integer("preprocess instances", preprocess_instances, 1)
    _check_integer("max queue delay", max_queue_delay_microseconds, 0)
    try:
        threshold = parse_threshold(threshold)  # the rule ct_postprocess and set_threshold apply
    except DecisionError as error:
        raise ExportError(str(error)) from None
    _check_output_folder(out_dir)
    if target == "tensorrt":
        tensorrt_engine.require_tensorrt()  # before minutes of work, not after

    timings: dict[str, float] = {}

    def lap(stage: str, since: float) -> float:
        now = time.perf_counter()
        timings[stage] = round(now - since, 3)
        return now

    mark = time.perf_counter()
    weights: Weights = load_checkpoint(checkpoint) if checkpoint is not None else make_demo_weights()
    classifier = build_classifier(weights)
    mark = lap("weights", mark)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the server may run as another user
    try:
        classifier_dir = staging / NAMES.classifier
        version_dir = classifier_dir / "1"
        version_dir.mkdir(parents=True)
        fp32_path = version_dir / "model.onnx" if target != "tensorrt" else classifier_dir / "model.onnx"
        fp16_path = classifier_dir / FP16_FILE
        onnx_graph.export_fp32(classifier, fp32_path)
        mark = lap("onnx_fp32", mark)
        clamped = onnx_graph.convert_fp16(fp32_path, fp16_path)
        mark = lap("onnx_fp16", mark)
        graphs = [onnx_graph.check_graph(fp32_path), onnx_graph.check_graph(fp16_path, clamped)]
        mark = lap("graph_checks", mark)
        report = parity.check_parity(classifier, fp32_path, fp16_path, size=parity_size, threshold=threshold)
        report.graphs = [vars(graph) for graph in graphs]
        mark = lap("parity", mark)
        (classifier_dir / PARITY_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        if not report.passed:
            raise ExportError("exported graph does not match the checkpoint: " + "; ".join(report.failures))
        if target == "tensorrt":
            tensorrt_engine.build_engine(fp32_path, version_dir / "model.plan", size=size, max_batch_size=max_batch_size)
            mark = lap("tensorrt_engine", mark)

        torch.save(weights.state_dict, classifier_dir / WEIGHTS_FILE)
        provenance = {
            "checkpoint": weights.source if weights.source == DEMO_PROVENANCE else f"sha256:{weights.source}",
            "checkpoint_format": weights.checkpoint_format,
            "classifier_head_trained": weights.head_trained,
            "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "size": size,
            "precision": PRECISION[target],
            "target": target,
            "opset": onnx_graph.OPSET,
            "weights_sha256": file_sha256(classifier_dir / WEIGHTS_FILE),
            "parity": report.summary(),
            "warnings": list(weights.warnings),
        }
        (classifier_dir / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        (classifier_dir / LABELS_FILE).write_text("\n".join(NAMES.labels) + "\n")

        values = template_values(
            size=size, provenance=provenance, max_batch_size=max_batch_size,
            max_queue_delay_microseconds=max_queue_delay_microseconds,
            preprocess_instances=preprocess_instances, threshold=threshold,
        )
        for model, text in render_configs(target, values, templates).items():
            (staging / model).mkdir(exist_ok=True)
            _copy_model_files(templates / model, staging / model, text)
            (staging / model / "config.pbtxt").write_text(text)
        (staging / MARKER).write_text(json.dumps({"written_by": "python -m export", **provenance}, indent=2) + "\n")
        _check_output_folder(out_dir)  # again: someone may have filled it meanwhile
        _install(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    lap("total", started)
    return ExportResult(out_dir, provenance, report, timings)

