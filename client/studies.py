"""Find the studies in an archive folder: each ZIP file, and each sub-folder holding DICOM files.

Discovery only looks at names, sizes and the first bytes of files; the studies are read later,
one at a time, under the report's memory budget.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_ZIP_MAGIC = b"PK\x03\x04"
_DICOM_HEAD = 132  # the 128-byte preamble of a Part-10 file and "DICM"
_DICOM_SUFFIXES = (".dcm", ".dicom")


@dataclass(frozen=True)
class StudyRef:
    """One study of a report, before it is read."""

    path: Path  # what preprocess.read_study receives
    path_to_study: str  # the report's key: relative to the folder, POSIX separators
    size_bytes: int  # bytes on disk, used to bound the memory in flight


def discover_studies(folder: str | os.PathLike[str]) -> list[StudyRef]:
    """The studies under `folder`, sorted by path_to_study (a stable report order).

    A sub-folder holding DICOM files anywhere below it is one study (its series may sit in deeper
    folders). A folder holding no DICOM files of its own is searched further, so ZIPs grouped in
    sub-folders are found. DICOM files lying directly in `folder` form one study named ".".
    Hidden files and folders are ignored; an empty folder is no study.
    """
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    studies: list[StudyRef] = []
    _search(root, root, studies, is_root=True)
    return sorted(studies, key=lambda study: study.path_to_study)


def _search(directory: Path, root: Path, studies: list[StudyRef], *, is_root: bool) -> None:
    for entry in sorted(_visible(directory)):
        if entry.is_dir():
            if _holds_dicom(entry):
                studies.append(_ref(entry, root, _tree_size(entry)))
            else:
                _search(entry, root, studies, is_root=False)
        elif entry.is_file():
            if _is_zip(entry):
                studies.append(_ref(entry, root, entry.stat().st_size))
            elif is_root and _is_dicom(entry):
                studies.append(_ref(entry, root, entry.stat().st_size))


def _ref(path: Path, root: Path, size: int) -> StudyRef:
    return StudyRef(path, path.relative_to(root).as_posix(), size)


def _visible(directory: Path) -> list[Path]:
    return [entry for entry in directory.iterdir() if not entry.name.startswith(".")]


def _files(directory: Path):
    for parent, folders, names in os.walk(directory):
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in names:
            if not name.startswith("."):
                yield Path(parent, name)


def _holds_dicom(directory: Path) -> bool:
    return any(_is_dicom(path) for path in _files(directory))


def _tree_size(directory: Path) -> int:
    return sum(path.stat().st_size for path in _files(directory) if path.is_file())


def _head(path: Path, size: int) -> bytes:
    try:
        with open(path, "rb") as stream:
            return stream.read(size)
    except OSError:
        return b""


def _is_zip(path: Path) -> bool:
    return path.suffix.lower() == ".zip" or _head(path, 4) == _ZIP_MAGIC


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True
    from preprocess.dicom import looks_like_dicom  # the reader's own rule, so discovery finds what it reads

    return looks_like_dicom(_head(path, _DICOM_HEAD))
