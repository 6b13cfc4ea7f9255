"""The triage report: every study of a folder through the server, one row each, written safely.

Each finished study is one line appended to the report's journal (`<report>.journal.jsonl`) and
synced to disk before it counts, so a kill loses at most the studies in flight and `resume` skips
every study already journaled as Success. The report files are rebuilt from the journal's rows,
atomically (temp file + rename), at the start, at most every `write_every_s` seconds and at the end:
the work per study does not grow with the archive, and a reader never sees a half-written report.

With a client built with `explain=True` (ct_triage_explain) the report gains the column
`pathology_localization`, each study's montage is saved into the thumbnail folder beside the report
before its journal line is written, and the HTML summary page is rewritten with the report files.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import errno
import fcntl
import io
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openpyxl
from openpyxl.cell import WriteOnlyCell
from tqdm import tqdm

from preprocess import printable, write_atomically

from .result import SUCCESS, TriageResult, failure
from .studies import StudyRef, discover_studies
from .triage import AsyncTriageClient, ServerUnavailable, one_line, worker_died

# Every report's header starts with these, and every journal line holds them.
_ANSWER_COLUMNS = (
    "path_to_study",
    "study_uid",
    "series_uid",
    "probability_of_pathology",
    "pathology",
    "processing_status",
    "time_of_processing",
    "error",
    "model",
)
# The operating point the row's decision was taken at (META's threshold): set-threshold changes it on a
# running server, so the same study can be decided otherwise from one row to the next. Empty where not
# known: a Failure row, or a row read from a report or journal line that does not hold it.
THRESHOLD_COLUMN = "threshold"
COLUMNS = (*_ANSWER_COLUMNS, THRESHOLD_COLUMN)
LOCALIZATION_COLUMN = "pathology_localization"  # "x_min,x_max,y_min,y_max,z_min,z_max"; explained reports only
EXPLAIN_COLUMNS = (*COLUMNS, LOCALIZATION_COLUMN)
_FLOAT_COLUMNS = ("probability_of_pathology", "time_of_processing", THRESHOLD_COLUMN)
_INT_COLUMNS = ("pathology",)
DEFAULT_MAX_BYTES_IN_FLIGHT = 1024**3
DEFAULT_WRITE_EVERY_S = 30.0
JOURNAL_SUFFIX = ".journal.jsonl"
_JOURNAL_KIND = "ct_triage report journal"
_JOURNAL_VERSION = 1
# Rewriting the report takes time proportional to its rows: pause at least this many times as long
# as the last rewrite took, so that rewriting never takes more than a tenth of the run.
_PAUSE_PER_WRITE_SECOND = 9
# Paths, UIDs and error messages come from the studies, so a file name or a DICOM header can hold any
# text. A spreadsheet program runs a CSV cell that starts with one of these as a formula (CSV
# injection): such cells get a leading apostrophe, as does one that starts with an apostrophe, so that
# reading takes exactly one off. In .xlsx, text cells are typed as text and never run.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")
# ECMA-376's escape for characters XML cannot hold (control characters; the unpaired surrogates of a
# file name that is not UTF-8), and for a carriage return, which XML reading turns into a line feed:
# _xHHHH_; text that already looks like an escape gets its underscore escaped (_x005F_), so reading
# back is exact.
_OOXML_ESCAPE = re.compile(r"_x[0-9A-Fa-f]{4}_")
_NOT_IN_XML = re.compile("[\x00-\x08\x0b-\x1f\ud800-\udfff\ufffe\uffff]")
# Each journal line also records the study it answers for, so that --resume sends again a study
# replaced under the same path (a different study copied over c005.zip).
_STUDY_BYTES, _STUDY_MODIFIED = "study_bytes", "study_modified"
_READY_CHECK_S = 10.0  # a readiness check after a failed study; no answer means the server is gone
_log = logging.getLogger(__name__)


class ReportError(ValueError):
    """An existing report or journal cannot be used (wrong format, columns, folder or model), or a
    path to write cannot (a link that loops, a file where a folder goes)."""


@dataclass(frozen=True)
class ReportSummary:
    studies: int  # rows in the report: one per study found (but those still arriving)
    sent: int  # studies sent to the server in this run
    skipped: int  # already Success in the resumed journal or report
    succeeded: int  # Success rows in the report
    failed: int  # Failure rows in the report
    journal: Path  # the journal the report was built from
    writes: tuple[tuple[int, float], ...]  # (rows, seconds) of each rewrite of the report files
    page: Path | None = None  # the HTML summary page of an explained report
    arriving: tuple[str, ...] = ()  # studies left for a later run: a file younger than stable_age_s


@dataclass(frozen=True)
class Journal:
    """What a journal holds: the folder and model it was written for, and its readable lines."""

    folder: str  # the studies' folder, absolute
    model: str  # the model name the studies were sent to
    rows: list[dict[str, Any]]  # in the order written; a later row of a study replaces an earlier one
    unreadable: int  # lines ignored: a torn last line (killed while writing it) or damage
    explain: bool | None = None  # an explained report's (None: not recorded)


def journal_path(out: str | os.PathLike[str]) -> Path:
    """The journal of a report: beside it, named after it (`report.xlsx.journal.jsonl`)."""
    return Path(f"{os.fspath(out)}{JOURNAL_SUFFIX}")


def real_path(path: str | os.PathLike[str]) -> Path:
    """`path` with its links followed: a file written through a link (latest.csv -> share/latest.csv)
    is the file the link names, which an atomic write's rename would otherwise replace by a new file
    in the link's place. ReportError for a link on the path that loops: it names no file at all."""
    real = Path(os.path.realpath(path))
    try:
        os.stat(real)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ReportError(f"cannot write {os.fspath(path)}: a symbolic link on its path loops") from None
    return real


def writable_folder(folder: str | os.PathLike[str], what: str) -> Path:
    """`folder` with its links followed, made if missing and written to once, before any study is sent
    rather than after it was classified. ReportError naming what is wrong: a link that loops or names
    no folder (a share not mounted: a folder made there would be on the wrong disk), a file of that
    name, a folder that cannot be written."""
    real = real_path(folder)
    if os.path.islink(folder) and not real.exists():
        raise ReportError(f"{what} {os.fspath(folder)} is a link to {real}, which does not exist")
    if real.exists() and not real.is_dir():
        raise ReportError(f"{what} {os.fspath(folder)} is a file, not a folder")
    try:
        real.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=real).close()
    except OSError as error:
        raise ReportError(f"cannot write into {what} {os.fspath(folder)}: {error.strerror or type(error).__name__}") from None
    return real


def row_for(study: StudyRef, result: TriageResult, explain: bool = False) -> dict[str, Any]:
    row = {
        "path_to_study": study.path_to_study,
        "study_uid": result.study_uid,
        "series_uid": result.series_uid,
        "probability_of_pathology": result.probability_of_pathology,
        "pathology": result.pathology,
        "processing_status": result.processing_status,
        "time_of_processing": round(result.time_of_processing, 3),
        "error": result.error,
        "model": result.model,
        THRESHOLD_COLUMN: result.threshold,
    }
    if explain:
        row[LOCALIZATION_COLUMN] = result.pathology_localization
    return row


def write_report(rows: Iterable[dict[str, Any]], path: str | os.PathLike[str], columns: tuple[str, ...] = COLUMNS) -> None:
    """Write rows as .xlsx or .csv (by suffix) atomically: readers never see a half-written file.
    `columns`: COLUMNS, or EXPLAIN_COLUMNS for an explained report. The folder must exist: a report's
    folder removed during a run is not made again (FileNotFoundError)."""
    target = Path(path)
    content = _rendered_for(target)(list(rows), columns)  # in memory first: a full disk fails our write, not openpyxl's
    write_atomically(target, lambda stream: stream.write(content), make_folder=False)


def read_report(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a report written by `write_report`, values typed back (numbers, None for empty);
    an explained report's rows also hold `pathology_localization`."""
    source = Path(path)
    xlsx = _format(source) == ".xlsx"
    try:
        if xlsx:
            workbook = openpyxl.load_workbook(source, read_only=True)
            try:
                table = [[_from_xlsx(value) for value in row] for row in workbook.active.iter_rows(values_only=True)]
            finally:
                workbook.close()
        else:
            with open(source, newline="", encoding="utf-8") as stream:
                table = [[value.removeprefix("'") for value in row] for row in csv.reader(stream)]
    except OSError:
        raise
    except Exception as error:  # a damaged file: openpyxl and the XML parser under it raise many types
        raise ReportError(f"{source.name} is not a triage report: it cannot be read ({type(error).__name__})") from None
    if not table or tuple(table[0][: len(_ANSWER_COLUMNS)]) != _ANSWER_COLUMNS:
        raise ReportError(f"{source.name} is not a triage report: its header is not {', '.join(COLUMNS)}")
    columns = [name if name in EXPLAIN_COLUMNS else None for name in table[0]]  # by name: a report without the threshold reads too
    rows = []
    for number, values in enumerate(table[1:], start=2):
        if not any(v not in (None, "") for v in values):
            continue
        padded = list(values) + [None] * (len(columns) - len(values))  # a row's trailing empty cells may be missing (xlsx)
        try:
            rows.append(_typed({THRESHOLD_COLUMN: None} | {name: value for name, value in zip(columns, padded) if name is not None}))
        except ValueError as error:
            raise ReportError(f"{source.name} is not a triage report: row {number} holds a value of the wrong type ({error})") from None
    return rows


def read_journal(path: str | os.PathLike[str]) -> Journal:
    """A journal's header and rows. A line that is not a complete row (the last one, torn by a kill
    while it was written) is skipped and counted, never fatal: its study is simply not done."""
    source = Path(path)
    header, *lines = source.read_bytes().split(b"\n")
    try:
        head = json.loads(header)
        folder, model, explain = head["folder"], head["model"], head.get("explain")
        known = head["journal"] == _JOURNAL_KIND and head["version"] == _JOURNAL_VERSION
        known = known and isinstance(folder, str) and isinstance(model, str)  # what a resume is checked against
    except (ValueError, TypeError, KeyError):
        known = False
    if not lines or not known:  # the header is written atomically with its newline: never torn
        raise ReportError(f"{source.name} is not a triage report journal (version {_JOURNAL_VERSION}); remove it or choose another --out")
    rows, unreadable = [], 0
    *complete, tail = lines  # everything after the last newline is a torn line, or nothing
    for line in complete:
        row = _journal_row(line)
        if row is None:
            unreadable += 1
        else:
            rows.append(row)
    return Journal(folder, model, rows, unreadable + (tail != b""), explain)


async def build_report(
    folder: str | os.PathLike[str],
    out: str | os.PathLike[str],
    client_factory: Callable[[], AsyncTriageClient],
    *,
    csv_out: str | os.PathLike[str] | None = None,
    concurrency: int = 1,
    resume: bool = False,
    max_bytes_in_flight: int = DEFAULT_MAX_BYTES_IN_FLIGHT,
    write_every_s: float = DEFAULT_WRITE_EVERY_S,
    stable_age_s: float = 0.0,
    progress: bool | None = None,
) -> ReportSummary:
    """Classify every study under `folder` into the journal, and write the report to `out` (and `csv_out`).

    `concurrency` studies are in flight at most, and together at most `max_bytes_in_flight`
    bytes of study files (a single larger study still goes, alone). `resume` keeps the rows of
    `out`'s journal and sends the studies not yet Success; without a journal it sends every study.
    `stable_age_s` > 0 leaves out a study with a file written less than that many seconds ago: it is
    still being copied or exported, and a classification of part of it would be a confident answer for
    a study never seen whole. It is neither sent nor in the report, and a later `resume` run sends it
    (`ReportSummary.arriving` names it). `progress` None shows the bar only on a terminal. Raises
    ServerUnavailable if the server is down before the first study, or stops answering: the studies
    finished by then stay in the journal and the report, the others are not in either, and a
    `resume` run sends them.
    A client built with `explain=True` makes an explained report: the `pathology_localization`
    column, and the HTML summary page with a montage per study beside `out` (`summary_paths`).
    `out` and `csv_out` are followed through links (`real_path`): the journal, the lock and the page
    are beside the file a link names, and the link stays.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if write_every_s < 0:
        raise ValueError("write_every_s must not be negative")
    if stable_age_s < 0:
        raise ValueError("stable_age_s must not be negative")
    out = real_path(out)
    paths = [out] + ([real_path(csv_out)] if csv_out else [])
    for path in paths:  # what would stop the run after every study was classified stops it now
        _format(path)
        _check_writable(path)
    journal_file = real_path(journal_path(out))
    _check_journal(journal_file)
    studies = discover_studies(folder)  # the report's own files are none: an .xlsx is an office document, not a ZIP study
    settled_before = time.time() - stable_age_s

    def still_arriving(study: StudyRef) -> bool:
        return stable_age_s > 0 and study.modified > settled_before

    arriving = tuple(study.path_to_study for study in studies if still_arriving(study))
    studies = [study for study in studies if not still_arriving(study)]
    folder_name = str(Path(folder).resolve())
    for path in paths:  # once, here: a folder removed during the run is never made again
        path.parent.mkdir(parents=True, exist_ok=True)
    with _only_run_on(paths):  # a second run writing the same report, CSV or journal would interleave them
        earlier = _resumed(journal_file, out) if resume else None
        async with client_factory() as client:
            explain = bool(getattr(client, "explain", False))
            summary = _Summary(out) if explain else None
            kept: dict[str, dict[str, Any]] = {}
            if earlier is not None:
                _check_same_run(earlier, journal_file, folder_name, client.model, explain)
                kept = {row["path_to_study"]: row for row in earlier.rows}  # the latest row of each study
            replaced = {study.path_to_study for study in studies if _replaced(study, kept.get(study.path_to_study, {}))}
            todo = [
                study
                for study in studies
                if study.path_to_study in replaced or kept.get(study.path_to_study, {}).get("processing_status") != SUCCESS
            ]
            if todo:
                await client.check_ready()
            journal = _JournalWriter.create(journal_file, folder_name, client.model, kept.values(), explain=explain)
            for key in replaced:  # its row answers for the study that was there before: never in the report
                del journal.latest[key]
            report = _ReportFiles(paths, [study.path_to_study for study in studies], journal, write_every_s, summary=summary)
            show = sys.stderr.isatty() if progress is None else progress
            try:
                with tqdm(total=len(todo), desc="report", unit="study", disable=not show, dynamic_ncols=True) as bar:
                    await _classify_all(client, todo, journal, report, bar, concurrency, max_bytes_in_flight, summary)
            except ServerUnavailable as error:
                rows = len(report.ordered_rows())
                raise ServerUnavailable(
                    f"{one_line(error)}; {journal.appended} of {len(todo)} studies finished before it stopped answering; "
                    f"{out.name} holds {rows} rows of {len(studies)} studies: run again with --resume once the server is back"
                ) from None
            finally:
                journal.close()
    statuses = [row["processing_status"] for row in report.ordered_rows()]
    return ReportSummary(
        studies=len(statuses),
        sent=len(todo),
        skipped=len(studies) - len(todo),
        succeeded=statuses.count(SUCCESS),
        failed=len(statuses) - statuses.count(SUCCESS),
        journal=journal_file,
        writes=tuple(report.writes),
        page=summary.page if summary is not None else None,
        arriving=arriving,
    )


async def _classify_all(
    client: AsyncTriageClient,
    todo: list[StudyRef],
    journal: _JournalWriter,
    report: _ReportFiles,
    bar: tqdm,
    concurrency: int,
    max_bytes_in_flight: int,
    summary: _Summary | None = None,
) -> None:
    """Send every study of `todo` and journal each answer while the report is kept written; however
    this ends (done, server gone, Ctrl-C), the report files then hold every journaled row."""
    pending = iter(todo)  # shared by the workers: each study is taken once
    budget = _ByteBudget(max_bytes_in_flight)
    failed = 0

    async def worker() -> None:
        nonlocal failed
        for study in pending:
            async with budget.hold(study.size_bytes):
                result = await _classify_guarded(client, study)
                if worker_died(result):  # sent again once: the study may only have been queued at that worker
                    result = await _sent_again(client, study, result)
                if summary is not None and result.explanation is not None:  # its thumbnail exists before its row
                    await asyncio.to_thread(summary.save_thumbnail, study, result)
            if not result.ok:
                await _raise_if_server_gone(client)  # no answer is no row: --resume sends the study again
                failed += 1
            journal.append(row_for(study, result, explain=summary is not None), study)
            del result  # an explanation holds 96 MiB at S=256: not kept past its study
            bar.set_postfix(failed=failed, refresh=False)
            bar.update(1)

    report.start()
    workers = [asyncio.ensure_future(worker()) for _ in range(min(concurrency, len(todo)))]
    everything = asyncio.gather(*workers)
    try:
        await asyncio.wait([everything, report.writer], return_when=asyncio.FIRST_COMPLETED)
        if not everything.done():  # the writer ended first, so it failed: classifying on would be for nothing
            report.writer.result()
        await everything
    finally:  # also on Ctrl-C or a lost server: stop the rest, then write every finished study
        for task in workers:
            task.cancel()
        await asyncio.gather(everything, *workers, return_exceptions=True)
        await asyncio.shield(report.finish())


async def _sent_again(client: AsyncTriageClient, study: StudyRef, failed: TriageResult) -> TriageResult:
    """A study whose worker process died on the server (Triton's "Stub process ... is not healthy"),
    sent once more: that study may have killed it, or only have been queued at it when something else
    did. Triton keeps the model ready while the worker is dead, so the resend waits as long as the
    retry schedule gives a restarting server (`RetryPolicy`, 7.5 s by default; a supervised server's
    watchdog replaces the worker in about 2 s), after a readiness check. A second death is the study's
    Failure row: a study that kills its worker costs at most two crashes. `--attempts 1`: never resent."""
    if client.retry.attempts < 2:
        return failed
    wait = sum(client.retry.backoffs())
    await asyncio.sleep(wait)
    await _raise_if_server_gone(client)
    again = await _classify_guarded(client, study)
    return dataclasses.replace(again, time_of_processing=again.time_of_processing + failed.time_of_processing + wait)


async def _raise_if_server_gone(client: AsyncTriageClient) -> None:
    """After a Failure: ServerUnavailable if the server (or model) is no longer ready, so the run
    stops instead of turning every remaining study into a Failure row."""
    try:
        await asyncio.wait_for(client.check_ready(), _READY_CHECK_S)
    except asyncio.TimeoutError:
        raise ServerUnavailable(
            f"Triton server at {client.url} ({client.protocol}) did not answer a readiness check within {_READY_CHECK_S:.0f} s"
        ) from None


@contextlib.contextmanager
def _only_run_on(paths: Iterable[Path]):
    """Hold `<path>.lock` of each report file (`--out`, which also covers its journal beside it, and
    `--csv`) for the run, in path order: a periodic job started again before the last run ended (cron
    does not wait), or another report exporting the same file (`--csv latest.csv`), is refused instead
    of rewriting a journal or a report under it. The locks are the kernel's (flock), so a killed run
    holds them no longer; the files stay, empty."""
    with contextlib.ExitStack() as held:
        for path in sorted(set(paths)):
            lock = Path(f"{os.fspath(path)}.lock")
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            held.callback(os.close, fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ReportError(
                    f"another run is writing {path.name} ({lock.name} is held): let it finish, or choose another file"
                ) from None
        yield


def _check_writable(path: Path) -> None:
    """A report file this run can write: not a folder, in a writable folder, and if it exists, a
    report (a run never overwrites someone's other spreadsheet)."""
    if path.is_dir():
        raise ReportError(f"{path.name} is a folder, not a report file")
    _check_regular(path)
    existing = next(folder for folder in (path.absolute().parent, *path.absolute().parents) if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ReportError(f"cannot write {path.name}: {existing} is not a writable folder")
    if path.exists():
        read_report(path)  # ReportError: not a triage report (also with --resume: a --csv is never read otherwise)


def _check_journal(path: Path) -> None:
    """A journal this run can append to: a read-only one would be replaced by the rewrite at the
    start (the folder allows that), then fail the first append."""
    _check_regular(path)
    if path.is_file() and not os.access(path, os.W_OK):
        raise ReportError(f"{path.name} is read-only: make it writable (each finished study is appended to it), or choose another --out")


def _check_regular(path: Path) -> None:
    """Not a FIFO or a device where a report file goes: opening one to read it would wait for a
    writer for ever, deaf to SIGTERM (the event loop never gets back control)."""
    if path.exists() and not path.is_dir() and not path.is_file():
        raise ReportError(f"{path.name} is not a regular file (a FIFO or a device): choose another --out")


def _resumed(journal_file: Path, out: Path) -> Journal | None:
    """What a resumed run starts from: the journal, its unreadable lines named in a warning. A report
    without one says nothing of the folder its rows are for, so none of them is taken: each would be
    the answer for any study that has its path in this folder (another day's s1.zip)."""
    if journal_file.exists():
        journal = read_journal(journal_file)
        if journal.unreadable:
            _log.warning(
                "%s: %d unreadable line%s skipped (torn by a kill, or damaged): the studies they held are sent again",
                printable(journal_file.name),
                journal.unreadable,
                "" if journal.unreadable == 1 else "s",
            )
        return journal
    if out.exists():
        _log.warning(
            "%s has no journal (%s), so the folder of its rows cannot be checked: every study is sent again",
            printable(out.name),
            printable(journal_file.name),
        )
    return None


def _check_same_run(earlier: Journal, journal_file: Path, folder: str, model: str, explain: bool) -> None:
    """Rows are matched by path_to_study, relative to the folder: another folder's rows would be
    taken for these studies, another model's answers mixed with this one's, an explained report's
    rows rewritten without their localization column and its page left stale."""
    if earlier.explain is not None and earlier.explain != explain:
        kind = "an explained report: resume with --explain"
        if not earlier.explain:
            kind = "a report without explanations: resume without --explain"
        raise ReportError(f"{journal_file.name} is the journal of {kind}, or choose another --out")
    for what, theirs, ours in (("folder", earlier.folder, folder), ("model", earlier.model, model)):
        if theirs != ours:
            raise ReportError(
                f"{journal_file.name} is the journal of a report of {what} {theirs}, not {ours}: "
                f"resume with that {what}, or choose another --out"
            )


def _identity(study: StudyRef) -> dict[str, Any]:
    """What the journal records of a study besides its row: its size and its newest file's time as
    discovery found them (`StudyRef`), so that a resume tells a study replaced under the same path."""
    return {_STUDY_BYTES: study.size_bytes, _STUDY_MODIFIED: study.modified}


def _replaced(study: StudyRef, row: dict[str, Any]) -> bool:
    """Whether the journaled row is of another study than the one now at its path: its recorded size
    or time differs. A line without them (a journal of an earlier version) is taken as it is."""
    if _STUDY_BYTES not in row or _STUDY_MODIFIED not in row:
        return False
    return row[_STUDY_BYTES] != study.size_bytes or row[_STUDY_MODIFIED] != study.modified


def _journal_row(line: bytes) -> dict[str, Any] | None:
    """A line's row, or None for a damaged or hand-edited line: each cell must have its column's type
    (as `read_report` types them), or the report written from it could not be read back."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not all(column in record for column in _ANSWER_COLUMNS):
        return None
    if not isinstance(record["path_to_study"], str):
        return None
    record.setdefault(THRESHOLD_COLUMN, None)  # not known: the cell stays empty, the answer stands
    if not all(_of_its_type(column, record[column]) for column in EXPLAIN_COLUMNS if column in record):
        return None
    if record["processing_status"] == SUCCESS and not _is_decision(record):
        return None
    return record


def _is_decision(row: dict[str, Any]) -> bool:
    """What a Success row must hold to be kept instead of sent again: P(pathology) in [0, 1] (not NaN),
    pathology 0 or 1, and a threshold in [0, 1] where there is one."""
    probability, threshold = row["probability_of_pathology"], row[THRESHOLD_COLUMN]
    return probability is not None and 0 <= probability <= 1 and row["pathology"] in (0, 1) and (threshold is None or 0 <= threshold <= 1)


def _of_its_type(column: str, value: Any) -> bool:
    if value is None:
        return True
    if column in _FLOAT_COLUMNS:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if column in _INT_COLUMNS:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, str)


def _line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")


def _sync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


async def _classify_guarded(client: AsyncTriageClient, study: StudyRef) -> TriageResult:
    """Even a client-side bug on one study becomes that study's Failure row, not a lost report."""
    started = time.perf_counter()
    try:
        return await client.classify(study.path)
    except Exception as error:
        return failure(
            f"internal client error: {type(error).__name__}: {error}",
            seconds=time.perf_counter() - started,
            model=client.model,
        )


class _ByteBudget:
    """At most `capacity` bytes of studies held at once; one oversized study may go alone."""

    def __init__(self, capacity: int):
        self._capacity = max(int(capacity), 1)
        self._in_use = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, size: int):
        size = min(max(int(size), 0), self._capacity)
        async with self._changed:
            await self._changed.wait_for(lambda: self._in_use + size <= self._capacity)
            self._in_use += size
        try:
            yield
        finally:
            async with self._changed:
                self._in_use -= size
                self._changed.notify_all()


class _JournalWriter:
    """Appends one line per finished study and syncs it to disk before the study counts as done.

    Created once per run by an atomic write of its header and the rows it starts from, so the file
    always begins with a complete header; after that it only grows.
    """

    def __init__(self, path: Path, latest: dict[str, dict[str, Any]]):
        self.path = path
        self.latest = latest  # the latest row of each study journaled, by path_to_study
        self.appended = 0  # rows appended in this run
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)

    @classmethod
    def create(cls, path: Path, folder: str, model: str, rows: Iterable[dict[str, Any]], *, explain: bool = False) -> _JournalWriter:
        rows = list(rows)
        header = {"journal": _JOURNAL_KIND, "version": _JOURNAL_VERSION, "folder": folder, "model": model, "explain": explain}
        write_atomically(path, lambda stream: stream.write(b"".join(_line(record) for record in (header, *rows))), make_folder=False)
        _sync_folder(path.parent)  # the rename itself survives a power cut
        return cls(path, {row["path_to_study"]: row for row in rows})

    def append(self, row: dict[str, Any], study: StudyRef | None = None) -> None:
        """`study`: the study the row is for, its size and time recorded with the row (`_identity`).
        ReportError in one line when the line cannot be written (made immutable, EIO, a full disk)."""
        line = _line({**row, **(_identity(study) if study is not None else {}), "finished_at": round(time.time(), 3)})
        try:
            written = 0
            while written < len(line):
                written += os.write(self._fd, line[written:])
            os.fsync(self._fd)
        except OSError as error:
            raise ReportError(
                f"cannot append to {self.path} ({error.strerror or type(error).__name__}): "
                f"the finished studies are in {self.path}; --resume continues once it can be written"
            ) from None
        self.latest[row["path_to_study"]] = row
        self.appended += 1

    def check_in_place(self) -> None:
        """ReportError unless the path still names the file this run appends to: once it was removed
        or replaced (its folder deleted by a cleanup job, a share unmounted), every line appended is
        lost with it."""
        held = os.fstat(self._fd)
        try:
            found = os.stat(self.path)
        except OSError:
            found = None
        if found is None or (found.st_ino, found.st_dev) != (held.st_ino, held.st_dev):
            raise ReportError(
                f"{self.path.name} was removed or replaced during the run (its folder deleted?), and with it the "
                "studies it held: the run stops; run it again"
            )

    def close(self) -> None:
        os.close(self._fd)


class _Summary:
    """An explained report's HTML page and thumbnail folder (`client.summary`)."""

    def __init__(self, out: Path):
        from .summary import summarised_report, summary_paths

        self.report_name = printable(out.name)
        page, thumbnails = summary_paths(out)
        self.page = real_path(page)
        if self.page.exists():  # someone's own page is never replaced
            theirs, name = summarised_report(self.page), printable(self.page.name)
            if theirs is None:
                raise ReportError(f"{name} exists and is not a report's summary page: move it, or choose another --out")
            if theirs != self.report_name:
                raise ReportError(f"{name} is the summary page of {theirs}, not of {self.report_name}: choose another --out")
        self.thumbnails = writable_folder(thumbnails, "the thumbnail folder")  # else every picture would be lost

    def save_thumbnail(self, study: StudyRef, result: TriageResult) -> None:
        """The study's montage; a picture that cannot be drawn costs the picture, never the row."""
        from .montage import THUMBNAIL_DPI, save_montage
        from .summary import thumbnail_name

        thumbnail = self.thumbnails / thumbnail_name(study.path_to_study)
        try:
            thumbnail.unlink(missing_ok=True)  # an earlier run's picture must not stand for this answer
            save_montage(result, thumbnail, dpi=THUMBNAIL_DPI)
        except Exception as error:  # the row keeps its answer; the page says "no picture"
            _log.warning("montage not drawn: %s: %s", type(error).__name__, one_line(error))

    def write(self, rows: list[dict[str, Any]]) -> None:
        from .summary import write_summary

        write_summary(rows, self.page, self.thumbnails, report_name=self.report_name)


class _ReportFiles:
    """Rewrites the report files from the journal's rows: at the start, then at most every `every_s`
    seconds while rows come in, and once at the end. One task does every write, so an older
    snapshot can never be renamed over a newer one."""

    def __init__(self, paths: list[Path], order: list[str], journal: _JournalWriter, every_s: float, *, summary: _Summary | None = None):
        self._summary = summary
        self._columns = EXPLAIN_COLUMNS if summary is not None else COLUMNS
        self._paths = paths
        self._order = order
        self._journal = journal
        self._every_s = every_s
        self._seen = -1  # journal.appended at the last write: unchanged means nothing to write
        self._last_write_s = 0.0
        self._stop = asyncio.Event()
        self.writer: asyncio.Task | None = None  # the task doing every write; it ends early only by failing
        self.writes: list[tuple[int, float]] = []

    def ordered_rows(self) -> list[dict[str, Any]]:
        latest = self._journal.latest
        return [latest[key] for key in self._order if key in latest]

    def start(self) -> None:
        self.writer = asyncio.ensure_future(self._keep_written())

    async def finish(self) -> None:
        """Return once the files on disk hold every row journaled so far."""
        self._stop.set()
        await self.writer

    async def _keep_written(self) -> None:
        await self._write()  # the report exists from the start: resumed rows, or just the header
        while not self._stop.is_set():
            pause = max(self._every_s, _PAUSE_PER_WRITE_SECOND * self._last_write_s, 0.05)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), pause)
            if self._journal.appended != self._seen or self._stop.is_set():
                await self._write()
        if self._journal.appended != self._seen:  # rows that finished during the first write, if the run ended then
            await self._write()

    async def _write(self) -> None:
        self._journal.check_in_place()  # the report is only ever rewritten from a journal that is still there
        self._seen = self._journal.appended
        snapshot = self.ordered_rows()
        started = time.perf_counter()
        for path in self._paths:
            try:
                await asyncio.to_thread(write_report, snapshot, path, self._columns)
            except OSError as error:  # a full disk: the journal still holds every finished study
                self._journal.check_in_place()  # unless its folder is gone too (removed while this was written)
                raise ReportError(
                    f"cannot write {path.name}: {error.strerror or type(error).__name__}; "
                    f"{self._journal.path.name} holds every finished study: run again with --resume once it can be written"
                ) from None
        if self._summary is not None:
            await asyncio.to_thread(self._summary.write, snapshot)
        self._last_write_s = time.perf_counter() - started
        self.writes.append((len(snapshot), round(self._last_write_s, 4)))


def _format(path: Path) -> str:
    """The report format, by suffix: ".xlsx" or ".csv"."""
    suffix = path.suffix.lower()
    if suffix not in (".xlsx", ".csv"):
        raise ReportError(f"a report is .xlsx or .csv, not {path.name}")
    return suffix


def _rendered_for(target: Path) -> Callable[[list[dict[str, Any]], tuple[str, ...]], bytes]:
    """The report's bytes; openpyxl writing straight to a file that fails (a full disk) leaves its
    zip writer half closed, which prints tracebacks on stderr when it is collected."""
    return _xlsx_bytes if _format(target) == ".xlsx" else _csv_bytes


def _xlsx_bytes(rows: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> bytes:
    workbook = openpyxl.Workbook(write_only=True)
    sheet = workbook.create_sheet("triage")
    sheet.append(list(columns))
    for row in rows:
        sheet.append([_xlsx_cell(sheet, row.get(column)) for column in columns])
    buffer = io.BytesIO()
    workbook.save(buffer)
    return buffer.getvalue()


def _xlsx_cell(sheet, value: Any) -> Any:
    """Text as a text cell (openpyxl stores text that starts with "=" as a formula, and refuses
    control characters, which would fail the whole report), escaped as ECMA-376 says."""
    if not isinstance(value, str) or not (value.startswith("=") or "_x" in value or _NOT_IN_XML.search(value)):
        return value  # plain text: openpyxl writes it as text itself
    escaped = _OOXML_ESCAPE.sub(lambda match: "_x005F" + match.group(), value)
    cell = WriteOnlyCell(sheet, _NOT_IN_XML.sub(lambda match: f"_x{ord(match.group()):04X}_", escaped))
    cell.data_type = "s"
    return cell


def _from_xlsx(value: Any) -> Any:
    if not isinstance(value, str) or "_x" not in value:
        return value
    return _OOXML_ESCAPE.sub(lambda match: chr(int(match.group()[2:6], 16)), value)


def _csv_bytes(rows: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> bytes:
    text = io.StringIO(newline="")
    table = csv.writer(text, quoting=csv.QUOTE_ALL)  # every cell quoted: a ";" cannot split one where ";" separates (Excel in many locales)
    table.writerow(columns)
    for row in rows:
        table.writerow([_csv_cell(row.get(column)) for column in columns])
    return text.getvalue().encode("utf-8", errors="backslashreplace")  # a name that is not UTF-8: \udcxx


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA_STARTS) else value


def _typed(row: dict[str, Any]) -> dict[str, Any]:
    typed: dict[str, Any] = {}
    for column, value in row.items():
        if value in (None, ""):
            typed[column] = None
        elif column in _FLOAT_COLUMNS:
            typed[column] = float(value)
        elif column in _INT_COLUMNS:
            typed[column] = int(value)
        else:
            typed[column] = str(value)
    return typed
