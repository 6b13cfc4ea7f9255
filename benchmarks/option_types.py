"""What the benchmarks' command lines share: option types (contract.arguments), so that a value a
benchmark cannot use is a one-line usage error before any server starts, not a traceback minutes
later; the help formatter of those whose description is their module docstring; the command line a
results file records; and `entry_point`, the one way a benchmark's main()
ends on a study, checkpoint or server it cannot use, or on Ctrl-C: one line, no traceback."""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from client import ServerUnavailable
from client.cli import MAX_CONCURRENCY
from contract.arguments import integer, model_size, number, port
from preprocess.errors import StudyError
from preprocess.workers import MAX_THREADS
from settings import INPUT_LIMITS, SERVING

SIZE = model_size
SLICES = integer(INPUT_LIMITS.min_slices, INPUT_LIMITS.max_slices)
MATRIX = integer(32, min(INPUT_LIMITS.max_rows, INPUT_LIMITS.max_columns))  # the phantom's rows and columns
CONCURRENCY = integer(1, MAX_CONCURRENCY)
COUNT = integer(1, 1_000_000)  # studies, requests, rounds, repeats
THREADS = integer(0, MAX_THREADS)  # 0: every CPU this process may use
WAIT_US = integer(0, SERVING.most_queue_delay_microseconds)
SECONDS = number(0)
PORT = port
MINUTES = number(0, 7 * 24 * 60, above_low=True)  # a soak's length: up to a week
FORM_MIB = integer(1, 1024)  # http_faults: a form-typed request is built in memory, three copies of it at once
CHUNKS = integer(1, 4_000_000)  # http_faults: tritonserver keeps about 1 KB per one-byte chunk (4 GB at most)
WINDOW = integer(2, 1_000_000)  # report_scale: a window's time per study spans its first and last study
INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for Ctrl-C


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, each option's default after its help."""


def out_folder(text: str) -> Path:
    """A results folder, checked writable now (a file made and removed in it, or in the nearest folder
    above it that exists), so that a path a benchmark cannot write fails before its minutes of work,
    not after them. It is made only when the results are written (`load.write_results`): a run
    refused for another option leaves nothing behind."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write results in {text}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot write results in {text}: {error.strerror or error}") from None
    return path


def study_path(text: str) -> str:
    """A study (folder, ZIP or DICOM file) that exists; what it holds is preprocess's to judge."""
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"no such file or folder: {text}")
    return text


def torch_device(text: str) -> str:
    """A CPU or CUDA device this machine has ("cpu", "cuda", "cuda:1"), checked before any study is built."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text}: only cpu and cuda devices are measured")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA devices")
    return text


def command_line(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> str:
    """The command as run (argv, else this process's arguments), shell-quoted: what a results file says produced it."""
    return shlex.join([*parser.prog.split(), *(sys.argv[1:] if argv is None else argv)])


def _unusable_input(error: Exception) -> bool:
    """A study (preprocess.StudyError), checkpoint (export's CheckpointError) or server
    (client.ServerUnavailable) the benchmark cannot use. export is looked up, not imported: a
    benchmark that never read a checkpoint does not load torch for this."""
    export_errors = sys.modules.get("export.errors")
    return isinstance(error, (StudyError, ServerUnavailable)) or (
        export_errors is not None and isinstance(error, export_errors.CheckpointError)
    )


def entry_point(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """main(argv), ending with one line instead of a traceback: status 2 on a study, checkpoint or
    server it cannot use, 130 on Ctrl-C (servers, children and scratch folders are cleaned up on the way out;
    every benchmark writes its results only once it has them all)."""
    module = sys.modules[main.__module__]
    prog = f"python -m {module.__spec__.name if module.__spec__ else module.__name__}"  # the module's own name under -m too

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except KeyboardInterrupt:
            print(f"{prog}: interrupted: no results written", file=sys.stderr)
            return INTERRUPTED
        except Exception as error:
            if not _unusable_input(error):
                raise
            print(f"{prog}: error: {error}", file=sys.stderr)
            return 2

    return run
