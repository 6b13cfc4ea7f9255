"""Find the studies in an archive folder: each ZIP file, and each sub-folder holding DICOM files.

Discovery only looks at names, sizes and the first bytes of files; the studies are read later,
one at a time, under the report's memory budget.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from preprocess.dicom import looks_like_dicom
from preprocess.sources import is_zip

_HEAD = 132  # enough to recognise a ZIP or a DICOM file (128-byte preamble and "DICM")
_DICOM_SUFFIXES = (".dcm", ".dicom")


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
    Hidden files and folders are ignored; an empty folder is no study; a link to `folder` itself or
    to a folder above it is no study (it would hold every study again); only regular files are read
    (a FIFO or a device would block the scan).
    """
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    above = {root.resolve(), *root.resolve().parents}
    studies: list[StudyRef] = []
    for entry in _visible(root):
        if entry.is_symlink() and entry.resolve() in above:
            continue
        if entry.is_dir():
            if _holds_dicom(entry):
                studies.append(_ref(entry, root, _tree_stat(entry)))
            else:  # nothing below is DICOM: only the ZIPs in it are studies
                studies.extend(_ref(path, root, _stat(path)) for path in _files(entry) if _is_zip(path, _head(path)))
        elif entry.is_file() or entry.is_symlink():  # a dangling link named .zip is a study that fails to read
            head = _head(entry)
            if _is_zip(entry, head) or _is_dicom(entry, head):
                studies.append(_ref(entry, root, _stat(entry)))
    return sorted(studies, key=lambda study: study.path_to_study)


def _ref(path: Path, root: Path, stat: tuple[int, float]) -> StudyRef:
    return StudyRef(path, path.relative_to(root).as_posix(), *stat)


def _visible(directory: Path) -> list[Path]:
    return [entry for entry in directory.iterdir() if not entry.name.startswith(".")]


def _files(directory: Path):
    for parent, folders, names in os.walk(directory):
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in names:
            if not name.startswith("."):
                yield Path(parent, name)


def _holds_dicom(directory: Path) -> bool:
    return any(_is_dicom(path, _head(path)) for path in _files(directory))


def _tree_stat(directory: Path) -> tuple[int, float]:
    """Bytes of all its files, and when the newest one last changed."""
    stats = [_stat(path) for path in _files(directory)]
    return sum(size for size, _ in stats), max((modified for _, modified in stats), default=0.0)


def _stat(path: Path) -> tuple[int, float]:
    """Bytes on disk, and when the file last changed: the later of its modification time and its
    inode change time, since copies that keep the source's times (`cp -p`, `rsync -a`, unzip) set an
    old modification time on a file written just now. (0, 0.0) for what cannot be stat'ed (a
    dangling link, a file gone): reading it fails later, as that study's row."""
    try:
        stat = path.stat()
    except OSError:
        return 0, 0.0
    return (stat.st_size if path.is_file() else 0), max(stat.st_mtime, stat.st_ctime)


def _head(path: Path) -> bytes:
    try:
        if not path.is_file():
            return b""
        with open(path, "rb") as stream:
            return stream.read(_HEAD)
    except OSError:
        return b""


# The reader's own rules, so discovery finds exactly what preprocess reads.
def _is_zip(path: Path, head: bytes) -> bool:
    return path.suffix.lower() == ".zip" or is_zip(head)


def _is_dicom(path: Path, head: bytes) -> bool:
    return path.suffix.lower() in _DICOM_SUFFIXES or looks_like_dicom(head)
