"""The served ONNX graph: ResNet-34 + softmax, FP32 and FP16, with dynamic batch and spatial axes.

One graph serves every S (the network is fully convolutional up to the pooling), so parity can be
proven at a small size and the same file deployed at 256^3.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from classifier.network import ResNet34Classifier, WithSoftmax
from settings import NAMES

# Opset 17: run by ONNX Runtime 1.32 and parsed by TensorRT 10.5 (NGC 24.10); has every op used here.
OPSET = 17
_TRACE_SIZE = 32  # the trace only fixes the graph; all spatial axes are dynamic
DYNAMIC_AXES = {
    NAMES.volume: {0: "batch", 2: "depth", 3: "height", 4: "width"},
    NAMES.probabilities: {0: "batch"},
}


@dataclass(frozen=True)
class GraphCheck:
    """What onnx.checker and shape inference say about a written graph."""

    path: str
    opset: int
    input_shape: list  # ints for fixed axes, names for dynamic ones
    output_shape: list
    node_count: int
    precision_warnings: int = 0  # FP16 conversion: constants outside the float16 range (clamped)


def export_fp32(classifier: ResNet34Classifier, path: Path) -> None:
    """Trace classifier + softmax to ONNX (TorchScript exporter: no onnxscript dependency)."""
    model = WithSoftmax(classifier).eval()
    example = torch.zeros(1, 1, _TRACE_SIZE, _TRACE_SIZE, _TRACE_SIZE)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[NAMES.volume],
            output_names=[NAMES.probabilities],
            dynamic_axes=DYNAMIC_AXES,
            do_constant_folding=True,
        )


def convert_fp16(source: Path, target: Path) -> int:
    """FP16 weights and compute, FP32 input and output (clients and Triton configs stay FP32).

    Returns how many constants the converter had to clamp into the float16 range.
    """
    from onnxconverter_common import float16  # only this target needs it; GPU machines serving torch-gpu lack it

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = float16.convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(model, str(target))
    return sum(1 for warning in caught if "truncated" in str(warning.message))


def _dims(value_info) -> list:
    return [dim.dim_param or dim.dim_value for dim in value_info.type.tensor_type.shape.dim]


def check_graph(path: Path, precision_warnings: int = 0) -> GraphCheck:
    """onnx.checker (full) and strict shape inference; confirms the I/O contract with Triton."""
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True)
    (volume,), (probabilities,) = model.graph.input, model.graph.output
    if volume.name != NAMES.volume or probabilities.name != NAMES.probabilities:
        raise RuntimeError(f"{path.name}: graph I/O is {volume.name} -> {probabilities.name}")
    input_shape, output_shape = _dims(volume), _dims(probabilities)
    if input_shape[1] != 1 or len(input_shape) != 5 or output_shape[1:] != [len(NAMES.labels)]:
        raise RuntimeError(f"{path.name}: unexpected shapes {input_shape} -> {output_shape}")
    return GraphCheck(
        path=path.name,
        opset=max(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")),
        input_shape=input_shape,
        output_shape=output_shape,
        node_count=len(model.graph.node),
        precision_warnings=precision_warnings,
    )
