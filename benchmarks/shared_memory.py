"""Does system shared memory help? Time `classify` with the payload on the wire vs in shared memory.

    python -m benchmarks.shared_memory --grpc-url localhost:8001 --http-url localhost:8000 [STUDY] [--repeats N] [--out DIR]

Without STUDY it sends a generated phantom as large as a real chest CT (300 slices of 512 x 512
at 0.7 x 0.7 x 1 mm, about 157 MB of DICOM). The study is read once, so every request sends the same bytes in memory;
the numbers are whole `classify` calls through `ct_triage` (client wall time), median of --repeats
rounds, each round sending the study once per protocol and transport, in turns. Prints the table
(with --out also written, with the command, machine, load and versions, to shared-memory.md and
.json) and one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from importlib import metadata

from benchmarks import option_types
from benchmarks.load import triton_version, write_results
from client import RetryPolicy, TriageClient, load_payload, payload_bytes
from preprocess import phantom

NAME = "shared-memory"


def measure(payload: list[bytes], urls: dict[str, str], *, repeats: int = 5, timeout_s: float = 600.0) -> list[dict[str, object]]:
    """One row per (protocol, transport): median and min seconds of `repeats` classify calls, and per
    protocol the median of the rounds' shared memory / wire ratios. The transports take turns in each
    round, in an order reversed every round, so that each ratio compares the same minutes."""
    arms = [(protocol, shared_memory) for protocol in urls for shared_memory in (False, True)]
    clients = {
        arm: TriageClient(urls[arm[0]], arm[0], timeout_s=timeout_s, retry=RetryPolicy(attempts=1), shared_memory=arm[1]) for arm in arms
    }
    results: dict[tuple[str, bool], list] = {arm: [] for arm in arms}
    seconds: dict[tuple[str, bool], list[float]] = {arm: [] for arm in arms}
    try:
        for arm, triage in clients.items():
            triage.check_ready()
            results[arm].append(triage.classify(payload))  # first call: connections, server-side buffers
        for k in range(repeats):
            for arm in arms if k % 2 == 0 else arms[::-1]:
                started = time.perf_counter()
                results[arm].append(clients[arm].classify(payload))
                seconds[arm].append(time.perf_counter() - started)
    finally:
        for triage in clients.values():
            triage.close()
    rows = []
    for protocol, shared_memory in arms:
        answers = results[(protocol, shared_memory)]
        row = {
            "protocol": protocol,
            "transport": "shared memory" if shared_memory else "wire",
            "status": answers[0].processing_status if len({r.ok for r in answers}) == 1 else "inconsistent",
            "failures": sum(not r.ok for r in answers),
            "median_s": statistics.median(seconds[(protocol, shared_memory)]),
            "min_s": min(seconds[(protocol, shared_memory)]),
        }
        if shared_memory:
            pairs = zip(seconds[(protocol, True)], seconds[(protocol, False)])
            row["paired_shm_over_wire"] = statistics.median(shm / wire for shm, wire in pairs)
        rows.append(row)
    return rows


def markdown(results: dict) -> str:
    """The table, under what produced it."""
    lines = [
        "# A study on the wire and through system shared memory",
        "",
        f"`{results['command']}` on {results['date']}: {results['machine']}, load average {results['load_average_before']} before "
        f"and {results['load_average_after']} after (this run included); Triton {results['triton']}; "
        + ", ".join(f"{name} {version}" for name, version in results["versions"].items())
        + f". Study: {results['study']} ({results['payload_mib']} MiB); {results['repeats']} rounds.",
        "",
        "| protocol | transport | status | median s | min s | shared memory / wire, median of the rounds |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        ratio = f"{row['paired_shm_over_wire']:.3f}" if "paired_shm_over_wire" in row else ""
        lines.append(f"| {row['protocol']} | {row['transport']} | {row['status']} | {row['median_s']:.3f} | {row['min_s']:.3f} | {ratio} |")
    return "\n".join(lines) + "\n"


@option_types.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.shared_memory", description=__doc__, formatter_class=option_types.HelpFormatter
    )
    parser.add_argument("study", nargs="?", type=option_types.study_path, help="folder, ZIP or DICOM file; omitted: a 300-slice phantom")
    parser.add_argument(
        "--grpc-url", metavar="HOST:PORT", help="the gRPC endpoint; omitted: gRPC not measured (one of the two URLs is needed)"
    )
    parser.add_argument(
        "--http-url", metavar="HOST:PORT", help="the HTTP endpoint; omitted: HTTP not measured (one of the two URLs is needed)"
    )
    parser.add_argument(
        "--repeats", type=option_types.COUNT, default=5, metavar="N", help="rounds, each sending the study once per protocol and transport"
    )
    parser.add_argument(
        "--out",
        type=option_types.out_folder,
        metavar="DIR",
        help=f"also write the table and what produced it here ({NAME}.md, .json); omitted: printed only",
    )
    args = parser.parse_args(argv)
    urls = {name: url for name, url in (("grpc", args.grpc_url), ("http", args.http_url)) if url}
    if not urls:
        parser.error("give --grpc-url and/or --http-url")
    load_before = [round(v, 2) for v in os.getloadavg()]
    protocol, url = next(iter(urls.items()))
    triton = triton_version(url, protocol)  # a server that is not there: one line, before the study is built
    if args.study:
        payload, study = load_payload(args.study), args.study
    else:
        payload = phantom.study_files(form="series", slices=300, rows=512, columns=512, pixel_spacing=0.7, slice_spacing=1.0)
        study = "a generated phantom, 300 slices of 512 x 512"
    print(f"payload: {len(payload)} elements, {payload_bytes(payload) / 1024**2:.0f} MiB")
    results = {
        "command": option_types.command_line(parser, argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "triton": triton,
        "versions": {name: metadata.version(name) for name in ("tritonclient", "numpy")},
        "servers": urls,
        "study": study,
        "payload_mib": round(payload_bytes(payload) / 1024**2, 1),
        "repeats": args.repeats,
        "rows": measure(payload, urls, repeats=args.repeats),
        "load_average_before": load_before,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
    }
    text = markdown(results)
    if args.out:
        write_results(args.out, NAME, results, text)
    print(text, end="")
    print(json.dumps({key: results[key] for key in ("payload_mib", "rows")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
