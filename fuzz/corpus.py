"""The seed corpus: small phantom studies in every form and encoding, and the DICOM files pydicom
and pydicom-data ship, each as one fuzz input (`target.encode`). Generated, not committed."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from preprocess import phantom

from .target import encode

MAX_SEED_BYTES = 64 * 1024  # the default -max_len: larger packaged files are left out
_TINY = dict(slices=16, rows=8, columns=8, pixel_spacing=20.0, slice_spacing=20.0)


def packaged_files() -> list[Path]:
    """Every file under pydicom's test_files and pydicom-data's data folder (on disk, never fetched)."""
    import data_store  # pydicom-data
    import pydicom.data

    folders = (Path(pydicom.data.__file__).parent / "test_files", Path(data_store.__file__).parent / "data")
    return [path for folder in folders for path in sorted(folder.rglob("*")) if path.is_file()]


def seeds() -> Iterator[bytes]:
    """Whole tiny studies (16 slices of 8x8), and single slices and pairs for runs with a small -max_len."""
    for syntax in ("explicit", "implicit", "rle"):
        series = phantom.study_files("series", transfer_syntax=syntax, **_TINY)
        yield encode("payload", series)
        yield encode("folder", series[:4])
        yield encode("file", series[:1])
        yield encode("payload", series[:2])
    bare = phantom.study_files("series", file_header=False, **_TINY)
    yield encode("payload", bare)
    yield encode("file", bare[:1])
    jpeg2000 = phantom.study_files("series", transfer_syntax="jpeg2000", **{**_TINY, "rows": 32, "columns": 32})
    yield encode("payload", jpeg2000)
    yield encode("file", jpeg2000[:1])
    yield encode("file", phantom.study_files("zip", extras=True, **_TINY))
    yield encode("file", phantom.study_files("zip", **{**_TINY, "slices": 2}))
    yield encode("file", phantom.study_files("multiframe", **_TINY))
    for path in packaged_files():
        data = path.read_bytes()
        if len(data) < MAX_SEED_BYTES:
            yield encode("file", [data])


def write(folder: Path, max_len: int = MAX_SEED_BYTES) -> int:
    """Write the seeds of at most max_len bytes into folder (named by content, as libFuzzer names its
    finds); returns how many."""
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for seed in seeds():
        if len(seed) <= max_len:
            (folder / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
            count += 1
    return count
