"""Export the trained MedicalNet ResNet-34 to ONNX / TensorRT inside a complete Triton repository.

Public API:
- ResNet34Classifier: the network (MedicalNet layout and key names, GAP + FC, logits [B, 2]).
- load_checkpoint(path) / demo_weights(seed) -> Weights; build_classifier(weights) -> eval-mode model.
- write_repository(out_dir, *, target, size, checkpoint | demo_weights, ...) -> ExportResult.
- render_configs(target, values) / template_values(...) / parse_config(text, source): the config templates.
- check_parity(...) -> ParityReport: torch FP32 vs ONNX Runtime FP32 vs FP16.
- ExportError and its subclasses: every user-facing failure, one clear line.
"""
from .checkpoint import DEMO_PROVENANCE, Weights, build_classifier, demo_weights, file_sha256, load_checkpoint
from .errors import (
    ArchitectureError,
    CheckpointError,
    ExportError,
    InvalidSizeError,
    OutputFolderError,
    TargetUnavailableError,
)
from .network import ResNet34Classifier
from .parity import ParityReport, check_parity
from .repository import (
    MARKER,
    TARGETS,
    ExportResult,
    parse_config,
    render_configs,
    template_values,
    validate_size,
    write_repository,
)

__all__ = [
    "DEMO_PROVENANCE",
    "MARKER",
    "TARGETS",
    "ArchitectureError",
    "CheckpointError",
    "ExportError",
    "ExportResult",
    "InvalidSizeError",
    "OutputFolderError",
    "ParityReport",
    "ResNet34Classifier",
    "TargetUnavailableError",
    "Weights",
    "build_classifier",
    "check_parity",
    "demo_weights",
    "file_sha256",
    "load_checkpoint",
    "parse_config",
    "render_configs",
    "template_values",
    "validate_size",
    "write_repository",
]
