"""The network and the PyTorch engine that runs it: what export converts, and what the torch-gpu
target serves. Imports only torch and `settings`, so the models in model_repository/ may load it.

Public API:
- ResNet34Classifier: MedicalNet's 3D ResNet-34 (layout and key names) with GAP + FC, logits [B, 2];
  `ResNet34Classifier.from_state_dict(state)` builds it with exactly those weights.
- TorchClassifier: the network on a device at a precision (fp32, fp16, bf16), volumes in,
  probabilities out; PRECISIONS names them.
- file_sha256(path): the checksum provenance records for exported files.
"""

from .engine import PRECISIONS, TorchClassifier, file_sha256
from .network import ResNet34Classifier

__all__ = ["PRECISIONS", "ResNet34Classifier", "TorchClassifier", "file_sha256"]
