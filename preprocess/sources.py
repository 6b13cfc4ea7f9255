"""Turn what the user sent into a flat list of candidate DICOM blobs, in memory.

Paths become bytes in exactly one place (`read_study`); ZIP archives are unpacked here, member by
member, without ever touching the disk, with every size and count checked against
settings.INPUT_LIMITS before the bytes are read.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from settings import INPUT_LIMITS, InputLimits

from .errors import ArchiveError, EmptyInputError, InputTooLargeError, StudyTooLargeError, UnreadableInputError, UnsafeArchiveError

HEAD_BYTES = 132  # enough to recognise a ZIP, a DICOM file (128-byte preamble and "DICM") or a bare data set
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # local file header, or the end record of an empty archive
# the methods DICOM exports use; zipfile bounds what a read of these unpacks
_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_METHOD_NAMES = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA", 9: "Deflate64"}
_UTF8_NAME = "valid UTF-8, although the archive marks it as UTF-8 (re-create the archive)"


@dataclass(frozen=True)
class Blob:
    """One candidate file: its bytes and a PHI-free label saying where it came from."""

    data: bytes
    label: str


def read_study(path: str | os.PathLike, limits: InputLimits = INPUT_LIMITS) -> list[bytes]:
    """A folder (recursive, sorted by relative path), a ZIP file (one element) or one file -> payload.

    In a folder, only files that start like DICOM or ZIP are read (a report, a film or a 3 GB export
    beside the study costs one 132-byte read), and their total size is checked before any is read.
    A file or folder that cannot be read refuses the study, since it could hold slices; messages
    name it by its place in the folder, never by its path (paths often name the patient).
    """
    root = Path(path)
    if root.is_dir():
        files = _study_files(root, limits)
        if not files:
            raise EmptyInputError("the folder contains no DICOM or ZIP files")
        total = sum(size for _, size in files)
        if total > limits.max_uncompressed_bytes:
            limit = _amount(limits.max_uncompressed_bytes)
            raise StudyTooLargeError(f"the folder holds {_amount(total)} of DICOM, more than the limit of {limit}")
        payload, left = [], limits.max_uncompressed_bytes
        for k, (file, _) in enumerate(files, start=1):  # each read bounded too: a file may grow after its size was taken
            payload.append(_read(file, f"file {k} of the folder", left + 1))
            left -= len(payload[-1])
            if left < 0:
                raise StudyTooLargeError(f"the folder grew past the limit of {_amount(limits.max_uncompressed_bytes)} while it was read")
        return payload
    if root.is_file():
        size = root.stat().st_size
        limit = _amount(limits.max_uncompressed_bytes)
        if size > limits.max_uncompressed_bytes:
            raise StudyTooLargeError(f"the file is {_amount(size)}, more than the limit of {limit}")
        data = _read(root, "the input file", limits.max_uncompressed_bytes + 1)
        if len(data) > limits.max_uncompressed_bytes:
            raise StudyTooLargeError(f"the file grew past the limit of {limit} while it was read")
        return [data]
    raise EmptyInputError("input path does not exist or is not a file or folder")


def _amount(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _read(path: Path, label: str, size: int) -> bytes:
    """At most `size` bytes of the file."""
    try:
        with open(path, "rb") as stream:
            return stream.read(size)
    except OSError as error:
        raise UnreadableInputError(f"{label} cannot be read ({error.strerror or type(error).__name__})") from None


def _study_files(root: Path, limits: InputLimits) -> list[tuple[Path, int]]:
    """The DICOM and ZIP files below root with their sizes, sorted by relative path. Iterative (a
    deep tree cannot exhaust the stack) and bounded in depth and count; folder links are not followed."""
    from .dicom import looks_like_dicom  # dicom imports this module (Blob)

    found: list[tuple[str, Path, int]] = []
    pending = [(root, 0)]
    looked_at = 0
    while pending:
        folder, depth = pending.pop()
        if depth > limits.max_folder_depth:
            raise InputTooLargeError(f"folders nested more than {limits.max_folder_depth} levels deep")
        try:
            entries = list(os.scandir(folder))
        except OSError as error:
            where = "the study folder" if depth == 0 else f"a folder {depth} level{'s' if depth > 1 else ''} down"
            raise UnreadableInputError(f"{where} cannot be read ({error.strerror or type(error).__name__})") from None
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                pending.append((Path(entry.path), depth + 1))
            elif entry.is_file():
                looked_at += 1
                if looked_at > limits.max_folder_files:
                    raise InputTooLargeError(f"more than {limits.max_folder_files} files in the folder")
                path = Path(entry.path)
                head = _read(path, f"a file {depth} level{'s' if depth != 1 else ''} down", HEAD_BYTES)
                if is_zip(head) or looks_like_dicom(head):
                    found.append((path.relative_to(root).as_posix(), path, entry.stat().st_size))
    return [(path, size) for _, path, size in sorted(found)]


def is_zip(data: bytes) -> bool:
    """ZIP magic at the start and no DICOM "DICM" at byte 128 (a preamble may start like a ZIP)."""
    return data[:4] in _ZIP_MAGIC and data[128:132] != b"DICM"


def expand(files: Sequence[bytes], limits: InputLimits = INPUT_LIMITS) -> tuple[list[Blob], list[str]]:
    """Unpack ZIP archives (nested up to limits.max_archive_depth) into blobs; returns (blobs, warnings)."""
    if isinstance(files, (bytes, bytearray, memoryview)):
        raise TypeError("files must be a sequence of byte strings, one per file, not a single bytes object")
    blobs: list[Blob] = []
    warnings: list[str] = []
    budget = _Budget(limits.max_uncompressed_bytes, limits.max_archive_members)
    for index, element in enumerate(files, start=1):
        data = element if isinstance(element, bytes) else bytes(element)
        label = f"file {index}"
        if not data:
            warnings.append(f"{label} is empty: skipped")
        elif is_zip(data):
            blobs.extend(_unzip(data, label, 1, limits, budget, warnings))
        else:
            blobs.append(Blob(data, label))
    if not blobs:
        raise EmptyInputError("no files to read: the input is empty" + ("" if not warnings else f" ({warnings[0]})"))
    return blobs, warnings


@dataclass
class _Budget:
    """What all archives of one study may still unpack: bytes and members, nested archives included."""

    bytes_left: int
    members_left: int


def _unzip(data: bytes, label: str, depth: int, limits: InputLimits, budget: _Budget, warnings: list[str]) -> list[Blob]:
    if depth > limits.max_archive_depth:
        raise ArchiveError(f"{label}: ZIP archives nested more than {limits.max_archive_depth} levels deep")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except UnicodeDecodeError:  # zipfile decodes every name as it opens the archive
        raise ArchiveError(f"{label}: a file name in the ZIP archive is not {_UTF8_NAME}") from None
    except Exception as exc:  # BadZipFile, struct, Unicode and other errors of a damaged central directory
        raise ArchiveError(f"{label} is not a readable ZIP archive ({type(exc).__name__})") from None
    if len(members) > budget.members_left:
        raise UnsafeArchiveError(f"{label}: ZIP archives hold more than the limit of {limits.max_archive_members} members")
    budget.members_left -= len(members)
    files = [m for m in members if not m.filename.endswith("/")]  # ZipInfo.is_dir fails on an empty name
    for position, member in enumerate(files, start=1):
        _check_member(member, f"{label}, archive member {position}", limits)
    total = sum(m.file_size for m in files)
    # many small members, each within its ratio
    if total > limits.max_compression_ratio * len(data) + limits.compression_slack_bytes:
        raise UnsafeArchiveError(
            f"{label}: ZIP archive of {_amount(len(data))} unpacks to {_amount(total)}, "
            f"more than {limits.max_compression_ratio:.0f} times its size: treated as a ZIP bomb"
        )
    if total > budget.bytes_left:
        raise UnsafeArchiveError(
            f"{label}: ZIP archive unpacks to {total / 2**20:.0f} MiB, "
            f"more than the limit of {limits.max_uncompressed_bytes / 2**20:.0f} MiB"
        )
    budget.bytes_left -= total
    if not files:
        raise ArchiveError(f"{label}: the ZIP archive is empty")
    blobs: list[Blob] = []
    for position, member in enumerate(files, start=1):
        where = f"{label}, archive member {position}"
        try:
            with archive.open(member) as stream:
                content = stream.read(member.file_size + 1)
        except UnicodeDecodeError:  # the name in the member's own header
            raise ArchiveError(f"{where}: its file name is not {_UTF8_NAME}") from None
        except Exception as exc:  # zlib/bz2/lzma errors, bad CRC, unsupported methods: all a damaged member
            raise ArchiveError(f"{where}: damaged ZIP member ({type(exc).__name__})") from None
        if len(content) != member.file_size:
            raise ArchiveError(f"{where}: unpacked size differs from the size the archive declares")
        if not content:
            warnings.append(f"{where} is empty: skipped")
        elif is_zip(content):
            blobs.extend(_unzip(content, where, depth + 1, limits, budget, warnings))
        else:
            blobs.append(Blob(content, where))
    return blobs


def _check_member(member: zipfile.ZipInfo, where: str, limits: InputLimits) -> None:
    """Refuse names that escape the archive's folder and members that expand like a ZIP bomb."""
    name = member.filename.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in name.split("/"):
        raise UnsafeArchiveError(f"{where}: unsafe path in ZIP archive (absolute or containing '..'): refused")
    if member.flag_bits & 0x1:
        raise ArchiveError(f"{where}: encrypted ZIP members are not supported")
    if member.compress_type not in _METHODS:  # bzip2 and LZMA unpack a whole chunk at once, past any read bound
        method = _METHOD_NAMES.get(member.compress_type, f"method {member.compress_type}")
        raise ArchiveError(f"{where}: ZIP compression {method} is not supported (only stored and deflated)")
    if member.file_size > limits.max_uncompressed_bytes:
        raise UnsafeArchiveError(f"{where}: member declares {member.file_size / 2**20:.0f} MiB unpacked, more than the limit")
    ratio = member.file_size / max(member.compress_size, 1)
    if member.file_size > limits.max_compression_ratio * member.compress_size + limits.compression_slack_bytes:
        raise UnsafeArchiveError(
            f"{where}: compression ratio {ratio:.0f}:1 above {limits.max_compression_ratio:.0f}:1, treated as a ZIP bomb"
        )


__all__ = ["Blob", "expand", "is_zip", "read_study"]
