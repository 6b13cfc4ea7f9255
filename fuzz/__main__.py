"""`python -m fuzz [--depth study|read|header] [--seconds N | --runs N] [--corpus DIR] [libFuzzer options]`

Builds the seed corpus into DIR if it is empty, then fuzzes with atheris (libFuzzer) with one
worker, a per-input timeout and an RSS limit. Crash inputs are written as crash-*/timeout-*/oom-*
files in --artifacts. Exit status 0: no crash within the budget.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from contract.arguments import integer

TIMEOUT_S = 20  # per input: the slowest legitimate seed takes well under a second
RSS_LIMIT_MB = 3072  # per process; the largest seed needs ~600 MB (torch and pydicom included)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fuzz",
        description=__doc__.splitlines()[0],
        epilog="Other options (-flag=value) are passed on to libFuzzer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--depth",
        choices=("study", "read", "header"),
        default="study",
        help="study: preprocess_study at S=16; read: up to decoding the chosen series; header: unpacking, headers, small files' pixels",
    )
    parser.add_argument(
        "--instrument",
        default="preprocess,pydicom",
        metavar="PACKAGES",
        help="packages whose coverage guides the fuzzer (comma-separated; fewer run faster)",
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=integer(1, 7 * 24 * 3600), default=60, metavar="SECONDS", help="stop after this long, s")
    budget.add_argument(
        "--runs", type=integer(1, 2**62), metavar="N", help="stop after this many executions instead; omitted: --seconds bounds the run"
    )
    parser.add_argument("--corpus", type=Path, default=Path("build/fuzz/corpus"), metavar="DIR", help="seed and working corpus (created)")
    parser.add_argument(
        "--artifacts", type=Path, default=Path("build/fuzz/artifacts"), metavar="DIR", help="where crash inputs are written (created)"
    )
    parser.add_argument("--seed", type=integer(0, 2**32 - 1), default=1, metavar="N", help="libFuzzer's random seed")
    parser.add_argument(
        "--max-len", type=integer(1, 2**30), default=64 * 1024, metavar="BYTES", help="largest input, bytes (seeds above it are left out)"
    )
    parser.add_argument(
        "--replay",
        type=Path,
        nargs="+",
        metavar="INPUT",
        help="run these inputs once each (no fuzzing) and report each outcome; omitted: fuzz",
    )
    options, extra = parser.parse_known_args(argv)
    if options.replay:
        return replay(options.replay, options.depth)

    import atheris

    with atheris.instrument_imports(include=options.instrument.split(",")):  # before they are imported
        from . import corpus
        from .target import Target

    if not options.corpus.is_dir() or not any(options.corpus.iterdir()):
        print(f"seed corpus: {corpus.write(options.corpus, options.max_len)} inputs in {options.corpus}", flush=True)
    options.artifacts.mkdir(parents=True, exist_ok=True)
    limit = [f"-runs={options.runs}"] if options.runs is not None else [f"-max_total_time={options.seconds}"]
    libfuzzer = [
        sys.argv[0],
        f"-timeout={TIMEOUT_S}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-max_len={options.max_len}",
        f"-seed={options.seed}",
        f"-artifact_prefix={options.artifacts}/",
        "-print_final_stats=1",
        *limit,
        *extra,
        str(options.corpus),
    ]
    atheris.Setup(libfuzzer, Target(options.depth))
    atheris.Fuzz()
    return 0


def replay(paths: list[Path], depth: str) -> int:
    """Run saved inputs (crash files, corpus entries) without fuzzing: exit status 1 if any crashes."""
    import traceback

    from .target import Target

    target, crashed = Target(depth), 0
    for path in paths:
        try:
            target(path.read_bytes())
            print(f"{path}: ok (read or refused with a StudyError)")
        except Exception as exc:
            crashed += 1
            where = traceback.extract_tb(exc.__traceback__)[-1]
            print(f"{path}: {type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
