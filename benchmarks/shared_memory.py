"""Does system shared memory help? Time `classify` with the payload on the wire vs in shared memory.

    python -m benchmarks.shared_memory --grpc-url localhost:8001 --http-url localhost:8000 [STUDY]

Without STUDY it sends a generated phantom as large as a real chest CT (300 slices of 512 x 512
at 0.7 x 0.7 x 1 mm, about 157 MB of DICOM). The study is read once, so every request sends the same bytes in memory;
the numbers are whole `classify` calls through `ct_triage` (client wall time), median of --repeats
rounds, each round sending the study once per protocol and transport, in turns.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks import option_types
from client import RetryPolicy, TriageClient, load_payload, payload_bytes
from preprocess import phantom


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shared_memory", description=__doc__)
    parser.add_argument("study", nargs="?", help="folder, ZIP or DICOM file (default: a 300-slice phantom)")
    parser.add_argument("--grpc-url", help="HOST:PORT of the gRPC endpoint")
    parser.add_argument("--http-url", help="HOST:PORT of the HTTP endpoint")
    parser.add_argument("--repeats", type=option_types.COUNT, default=5)
    args = parser.parse_args(argv)
    urls = {name: url for name, url in (("grpc", args.grpc_url), ("http", args.http_url)) if url}
    if not urls:
        parser.error("give --grpc-url and/or --http-url")
    if args.study:
        payload = load_payload(args.study)
    else:
        payload = phantom.study_files(form="series", slices=300, rows=512, columns=512, pixel_spacing=0.7, slice_spacing=1.0)
    print(f"payload: {len(payload)} elements, {payload_bytes(payload) / 1024**2:.0f} MiB")
    rows = measure(payload, urls, repeats=args.repeats)
    print("| protocol | transport | status | median s | min s | shared memory / wire, median of rounds |\n|---|---|---|---|---|---|")
    for row in rows:
        ratio = f"{row['paired_shm_over_wire']:.3f}" if "paired_shm_over_wire" in row else ""
        print(f"| {row['protocol']} | {row['transport']} | {row['status']} | {row['median_s']:.3f} | {row['min_s']:.3f} | {ratio} |")
    print(json.dumps({"payload_mib": round(payload_bytes(payload) / 1024**2, 1), "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
