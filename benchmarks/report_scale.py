"""The report over a whole archive: does the time per study stay flat as the report grows?

    python -m benchmarks.report_scale --studies 10000 --out benchmarks/results [--size 16] [--concurrency 2]
                                      [--window 1000] [--write-every 30]

1. Renders the repository at a tiny S (demo weights, CPU target) and starts the bundled tritonserver.
2. Writes `--studies` tiny studies: a few phantom ZIPs (16 slices of 32 x 32), copied under new names.
3. Runs `client.build_report` over them (what `python -m client report` runs) with an .xlsx and a .csv.
4. From the journal's `finished_at` times: the seconds per study in each window of `--window`
   studies (the first against the last); from the rows: the client's time per study; from the
   summary: every rewrite of the report files (rows, seconds).

Writes report-scale.md and report-scale.json to --out and prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import export
from benchmarks import option_types
from benchmarks.load import write_results
from benchmarks.process_memory import cpu_model
from client import AsyncTriageClient
from client.report import build_report, read_journal
from preprocess import phantom
from serve import start_on_free_ports

STUDY = dict(slices=16, rows=32, columns=32)  # the smallest chest volume the server accepts, quickly
DISTINCT = 8  # different phantoms among the copies (different UIDs and noise)
NAME = "report-scale"


def make_archive(folder: Path, count: int) -> float:
    """`count` study ZIPs in `folder`; returns the seconds it took."""
    started = time.perf_counter()
    folder.mkdir(parents=True)
    width = len(str(count))
    sources = [phantom.write_study(folder / f"source_{seed}.zip", "zip", seed=seed, **STUDY) for seed in range(DISTINCT)]
    for index in range(count):
        shutil.copyfile(sources[index % DISTINCT], folder / f"study_{index:0{width}d}.zip")
    for source in sources:
        source.unlink()
    return time.perf_counter() - started


def windows(finished_at: list[float], seconds_per_row: list[float], size: int) -> list[dict]:
    """Per window of `size` studies in journal order: wall seconds per study between the window's
    first and last finish, and the median client time per study."""
    result = []
    for start in range(0, len(finished_at) - 1, size):
        stop = min(start + size, len(finished_at))
        if stop - start < 2:
            break
        result.append(
            {
                "studies": f"{start + 1}-{stop}",
                "wall_s_per_study": round((finished_at[stop - 1] - finished_at[start]) / (stop - start - 1), 4),
                "median_client_s": round(statistics.median(seconds_per_row[start:stop]), 4),
            }
        )
    return result


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="report_scale_") as temporary:
        work = Path(temporary)
        export.write_repository(work / "repository", target="cpu", size=args.size, demo_weights=True)
        archive_s = make_archive(work / "archive", args.studies)
        out = work / "report.xlsx"
        server = start_on_free_ports(work / "repository", log_file=work / "server.log", exit_timeout_s=5)
        try:
            load_before = os.getloadavg()
            started = time.perf_counter()
            summary = asyncio.run(
                build_report(
                    work / "archive",
                    out,
                    lambda: AsyncTriageClient(server.grpc_url, "grpc"),
                    csv_out=work / "report.csv",
                    concurrency=args.concurrency,
                    write_every_s=args.write_every,
                    progress=False,
                )
            )
            wall_s = time.perf_counter() - started
            load_after = os.getloadavg()
        finally:
            server.stop()
        rows = read_journal(summary.journal).rows
        sizes = {"xlsx_mib": round(out.stat().st_size / 2**20, 2), "journal_mib": round(summary.journal.stat().st_size / 2**20, 2)}
    finished_at = [row["finished_at"] for row in rows]
    per_window = windows(finished_at, [row["time_of_processing"] for row in rows], args.window)
    writes = [{"rows": rows_written, "seconds": seconds} for rows_written, seconds in summary.writes]
    write_s = sum(write["seconds"] for write in writes)
    return {
        "machine": {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "load_average_before": [round(value, 2) for value in load_before],
            "load_average_after": [round(value, 2) for value in load_after],
            "python": platform.python_version(),
        },
        "options": {**vars(args), "out": str(args.out), "study": STUDY},
        "archive_seconds": round(archive_s, 1),
        "studies": summary.studies,
        "succeeded": summary.succeeded,
        "failed": summary.failed,
        "wall_seconds": round(wall_s, 1),
        "studies_per_second": round(summary.studies / wall_s, 2),
        "windows": per_window,
        "last_over_first_window": round(per_window[-1]["wall_s_per_study"] / per_window[0]["wall_s_per_study"], 3),
        "report_writes": writes,
        "report_write_seconds": round(write_s, 2),
        "report_write_share": round(write_s / wall_s, 4),
        "files": sizes,
    }


def _spread(items: list, count: int) -> list:
    """About `count` items evenly spread from first to last (all of them in the JSON)."""
    step = max(1, len(items) // count)
    return items[::step] + ([items[-1]] if (len(items) - 1) % step else [])


def markdown(result: dict) -> str:
    machine, options = result["machine"], result["options"]
    writes = result["report_writes"]
    lines = [
        "# The report over a large archive (`benchmarks/report_scale.py`)",
        "",
        f"`python -m benchmarks.report_scale --studies {options['studies']} --size {options['size']} "
        f"--concurrency {options['concurrency']} --window {options['window']} --write-every {options['write_every']:g}`, "
        f"one run on {machine['date']}: {machine['cpu']}, {machine['cores']} cores, CPU only, Python {machine['python']}, load average "
        f"{machine['load_average_before'][0]} before and {machine['load_average_after'][0]} after (a shared machine).",
        "",
        f"{result['studies']} studies ({result['succeeded']} Success, {result['failed']} Failure), each a ZIP of "
        f"{options['study']['slices']} slices of {options['study']['rows']} x {options['study']['columns']}, served at "
        f"S={options['size']} by the bundled tritonserver over gRPC; report written as .xlsx and .csv. "
        f"Wall time {result['wall_seconds']} s ({result['studies_per_second']} studies/s); "
        f"writing the {result['studies']} studies took {result['archive_seconds']} s beforehand.",
        "",
        "## Time per study, window by window",
        "",
        "| studies | wall s per study | median client s per study |",
        "|---|---|---|",
        *(f"| {w['studies']} | {w['wall_s_per_study']} | {w['median_client_s']} |" for w in result["windows"]),
        "",
        f"Last window over first: {result['last_over_first_window']}.",
        "",
        "## Rewrites of the report files (.xlsx and .csv together; every one in the JSON)",
        "",
        f"{len(writes)} rewrites, {result['report_write_seconds']} s in all ({result['report_write_share']:.2%} of the wall time); "
        f"the last one, at the end, {writes[-1]['rows']} rows in {writes[-1]['seconds']} s. "
        f"Files: {result['files']['xlsx_mib']} MiB .xlsx, {result['files']['journal_mib']} MiB journal.",
        "",
        "| rows | seconds |",
        "|---|---|",
        *(f"| {w['rows']} | {w['seconds']} |" for w in _spread(writes, 12)),
        "",
    ]
    return "\n".join(lines)


@option_types.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report_scale",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--studies", type=option_types.COUNT, default=10_000, metavar="N", help="studies in the report (at least 2 x --window)"
    )
    parser.add_argument(
        "--size",
        type=option_types.SIZE,
        default=16,
        metavar="S",
        help="S of the served model, voxels per side (tiny: the report is measured, not the model)",
    )
    parser.add_argument("--concurrency", type=option_types.CONCURRENCY, default=2, metavar="N", help="studies in flight")
    parser.add_argument("--window", type=option_types.WINDOW, default=1000, metavar="N", help="studies per window of the time per study")
    parser.add_argument(
        "--write-every", type=option_types.SECONDS, default=30.0, metavar="SECONDS", help="the report's rewrite interval, s"
    )
    parser.add_argument("--out", type=option_types.out_folder, default="benchmarks/results", metavar="DIR", help="results folder")
    args = parser.parse_args(argv)
    if args.studies < 2 * args.window:
        parser.error(f"--studies must be at least 2 x --window ({2 * args.window}): the first window is compared with the last")
    result = run(args)
    write_results(args.out, NAME, result, markdown(result))
    print(json.dumps({key: result[key] for key in ("studies", "wall_seconds", "last_over_first_window", "report_write_seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
