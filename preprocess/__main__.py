"""CLI: .venv/bin/python -m preprocess INPUT -o OUT.pt [--size S] [--mode fast|reference] [--series UID]

Writes OUT.pt (torch.save of the [1, 1, S, S, S] float32 tensor) and OUT.json (the metadata).
A bad study exits with status 1 and one line on stderr; no output file is written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from settings import PREPROCESSING

from . import MODES, StudyError, preprocess_study, read_study


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m preprocess", description="DICOM chest-CT study -> model input tensor (.pt) and metadata (.json)")
    parser.add_argument("input", help="a folder of DICOM files, a ZIP archive, or one (multi-frame) DICOM file")
    parser.add_argument("-o", "--out", required=True, help="output tensor path (OUT.pt); metadata goes to OUT.json")
    parser.add_argument("--size", type=int, default=PREPROCESSING.size, help=f"S of the [1,1,S,S,S] output (default {PREPROCESSING.size})")
    parser.add_argument("--mode", choices=MODES, default="fast", help="fast (served) or reference (SEED.md literally)")
    parser.add_argument("--series", default=None, help="use this SeriesInstanceUID instead of the automatic choice")
    args = parser.parse_args(argv)
    if args.size < 2:
        parser.error("--size must be at least 2")
    out = Path(args.out)
    meta_path = out.with_suffix(".json")
    try:
        study = preprocess_study(read_study(args.input), size=args.size, mode=args.mode, series_uid=args.series)
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        _write_atomically(out, lambda f: torch.save(torch.from_numpy(study.volume), f))
        _write_atomically(meta_path, lambda f: f.write(json.dumps(study.meta, indent=1).encode()))
    except OSError as exc:
        out.unlink(missing_ok=True)
        print(f"error: cannot write output: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"{out}: tensor {list(study.volume.shape)} from series {study.series_uid} in {study.meta['timings_s']['total']:.2f} s")
    return 0


def _write_atomically(path: Path, write) -> None:
    """Write to a temporary file beside path, then rename: a failure never leaves a partial OUT."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


if __name__ == "__main__":
    sys.exit(main())
