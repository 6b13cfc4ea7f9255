"""What three kinds of plain HTTP request do to the bundled tritonserver (serve/README.md, "Faults and recovery").

    python -m benchmarks.http_faults --out benchmarks/results [--form-mib 1 2 4 8] [--chunks 2000000] [--gzip-mib 1024]

1. A study's binary inference request of each `--form-mib` size, sent to ct_triage with `Content-Type:
   application/x-www-form-urlencoded` (curl's default for --data-binary), in the order given, to
   one server while it lives (a fresh one after each it did not survive): whether the server is
   still running a second later, and what it answered.
2. One request in chunked transfer encoding, `--chunks` chunks of one byte, never finished: the
   server's resident memory before and after, against the bytes on the wire.
3. A study's binary request of `--gzip-mib` MiB of zeros sent gzip-compressed (`Content-Encoding:
   gzip`), which Triton inflates whole before any check: the bytes on the wire, the answer, and the
   server's peak resident memory (VmHWM) and its /dev/shm pages before and after.

Writes http-faults.md and http-faults.json to --out and prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import time
import zlib
from pathlib import Path

import export
from benchmarks import option_types
from benchmarks.load import write_results
from benchmarks.process_memory import status_mib
from benchmarks.serving import machine, versions_text
from serve import start_on_free_ports
from settings import NAMES

NAME = "http-faults"
SIZE = 16  # the request never reaches the model: the smallest repository serves
FORM = "application/x-www-form-urlencoded"


def _study_request_head(megabytes: int) -> bytes:
    """The JSON header of a study's binary inference request (one element of `megabytes` MiB) and the
    element's length prefix: the element's bytes follow."""
    size = megabytes << 20
    input_ = {"name": NAMES.dicom, "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 4 + size}}
    return json.dumps({"inputs": [input_]}).encode() + size.to_bytes(4, "little")


def form_typed_request(megabytes: int) -> tuple[bytes, dict]:
    """A study's binary inference request (one element of `megabytes` MiB) and its HTTP headers, typed
    as `curl --data-binary` types it unless told otherwise."""
    head = _study_request_head(megabytes)
    headers = {"Content-Type": FORM, "Inference-Header-Content-Length": str(len(head) - 4)}
    return head + bytes(megabytes << 20), headers


def gzip_request(megabytes: int) -> tuple[bytes, dict]:
    """The same request of `megabytes` MiB of zeros, gzip-compressed (about 1/1000 of it on the wire),
    compressed a MiB at a time: the inflated request never exists in this process."""
    head, compressor, zeros = _study_request_head(megabytes), zlib.compressobj(9, zlib.DEFLATED, 31), bytes(1 << 20)  # 31: gzip
    body = compressor.compress(head) + b"".join(compressor.compress(zeros) for _ in range(megabytes)) + compressor.flush()
    headers = {
        "Content-Type": "application/octet-stream",
        "Content-Encoding": "gzip",
        "Inference-Header-Content-Length": str(len(head) - 4),
    }
    return body, headers


def _send(server, body: bytes, headers: dict) -> str:
    """The request, then the first line of the answer, or why there was none."""
    fields = {"Host": "localhost", **headers, "Content-Length": str(len(body)), "Connection": "close"}
    head = f"POST /v2/models/{NAMES.triage}/infer HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
    host, port = server.http_url.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        try:
            connection.sendall(head.encode() + body)
            answer = connection.recv(4096)
        except OSError as error:
            return f"no answer ({type(error).__name__})"
    return answer.split(b"\r\n", 1)[0].decode(errors="replace") if answer else "connection closed, no answer"


def _send_chunks(server, chunks: int) -> int:
    """`chunks` one-byte chunks of a request that is never finished; the bytes sent."""
    host, port = server.http_url.rsplit(":", 1)
    connection = socket.create_connection((host, int(port)), timeout=60)
    connection.sendall(
        f"POST /v2/models/{NAMES.triage}/infer HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
        "Content-Type: application/octet-stream\r\n\r\n".encode()
    )
    chunk, per_block = b"1\r\n{\r\n", 10_000
    blocks, rest = divmod(chunks, per_block)
    for _ in range(blocks):
        connection.sendall(chunk * per_block)
    connection.sendall(chunk * rest)
    time.sleep(2)  # the server reads what is on the socket
    connection.close()
    return len(chunk) * chunks


def _send_gzip(server, megabytes: int) -> dict:
    body, headers = gzip_request(megabytes)
    before = {"rss_peak_mib": round(status_mib("VmHWM", server.pid)), "shm_mib": server.shm_bytes() >> 20}
    answer = _send(server, body, headers)
    after = {"rss_peak_mib": round(status_mib("VmHWM", server.pid)), "shm_mib": server.shm_bytes() >> 20}
    return {"mib": megabytes, "mib_sent": round(len(body) / 2**20, 2), "answer": answer, "before": before, "after": after}


def run(form_mib: list[int], chunks: int, gzip_mib: int, command: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="ct_triage_http_faults_") as scratch:
        repository = Path(scratch) / "repository"
        export.write_repository(repository, target="cpu", size=SIZE, demo_weights=True)
        form, server = [], None
        try:
            for megabytes in form_mib:
                if server is None or not server.is_running():
                    if server is not None:
                        server.stop()
                    server = start_on_free_ports(repository, log_file=Path(scratch) / "form.log", exit_timeout_s=2, models=[NAMES.triage])
                answer = _send(server, *form_typed_request(megabytes))
                time.sleep(1)
                form.append({"mib": megabytes, "answer": answer, "server_running": server.is_running()})
        finally:
            if server is not None:
                server.stop()
        with start_on_free_ports(repository, log_file=Path(scratch) / "chunks.log", exit_timeout_s=2, models=[NAMES.triage]) as server:
            host = machine(SIZE, server.http_url)
            before = status_mib("VmRSS", server.pid)
            sent = _send_chunks(server, chunks)
            after = status_mib("VmRSS", server.pid)
            chunked = {"chunks": chunks, "mb_sent": round(sent / 1e6, 1), "rss_before_mib": round(before), "rss_after_mib": round(after)}
            chunked["server_running"] = server.is_running()
        with start_on_free_ports(repository, log_file=Path(scratch) / "gzip.log", exit_timeout_s=2, models=[NAMES.triage]) as server:
            compressed = _send_gzip(server, gzip_mib)
    return {"command": command, "machine": host, "form_typed": form, "chunked": chunked, "gzip": compressed}


def markdown(results: dict) -> str:
    host, chunked, compressed = results["machine"], results["chunked"], results["gzip"]
    lines = [
        "# Plain HTTP requests against the bundled tritonserver",
        "",
        f"`{results['command']}` on {host['date']}: {host['cpu']}; {versions_text(host)}; ct_triage at S={SIZE}.",
        "",
        f"A study's binary request sent as `{FORM}`, the sizes in turn (a fresh server after each one that killed it):",
        "",
        "| MiB | answer | server running a second later |",
        "|---:|---|---|",
    ]
    lines += [f"| {row['mib']} | {row['answer']} | {'yes' if row['server_running'] else '**no**'} |" for row in results["form_typed"]]
    lines += [
        "",
        f"One chunked request of {chunked['chunks']:,} one-byte chunks ({chunked['mb_sent']} MB on the wire): tritonserver's "
        f"resident memory {chunked['rss_before_mib']} MiB before, {chunked['rss_after_mib']} MiB after.",
        "",
        f"One gzip-compressed request (`Content-Encoding: gzip`) of a {compressed['mib']} MiB study ({compressed['mib_sent']} MiB on "
        f"the wire), answered `{compressed['answer']}`: tritonserver's peak resident memory {compressed['before']['rss_peak_mib']} MiB "
        f"before, {compressed['after']['rss_peak_mib']} MiB after; its /dev/shm {compressed['before']['shm_mib']} MiB before, "
        f"{compressed['after']['shm_mib']} MiB after (a ct_preprocess region grown to hold the inflated study; this server runs "
        "without the watchdog, which would reload that model).",
    ]
    return "\n".join(lines) + "\n"


@option_types.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.http_faults",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--form-mib",
        type=option_types.FORM_MIB,
        nargs="+",
        default=[1, 2, 4, 8],
        metavar="MIB",
        help="sizes of the form-typed requests, in turn, MiB (1-1024)",
    )
    parser.add_argument(
        "--chunks",
        type=option_types.CHUNKS,
        default=2_000_000,
        metavar="N",
        help="one-byte chunks of the chunked request (at most 4,000,000)",
    )
    parser.add_argument(
        "--gzip-mib",
        type=option_types.FORM_MIB,
        default=1024,
        metavar="MIB",
        help="inflated size of the gzip-compressed request, MiB (1-1024)",
    )
    parser.add_argument(
        "--out", type=option_types.out_folder, default="benchmarks/results", metavar="DIR", help="folder for http-faults.json and .md"
    )
    args = parser.parse_args(argv)
    results = run(args.form_mib, args.chunks, args.gzip_mib, option_types.command_line(parser, argv))
    write_results(args.out, NAME, results, markdown(results))
    print(json.dumps({key: results[key] for key in ("form_typed", "chunked", "gzip")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
