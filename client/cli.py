"""`python -m client classify STUDY`, `python -m client report FOLDER --out report.xlsx` and
`python -m client set-threshold VALUE`.

`--explain` asks ct_triage_explain instead of ct_triage: classify saves the montage, the attribution
volume and its geometry into --out-dir; report adds pathology_localization and an HTML summary page.

Exit status: 0 done; 1 the study failed (classify); 2 bad arguments or unusable paths, a --model
without the outputs the command reads, or the explanation's files could not be written (classify
prints the answer anyway); 3 the server or model
is not reachable, stopped answering during a report (the report keeps the finished studies;
--resume sends the rest), or refused the new threshold; 130 interrupted (Ctrl-C), 143 terminated
(SIGTERM, as a service manager stops a job): a report keeps the finished studies either way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from http.client import HTTPException
from pathlib import Path

from tritonclient.utils import InferenceServerException

from contract import parse_threshold
from contract.arguments import integer, number, threshold
from preprocess import printable
from settings import ADMIN, NAMES, SERVING

from .operating_point import KeyInClearError, set_threshold
from .report import DEFAULT_MAX_BYTES_IN_FLIGHT, DEFAULT_WRITE_EVERY_S, ReportError, build_report, writable_folder
from .tls import CLIENT_CERTIFICATE_HINT, HTTPS_PORT, PLAIN_TEXT_ANSWER, certificate_problem, client_refused, endpoint, speaks_no_tls
from .triage import (
    MAX_TIMEOUT_S,
    PROTOCOLS,
    AsyncTriageClient,
    RetryPolicy,
    ServerUnavailable,
    TriageClient,
    WrongModelError,
    default_url,
)

MAX_CONCURRENCY = 1024  # studies in flight: far past what any server's instances take at once
MAX_ATTEMPTS = 100  # tries per study: with the backoff capped at 8 s, about 13 minutes of retrying

EXIT_FAILURE, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 3, 130, 143


class UsageError(ValueError):
    """Options that do not go together."""


class Terminated(Exception):
    """SIGTERM stopped a report: it ended as after Ctrl-C, its finished studies written."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except ServerUnavailable as error:
        print(f"error: {printable(str(error))}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (ReportError, UsageError, WrongModelError, NotADirectoryError, FileNotFoundError, IsADirectoryError, PermissionError) as error:
        print(f"error: {printable(str(error))}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:  # a path the system refuses (a name too long, a loop of links)
        where = f": {printable(os.fsdecode(error.filename))}" if error.filename is not None else ""
        print(f"error: {error.strerror or type(error).__name__}{where}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("terminated", file=sys.stderr)
        return EXIT_TERMINATED


def _connection(args: argparse.Namespace) -> dict:
    """The connection options both commands share, as TriageClient / AsyncTriageClient arguments,
    the URL and TLS files checked first (a report builds its clients only once the run has started)."""
    _check_endpoint(default_url(args.protocol) if args.url is None else args.url, args, args.protocol)
    return dict(
        url=args.url,
        protocol=args.protocol,
        model=args.model,
        timeout_s=args.timeout,
        retry=RetryPolicy(attempts=args.attempts),
        shared_memory=args.shared_memory,
        explain=args.explain,
        ca_file=args.ca_file,
        client_cert=_client_cert(args),
    )


def _client_cert(args: argparse.Namespace) -> tuple[str, str] | None:
    if (args.client_cert is None) != (args.client_key is None):
        raise UsageError("--client-cert and --client-key go together: the certificate and its key, each a PEM file")
    return None if args.client_cert is None else (args.client_cert, args.client_key)


def _check_endpoint(url: str, args: argparse.Namespace, protocol: str = "http") -> None:
    """An unsupported scheme, --ca-file or --client-cert without https://, or TLS files that cannot be used: exit 2."""
    try:
        endpoint(url, args.ca_file, protocol, _client_cert(args))
    except ValueError as error:  # client.tls.CAFileError and ClientCertificateError too
        raise UsageError(str(error)) from None


def _classify(args: argparse.Namespace) -> int:
    if not args.study:  # Path("") is ".": an unset variable would classify the working folder
        raise UsageError("STUDY is empty: name a study folder, ZIP or DICOM file")
    if not Path(args.study).exists():
        raise FileNotFoundError(f"no such study: {args.study}")
    if args.explain != (args.out_dir is not None):
        raise UsageError("--explain and --out-dir go together: the explanation's files are written to --out-dir")
    _check_model(args)
    connection = _connection(args)
    if args.out_dir is not None:  # usable before the study is sent, not after it was classified
        writable_folder(args.out_dir, "--out-dir")
    with TriageClient(**connection) as client:
        client.check_ready()
        result = client.classify(args.study, series_uid=args.series)
    answer = result.to_dict()
    unwritten = None
    if args.explain:
        from .explanation import save

        answer["pathology_localization"] = result.pathology_localization
        try:
            answer["files"] = [str(path) for path in save(result, args.out_dir)]
        except OSError as error:  # a full disk: the answer is still printed, the files' failure said
            answer["files"] = []
            unwritten = f"cannot write the explanation's files into {args.out_dir}: {error.strerror or type(error).__name__}"
    print(json.dumps(answer, indent=2))
    if not result.ok:
        print(f"error: {printable(result.error or '')}", file=sys.stderr)
        return EXIT_FAILURE
    if unwritten is not None:
        print(f"error: {printable(unwritten)}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _check_model(args: argparse.Namespace) -> None:
    """ct_triage_explain answers only with its explanation outputs: asked for ct_triage's alone, Triton
    refuses every study (an ensemble deadlock), which would read as bad studies."""
    if args.model == NAMES.triage_explain and not args.explain:
        raise UsageError(f"--model {NAMES.triage_explain} answers with explanations: add --explain")


def _report(args: argparse.Namespace) -> int:
    _check_model(args)
    connection = _connection(args)

    def client() -> AsyncTriageClient:
        return AsyncTriageClient(**connection)

    summary = asyncio.run(
        _stopped_by_sigterm_like_ctrl_c(
            build_report(
                args.folder,
                args.out,
                client,
                csv_out=args.csv,
                concurrency=args.concurrency,
                resume=args.resume,
                max_bytes_in_flight=args.max_bytes_in_flight,
                write_every_s=args.write_every,
                stable_age_s=args.stable_age,
            )
        )
    )
    written = f"{args.out}, summary {summary.page}" if summary.page is not None else f"{args.out}"
    arriving = f"; {len(summary.arriving)} still arriving, left for a later --resume run" if summary.arriving else ""
    done = (
        f"{summary.studies} studies: {summary.succeeded} Success, {summary.failed} Failure "
        f"({summary.sent} sent, {summary.skipped} already done{arriving}) -> {written} (journal {summary.journal.name})"
    )
    print(printable(done), file=sys.stderr)
    return 0


def _set_threshold(args: argparse.Namespace) -> int:
    """The operating point of the running server, until it restarts; the admin key comes from the
    environment only, as the server's does (an argument would show in `ps`)."""
    admin_key = os.environ.get(ADMIN.key_env)
    try:
        ADMIN.checked_key(admin_key)
    except ValueError as error:
        raise UsageError(f"{ADMIN.key_env}: {error}") from None
    _check_endpoint(args.url, args)
    try:
        config = set_threshold(
            args.url, args.threshold, admin_key=admin_key, ca_file=args.ca_file, client_cert=_client_cert(args), timeout_s=args.timeout
        )
    except PermissionError:  # the wrong key (an OSError too): exit 2
        raise
    except KeyInClearError as error:
        raise UsageError(str(error)) from None
    except TimeoutError:  # an OSError too: a server that accepts the connection and never answers
        raise ServerUnavailable(f"the server at {args.url} gave no answer within the request timeout") from None
    except OSError as error:  # refused connection, DNS, timeout, a certificate that does not verify
        _raise_if_refused(args.url, error)
        problem = certificate_problem(error)
        if problem is not None:
            raise ServerUnavailable(f"the server at {args.url} is not trusted (TLS: {problem})") from None
        if speaks_no_tls(error):
            raise ServerUnavailable(f"the server at {args.url} does not speak TLS: {PLAIN_TEXT_ANSWER}") from None
        raise ServerUnavailable(f"the server at {args.url} is not reachable ({type(error).__name__})") from None
    except InferenceServerException as error:  # e.g. a server not started in explicit model-control mode
        _raise_if_refused(args.url, error)
        raise ServerUnavailable(f"the server at {args.url} refused the new threshold: {error.message()}") from None
    except (HTTPException, ValueError):  # after OSError (a failed verification is a ValueError too): an answer
        # that is not HTTP (the gRPC port) or not JSON (the metrics port)
        raise ServerUnavailable(f"the server at {args.url} did not answer as Triton's HTTP API: is that its HTTP port?") from None
    in_force = parse_threshold(config["parameters"]["threshold"]["string_value"])
    print(json.dumps({"model": NAMES.postprocess, "threshold": in_force}))
    return 0


def _raise_if_refused(url: str, error: Exception) -> None:
    """ServerUnavailable naming it when a proxy refused this client's TLS connection (client.tls.client_refused)."""
    refusal = client_refused(error)
    if refusal is not None:
        raise ServerUnavailable(f"the server at {url} refused the TLS connection ({refusal}): {CLIENT_CERTIFICATE_HINT}") from None


async def _stopped_by_sigterm_like_ctrl_c(report):
    """Await `report`, cancelled on SIGTERM as asyncio.run cancels it on Ctrl-C: systemd, docker stop
    and Kubernetes stop a job with SIGTERM, whose default action would skip the last report rewrite."""
    task, loop = asyncio.current_task(), asyncio.get_running_loop()
    terminated = False

    def terminate() -> None:
        nonlocal terminated
        if not terminated:  # a second SIGTERM must not cut short the final rewrite
            terminated = True
            task.cancel()

    loop.add_signal_handler(signal.SIGTERM, terminate)
    try:
        return await report
    except asyncio.CancelledError:
        if terminated:
            raise Terminated() from None
        raise  # Ctrl-C: asyncio.run turns it into KeyboardInterrupt
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def _parser() -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__.split("\n\n")[0], formatter_class=formatter)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    classify = commands.add_parser("classify", help="classify one study, print one JSON object", formatter_class=formatter)
    classify.add_argument("study", help="a folder of DICOM files, a ZIP archive, or one DICOM file")
    classify.add_argument(
        "--explain",
        action="store_true",
        help=f"ask {NAMES.triage_explain}: save montage.png, attribution.npy and attribution.json into --out-dir",
    )
    classify.add_argument(
        "--out-dir", metavar="DIR", help="folder for the explanation's files (created if missing); --explain and --out-dir go together"
    )
    classify.add_argument(
        "--series",
        metavar="UID",
        help="the SeriesInstanceUID to classify (a study with several patients' series needs one); omitted: the automatic choice",
    )
    classify.set_defaults(run=_classify)

    report = commands.add_parser("report", help="classify every study in a folder into a report", formatter_class=formatter)
    report.add_argument("folder", help="each ZIP file and each sub-folder holding DICOM files is one study")
    report.add_argument("--out", required=True, metavar="FILE", help="report file, .xlsx (or .csv)")
    report.add_argument("--csv", metavar="FILE", help="also write the report as this .csv file; omitted: no second file")
    report.add_argument("--concurrency", type=integer(1, MAX_CONCURRENCY), default=1, metavar="N", help="studies in flight")
    report.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows of --out's journal (or of --out) and send only the studies not yet Success",
    )
    report.add_argument(
        "--write-every",
        type=number(0),
        default=DEFAULT_WRITE_EVERY_S,
        metavar="SECONDS",
        help="rewrite the report files from the journal at most this often, and at the end, s",
    )
    report.add_argument(
        "--stable-age",
        type=number(0),
        default=0.0,
        metavar="SECONDS",
        help="leave out studies with a file written less than this long ago, s (still being copied or exported); "
        "a later --resume run sends them; 0: every study",
    )
    report.add_argument(
        "--max-mb-in-flight",
        type=_mebibytes,
        default=str(DEFAULT_MAX_BYTES_IN_FLIGHT // 1024**2),  # in MiB, as typed: argparse converts a str default with type, to bytes
        dest="max_bytes_in_flight",
        metavar="MIB",
        help="bound on study file sizes held at once, MiB",
    )
    report.add_argument(
        "--explain",
        action="store_true",
        help=f"ask {NAMES.triage_explain}: fill pathology_localization, write OUT's .html summary page and thumbnails beside it",
    )
    report.set_defaults(run=_report)

    threshold_command = commands.add_parser(
        "set-threshold",
        help="change the running server's operating point until it restarts (pathology when P >= VALUE)",
        description=f"Reload {NAMES.postprocess} with a new threshold; {NAMES.triage} keeps serving. The key of a server "
        f"started with one is read from {ADMIN.key_env}. Permanent: the repository's {NAMES.postprocess}/config.pbtxt.",
        formatter_class=formatter,
    )
    threshold_command.add_argument("threshold", type=threshold, metavar="VALUE", help="a number in [0, 1]")
    threshold_command.add_argument(
        "--url",
        default=default_url("http"),
        help=f"the server's HTTP endpoint, HOST:PORT, or https://HOST[:PORT] for TLS (no PORT: {HTTPS_PORT}); "
        "send the admin key over https:// from outside the server's host",
    )
    threshold_command.set_defaults(run=_set_threshold)

    for command in (classify, report, threshold_command):
        command.add_argument(
            "--timeout",
            type=number(0, MAX_TIMEOUT_S, above_low=True),
            default=SERVING.request_timeout_s,
            metavar="SECONDS",
            help="deadline per request, s",
        )
    for command in (classify, report):
        command.add_argument(
            "--url",
            help=f"HOST:PORT, or https://HOST[:PORT] for TLS (no PORT: {HTTPS_PORT}), e.g. a TLS proxy in front of "
            f"Triton; omitted: {default_url('grpc')} for grpc, {default_url('http')} for http",
        )
        command.add_argument("--protocol", choices=PROTOCOLS, default="grpc", help="how to talk to Triton (KServe v2 gRPC or HTTP/REST)")
        command.add_argument(
            "--model", metavar="NAME", help=f"model to ask; omitted: {NAMES.triage}, with --explain {NAMES.triage_explain}"
        )
        command.add_argument(
            "--attempts",
            type=integer(1, MAX_ATTEMPTS),
            default=RetryPolicy().attempts,
            metavar="N",
            help="tries per study on transient errors (server restarting or unreachable)",
        )
        command.add_argument(
            "--shared-memory",
            action="store_true",
            help="pass the DICOM payload through system shared memory (server on this host only)",
        )
    for command in (classify, report, threshold_command):
        command.add_argument(
            "--ca-file",
            metavar="FILE",
            help="PEM bundle of the CA that signed the server's TLS certificate, for an https:// --url; "
            "omitted: the TLS library's own trust roots (client/README.md, TLS)",
        )
        command.add_argument(
            "--client-cert",
            metavar="FILE",
            help="PEM certificate to present to an https:// --url that asks for client certificates (mutual TLS); with --client-key; "
            "omitted: none presented",
        )
        command.add_argument("--client-key", metavar="FILE", help="the unencrypted PEM key of --client-cert")
    return parser


def _mebibytes(text: str) -> int:
    """MiB as bytes; at most 1 TiB (a bound this large holds any study, and its bytes stay a number)."""
    return max(int(number(0, 2**20, above_low=True)(text) * 1024**2), 1)
