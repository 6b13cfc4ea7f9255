"""CLI: python -m preprocess INPUT -o OUT.pt [--size S] [--mode fast|reference] [--series UID] [--device D] [--threads N]

Writes OUT.pt (torch.save of the [1, 1, S, S, S] float32 tensor, on the CPU whatever --device) and OUT.json (the metadata).
Only this command's own outputs are ever replaced or removed: before any work, an OUT or OUT.json that
is the input or inside its folder, or that exists and is not recognisably an earlier output (a torch
archive of one such tensor; a JSON object with the metadata's keys), is refused and left as it was.
A bad study exits with status 1 and one line on stderr; no output file is written, and the outputs of
an earlier run at OUT are removed (they are not this study's). A bad command line exits with status 2;
Ctrl-C exits with status 130 and SIGTERM with 143, each with one line, leaving no temporary file and
never a tensor without its metadata.
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
import signal
import stat
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

from contract import MAX_SIZE
from contract.arguments import integer, model_size
from settings import PREPROCESSING

from . import MODES, MixedPatientsError, MixedStudiesError, StudyError, preprocess_study, printable, read_study
from .output import write_atomically
from .pipeline import check_device
from .workers import MAX_THREADS

# what is read to recognise an earlier output, at most: the largest tensor's archive, the metadata of the
# largest study (10,000 slice UIDs and skipped series take well under 4 MiB), the archive's pickle (~200 bytes)
_MOST_TENSOR_BYTES = 4 * MAX_SIZE**3 + 2**20
_MOST_META_BYTES = 16 * 2**20
_MOST_PICKLE_BYTES = 2**16
# keys every metadata file this command writes has (pipeline.preprocess_study's meta)
_META_KEYS = frozenset({"study_uid", "series_uid", "series_selection", "slice_order", "mode", "size", "timings_s", "warnings"})


def _output_problem(out: Path, meta_path: Path, source: Path) -> str | None:
    """What is wrong with -o before any work: the tensor and its metadata need two files in a folder,
    neither of them the input, and anything already there must be this command's own output."""
    shown = printable(str(out))
    if out.suffix == ".json":
        return f"-o {shown}: name the tensor file (OUT.pt); its metadata is written beside it as OUT.json"
    if out.is_dir():
        return f"-o {shown} is a folder: name the tensor file (OUT.pt)"
    blocking = next((parent for parent in out.parents if parent.exists()), None)
    if blocking is not None and not blocking.is_dir():
        return f"-o {shown}: {printable(str(blocking))} is a file, not a folder"
    for path, recognised in ((out, _earlier_tensor), (meta_path, _earlier_meta)):
        if _is_or_inside(path, source):
            return f"-o {shown}: {printable(str(path))} is the input or inside it; name a file elsewhere"
        if os.path.lexists(path) and not recognised(path):
            return f"-o {shown}: {printable(str(path))} exists and is not an output of this command; name a new file"
    return None


def _is_or_inside(path: Path, source: Path) -> bool:
    """Whether writing `path` would change the input: the same file (by any link or name), or a file in its folder."""
    try:
        if path.exists() and path.samefile(source):
            return True
        return source.is_dir() and path.resolve().is_relative_to(source.resolve())
    except (OSError, RuntimeError):  # a missing input (read_study names it) or a loop of links
        return False


def _regular_size(path: Path) -> int | None:
    """The size of a regular file at `path` itself (a link is not followed: replacing it would not write where it points)."""
    try:
        status = path.lstat()
    except OSError:
        return None
    return status.st_size if stat.S_ISREG(status.st_mode) else None


def _earlier_tensor(path: Path) -> bool:
    """Whether `path` is a torch archive of one float32 [1, 1, S, S, S] tensor, as this command writes:
    read through a memory map (no allocation) with weights_only (no code of the file's runs)."""
    size = _regular_size(path)
    if size is None or size > _MOST_TENSOR_BYTES:
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [m for m in archive.infolist() if m.filename.endswith("/data.pkl")]
        if len(pickles) != 1 or pickles[0].file_size > _MOST_PICKLE_BYTES:
            return False
        tensor = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # anything else is not an archive torch.save wrote (zipfile and torch raise many kinds)
        return False
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float32 or tensor.dim() != 5:
        return False
    return tensor.shape[:2] == (1, 1) and tensor.shape[2] == tensor.shape[3] == tensor.shape[4]


def _earlier_meta(path: Path) -> bool:
    """Whether `path` is a JSON object with the keys of the metadata this command writes."""
    size = _regular_size(path)
    if size is None or size > _MOST_META_BYTES:
        return False
    try:
        meta = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and _META_KEYS <= meta.keys()


def _remove_earlier(out: Path, meta_path: Path) -> bool:
    """Remove what at OUT and OUT.json is this command's output (looked at again: it was checked before
    the work, and the user may have put something else there since); whether anything was removed."""
    removed = False
    for path, recognised in ((out, _earlier_tensor), (meta_path, _earlier_meta)):
        if recognised(path) and _unlinked(path):
            removed = True
    return removed


def _unlinked(path: Path) -> bool:
    try:
        path.unlink()
    except OSError:  # a folder the user may not write: the error line says what failed, not a traceback
        return False
    return True


@contextlib.contextmanager
def _quiet_libraries():
    """Hold what the libraries print while a study is read: dropped when the study is refused or the run
    interrupted (the one line says it all), shown as usual otherwise (logged warnings, an internal error's report)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.dup2(held.fileno(), 2)
        refused = False
        try:
            yield
        except (StudyError, KeyboardInterrupt):
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
        prog="python -m preprocess",
        description="DICOM chest-CT study -> model input tensor (.pt) and metadata (.json)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("input", help="a folder of DICOM files, a ZIP archive, or one (multi-frame) DICOM file")
    parser.add_argument("-o", "--out", required=True, metavar="OUT", help="output tensor path (OUT.pt); metadata goes to OUT.json")
    parser.add_argument(
        "--size", type=model_size, default=PREPROCESSING.size, metavar="S", help="S of the [1,1,S,S,S] output, voxels per side"
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="fast",
        help="fast: the served preprocessing; reference: the trained preprocessing step by step",
    )
    parser.add_argument(
        "--series", default=None, metavar="UID", help="use this SeriesInstanceUID; omitted: the automatic choice (OUT.json records it)"
    )
    parser.add_argument(
        "--device",
        default=None,
        help="fast mode's tensor path on this torch device (cuda, cuda:1, cpu); omitted: the CPU fast path",
    )
    parser.add_argument(
        "--threads", type=integer(0, MAX_THREADS), default=0, metavar="N", help="worker threads; 0: every CPU this process may use"
    )
    args = parser.parse_args(argv)
    if args.device is not None:
        try:
            check_device(args.device, args.mode)
        except ValueError as exc:
            parser.error(str(exc))
    if not args.input:  # Path("") is the current folder
        parser.error("INPUT is empty: name a DICOM folder, a ZIP archive or a DICOM file")
    if not args.out:
        parser.error("-o is empty: name the tensor file (OUT.pt)")
    out = Path(args.out)
    meta_path = out.with_suffix(".json")
    problem = _output_problem(out, meta_path, Path(args.input))
    if problem:
        parser.error(problem)
    stopped_by = [signal.SIGINT]

    def terminate(_signum, _frame):  # SIGTERM (a job's deadline, `timeout`) gets Ctrl-C's clean-up
        stopped_by[0] = signal.SIGTERM
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return _run(args, out, meta_path)
    except KeyboardInterrupt:
        print(f"{'terminated' if stopped_by[0] == signal.SIGTERM else 'interrupted'} (nothing written)", file=sys.stderr)
        return 128 + stopped_by[0]
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace, out: Path, meta_path: Path) -> int:
    try:
        with _quiet_libraries():
            study = preprocess_study(
                read_study(args.input), size=args.size, mode=args.mode, series_uid=args.series, device=args.device, threads=args.threads
            )
    except StudyError as exc:
        removed = _remove_earlier(out, meta_path)
        hint = " (choose one with --series UID)" if isinstance(exc, (MixedPatientsError, MixedStudiesError)) else ""
        print(f"error: {printable(str(exc))}{hint}" + (" (the earlier outputs at -o were removed)" if removed else ""), file=sys.stderr)
        return 1
    try:
        write_atomically(out, lambda f: torch.save(torch.as_tensor(study.volume).cpu(), f))
        write_atomically(meta_path, lambda f: f.write(json.dumps(study.meta, indent=1).encode()))
    except OSError as exc:
        _remove_earlier(out, meta_path)
        print(f"error: cannot write output: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _remove_earlier(out, meta_path)  # the new tensor may be in place without its metadata
        raise
    except RuntimeError as exc:
        if not isinstance(exc.__context__, KeyboardInterrupt):
            raise
        _remove_earlier(out, meta_path)  # torch.save reports Ctrl-C as its archive writer's RuntimeError
        raise KeyboardInterrupt from None
    series = printable(study.series_uid)
    print(f"{printable(str(out))}: tensor {list(study.volume.shape)} from series {series} in {study.meta['timings_s']['total']:.2f} s")
    return 0


if __name__ == "__main__":
    status = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the work is done: a late Ctrl-C would only garble the exit
    sys.exit(status)
