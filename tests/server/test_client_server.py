"""The client against the real Triton server: the shared one, or a private one where a test kills or
interrupts (an interrupted report leaves studies running that would skew later tests)."""

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
from helpers import ROOT, edit, packaged_file, run_module

import client
from client.cli import main as client_main
from client.report import journal_path, read_journal
from preprocess import phantom
from settings import NAMES

GOOD_ZIPS = ("good_a.zip", "good_b.zip", "good_c.zip")
GOOD_FOLDER = "good_folder"
CORRUPT = "corrupt.zip"
NON_CT = "non_ct"


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
    shutil.copy(packaged_file("MR_small.dcm"), folder / NON_CT / "MR_small.dcm")
    (folder / "empty").mkdir()
    return folder


def _stats(server, *, at_least: int = 0) -> dict[str, int]:
    """ct_triage successes, and studies the server received (each passes ct_preprocess exactly once;
    Triton counts one failed ensemble request twice in the ensemble's own `fail`). Triton updates
    statistics just after answering, so wait (briefly) until `at_least` studies are counted."""
    with client.TriageClient(server.http_url, "http") as triage:

        def counts(model: str) -> dict:
            stats = triage.triton.get_inference_statistics(model)["model_stats"][0]["inference_stats"]
            return {field: int(stats[field]["count"]) for field in ("success", "fail")}

        deadline = time.monotonic() + 10
        while True:
            received = sum(counts(NAMES.preprocess).values())
            if received >= at_least or time.monotonic() > deadline:
                return {"success": counts(NAMES.triage)["success"], "received": received}
            time.sleep(0.05)


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_module("client", *args, timeout=timeout)


def _report(folder, out, server, **options) -> client.ReportSummary:
    def factory() -> client.AsyncTriageClient:
        return client.AsyncTriageClient(server.grpc_url, "grpc")

    return asyncio.run(client.build_report(folder, out, factory, **options))


def test_http_and_grpc_sync_async_and_shared_memory_agree(triton_server, archive):
    study = archive / GOOD_ZIPS[0]
    urls = {"grpc": triton_server.grpc_url, "http": triton_server.http_url}

    def classify_sync(protocol: str, shared_memory: bool) -> client.TriageResult:
        with client.TriageClient(urls[protocol], protocol, shared_memory=shared_memory) as triage:
            return triage.classify(study)

    async def classify_async(protocol: str, shared_memory: bool) -> client.TriageResult:
        async with client.AsyncTriageClient(urls[protocol], protocol, shared_memory=shared_memory) as triage:
            return await triage.classify(study)

    # Each protocol blocking and asyncio, each with the payload on the wire and in shared memory.
    results = {
        ("grpc", False, "sync"): classify_sync("grpc", False),
        ("http", True, "sync"): classify_sync("http", True),
        ("grpc", True, "async"): asyncio.run(classify_async("grpc", True)),
        ("http", False, "async"): asyncio.run(classify_async("http", False)),
    }
    reference = results["grpc", False, "sync"]
    assert reference.ok, reference.error
    assert 0.0 <= reference.probability_of_pathology <= 1.0
    assert reference.pathology == int(reference.probability_of_pathology >= reference.meta["threshold"])
    assert reference.study_uid and reference.series_uid and reference.model
    assert reference.meta["series_uid"] == reference.series_uid
    for key, result in results.items():
        assert result.ok, (key, result.error)
        assert (result.study_uid, result.series_uid, result.pathology, result.model) == (
            reference.study_uid,
            reference.series_uid,
            reference.pathology,
            reference.model,
        ), key
        assert result.probability_of_pathology == pytest.approx(reference.probability_of_pathology, abs=1e-5)
    assert not list(Path("/dev/shm").glob(f"ct_triage_client_{os.getpid()}_*"))  # regions released


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_study_of_two_patients_is_classified_for_the_series_the_caller_names(triton_server, protocol, tmp_path):
    """ct_preprocess takes the request parameter series_uid (Triton forwards ct_triage's parameters to
    its steps): refused without it, the named series' own answer with it, a clear line for a wrong one."""
    first = phantom.study_files("series", slices=20, rows=48, columns=48, pixel_spacing=6.0, slice_spacing=6.0)
    second = phantom.study_files("series", slices=24, rows=48, columns=48, pixel_spacing=6.0, slice_spacing=5.0, seed=9)
    second = edit(second, lambda ds, k: setattr(ds, "PatientID", "OTHER-7"))
    url = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
    with client.TriageClient(url, protocol=protocol) as triage:
        alone = triage.classify(second)
        mixed = first + second
        refused = triage.classify(mixed)
        named = triage.classify(mixed, series_uid=alone.series_uid)
        unknown = triage.classify(mixed, series_uid="1.2.3.4")
        not_a_uid = triage.classify(mixed, series_uid="1.2\n[FORGED]")
    assert alone.ok and refused.processing_status == client.FAILURE and "images of 2 patients" in refused.error
    assert named.ok and named.series_uid == alone.series_uid
    assert named.probability_of_pathology == pytest.approx(alone.probability_of_pathology, abs=1e-5)
    assert "series 1.2.3.4 is not in the study (2 series found)" in unknown.error
    assert "the request parameter series_uid is not a SeriesInstanceUID" in not_a_uid.error and "FORGED" not in not_a_uid.error
    if protocol == "grpc":  # the CLI's --series
        for k, data in enumerate(mixed):
            (tmp_path / f"{k}.dcm").write_bytes(data)
        done = _cli("classify", str(tmp_path), "--series", alone.series_uid, "--url", url)
        assert done.returncode == 0 and json.loads(done.stdout)["series_uid"] == alone.series_uid, done.stderr


def test_curl_script_sends_what_the_python_client_sends(triton_server, archive, tmp_path):
    """client/classify_over_http.sh: the request a service without Python sends (binary tensor
    extension), for a ZIP, a folder's slice files and a named series, and a refused study's error."""

    def curl(*args: str, url: str = triton_server.http_url) -> subprocess.CompletedProcess:
        script = [str(ROOT / "client" / "classify_over_http.sh"), "--url", url]
        return subprocess.run(script + list(args), capture_output=True, text=True, timeout=120)

    def outputs(done: subprocess.CompletedProcess) -> dict:
        assert done.returncode == 0, done.stdout + done.stderr
        return {output["name"]: output["data"][0] for output in json.loads(done.stdout)["outputs"]}

    slices = sorted((archive / GOOD_FOLDER).rglob("*.dcm"))
    first = phantom.study_files("series", slices=20, rows=48, columns=48, pixel_spacing=6.0, slice_spacing=6.0)
    second = edit(phantom.study_files("series", slices=24, rows=48, columns=48, seed=9), lambda ds, k: setattr(ds, "PatientID", "OTHER-7"))
    for k, data in enumerate(first + second):
        (tmp_path / f"{k:03d}.dcm").write_bytes(data)
    with client.TriageClient(triton_server.http_url, "http") as triage:
        expected = {"zip": triage.classify(archive / GOOD_ZIPS[1]), "folder": triage.classify(archive / GOOD_FOLDER)}
        expected["series"] = triage.classify(second)
    answers = {
        "zip": outputs(curl(str(archive / GOOD_ZIPS[1]), url=f"http://{triton_server.http_url}/")),  # a base URL, as a proxy's
        "folder": outputs(curl(*map(str, slices))),
        "series": outputs(curl("--series", expected["series"].series_uid, *sorted(map(str, tmp_path.iterdir())))),
    }
    for kind, answer in answers.items():
        assert answer[NAMES.probability] == pytest.approx(expected[kind].probability_of_pathology, abs=1e-5), kind
        assert (answer[NAMES.pathology], answer[NAMES.series_uid]) == (expected[kind].pathology, expected[kind].series_uid), kind
        assert json.loads(answer[NAMES.meta])["threshold"] == expected[kind].meta["threshold"]

    refused = curl(str(archive / CORRUPT))
    assert refused.returncode == 22 and "ZIP" in json.loads(refused.stdout)["error"], refused.stdout + refused.stderr
    assert curl("--series", "1.2\n3", str(archive / CORRUPT)).returncode == 2  # never reaches the JSON header


def test_bad_study_fails_with_the_servers_message_and_is_not_retried(triton_server, archive):
    before = _stats(triton_server)
    with client.TriageClient(triton_server.grpc_url, "grpc") as triage:
        result = triage.classify(archive / CORRUPT)
    assert result.processing_status == client.FAILURE
    assert result.error and "ct_triage" in result.error  # the ensemble's own message
    assert result.probability_of_pathology is None and result.pathology is None
    # INVALID_ARG: sent once, never again (every retry would have happened inside classify).
    assert _stats(triton_server, at_least=before["received"] + 1)["received"] == before["received"] + 1


def test_classify_cli_prints_json_and_exit_status(triton_server, archive):
    done = _cli("classify", str(archive / GOOD_FOLDER), "--url", triton_server.http_url, "--protocol", "http")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    for key in ("study_uid", "series_uid", "probability_of_pathology", "pathology", "processing_status", "time_of_processing", "meta"):
        assert key in printed
    assert printed["processing_status"] == "Success" and printed["meta"]["study_uid"] == printed["study_uid"]

    failed = _cli("classify", str(archive / NON_CT), "--url", triton_server.grpc_url)
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["processing_status"] == "Failure"
    assert failed.stderr.startswith("error: ") and len(failed.stderr.strip().splitlines()) == 1


def test_a_model_without_the_outputs_asked_for_is_refused_before_any_study(triton_server, archive, tmp_path, capsys):
    """`report --explain --model ct_triage` or `report --model ct_classifier` made every study a Failure
    row and exited 0; `classify --explain --model ct_triage` exited 1 as if the study were bad."""
    explained = "ATTRIBUTION, LOCALIZATION, VOLUME, which an explained triage reads: ct_triage_explain does"
    cases = (
        (["report", str(archive), "--out", str(tmp_path / "r1.csv"), "--explain", "--model", NAMES.triage], NAMES.triage, explained),
        (
            ["report", str(archive), "--out", str(tmp_path / "r2.csv"), "--model", NAMES.classifier],
            NAMES.classifier,
            "PROBABILITY, PATHOLOGY, STUDY_UID, SERIES_UID, META, which a triage reads: ct_triage does",
        ),
        (
            ["classify", str(archive / GOOD_ZIPS[0]), "--explain", "--out-dir", str(tmp_path / "x"), "--model", NAMES.triage],
            NAMES.triage,
            explained,
        ),
    )
    before = _stats(triton_server)["received"]
    for (arguments, model, missing), (protocol, url) in zip(
        cases, (("grpc", triton_server.grpc_url), ("http", triton_server.http_url)) * 2
    ):
        assert client_main([*arguments, "--url", url, "--protocol", protocol]) == 2, arguments
        assert capsys.readouterr().err.splitlines() == [f"error: model {model!r} does not answer with {missing}"]
    assert _stats(triton_server)["received"] == before  # no study sent
    assert not list(tmp_path.glob("r*.csv"))


@pytest.fixture(scope="module")
def serial_report(shared_server, archive, tmp_path_factory) -> Path:
    """The archive reported one study at a time (the reference for concurrency and resume)."""
    out = tmp_path_factory.mktemp("serial") / "report.xlsx"
    summary = _report(archive, out, shared_server, concurrency=1)
    assert (summary.studies, summary.sent, summary.succeeded, summary.failed) == (6, 6, 4, 2)
    return out


def test_report_cli_over_a_mixed_folder(triton_server, archive, serial_report, tmp_path):
    out, csv_out = tmp_path / "report.xlsx", tmp_path / "report.csv"
    done = _cli("report", str(archive), "--out", str(out), "--csv", str(csv_out), "--concurrency", "3", "--url", triton_server.grpc_url)
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
        assert row["pathology"] == int(row["probability_of_pathology"] >= row["threshold"])  # META's threshold, behind the decision
        assert row["time_of_processing"] > 0
    for name in (CORRUPT, NON_CT):
        row = by_path[name]
        assert row["processing_status"] == "Failure" and row["error"], row
        assert row["probability_of_pathology"] is None and row["pathology"] is None and row["threshold"] is None
    assert len({by_path[name]["study_uid"] for name in GOOD_ZIPS}) == len(GOOD_ZIPS)

    # Concurrency 3 (studies batched together in the classifier) gives the numbers of concurrency 1.
    for one, many in zip(client.read_report(serial_report), rows, strict=True):
        assert (one["path_to_study"], one["study_uid"], one["series_uid"], one["pathology"]) == (
            many["path_to_study"],
            many["study_uid"],
            many["series_uid"],
            many["pathology"],
        )
        assert (one["processing_status"], one["error"]) == (many["processing_status"], many["error"])
        if one["probability_of_pathology"] is not None:
            assert many["probability_of_pathology"] == pytest.approx(one["probability_of_pathology"], abs=1e-5)


def test_resume_does_not_resend_finished_studies(triton_server, archive, serial_report, tmp_path):
    rows = client.read_report(serial_report)
    out = tmp_path / "report.xlsx"
    # As if the run had been interrupted: one finished study is missing from the journal.
    lines = journal_path(serial_report).read_bytes().splitlines(keepends=True)
    journal_path(out).write_bytes(b"".join(line for line in lines if f'"path_to_study":"{GOOD_ZIPS[1]}"'.encode() not in line))
    before = _stats(triton_server)

    resumed = _report(archive, out, triton_server, resume=True, concurrency=2)

    assert (resumed.sent, resumed.skipped, resumed.succeeded, resumed.failed) == (3, 3, 4, 2)
    after_stats = _stats(triton_server, at_least=before["received"] + 3)
    assert after_stats["received"] == before["received"] + 3  # the missing study and the two failures
    assert after_stats["success"] == before["success"] + 1
    after = client.read_report(out)
    assert [row["path_to_study"] for row in after] == [row["path_to_study"] for row in rows]
    for old, new in zip(rows, after):
        if old["path_to_study"] in (GOOD_ZIPS[0], GOOD_ZIPS[2], GOOD_FOLDER):
            assert new == old  # kept as reported, timing included: not processed again
        assert new["processing_status"] == old["processing_status"]


def test_a_report_that_cannot_be_written_stops_the_run_and_keeps_the_journal(module_server, archive, tmp_path, monkeypatch):
    """A full disk mid-run: the run stops at once with one line, instead of classifying every study
    for a report nobody can read; the journal keeps what finished, for --resume. The module's own
    server: the studies in flight when it stops are still answered after the test (on the shared
    server they were counted by the next test)."""
    import errno

    from client import report as report_module

    folder = tmp_path / "studies"
    folder.mkdir()
    for k in range(6):
        shutil.copyfile(archive / GOOD_ZIPS[k % len(GOOD_ZIPS)], folder / f"study_{k}.zip")
    written = report_module.write_report
    writes = []

    def disk_fills_up(rows, path, columns):
        writes.append(len(rows))
        if len(writes) > 1:  # the header went through; the first rewrite with a row does not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written(rows, path, columns)

    monkeypatch.setattr(report_module, "write_report", disk_fills_up)
    out = tmp_path / "report.xlsx"
    with pytest.raises(client.ReportError, match=r"cannot write report.xlsx: No space left on device; .* --resume"):
        _report(folder, out, module_server, write_every_s=0)

    finished = read_journal(journal_path(out)).rows
    assert 1 <= len(finished) < 6  # stopped early, every finished study kept


def test_a_study_still_arriving_waits_for_a_later_run(triton_server, archive, tmp_path):
    """A folder studies are copied into as the report runs (a PACS export, a periodic job): a study
    whose newest file changed more recently than --stable-age is neither sent nor reported, and the
    next --resume run sends it, once, without resending the rest. (A file's change time cannot be
    set back, so the test waits: 2 s ages.)"""
    folder = tmp_path / "incoming"
    shutil.copytree(archive / GOOD_FOLDER, folder / GOOD_FOLDER)
    shutil.copyfile(archive / GOOD_ZIPS[0], folder / GOOD_ZIPS[0])
    out = tmp_path / "report.xlsx"
    before = _stats(triton_server)

    just_copied = _cli("report", str(folder), "--out", str(out), "--stable-age", "600", "--url", triton_server.grpc_url)

    assert just_copied.returncode == 0, just_copied.stderr
    assert "0 studies: 0 Success, 0 Failure (0 sent, 0 already done; 2 still arriving" in just_copied.stderr
    assert client.read_report(out) == []
    time.sleep(2.5)
    last_slice = max(path for path in (folder / GOOD_FOLDER).rglob("*") if path.is_file())
    os.utime(last_slice)  # its last file was written just now

    first = _report(folder, out, triton_server, stable_age_s=2)

    assert (first.sent, first.arriving) == (1, (GOOD_FOLDER,))
    assert [row["path_to_study"] for row in client.read_report(out)] == [GOOD_ZIPS[0]]
    time.sleep(2.5)  # the copy is complete
    second = _report(folder, out, triton_server, resume=True, stable_age_s=2)

    assert (second.sent, second.skipped, second.arriving) == (1, 1, ())
    assert [row["path_to_study"] for row in client.read_report(out)] == sorted([GOOD_FOLDER, GOOD_ZIPS[0]])
    assert _stats(triton_server, at_least=before["received"] + 2)["received"] == before["received"] + 2


@pytest.mark.parametrize(("stop", "status", "last_line"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_or_sigterm_keeps_the_finished_rows(module_server, archive, tmp_path, stop, status, last_line):
    """Ctrl-C, or SIGTERM as systemd, docker stop or Kubernetes send: the report is still rewritten
    with every journaled study before the command exits."""
    studies_folder = tmp_path / "studies"  # enough studies that the interrupt always comes before the last
    studies_folder.mkdir()
    for k in range(40):
        shutil.copyfile(archive / GOOD_ZIPS[k % len(GOOD_ZIPS)], studies_folder / f"study_{k:02d}.zip")
    shutil.copyfile(archive / CORRUPT, studies_folder / CORRUPT)
    out = tmp_path / "out" / "report.xlsx"
    out.parent.mkdir()
    # as from a terminal: a shell starts a background job (`pytest &`) with Ctrl-C ignored, and the
    # client would inherit that and never see the signal
    at_a_terminal = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.executable, sys.argv[1:])"
    report = ["-m", "client", "report", str(studies_folder), "--out", str(out), "--url", module_server.grpc_url]
    run = subprocess.Popen(
        [sys.executable, "-c", at_a_terminal, sys.executable, *report],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    journal = journal_path(out)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.poll() is None and not (journal.exists() and read_journal(journal).rows):
        time.sleep(0.05)
    run.send_signal(stop)
    _, stderr = run.communicate(timeout=60)

    assert run.returncode == status, stderr
    assert stderr.strip().splitlines()[-1] == last_line  # no traceback
    rows = client.read_report(out)
    studies = [study.path_to_study for study in client.discover_studies(studies_folder)]
    assert 1 <= len(rows) < len(studies)
    assert [row["path_to_study"] for row in rows] == [path for path in studies if path in {r["path_to_study"] for r in rows}]
    assert all(row["processing_status"] in ("Success", "Failure") and row["model"] for row in rows)
    assert len(rows) == len(read_journal(journal).rows)  # every journaled study is in the report
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.xlsx", journal.name, "report.xlsx.lock"]  # no temporary file left


def test_shared_memory_benchmark_measures_every_protocol_and_transport(triton_server, archive):
    from benchmarks.shared_memory import measure

    payload = client.load_payload(archive / GOOD_ZIPS[0])
    rows = measure(payload, {"grpc": triton_server.grpc_url, "http": triton_server.http_url}, repeats=1)
    assert [(row["protocol"], row["transport"]) for row in rows] == [
        ("grpc", "wire"),
        ("grpc", "shared memory"),
        ("http", "wire"),
        ("http", "shared memory"),
    ]
    assert all(row["status"] == "Success" and row["min_s"] > 0 for row in rows)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_study_whose_deadline_passes_in_the_queue_is_dropped_by_the_server(triton_server, protocol):
    """The client's deadline is also Triton's per-request timeout: studies still queued when their
    caller gave up are not preprocessed for no one (without it all 8 ran after their callers left)."""
    payload = phantom.study_files(form="series", slices=96, rows=192, columns=192, transfer_syntax="jpeg2000")  # ~0.5 s each

    def preprocessed() -> int:  # studies ct_preprocess ran (a request its queue rejected counts as a failure, not run)
        with client.TriageClient(triton_server.http_url, "http") as triage:
            return int(triage.triton.get_inference_statistics(NAMES.preprocess)["model_stats"][0]["execution_count"])

    before = preprocessed()

    async def send_together() -> list[client.TriageResult]:
        url = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
        async with client.AsyncTriageClient(url, protocol, timeout_s=0.3, retry=client.RetryPolicy(attempts=1)) as triage:
            return await asyncio.gather(*(triage.classify(payload) for _ in range(8)))

    results = asyncio.run(send_together())
    assert all(result.processing_status == "Failure" for result in results), [r.error for r in results]
    time.sleep(3)  # what the server would still run for them has run by now
    assert preprocessed() - before < 8  # 2 here: those the 2 instances had started
