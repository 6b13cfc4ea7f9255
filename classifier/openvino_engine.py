"""The classifier run by OpenVINO on the CPU: what the `cpu` target serves.

Why OpenVINO: of the CPU engines compared side by side on this network (`python -m
benchmarks.cpu_engines`: ONNX Runtime, OpenVINO, PyTorch eager, channels-last and compiled), it
ties for the fastest that passes FP32 parity without a minute of compiling at every start, and it
is the CPU engine Triton deployments use (the NGC image has an OpenVINO backend that loads the same
IR files). Imports numpy and openvino only, so the
served CPU model loads without PyTorch.

Choices:
- FP32 inference (`INFERENCE_PRECISION_HINT f32`): on CPUs with BF16 or AMX, OpenVINO would
  otherwise lower the precision by itself, and the parity proof is for FP32.
- One stream, latency hint, `threads` inference threads: one study's forward pass uses every
  thread it is given; more instances split the CPU budget between them (the served model does that
  arithmetic from its config).
- The input shape is fixed at load, [1, 1, S, S, S], and a batch runs volume by volume: OpenVINO
  plans its kernels for that one shape, which measured faster than a dynamic batch axis, and on a
  CPU a batch gains no throughput over its volumes one after another (the cores are already busy).
"""

from __future__ import annotations

import os

import numpy as np
import openvino as ov


class OpenVINOClassifier:
    """[B, 1, S, S, S] float32 volumes -> probabilities [B, 2] float32, on the CPU."""

    def __init__(self, path: str | os.PathLike, *, size: int, threads: int):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer, not {threads!r}")
        core = ov.Core()
        model = core.read_model(os.fspath(path))
        model.reshape([1, 1, size, size, size])
        self.size = size
        self.threads = threads
        self.compiled = core.compile_model(
            model,
            "CPU",
            {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"},
        )
        self.request = self.compiled.create_infer_request()

    def __call__(self, volumes: np.ndarray) -> np.ndarray:
        """Probabilities for a batch; one call at a time (the served model runs one batch at a time)."""
        if volumes.ndim != 5 or volumes.shape[1:] != (1, self.size, self.size, self.size):
            raise ValueError(f"volumes must be [B, 1, {self.size}, {self.size}, {self.size}], not {list(volumes.shape)}")
        probabilities = []
        for volume in volumes:
            self.request.infer({0: np.ascontiguousarray(volume[None], dtype=np.float32)})
            probabilities.append(self.request.get_output_tensor(0).data.copy())
        return np.concatenate(probabilities)


def convert(onnx_path: str | os.PathLike, ir_path: str | os.PathLike) -> None:
    """The exported ONNX graph as OpenVINO IR (model.xml + model.bin beside it), weights kept FP32."""
    ov.save_model(ov.convert_model(os.fspath(onnx_path)), os.fspath(ir_path), compress_to_fp16=False)


def openvino_version() -> str:
    """The runtime's version, as provenance records it (the IR format follows the release that wrote it)."""
    return ov.get_version().split("-")[0]
