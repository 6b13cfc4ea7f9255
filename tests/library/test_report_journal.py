"""The report's journal without a server: torn lines, synced appends, what --resume keeps, one row per
study, a journal of another run, and report files rewritten from it rather than per study."""

from __future__ import annotations

import asyncio
import csv
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from helpers import ROOT, report_row

import client
from client.cli import main as client_main
from client.report import _JournalWriter, _ReportFiles, journal_path, read_journal


def _study(path: Path) -> None:
    """A folder that discovery takes for a study (one DICOM-looking file)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "IM1").write_bytes(b"\0" * 128 + b"DICM")


def _closed_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"  # nobody listens once the probe is closed


def _unreachable() -> client.AsyncTriageClient:
    return client.AsyncTriageClient(_closed_url(), "grpc")


def _journal(out: Path, folder: Path, rows: list[dict], model: str = "ct_triage") -> Path:
    """A journal as a run writes it: header, then one synced line per finished study."""
    writer = _JournalWriter.create(journal_path(out), str(folder.resolve()), model, [])
    for row in rows:
        writer.append(row)
    writer.close()
    return writer.path


class _Answering:
    """A client without a server: each study's answer carries the study's own path as its UID, so a
    row given to another study shows. `during(path)` runs as a study is classified."""

    model, explain = "ct_triage", False

    def __init__(self, during=None):
        self.sent: list[Path] = []
        self._during = during

    async def __aenter__(self) -> _Answering:
        return self

    async def __aexit__(self, *exc) -> None:
        return None

    async def check_ready(self) -> None:
        return None

    async def classify(self, path: Path) -> client.TriageResult:
        self.sent.append(path)
        if self._during is not None:
            self._during(path)
        uid = str(Path(path).resolve())
        return client.TriageResult(uid, f"{uid}.1", 0.5, 1, client.SUCCESS, None, 0.01, model="demo")


def _resume(folder: Path, out: Path, **options) -> client.ReportSummary:
    return asyncio.run(client.build_report(folder, out, _unreachable, resume=True, **options))


def _columns(row: dict) -> dict:
    return {column: row[column] for column in client.COLUMNS}


def test_a_torn_last_line_is_ignored_and_resume_continues_from_whole_lines(tmp_path):
    folder, out = tmp_path / "studies", tmp_path / "report.xlsx"
    _study(folder / "s1")
    _study(folder / "s2")
    journal = _journal(out, folder, [report_row("s1"), report_row("s2", probability=0.75)])
    with open(journal, "ab") as stream:  # killed while writing a later line of s1
        stream.write(b'{"path_to_study":"s1","study_uid":null,"processing_st')

    read = read_journal(journal)
    assert [row["path_to_study"] for row in read.rows] == ["s1", "s2"] and read.unreadable == 1

    summary = _resume(folder, out)  # every study is Success: the server is not needed

    assert (summary.studies, summary.sent, summary.skipped) == (2, 0, 2)
    assert client.read_report(out) == [report_row("s1"), report_row("s2", probability=0.75)]
    again = read_journal(journal)  # rewritten from whole lines: appends start on a line of their own
    assert again.unreadable == 0 and journal.read_bytes().endswith(b"\n")
    assert [_columns(row) for row in again.rows] == [report_row("s1"), report_row("s2", probability=0.75)]


def test_a_damaged_line_costs_only_its_study(tmp_path):
    folder, out = tmp_path / "studies", tmp_path / "report.csv"
    journal = _journal(out, folder, [report_row("s1")])
    with open(journal, "ab") as stream:
        stream.write(b"\x00\x00not json\n")
        stream.write(b'{"path_to_study":"s3"}\n')  # not a whole row
    read = read_journal(journal)
    assert [row["path_to_study"] for row in read.rows] == ["s1"] and read.unreadable == 2


def test_resume_names_the_unreadable_lines_it_skipped_in_one_warning(tmp_path, caplog):
    """A resumed journal's damaged and torn lines are counted in one warning, and their studies are sent again."""
    folder, out = tmp_path / "studies", tmp_path / "report.csv"
    _study(folder / "s1")
    _study(folder / "s2")
    journal = _journal(out, folder, [report_row("s1")])
    with open(journal, "ab") as stream:
        stream.write(b"\x00\x00not json\n")
        stream.write(b'{"path_to_study":"s2","study_uid":null,"processing_st')  # killed while writing it

    answering = _Answering()
    summary = asyncio.run(client.build_report(folder, out, lambda: answering, resume=True))

    assert (summary.sent, summary.skipped) == (1, 1) and answering.sent == [folder / "s2"]
    warnings = [record.getMessage() for record in caplog.records if record.name == "client.report"]
    assert warnings == [
        "report.csv.journal.jsonl: 2 unreadable lines skipped (torn by a kill, or damaged): the studies they held are sent again"
    ]


def test_every_append_reaches_the_disk_before_it_counts(tmp_path, monkeypatch):
    folder = tmp_path / "studies"
    writer = _JournalWriter.create(journal_path(tmp_path / "report.xlsx"), str(folder), "ct_triage", [])
    calls: list[tuple[str, int]] = []
    write, fsync = os.write, os.fsync
    monkeypatch.setattr(os, "write", lambda fd, data: calls.append(("write", fd)) or write(fd, data))
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(("fsync", fd)) or fsync(fd))

    writer.append(report_row("s1"))

    assert calls and calls[-1] == ("fsync", writer._fd) and ("write", writer._fd) in calls[:-1]
    assert writer.latest == {"s1": report_row("s1")} and writer.appended == 1
    assert [_columns(row) for row in read_journal(writer.path).rows] == [report_row("s1")]  # on disk, file still open
    assert read_journal(writer.path).rows[0]["finished_at"] == pytest.approx(time.time(), abs=60)
    writer.close()


def test_resume_keeps_the_latest_row_of_each_study_once(tmp_path):
    folder, out, csv_out = tmp_path / "studies", tmp_path / "report.xlsx", tmp_path / "report.csv"
    _study(folder / "s1")
    _study(folder / "s2")
    # s1 failed in a first run and succeeded when resumed; "gone" is no longer in the folder.
    journal = _journal(
        out, folder, [report_row("s1", client.FAILURE), report_row("gone"), report_row("s2"), report_row("s1", probability=0.5)]
    )

    summary = _resume(folder, out, csv_out=csv_out)

    assert (summary.studies, summary.sent, summary.succeeded, summary.failed) == (2, 0, 2, 0)
    rows = client.read_report(out)
    assert rows == [report_row("s1", probability=0.5), report_row("s2")]  # one row per study, in discovery order
    assert client.read_report(csv_out) == rows
    kept = [_columns(row) for row in read_journal(journal).rows]  # one line per study, "gone" kept for later
    assert sorted(kept, key=lambda row: row["path_to_study"]) == [report_row("gone"), report_row("s1", probability=0.5), report_row("s2")]


def test_text_from_the_studies_is_never_a_formula_and_reads_back_exactly(tmp_path):
    # folder names and DICOM headers are the studies' own text: formulas, control characters, an
    # escape look-alike, a Latin-1 name (not UTF-8: an unpaired surrogate), U+FFFE, which XML cannot hold,
    # and carriage returns, which XML reading turns into line feeds
    formulas = ['=HYPERLINK("evil.example","open")', "-2+3", "@SUM(A1)", "'quoted"]
    names = [*formulas, "esc\x1b[2J", "_x0041_", "M\udcdcLLER", "x\ufffey", "cr\rname", "crlf\r\nname"]
    folder, out, csv_out = tmp_path / "studies", tmp_path / "report.xlsx", tmp_path / "report.csv"
    for name in names:
        _study(folder / name)
    rows = [{**report_row(name), "study_uid": f"=1+{i}\x01", "error": None} for i, name in enumerate(names)]
    _journal(out, folder, rows)

    summary = _resume(folder, out, csv_out=csv_out)  # openpyxl alone refuses "\x01" in a cell

    assert summary.studies == len(names)
    expected = sorted(rows, key=lambda row: row["path_to_study"])
    assert client.read_report(out) == expected
    with zipfile.ZipFile(out) as workbook:
        assert b"<f>" not in workbook.read("xl/worksheets/sheet1.xml")  # no cell is a formula
    # the CSV stays UTF-8: the one name that is not becomes its escape, every other value reads back exactly
    assert client.read_report(csv_out) == [{**row, "path_to_study": row["path_to_study"].replace("\udcdc", "\\udcdc")} for row in expected]
    with open(csv_out, newline="", encoding="utf-8") as stream:
        cells = {row[0]: row[1] for row in list(csv.reader(stream))[1:]}  # path_to_study: study_uid, as written
    assert sorted(cells) == sorted(
        ["'" + name for name in formulas] + ["esc\x1b[2J", "_x0041_", "M\\udcdcLLER", "x\ufffey", "cr\rname", "crlf\r\nname"]
    )
    assert cells["esc\x1b[2J"] == "'=1+4\x01"  # an apostrophe before each formula


def test_resume_with_studies_left_and_no_server_changes_nothing(tmp_path, capsys):
    folder, out = tmp_path / "studies", tmp_path / "report.xlsx"
    _study(folder / "s1")
    _study(folder / "s2")
    journal = _journal(out, folder, [report_row("s1"), report_row("s2", client.FAILURE)])  # s2 is to be retried
    client.write_report([report_row("s1"), report_row("s2", client.FAILURE)], out)
    before = journal.read_bytes(), out.read_bytes()

    code = client_main(["report", str(folder), "--out", str(out), "--resume", "--url", _closed_url()])

    assert code == 3
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert (journal.read_bytes(), out.read_bytes()) == before


@pytest.mark.parametrize("other", ["folder", "model"])
def test_a_journal_of_another_folder_or_model_is_refused(tmp_path, capsys, other):
    folder, out = tmp_path / "studies", tmp_path / "report.xlsx"
    _study(folder / "s1")
    elsewhere = tmp_path / "other_studies"
    _study(elsewhere / "s1")  # same relative path, another study
    source, model = (elsewhere, "ct_triage") if other == "folder" else (folder, "other")
    journal = _journal(out, source, [report_row("s1")], model=model)
    before = journal.read_bytes()

    code = client_main(["report", str(folder), "--out", str(out), "--resume", "--url", _closed_url()])

    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and journal.name in err and other in err
    assert journal.read_bytes() == before and not out.exists()


def test_a_file_that_is_no_journal_is_refused(tmp_path):
    folder, out = tmp_path / "studies", tmp_path / "report.xlsx"
    _study(folder / "s1")
    journal_path(out).write_text("path_to_study,study_uid\n")
    with pytest.raises(client.ReportError, match="not a triage report journal"):
        _resume(folder, out)


def test_a_report_inside_the_folder_is_not_taken_for_a_study(tmp_path):
    """An .xlsx is a ZIP: a report written into the studies' folder is not sent as a study on a later run."""
    folder = tmp_path / "studies"
    _study(folder / "s1")
    out, copy = folder / "report.xlsx", folder / "report.csv"
    _journal(out, folder, [report_row("s1")])
    client.write_report([report_row("s1")], out)
    client.write_report([report_row("s1")], copy)
    summary = _resume(folder, out, csv_out=copy)  # no server: nothing left to send
    assert (summary.studies, summary.sent, summary.skipped) == (1, 0, 1)


def _someones_csv(out: Path) -> None:
    out.with_suffix(".csv").write_text("department,amount\nradiology,120000\n")


def _someones_file_and_a_journal(out: Path) -> None:
    """A journal beside --out does not make --out a report."""
    out.write_bytes(b"someone's worklist")
    _journal(out, out.parent / "studies", [])


def _report_with_a_word_for_a_number(out: Path) -> None:
    client.write_report([{**report_row("s1"), "probability_of_pathology": "high"}], out)


def _damaged_sheet(out: Path) -> None:
    """A report whose sheet's XML was cut short (a copy interrupted, a disk error)."""
    client.write_report([report_row("s1")], out)
    with zipfile.ZipFile(out) as archive:
        parts = {name: archive.read(name) for name in archive.namelist()}
    sheet = next(name for name in parts if name.startswith("xl/worksheets/"))
    parts[sheet] = parts[sheet][: len(parts[sheet]) // 2]
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in parts.items():
            archive.writestr(name, data)


@pytest.mark.parametrize(
    "setup, options, message",
    [
        (lambda out: out.write_bytes(b"someone's worklist"), [], "report.xlsx is not a triage report: it cannot be read (BadZipFile)"),
        (lambda out: out.write_bytes(b"text"), ["--resume"], "report.xlsx is not a triage report: it cannot be read (BadZipFile)"),
        (lambda out: out.with_suffix(".csv").mkdir(), ["--csv", "{out_csv}"], "report.csv is a folder, not a report file"),
        # a FIFO would block the open for ever, and the run would not even hear SIGTERM
        (os.mkfifo, [], "report.xlsx is not a regular file (a FIFO or a device)"),
        (lambda out: os.mkfifo(out.with_suffix(".csv")), ["--csv", "{out_csv}"], "report.csv is not a regular file"),
        (lambda out: os.mkfifo(journal_path(out)), ["--resume"], "report.xlsx.journal.jsonl is not a regular file"),
        (lambda out: os.mkfifo(journal_path(out)), [], "report.xlsx.journal.jsonl is not a regular file"),
        (lambda out: None, ["--timeout", "0"], "argument --timeout: must be a number above 0"),
        (lambda out: None, ["--timeout", "inf"], "argument --timeout: must be a number above 0"),
        (lambda out: None, ["--max-mb-in-flight", "nan"], "argument --max-mb-in-flight: must be a number above 0"),
        (lambda out: None, ["--max-mb-in-flight", "1e308"], "--max-mb-in-flight: must be a number above 0 and at most 1048576, got 1e308"),
        (lambda out: None, ["--timeout", "1e10"], "argument --timeout: must be a number above 0 and at most 86400, got 1e10"),
        (lambda out: None, ["--concurrency", "100000"], "argument --concurrency: must be from 1 to 1024, got 100000"),
        (lambda out: None, ["--attempts", "x"], "argument --attempts: not an integer: 'x'"),
        (lambda out: None, ["--stable-age", "inf"], "argument --stable-age: must be a finite number from 0, got inf"),
        (_someones_csv, ["--csv", "{out_csv}", "--resume"], "report.csv is not a triage report: its header is not"),
        (_someones_file_and_a_journal, [], "report.xlsx is not a triage report: it cannot be read (BadZipFile)"),
        (_report_with_a_word_for_a_number, ["--resume"], "report.xlsx is not a triage report: row 2 holds a value of the wrong type"),
        (_damaged_sheet, [], "report.xlsx is not a triage report: it cannot be read (ParseError)"),
    ],
)
def test_unusable_report_files_and_options_stop_the_run_before_any_study(tmp_path, capsys, setup, options, message):
    """Never overwrite someone's other spreadsheet, never classify every study to fail at the end."""
    folder, out = tmp_path / "studies", tmp_path / "report.xlsx"
    _study(folder / "s1")
    setup(out)
    before, journal_before = (path.read_bytes() if path.is_file() else None for path in (out, journal_path(out)))
    options = [option.format(out_csv=out.with_suffix(".csv")) for option in options]
    try:
        code = client_main(["report", str(folder), "--out", str(out), "--url", _closed_url(), *options])
    except SystemExit as stopped:  # argparse
        code = stopped.code
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert (out.read_bytes() if out.is_file() else None) == before
    assert (journal_path(out).read_bytes() if journal_path(out).is_file() else None) == journal_before  # a FIFO: left as it was
    csv_out = out.with_suffix(".csv")
    assert not csv_out.is_file() or csv_out.read_text().startswith("department,amount")


def test_a_journal_line_with_a_path_that_is_not_text_is_skipped(tmp_path):
    folder, out = tmp_path / "studies", tmp_path / "report.xlsx"
    journal = _journal(out, folder, [report_row("s1")])
    with open(journal, "ab") as stream:
        stream.write(json.dumps({**report_row("s2"), "path_to_study": ["s2"]}).encode() + b"\n")
        stream.write(json.dumps({**report_row("s3"), "study_uid": {"x": 1}}).encode() + b"\n")  # no cell holds that
    read = read_journal(journal)
    assert [row["path_to_study"] for row in read.rows] == ["s1"] and read.unreadable == 2


def test_without_resume_a_run_starts_a_new_journal(tmp_path):
    folder, out = tmp_path / "empty_archive", tmp_path / "report.xlsx"
    folder.mkdir()
    journal = _journal(out, tmp_path / "other", [report_row("s1"), report_row("s2")])

    summary = asyncio.run(client.build_report(folder, out, _unreachable))  # no studies: no server needed

    assert summary.studies == 0 and summary.journal == journal
    fresh = read_journal(journal)
    assert fresh.rows == [] and fresh.folder == str(folder.resolve()) and fresh.model == "ct_triage"
    assert client.read_report(out) == []


def test_the_report_is_rewritten_from_the_journal_at_intervals_not_per_study(tmp_path):
    async def run(every_s: float, follow: bool) -> tuple[list, list]:
        out = tmp_path / f"report_{every_s}.csv"  # quick to write: the pause after a write grows with its time
        journal = _JournalWriter.create(journal_path(out), str(tmp_path), "ct_triage", [])
        order = [f"s{index:02d}" for index in range(8)]
        report = _ReportFiles([out], order, journal, every_s)
        report.start()
        await asyncio.sleep(0)  # the first write takes its snapshot: no rows yet
        for key in order:
            journal.append(report_row(key))
            await asyncio.sleep(0)
            while follow and (not report.writes or report.writes[-1][0] != journal.appended):  # every_s 0: it catches up mid-run
                await asyncio.sleep(0.01)
        await report.finish()
        journal.close()
        return report.writes, client.read_report(out)

    writes, rows = asyncio.run(run(3600, follow=False))
    assert [written for written, _ in writes] == [0, 8]  # at the start and at the end only
    assert [row["path_to_study"] for row in rows] == [f"s{index:02d}" for index in range(8)]

    writes, rows = asyncio.run(asyncio.wait_for(run(0, follow=True), 60))
    assert [written for written, _ in writes][:9] == list(range(9)) and len(rows) == 8


def test_a_second_run_on_the_same_report_is_refused_while_the_first_runs(tmp_path, capsys):
    """A periodic job started again before the last run ended: refused, the running one's journal untouched."""
    folder, out = tmp_path / "studies", tmp_path / "report.xlsx"
    _study(folder / "s1")
    journal = _journal(out, folder, [report_row("s1")])
    before = journal.read_bytes()
    with open(f"{out}.lock", "w") as running:
        fcntl.flock(running, fcntl.LOCK_EX)  # what the first run holds

        assert client_main(["report", str(folder), "--out", str(out), "--url", _closed_url()]) == 2

    assert "error: another run is writing report.xlsx (report.xlsx.lock is held): let it finish" in capsys.readouterr().err
    assert journal.read_bytes() == before
    assert _resume(folder, out).skipped == 1  # once it ended, the next run goes


def test_write_interval_must_not_be_negative(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_status:
        client_main(["report", str(tmp_path), "--out", str(tmp_path / "r.xlsx"), "--write-every", "-1"])
    assert exit_status.value.code == 2 and "--write-every" in capsys.readouterr().err


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)], ids=["umask-022", "umask-077"])
def test_report_files_are_as_readable_as_the_umask_allows_and_a_replaced_one_keeps_its_mode(tmp_path, umask, mode):
    """The people and the web server the page is for read it: not private because of its temporary file."""
    before = os.umask(umask)
    try:
        for name in ("report.xlsx", "report.csv"):
            client.write_report([report_row("s1")], tmp_path / name)
            assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
            (tmp_path / name).chmod(0o640)  # a mode chosen by whoever runs the reports
            client.write_report([report_row("s1"), report_row("s2")], tmp_path / name)
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name
    finally:
        os.umask(before)


def test_a_report_without_its_journal_is_not_resumed_with_another_folders_rows(tmp_path, caplog):
    """dayA's report, its journal deleted (the report copied elsewhere without it), resumed for dayB,
    whose s1 is another study: nothing in a report says which folder its rows are for, so dayB's s1
    is sent, never given dayA's s1's answer."""
    day_a, day_b, out = tmp_path / "dayA", tmp_path / "dayB", tmp_path / "report.csv"
    _study(day_a / "s1")
    _study(day_b / "s1")
    asyncio.run(client.build_report(day_a, out, _Answering))
    journal_path(out).unlink()

    answering = _Answering()
    summary = asyncio.run(client.build_report(day_b, out, lambda: answering, resume=True))

    assert (summary.sent, summary.skipped) == (1, 0) and answering.sent == [day_b / "s1"]
    assert [row["study_uid"] for row in client.read_report(out)] == [str((day_b / "s1").resolve())]
    assert read_journal(journal_path(out)).rows[0]["study_uid"] == str((day_b / "s1").resolve())
    assert "report.csv has no journal (report.csv.journal.jsonl)" in caplog.text


@pytest.mark.parametrize(
    "edit",
    [
        {"pathology": "yes"},
        {"pathology": True},
        {"pathology": 0.5},
        {"probability_of_pathology": "0.25"},
        {"time_of_processing": False},
        {"study_uid": 123},
        {"pathology_localization": 7},
        {"threshold": "0.5"},
        # a Success without a decision, or with one no server gives
        {"probability_of_pathology": None, "pathology": None},
        {"probability_of_pathology": float("nan")},
        {"probability_of_pathology": 1.5},
        {"pathology": 7},
        {"threshold": float("inf")},
    ],
    ids=str,
)
def test_a_value_of_the_wrong_type_costs_only_its_study(tmp_path, edit):
    """A hand-edited journal line ("pathology": "yes", a probability of NaN or None, pathology 7) is not
    taken into the report and kept as Success for ever. It is a damaged line: its study is sent again,
    and the report stays one that reads back."""
    folder, out = tmp_path / "studies", tmp_path / "report.xlsx"
    _study(folder / "s1")
    _study(folder / "s2")
    journal = _journal(out, folder, [report_row("s2")])
    with open(journal, "ab") as stream:
        stream.write(json.dumps({**report_row("s1"), **edit}).encode() + b"\n")
    read = read_journal(journal)
    assert [row["path_to_study"] for row in read.rows] == ["s2"] and read.unreadable == 1

    answering = _Answering()
    summary = asyncio.run(client.build_report(folder, out, lambda: answering, resume=True))

    assert (summary.sent, summary.skipped) == (1, 1) and answering.sent == [folder / "s1"]
    assert [row["pathology"] for row in client.read_report(out)] == [1, 0]


def test_the_reports_folder_removed_during_the_run_stops_it_and_is_not_made_again(tmp_path):
    """A cleanup job deletes the report's folder mid-run: going on would append to a journal that is
    not on disk and re-create the folder holding only the report. The run stops (exit 2 from the
    command) before the next rewrite, and the folder stays gone."""
    folder, out = tmp_path / "studies", tmp_path / "out" / "report.xlsx"
    for name in ("s1", "s2", "s3"):
        _study(folder / name)

    def folder_removed(path: Path) -> None:
        if path.name == "s2":
            shutil.rmtree(out.parent)

    with pytest.raises(client.ReportError, match=r"^report\.xlsx\.journal\.jsonl was removed or replaced during the run"):
        asyncio.run(client.build_report(folder, out, lambda: _Answering(folder_removed), write_every_s=0))
    assert not out.parent.exists()


def test_a_read_only_journal_is_one_line_before_any_study(tmp_path):
    """A journal of mode 0444 (a copy from read-only media): the rewrite at the start replaced it, and
    the first append failed with Python's "[Errno 13] Permission denied: '...'". Root may write
    anything, so as root the command runs without the capabilities that let it (as a user would)."""
    folder, out = tmp_path / "studies", tmp_path / "report.xlsx"
    _study(folder / "s1")
    journal = _journal(out, folder, [report_row("s1")])  # nothing left to send: the server is not needed
    journal.chmod(0o444)
    before = journal.read_bytes()
    as_a_user = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]
    report = [sys.executable, "-m", "client", "report", str(folder), "--out", str(out), "--resume", "--url", _closed_url()]
    done = subprocess.run([*(as_a_user if os.geteuid() == 0 else []), *report], cwd=ROOT, capture_output=True, text=True, timeout=60)

    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: report.xlsx.journal.jsonl is read-only: make it writable (each finished study is appended to it), or choose another --out"
    ]
    assert journal.read_bytes() == before and not out.exists()


class _AtThresholds(_Answering):
    """A server whose operating point is changed (set-threshold) while the report runs: each answer's
    META carries the threshold in force when it was decided."""

    def __init__(self, thresholds: dict[str, float]):
        super().__init__()
        self._thresholds = thresholds

    async def classify(self, path: Path) -> client.TriageResult:
        self.sent.append(path)
        threshold = self._thresholds[Path(path).name]
        meta = {"threshold": threshold, "provenance": "demo"}
        return client.TriageResult("1.2", "1.2.3", 0.6, int(0.6 >= threshold), client.SUCCESS, None, 0.01, meta=meta, model="demo")


@pytest.mark.parametrize("suffix", [".xlsx", ".csv"])
def test_each_row_carries_the_threshold_its_decision_was_taken_at(tmp_path, suffix):
    """Two byte-identical studies, the threshold changed between them: pathology 1, then 0, and each row
    says why, with META's threshold; a journal line without one (written before the column existed)
    keeps its answer, not sent again, its cell empty."""
    folder, out = tmp_path / "studies", tmp_path / f"report{suffix}"
    for name in ("s1", "s2"):
        _study(folder / name)
    asyncio.run(client.build_report(folder, out, lambda: _AtThresholds({"s1": 0.5, "s2": 0.7})))

    rows = client.read_report(out)
    assert [(row["pathology"], row["threshold"]) for row in rows] == [(1, 0.5), (0, 0.7)]
    assert [row["threshold"] for row in read_journal(journal_path(out)).rows] == [0.5, 0.7]

    _study(folder / "s3")
    without = {column: value for column, value in report_row("s1").items() if column != "threshold"}
    _journal(out, folder, [without, report_row("s2", client.FAILURE)])
    answering = _AtThresholds({"s2": 0.5, "s3": 0.5})
    summary = asyncio.run(client.build_report(folder, out, lambda: answering, resume=True))

    assert (summary.sent, summary.skipped) == (2, 1) and answering.sent == [folder / "s2", folder / "s3"]
    assert [row["threshold"] for row in client.read_report(out)] == [None, 0.5, 0.5]


def test_a_report_written_without_the_threshold_column_still_reads_and_is_replaced(tmp_path):
    """A report of nine columns (before the threshold was one) is still a triage report: read_report
    gives its rows with the threshold empty, and a run may write over it."""
    folder, out = tmp_path / "studies", tmp_path / "report.csv"
    folder.mkdir()
    out.write_text(",".join(client.COLUMNS[:-1]) + "\ns1,1.2.3,1.2.3.4,0.25,0,Success,1.5,,demo\n")
    assert client.read_report(out) == [{**report_row("s1"), "threshold": None}]
    asyncio.run(client.build_report(folder, out, _unreachable))  # no studies: no server needed
    assert out.read_text().splitlines() == [",".join(f'"{column}"' for column in client.COLUMNS)]


def test_a_report_through_a_link_is_written_into_the_file_the_link_names(tmp_path):
    """latest.csv -> share/latest.csv: the atomic rename replaced the link by a file of its own, and
    the file the link named (read by others) went stale. The report, its journal and its lock are
    the linked file's."""
    folder, share = tmp_path / "studies", tmp_path / "share"
    _study(folder / "s1")
    share.mkdir()
    link, xlsx_link = tmp_path / "latest.csv", tmp_path / "latest.xlsx"
    link.symlink_to("share/latest.csv")
    xlsx_link.symlink_to(share / "latest.xlsx")

    asyncio.run(client.build_report(folder, xlsx_link, _Answering, csv_out=link))

    assert link.is_symlink() and xlsx_link.is_symlink()
    assert [row["path_to_study"] for row in client.read_report(share / "latest.csv")] == ["s1"]
    assert [row["path_to_study"] for row in client.read_report(share / "latest.xlsx")] == ["s1"]
    written = ["latest.csv", "latest.csv.lock", "latest.xlsx", "latest.xlsx.journal.jsonl", "latest.xlsx.lock"]
    assert sorted(path.name for path in share.iterdir()) == written
    assert _resume(folder, xlsx_link).skipped == 1  # resumed through the link from the same journal


@pytest.mark.parametrize("where", ["out", "csv", "folder above"])
def test_a_report_path_through_a_link_that_loops_is_one_line(tmp_path, capsys, where):
    """Path.resolve raised RuntimeError("Symlink loop") out of the command, a traceback."""
    folder = tmp_path / "studies"
    _study(folder / "s1")
    (tmp_path / "self.csv").symlink_to("self.csv")
    (tmp_path / "loop").symlink_to("loop")
    looping = {
        "out": ["--out", str(tmp_path / "self.csv")],
        "csv": ["--out", str(tmp_path / "r.xlsx"), "--csv", str(tmp_path / "self.csv")],
    }
    looping["folder above"] = ["--out", str(tmp_path / "loop" / "r.csv")]

    assert client_main(["report", str(folder), *looping[where], "--url", _closed_url()]) == 2

    looped = str(tmp_path / ("loop/r.csv" if where == "folder above" else "self.csv"))
    assert capsys.readouterr().err.splitlines() == [f"error: cannot write {looped}: a symbolic link on its path loops"]
    assert not list(tmp_path.glob("r.*"))


def test_the_closing_line_shows_control_characters_in_the_reports_name_as_escapes(tmp_path, capsys):
    folder, out = tmp_path / "studies", tmp_path / "r\x1b[2J.csv"
    folder.mkdir()
    assert client_main(["report", str(folder), "--out", str(out), "--url", _closed_url()]) == 0  # no studies: no server needed
    stderr = capsys.readouterr().err
    assert "\x1b" not in stderr and "r\\x1b[2J.csv" in stderr


def test_a_run_writing_another_runs_csv_is_refused_at_once(tmp_path, capsys):
    """Two cron jobs exporting `--csv latest.csv`: each run locks every file it writes, not only --out,
    so the second is refused in one line before any server is asked (the URL here answers nothing)."""
    folder = tmp_path / "studies"
    _study(folder / "s1")
    latest = tmp_path / "latest.csv"
    with open(f"{latest}.lock", "w") as running:
        fcntl.flock(running, fcntl.LOCK_EX)  # what a run with --out latest.csv, or --csv latest.csv, holds

        status = client_main(["report", str(folder), "--out", str(tmp_path / "r.xlsx"), "--csv", str(latest), "--url", _closed_url()])

    assert status == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: another run is writing latest.csv (latest.csv.lock is held): let it finish, or choose another file"
    ]
    assert not latest.exists() and not journal_path(tmp_path / "r.xlsx").exists()
    # the same file named twice is one lock, not a run that refuses itself
    summary = asyncio.run(client.build_report(folder, latest, _Answering, csv_out=latest))
    assert summary.succeeded == 1 and len(client.read_report(latest)) == 1


def test_a_csv_cell_holding_a_semicolon_cannot_become_a_formula(tmp_path):
    """Excel where ";" separates fields (many European locales) splits an unquoted `x;=1+1;y.zip` into
    cells, the middle one a formula: every CSV cell is quoted, and reads back exactly."""
    rows = [{**report_row("x;=1+1;y.zip"), "error": "a;b"}, report_row("plain.zip", client.FAILURE)]
    out = tmp_path / "report.csv"
    client.write_report(rows, out)

    assert client.read_report(out) == rows
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0] == ",".join(f'"{column}"' for column in client.COLUMNS)
    assert lines[1].startswith('"x;=1+1;y.zip","1.2.3","1.2.3.4","0.25","0","Success","1.5","a;b","demo","0.5"')
    assert lines[2] == '"plain.zip","","","","","Failure","1.5","bad study","demo",""'
    with open(out, newline="", encoding="utf-8") as stream:  # as read with ";" for the separator
        cells = [cell for row in csv.reader(stream, delimiter=";") for cell in row]
    assert not [cell for cell in cells if cell.startswith(("=", "+", "-", "@"))]


def test_resume_sends_again_a_study_replaced_under_the_same_path(tmp_path):
    """A different study copied over c005.zip: its journaled row answers for another study. Each line
    records the study's size and newest time, and a study whose size or time differs is sent again; a
    line without them (an older journal) is kept."""
    folder, out = tmp_path / "studies", tmp_path / "report.csv"
    for name in ("same", "bigger", "rewritten"):
        _study(folder / name)
    first = _Answering()
    asyncio.run(client.build_report(folder, out, lambda: first))
    line = read_journal(journal_path(out)).rows[0]
    assert (line["study_bytes"], line["study_modified"]) == (132, pytest.approx(os.stat(folder / "bigger" / "IM1").st_mtime, abs=1))
    time.sleep(0.05)  # file times are coarser than a nanosecond
    (folder / "bigger" / "IM1").write_bytes(b"\0" * 128 + b"DICM" + b"another study")
    (folder / "rewritten" / "IM1").write_bytes(b"\1" * 128 + b"DICM")  # the same size

    again = _Answering()
    summary = asyncio.run(client.build_report(folder, out, lambda: again, resume=True))

    assert sorted(path.name for path in again.sent) == ["bigger", "rewritten"]
    assert (summary.sent, summary.skipped, summary.studies) == (2, 1, 3)
    uids = [row["study_uid"] for row in client.read_report(out)]
    assert uids == [str((folder / name).resolve()) for name in ("bigger", "rewritten", "same")]
    # an older journal's line holds neither: its row stands, as before
    _journal(out, folder, [report_row(name) for name in ("bigger", "rewritten", "same")])
    assert _resume(folder, out).sent == 0


def test_a_journal_that_can_no_longer_be_appended_to_is_one_line_naming_it(tmp_path, monkeypatch):
    """`chattr +i` on the journal mid-run, or EIO: Python's bare "[Errno 1] Operation not permitted"
    said neither which file nor that the finished studies are in it."""
    folder, out = tmp_path / "studies", tmp_path / "report.xlsx"
    for name in ("s1", "s2"):
        _study(folder / name)
    journal = journal_path(out)
    write = os.write

    def refused(fd: int, data: bytes) -> int:
        if os.readlink(f"/proc/self/fd/{fd}") == str(journal):
            raise OSError(1, "Operation not permitted")
        return write(fd, data)

    def made_immutable(path: Path) -> None:
        monkeypatch.setattr(os, "write", refused)

    with pytest.raises(client.ReportError) as stopped:
        asyncio.run(client.build_report(folder, out, lambda: _Answering(made_immutable)))

    assert str(stopped.value) == (
        f"cannot append to {journal} (Operation not permitted): the finished studies are in {journal}; "
        "--resume continues once it can be written"
    )
    assert client.read_report(out) == []  # the report was still rewritten at the end: nothing finished


class _DeadWorkerOnce:
    """Triton 2.51's answer, at the transport, for a request whose Python-backend worker died: each
    study whose file ends with one of `deaths`' names gets it that many times, then its answer."""

    def __init__(self, deaths: dict[str, int]):
        self.deaths = dict(deaths)
        self.sent: list[tuple[str, float]] = []

    async def infer(self, client_self, payload, region, series_uid):
        import numpy as np
        from tritonclient.utils import InferenceServerException

        from settings import NAMES

        name = payload[0][132:].decode()
        self.sent.append((name, time.monotonic()))
        if self.deaths.get(name, 0) > 0:
            self.deaths[name] -= 1
            died = "in ensemble 'ct_triage', Stub process 'ct_classifier_0_0' is not healthy."
            raise InferenceServerException(died, "StatusCode.INTERNAL")
        outputs = {
            NAMES.probability: np.array([0.25], np.float32),
            NAMES.pathology: np.array([0], np.int32),
            NAMES.study_uid: np.array([name.encode()], np.object_),
            NAMES.series_uid: np.array([f"{name}.1".encode()], np.object_),
            NAMES.meta: np.array([b'{"threshold": 0.5}'], np.object_),
        }
        return type("Answer", (), {"as_numpy": staticmethod(outputs.__getitem__)})()


@pytest.mark.parametrize("attempts", [3, 1])
def test_a_study_whose_worker_died_is_sent_once_more(tmp_path, monkeypatch, attempts):
    """A worker process killed mid-run (the watchdog reloads its model in seconds): the studies it had
    were Failure rows although nothing was wrong with them. The report sends such a study once more,
    after the retry schedule's waits; a second death is its Failure row (a study that kills its worker
    costs two crashes, not one per resend). --attempts 1 sends every study once."""
    folder, out = tmp_path / "studies", tmp_path / "report.csv"
    for name in ("healthy", "queued", "poison"):
        (folder / name).mkdir(parents=True)
        (folder / name / "IM1").write_bytes(b"\0" * 128 + b"DICM" + name.encode())
    server = _DeadWorkerOnce({"queued": 1, "poison": 99})

    async def infer_once(client_self, payload, region, series_uid):
        return await server.infer(client_self, payload, region, series_uid)

    async def ready(client_self):
        return None

    monkeypatch.setattr(client.AsyncTriageClient, "_infer_once", infer_once)
    monkeypatch.setattr(client.AsyncTriageClient, "check_ready", ready)
    retry = client.RetryPolicy(attempts=attempts, initial_backoff_s=0.05)
    summary = asyncio.run(client.build_report(folder, out, lambda: client.AsyncTriageClient(_closed_url(), retry=retry)))

    rows = {row["path_to_study"]: row for row in client.read_report(out)}
    sent = [name for name, _ in server.sent]
    died = "a worker process of the server (ct_classifier_0_0) died: the study was not processed; send it again once the server recovered"
    assert rows["poison"]["processing_status"] == client.FAILURE and rows["poison"]["error"] == died
    assert rows["healthy"]["processing_status"] == client.SUCCESS
    if attempts == 1:
        assert sorted(sent) == ["healthy", "poison", "queued"] and rows["queued"]["error"] == died
        return
    assert sorted(sent) == ["healthy", "poison", "poison", "queued", "queued"]
    assert (rows["queued"]["processing_status"], rows["queued"]["study_uid"], summary.failed) == (client.SUCCESS, "queued", 1)
    resent = [at for name, at in server.sent if name == "queued"]
    assert resent[1] - resent[0] >= 0.05 + 0.1  # the schedule's waits: 0.05 s, then 0.1 s
    assert rows["queued"]["time_of_processing"] >= 0.15
