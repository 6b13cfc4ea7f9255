"""One closed-loop load generator for every service measured, so that their numbers compare.

`concurrency` worker threads each send studies back to back until `requests` have been sent; the
result is throughput (successful studies per second of wall time) and latency percentiles. The
Triton ensemble is called through the project's client (`TriageClient`, HTTP), the baseline with a
plain HTTP POST of the same bytes. Also the options, server and result files shared by the benchmarks
that compare states of one server over rounds of this loop.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import option_types
from client import RetryPolicy, TriageClient
from settings import NAMES

Sender = Callable[[], None]  # sends one study; raises if the answer is not a result


@dataclass(frozen=True)
class LevelResult:
    target: str
    concurrency: int
    requests: int
    failures: int
    seconds: float
    studies_per_s: float
    mean_s: float
    p50_s: float
    p95_s: float
    first_error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def closed_loop(target: str, make_sender: Callable[[], Sender], concurrency: int, requests: int) -> LevelResult:
    """`requests` studies through `concurrency` workers. Each worker makes its own sender (client) in
    its own thread (tritonclient's HTTP client belongs to the thread that made it) and sends one
    warm-up study; the clock starts when every worker is warm. A level whose warm-up failed in any
    worker sends nothing more and counts every study as failed: it never ran at `concurrency`.
    An interrupt (Ctrl-C) stops the workers after the studies in flight."""
    latencies: list[float] = []
    errors: list[str] = []
    remaining = requests
    lock = threading.Lock()
    warm = threading.Barrier(concurrency + 1)
    stop = threading.Event()

    def work() -> None:
        nonlocal remaining
        try:
            send = make_sender()
            send()
        except Exception as error:
            with lock:
                errors.append(f"warm-up: {error}")
            stop.set()
        try:
            warm.wait()
        except threading.BrokenBarrierError:  # interrupted before the start
            return
        while not stop.is_set():
            with lock:
                if remaining == 0:
                    return
                remaining -= 1
            started = time.perf_counter()
            try:
                send()
            except Exception as error:  # a failed study is counted, whatever broke
                with lock:
                    errors.append(str(error))
                continue
            with lock:
                latencies.append(time.perf_counter() - started)

    with ThreadPoolExecutor(concurrency) as pool:
        workers = [pool.submit(work) for _ in range(concurrency)]
        try:
            warm.wait()
            started = time.perf_counter()
            for worker in workers:
                worker.result()
            seconds = time.perf_counter() - started
        finally:
            stop.set()
            warm.abort()
    return LevelResult(
        target=target,
        concurrency=concurrency,
        requests=requests,
        failures=requests - len(latencies),
        seconds=round(seconds, 3),
        studies_per_s=round(len(latencies) / seconds, 4),
        mean_s=round(statistics.fmean(latencies), 4) if latencies else float("nan"),
        p50_s=round(percentile(latencies, 50), 4),
        p95_s=round(percentile(latencies, 95), 4),
        first_error=errors[0][:300] if errors else "",
    )


def study_timeout(ends: float, concurrency: int, requests: int) -> float:
    """The longest a study of a closed_loop level may take so that the level ends by
    `ends` (time.monotonic) even if every study times out (each worker sends its warm-up study, then
    its share of `requests`, one after another); at least 1 s."""
    return max((ends - time.monotonic()) / (1 + math.ceil(requests / concurrency)), 1.0)


def triton_sender(url: str, payload: list[bytes], timeout_s: float = 600, shared_memory: bool = False) -> Callable[[], Sender]:
    """Studies through ct_triage with the project's HTTP client, one client per worker (each with its
    own system shared-memory region when `shared_memory`: client and server on one host)."""

    def make() -> Sender:
        client = TriageClient(url, "http", timeout_s=timeout_s, retry=RetryPolicy(attempts=1), shared_memory=shared_memory)

        def send() -> None:
            result = client.classify(payload)
            if not result.ok:
                raise RuntimeError(result.error)

        return send

    return make


def baseline_sender(url: str, study: bytes, timeout_s: float = 600) -> Callable[[], Sender]:
    """Studies POSTed to the FastAPI baseline (benchmarks.baseline)."""

    def make() -> Sender:
        def send() -> None:
            request = urllib.request.Request(
                f"http://{url}/classify", data=study, method="POST", headers={"Content-Type": "application/octet-stream"}
            )
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                if "probability_of_pathology" not in json.loads(response.read()):
                    raise RuntimeError("the baseline answered without a probability")

        return send

    return make


def add_arguments(parser: argparse.ArgumentParser, *, levels: list[int], requests: int, rounds: int, compared: str) -> None:
    """The options of a benchmark that compares `compared` (states, waits) on one server over rounds
    of the closed loop: the rendered repository's S, the load, the phantom study, where results go."""
    parser.add_argument(
        "--size", type=option_types.SIZE, default=64, metavar="S", help="model input S, voxels per side, of the rendered repository"
    )
    parser.add_argument(
        "--levels", type=option_types.CONCURRENCY, nargs="+", default=levels, metavar="N", help="concurrency levels, studies in flight"
    )
    parser.add_argument(
        "--requests", type=option_types.COUNT, default=requests, metavar="N", help=f"studies per level, {compared} and round"
    )
    parser.add_argument("--rounds", type=option_types.COUNT, default=rounds, metavar="N", help=f"rounds, each measuring every {compared}")
    parser.add_argument("--slices", type=option_types.SLICES, default=120, metavar="N", help="phantom study: slices")
    parser.add_argument("--matrix", type=option_types.MATRIX, default=256, metavar="N", help="phantom study: rows and columns, pixels")
    parser.add_argument("--out", type=option_types.out_folder, default="benchmarks/results", metavar="DIR", help="results folder")


def triton_version(url: str, protocol: str = "http") -> str:
    """The Triton version the server at `url` reports in its metadata, what a results file names;
    client.ServerUnavailable (one line) when none answers there or ct_triage is not ready."""
    with TriageClient(url, protocol, retry=RetryPolicy(attempts=1)) as client:
        client.check_ready()
        metadata = client.triton.get_server_metadata()
    return metadata["version"] if isinstance(metadata, dict) else metadata.version


def write_results(out: Path, stem: str, results: dict, text: str) -> None:
    """`stem`.json (everything; a value JSON has no type for, such as a path, as its text) and `stem`.md
    (`text`: the tables) in `out` (a folder option_types.out_folder checked): every benchmark's pair of results files."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(text)


@contextmanager
def rendered_server(target: str, size: int, checkpoint: str | None = None, models: Sequence[str] | None = None) -> Iterator:
    """The bundled tritonserver on a repository rendered for `target` at S=`size` (the checkpoint's
    weights, or demo weights), in a scratch folder that goes with the server (0.7 GB of weights);
    `models`: only these loaded (TritonServer)."""
    import export
    from serve import start_on_free_ports

    with tempfile.TemporaryDirectory(prefix="ct_triage_bench_") as scratch:
        repository = Path(scratch) / "repository"
        export.write_repository(repository, target=target, size=size, checkpoint=checkpoint, demo_weights=checkpoint is None)
        with start_on_free_ports(repository, log_file=Path(scratch) / "tritonserver.log", exit_timeout_s=5, models=models) as server:
            yield server


def reload_classifier(server, edit: Callable[[dict], None]) -> dict:
    """Reload ct_classifier with its served config as `edit` changes it, through Triton's model
    control (the ensembles keep using it); returns the config then served, for the caller to check."""
    from tritonclient import http

    client = http.InferenceServerClient(server.http_url)
    try:
        config = client.get_model_config(NAMES.classifier)
        edit(config)
        client.load_model(NAMES.classifier, config=json.dumps(config))
        deadline = time.monotonic() + 120
        while not client.is_model_ready(NAMES.classifier):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{NAMES.classifier} did not become ready in 120 s after its reload")
            time.sleep(0.2)
        return client.get_model_config(NAMES.classifier)
    finally:
        client.close()
