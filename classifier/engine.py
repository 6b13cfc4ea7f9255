"""The classifier run by PyTorch on a device: what the `torch-gpu` target serves.

Why PyTorch: the Python backend is the one backend every tritonserver has (the bundled one has no
ONNX Runtime or TensorRT backend), so this is the GPU path that runs in any server whose Python
environment has a CUDA build of PyTorch, the NGC image included. The same class is what export's
parity check and `benchmarks/gpu_check.py` measure, so the numbers are those of the served code.

Choices (each a parameter of the served config, measured by gpu_check.sh):
- precision: FP16 by default (tensor cores; parity with FP32 is checked), BF16, or FP32. FP32 is
  IEEE FP32: TF32 convolutions are switched off for it, so it stays the exact reference the FP16
  path is judged by.
- channels-last 3D memory format (cuDNN's fastest layout for 3-D convolutions in half precision).
- cuDNN autotuning (`cudnn.benchmark`): the algorithm per input shape is chosen on the first batch of
  that shape; the served config's warm-ups, one per batch size the dynamic batcher forms, pay for it at load.
Softmax runs in FP32 on the (half-precision) logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .network import ResNet34Classifier

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchClassifier:
    """[B, 1, S, S, S] float32 volumes -> probabilities [B, 2] float32, on one device."""

    def __init__(
        self,
        classifier: ResNet34Classifier,
        *,
        device: str | torch.device = "cuda",
        precision: str = "fp16",
        channels_last: bool = True,
        cudnn_benchmark: bool = True,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.device = torch.device(device)
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = cudnn_benchmark
            torch.backends.cudnn.allow_tf32 = precision != "fp32"  # convolutions only: matmuls elsewhere in the process stay IEEE
        self.model = classifier.eval().to(device=self.device, dtype=self.dtype, memory_format=self.memory_format)

    @classmethod
    def from_file(cls, path: str | Path, **options) -> TorchClassifier:
        """Weights as export writes them (a plain state_dict), read with weights-only loading."""
        return cls(ResNet34Classifier.from_state_dict(torch.load(path, map_location="cpu", weights_only=True)), **options)

    def __call__(self, volumes: torch.Tensor) -> torch.Tensor:
        """Probabilities on this engine's device; the input may live on any device."""
        with torch.inference_mode():
            x = volumes.to(device=self.device, dtype=self.dtype, non_blocking=True).contiguous(memory_format=self.memory_format)
            return torch.softmax(self.model(x).float(), dim=1)
