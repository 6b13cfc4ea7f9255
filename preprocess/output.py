"""Writing a result file so that a reader or a crash never sees half of it."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def write_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, make_folder: bool = True) -> Path:
    """Call write(stream) on a temporary file beside `path`, flush it to disk, then rename it over
    `path`: the file is either the old one or the complete new one. Returns the path written.
    `make_folder` creates the folder first if it is missing; without it a missing folder is
    FileNotFoundError (a report's folder removed while it runs is not silently made again).

    The file gets the mode of the one it replaces, else what the umask allows (as `open` would):
    the temporary file alone is private, and a report left private is unreadable to the people and
    web servers it is written for."""
    target = Path(path)
    if make_folder:
        target.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = target.stat().st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~_umask()
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=target.suffix)
    try:
        with os.fdopen(handle, "wb") as stream:
            os.fchmod(stream.fileno(), mode)
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def _umask() -> int:
    """The process's umask, read without setting it (os.umask sets it, for every thread at once)."""
    try:
        found = re.search(r"^Umask:\s*([0-7]+)$", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        found = None
    return int(found.group(1), 8) if found else 0o022
