"""CLI: python -m export (--checkpoint PATH | --demo-weights) --target T [--out DIR [serving options]]."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from contract import ContractError

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
    )
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="MedicalNet .pth, Lightning .ckpt or plain state_dict")
    weights.add_argument("--demo-weights", action="store_true", help="seeded untrained weights (no checkpoint)")
    parser.add_argument("--target", required=True, choices=TARGETS)
    parser.add_argument("--out", help=f"render a copy here (new, empty, or an earlier copy) instead of exporting into {COMMITTED.name}/")
    parser.add_argument("--artifacts", help="where what Triton does not serve goes (default: <repository>.artifacts beside it)")
    parser.add_argument("--parity-size", type=int, default=None, help="size of the parity check volumes (default min(S, 64); at most S)")
    rendering = parser.add_argument_group("serving options of a rendered copy (--out; defaults from settings)")
    rendering.add_argument("--size", type=int, help="model input S (S^3 volume)")
    rendering.add_argument("--max-batch-size", type=int)
    rendering.add_argument(
        "--max-queue-delay-us", type=int, help="the classifier's batching wait (default: the target's; 0 on cpu and openvino, 20000 on GPU)"
    )
    rendering.add_argument("--preprocess-instances", type=int)
    rendering.add_argument("--preprocess-device", choices=("cpu", "cuda"), help="cuda: preprocessing on the GPU (KIND_GPU instances)")
    rendering.add_argument("--explain-device", choices=("cpu", "cuda"), help="cuda: ct_explain on the GPU (KIND_GPU)")
    rendering.add_argument("--threshold", type=float, help="operating point: pathology when P(pathology) >= threshold")
    rendering.add_argument(
        "--precision",
        help="the classifier's precision: cpu fp32 (default) or bf16 (CPUs with AVX512_BF16/AMX; checked against FP32 "
        "within 1e-2, same decisions); torch-gpu fp16 (default), bf16 or fp32; other targets take none",
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
