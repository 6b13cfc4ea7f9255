"""A locust scenario: studies through ct_triage with the project's client, HTTP and gRPC users.

    .venv/bin/locust -f benchmarks/locustfile.py --headless -u 4 -r 2 -t 60s --host http://127.0.0.1:8000 \
        [--grpc-url 127.0.0.1:8001] [--study PATH] [--summary-json out/locust.json] --csv out/locust

Every study is reported to locust's statistics (response time, size of the answer's metadata, the
failure message); locust exits non-zero when any request failed. The --summary-json totals count
failures apart: studies/s and percentiles there are of the studies answered with a result (locust's
own include the failed ones, which a refusing or dead server answers fastest). --host is the HTTP endpoint (any
host: a remote server works), --grpc-url the gRPC one (default: the same host, port 8001), --study
a folder, ZIP or DICOM file (default: a generated 48-slice phantom ZIP). HTTP users outnumber gRPC
users 2 to 1.
"""

from __future__ import annotations

import functools
import json
import time
from urllib.parse import urlsplit

import gevent
from locust import User, constant, events, task

from benchmarks.load import percentile
from client import RetryPolicy, TriageClient, load_payload, payload_bytes
from settings import NAMES, SERVING

SUCCEEDED_MS: list[float] = []  # response times of the studies answered with a result


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--grpc-url", default="", help="HOST:PORT of ct_triage over gRPC (default: --host's, port 8001)")
    parser.add_argument("--study", default="", help="folder, ZIP or DICOM file to send (default: a generated phantom)")
    parser.add_argument("--summary-json", default="", help="also write the run's totals here as JSON, when locust quits")


@events.quitting.add_listener
def _summary(environment, **_) -> None:
    path = environment.parsed_options.summary_json if environment.parsed_options else ""
    if not path:
        return
    total = environment.stats.total
    seconds = (total.last_request_timestamp or total.start_time) - total.start_time  # locust's window for its rates
    summary = {
        "requests": total.num_requests,
        "failures": total.num_failures,
        "succeeded": len(SUCCEEDED_MS),
        "succeeded_per_s": round(len(SUCCEEDED_MS) / seconds, 3) if seconds > 0 else 0.0,
        "succeeded_p50_ms": round(percentile(SUCCEEDED_MS, 50)) if SUCCEEDED_MS else None,
        "succeeded_p95_ms": round(percentile(SUCCEEDED_MS, 95)) if SUCCEEDED_MS else None,
        "requests_per_type": {entry.method: entry.num_requests for entry in environment.stats.entries.values()},
        "errors": [str(error.error) for error in environment.stats.errors.values()][:5],
    }
    with open(path, "w") as stream:
        json.dump(summary, stream)


@functools.cache
def _payload(study: str) -> tuple[bytes, ...]:
    if study:
        return tuple(load_payload(study))
    from preprocess import phantom

    return tuple(phantom.study_files("zip"))


class _TriageUser(User):
    abstract = True
    protocol = "http"
    wait_time = constant(0)  # closed loop: the next study as soon as the answer is in

    def on_start(self) -> None:
        options = self.environment.parsed_options
        host = urlsplit(self.host if "://" in self.host else f"http://{self.host}")
        url = host.netloc if self.protocol == "http" else (options.grpc_url or f"{host.hostname}:{SERVING.grpc_port}")
        self.payload = list(_payload(options.study))
        self.client = self._blocking(TriageClient, url, self.protocol, retry=RetryPolicy(attempts=1))

    def on_stop(self) -> None:
        self._blocking(self.client.close)

    def _blocking(self, function, *args, **kwargs):
        """gRPC's core blocks in C, which would stall every greenlet (and locust's own timers): its
        calls run on gevent's pool of real threads. HTTP (geventhttpclient) cooperates as it is."""
        if self.protocol == "grpc":
            return gevent.get_hub().threadpool.apply(function, args, kwargs)
        return function(*args, **kwargs)

    @task
    def classify(self) -> None:
        started = time.perf_counter()
        result = self._blocking(self.client.classify, self.payload)
        milliseconds = (time.perf_counter() - started) * 1000
        if result.ok:
            SUCCEEDED_MS.append(milliseconds)
        events.request.fire(
            request_type=self.protocol,
            name=NAMES.triage,
            response_time=milliseconds,
            response_length=len(json.dumps(result.meta)) if result.ok else 0,
            exception=None if result.ok else RuntimeError(result.error),
            context={"request_bytes": payload_bytes(self.payload)},
        )


class HttpTriageUser(_TriageUser):
    protocol = "http"
    weight = 2


class GrpcTriageUser(_TriageUser):
    protocol = "grpc"
    weight = 1
