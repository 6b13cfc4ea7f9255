"""CLI: python -m export (--checkpoint PATH | --demo-weights) --target T [--out DIR [serving options]]."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from contract import ContractError
from settings import OPERATING_POINT, PREPROCESSING, SERVING

from .errors import ExportError
from .repository import COMMITTED, TARGETS, write_repository

RENDERING = (
    "size",
    "max_batch_size",
    "max_queue_delay_us",
    "preprocess_instances",
    "preprocess_device",
    "explain_device",
    "threshold",
    "precision",
)


class Terminated(BaseException):
    """SIGTERM (docker stop, a Kubernetes Job's deadline, timeout) raised where the export is, as Ctrl-C raises
    KeyboardInterrupt, so that it cleans up the same way (its default action ends the process, staging folders left);
    a BaseException, which `except Exception` lets by."""


def _terminate(signum, frame):
    raise Terminated


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export the ResNet-34 classifier into the Triton model repository (model_repository/), "
        "or render a copy of the repository with other serving options (--out).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", metavar="PATH", help="MedicalNet .pth, Lightning .ckpt or plain state_dict")
    weights.add_argument("--demo-weights", action="store_true", help="seeded untrained weights (no checkpoint)")
    parser.add_argument(
        "--target",
        required=True,
        choices=TARGETS,
        help="what serves the classifier: cpu an OpenVINO IR in a Python-backend model, openvino the IR on the NGC image's "
        "OpenVINO backend, onnx-gpu an ONNX graph on ONNX Runtime (TensorRT accelerator), tensorrt a TensorRT plan, "
        "torch-gpu the PyTorch weights in a Python-backend model on the GPU",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help=f"render a copy here (new, empty, or an earlier copy); omitted: export into {COMMITTED.name}/",
    )
    parser.add_argument(
        "--artifacts", metavar="DIR", help="where what Triton does not serve goes; omitted: <repository>.artifacts beside the repository"
    )
    parser.add_argument(
        "--parity-size",
        type=int,
        default=None,
        metavar="S",
        help="voxels per side of the parity check volumes, at most S; omitted: min(S, 64)",
    )
    rendering = parser.add_argument_group("serving options of a rendered copy (--out; omitted: from settings)")
    rendering.add_argument(
        "--size", type=int, metavar="S", help=f"model input S, voxels per side of the S^3 volume; omitted: {PREPROCESSING.size}"
    )
    rendering.add_argument(
        "--max-batch-size", type=int, metavar="N", help=f"the classifier's max batch size, studies; omitted: {SERVING.max_batch_size}"
    )
    rendering.add_argument(
        "--max-queue-delay-us",
        type=int,
        metavar="MICROSECONDS",
        help="the classifier's batching wait, us; omitted: the target's config (0 on cpu and openvino, 20000 on GPU)",
    )
    rendering.add_argument(
        "--preprocess-instances", type=int, metavar="N", help=f"ct_preprocess instances; omitted: {SERVING.preprocess_instances}"
    )
    rendering.add_argument(
        "--preprocess-device", choices=("cpu", "cuda"), help="cuda: preprocessing on the GPU (KIND_GPU instances); omitted: cpu"
    )
    rendering.add_argument("--explain-device", choices=("cpu", "cuda"), help="cuda: ct_explain on the GPU (KIND_GPU); omitted: cpu")
    rendering.add_argument(
        "--threshold",
        type=float,
        metavar="P",
        help=f"operating point: pathology when P(pathology) >= P; omitted: {OPERATING_POINT.threshold}",
    )
    rendering.add_argument(
        "--precision",
        help="the classifier's precision: cpu fp32 or bf16 (CPUs with AVX512_BF16/AMX; checked against FP32 "
        "within 1e-2, same decisions); torch-gpu fp16, bf16 or fp32; other targets take none; "
        "omitted: the target's config (cpu fp32, torch-gpu fp16)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    given = [f"--{name.replace('_', '-')}" for name in RENDERING if getattr(args, name) is not None]
    if given and args.out is None:
        parser.error(
            f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only to a rendered copy (--out DIR); "
            f"the committed repository's configs set them in {COMMITTED.name}/"
        )
    logging.basicConfig(level=logging.WARNING, format="WARNING: %(message)s")
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        result = write_repository(
            args.out,
            target=args.target,
            checkpoint=args.checkpoint,
            demo_weights=args.demo_weights,
            size=args.size,
            max_batch_size=args.max_batch_size,
            max_queue_delay_microseconds=args.max_queue_delay_us,
            preprocess_instances=args.preprocess_instances,
            preprocess_device=args.preprocess_device,
            explain_device=args.explain_device,
            threshold=args.threshold,
            precision=args.precision,
            parity_size=args.parity_size,
            artifacts_dir=args.artifacts,
        )
    except (ExportError, ContractError) as error:
        print(f"export: error: {error}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as stopped:
        terminated = isinstance(stopped, Terminated)
        print(
            f"export: {'terminated' if terminated else 'interrupted'} (an output folder is replaced only once its export is complete)",
            file=sys.stderr,
        )
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(json.dumps(result.parity.to_dict(), indent=2))
    print(result.parity.summary())
    print(f"weights: {result.provenance['checkpoint']}; timings (s): {json.dumps(result.timings_s)}")
    print(f"not served, kept in: {result.artifacts}")
    serve = f"python -m serve --repository {result.repository}"
    if result.model_config_name:
        serve += f" --model-config-name {result.model_config_name}"
    if args.target in ("openvino", "onnx-gpu", "tensorrt"):  # their backends are in the NGC image's Triton, not the bundled one
        serve += " --tritonserver /opt/tritonserver"
    print(f"repository ready: {result.repository} (target {args.target}, S={result.options.size}); serve it with: {serve}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
