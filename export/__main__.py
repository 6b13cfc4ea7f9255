"""CLI: python -m export (--checkpoint PATH | --demo-weights) --target T --size S --out DIR."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from settings import OPERATING_POINT, PREPROCESSING, SERVING

from .errors import ExportError
from .repository import TARGETS, write_repository


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export the ResNet-34 classifier and write a complete Triton model repository.",
    )
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="MedicalNet .pth, Lightning .ckpt or plain state_dict")
    weights.add_argument("--demo-weights", action="store_true", help="seeded untrained weights (no checkpoint)")
    parser.add_argument("--target", required=True, choices=TARGETS)
    parser.add_argument("--size", type=int, default=PREPROCESSING.size, help="model input S (S^3 volume)")
    parser.add_argument("--out", required=True, help="repository folder (new, empty, or an earlier export)")
    parser.add_argument("--max-batch-size", type=int, default=SERVING.max_batch_size)
    parser.add_argument("--max-queue-delay-us", type=int, default=SERVING.max_queue_delay_microseconds)
    parser.add_argument("--preprocess-instances", type=int, default=SERVING.preprocess_instances)
    parser.add_argument("--threshold", type=float, default=OPERATING_POINT.threshold,
                        help="operating point: pathology when P(pathology) >= threshold")
    parser.add_argument("--parity-size", type=int, default=None,
                        help="size of the parity check volumes (default min(S, 64))")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="WARNING: %(message)s")
    try:
        result = write_repository(
            args.out,
            target=args.target,
            size=args.size,
            checkpoint=args.checkpoint,
            demo_weights=args.demo_weights,
            max_batch_size=args.max_batch_size,
            max_queue_delay_microseconds=args.max_queue_delay_us,
            preprocess_instances=args.preprocess_instances,
            threshold=args.threshold,
            parity_size=args.parity_size,
        )
    except ExportError as error:
        print(f"export: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result.parity.to_dict(), indent=2))
    print(result.parity.summary())
    print(f"weights: {result.provenance['checkpoint']}; timings (s): {json.dumps(result.timings_s)}")
    print(f"repository written: {result.repository} (target {args.target}, S={args.size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
