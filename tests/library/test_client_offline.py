"""Client parts that need no server: study discovery, report files, resume, retries, memory bound."""

from __future__ import annotations

import asyncio
import http.server
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openpyxl
import pytest
from helpers import ROOT, answering, black_hole, report_row, run_module

import client
from client.cli import main as client_main
from client.report import _ByteBudget
from client.triage import _is_transient
from settings import NAMES


def _dicom_like(path: Path, body: bytes = b"") -> None:
    """A file that discovery recognises as DICOM (preamble + DICM), without any extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + body)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nobody listens once the probe is closed


def test_discovery_finds_zips_and_dicom_folders_in_stable_order(tmp_path):
    (tmp_path / "b.zip").write_bytes(b"PK\x03\x04rest")
    (tmp_path / "archive_without_suffix").write_bytes(b"PK\x03\x04rest")
    _dicom_like(tmp_path / "a_study" / "series1" / "IM0001")  # series in deeper folders: one study
    _dicom_like(tmp_path / "a_study" / "series2" / "IM0001")
    _dicom_like(tmp_path / "c_study" / "slice.dcm")
    (tmp_path / "e_bare").mkdir()
    (tmp_path / "e_bare" / "IM0001").write_bytes(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100")  # a data set without file header
    (tmp_path / "grouped" / "nested").mkdir(parents=True)
    (tmp_path / "grouped" / "nested" / "d.ZIP").write_bytes(b"not really a zip")  # corrupt: still a study
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no DICOM here")
    _dicom_like(tmp_path / ".hidden" / "IM0001")
    _dicom_like(tmp_path / "loose_multiframe.dcm")
    (tmp_path / "loose.txt").write_text("not a study")

    studies = client.discover_studies(tmp_path)

    assert [study.path_to_study for study in studies] == [
        "a_study",
        "archive_without_suffix",
        "b.zip",
        "c_study",
        "e_bare",
        "grouped/nested/d.ZIP",
        "loose_multiframe.dcm",
    ]
    sizes = {study.path_to_study: study.size_bytes for study in studies}
    assert sizes["a_study"] == 2 * 132 and sizes["b.zip"] == 8
    assert client.discover_studies(tmp_path) == studies  # deterministic


def test_a_dangling_link_is_a_study_that_fails_to_read_not_a_lost_report(tmp_path):
    _dicom_like(tmp_path / "a_study" / "IM0001")
    (tmp_path / "a_study" / "IM0002").symlink_to(tmp_path / "gone")  # inside a study: counted as 0 bytes
    (tmp_path / "moved.zip").symlink_to(tmp_path / "gone.zip")

    studies = client.discover_studies(tmp_path)

    assert [(study.path_to_study, study.size_bytes) for study in studies] == [("a_study", 132), ("moved.zip", 0)]
    with client.TriageClient(f"127.0.0.1:{_closed_port()}", protocol="grpc") as triage:
        result = triage.classify(studies[1].path)
    assert (
        result.processing_status == client.FAILURE
        and result.error == "cannot read study: input path does not exist or is not a file or folder"
    )


def test_discovery_dates_each_study_by_its_newest_file(tmp_path):
    """What --stable-age compares: when a study's newest file changed, however deep; a ZIP's own. A
    copy that keeps the source's old modification time (cp -p, rsync -a, unzip) is still recent."""
    started = time.time() - 1  # file system timestamps may be coarser than time.time()
    _dicom_like(tmp_path / "a_study" / "series1" / "IM0001")
    _dicom_like(tmp_path / "a_study" / "series2" / "IM0001")
    (tmp_path / "b.zip").write_bytes(b"PK\x03\x04rest")
    (tmp_path / "moved.zip").symlink_to(tmp_path / "gone.zip")
    os.utime(tmp_path / "a_study" / "series2" / "IM0001", (1_000_000, 1_000_000))  # its inode changed last
    os.utime(tmp_path / "b.zip", (1_000_000, 1_000_000))  # copied just now with its source's time

    modified = {study.path_to_study: study.modified for study in client.discover_studies(tmp_path)}

    newest = (tmp_path / "a_study" / "series2" / "IM0001").stat().st_ctime
    assert newest > (tmp_path / "a_study" / "series1" / "IM0001").stat().st_ctime
    assert modified["a_study"] == newest and modified["moved.zip"] == 0.0  # a dangling link: never "arriving"
    assert started <= modified["b.zip"] <= time.time()


def test_a_modification_time_in_the_future_does_not_keep_a_study_arriving(tmp_path):
    """rsync -a from a host whose clock is ahead keeps the source's future time: with --stable-age the
    modification time would keep the study "still arriving" on every run until that date. The inode
    change time, set by this host's clock, says when it arrived."""
    started = time.time() - 1
    _dicom_like(tmp_path / "a_study" / "IM0001")
    (tmp_path / "b.zip").write_bytes(b"PK\x03\x04rest")
    years_ahead = time.time() + 4 * 365 * 86400
    for path in (tmp_path / "a_study" / "IM0001", tmp_path / "b.zip"):
        os.utime(path, (years_ahead, years_ahead))

    modified = [study.modified for study in client.discover_studies(tmp_path)]

    assert len(modified) == 2 and all(started <= when <= time.time() for when in modified)


def test_discovery_never_blocks_on_a_fifo_nor_follows_a_link_back_up(tmp_path):
    """A FIFO would block open() forever (Ctrl-C and SIGTERM only queued); a link to the folder or
    above would make the whole archive one more study. A link to a study elsewhere is a study."""
    _dicom_like(tmp_path / "archive" / "s1" / "IM0001")
    (tmp_path / "archive" / "misc").mkdir()
    os.mkfifo(tmp_path / "archive" / "misc" / "pipe")
    (tmp_path / "archive" / "loop").symlink_to(tmp_path / "archive")
    (tmp_path / "archive" / "up").symlink_to(tmp_path)
    _dicom_like(tmp_path / "elsewhere" / "IM0001")
    (tmp_path / "archive" / "linked").symlink_to(tmp_path / "elsewhere")
    found = []
    scan = threading.Thread(target=lambda: found.extend(client.discover_studies(tmp_path / "archive")), daemon=True)
    scan.start()
    scan.join(timeout=30)
    assert not scan.is_alive(), "discovery blocked"
    assert [study.path_to_study for study in found] == ["linked", "s1"]


def test_a_link_that_loops_is_no_traceback_and_a_link_to_a_study_inside_is_no_second_study(tmp_path):
    _dicom_like(tmp_path / "patient1" / "IM0001")
    (tmp_path / "exam.zip").write_bytes(b"PK\x03\x04rest")
    (tmp_path / "latest").symlink_to(tmp_path / "patient1")  # the same study again
    (tmp_path / "group").mkdir()
    (tmp_path / "group" / "exam.zip").symlink_to(tmp_path / "exam.zip")
    (tmp_path / "group" / "loop.zip").symlink_to(tmp_path / "group" / "loop.zip")
    (tmp_path / "loop.zip").symlink_to(tmp_path / "loop.zip")
    (tmp_path / "notes").symlink_to(tmp_path / "notes")

    studies = client.discover_studies(tmp_path)

    assert [study.path_to_study for study in studies] == ["exam.zip", "group/loop.zip", "loop.zip", "patient1"]
    with client.TriageClient(f"127.0.0.1:{_closed_port()}", protocol="grpc") as triage:
        result = triage.classify(studies[2].path)
    assert result.processing_status == client.FAILURE and result.error.startswith("cannot read study:"), result.error


def test_a_folder_linked_below_the_top_is_looked_at_as_if_it_were_there(tmp_path):
    """A study linked into a group folder, a series linked into a patient's folder: each gets its
    row (not left out with exit 0). Links back up, and loops between linked folders, are no study."""
    elsewhere, root = tmp_path / "elsewhere", tmp_path / "studies"
    _dicom_like(elsewhere / "exam" / "IM0001")
    _dicom_like(elsewhere / "series" / "IM0001")
    (elsewhere / "group").mkdir()
    (elsewhere / "group" / "scan.zip").write_bytes(b"PK\x03\x04rest")
    (elsewhere / "group" / "back").symlink_to(elsewhere / "group")  # a loop between linked folders
    (root / "group").mkdir(parents=True)
    (root / "group" / "first.zip").write_bytes(b"PK\x03\x04rest")
    (root / "group" / "exam").symlink_to(elsewhere / "exam")
    (root / "group" / "more").symlink_to(elsewhere / "group")
    (root / "group" / "up").symlink_to(root)
    (root / "patient").mkdir()
    (root / "patient" / "series1").symlink_to(elsewhere / "series")
    (root / "patient" / "series2").symlink_to(elsewhere / "exam")  # a study already found: listed once

    studies = [study.path_to_study for study in client.discover_studies(root)]

    assert studies == ["group/exam", "group/first.zip", "group/more/scan.zip", "patient/series1"]


def test_what_cannot_be_read_is_a_study_whose_row_says_so_not_left_out(tmp_path):
    """A folder that cannot be listed or files that cannot be opened (another user's export, a copy
    with the wrong permissions): their rows say why, instead of the studies silently missing. Root
    reads everything, so discovery runs without the capabilities that let it."""
    _dicom_like(tmp_path / "patientA" / "IM0001")
    _dicom_like(tmp_path / "patientB" / "IM0001")
    _dicom_like(tmp_path / "patientC" / "IM0001")
    (tmp_path / "group" / "locked").mkdir(parents=True)
    (tmp_path / "group" / "x.zip").write_bytes(b"PK\x03\x04rest")
    (tmp_path / "group" / "unknown").write_bytes(b"PK\x03\x04rest")
    locked = [tmp_path / "patientB", tmp_path / "patientC" / "IM0001", tmp_path / "group" / "locked", tmp_path / "group" / "unknown"]
    for path in locked:
        path.chmod(0)
    tmp_path.chmod(0o755)
    as_a_user = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]
    discover = "import sys, client; print(*(study.path_to_study for study in client.discover_studies(sys.argv[1])))"
    try:
        done = subprocess.run(
            [*(as_a_user if os.geteuid() == 0 else []), sys.executable, "-c", discover, str(tmp_path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        for path in locked:
            path.chmod(0o755)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["group/locked", "group/unknown", "group/x.zip", "patientA", "patientB", "patientC"]


@pytest.mark.parametrize("timeout_s", [0, -1, float("nan"), 1e10])
def test_a_timeout_gRPC_or_HTTP_cannot_keep_is_refused_at_construction(timeout_s):
    for make in (client.TriageClient, client.AsyncTriageClient):
        with pytest.raises(ValueError, match="timeout_s must be above 0 and at most 86400 s"):
            make("127.0.0.1:1", protocol="grpc", timeout_s=timeout_s)


def test_discovery_rejects_a_file(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"PK\x03\x04")
    with pytest.raises(NotADirectoryError):
        client.discover_studies(tmp_path / "x.zip")


@pytest.mark.parametrize("suffix", [".xlsx", ".csv"])
def test_report_round_trip_keeps_header_types_and_order(tmp_path, suffix):
    rows = [
        report_row("b.zip"),
        report_row("a", client.FAILURE),
        report_row("c", probability=0.875, threshold=0.7),
    ]
    path = tmp_path / f"report{suffix}"

    client.write_report(rows, path)

    assert client.read_report(path) == rows
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    if suffix == ".xlsx":
        sheet = openpyxl.load_workbook(path).active
        assert tuple(cell.value for cell in sheet[1]) == client.COLUMNS
        assert sheet.cell(row=4, column=4).value == 0.875  # a number, not text
        assert sheet.cell(row=4, column=10).value == 0.7


def test_report_write_is_atomic_when_writing_fails(tmp_path):
    path = tmp_path / "report.xlsx"
    client.write_report([report_row("a")], path)
    before = path.read_bytes()

    with pytest.raises(ValueError):  # openpyxl refuses a cell value half-way through the file
        client.write_report([report_row("a"), {**report_row("b"), "model": object()}], path)

    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["report.xlsx"]


@pytest.mark.parametrize("suffix", [".xlsx", ".csv"])
def test_a_full_disk_fails_the_rewrite_in_one_error_and_nothing_on_stderr(tmp_path, monkeypatch, suffix):
    """The report's file fails as a full disk fails it (ENOSPC after its first KiB). openpyxl saving
    straight into it left its zip writer half closed, and its collection printed two tracebacks
    ("Exception ignored in ...") under the command's one-line error."""
    import errno
    import gc

    from preprocess import output

    class FullDisk(io.RawIOBase):
        def __init__(self, file):
            self.file, self.left = file, 1024

        def writable(self):
            return True

        def write(self, data):
            if len(data) > self.left:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.left -= len(data)
            return self.file.write(data)

        def fileno(self):
            return self.file.fileno()

        def close(self):
            self.file.close()
            super().close()

    real_fdopen = os.fdopen
    monkeypatch.setattr(output.os, "fdopen", lambda handle, mode: FullDisk(real_fdopen(handle, mode)))
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    path = tmp_path / f"report{suffix}"
    with pytest.raises(OSError, match="No space left on device"):
        client.write_report([report_row(f"study-{k}") for k in range(2000)], path)
    gc.collect()
    assert unraisable == []
    assert list(tmp_path.iterdir()) == []  # no report, no temporary file left


def test_a_wrong_report_suffix_stops_the_run_before_any_study(tmp_path):
    _dicom_like(tmp_path / "studies" / "a" / "IM0001")

    def no_server():
        raise AssertionError("the server was contacted")

    for out, csv_out in ((tmp_path / "r.txt", None), (tmp_path / "r.xlsx", tmp_path / "r.txt")):
        with pytest.raises(client.ReportError, match=r"r\.txt"):
            asyncio.run(client.build_report(tmp_path / "studies", out, no_server, csv_out=csv_out))
    assert not list(tmp_path.glob("r.*"))


def test_read_report_refuses_other_tables(tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("name,value\nx,1\n")
    with pytest.raises(client.ReportError, match="not a triage report"):
        client.read_report(other)
    with pytest.raises(client.ReportError):
        client.write_report([], tmp_path / "report.txt")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unreachable_server_gives_failure_after_bounded_retries(protocol):
    retry = client.RetryPolicy(attempts=3, initial_backoff_s=0.1)
    with client.TriageClient(f"127.0.0.1:{_closed_port()}", protocol, retry=retry, timeout_s=5) as triage:
        started = time.perf_counter()
        result = triage.classify(b"\0" * 128 + b"DICM")
        elapsed = time.perf_counter() - started

    assert result.processing_status == client.FAILURE and not result.ok
    assert "unreachable" in result.error
    assert 0.3 <= elapsed < 5  # waited 0.1 + 0.2 between the three attempts, then gave up
    assert result.time_of_processing == pytest.approx(elapsed, abs=0.05)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_connection_closed_before_the_answer_is_retried_as_a_server_gone(protocol):
    """What a client sees of a server killed mid-request, or of a TLS proxy that drops it: the
    blocking HTTP client raised geventhttpclient's HTTPConnectionClosed, which is no OSError."""
    accepted: list[bytes] = []
    url, listener = answering(b"", received=accepted)  # each connection closed without an answer
    try:
        with client.TriageClient(url, protocol, retry=client.RetryPolicy(attempts=3, initial_backoff_s=0.1), timeout_s=5) as triage:
            result = triage.classify(b"\0" * 128 + b"DICM")
    finally:
        listener.close()
    assert result.processing_status == client.FAILURE
    assert result.error.startswith(f"server at {url} unreachable or unavailable ("), result.error
    assert len(accepted) >= (3 if protocol == "http" else 1)  # gRPC's channel fails the retries within its own reconnect backoff


_PROXY_ERROR_PAGE = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n</body>\r\n</html>\r\n"
)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["blocking", "asyncio"])
def test_a_proxys_error_page_is_one_line_in_the_failure(asynchronous):
    """tritonclient.http quotes the whole body of an answer that is no JSON: a report row and the
    terminal get the page's title on one line, not its HTML."""
    head = b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
    url, listener = answering(head % len(_PROXY_ERROR_PAGE) + _PROXY_ERROR_PAGE)
    retry = client.RetryPolicy(attempts=2, initial_backoff_s=0.05)

    async def classify_async():
        async with client.AsyncTriageClient(url, "http", retry=retry, timeout_s=5) as triage:
            return await triage.classify(b"\0" * 128 + b"DICM")

    try:
        if asynchronous:
            result = asyncio.run(classify_async())
        else:
            with client.TriageClient(url, "http", retry=retry, timeout_s=5) as triage:
                result = triage.classify(b"\0" * 128 + b"DICM")
    finally:
        listener.close()
    expected = f"server at {url} unreachable or unavailable (502: an answer that is not Triton's (no JSON): 502 Bad Gateway)"
    assert result.error == expected


@pytest.fixture
def metrics_port_stand_in():
    """HOST:PORT of a server that answers every path as Triton's metrics port does: 200 and Prometheus text."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"# TYPE nv_inference_request_success counter\nnv_inference_request_success 0\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_port_that_answers_200_to_every_path_is_not_a_ready_server(metrics_port_stand_in):
    """Triton's metrics port passes liveness and readiness by status code alone (deploy/verify.sh said
    PASS): the server metadata must name Triton too, in the blocking and the asyncio client."""
    expected = rf"^Triton server at {metrics_port_stand_in} \(http\) is not usable: it answers, but not with Triton's server metadata"
    with client.TriageClient(metrics_port_stand_in, "http", timeout_s=5) as triage:
        with pytest.raises(client.ServerUnavailable, match=expected):
            triage.check_ready()

    async def check_async():
        async with client.AsyncTriageClient(metrics_port_stand_in, "http", timeout_s=5) as triage:
            await triage.check_ready()

    with pytest.raises(client.ServerUnavailable, match=expected):
        asyncio.run(check_async())


def test_server_down_at_start_is_one_clear_line(tmp_path, capsys):
    _dicom_like(tmp_path / "s1" / "IM1")
    for command in (
        ["classify", str(tmp_path / "s1")],
        ["report", str(tmp_path), "--out", str(tmp_path / "r.xlsx")],
    ):
        code = client_main([*command, "--url", f"127.0.0.1:{_closed_port()}"])
        done = capsys.readouterr()
        assert code == 3, done.err
        assert done.out == ""
        lines = done.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: Triton server at 127.0.0.1:"), done.err
    assert not (tmp_path / "r.xlsx").exists()


def test_retry_schedule_is_bounded_exponential():
    assert list(client.RetryPolicy(attempts=6, initial_backoff_s=0.5, max_backoff_s=3).backoffs()) == [
        0.5,
        1.0,
        2.0,
        3.0,
        3.0,
    ]
    assert list(client.RetryPolicy(attempts=1).backoffs()) == []


def test_only_unavailability_is_transient():
    from tritonclient.utils import InferenceServerException

    assert _is_transient(InferenceServerException("restarting", status="StatusCode.UNAVAILABLE"))
    assert _is_transient(InferenceServerException("Service Unavailable", status="503"))
    assert _is_transient(ConnectionRefusedError(111, "Connection refused"))
    reloading = "Request for unknown model: 'ct_triage' has no available versions"
    assert _is_transient(InferenceServerException(reloading, status="StatusCode.NOT_FOUND"))
    assert _is_transient(InferenceServerException(reloading, status="404"))
    assert not _is_transient(InferenceServerException("Request for unknown model: 'x' is not found", status="404"))
    assert not _is_transient(InferenceServerException("no CT series", status="StatusCode.INVALID_ARGUMENT"))
    assert not _is_transient(InferenceServerException("no CT series", status="400"))
    assert not _is_transient(InferenceServerException("stub crashed", status="StatusCode.INTERNAL"))
    assert not _is_transient(TimeoutError("timed out"))
    # the study's deadline, which the client also sends as its request timeout, ended in a queue (as measured)
    assert not _is_transient(InferenceServerException("in ensemble 'ct_triage', Request timeout expired", status="503"))
    assert not _is_transient(InferenceServerException("Request timeout expired", status="StatusCode.UNAVAILABLE"))


def test_byte_budget_bounds_bytes_in_flight():
    async def scenario() -> tuple[int, int]:
        budget = _ByteBudget(100)
        in_flight, peak = 0, 0

        async def study(size: int) -> None:
            nonlocal in_flight, peak
            async with budget.hold(size):
                in_flight += min(size, 100)
                peak = max(peak, in_flight)
                await asyncio.sleep(0.01)
                in_flight -= min(size, 100)

        await asyncio.wait_for(asyncio.gather(*(study(s) for s in [60, 60, 30, 500, 10, 40])), 5)
        return peak, budget._in_use

    peak, left = asyncio.run(scenario())
    assert peak <= 100  # the 500-byte study went alone instead of deadlocking
    assert left == 0


def test_payload_keeps_bytes_exactly():
    element = b"DICM\x00\x01\x00\x00"  # trailing NULs: np.bytes_ would drop them
    assert client.load_payload(element) == [element]
    assert client.load_payload([element, b"x"]) == [element, b"x"]
    assert client.payload_bytes([element, b"x"]) == (4 + 8) + (4 + 1)
    with pytest.raises(TypeError):
        client.load_payload([element, "text"])


def test_reading_a_study_does_not_load_the_imaging_stack(tmp_path):
    """A client process reads DICOM from disk; torch and SimpleITK (seconds to import) stay out."""
    from preprocess import phantom

    study = phantom.write_study(tmp_path / "study.zip", "zip", slices=8, rows=32, columns=32)
    code = f"import sys, client; client.load_payload({str(study)!r}); print(sorted({{'torch', 'SimpleITK'}} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_missing_paths_are_one_line_usage_errors(tmp_path, capsys):
    """The real command once (exit status, nothing else on stderr), then main() in this process."""
    done = run_module("client", "classify", str(tmp_path / "nope.zip"), "--url", f"127.0.0.1:{_closed_port()}", timeout=60, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "nope" in done.stderr
    assert client_main(["report", str(tmp_path / "nope"), "--out", "r.xlsx", "--url", f"127.0.0.1:{_closed_port()}"]) == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1 and "nope" in stderr


def test_an_empty_study_or_folder_name_is_not_the_working_folder(tmp_path, monkeypatch, capsys):
    """Path("") is ".": an unset variable in a cron line (`report "$INCOMING"`) sent every study of
    the working folder, and `classify ""` in a study folder answered for it."""
    _dicom_like(tmp_path / "IM0001")
    _dicom_like(tmp_path / "s1" / "IM0001")
    monkeypatch.chdir(tmp_path)
    closed = f"127.0.0.1:{_closed_port()}"
    for arguments, reason in (
        (["report", "", "--out", "r.xlsx"], "error: the folder's name is empty: name the folder of studies"),
        (["classify", ""], "error: STUDY is empty: name a study folder, ZIP or DICOM file"),
    ):
        assert client_main([*arguments, "--url", closed]) == 2, arguments
        assert capsys.readouterr().err.splitlines() == [reason]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["IM0001", "s1"]  # no report, no lock
    with client.TriageClient(closed, "grpc") as triage:
        assert triage.classify("").error == "cannot read study: the study's path is empty"


def test_a_study_larger_than_a_request_can_carry_fails_from_its_size_before_it_is_read(tmp_path):
    """No request to Triton exceeds 2 GiB (gRPC's message limit; Triton's HTTP server reads a body's
    length as 32 bits): a 2.2 GB study sent anyway is read, copied into 9 GB of memory and fails as
    "Exception serializing request!" (gRPC) or with an "inference header size" range (HTTP). It is refused
    from its file's size (a sparse file here: nothing is written or read); the server is never asked."""
    study = tmp_path / "big.dcm"
    with open(study, "wb") as stream:
        stream.truncate(2200 * 2**20)
    closed = f"127.0.0.1:{_closed_port()}"

    async def asynchronously(protocol: str) -> client.TriageResult:
        async with client.AsyncTriageClient(closed, protocol) as triage:
            return await triage.classify(study)

    results = [asyncio.run(asynchronously(protocol)) for protocol in ("grpc", "http")]
    with client.TriageClient(closed, "grpc") as triage:
        results.append(triage.classify(study))

    for result in results:
        assert result.processing_status == client.FAILURE and result.time_of_processing < 5
        assert result.error == (
            "cannot read study: the file is 2.1 GiB, more than the limit of 2.0 GiB "
            "(a request to Triton carries at most 2.0 GiB of study files, over gRPC and HTTP alike)"
        )


def test_paths_the_system_refuses_and_a_model_without_its_outputs_are_one_line_before_any_request(tmp_path, capsys):
    closed = f"127.0.0.1:{_closed_port()}"  # nothing is sent: every refusal comes before a connection
    study = tmp_path / "study.zip"
    study.write_bytes(b"PK")
    long_name = str(tmp_path / ("x" * 300))
    explained, explain_model = [str(study), "--explain", "--url", closed, "--out-dir"], NAMES.triage_explain
    cases = {
        "a study name too long": (["classify", long_name, "--url", closed], "File name too long"),
        "an --out-dir name too long": (["classify", *explained, long_name], "File name too long"),
        "an --out-dir below a file": (["classify", *explained, str(study / "d")], "Not a directory"),
        "ct_triage_explain without --explain": (["classify", str(study), "--url", closed, "--model", explain_model], "add --explain"),
        "a report of it without --explain": (["report", str(tmp_path), "--out", "r.xlsx", "--model", explain_model], "add --explain"),
    }
    for case, (arguments, reason) in cases.items():
        assert client_main(arguments) == 2, case
        stderr = capsys.readouterr().err
        assert len(stderr.strip().splitlines()) == 1 and reason in stderr, (case, stderr)
    with pytest.raises(ValueError, match="ask it with explain=True"):
        client.TriageClient(closed, "grpc", model=NAMES.triage_explain)


def test_the_cli_never_prints_a_name_raw_to_the_terminal(tmp_path, capsys):
    hostile = tmp_path / "nope\x1b[2J\x1b]0;title\x07"  # clear the screen, set the window title
    assert client_main(["report", str(hostile), "--out", "r.xlsx", "--url", f"127.0.0.1:{_closed_port()}"]) == 2
    stderr = capsys.readouterr().err
    assert "\x1b" not in stderr and "\x07" not in stderr and "nope\\x1b[2J\\x1b]0;title\\x07" in stderr


def test_the_summary_page_takes_names_and_errors_that_are_not_utf8(tmp_path):
    from client import summary

    name = "M\udcdcLLER.zip"  # a Latin-1 file name read under a UTF-8 locale
    rows = [{**report_row(name, client.FAILURE), "error": f"internal client error: OSError: {name}"}]
    page = summary.write_summary(rows, tmp_path / "r.html", tmp_path / "r_thumbnails", report_name="r.xlsx")
    assert "M\\udcdcLLER.zip" in page.read_text(encoding="utf-8")
    assert summary.thumbnail_name(name) != summary.thumbnail_name("M\ufffdLLER.zip")


def test_office_documents_are_not_studies(tmp_path):
    """An earlier report's .xlsx (a ZIP) left in the folder, a worklist or a letter beside the studies
    is no study: none becomes a Failure row in a later run."""
    import zipfile

    (tmp_path / "s1.zip").write_bytes(b"PK\x03\x04rest")
    client.write_report([report_row("s1.zip")], tmp_path / "yesterday.xlsx")
    (tmp_path / "group").mkdir()
    for name in ("group/worklist.XLSM", "letter.docx", "slides.pptx", "sheet.ods", "text.odt", "group/g.zip"):
        with zipfile.ZipFile(tmp_path / name, "w") as document:
            document.writestr("mimetype", "application/x-office")
    (tmp_path / "dangling.xlsx").symlink_to(tmp_path / "gone.xlsx")

    assert [study.path_to_study for study in client.discover_studies(tmp_path)] == ["group/g.zip", "s1.zip"]


@pytest.fixture
def hung_server():
    """HOST:PORT of a server that accepts every connection and never answers."""
    with black_hole() as address:
        yield address


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_request_timeout_reads_the_same_over_grpc_and_http(hung_server, protocol):
    """gRPC's deadline said a bare "Deadline Exceeded", where HTTP said what happened."""
    with client.TriageClient(hung_server, protocol, timeout_s=0.5) as triage:
        result = triage.classify(b"\0" * 128 + b"DICM")
        with pytest.raises(client.ServerUnavailable) as not_ready:
            triage.check_ready()
    assert result.error == f"server at {hung_server} gave no answer within the request timeout"
    assert str(not_ready.value) == f"Triton server at {hung_server} ({protocol}) is not usable: no answer within the request timeout"


def test_set_threshold_gives_up_after_its_timeout(hung_server, capsys, monkeypatch):
    """Without --timeout, set-threshold waited 61 s for a server that never answers."""
    from settings import ADMIN

    monkeypatch.delenv(ADMIN.key_env, raising=False)
    started = time.perf_counter()
    assert client_main(["set-threshold", "0.7", "--url", hung_server, "--timeout", "0.5"]) == 3
    assert time.perf_counter() - started < 10
    assert capsys.readouterr().err.splitlines() == [f"error: the server at {hung_server} gave no answer within the request timeout"]
    with pytest.raises(SystemExit) as refused:
        client_main(["set-threshold", "0.7", "--url", hung_server, "--timeout", "0"])
    assert refused.value.code == 2 and "argument --timeout: must be a number above 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="timeout_s must be above 0"):
        client.set_threshold(f"http://{hung_server}", 0.7, timeout_s=float("nan"))


def test_an_empty_url_is_a_usage_error_not_the_default_server(tmp_path, capsys):
    """`--url ""` (an unset variable) asked localhost:8001 or 8000 without a word."""
    _dicom_like(tmp_path / "s1" / "IM1")
    for command in (["classify", str(tmp_path / "s1")], ["report", str(tmp_path), "--out", str(tmp_path / "r.xlsx")]):
        assert client_main([*command, "--url", ""]) == 2, command
        assert capsys.readouterr().err.splitlines() == ["error: no host in URL ''"]
    assert not (tmp_path / "r.xlsx").exists()
    with pytest.raises(ValueError, match="no host in URL ''"):
        client.TriageClient("", "grpc")


def test_an_out_dir_that_is_a_link_looping_or_to_nothing_is_named_so(tmp_path, capsys):
    """Both said "cannot write into --out-dir ...: File exists"."""
    study = tmp_path / "study.zip"
    study.write_bytes(b"PK")
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "unmounted").symlink_to(tmp_path / "share" / "explained")
    closed = f"127.0.0.1:{_closed_port()}"
    for out_dir, reason in (
        (tmp_path / "loop", f"error: cannot write {tmp_path / 'loop'}: a symbolic link on its path loops"),
        (
            tmp_path / "unmounted",
            f"error: --out-dir {tmp_path / 'unmounted'} is a link to {tmp_path / 'share' / 'explained'}, which does not exist",
        ),
    ):
        assert client_main(["classify", str(study), "--explain", "--out-dir", str(out_dir), "--url", closed]) == 2
        assert capsys.readouterr().err.splitlines() == [reason]
    assert not (tmp_path / "share").exists()
