"""Export the trained MedicalNet ResNet-34 (`classifier`) to OpenVINO IR / ONNX / TensorRT / PyTorch weights for a Triton model repository.

Public API:
- load_checkpoint(path) / demo_weights(seed) -> Weights; build_classifier(weights) -> eval-mode model.
- write_repository(out_dir=None, *, target, checkpoint | demo_weights, ...) -> ExportResult: the
  artifacts into the committed model_repository/, or a rendered copy at other serving options.
- target_configs / render_configs / serving_options / parse_config: the repository's configs.
- check_openvino_parity / check_parity / check_torch_parity -> ParityReport: what a target serves
  (OpenVINO IR, ONNX graphs, the PyTorch engine) vs torch FP32.
- ExportError and its subclasses: every user-facing failure, one clear line (sizes and operating
  points are checked by `contract`, whose ContractError is the other error a caller sees).
"""

from .checkpoint import DEMO_PROVENANCE, Weights, build_classifier, demo_weights, file_sha256, load_checkpoint
from .errors import ArchitectureError, CheckpointError, ExportError, OutputFolderError, TargetUnavailableError
from .parity import ParityReport, check_openvino_parity, check_parity, check_torch_parity
from .repository import (
    COMMITTED,
    MARKER,
    TARGETS,
    ExportResult,
    ServingOptions,
    config_path,
    parse_config,
    render_configs,
    serving_options,
    target_configs,
    write_repository,
)

__all__ = [
    "COMMITTED",
    "DEMO_PROVENANCE",
    "MARKER",
    "TARGETS",
    "ArchitectureError",
    "CheckpointError",
    "ExportError",
    "ExportResult",
    "OutputFolderError",
    "ParityReport",
    "ServingOptions",
    "TargetUnavailableError",
    "Weights",
    "build_classifier",
    "check_openvino_parity",
    "check_parity",
    "check_torch_parity",
    "config_path",
    "demo_weights",
    "file_sha256",
    "load_checkpoint",
    "parse_config",
    "render_configs",
    "serving_options",
    "target_configs",
    "write_repository",
]
