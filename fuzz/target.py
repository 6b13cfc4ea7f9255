"""One fuzz input -> one study read by preprocess, the way a user sends it.

Input layout: the first byte chooses the form (mod 3), the rest is split at `SEPARATOR`:
0 = one file (a DICOM file, a ZIP, anything), 1 = several files sent as a payload (as the server
and `preprocess_study` receive them), 2 = the same files written into a folder and read with
`read_study`. The seed corpus (`fuzz.corpus`) uses the same layout.

Three depths: "study" runs `preprocess_study` at S=16 (unpack, headers, series choice, decoding,
resampling); "read" stops after decoding the chosen series' pixels (no resampling); "header"
unpacks, reads every header (`expand` + `parse`) and decodes every grey-level frame of at most
`HEADER_DEPTH_VOXELS` voxels per file whatever the series (single files reach the decoders without
16 slices), the cheapest, for long runs.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

import preprocess
from preprocess.dicom import Frame, check_decodable, decode_into, parse, volume_dtype
from preprocess.errors import StudyError
from preprocess.pipeline import stored_values
from preprocess.series import select_series
from preprocess.sources import Blob, expand

SEPARATOR = b"\xf7FUZZ-FILE\xf7"
FORMS = ("file", "payload", "folder")
DEPTHS = ("study", "read", "header")
SIZE = 16
HEADER_DEPTH_VOXELS = 2**18  # the header depth decodes files up to this size (the pipeline checks its limits first)


def encode(form: str, files: list[bytes]) -> bytes:
    """The fuzz input for a study in a form (the inverse of `split`)."""
    return bytes([FORMS.index(form)]) + SEPARATOR.join(files)


def split(data: bytes) -> tuple[str, list[bytes]]:
    if not data:
        return "payload", []
    form = FORMS[data[0] % len(FORMS)]
    body = data[1:]
    return form, [body] if form == "file" else body.split(SEPARATOR)


def _decode_each_file(frames: list[Frame], blobs: list[Blob]) -> None:
    """Decode the frames of each file as the pipeline does once a series passed its size checks."""
    by_blob: dict[int, list[Frame]] = {}
    for frame in frames:
        by_blob.setdefault(frame.blob, []).append(frame)
    for group in by_blob.values():
        first = group[0]
        if first.pixels.frames * first.rows * first.columns > HEADER_DEPTH_VOXELS or first.rows * first.columns == 0:
            continue
        check_decodable(first)
        decode_into(np.empty((len(group), first.rows, first.columns), volume_dtype(group)), group, blobs, threads=1)


class Target:
    """Calls one fuzz input; raises whatever preprocess raises that is not a StudyError."""

    def __init__(self, depth: str = "study"):
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {DEPTHS}, not {depth!r}")
        self.depth = depth

    def __call__(self, data: bytes) -> None:
        with warnings.catch_warnings(), np.errstate(all="warn"):
            warnings.simplefilter("ignore")  # pydicom warns about every oddity it reads past
            warnings.simplefilter("error", RuntimeWarning)  # numpy overflow / invalid value: a bug
            self._read(data)

    def _read(self, data: bytes) -> None:
        form, files = split(data)
        try:
            if form == "folder":
                files = self._through_folder(files)
            if self.depth == "study":
                preprocess.preprocess_study(files, size=SIZE, threads=1)
            else:
                blobs, _ = expand(files)
                frames, _ = parse(blobs)
                if self.depth == "read":
                    stack, _ = select_series(frames)
                    stored_values(stack, blobs, in_place=False, threads=1)
                else:
                    _decode_each_file(frames, blobs)
        except StudyError:
            pass

    def _through_folder(self, files: list[bytes]) -> list[bytes]:
        """Each input's folder is removed once read: libFuzzer ends a run without returning to Python."""
        folder = Path(tempfile.mkdtemp(prefix="fuzz-study-"))
        try:
            for k, content in enumerate(files):
                (folder / f"{k:03d}.dcm").write_bytes(content)
            return preprocess.read_study(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
