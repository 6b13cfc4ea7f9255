"""Does system shared memory help? Time `classify` with the payload on the wire vs in shared memory.

    python -m benchmarks.shared_memory --grpc-url localhost:8001 --http-url localhost:8000 [STUDY]

Without STUDY it sends a generated phantom as large as a real chest CT (300 slices of 512 x 512
at 0.7 x 0.7 x 1 mm, about 157 MB of DICOM). The study is read once, so every request sends the same bytes in memory;
the numbers are whole `classify` calls through `ct_triage` (client wall time), median of --repeats.
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
    """One row per (protocol, transport): median and min seconds of `repeats` classify calls."""
    rows = []
    for protocol, url in urls.items():
        for shared_memory in (False, True):
            with TriageClient(url, protocol, timeout_s=timeout_s, retry=RetryPolicy(attempts=1), shared_memory=shared_memory) as triage:
                triage.check_ready()
                results = [triage.classify(payload)]  # first call: connections, server-side buffers
                seconds = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    results.append(triage.classify(payload))
                    seconds.append(time.perf_counter() - started)
            rows.append(
                {
                    "protocol": protocol,
                    "transport": "shared memory" if shared_memory else "wire",
                    "status": results[0].processing_status if len({r.ok for r in results}) == 1 else "inconsistent",
                    "median_s": statistics.median(seconds),
                    "min_s": min(seconds),
                }
            )
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
    print("| protocol | transport | status | median s | min s |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['protocol']} | {row['transport']} | {row['status']} | {row['median_s']:.3f} | {row['min_s']:.3f} |")
    print(json.dumps({"payload_mib": round(payload_bytes(payload) / 1024**2, 1), "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
