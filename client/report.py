"""The triage report: every study of a folder through the server, one row each, written safely.

Rows are kept in discovery order and the report file is rewritten atomically (temp file + rename)
whenever studies complete, so a crash or Ctrl-C loses at most the studies still in flight, and
`resume` can skip every study already reported as Success.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import openpyxl
from tqdm import tqdm

from preprocess.output import write_atomically

from .result import SUCCESS, TriageResult, failure
from .studies import StudyRef, discover_studies
from .triage import AsyncTriageClient

COLUMNS = (
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
_FLOAT_COLUMNS = ("probability_of_pathology", "time_of_processing")
_INT_COLUMNS = ("pathology",)
DEFAULT_MAX_BYTES_IN_FLIGHT = 1024**3


class ReportError(ValueError):
    """An existing report cannot be used (wrong format or columns)."""


@dataclass(frozen=True)
class ReportSummary:
    studies: int  # rows in the report: one per study found
    sent: int  # studies sent to the server in this run
    skipped: int  # already Success in the resumed report
    succeeded: int  # Success rows in the report
    failed: int  # Failure rows in the report


def row_for(study: StudyRef, result: TriageResult) -> dict[str, Any]:
    return {
        "path_to_study": study.path_to_study,
        "study_uid": result.study_uid,
        "series_uid": result.series_uid,
        "probability_of_pathology": result.probability_of_pathology,
        "pathology": result.pathology,
        "processing_status": result.processing_status,
        "time_of_processing": round(result.time_of_processing, 3),
        "error": result.error,
        "model": result.model,
    }


def write_report(rows: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write rows as .xlsx or .csv (by suffix) atomically: readers never see a half-written file."""
    target = Path(path)
    writer = _writer_for(target)
    rows = list(rows)
    write_atomically(target, lambda stream: writer(rows, stream))


def read_report(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a report written by `write_report`, values typed back (numbers, None for empty)."""
    source = Path(path)
    if _format(source) == ".xlsx":
        workbook = openpyxl.load_workbook(source, read_only=True)
        try:
            table = [list(row) for row in workbook.active.iter_rows(values_only=True)]
        finally:
            workbook.close()
    else:
        with open(source, newline="", encoding="utf-8") as stream:
            table = list(csv.reader(stream))
    if not table or tuple(table[0][: len(COLUMNS)]) != COLUMNS:
        raise ReportError(f"{source.name} is not a triage report: its header is not {', '.join(COLUMNS)}")
    return [_typed(dict(zip(COLUMNS, values))) for values in table[1:] if any(v not in (None, "") for v in values)]


async def build_report(
    folder: str | os.PathLike[str],
    out: str | os.PathLike[str],
    client_factory: Callable[[], AsyncTriageClient],
    *,
    csv_out: str | os.PathLike[str] | None = None,
    concurrency: int = 1,
    resume: bool = False,
    max_bytes_in_flight: int = DEFAULT_MAX_BYTES_IN_FLIGHT,
    progress: bool | None = None,
) -> ReportSummary:
    """Classify every study under `folder` and write the report to `out` (and `csv_out`).

    `concurrency` studies are in flight at most, and together at most `max_bytes_in_flight`
    bytes of study files (a single larger study still goes, alone). `progress` None shows the
    bar only on a terminal. Raises ServerUnavailable if the server is down before the first study.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    paths = [Path(out)] + ([Path(csv_out)] if csv_out else [])
    for path in paths:
        _format(path)  # a wrong suffix stops the run now, not after every study was classified
    studies = discover_studies(folder)
    found = {study.path_to_study for study in studies}
    rows: dict[str, dict[str, Any]] = {}
    if resume and Path(out).exists():
        for row in read_report(out):
            if row["processing_status"] == SUCCESS and row["path_to_study"] in found:
                rows[row["path_to_study"]] = row
    todo = [study for study in studies if study.path_to_study not in rows]
    skipped = len(studies) - len(todo)
    writer = _IncrementalWriter(studies, rows, paths)
    async with client_factory() as client:
        if todo:
            await client.check_ready()
        writer.schedule()  # the report exists (resumed rows, or just the header) from the start
        pending = iter(todo)  # shared by the workers: each study is taken once
        budget = _ByteBudget(max_bytes_in_flight)
        show = sys.stderr.isatty() if progress is None else progress
        with tqdm(total=len(todo), unit="study", disable=not show, dynamic_ncols=True) as bar:

            async def worker() -> None:
                for study in pending:
                    async with budget.hold(study.size_bytes):
                        result = await _classify_guarded(client, study)
                    writer.add(row_for(study, result))
                    bar.update(1)

            workers = [asyncio.ensure_future(worker()) for _ in range(min(concurrency, len(todo)))]
            try:
                await asyncio.gather(*workers)
            finally:  # also on Ctrl-C: stop the rest, then persist every finished study
                for task in workers:
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                await asyncio.shield(writer.flush())
    statuses = [row["processing_status"] for row in writer.ordered_rows()]
    return ReportSummary(
        studies=len(statuses),
        sent=len(todo),
        skipped=skipped,
        succeeded=statuses.count(SUCCESS),
        failed=len(statuses) - statuses.count(SUCCESS),
    )


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


class _IncrementalWriter:
    """Rewrites the report files after completions; writes coalesce so writing never piles up."""

    def __init__(self, studies: list[StudyRef], rows: dict[str, dict[str, Any]], paths: list[Path]):
        self._order = [study.path_to_study for study in studies]
        self._rows = rows
        self._paths = paths
        self._dirty = False
        self._task: asyncio.Task | None = None

    def ordered_rows(self) -> list[dict[str, Any]]:
        return [self._rows[key] for key in self._order if key in self._rows]

    def add(self, row: dict[str, Any]) -> None:
        self._rows[row["path_to_study"]] = row
        self.schedule()

    def schedule(self) -> None:
        self._dirty = True
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._drain())

    async def flush(self) -> None:
        """Return once the files on disk hold every row added so far."""
        self.schedule()
        await self._task

    async def _drain(self) -> None:
        while self._dirty:
            self._dirty = False
            snapshot = self.ordered_rows()
            for path in self._paths:
                await asyncio.to_thread(write_report, snapshot, path)


def _format(path: Path) -> str:
    """The report format, by suffix: ".xlsx" or ".csv"."""
    suffix = path.suffix.lower()
    if suffix not in (".xlsx", ".csv"):
        raise ReportError(f"a report is .xlsx or .csv, not {path.name}")
    return suffix


def _writer_for(target: Path) -> Callable[[list[dict[str, Any]], IO[bytes]], None]:
    return _write_xlsx if _format(target) == ".xlsx" else _write_csv


def _write_xlsx(rows: list[dict[str, Any]], stream: IO[bytes]) -> None:
    workbook = openpyxl.Workbook(write_only=True)
    sheet = workbook.create_sheet("triage")
    sheet.append(list(COLUMNS))
    for row in rows:
        sheet.append([row.get(column) for column in COLUMNS])
    workbook.save(stream)


def _write_csv(rows: list[dict[str, Any]], stream: IO[bytes]) -> None:
    text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
    table = csv.writer(text)
    table.writerow(COLUMNS)
    for row in rows:
        table.writerow(["" if row.get(column) is None else row.get(column) for column in COLUMNS])
    text.flush()
    text.detach()  # the stream stays open for write_atomically to sync and close


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
