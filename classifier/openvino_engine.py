"""The classifier run by OpenVINO on the CPU: what the `cpu` target serves.

Why OpenVINO: of the CPU engines compared side by side on this network (`python -m
benchmarks.cpu_engines`: ONNX Runtime, OpenVINO, PyTorch eager, channels-last and compiled), it
ties for the fastest that passes FP32 parity without a minute of compiling at every start, and it
is the CPU engine Triton deployments use (the NGC image has an OpenVINO backend that loads the same
IR files). Imports numpy and openvino only, so the
served CPU model loads without PyTorch.

Choices:
- FP32 inference by default (`INFERENCE_PRECISION_HINT f32`): on CPUs with BF16 or AMX, OpenVINO
  would otherwise lower the precision by itself, and export's FP32 parity proof is for FP32.
- `precision="bf16"` is the explicit opt-in (`INFERENCE_PRECISION_HINT bf16`): on a CPU with BF16
  instructions (AVX512_BF16, AMX) OpenVINO computes in BF16 (at S=256 on 2 cores of a Zen 4 EPYC:
  9.8 s per study against 19.8 s at f32; export holds it to the bound of the half-precision
  targets). On a CPU without them,
  OpenVINO's CPU plugin ignores the hint (no error, no warning) and computes in f32; the precision
  the compiled model actually uses is read back after compiling: `precision_in_use`.
- One stream, latency hint, `threads` inference threads: one study's forward pass uses every
  thread it is given; more instances split the CPU budget between them (the served model does that
  arithmetic from its config).
- The input shape is fixed at load, [1, 1, S, S, S], and a batch runs volume by volume: OpenVINO
  plans its kernels for that one shape, which measured faster than a dynamic batch axis, and on a
  CPU a batch gains no throughput over its volumes one after another (the cores are already busy).
- No call home: `import openvino` (its converter, ovc) sends usage events to Google Analytics unless
  a consent file under $HOME says otherwise, so every export and every load of the served model
  would try to reach the internet from a hospital's server. Without the openvino_telemetry package
  ovc falls back to its own stub that sends nothing; this module makes that package unimportable
  before it imports openvino, and every import of OpenVINO in the project goes through it.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.modules.setdefault("openvino_telemetry", None)  # None: `import openvino_telemetry` raises ImportError

import openvino as ov  # noqa: E402  (after the line above, or it would send)

PRECISIONS = {"fp32": "f32", "bf16": "bf16"}  # the precisions offered -> OpenVINO's INFERENCE_PRECISION_HINT
_IN_USE = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}  # OpenVINO's element type name -> ours


class OpenVINOClassifier:
    """[B, 1, S, S, S] float32 volumes -> probabilities [B, 2] float32, on the CPU.

    `precision` is what was asked for; `precision_in_use` what OpenVINO compiled (fp32 where the
    CPU has no BF16 instructions, whatever was asked)."""

    def __init__(self, path: str | os.PathLike, *, size: int, threads: int, precision: str = "fp32"):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer, not {threads!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        core = ov.Core()
        model = core.read_model(os.fspath(path))
        model.reshape([1, 1, size, size, size])
        self.size = size
        self.threads = threads
        self.precision = precision
        self.compiled = core.compile_model(
            model,
            "CPU",
            {
                "PERFORMANCE_HINT": "LATENCY",
                "NUM_STREAMS": "1",
                "INFERENCE_NUM_THREADS": threads,
                "INFERENCE_PRECISION_HINT": PRECISIONS[precision],
            },
        )
        in_use = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "f32", "bf16"
        self.precision_in_use = _IN_USE.get(in_use, in_use)
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
