"""Clients of the chest-CT triage server: classify one study, or a folder into the triage report,
and change a running server's operating point."""

import os

# gRPC's core logs each failed TLS handshake (a certificate that does not verify) at INFO on stderr,
# a second line beside the client's own; it reads the level once, when grpc is first imported (below).
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from .operating_point import KeyInClearError, set_threshold
from .report import COLUMNS, ReportError, ReportSummary, build_report, read_report, write_report
from .result import FAILURE, SUCCESS, TriageResult
from .studies import StudyRef, discover_studies
from .tls import CAFileError, ClientCertificateError
from .triage import (
    AsyncTriageClient,
    NotTritonError,
    RetryPolicy,
    ServerUnavailable,
    TriageClient,
    WrongModelError,
    load_payload,
    payload_bytes,
)

__all__ = [
    "COLUMNS",
    "FAILURE",
    "SUCCESS",
    "AsyncTriageClient",
    "CAFileError",
    "ClientCertificateError",
    "KeyInClearError",
    "NotTritonError",
    "ReportError",
    "ReportSummary",
    "RetryPolicy",
    "ServerUnavailable",
    "StudyRef",
    "TriageClient",
    "TriageResult",
    "WrongModelError",
    "build_report",
    "discover_studies",
    "load_payload",
    "payload_bytes",
    "read_report",
    "set_threshold",
    "write_report",
]
