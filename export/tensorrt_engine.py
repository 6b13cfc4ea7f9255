"""FP16 TensorRT engine for the `tensorrt` target, built on the GPU that will serve it.

A plan file is specific to the GPU model and the TensorRT release, so it is built where it runs
(inside nvcr.io/nvidia/tritonserver:24.10-py3, TensorRT 10.5), never shipped.
"""

from __future__ import annotations

from pathlib import Path

from settings import NAMES, SERVING

from .errors import ExportError, TargetUnavailableError


def require_tensorrt():
    """The TensorRT module, or one clear error line when this machine cannot build engines."""
    try:
        import tensorrt
    except ImportError:
        raise TargetUnavailableError(
            "target tensorrt needs the TensorRT Python API and an NVIDIA GPU (e.g. inside "
            "nvcr.io/nvidia/tritonserver:24.10-py3); not available here: use --target cpu or onnx-gpu"
        ) from None
    return tensorrt


def build_engine(onnx_path: Path, plan_path: Path, *, size: int, max_batch_size: int) -> None:
    """Parse the FP32 ONNX graph and build an FP16 engine for batch 1..max_batch_size at size^3."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except Exception as error:  # TensorRT raises when CUDA cannot initialise (no GPU, no driver)
        raise TargetUnavailableError(f"target tensorrt needs an NVIDIA GPU: TensorRT says {error}") from None
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, SERVING.tensorrt_workspace_bytes)
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    volume = (1, size, size, size)
    profile.set_shape(NAMES.volume, (1, *volume), (max_batch_size, *volume), (max_batch_size, *volume))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT failed to build the engine (see the TensorRT log above)")
    plan_path.write_bytes(bytes(serialized))
