"""Find the studies in an archive folder: each ZIP file, and each sub-folder holding DICOM files.

Discovery only looks at names, sizes and the first bytes of files; the studies are read later,
one at a time, under the report's memory budget.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from preprocess import HEAD_BYTES, is_zip, looks_like_dicom

_DICOM_SUFFIXES = (".dcm", ".dicom")
# Office documents are ZIP files too (OOXML, OpenDocument): an earlier report's .xlsx left in the folder,
# a worklist, a letter. None is a study.
_OFFICE_SUFFIXES = (".xlsx", ".xlsm", ".xltx", ".docx", ".docm", ".dotx", ".pptx", ".pptm", ".potx", ".ods", ".odt", ".odp", ".odg")


@dataclass(frozen=True)
class StudyRef:
    """One study of a report, before it is read."""

    path: Path  # what preprocess.read_study receives
    path_to_study: str  # the report's key: relative to the folder, POSIX separators
    size_bytes: int  # bytes on disk, used to bound the memory in flight
    modified: float  # when its newest file last changed (Unix s): is it still being written?


def discover_studies(folder: str | os.PathLike[str]) -> list[StudyRef]:
    """The studies under `folder`, sorted by path_to_study (a stable report order).

    A sub-folder holding DICOM files anywhere below it is one study (its series may sit in deeper
    folders). A folder holding no DICOM files of its own is searched further, so ZIPs grouped in
    sub-folders are found. A DICOM file lying directly in `folder` is one study (a multi-frame file).
    Hidden files and folders and office documents (.xlsx, .docx, .ods, ...: ZIP files too, such as an
    earlier report) are ignored; an empty folder is no study; a link to `folder` itself or
    to a folder above it is no study (it would hold every study again), nor is a link to a study
    found in `folder` (it would be sent twice); a folder linked from a sub-folder is looked at as if
    it were there (a study linked into a group folder, a series into a patient's folder); only
    regular files are read (a FIFO or a device would block the scan). What cannot be read (a folder
    that cannot be listed, a file that cannot be opened) is a study rather than nothing, so that its
    row says why: a folder holding it with no DICOM file or ZIP readable is one such study, a folder
    of ZIPs lists it beside them.
    """
    if not os.fspath(folder):  # Path("") is ".": an unset variable in a cron line would scan the working folder
        raise NotADirectoryError("the folder's name is empty: name the folder of studies")
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    above = {root.resolve(), *root.resolve().parents}
    studies: list[StudyRef] = []
    for entry in _visible(root):
        if (entry.is_symlink() and resolved(entry) in above) or _is_office_document(entry):
            continue
        if entry.is_dir():
            studies.extend(_ref(path, root, stat) for path, stat in _studies_below(entry, above, set()))
        elif entry.is_file() or entry.is_symlink():  # a dangling link named .zip is a study that fails to read
            head = _head(entry)
            if head is None or _is_zip(entry, head) or _is_dicom(entry, head):
                studies.append(_ref(entry, root, _stat(entry)))
    return sorted(_each_once(studies), key=lambda study: study.path_to_study)


def resolved(path: Path) -> Path | None:
    """The path with its links followed; None for a link that loops (Python 3.11 raises RuntimeError)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return None


def _studies_below(directory: Path, above: set[Path], seen: set[Path]) -> list[tuple[Path, tuple[int, float]]]:
    """The studies of a sub-folder of the report's folder: itself if it holds a DICOM file (found
    without reading every file's head), else its ZIPs, what cannot be read, and the studies of the
    folders linked from it, each looked at as if it were there (not a link to the report's folder or
    above it, nor one already looked at: a loop). A study folder's own links are not followed, as
    reading it does not follow them."""
    unreadable: list[Path] = []
    zips: list[Path] = []
    linked: list[Path] = []
    for path in _files(directory, unreadable, linked):
        if _is_office_document(path):
            continue
        head = _head(path)
        if head is None:
            unreadable.append(path)
        elif _is_dicom(path, head):
            return [(directory, _tree_stat(directory))]
        elif _is_zip(path, head):
            zips.append(path)
    if unreadable and not zips and not linked:  # reading it names what cannot be read
        return [(directory, _tree_stat(directory))]
    studies = [(path, _stat(path)) for path in zips + unreadable]
    seen.add(resolved(directory))
    for link in linked:
        target = resolved(link)
        if target is not None and target not in above and target not in seen:
            studies += _studies_below(link, above, seen)
    return studies


def _each_once(studies: list[StudyRef]) -> list[StudyRef]:
    """One study per file or folder reached: of the names that lead to the same place (a link to a
    study in the folder, a linked group folder), the one without a link is kept, else the first."""
    by_target: dict[Path, list[StudyRef]] = {}
    once = []
    for study in sorted(studies, key=lambda study: study.path_to_study):
        target = resolved(study.path)
        if target is None:
            once.append(study)
        else:
            by_target.setdefault(target, []).append(study)
    for target, names in by_target.items():
        once.append(next((study for study in names if study.path.absolute() == target), names[0]))
    return once


def _ref(path: Path, root: Path, stat: tuple[int, float]) -> StudyRef:
    return StudyRef(path, path.relative_to(root).as_posix(), *stat)


def _visible(directory: Path) -> list[Path]:
    return [entry for entry in directory.iterdir() if not entry.name.startswith(".")]


def _files(directory: Path, unlisted: list[Path] | None = None, linked: list[Path] | None = None):
    """The visible files below `directory`; the folders that cannot be listed go to `unlisted`, the
    links to folders (not followed) to `linked`."""

    def cannot_list(error: OSError) -> None:
        if unlisted is not None:
            unlisted.append(Path(error.filename))

    for parent, folders, names in os.walk(directory, onerror=cannot_list):
        folders[:] = [name for name in folders if not name.startswith(".")]
        if linked is not None:
            linked.extend(path for path in (Path(parent, name) for name in folders) if path.is_symlink())
        for name in names:
            if not name.startswith("."):
                yield Path(parent, name)


def _tree_stat(directory: Path) -> tuple[int, float]:
    """Bytes of all its files, and when the newest one last changed."""
    stats = [_stat(path) for path in _files(directory)]
    return sum(size for size, _ in stats), max((modified for _, modified in stats), default=0.0)


def _stat(path: Path) -> tuple[int, float]:
    """Bytes on disk, and when the file last changed: the later of its modification time and its
    inode change time, since copies that keep the source's times (`cp -p`, `rsync -a`, unzip) set an
    old modification time on a file written just now. A modification time in the future (copied
    from a host whose clock is ahead) is ignored: it would keep the study "arriving" until then; the
    inode change time is set by this host's clock. (0, 0.0) for what cannot be stat'ed (a dangling
    link, a file gone): reading it fails later, as that study's row."""
    try:
        stat = path.stat()
    except OSError:
        return 0, 0.0
    modified = stat.st_mtime if stat.st_mtime <= time.time() else 0.0
    return (stat.st_size if path.is_file() else 0), max(modified, stat.st_ctime)


def _head(path: Path) -> bytes | None:
    """Its first bytes; b"" for what is not a regular file (never opened: a FIFO would block), None
    for a file that cannot be read."""
    try:
        if not path.is_file():
            return b""
        with open(path, "rb") as stream:
            return stream.read(HEAD_BYTES)
    except OSError:
        return None


def _is_office_document(path: Path) -> bool:
    return path.suffix.lower() in _OFFICE_SUFFIXES


# The reader's rule (preprocess reads a file by its first bytes alone), and also the names: a file
# named .zip, .dcm or .dicom that is not what its name says is a study whose row says why it cannot
# be read, never left out.
def _is_zip(path: Path, head: bytes) -> bool:
    return path.suffix.lower() == ".zip" or is_zip(head)


def _is_dicom(path: Path, head: bytes) -> bool:
    return path.suffix.lower() in _DICOM_SUFFIXES or looks_like_dicom(head)
