"""Classify a study through the `ct_triage` ensemble: the one request path every caller uses.

`TriageClient` (blocking) and `AsyncTriageClient` (asyncio) differ only in how they wait; the
payload, the tensors, the parsing of the answer, the error policy and the retry schedule are the
shared functions below, so the CLI, the report, the demo, the tests and the measurement script send
identical requests.

Explanations are opt-in per client: `explain=True` sends the same request to `ct_triage_explain`
instead, asks for ATTRIBUTION, LOCALIZATION and VOLUME as well, and each Success result carries
them as `result.explanation` (`client.explanation`). The plain path is unchanged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import struct
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Union

import numpy as np
import rapidjson
import tritonclient.grpc
import tritonclient.grpc.aio
import tritonclient.http
import tritonclient.http.aio
from geventhttpclient.response import HTTPConnectionClosed
from tritonclient.utils import InferenceServerException
from tritonclient.utils import shared_memory as system_shm

from preprocess import EmptyInputError, StudyError, StudyTooLargeError, read_study
from settings import INPUT_LIMITS, NAMES, SERVING, InputLimits

from .result import SUCCESS, TriageResult, failure
from .tls import CLIENT_CERTIFICATE_HINT, PLAIN_TEXT_ANSWER, PathLike, certificate_problem, client_refused, endpoint, speaks_no_tls

_log = logging.getLogger(__name__)

Study = Union[str, "os.PathLike[str]", bytes, Sequence[bytes]]
"""A path (folder, ZIP or DICOM file), one file's bytes, or the elements of a study."""

PROTOCOLS = ("grpc", "http")
_SYNC = {"grpc": tritonclient.grpc, "http": tritonclient.http}
_DEFAULT_PORT = {"grpc": SERVING.grpc_port, "http": SERVING.http_port}
MAX_TIMEOUT_S = 86400.0  # a day per request: gRPC fails a deadline past about 1e9 s at once (as "Deadline Exceeded")
_OUTPUTS = (NAMES.probability, NAMES.pathology, NAMES.study_uid, NAMES.series_uid, NAMES.meta)
# At S=256 the explanation adds 96 MiB to the answer (ATTRIBUTION FP16 32 MiB, VOLUME FP32 64 MiB):
# over gRPC's default 4 MiB, within the 2 GiB (INT32_MAX) that tritonclient's channels (blocking and
# asyncio) and Triton's server allow; HTTP answers have no such limit. tests/library checks the bound.
_EXPLAIN_OUTPUTS = (*_OUTPUTS, NAMES.attribution, NAMES.localization, NAMES.volume)
# A request carries the study's files (a 4-byte length each) and a header of well under a MiB, and
# no request to Triton may exceed INT32_MAX bytes: that is the gRPC message limit, and Triton's HTTP
# server reads a body's length as a 32-bit number (a 2.2 GB study: "inference header size should be
# in range (0, -1988099702)"). A larger study is refused from its files' sizes before it is read:
# sending it took several copies of it (9 GB of memory for 2.2 GB) and then failed. With shared
# memory the request only names the region holding the study.
_WIRE_LIMITS = dataclasses.replace(
    INPUT_LIMITS, max_uncompressed_bytes=min(INPUT_LIMITS.max_uncompressed_bytes, tritonclient.grpc.MAX_GRPC_MESSAGE_SIZE - 2**20)
)
# Only these mean "try again later": the server is restarting, overloaded or not reachable yet.
# INVALID_ARG (a bad study, HTTP 400) and INTERNAL are answers, and resending cannot change them.
_TRANSIENT_STATUSES = frozenset({"StatusCode.UNAVAILABLE", "503", "502", "504"})
_DEADLINE_EXCEEDED = "StatusCode.DEADLINE_EXCEEDED"  # gRPC's word for the request timeout (the call's deadline) having passed
_QUEUE_TIMEOUT = "Request timeout expired"  # Triton's UNAVAILABLE (503) for a request its timeout ended in a queue
# While a model is unloading or reloading (server stopping, repository update) Triton answers
# NOT_FOUND "... has no available versions"; a wrong model name ("... is not found") is permanent.
_RELOADING_STATUSES = frozenset({"StatusCode.NOT_FOUND", "404"})
_RELOADING_MESSAGE = "has no available versions"
# Health checks are status codes only, and Triton's metrics port answers 200 to every path: the server
# metadata (GET /v2, gRPC ServerMetadata), which Triton answers as soon as it listens, is asked first
# and must name Triton.
_NOT_TRITON = "it answers, but not with Triton's server metadata: is it another port, such as Triton's metrics port?"
_UNDECODED_ANSWER = "an exception occurred in the client while decoding the response"  # tritonclient.http, with the body
_NOT_JSON = (rapidjson.JSONDecodeError, UnicodeDecodeError)  # tritonclient.http's reading of an answer that is no JSON
# Triton 2.51's answer when the Python-backend process of the model instance that got the request died
# (killed, out of memory): not retried here, since a study that crashes its worker would crash the next
# one; the report sends such a study once more, later (`worker_died`, client/report.py).
_DEAD_WORKER = re.compile(r"Stub process '([^']+)' is not healthy")
_DEAD_WORKER_FAILURE = (
    "a worker process of the server ({instance}) died: the study was not processed; send it again once the server recovered"
)
_DEAD_WORKER_ROW = re.compile(re.escape(_DEAD_WORKER_FAILURE).replace(re.escape("{instance}"), r"[^()\s]+") + "$")


def worker_died(result: TriageResult) -> bool:
    """Whether a Failure is the death of the server's worker process that had the study (Triton's
    "Stub process ... is not healthy"): the study was not processed, and may only have been queued there."""
    return not result.ok and result.error is not None and _DEAD_WORKER_ROW.match(result.error) is not None


class ServerUnavailable(ConnectionError):
    """The server (or the model on it) cannot be reached or is not ready."""


class NotTritonError(ServerUnavailable):
    """Something answers at the address, but not as Triton (another service, Triton's metrics port):
    unlike a server still starting, waiting does not change that."""


class WrongModelError(ValueError):
    """The model asked for does not answer with the outputs the client reads (another model named):
    every study would fail, and read as a bad study."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for transient errors: `attempts` tries in all, waits between them."""

    attempts: int = 5
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def backoffs(self) -> Iterator[float]:
        """The waits before the 2nd, 3rd, ... attempt (attempts - 1 of them)."""
        for retry in range(max(self.attempts, 1) - 1):
            yield min(self.initial_backoff_s * 2**retry, self.max_backoff_s)


def default_url(protocol: str) -> str:
    return f"localhost:{_DEFAULT_PORT[_check_protocol(protocol)]}"


def http_timeouts(timeout_s: float) -> dict[str, float]:
    """tritonclient.http's (geventhttpclient) timeouts for requests of `timeout_s` seconds: connecting
    takes at most 10 s of them."""
    return {"connection_timeout": min(timeout_s, 10.0), "network_timeout": timeout_s}


def checked_timeout(timeout_s: float) -> float:
    """Seconds per request: above 0 and at most MAX_TIMEOUT_S (ValueError, also for NaN)."""
    seconds = float(timeout_s)
    if not 0 < seconds <= MAX_TIMEOUT_S:
        raise ValueError(f"timeout_s must be above 0 and at most {MAX_TIMEOUT_S:.0f} s, not {timeout_s!r}")
    return seconds


def load_payload(study: Study, limits: InputLimits = INPUT_LIMITS) -> list[bytes]:
    """The elements to send: paths go through `preprocess.read_study`, the single path->payload rule,
    within `limits` (sizes checked before the files are read)."""
    if isinstance(study, (bytes, bytearray, memoryview)):
        return [bytes(study)]
    if isinstance(study, (str, os.PathLike)):
        if not os.fspath(study):  # Path("") is ".": the working folder would be read as the study
            raise EmptyInputError("the study's path is empty")
        return read_study(study, limits)
    payload = list(study)
    if not all(isinstance(element, (bytes, bytearray)) for element in payload):
        raise TypeError("a study is a path, bytes, or a sequence of bytes (one element per file)")
    return [bytes(element) for element in payload]


def payload_bytes(payload: Sequence[bytes]) -> int:
    """Size of the DICOM tensor as Triton serialises it (4-byte length prefix per element)."""
    return sum(4 + len(element) for element in payload)


class _SharedMemoryPayload:
    """The DICOM tensor written once into a POSIX shared memory region the server reads directly.

    Only for a server on the same host. The region lives for one study; it is registered per
    attempt because a restarted server has forgotten earlier registrations.
    """

    def __init__(self, payload: Sequence[bytes]):
        self.byte_size = payload_bytes(payload)
        # Writing past the free space of /dev/shm kills the process with SIGBUS: check first.
        free = _shm_free_bytes()
        if free < self.byte_size:
            raise system_shm.SharedMemoryException(
                f"/dev/shm has {free / 1024**2:.0f} MiB free, the study needs {self.byte_size / 1024**2:.0f} MiB"
            )
        self.name = f"ct_triage_client_{os.getpid()}_{uuid.uuid4().hex[:12]}"
        self.key = "/" + self.name
        self._handle = system_shm.create_shared_memory_region(self.name, self.key, self.byte_size, create_only=True)
        # Length prefixes and file bytes written in place: no concatenated copy of the study.
        values = []
        for element in payload:
            values.append(np.asarray(struct.pack("<I", len(element)), dtype=np.object_))
            values.append(np.asarray(element, dtype=np.object_))
        system_shm.set_shared_memory_region(self._handle, values)

    def close(self) -> None:
        system_shm.destroy_shared_memory_region(self._handle)


# The server may hold a region for a moment after answering ("currently in use"): wait it out.
_UNREGISTER_WAITS_S = (0.01,) * 50 + (0.1,) * 20 + (None,)


def _still_in_use(error: InferenceServerException, wait: float | None) -> bool:
    """Whether to try unregistering again; a region left registered costs server memory, not the answer."""
    if "in use" in (error.message() or "") and wait is not None:
        return True
    _log.warning("shared memory region not unregistered: %s", error.message())
    return False


def _shm_free_bytes() -> int:
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return stats.f_bavail * stats.f_frsize


def _check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
    return protocol


def _inputs(module: ModuleType, payload: Sequence[bytes], region: _SharedMemoryPayload | None):
    tensor = module.InferInput(NAMES.dicom, [len(payload)], "BYTES")
    if region is None:
        # np.object_, never np.bytes_: numpy strips trailing NUL bytes from np.bytes_ items.
        array = np.empty(len(payload), dtype=np.object_)
        array[:] = list(payload)
        tensor.set_data_from_numpy(array)
    else:
        tensor.set_shared_memory(region.name, region.byte_size)
    return [tensor]


def _outputs(module: ModuleType, explain: bool = False):
    # HTTP: binary outputs (tritonclient's default), which FP16 needs.
    return [module.InferRequestedOutput(name) for name in (_EXPLAIN_OUTPUTS if explain else _OUTPUTS)]


def _is_triton(metadata: Any) -> bool:
    return isinstance(metadata, dict) and metadata.get("name") == "triton"


def _model_description(meta: dict[str, Any], model: str) -> str:
    provenance = meta.get("provenance")
    if provenance is None:
        return model
    if isinstance(provenance, str):
        return provenance
    return json.dumps(provenance, sort_keys=True, separators=(",", ":"))


def _parse(result, model: str, seconds: float, explain: bool = False) -> TriageResult:
    def text(name: str) -> str:
        value = result.as_numpy(name).reshape(-1)[0]
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    meta = json.loads(text(NAMES.meta))
    explanation = None
    if explain:
        from .explanation import parse  # numpy and explain.geometry only

        explanation = parse(result, meta)  # ExplanationError: this study's Failure, one line
    return TriageResult(
        study_uid=text(NAMES.study_uid),
        series_uid=text(NAMES.series_uid),
        probability_of_pathology=float(result.as_numpy(NAMES.probability).reshape(-1)[0]),
        pathology=int(result.as_numpy(NAMES.pathology).reshape(-1)[0]),
        processing_status=SUCCESS,
        error=None,
        time_of_processing=seconds,
        meta=meta,
        model=_model_description(meta, model),
        explanation=explanation,
    )


def _is_transient(error: BaseException) -> bool:
    if certificate_problem(error) is not None or speaks_no_tls(error) or client_refused(error) is not None:
        return False  # gRPC reports them as UNAVAILABLE, the ssl module as an OSError: none passes with time
    if isinstance(error, InferenceServerException):
        if _QUEUE_TIMEOUT in (error.message() or ""):
            return False  # the study waited its whole deadline (the request's timeout) in a queue: do not multiply it
        reloading = error.status() in _RELOADING_STATUSES and _RELOADING_MESSAGE in (error.message() or "")
        return error.status() in _TRANSIENT_STATUSES or reloading
    if _timed_out(error):
        return False  # the request already used its whole time budget: do not multiply it
    # Refused, reset or dropped connections: the server is down or restarting. A connection closed
    # before the answer is geventhttpclient's HTTPConnectionClosed (an HTTPException, not an OSError).
    return isinstance(error, (OSError, HTTPConnectionClosed)) or _is_aiohttp_connection_error(error)


def _not_triton(error: BaseException) -> bool:
    """The server metadata was answered, but not as Triton answers it: no JSON, an HTTP status other than
    a proxy's 502-504 (a web server's 404), or a gRPC service without Triton's API (UNIMPLEMENTED)."""
    if isinstance(error, _NOT_JSON):
        return True
    if not isinstance(error, InferenceServerException) or _is_transient(error) or client_refused(error) is not None:
        return False
    return (error.status() or "").isdigit() or error.status() == "StatusCode.UNIMPLEMENTED"


def _timed_out(error: BaseException) -> bool:
    """The request used its whole time budget: an HTTP client's timeout, or gRPC's deadline."""
    if isinstance(error, InferenceServerException):
        return error.status() == _DEADLINE_EXCEEDED
    return isinstance(error, (TimeoutError, asyncio.TimeoutError))


def _is_aiohttp_connection_error(error: BaseException) -> bool:
    import aiohttp  # tritonclient.http.aio depends on it

    return isinstance(error, aiohttp.ClientConnectionError) and not isinstance(error, aiohttp.ServerTimeoutError)


def _reason(error: BaseException) -> str:
    """The server's own message when there is one, else what went wrong on the way."""
    problem = certificate_problem(error)
    if problem is not None:
        return f"TLS: {problem}"
    if speaks_no_tls(error):
        return PLAIN_TEXT_ANSWER
    refusal = client_refused(error)
    if refusal is not None:
        return f"TLS: the server refused the connection ({refusal}): {CLIENT_CERTIFICATE_HINT}"
    if _timed_out(error):
        return "no answer within the request timeout"
    if isinstance(error, InferenceServerException):
        message = _server_message(error)
        worker = _DEAD_WORKER.search(message)
        if worker:
            instance = worker.group(1)
            return _DEAD_WORKER_FAILURE.format(instance=instance)
        return f"{error.status()}: {message}" if _is_transient(error) else message
    return one_line(f"{type(error).__name__}: {error}")


def _server_message(error: InferenceServerException) -> str:
    """The server's message on one line. tritonclient.http quotes the whole body of an answer that is
    no JSON (a proxy's HTML error page, many lines): its title stands for it."""
    message = error.message() or str(error)
    if _UNDECODED_ANSWER in message:
        body = message.partition("response:")[2]
        title = re.search(r"<title>(.*?)</title>", body, re.IGNORECASE | re.DOTALL)
        return f"an answer that is not Triton's (no JSON): {one_line(title.group(1) if title else body)[:120]}"
    return one_line(message)


def one_line(text: object) -> str:
    """`text` as one line: each run of whitespace, line breaks included, becomes one space."""
    return " ".join(str(text).split())


def _describe(error: BaseException, url: str) -> str:
    """One line for the report and the terminal."""
    if certificate_problem(error) is not None:
        return f"server at {url} is not trusted ({_reason(error)})"
    if speaks_no_tls(error):
        return f"server at {url} does not speak TLS: {PLAIN_TEXT_ANSWER}"
    refusal = client_refused(error)
    if refusal is not None:
        return f"server at {url} refused the TLS connection ({refusal}): {CLIENT_CERTIFICATE_HINT}"
    if _is_transient(error):
        return f"server at {url} unreachable or unavailable ({_reason(error)})"
    if _timed_out(error):
        return f"server at {url} gave {_reason(error)}"
    return _reason(error)


def _region_failure(error: Exception, model: str, started: float) -> TriageResult:
    """No room in /dev/shm (or no /dev/shm): say so instead of crashing; the wire still works."""
    cause = f": {error.__cause__}" if error.__cause__ else ""
    return failure(
        f"cannot use shared memory ({error}{cause}); retry without it",
        seconds=time.perf_counter() - started,
        model=model,
    )


class _Base:
    def __init__(self, url, protocol, model, timeout_s, retry, shared_memory, explain, ca_file, client_cert):
        self.protocol = _check_protocol(protocol)
        self.endpoint = endpoint(default_url(protocol) if url is None else url, ca_file, self.protocol, client_cert)
        self.url = self.endpoint.url  # as messages name the server: https://HOST:PORT over TLS
        self.explain = bool(explain)
        self.model = model or (NAMES.triage_explain if self.explain else NAMES.triage)
        if self.model == NAMES.triage_explain and not self.explain:  # Triton would refuse every study (an ensemble deadlock)
            raise ValueError(f"{NAMES.triage_explain} answers with explanations: ask it with explain=True")
        self.timeout_s = checked_timeout(timeout_s)
        self.retry = retry
        self.shared_memory = shared_memory
        self._module = _SYNC[self.protocol]
        self._read_limits = INPUT_LIMITS if shared_memory else _WIRE_LIMITS

    def _infer_kwargs(self, payload, region, series_uid: str | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model_name": self.model,
            "inputs": _inputs(self._module, payload, region),
            "outputs": _outputs(self._module, self.explain),
        }
        if series_uid is not None:
            kwargs["parameters"] = {NAMES.series_parameter: series_uid}
        # the deadline is also Triton's per-request timeout (microseconds; the models' queue policies
        # allow the override): a study still queued when its caller has given up is dropped, not run
        # for no one (an explanation holds its instance for seconds to minutes)
        return kwargs | self._deadline() | {"timeout": int(self.timeout_s * 1e6)}

    def _deadline(self) -> dict[str, Any]:
        """gRPC's per-call deadline (HTTP: set on the connection instead). It bounds the health checks
        too, whatever the channel's own connection attempts take (a TLS handshake that stalls)."""
        return {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}

    def _not_ready(self, reason: str, kind: type[ServerUnavailable] = ServerUnavailable) -> ServerUnavailable:
        return kind(f"Triton server at {self.url} ({self.protocol}) is not usable: {reason}")

    def _metadata_options(self) -> dict[str, Any]:
        return {"as_json": True, **self._deadline()} if self.protocol == "grpc" else {}

    def _unusable(self, error: Exception) -> ServerUnavailable:
        """The readiness check's failure to reach the server, or to find Triton there."""
        if _not_triton(error):
            return self._not_ready(_NOT_TRITON, NotTritonError)
        return self._not_ready(_reason(error))

    def _check_answers(self, metadata: Any, live: bool, ready: bool, model_metadata: Any) -> None:
        if not _is_triton(metadata):
            raise self._not_ready(_NOT_TRITON, NotTritonError)
        if not live:
            raise self._not_ready("server is not live")
        if not ready:
            raise self._not_ready(f"model {self.model!r} is not ready")
        outputs = model_metadata.get("outputs") if isinstance(model_metadata, dict) else None
        answers = {output.get("name") for output in outputs or [] if isinstance(output, dict)}
        missing = [name for name in (_EXPLAIN_OUTPUTS if self.explain else _OUTPUTS) if name not in answers]
        if missing:
            asked = f"{'an explained' if self.explain else 'a'} triage"
            default = NAMES.triage_explain if self.explain else NAMES.triage
            raise WrongModelError(f"model {self.model!r} does not answer with {', '.join(missing)}, which {asked} reads: {default} does")

    def _read_failure(self, error: Exception, started: float) -> TriageResult | None:
        """A study that cannot even be read is a Failure row, not a crash (bad path, bad archive)."""
        if not isinstance(error, (StudyError, OSError)):
            return None
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        largest = self._read_limits.max_uncompressed_bytes
        if isinstance(error, StudyTooLargeError) and largest < INPUT_LIMITS.max_uncompressed_bytes:
            reason += f" (a request to Triton carries at most {largest / 2**30:.1f} GiB of study files, over gRPC and HTTP alike)"
        return failure(f"cannot read study: {reason}", seconds=time.perf_counter() - started, model=self.model)

    def _region(self, payload, started) -> tuple[_SharedMemoryPayload | None, TriageResult | None]:
        """The payload's shared-memory region when one is asked for, or the failure that replaces the request.
        An empty study goes on the wire (a region cannot be empty), so the server names what is wrong with it."""
        if not self.shared_memory or payload_bytes(payload) == 0:
            return None, None
        try:
            return _SharedMemoryPayload(payload), None
        except system_shm.SharedMemoryException as error:
            return None, _region_failure(error, self.model, started)

    def _after_error(self, error: Exception, backoffs, started) -> tuple[float | None, TriageResult | None]:
        """(seconds to wait before the next try, None) for a transient error while retries remain,
        else (None, the failure result)."""
        wait = next(backoffs, None) if _is_transient(error) else None
        if wait is None:
            return None, failure(_describe(error, self.url), seconds=time.perf_counter() - started, model=self.model)
        return wait, None


class TriageClient(_Base):
    """Blocking client: `TriageClient(url, "grpc").classify(path) -> TriageResult`.

    `model` defaults to ct_triage, or ct_triage_explain with `explain=True` (then every Success
    result carries `explanation`: attribution, volume and localisation). `url` `https://HOST[:PORT]`
    speaks TLS (port 443 by default), verified against `ca_file` (a PEM bundle) or the library's
    default roots, presenting `client_cert` (certificate file, key file) where the server asks for
    one; `HOST:PORT` or `http://HOST:PORT` plain; other schemes raise ValueError."""

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "grpc",
        model: str | None = None,
        timeout_s: float = SERVING.request_timeout_s,
        *,
        retry: RetryPolicy = RetryPolicy(),
        shared_memory: bool = False,
        explain: bool = False,
        ca_file: PathLike | None = None,
        client_cert: tuple[PathLike, PathLike] | None = None,
    ):
        super().__init__(url, protocol, model, timeout_s, retry, shared_memory, explain, ca_file, client_cert)
        if self.protocol == "http":
            self._triton = tritonclient.http.InferenceServerClient(
                self.endpoint.address, **http_timeouts(self.timeout_s), **self.endpoint.http_sync_options()
            )
        else:
            self._triton = tritonclient.grpc.InferenceServerClient(self.endpoint.address, **self.endpoint.grpc_options())

    def __enter__(self) -> TriageClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._triton.close()

    @property
    def triton(self):
        """The underlying tritonclient client (statistics, metadata)."""
        return self._triton

    def check_ready(self) -> None:
        """Raise ServerUnavailable with one clear line unless the server and the model are ready, and
        WrongModelError unless the model answers with the outputs this client reads (its metadata)."""
        try:
            metadata = self._triton.get_server_metadata(**self._metadata_options())
            live = _is_triton(metadata) and self._triton.is_server_live(**self._deadline())
            ready = live and self._triton.is_model_ready(self.model, **self._deadline())
            model_metadata = ready and self._triton.get_model_metadata(self.model, **self._metadata_options())
        except Exception as error:  # any transport failure means "not reachable"
            raise self._unusable(error) from None
        self._check_answers(metadata, live, ready, model_metadata)

    def classify(self, study: Study, series_uid: str | None = None) -> TriageResult:
        """`series_uid`: the series to classify (a study of several patients' series is refused unless
        one is named); None lets the server's selection rule choose."""
        started = time.perf_counter()
        try:
            payload = load_payload(study, self._read_limits)
        except Exception as error:
            result = self._read_failure(error, started)
            if result is None:
                raise
            return result
        region, failed = self._region(payload, started)
        if failed is not None:
            return failed
        try:
            return self._send(payload, region, started, series_uid)
        finally:
            if region is not None:
                region.close()

    def _send(self, payload, region, started, series_uid) -> TriageResult:
        backoffs = self.retry.backoffs()
        while True:
            try:
                answer = self._infer_once(payload, region, series_uid)
                return _parse(answer, self.model, time.perf_counter() - started, self.explain)
            except Exception as error:
                wait, failed = self._after_error(error, backoffs, started)
                if failed is not None:
                    return failed
            time.sleep(wait)

    def _infer_once(self, payload, region, series_uid):
        if region is None:
            return self._triton.infer(**self._infer_kwargs(payload, None, series_uid))
        self._triton.register_system_shared_memory(region.name, region.key, region.byte_size)
        try:
            return self._triton.infer(**self._infer_kwargs(payload, region, series_uid))
        finally:
            for wait in _UNREGISTER_WAITS_S:
                try:
                    self._triton.unregister_system_shared_memory(region.name)
                    break
                except InferenceServerException as error:
                    if not _still_in_use(error, wait):
                        break
                time.sleep(wait)


class AsyncTriageClient(_Base):
    """asyncio client with the same API; construct it inside the running event loop."""

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "grpc",
        model: str | None = None,
        timeout_s: float = SERVING.request_timeout_s,
        *,
        retry: RetryPolicy = RetryPolicy(),
        shared_memory: bool = False,
        explain: bool = False,
        ca_file: PathLike | None = None,
        client_cert: tuple[PathLike, PathLike] | None = None,
    ):
        super().__init__(url, protocol, model, timeout_s, retry, shared_memory, explain, ca_file, client_cert)
        if self.protocol == "http":
            self._triton = tritonclient.http.aio.InferenceServerClient(
                self.endpoint.address, conn_timeout=self.timeout_s, **self.endpoint.http_aio_options()
            )
        else:
            self._triton = tritonclient.grpc.aio.InferenceServerClient(self.endpoint.address, **self.endpoint.grpc_options())

    async def __aenter__(self) -> AsyncTriageClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._triton.close()

    @property
    def triton(self):
        return self._triton

    async def check_ready(self) -> None:
        try:
            metadata = await self._triton.get_server_metadata(**self._metadata_options())
            live = _is_triton(metadata) and await self._triton.is_server_live(**self._deadline())
            ready = live and await self._triton.is_model_ready(self.model, **self._deadline())
            model_metadata = ready and await self._triton.get_model_metadata(self.model, **self._metadata_options())
        except Exception as error:
            raise self._unusable(error) from None
        self._check_answers(metadata, live, ready, model_metadata)

    async def classify(self, study: Study, series_uid: str | None = None) -> TriageResult:
        started = time.perf_counter()
        try:
            payload = await asyncio.to_thread(load_payload, study, self._read_limits)
        except Exception as error:
            result = self._read_failure(error, started)
            if result is None:
                raise
            return result
        region, failed = await asyncio.to_thread(self._region, payload, started)  # copies the study: off the event loop
        if failed is not None:
            return failed
        try:
            return await self._send(payload, region, started, series_uid)
        finally:
            if region is not None:
                await asyncio.to_thread(region.close)

    async def _send(self, payload, region, started, series_uid) -> TriageResult:
        backoffs = self.retry.backoffs()
        while True:
            try:
                answer = await self._infer_once(payload, region, series_uid)
                return _parse(answer, self.model, time.perf_counter() - started, self.explain)
            except Exception as error:
                wait, failed = self._after_error(error, backoffs, started)
                if failed is not None:
                    return failed
            await asyncio.sleep(wait)

    async def _infer_once(self, payload, region, series_uid):
        if region is None:
            return await self._triton.infer(**self._infer_kwargs(payload, None, series_uid))
        await self._triton.register_system_shared_memory(region.name, region.key, region.byte_size)
        try:
            return await self._triton.infer(**self._infer_kwargs(payload, region, series_uid))
        finally:
            for wait in _UNREGISTER_WAITS_S:
                try:
                    await self._triton.unregister_system_shared_memory(region.name)
                    break
                except InferenceServerException as error:
                    if not _still_in_use(error, wait):
                        break
                await asyncio.sleep(wait)
