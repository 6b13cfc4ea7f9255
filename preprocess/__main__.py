"""CLI: python -m preprocess INPUT -o OUT.pt [--size S] [--mode fast|reference] [--series UID] [--device D] [--threads N]

Writes OUT.pt (torch.save of the [1, 1, S, S, S] float32 tensor, on the CPU whatever --device) and OUT.json (the metadata).
A bad study exits with status 1 and one line on stderr; no output file is written, and the outputs of
an earlier run at OUT are removed (they are not this study's). A bad command line exits with status 2.
Warnings of the DICOM and numeric libraries are not printed, nor what native decoders write to the
process's stderr when they fail (a Rust panic message): what matters about the study is in the error
line or in the metadata's `warnings`. What the study put in those lines is printed through `printable`:
an escape sequence cannot drive the terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from contract.arguments import integer, model_size
from settings import PREPROCESSING

from . import MODES, MixedPatientsError, MixedStudiesError, StudyError, preprocess_study, printable, read_study
from .output import write_atomically
from .pipeline import check_device
from .workers import MAX_THREADS


def _output_problem(out: Path) -> str | None:
    """What is wrong with -o before any work: the tensor and its metadata need two files in a folder."""
    if out.suffix == ".json":
        return f"-o {out}: name the tensor file (OUT.pt); its metadata is written beside it as OUT.json"
    if out.is_dir():
        return f"-o {out} is a folder: name the tensor file (OUT.pt)"
    blocking = next((parent for parent in out.parents if parent.exists()), None)
    if blocking is not None and not blocking.is_dir():
        return f"-o {out}: {blocking} is a file, not a folder"
    return None


@contextlib.contextmanager
def _quiet_libraries():
    """Hold what the libraries print while a study is read: dropped when the study is refused (the one
    error line says it all), shown as usual otherwise (logged warnings, an internal error's report)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.dup2(held.fileno(), 2)
        refused = False
        try:
            yield
        except StudyError:
            refused = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not refused:
                held.seek(0)
                sys.stderr.write(held.read().decode(errors="replace"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m preprocess", description="DICOM chest-CT study -> model input tensor (.pt) and metadata (.json)"
    )
    parser.add_argument("input", help="a folder of DICOM files, a ZIP archive, or one (multi-frame) DICOM file")
    parser.add_argument("-o", "--out", required=True, help="output tensor path (OUT.pt); metadata goes to OUT.json")
    parser.add_argument(
        "--size", type=model_size, default=PREPROCESSING.size, help=f"S of the [1,1,S,S,S] output (default {PREPROCESSING.size})"
    )
    parser.add_argument("--mode", choices=MODES, default="fast", help="fast (served) or reference (the trained preprocessing step by step)")
    parser.add_argument("--series", default=None, help="use this SeriesInstanceUID instead of the automatic choice")
    parser.add_argument(
        "--device", default=None, help="fast mode's tensor path on this torch device (cuda, cuda:1, cpu); default: the CPU fast path"
    )
    parser.add_argument(
        "--threads", type=integer(0, MAX_THREADS), default=0, help="worker threads (default 0: every CPU this process may use)"
    )
    args = parser.parse_args(argv)
    if args.device is not None:
        try:
            check_device(args.device, args.mode)
        except ValueError as exc:
            parser.error(str(exc))
    out = Path(args.out)
    meta_path = out.with_suffix(".json")
    problem = _output_problem(out)
    if problem:
        parser.error(problem)
    try:
        with _quiet_libraries():
            study = preprocess_study(
                read_study(args.input), size=args.size, mode=args.mode, series_uid=args.series, device=args.device, threads=args.threads
            )
    except StudyError as exc:
        stale = [path for path in (out, meta_path) if path.is_file()]
        for path in stale:
            path.unlink()
        hint = " (choose one with --series UID)" if isinstance(exc, (MixedPatientsError, MixedStudiesError)) else ""
        print(f"error: {printable(str(exc))}{hint}" + (" (the earlier outputs at -o were removed)" if stale else ""), file=sys.stderr)
        return 1
    try:
        write_atomically(out, lambda f: torch.save(torch.as_tensor(study.volume).cpu(), f))
        write_atomically(meta_path, lambda f: f.write(json.dumps(study.meta, indent=1).encode()))
    except OSError as exc:
        out.unlink(missing_ok=True)
        print(f"error: cannot write output: {exc.strerror or exc}", file=sys.stderr)
        return 1
    series = printable(study.series_uid)
    print(f"{out}: tensor {list(study.volume.shape)} from series {series} in {study.meta['timings_s']['total']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
