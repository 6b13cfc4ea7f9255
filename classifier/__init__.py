"""The network and the engines that run it: what export converts, and what the ct_classifier model
serves. Imports only `settings` and, on first use of a name, the engine that name needs: torch for
the network and the PyTorch engine, openvino for the OpenVINO one, so that the served CPU model
loads without PyTorch.

Public API:
- ResNet34Classifier: MedicalNet's 3D ResNet-34 (layout and key names) with GAP + FC, logits [B, 2];
  `ResNet34Classifier.from_state_dict(state)` builds it with exactly those weights.
- TorchClassifier: the network on a device at a precision (fp32, fp16, bf16), volumes in,
  probabilities out; PRECISIONS names them. What the torch-gpu target serves.
- OpenVINOClassifier: the exported graph as OpenVINO IR on the CPU at FP32 (or BF16, opted in); what the cpu target
  serves. `convert_to_openvino(onnx, xml)` writes that IR.
- file_sha256(path): the checksum provenance records for exported files.
"""

from .provenance import file_sha256

_LAZY = {
    "ResNet34Classifier": ("network", "ResNet34Classifier"),
    "TorchClassifier": ("engine", "TorchClassifier"),
    "PRECISIONS": ("engine", "PRECISIONS"),
    "OpenVINOClassifier": ("openvino_engine", "OpenVINOClassifier"),
    "convert_to_openvino": ("openvino_engine", "convert"),
}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        module, attribute = _LAZY[name]
        return getattr(import_module(f".{module}", __name__), attribute)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PRECISIONS", "OpenVINOClassifier", "ResNet34Classifier", "TorchClassifier", "convert_to_openvino", "file_sha256"]
