"""The report over an archive when the server is killed mid-run (SIGKILL), restarted, and the run resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openpyxl
from helpers import ROOT, run_module

import client
from client.report import journal_path, read_journal
from preprocess import phantom
from settings import NAMES

STUDIES = [f"study_{seed}.zip" for seed in range(4)]
BROKEN = "a_broken.zip"  # first in path order: a Failure row before the kill


def _received(server, at_least: int) -> int:
    """Studies the server has received (each passes ct_preprocess once), once it counts `at_least`."""
    deadline = time.monotonic() + 10
    while True:
        with client.TriageClient(server.http_url, "http") as triage:
            stats = triage.triton.get_inference_statistics(NAMES.preprocess)["model_stats"][0]["inference_stats"]
        received = int(stats["success"]["count"]) + int(stats["fail"]["count"])
        if received >= at_least or time.monotonic() > deadline:
            return received
        time.sleep(0.05)


def _journaled(journal: Path) -> int:
    """Rows in the journal so far (the header is the first line)."""
    return journal.read_bytes().count(b"\n") - 1 if journal.exists() else 0


def test_server_killed_mid_report_then_resume_gives_each_study_one_row(private_server, tmp_path):
    folder = tmp_path / "archive"
    for seed, name in enumerate(STUDIES):
        phantom.write_study(folder / name, "zip", seed=seed, slices=16, rows=32, columns=32)
    whole = (folder / STUDIES[0]).read_bytes()
    (folder / BROKEN).write_bytes(whole[: len(whole) // 2])
    out, csv_out = tmp_path / "report.xlsx", tmp_path / "report.csv"
    journal = journal_path(out)
    command = ["report", str(folder), "--out", str(out), "--csv", str(csv_out), "--url", private_server.grpc_url, "--concurrency", "2"]

    run = subprocess.Popen(
        [sys.executable, "-m", "client", *command, "--attempts", "2", "--write-every", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.poll() is None and _journaled(journal) < 2:
        time.sleep(0.02)
    os.kill(private_server.pid, signal.SIGKILL)
    _, stderr = run.communicate(timeout=120)

    # The run stops with the documented status and one line, keeping every finished study.
    assert run.returncode == 3, stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ") and "--resume" in stderr, stderr
    assert not any(value in stderr for value in phantom.FAKE_PHI.values())
    openpyxl.load_workbook(out).close()  # a whole workbook, not half of one
    before = client.read_report(out)
    paths = [row["path_to_study"] for row in before]
    assert 2 <= len(before) < len(STUDIES) + 1 and paths == sorted(set(paths))  # mid-run, no duplicate, in order
    assert client.read_report(csv_out) == before
    journaled = {row["path_to_study"]: {column: row[column] for column in client.COLUMNS} for row in read_journal(journal).rows}
    assert before == [journaled[path] for path in paths]  # the report holds every journaled study
    statuses = {row["path_to_study"]: row["processing_status"] for row in before}
    assert statuses[BROKEN] == "Failure" and list(statuses.values()).count("Success") == len(before) - 1
    written = ["archive", "report.csv", "report.csv.lock", "report.xlsx", "report.xlsx.lock", journal.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(written)

    # The server comes back at the same address; the resumed run sends only what is not Success.
    private_server.stop()
    private_server.start()
    done = run_module("client", *command, "--resume", timeout=120)

    assert done.returncode == 0, done.stderr
    after = client.read_report(out)
    assert [row["path_to_study"] for row in after] == sorted([BROKEN, *STUDIES])  # every study, exactly once
    assert client.read_report(csv_out) == after
    by_path = {row["path_to_study"]: row for row in after}
    assert by_path[BROKEN]["processing_status"] == "Failure"
    assert all(by_path[name]["processing_status"] == "Success" for name in STUDIES)
    for row in before:
        if row["processing_status"] == "Success":
            assert by_path[row["path_to_study"]] == row  # kept as reported, timing included
    resent = len(STUDIES) + 1 - (len(before) - 1)  # the Failure is retried, the Success rows are not
    assert _received(private_server, resent) == resent
