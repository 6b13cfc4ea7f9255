"""The client against the real Triton server (conftest's session server, or one of our own)."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import openpyxl
import pytest

import client
from settings import NAMES
from preprocess import phantom

ROOT = Path(__file__).resolve().parents[1]
GOOD_ZIPS = ("good_a.zip", "good_b.zip", "good_c.zip")
GOOD_FOLDER = "good_folder"
CORRUPT = "corrupt.zip"
NON_CT = "non_ct"


def _non_ct_file() -> Path:
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files" / "MR_small.dcm"


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """A folder as radiology IT hands it over: good ZIPs, a study folder, a broken ZIP, an MR, an empty folder."""
    folder = tmp_path_factory.mktemp("archive")
    for seed, name in enumerate(GOOD_ZIPS):
        phantom.write_study(folder / name, form="zip", seed=seed)
    phantom.write_study(folder / GOOD_FOLDER, form="series", seed=7)
    whole = (folder / GOOD_ZIPS[0]).read_bytes()
    (folder / CORRUPT).write_bytes(whole[: len(whole) // 2])
    (folder / NON_CT).mkdir()
    shutil.copy(_non_ct_file(), folder / NON_CT / "MR_small.dcm")
    (folder / "empty").mkdir()
    return folder


def _stats(server, field: str = "success") -> int:
    """How many ct_triage requests the server has answered (field: success or fail)."""
    with client.TriageClient(server.http_url, "http") as triage:
        stats = triage.triton.get_inference_statistics(NAMES.triage)
    return int(stats["model_stats"][0]["inference_stats"][field]["count"])


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "client", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def _report(folder, out, server, **options) -> client.ReportSummary:
    def factory() -> client.AsyncTriageClient:
        return client.AsyncTriageClient(server.grpc_url, "grpc")

    return asyncio.run(client.build_report(folder, out, factory, **options))


def test_http_and_grpc_sync_async_and_shared_memory_agree(triton_server, archive):
    study = archive / GOOD_ZIPS[0]
    results = {}
    for protocol, url in (("grpc", triton_server.grpc_url), ("http", triton_server.http_url)):
        for shared_memory in (False, True):
            with client.TriageClient(url, protocol, shared_memory=shared_memory) as triage:
                results[protocol, shared_memory, "sync"] = triage.classify(study)

            async def classify_async(url=url, protocol=protocol, shared_memory=shared_memory):
                async with client.AsyncTriageClient(url, protocol, shared_memory=shared_memory) as triage:
                    return await triage.classify(study)

            results[protocol, shared_memory, "async"] = asyncio.run(classify_async())

    reference = results["grpc", False, "sync"]
    assert reference.ok, reference.error
    assert 0.0 <= reference.probability_of_pathology <= 1.0
    assert reference.pathology == int(reference.probability_of_pathology >= reference.meta["threshold"])
    assert reference.study_uid and reference.series_uid and reference.model
    assert reference.meta["series_uid"] == reference.series_uid
    for key, result in results.items():
        assert result.ok, (key, result.error)
        assert (result.study_uid, result.series_uid, result.pathology, result.model) == (
            reference.study_uid, reference.series_uid, reference.pathology, reference.model,
        ), key
        assert result.probability_of_pathology == pytest.approx(reference.probability_of_pathology, abs=1e-5)
    assert not list(Path("/dev/shm").glob(f"ct_triage_client_{os.getpid()}_*"))  # regions released


def test_bad_study_fails_with_the_servers_message_and_is_not_retried(triton_server, archive):
    failed_before = _stats(triton_server, "fail")
    with client.TriageClient(triton_server.grpc_url, "grpc") as triage:
        result = triage.classify(archive / CORRUPT)
    assert result.processing_status == client.FAILURE
    assert result.error and "ct_triage" in result.error  # the ensemble's own message
    assert result.probability_of_pathology is None and result.pathology is None
    assert _stats(triton_server, "fail") == failed_before + 1  # INVALID_ARG: sent once, never again


def test_classify_cli_prints_json_and_exit_status(triton_server, archive):
    done = _cli("classify", str(archive / GOOD_FOLDER), "--url", triton_server.http_url, "--protocol", "http")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    for key in ("study_uid", "series_uid", "probability_of_pathology", "pathology", "processing_status",
                "time_of_processing", "meta"):
        assert key in printed
    assert printed["processing_status"] == "Success" and printed["meta"]["study_uid"] == printed["study_uid"]

    failed = _cli("classify", str(archive / NON_CT), "--url", triton_server.grpc_url)
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["processing_status"] == "Failure"
    assert failed.stderr.startswith("error: ") and len(failed.stderr.strip().splitlines()) == 1


def test_report_cli_over_a_mixed_folder(triton_server, archive, tmp_path):
    out, csv_out = tmp_path / "report.xlsx", tmp_path / "report.csv"
    done = _cli("report", str(archive), "--out", str(out), "--csv", str(csv_out), "--concurrency", "2",
                "--url", triton_server.grpc_url)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr  # not a terminal: no progress bar

    sheet = openpyxl.load_workbook(out).active
    assert tuple(cell.value for cell in sheet[1]) == client.COLUMNS
    rows = client.read_report(out)
    assert client.read_report(csv_out) == rows
    expected = sorted([*GOOD_ZIPS, GOOD_FOLDER, CORRUPT, NON_CT])  # "empty" is no study
    assert [row["path_to_study"] for row in rows] == expected
    by_path = {row["path_to_study"]: row for row in rows}
    for name in (*GOOD_ZIPS, GOOD_FOLDER):
        row = by_path[name]
        assert row["processing_status"] == "Success", row
        assert row["study_uid"] and row["series_uid"] and row["model"] and row["error"] is None
        assert 0.0 <= row["probability_of_pathology"] <= 1.0 and row["pathology"] in (0, 1)
        assert row["time_of_processing"] > 0
    for name in (CORRUPT, NON_CT):
        row = by_path[name]
        assert row["processing_status"] == "Failure" and row["error"], row
        assert row["probability_of_pathology"] is None and row["pathology"] is None
    assert len({by_path[name]["study_uid"] for name in GOOD_ZIPS}) == len(GOOD_ZIPS)


def test_resume_does_not_resend_finished_studies(triton_server, archive, tmp_path):
    out = tmp_path / "report.xlsx"
    first = _report(archive, out, triton_server)
    assert (first.studies, first.sent, first.succeeded, first.failed) == (6, 6, 4, 2)
    rows = client.read_report(out)
    # As if the run had been interrupted: one finished study is missing from the report.
    client.write_report([row for row in rows if row["path_to_study"] != GOOD_ZIPS[1]], out)
    success_before, fail_before = _stats(triton_server, "success"), _stats(triton_server, "fail")

    resumed = _report(archive, out, triton_server, resume=True)

    assert (resumed.sent, resumed.skipped) == (3, 3)  # the missing study and the two failures
    assert _stats(triton_server, "success") == success_before + 1
    assert _stats(triton_server, "fail") == fail_before + 2
    after = client.read_report(out)
    assert [row["path_to_study"] for row in after] == [row["path_to_study"] for row in rows]
    for old, new in zip(rows, after):
        if old["path_to_study"] in (GOOD_ZIPS[0], GOOD_ZIPS[2], GOOD_FOLDER):
            assert new == old  # kept as reported, timing included: not processed again
        assert new["processing_status"] == old["processing_status"]


def test_concurrency_gives_the_same_numbers(triton_server, archive, tmp_path):
    serial = _report(archive, tmp_path / "serial.csv", triton_server, concurrency=1)
    parallel = _report(archive, tmp_path / "parallel.csv", triton_server, concurrency=4)
    assert serial == parallel
    rows_serial = client.read_report(tmp_path / "serial.csv")
    rows_parallel = client.read_report(tmp_path / "parallel.csv")
    assert [r["path_to_study"] for r in rows_serial] == [r["path_to_study"] for r in rows_parallel]
    for one, many in zip(rows_serial, rows_parallel):
        assert (one["study_uid"], one["series_uid"], one["pathology"], one["processing_status"]) == (
            many["study_uid"], many["series_uid"], many["pathology"], many["processing_status"],
        )
        if one["probability_of_pathology"] is not None:  # batched with others or alone: same answer
            assert many["probability_of_pathology"] == pytest.approx(one["probability_of_pathology"], abs=1e-5)


def _start_server(repository: Path, log: Path):
    from serve import TritonServer, free_ports

    http_port, grpc_port, metrics_port = free_ports(3)
    return TritonServer(
        repository, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
        log_file=log, exit_timeout_s=5,
    ).start()


def test_killing_the_server_mid_run_loses_no_row(triton_repository, tmp_path):
    folder = tmp_path / "studies"
    for seed in range(6):
        phantom.write_study(folder / f"study_{seed}.zip", form="zip", seed=seed)
    out = tmp_path / "report.xlsx"
    server = _start_server(triton_repository, tmp_path / "server.log")
    try:
        run = subprocess.Popen(
            [sys.executable, "-m", "client", "report", str(folder), "--out", str(out),
             "--url", server.grpc_url, "--attempts", "3"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and run.poll() is None:
            if out.exists() and client.read_report(out):  # incremental: the first row is on disk
                break
            time.sleep(0.05)
        os.kill(server.pid, signal.SIGKILL)
        _, stderr = run.communicate(timeout=120)
    finally:
        server.stop()
    assert run.returncode == 0, stderr
    rows = client.read_report(out)
    assert [row["path_to_study"] for row in rows] == [f"study_{seed}.zip" for seed in range(6)]
    statuses = [row["processing_status"] for row in rows]
    assert statuses[0] == "Success" and "Failure" in statuses
    assert all(row["error"] and "unreachable" in row["error"] for row in rows if row["processing_status"] == "Failure")

    restarted = _start_server(triton_repository, tmp_path / "server2.log")
    try:
        done = _cli("report", str(folder), "--out", str(out), "--resume", "--url", restarted.grpc_url)
    finally:
        restarted.stop()
    assert done.returncode == 0, done.stderr
    after = client.read_report(out)
    assert [row["processing_status"] for row in after] == ["Success"] * 6
    assert [row for row in after if row["path_to_study"] == "study_0.zip"] == rows[:1]
