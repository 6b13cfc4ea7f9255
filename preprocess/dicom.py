"""DICOM objects -> per-slice records (headers only) and pixel decoding into one preallocated array.

Headers are parsed with pydicom up to the pixel data (`stop_before_pixels`), so selecting a series
never touches pixels. Native (uncompressed) little-endian pixels are then copied straight from the
input bytes into the volume with numpy (no per-file pixel copy). Compressed lossless frames (JPEG
2000 and HTJ2K lossless, JPEG-LS lossless, JPEG lossless process 14, RLE) are decoded by imagecodecs,
whose codecs release the GIL, on every worker thread, with pydicom's pixel fix-ups reproduced (see
`_FastObject`); everything else compressed, and anything those fix-ups do not cover exactly, goes
through pydicom's pixel handlers, backed by the pinned pylibjpeg plugins (libjpeg, openjpeg, rle)
that support numpy 1.26 (they hold the GIL). `DECODER` selects the path.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import itertools
import math
import struct
import warnings
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pydicom
import pydicom.charset
import pydicom.config
import pydicom.encaps
from pydicom.datadict import tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _dictionary_vr_fast as _dictionary_vr  # the VR pydicom reads implicit elements with
from pydicom.filereader import _read_file_meta_info  # where pydicom's data set starts
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import _get_jpg_parameters, get_j2k_parameters  # what pydicom's fix-ups read from a frame
from pydicom.uid import UID

from settings import INPUT_LIMITS

from .errors import CorruptDicomError, DecodeError, InputTooLargeError, StudyError, UnsupportedPixelDataError, shown
from .sources import Blob

try:  # GIL-free decoders; wheels for Python >= 3.11 only (pyproject.toml): without it pydicom decodes
    import imagecodecs
except ImportError:  # pragma: no cover - Python 3.10 (the NGC stub)
    imagecodecs = None

DECODERS = ("imagecodecs", "pydicom")
# Where compressed frames go first. "imagecodecs": the lossless syntaxes it decodes exactly as pydicom
# would are decoded on every worker thread (its codecs release the GIL); any other syntax, and any
# object whose frames need a fix-up not reproduced here, still goes to pydicom. "pydicom": every
# compressed object through pydicom + pylibjpeg (its plugins hold the GIL, so its threads take turns).
# The default is "imagecodecs" where it is installed. Module level so that a process can choose;
# `python -m benchmarks.decoding` sets "pydicom" to time that path against imagecodecs.
DECODER = "imagecodecs" if imagecodecs is not None else "pydicom"

# pydicom's value checks and its other warnings (an unknown character set, ...) quote the value they
# are about, and a misfiled header can hold a patient's name: none of it reaches this process's log
# (stderr, the logger). This package checks the values it uses itself, in its own messages.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
pydicom.config.logger.disabled = True
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")

_PIXEL_DATA = (0x7FE0, 0x0010)
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UN", b"UT", b"UC", b"UR", b"SV", b"UV"}
_VRS = _LONG_VRS | {
    b"AE",
    b"AS",
    b"AT",
    b"CS",
    b"DA",
    b"DS",
    b"DT",
    b"FL",
    b"FD",
    b"IS",
    b"LO",
    b"LT",
    b"PN",
    b"SH",
    b"SL",
    b"SS",
    b"ST",
    b"TM",
    b"UI",
    b"UL",
    b"US",
}
_SHORT_VRS = _VRS - _LONG_VRS
_UNDEFINED = 0xFFFFFFFF


@dataclass(frozen=True)
class PixelFormat:
    """How one object's pixels are stored; shared by all frames of that object."""

    transfer_syntax: str
    bits_allocated: int
    bits_stored: int
    signed: bool
    samples_per_pixel: int
    photometric: str
    frames: int
    offset: int | None  # first native pixel byte in the blob; None when encapsulated or absent
    length: int  # declared length of the native pixel value
    present: bool
    value_at: int | None = None  # first byte of the pixel data value, native or encapsulated; None if absent or deflated
    vr: str | None = None  # the pixel data's VR as written (explicit VR); big-endian OW is byte-swapped by 16-bit words

    @property
    def native_fast(self) -> bool:
        """Whether the pixels can be copied straight from the bytes (the common CT case)."""
        return (
            self.offset is not None
            and self.transfer_syntax in (pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian)
            and self.bits_allocated == 16
            and self.samples_per_pixel == 1
        )


@dataclass(frozen=True)
class Frame:
    """One 2D image (a single-frame file, or one frame of a multi-frame object), header only."""

    blob: int
    frame: int  # 0-based index in its object
    label: str
    study_uid: str
    series_uid: str
    sop_uid: str
    modality: str
    image_type: tuple[str, ...]
    rows: int
    columns: int
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns) in mm
    slope: float
    intercept: float
    rescaled: bool  # RescaleIntercept was given: without it stored values are not known to be HU
    rescale_type: str  # RescaleType as written, "" when absent (CT images must give it when the values are not HU)
    pixels: PixelFormat
    patient: str = field(repr=False)  # a digest of PatientID ("" if none): tells patients apart without holding the ID
    conflicting_copy: bool = False  # another file has this SOP instance, frame and position, with other pixel data


def parse(blobs: Sequence[Blob]) -> tuple[list[Frame], list[str]]:
    """Every image frame found in the blobs, plus warnings for what was skipped (non-DICOM, DICOMDIR...)."""
    frames: list[Frame] = []
    warnings: list[str] = []
    raw = 0  # files without preamble and file meta, read as bare data sets
    for index, blob in enumerate(blobs):
        read = _read_header(blob)
        if read is None:
            warnings.append(f"{blob.label} is not a DICOM file: skipped")
            continue
        header, ts, at, implicit = read
        raw += header.bare
        try:
            pixels = _pixel_format(header, ts, blob.data, at, implicit)
            _check_nothing_read_after_pixels(pixels, blob)
            if header.ushort("Rows", 0) == 0 and not pixels.present:
                keyword = "SOPClassUID" if header.text("SOPClassUID") else "MediaStorageSOPClassUID"
                kind = _uid_name(header.text(keyword), keyword) if header.text(keyword) else "unknown object"
                if "Image Storage" in kind:  # an image object cut short before its image attributes
                    raise CorruptDicomError(f"{blob.label} is a truncated or damaged DICOM image ({kind} without image data)")
                warnings.append(f"{blob.label} is a DICOM object without an image ({kind}): skipped")
                continue
            _check_frame_count(pixels, blob, len(frames))
            _check_pixel_length(header, pixels, blob)
            frames.extend(_frames(header, index, blob.label, pixels))
        except StudyError:
            raise
        except _Malformed as exc:
            raise CorruptDicomError(f"{blob.label}: {exc.keyword} has a malformed value") from None
        except Exception as exc:
            raise CorruptDicomError(f"{blob.label}: DICOM header has invalid or missing values ({type(exc).__name__})") from None
    if raw:
        warnings.append(f"{raw} files have no DICOM file header (preamble and file meta): read as bare little-endian data sets")
    return _mark_conflicting_copies(frames, blobs), warnings


def _check_frame_count(pixels: PixelFormat, blob: Blob, before: int) -> None:
    """The file's frames, and the study's with the `before` found in earlier files, within
    INPUT_LIMITS: checked before one record per declared frame is made."""
    if pixels.frames > INPUT_LIMITS.max_slices:
        raise InputTooLargeError(f"{blob.label}: {pixels.frames} frames, more than the limit of {INPUT_LIMITS.max_slices}")
    if before + pixels.frames > INPUT_LIMITS.max_study_frames:
        limit = INPUT_LIMITS.max_study_frames
        raise InputTooLargeError(f"{blob.label}: the study's files hold more than the limit of {limit} frames in all")


def _check_pixel_length(header: _Header, pixels: PixelFormat, blob: Blob) -> None:
    """Native pixel data a row or more longer than Rows x Columns x frames says, and not zeros: the
    header does not describe the pixels (a wrong Rows keeps part of each image, a wrong Columns
    scrambles them), where pydicom would cut the excess off in silence. Zeros, or less than a row,
    are padding (pydicom's own test data has a row of zeros), and read as pydicom reads them.
    Multi-frame pixel data a whole frame or more short of its frames is refused here, before a
    record of each declared frame is made."""
    if pixels.offset is None or pixels.bits_allocated % 8:
        return
    row = header.ushort("Columns", 0) * pixels.samples_per_pixel * pixels.bits_allocated // 8
    expected = header.ushort("Rows", 0) * row * pixels.frames
    held = min(pixels.length, len(blob.data) - pixels.offset)
    if pixels.frames > 1 and expected - held >= expected // pixels.frames > 0:
        raise CorruptDicomError(
            f"{blob.label}: pixel data holds {held} bytes where its header describes {expected} "
            f"({pixels.frames} x {header.ushort('Rows', 0)} x {header.ushort('Columns', 0)}): truncated, or "
            "NumberOfFrames is wrong"
        )
    excess = blob.data[pixels.offset + expected : pixels.offset + pixels.length]
    if row and len(excess) >= row and excess.count(0) != len(excess):
        raise CorruptDicomError(
            f"{blob.label}: pixel data holds {pixels.length} bytes where its header describes {expected} "
            f"({pixels.frames} x {header.ushort('Rows', 0)} x {header.ushort('Columns', 0)}): Rows, Columns or "
            "NumberOfFrames is wrong"
        )


def _mark_conflicting_copies(frames: list[Frame], blobs: Sequence[Blob]) -> list[Frame]:
    """Copies of one image (its SOP instance, frame and position) are read once; copies whose pixel
    data differ are marked, so that their series is refused rather than read from whichever came first."""
    first: dict[tuple, Frame] = {}
    differ: dict[tuple[int, int], bool] = {}  # per pair of objects: a multi-frame copy is compared once, not per frame
    for k, frame in enumerate(frames):
        other = first.setdefault((frame.series_uid, frame.sop_uid, frame.frame, frame.position), frame)
        if other is frame:
            continue
        pair = (other.blob, frame.blob)
        if pair not in differ:
            differ[pair] = _pixel_bytes(other, blobs) != _pixel_bytes(frame, blobs)
        if differ[pair]:
            frames[k] = dataclasses.replace(frame, conflicting_copy=True)
    return frames


def _pixel_bytes(frame: Frame, blobs: Sequence[Blob]) -> memoryview | None:
    """The pixel data value as stored (None where it is not in place: a deflated data set)."""
    p = frame.pixels
    if p.value_at is None:
        return None
    data = memoryview(blobs[frame.blob].data)
    return data[p.value_at : p.value_at + p.length] if p.offset is not None else data[p.value_at :]


def looks_like_dicom(head: bytes) -> bool:
    """Whether a file starting with `head` (its first 132 bytes or more) is DICOM: a Part-10 file
    (128-byte preamble + "DICM"), or a bare data set as older archives and some exports hold."""
    return head[128:132] == b"DICM" or _bare_syntax(head) is not None


def _bare_syntax(data: bytes) -> UID | None:
    """The transfer syntax of a bare data set (no preamble, no file meta), or None if `data` does not
    start like one: its first element must be one of the low elements of the identification group
    (0008,00xx), which every image data set starts with, encoded in explicit or implicit VR little endian."""
    if len(data) < 8:
        return None
    group, element, vr, _ = _SHORT.unpack_from(data, 0)
    if group != 0x0008 or element > 0x0020:
        return None
    if vr in _VRS:
        return pydicom.uid.ExplicitVRLittleEndian
    return pydicom.uid.ImplicitVRLittleEndian if _LENGTH32.unpack_from(data, 4)[0] < 1024 else None


def _read_header(blob: Blob) -> tuple[_Header, UID, int | None, bool] | None:
    """(header, transfer syntax, offset of the pixel data element or end of file, implicit VR); None
    if not DICOM. The offset is None when pydicom inflated a deflated data set (pixels not in place).

    The common case (Part-10 file, little-endian transfer syntax, no functional groups) is read by
    `_scan`, several times faster than pydicom; everything else by pydicom up to the pixel data. The
    encoding is the one the data set was read with, not the declared one: writers declare explicit VR
    for implicit data sets and the other way round, and pydicom reads what it finds (its
    `original_encoding` reports the declared one).
    """
    try:
        scanned = _scan(blob.data)
    except _TooDeep:
        raise CorruptDicomError(f"{blob.label}: DICOM sequences nested more than {INPUT_LIMITS.max_sequence_depth} levels deep") from None
    if scanned is not None:
        values, ts, at, implicit = scanned
        return _RawHeader(values), ts, at, implicit
    bare = blob.data[128:132] != b"DICM" and _bare_syntax(blob.data)
    if blob.data[128:132] != b"DICM" and not bare:
        return None
    start, deflated = (0, False) if bare else _data_set_start(blob)
    if not deflated:  # a deflated data set's items are counted as it is inflated
        _check_items(blob, sum(map(blob.data.count, _ITEM_TAGS)))
    stream = io.BytesIO(blob.data if deflated else _with_known_character_set(blob.data, start))
    try:
        ds = pydicom.dcmread(stream, stop_before_pixels=not deflated, force=bool(bare))
        _check_depth(ds, blob)
    except StudyError:
        raise
    except InvalidDicomError:
        return None
    except RecursionError:
        raise CorruptDicomError(f"{blob.label}: DICOM sequences nested too deeply to read") from None
    except Exception as exc:  # pydicom raises many types on damaged headers
        if not bare:
            raise CorruptDicomError(f"{blob.label} is a damaged or truncated DICOM file ({type(exc).__name__})") from None
        return None
    implicit, little = ds.original_encoding
    if start is not None and not deflated:
        implicit = _reads_implicit(blob.data, start, implicit)
    at = None if deflated else stream.tell()
    if bare:
        if "SOPClassUID" not in ds and "Modality" not in ds:
            return None  # bytes that merely start like a data set
        return _DatasetHeader(ds, little, bare=True), bare, at, implicit
    syntax = ds.file_meta.get("TransferSyntaxUID", pydicom.uid.ImplicitVRLittleEndian)
    if not isinstance(syntax, (str, bytes)):  # e.g. read as a sequence: its text form fails in pydicom
        raise CorruptDicomError(f"{blob.label}: TransferSyntaxUID has a malformed value")
    ts = _as_uid(syntax.decode("latin-1") if isinstance(syntax, bytes) else str(syntax))
    return _DatasetHeader(ds, little), ts, at, implicit


# an item tag, little and big endian: every item pydicom reads starts with one (so do the fragments
# of encapsulated pixel data, and pixel bytes may match: the count bounds the items from above)
_ITEM_TAGS = (b"\xfe\xff\x00\xe0", b"\xff\xfe\xe0\x00")


def _check_items(blob: Blob, items: int) -> None:
    """Refuse a file pydicom would read with more sequence items than INPUT_LIMITS allows, before it does."""
    if items > INPUT_LIMITS.max_sequence_items:
        raise InputTooLargeError(f"{blob.label}: more than the limit of {INPUT_LIMITS.max_sequence_items} DICOM sequence items")


def _check_depth(ds: pydicom.Dataset, blob: Blob) -> None:
    """Sequences nested more than INPUT_LIMITS.max_sequence_depth deep in a data set pydicom read (it
    parses sequences as it reads; other values stay raw and are not converted here)."""
    pending = [(ds, 0)]
    while pending:
        dataset, depth = pending.pop()
        for element in dataset._dict.values():
            if isinstance(element, pydicom.DataElement) and element.VR == "SQ":
                if depth == INPUT_LIMITS.max_sequence_depth:
                    raise CorruptDicomError(f"{blob.label}: DICOM sequences nested more than {INPUT_LIMITS.max_sequence_depth} levels deep")
                pending.extend((item, depth + 1) for item in element.value)


def _with_known_character_set(data: bytes, start: int | None) -> bytes:
    """The file with the value of its top-level SpecificCharacterSet blanked (same length) unless
    pydicom knows every term of it: pydicom stops at a value it cannot look up, or warns and logs
    it (misfiled text, a patient's name, quoted in the server log). This package never uses it
    (text is read as bytes). Data sets are sorted by tag, so it is among the first few elements or
    absent: only those are walked (never a search through the file, which could match pixel bytes)."""
    at = start or 0
    for _ in range(_CHARSET_SEARCH_ELEMENTS):
        if at + 8 > len(data):
            return data
        group, element, vr, short_length = _SHORT.unpack_from(data, at)
        if (group, element) > _SPECIFIC_CHARACTER_SET:
            return data
        if vr in _LONG_VRS:
            length, value_at = (_LENGTH32.unpack_from(data, at + 8)[0] if at + 12 <= len(data) else 0), at + 12
        elif vr in _SHORT_VRS:
            length, value_at = short_length, at + 8
        else:  # implicit VR
            length, value_at = _LENGTH32.unpack_from(data, at + 4)[0], at + 8
        if (group, element) == _SPECIFIC_CHARACTER_SET:
            break
        at = value_at + length
    else:
        return data
    length = min(length, max(len(data) - value_at, 0))
    value = data[value_at : value_at + length].decode("latin-1")
    if all(term.strip(" \0") in pydicom.charset.python_encoding for term in value.split("\\")):
        return data
    return data[:value_at] + b" " * length + data[value_at + length :]


def _data_set_start(blob: Blob) -> tuple[int | None, bool]:
    """Where pydicom starts reading the data set (None if it cannot read the file meta; it then
    reports the file) and whether the data set is deflated. A deflated one is refused unless it
    inflates within INPUT_LIMITS' compression ratio, before pydicom inflates it in one piece."""
    stream = io.BytesIO(blob.data)
    stream.seek(132)
    try:
        deflated = _read_file_meta_info(stream).get("TransferSyntaxUID") == pydicom.uid.DeflatedExplicitVRLittleEndian
    except Exception:
        return None, False
    start = stream.tell()
    if not deflated:
        return start, False
    compressed = blob.data[start:]
    limits = INPUT_LIMITS
    bound = min(limits.max_uncompressed_bytes, int(limits.max_compression_ratio * len(compressed)) + limits.compression_slack_bytes)
    inflater, inflated, pending = zlib.decompressobj(-zlib.MAX_WBITS), 0, compressed
    items, tail = 0, b""
    try:
        while inflated <= bound:  # counted 1 MiB at a time, never held
            piece = inflater.decompress(pending, 2**20)
            inflated, pending = inflated + len(piece), inflater.unconsumed_tail
            items += (tail + piece).count(_ITEM_TAGS[0])  # explicit VR little endian
            tail = piece[-3:]
            # done: the stream ended (bytes after its end stay in unconsumed_tail once a call was cut at
            # the 1 MiB: looping on them never ends), or nothing more comes out, or everything is out
            if inflater.eof or not piece or (not pending and len(piece) < 2**20):
                break
    except zlib.error:
        return start, True  # pydicom reports it
    if inflated > bound:
        raise InputTooLargeError(f"{blob.label}: the deflated data set inflates to more than {bound / 2**20:.0f} MiB, treated as a bomb")
    _check_items(blob, items)
    return start, True


def _reads_implicit(data: bytes, start: int, declared: bool) -> bool:
    """Whether pydicom reads the data set at `start` in implicit VR: it goes by the VR bytes of the
    first element (after any command set group, which it reads as implicit), not the declared syntax."""
    pos = start
    while data[pos : pos + 2] == b"\0\0" and pos + 8 <= len(data):
        pos += 8 + _LENGTH32.unpack_from(data, pos + 4)[0]
    vr = data[pos + 4 : pos + 6]
    return declared if len(vr) < 2 else not _looks_explicit(vr)


_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_FUNCTIONAL_GROUPS = {0x52009229, 0x52009230}  # shared and per-frame: left to pydicom
_PIXEL_TAGS = {0x7FE00008, 0x7FE00009}  # float pixel data: left to pydicom (then refused)
_LEFT_TO_PYDICOM = _FUNCTIONAL_GROUPS | _PIXEL_TAGS
_WANTED = {
    tag_for_keyword(k)
    for k in (
        "SOPClassUID",
        "SOPInstanceUID",
        "PatientID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "ImageType",
        "Rows",
        "Columns",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "RescaleSlope",
        "RescaleIntercept",
        "RescaleType",
        "BitsAllocated",
        "BitsStored",
        "PixelRepresentation",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "NumberOfFrames",
    )
}


_SHORT = struct.Struct("<HH2sH")  # group, element, VR, 2-byte length (explicit VR)
_IMPLICIT = struct.Struct("<HHI")  # group, element, 4-byte length (implicit VR, items and delimiters)
_LENGTH32 = struct.Struct("<I")
_SPECIFIC_CHARACTER_SET = (0x0008, 0x0005)
_CHARSET_SEARCH_ELEMENTS = 6  # at most (0008,0000) to (0008,0004) precede it


class _TooDeep(Exception):
    """Sequences nested beyond INPUT_LIMITS.max_sequence_depth (pydicom reads them recursively)."""


def _looks_explicit(vr: bytes) -> bool:
    """pydicom's test of the first element of a data set or item: two upper-case letters are a VR."""
    return len(vr) == 2 and 0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B


def _scan(data: bytes) -> tuple[dict[int, bytes], UID, int, bool] | None:
    """The wanted top-level values of a little-endian Part-10 file, the transfer syntax, the offset of
    the pixel data element (or end of file) and whether the data set is implicit VR.

    None whenever pydicom might read the bytes differently (then pydicom reads the file): another
    encoding than declared, an element pydicom would read in the other VR, a value or item that
    overruns its container, a stray delimiter. Raises _TooDeep for sequences nested too deeply.
    """
    size = len(data)
    if size < 144 or data[128:132] != b"DICM":
        return None
    values: dict[int, bytes] = {}
    pos, implicit, in_meta = 132, False, True
    try:
        while pos + 8 <= size:
            group, element, vr, length = _SHORT.unpack_from(data, pos)  # the hot loop of a study
            if in_meta and group != 0x0002:  # end of the file meta group: the data set's encoding
                known, little, implicit, deflated = _encoding(_transfer_syntax(values))
                if not known or not little or deflated or group == 0x0000:  # group 0000: pydicom reads it implicit
                    return None  # big endian, deflated, unknown or a command set: pydicom
                if _looks_explicit(vr) == implicit:
                    return None  # the data set is not encoded as declared: pydicom finds out how
                in_meta = False
            if group == 0xFFFE:  # items and delimiters never stand at the top level
                return None
            tag = group << 16 | element
            if implicit:
                length, start = _LENGTH32.unpack_from(data, pos + 4)[0], pos + 8
            elif vr in _SHORT_VRS:  # the most common case first: one set lookup per element
                start = pos + 8
            elif vr in _LONG_VRS:
                length, start = _LENGTH32.unpack_from(data, pos + 8)[0], pos + 12
            else:  # not a VR: pydicom may read this element (or, if first, the whole data set) as implicit VR
                return None
            if tag == 0x7FE00010:
                break
            if tag in _LEFT_TO_PYDICOM:
                return None
            if length == _UNDEFINED:
                if in_meta or not _is_sequence(data, tag, vr, start, implicit):
                    return None  # an undefined-length value that is not a sequence: pydicom searches its end
                pos = _skip_sequence(data, start, implicit)
                if pos is None:
                    return None
                continue
            if start + length > size:
                return None  # truncated: pydicom reports it
            if tag in _WANTED or in_meta:
                values[tag] = data[start : start + length]
            pos = start + length
    except struct.error:
        return None
    return None if in_meta else (values, _transfer_syntax(values), pos, implicit)


def _is_sequence(data: bytes, tag: int, vr: bytes, start: int, implicit: bool) -> bool:
    """Whether pydicom reads an undefined-length element as a sequence: SQ or UN in explicit VR; in
    implicit VR, SQ in the dictionary, or an unknown tag whose value starts with an item."""
    if not implicit:
        return vr in (b"SQ", b"UN")
    try:
        return _dictionary_vr(tag) == "SQ"
    except KeyError:
        return data[start : start + 4] == b"\xfe\xff\x00\xe0"


def _skip_sequence(data: bytes, pos: int, implicit: bool) -> int | None:
    """Position just after the undefined-length sequence whose first item starts at pos, walked as
    pydicom reads it (iteratively: nesting is bounded, not the stack); None where pydicom would
    read it differently. Defined-length sequences inside are skipped whole, as pydicom does."""
    size = len(data)
    limit = INPUT_LIMITS.max_sequence_depth
    # open containers, innermost last: (is a sequence, item end or None if undefined, implicit VR)
    stack: list[tuple[bool, int | None, bool]] = [(True, None, implicit)]
    sequences = 1
    while stack:
        if pos + 8 > size:
            return None
        is_sequence, end, implicit = stack[-1]
        if is_sequence:
            group, element, length = _IMPLICIT.unpack_from(data, pos)
            tag, pos = group << 16 | element, pos + 8
            if tag == _SEQUENCE_END:
                stack.pop()
                sequences -= 1
                continue
            if tag != _ITEM:
                return None  # pydicom reads any tag here as an item
            item_implicit = implicit or not _looks_explicit(data[pos + 4 : pos + 6])  # pydicom decides per item
            end = None if length == _UNDEFINED else pos + length
            if end is not None and end > size:
                return None
            stack.append((False, end, item_implicit))
            continue
        if end is not None and pos >= end:
            if pos != end:
                return None  # an element overruns its item: pydicom reads on from where it ended
            stack.pop()
            continue
        group, element, vr, length = _SHORT.unpack_from(data, pos)
        tag = group << 16 | element
        if tag == _ITEM_END:
            if end is not None or (not implicit and vr in _LONG_VRS):
                return None  # pydicom ends a defined-length item here, or reads 4 more length bytes
            pos += 8
            stack.pop()
            continue
        if group == 0xFFFE:
            return None
        if implicit:
            length, start, vr = _LENGTH32.unpack_from(data, pos + 4)[0], pos + 8, b""
        elif vr in _SHORT_VRS:
            start = pos + 8
        elif vr in _LONG_VRS:
            length, start = _LENGTH32.unpack_from(data, pos + 8)[0], pos + 12
        else:
            return None
        if length == _UNDEFINED:
            if not _is_sequence(data, tag, vr, start, implicit):
                return None
            sequences += 1
            if sequences > limit:
                raise _TooDeep
            stack.append((True, None, implicit))
            pos = start
            continue
        if start + length > size:
            return None
        pos = start + length
    return pos


def _transfer_syntax(values: dict[int, bytes]) -> UID:
    return _uid(values.get(0x00020010, b""))


@functools.lru_cache(maxsize=256)
def _encoding(ts: UID) -> tuple[bool, bool, bool, bool]:
    """(known transfer syntax, little endian, implicit VR, deflated), computed once per syntax."""
    if not ts.is_transfer_syntax:
        return False, False, False, False
    return True, ts.is_little_endian, ts.is_implicit_VR, ts.is_deflated


_tag = functools.lru_cache(maxsize=None)(tag_for_keyword)  # a few dozen keywords, looked up per slice


@functools.lru_cache(maxsize=256)
def _uid(raw: bytes) -> UID:
    """A UID value decoded once per distinct value."""
    return _as_uid(raw.decode("ascii", "replace").strip(" \0"))


def _as_uid(text: str) -> UID:
    """A UID object without pydicom's validation: its warning and log line quote the value, and a
    misfiled UID can hold a patient's name."""
    return UID(text, validation_mode=pydicom.config.IGNORE)


def _uid_name(text: str, keyword: str) -> str:
    """A UID as a message names it: its name where pydicom's dictionary knows it, else as `shown` allows."""
    name = _as_uid(text).name
    return name if name != text else shown(text, "UI", keyword)


def _pixel_format(header: _Header, ts: UID, data: bytes, at: int | None, implicit: bool) -> PixelFormat:
    """How the pixels are stored. The pixel data element's header is read as pydicom reads it: in the
    encoding the data set was read with, and in explicit VR as implicit when its VR is not letters."""
    offset, length, present, value_at, pixel_vr = None, 0, False, None, None
    if at is None:  # a deflated data set read whole by pydicom: never in place
        present = header.raw("PixelData") is not None
    elif at + 8 <= len(data):
        order = "<" if header.little else ">"
        group, element, vr = struct.unpack_from(order + "HH2s", data, at)
        if (group, element) == _PIXEL_DATA:
            present = True
            if implicit or not b"AA" <= vr <= b"ZZ":
                (length,), start = struct.unpack_from(order + "I", data, at + 4), at + 8
            elif vr in _LONG_VRS:
                if at + 12 > len(data):
                    raise _Malformed("PixelData")  # its header cut short
                (length,), start = struct.unpack_from(order + "I", data, at + 8), at + 12
                pixel_vr = vr.decode("ascii")
            else:
                (length,), start = struct.unpack_from(order + "H", data, at + 6), at + 8
            value_at = start
            if length != _UNDEFINED:
                offset = start
    bits_allocated = header.ushort("BitsAllocated", 16)
    frames = header.number("NumberOfFrames", 1)
    if not math.isfinite(frames) or frames < 0:
        raise _Malformed("NumberOfFrames")
    return PixelFormat(
        transfer_syntax=str(ts),
        bits_allocated=bits_allocated,
        bits_stored=header.ushort("BitsStored", bits_allocated),
        signed=header.ushort("PixelRepresentation", 0) == 1,
        samples_per_pixel=header.ushort("SamplesPerPixel", 1),
        photometric=header.text("PhotometricInterpretation", "MONOCHROME2"),
        frames=int(frames) or 1,
        offset=offset,
        length=length,
        present=present,
        value_at=value_at,
        vr=pixel_vr,
    )


class _Malformed(Exception):
    """A value this package needs cannot be read; `parse` names the attribute, never the value."""

    def __init__(self, keyword: str):
        super().__init__(keyword)
        self.keyword = keyword


class _Header:
    """The few attributes this package needs, decoded from raw element bytes.

    pydicom converts values lazily but slowly (validation, DS objects): decoding the raw bytes of
    ~20 known attributes ourselves is several times faster on 300-file series.
    """

    little = True
    bare = False  # read without preamble and file meta

    def raw(self, keyword: str):
        raise NotImplementedError

    def texts(self, keyword: str) -> list[str] | None:
        value = self.raw(keyword)
        if value is None:
            return None
        if isinstance(value, bytes):
            parts = [p.strip(" \0") for p in value.decode("latin-1").split("\\")]
        elif isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            parts = [str(v).strip() for v in value]
        else:
            parts = [str(value).strip()]
        return None if not parts or parts == [""] else parts

    def text(self, keyword: str, default: str = "") -> str:
        parts = self.texts(keyword)
        return "\\".join(parts) if parts else default

    def floats(self, keyword: str, n: int) -> tuple[float, ...] | None:
        parts = self.texts(keyword)
        if parts is None:
            return None
        values = tuple(_number(v) for v in parts)
        return values if len(values) == n else None

    def number(self, keyword: str, default: float | None = None) -> float | None:
        parts = self.texts(keyword)
        return _number(parts[0]) if parts else default

    def ushort(self, keyword: str, default: int) -> int:
        value = self.raw(keyword)
        if value is None or value == b"":
            return default
        if isinstance(value, bytes) and len(value) == 2:
            return struct.unpack("<H" if self.little else ">H", value)[0]
        if isinstance(value, int):  # converted by pydicom
            return value
        raise _Malformed(keyword)  # not one 16-bit value

    def item(self, sequence: str) -> _Header | None:
        return None

    def items(self, sequence: str) -> list[_Header] | None:
        return None


class _RawHeader(_Header):
    """Values found by `_scan`: top-level elements only (files with functional groups go to pydicom)."""

    def __init__(self, values: dict[int, bytes]):
        self.values = values

    def raw(self, keyword: str):
        return self.values.get(_tag(keyword))


class _DatasetHeader(_Header):
    """A pydicom dataset read up to the pixel data; reads raw element values where still unconverted."""

    def __init__(self, ds: pydicom.Dataset, little_endian: bool, bare: bool = False):
        self.ds = ds
        self.little = little_endian
        self.bare = bare

    def raw(self, keyword: str):
        tag = _tag(keyword)
        if tag >> 16 == 0x0002:
            elem = self.ds.file_meta.get_item(tag) if hasattr(self.ds, "file_meta") else None
        else:
            elem = self.ds.get_item(tag)
        return None if elem is None else elem.value

    def item(self, sequence: str) -> _Header | None:
        """First item of a sequence (functional groups hold one item per macro)."""
        items = self.items(sequence)
        return items[0] if items else None

    def items(self, sequence: str) -> list[_Header] | None:
        """The items of a sequence, converted by pydicom one level at a time (nesting is bounded when read)."""
        try:
            if sequence not in self.ds:
                return None
            value = self.ds[sequence].value
        except Exception:  # pydicom cannot convert the value to a sequence
            raise _Malformed(sequence) from None
        if not isinstance(value, pydicom.Sequence):
            raise _Malformed(sequence)
        return [_DatasetHeader(item, self.little) for item in value]


def _functional(groups: list[_Header | None], sequence: str, read):
    """A value from the per-frame functional group, else from the shared one (Enhanced CT rules)."""
    for group in groups:
        macro = group.item(sequence) if group is not None else None
        if macro is not None:
            value = read(macro)
            if value is not None:
                return value
    return None


def _digest(text: str) -> str:
    """A short digest of an identifier ("" when there is none): compared, never shown."""
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:16] if text else ""


def _first(value, default):
    return default if value is None else value


def _number(text: str) -> float:
    """A decimal string as a float; one that is not a number is NaN, so that the series check names
    the attribute (and only a series that needs it is refused), not the parser."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def _frames(h: _Header, blob: int, label: str, pixels: PixelFormat) -> list[Frame]:
    common = dict(
        blob=blob,
        label=label,
        study_uid=h.text("StudyInstanceUID"),
        series_uid=h.text("SeriesInstanceUID"),
        sop_uid=h.text("SOPInstanceUID"),
        modality=h.text("Modality"),
        patient=_digest(h.text("PatientID")),
        rows=h.ushort("Rows", 0),
        columns=h.ushort("Columns", 0),
        pixels=pixels,
    )
    image_type = tuple(v.upper() for v in (h.texts("ImageType") or []))
    slope, intercept = h.number("RescaleSlope", 1.0), h.number("RescaleIntercept")
    rescale_type = h.text("RescaleType")
    rescaled = intercept is not None
    intercept = _first(intercept, 0.0)
    per_frame = h.items("PerFrameFunctionalGroupsSequence")
    shared = h.item("SharedFunctionalGroupsSequence")
    if per_frame is None and shared is None:
        frame = Frame(
            frame=0,
            image_type=image_type,
            position=h.floats("ImagePositionPatient", 3),
            orientation=h.floats("ImageOrientationPatient", 6),
            pixel_spacing=h.floats("PixelSpacing", 2),
            slope=slope,
            intercept=intercept,
            rescaled=rescaled,
            rescale_type=rescale_type,
            **common,
        )
        if pixels.frames == 1:
            return [frame]
        # legacy multi-frame without functional groups: per-frame positions are unknowable
        return [dataclasses.replace(frame, frame=k, position=None) for k in range(pixels.frames)]
    per_frame = per_frame or [None] * pixels.frames
    if len(per_frame) != pixels.frames:
        raise CorruptDicomError(f"{label}: {pixels.frames} frames but {len(per_frame)} per-frame functional groups")
    result = []
    for k, group in enumerate(per_frame):
        groups = [group, shared]
        frame_type = _functional(groups, "CTImageFrameTypeSequence", lambda m: m.texts("FrameType"))
        frame_intercept = _functional(groups, "PixelValueTransformationSequence", lambda m: m.number("RescaleIntercept"))
        frame_rescale_type = _functional(groups, "PixelValueTransformationSequence", lambda m: m.text("RescaleType") or None)
        result.append(
            Frame(
                frame=k,
                image_type=tuple(v.upper() for v in frame_type) if frame_type else image_type,
                position=_functional(groups, "PlanePositionSequence", lambda m: m.floats("ImagePositionPatient", 3)),
                orientation=_functional(groups, "PlaneOrientationSequence", lambda m: m.floats("ImageOrientationPatient", 6)),
                pixel_spacing=_functional(groups, "PixelMeasuresSequence", lambda m: m.floats("PixelSpacing", 2)),
                slope=_first(_functional(groups, "PixelValueTransformationSequence", lambda m: m.number("RescaleSlope")), slope),
                intercept=_first(frame_intercept, intercept),
                rescaled=rescaled or frame_intercept is not None,
                rescale_type=_first(frame_rescale_type, rescale_type),
                **common,
            )
        )
    return result


def volume_dtype(frames: Sequence[Frame]) -> np.dtype:
    """int16 holds every CT encoding except unsigned 16-bit stored values, which need int32."""
    if all(f.pixels.bits_allocated <= 16 and (f.pixels.signed or f.pixels.bits_stored <= 15) for f in frames):
        return np.dtype(np.int16)
    return np.dtype(np.int32)


def check_decodable(frame: Frame) -> None:
    """Refuse pixel layouts that are not a grey-level CT image, and transfer syntaxes no installed
    decoder reads, before anything is allocated: the series is then skipped, not the study refused."""
    p = frame.pixels
    if not _decodable(p.transfer_syntax):
        name = _uid_name(p.transfer_syntax, "TransferSyntaxUID")
        raise UnsupportedPixelDataError(f"{frame.label}: pixel data in transfer syntax {name}, which no installed decoder reads")
    if not p.photometric.startswith("MONOCHROME"):
        photometric = shown(p.photometric, "CS", "PhotometricInterpretation")
        raise UnsupportedPixelDataError(f"{frame.label}: colour images ({photometric}) are not CT slices")
    if p.samples_per_pixel != 1:
        raise UnsupportedPixelDataError(f"{frame.label}: {p.samples_per_pixel} samples per pixel: a CT slice has one")
    if p.bits_allocated not in (8, 16):
        raise UnsupportedPixelDataError(f"{frame.label}: {p.bits_allocated}-bit pixels are not supported for CT")


@functools.lru_cache(maxsize=64)
def _decodable(syntax: str) -> bool:
    """Whether pydicom, which decodes every object imagecodecs does not, has an installed decoder for
    the syntax (native ones included); an unknown or unimplemented syntax has none."""
    try:
        return get_decoder(_as_uid(syntax)).is_available
    except Exception:  # NotImplementedError: no decoder for that UID; anything else: not a syntax pydicom knows
        return False


def decode_into(out: np.ndarray, frames: Sequence[Frame], blobs: Sequence[Blob], *, threads: int) -> dict[str, int]:
    """Fill out[k] with the stored values of frames[k]; returns how many frames each path decoded
    ({"native": n, "imagecodecs": n, "pydicom": n}).

    Native pixels are copied straight from the input bytes on the calling thread (a memory copy
    gains nothing from threads); compressed objects are decoded by `threads` workers: with
    `DECODER` "imagecodecs", frames of the syntaxes in `_fast_syntaxes()` by imagecodecs, in
    parallel (one object per task; the frames of a multi-frame object are tasks of their own when
    there are fewer objects than workers), the rest by pydicom. An object imagecodecs fails on is
    decoded again by pydicom, which reports the error as before (a `DecodeError`).

    Unsigned values are then cleared above BitsStored on every path: pydicom leaves those bits of
    JPEG 2000 and JPEG-LS as decoded and this package's native views would too, and an old overlay
    or garbage there reads as thousands of HU (or wraps negative in the int16 volume).
    """
    counts = _decode_stored(out, frames, blobs, threads)
    for k, frame in enumerate(frames):
        p = frame.pixels
        if not p.signed and p.bits_stored < 8 * out.itemsize:
            out[k] &= (1 << p.bits_stored) - 1
    return counts


def _decode_stored(out: np.ndarray, frames: Sequence[Frame], blobs: Sequence[Blob], threads: int) -> dict[str, int]:
    by_blob: dict[int, list[int]] = {}
    for k, frame in enumerate(frames):
        by_blob.setdefault(frame.blob, []).append(k)
    counts = dict.fromkeys(("native", *DECODERS), 0)
    compressed = []
    for blob_index, ks in by_blob.items():
        if frames[ks[0]].pixels.native_fast:
            _copy_native(out, frames, ks, blobs[blob_index].data)
            counts["native"] += len(ks)
        else:
            compressed.append((blob_index, ks))
    if not compressed:
        return counts
    fast = DECODER == "imagecodecs"
    per_frame = fast and threads > 1 and len(compressed) < threads  # e.g. one multi-frame object

    def by_object(job: tuple[int, list[int]]) -> tuple[_FastObject | None, str]:
        blob_index, ks = job
        blob = blobs[blob_index]
        planned = _fast_object(frames, ks, blob) if fast else None
        if planned is not None:
            if per_frame:
                return planned, "imagecodecs"  # decoded below, one task per frame
            if all(planned.decode_frame(out, j) for j in range(len(ks))):
                return None, "imagecodecs"
        _decode_with_pydicom(out, frames, ks, blob)
        return None, "pydicom"

    done = _map(by_object, compressed, threads)
    for (_, ks), (_, path) in zip(compressed, done):
        counts[path] += len(ks)
    planned = [plan for plan, _ in done if plan is not None]
    if planned:
        tasks = [(plan, j) for plan in planned for j in range(len(plan.ks))]
        decoded = _map(lambda task: task[0].decode_frame(out, task[1]), tasks, threads)
        failed = {id(plan): plan for (plan, _), ok in zip(tasks, decoded) if not ok}
        for plan in failed.values():  # pydicom decodes the whole object again and names the error
            _decode_with_pydicom(out, frames, plan.ks, plan.blob)
            counts["imagecodecs"] -= len(plan.ks)
            counts["pydicom"] += len(plan.ks)
    return counts


def _map(function, items: list, threads: int) -> list:
    """function over items, on up to `threads` worker threads, results (and the first error) in order."""
    if threads > 1 and len(items) > 1:
        with ThreadPoolExecutor(min(threads, len(items))) as pool:
            return list(pool.map(function, items))
    return [function(item) for item in items]


def native_views(frames: Sequence[Frame], blobs: Sequence[Blob]) -> list[np.ndarray] | None:
    """Read-only [rows, columns] views of each frame's stored values inside the input bytes (no copy),
    or None when some frame needs decoding, sign extension, or bits above BitsStored cleared (an old
    overlay or garbage there: decode_into clears them); checking costs one read, copying a write too."""
    if not all(f.pixels.native_fast and not (f.pixels.signed and f.pixels.bits_stored < 16) for f in frames):
        return None
    views = [_native_view(f, blobs[f.blob].data) for f in frames]
    if any(int(view.max(initial=0)) >> f.pixels.bits_stored for f, view in zip(frames, views) if f.pixels.bits_stored < 16):
        return None
    return views


def _native_view(frame: Frame, data: bytes) -> np.ndarray:
    p = frame.pixels
    count = frame.rows * frame.columns
    start = p.offset + frame.frame * count * 2
    end = min(len(data), p.offset + p.length)
    if start + count * 2 > end:
        raise DecodeError(f"{frame.label}: pixel data is truncated ({max(0, end - start)} of {count * 2} bytes)")
    return np.frombuffer(data, np.dtype("<i2" if p.signed else "<u2"), count, start).reshape(frame.rows, frame.columns)


def _copy_native(out: np.ndarray, frames: Sequence[Frame], ks: list[int], data: bytes) -> None:
    for k in ks:
        out[k] = _native_view(frames[k], data)
        p = frames[k].pixels
        if p.signed and p.bits_stored < 16:
            shift = 16 - p.bits_stored  # sign-extend values stored in fewer bits
            out[k] = (out[k] << shift) >> shift


def _decode_with_pydicom(out: np.ndarray, frames: Sequence[Frame], ks: list[int], blob: Blob) -> None:
    first = frames[ks[0]]
    if not first.pixels.present:
        raise DecodeError(f"{blob.label}: no pixel data")
    if first.pixels.frames * first.rows * first.columns > INPUT_LIMITS.max_voxels:  # pixel_array decodes every frame, kept or not
        raise InputTooLargeError(
            f"{blob.label}: {first.pixels.frames} frames of {first.rows}x{first.columns} to decode at once, "
            f"more than the limit of {INPUT_LIMITS.max_voxels} voxels"
        )
    name = _uid_name(first.pixels.transfer_syntax, "TransferSyntaxUID")
    try:
        if first.pixels.value_at is not None:
            ds = _pixel_dataset(first, blob.data)
        else:  # deflated: pydicom inflates the whole data set
            ds = pydicom.dcmread(io.BytesIO(blob.data))
        if ds.file_meta.TransferSyntaxUID.is_encapsulated:
            _check_codestreams(ds, first)
        array = ds.pixel_array
    except StudyError:
        raise
    except BaseException as exc:  # the Rust decoders' panics (pyo3 PanicException) derive from BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise DecodeError(f"{blob.label}: pixel data could not be decoded ({name}, {type(exc).__name__})") from None
    if first.pixels.frames == 1:
        array = array[None]
    if array.shape != (first.pixels.frames, first.rows, first.columns):
        raise DecodeError(f"{blob.label}: decoded pixel data has shape {array.shape[1:]}, header says {first.rows}x{first.columns}")
    for k in ks:
        out[k] = array[frames[k].frame]


def _pixel_dataset(frame: Frame, data: bytes) -> pydicom.Dataset:
    """The image pixel module as parse read it, around the pixel data bytes: what pydicom's decoders
    need, and nothing else to convert (reading the whole file again, a malformed value in an
    attribute no decoder uses, such as SpecificCharacterSet, refused the study)."""
    p = frame.pixels
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = _as_uid(p.transfer_syntax)
    ds.Rows, ds.Columns, ds.NumberOfFrames = frame.rows, frame.columns, p.frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = p.samples_per_pixel, p.photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = p.bits_allocated, p.bits_stored, max(p.bits_stored - 1, 0)
    ds.PixelRepresentation = int(p.signed)
    ds.PixelData = data[p.value_at : _encapsulated_end(frame, data) if p.offset is None else p.offset + p.length]
    if p.vr is not None:  # pydicom swaps big-endian bytes by the VR: 8-bit values in OW words are swapped in pairs
        ds["PixelData"].VR = p.vr
    return ds


def _encapsulated_end(frame: Frame, data: bytes) -> int:
    """End of the encapsulated pixel data's items; without its sequence delimiter the data is cut
    short somewhere (a decoder could return part of a frame), as pydicom also refuses it."""
    end = _items_end(data, frame.pixels.value_at)
    if end is None:
        raise DecodeError(f"{frame.label}: compressed pixel data is cut short or damaged (no end of its items)")
    return end


def _items_end(data: bytes, pos: int) -> int | None:
    while pos + 8 <= len(data):
        group, element, length = _IMPLICIT.unpack_from(data, pos)
        tag = group << 16 | element
        if tag == _SEQUENCE_END:
            return pos + 8
        if tag != _ITEM or pos + 8 + length > len(data):
            break
        pos += 8 + length
    return None


def _check_nothing_read_after_pixels(pixels: PixelFormat, blob: Blob) -> None:
    """Elements are in tag order, so the pixel data (7FE0,0010) comes after everything this package
    reads, and the header is read up to it: an element of a lower tag after it (a rescale written
    last) would be left unread, its default taken instead (an intercept of 0: HU off by 1024).
    Refused; zero padding and higher tags (trailing padding, signatures) are not elements read."""
    if pixels.offset is not None:
        end = pixels.offset + pixels.length
    elif pixels.value_at is not None:
        end = _items_end(blob.data, pixels.value_at)
    else:
        return
    if end is None or end + 4 > len(blob.data) or not any(blob.data[end:]):
        return
    order = ">" if pixels.transfer_syntax == pydicom.uid.ExplicitVRBigEndian else "<"
    group, element = struct.unpack_from(f"{order}HH", blob.data, end)
    if (group, element) < (0x7FE0, 0x0010):
        raise CorruptDicomError(f"{blob.label}: element ({group:04X},{element:04X}) follows the pixel data, out of tag order: not read")


@functools.cache
def _fast_syntaxes() -> frozenset[str]:
    """The transfer syntaxes imagecodecs decodes here: lossless ones only, whose decoded values the
    standards define exactly (lossy JPEG and JPEG 2000 depend on the decoder's arithmetic)."""
    if imagecodecs is None:
        return frozenset()
    uid, found = pydicom.uid, set()
    try:
        if imagecodecs.JPEG2K.available:  # OpenJPEG >= 2.5 decodes HTJ2K too
            found |= {uid.JPEG2000Lossless, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL}
        if imagecodecs.JPEGLS.available:
            found.add(uid.JPEGLSLossless)
        if imagecodecs.JPEG8.available and imagecodecs.jpeg8_version().startswith("libjpeg_turbo 3"):  # lossless since 3.0
            found |= {uid.JPEGLossless, uid.JPEGLosslessSV1}
        if imagecodecs.PACKBITS.available:
            found.add(uid.RLELossless)
    except Exception:  # a codec module that does not load: pydicom decodes
        return frozenset()
    return frozenset(found)


class _NotExact(Exception):
    """A frame whose decoded values imagecodecs might not give exactly as pydicom: pydicom decodes it."""


@dataclass(frozen=True)
class _FastObject:
    """One compressed object whose frames imagecodecs decodes, reproducing what pydicom 3.0.2's
    `pixel_array` does after its pylibjpeg plugin (`pydicom.pixels.decoders.base`, `.pylibjpeg`):

    - the decoder's output is read as `container`: signedness from PixelRepresentation, item size
      from the codestream's precision for JPEG 2000 and JPEG-LS (1 byte up to 8 bits, 2 up to 16),
      from BitsAllocated otherwise, then cast to the data set's dtype (`stored`);
    - JPEG 2000 (MONOCHROME): where the codestream's signedness differs from PixelRepresentation,
      the values are sign-extended (or masked) from the codestream's precision (`shift`: bits of the
      stored dtype less the precision), pydicom's "j2k sign correction"; no other correction;
    - JPEG-LS: signed data (PixelRepresentation 1) sign-extended from the codestream's precision;
      unsigned data masked to BitsStored when BitsStored < BitsAllocated;
    - JPEG lossless and RLE: values shifted to BitsStored (sign-extended when signed) when
      BitsStored < BitsAllocated (pydicom's "correct unused bits");
    - RLE: one segment per byte of BitsAllocated, most significant byte first (PS3.5 G.2).

    Not planned (pydicom decodes the object): precisions or signedness that differ between the
    frames of one object (pydicom applies the last frame's to all), a codestream pydicom cannot
    read its parameters from, precision above 16 or above BitsAllocated, a JPEG-LS frame with
    NEAR != 0 or several components, a JPEG frame that is not lossless (SOF3) or whose sample
    size is not BitsAllocated's, an RLE header or segment of another size than the frame's, more
    frames than NumberOfFrames, a JPEG or JPEG-LS frame without its end-of-image marker (cut
    short), a decoder error or an output of another shape or item size. Damaged data that both
    decoders accept decodes to the same values in the tests for JPEG 2000, JPEG-LS (CharLS refuses
    it: pydicom decodes) and RLE; for JPEG lossless, libjpeg-turbo accepted 1 of 30 randomly damaged
    frames that pylibjpeg-libjpeg refused (both accepted 28, with equal values).
    """

    blob: Blob
    ks: list[int]  # where its frames go in the volume
    indices: list[int]  # which frame of the object goes to each
    codestreams: list[bytes]  # every frame of the object
    kind: str  # "j2k", "jls", "jpeg", "rle"
    rows: int
    columns: int
    container: np.dtype
    stored: np.dtype
    shift: int  # bits shifted left then right in `stored`, 0 for none

    def decode_frame(self, out: np.ndarray, j: int) -> bool:
        """Decode frame indices[j] of the object into out[ks[j]]; False where pydicom must decode the object."""
        try:
            values = self._decode(self.codestreams[self.indices[j]])
        except Exception:  # imagecodecs' errors (a codec error, ValueError, MemoryError), _NotExact
            return False
        if values.shape != (self.rows, self.columns) or values.dtype.itemsize != self.container.itemsize:
            return False
        values = values.view(self.container).astype(self.stored)
        if self.shift:
            np.left_shift(values, self.shift, out=values)
            np.right_shift(values, self.shift, out=values)
        out[self.ks[j]] = values
        return True

    def _decode(self, data: bytes) -> np.ndarray:
        if self.kind == "j2k":
            return imagecodecs.jpeg2k_decode(data, numthreads=1)  # one slice per worker thread
        if self.kind == "jls":
            return imagecodecs.jpegls_decode(data)
        if self.kind == "jpeg":
            return imagecodecs.jpeg8_decode(data)
        return self._rle(data)

    def _rle(self, data: bytes) -> np.ndarray:
        size = self.rows * self.columns
        nbytes = self.stored.itemsize
        if len(data) < 64:
            raise _NotExact
        header = struct.unpack_from("<16I", data)
        offsets = [*header[1 : 1 + nbytes], len(data)]
        if header[0] != nbytes or offsets[0] != 64 or any(a >= b for a, b in itertools.pairwise(offsets)):
            raise _NotExact
        planes = np.empty((size, nbytes), np.uint8)  # the bytes of each value, little-endian
        for b in range(nbytes):  # segment b holds byte nbytes - 1 - b (the first, the most significant)
            segment = imagecodecs.packbits_decode(data[offsets[b] : offsets[b + 1]])
            if len(segment) != size:
                raise _NotExact
            planes[:, nbytes - 1 - b] = np.frombuffer(segment, np.uint8)
        return planes.view(f"<u{nbytes}").reshape(self.rows, self.columns)


def _fast_object(frames: Sequence[Frame], ks: list[int], blob: Blob) -> _FastObject | None:
    """The object's frames as imagecodecs work (their codestreams checked first, as for pydicom),
    or None when pydicom decodes it (see `_FastObject`)."""
    first = frames[ks[0]]
    p = first.pixels
    if p.transfer_syntax not in _fast_syntaxes() or not p.present or p.value_at is None or p.offset is not None:
        return None
    if p.samples_per_pixel != 1 or p.photometric not in ("MONOCHROME1", "MONOCHROME2") or p.bits_allocated not in (8, 16):
        return None
    if not 1 <= p.bits_stored <= p.bits_allocated or p.frames < 1 or not (0 < first.rows < 2**16 and 0 < first.columns < 2**16):
        return None
    name = _uid_name(p.transfer_syntax, "TransferSyntaxUID")
    try:
        ds = _pixel_dataset(first, blob.data)
        codestreams = list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=p.frames))
        _check_codestreams(ds, first, codestreams)
    except StudyError:
        raise
    except Exception as exc:  # as _decode_with_pydicom words it
        raise DecodeError(f"{blob.label}: pixel data could not be decoded ({name}, {type(exc).__name__})") from None
    if len(codestreams) != p.frames:
        return None  # excess frames: pydicom appends them
    signed = int(p.signed)
    stored = np.dtype(f"{'ui'[signed]}{p.bits_allocated // 8}")
    unused = p.bits_allocated - p.bits_stored
    syntax = p.transfer_syntax
    if syntax == pydicom.uid.RLELossless:
        kind, container, shift = "rle", stored, unused
    elif syntax in _J2K_SYNTAXES:
        found = {(info.get("precision"), info.get("is_signed")) for info in map(get_j2k_parameters, codestreams)}
        if len(found) != 1:
            return None
        ((precision, j2k_signed),) = found
        if precision is None or not 1 <= precision <= min(16, p.bits_allocated):
            return None
        kind, container = "j2k", np.dtype(f"{'ui'[signed]}{1 if precision <= 8 else 2}")
        shift = 8 * stored.itemsize - precision if int(j2k_signed) != signed else 0
    else:
        keys = ("precision", "components", "lossy_error")  # lossy_error: JPEG-LS's NEAR
        headers = {(_jpeg_sof(data), *map(info.get, keys)) for data in codestreams for info in [_get_jpg_parameters(data)]}
        if len(headers) != 1:
            return None
        ((sof, precision, components, near),) = headers
        if sof is None or precision is None or not 1 <= precision <= min(16, p.bits_allocated) or components != 1:
            return None
        size = 1 if precision <= 8 else 2
        if syntax in pydicom.uid.JPEGLSTransferSyntaxes:
            if sof != 0xF7 or near != 0:
                return None
            kind, container = "jls", np.dtype(f"{'ui'[signed]}{size}")
            shift = 8 * stored.itemsize - precision if signed else unused
        else:
            if sof != 0xC3 or size != stored.itemsize:  # lossless, Huffman; pydicom reads BitsAllocated-sized samples
                return None
            kind, container, shift = "jpeg", stored, unused
    indices = [frames[k].frame for k in ks]
    return _FastObject(blob, ks, indices, codestreams, kind, first.rows, first.columns, container, stored, shift)


_JPEG_SYNTAXES = frozenset(pydicom.uid.JPEGTransferSyntaxes + pydicom.uid.JPEGLSTransferSyntaxes)
_J2K_SYNTAXES = frozenset(pydicom.uid.JPEG2000TransferSyntaxes)  # JPEG 2000 and HTJ2K
# JPEG start-of-frame markers (ITU T.81: C0-CF less DHT, JPG and DAC) and JPEG-LS's SOF55
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})


def _check_codestreams(ds: pydicom.Dataset, frame: Frame, codestreams: Sequence[bytes] | None = None) -> None:
    """Refuse compressed frames whose own header disagrees with Rows/Columns before a decoder sizes
    its buffers from it: the limits are checked on the DICOM header, and a 10 KB JPEG 2000 frame
    can claim 20000 x 20000 pixels. JPEG and JPEG-LS frames must end with their end-of-image
    marker. `codestreams`: the frames, where the caller already split them."""
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax in _J2K_SYNTAXES:
        read, kind = _j2k_size, "JPEG 2000"
    elif syntax in _JPEG_SYNTAXES:
        read, kind = _jpeg_size, "JPEG"
    else:
        return  # RLE: its decoder sizes the output from Rows and Columns
    expected = (frame.rows, frame.columns, 1)
    if codestreams is None:
        codestreams = pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=frame.pixels.frames)
    for number, data in enumerate(codestreams, start=1):
        try:
            found = read(data)
        except (struct.error, IndexError):
            found = None
        if found is None:
            raise DecodeError(f"{frame.label}: frame {number} has no readable {kind} frame header")
        if kind == "JPEG" and not data.rstrip(b"\0\xff").endswith(b"\xff\xd9"):  # after any padding
            # cut short: decoders fill in the missing end (each its own way) and report nothing
            raise DecodeError(f"{frame.label}: frame {number} is cut short (no JPEG end-of-image marker)")
        if found != expected:
            rows, columns, components = found
            raise DecodeError(
                f"{frame.label}: frame {number} is a {kind} image of {rows}x{columns} pixels and {components} components, "
                f"the DICOM header says {frame.rows}x{frame.columns} grey levels"
            )
        precision = _precision(data)
        # wider than BitsStored is common (encoders write BitsAllocated); wider than BitsAllocated
        # does not fit, and pydicom cuts the high bits off
        if precision is not None and precision > frame.pixels.bits_allocated:
            raise DecodeError(
                f"{frame.label}: frame {number} is a {kind} image of {precision}-bit samples, "
                f"the DICOM header allocates {frame.pixels.bits_allocated} bits"
            )


def _j2k_size(data: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG 2000 codestream's SIZ marker (HTJ2K's too), or from a
    JP2 file's image header box, which must then agree with the codestream it holds."""
    if data[:4] == b"\xff\x4f\xff\x51":  # SOC, SIZ
        x, y, x0, y0 = struct.unpack_from(">IIII", data, 8)
        (components,) = struct.unpack_from(">H", data, 40)
        subsampled = any(data[43 + 3 * c : 45 + 3 * c] != b"\x01\x01" for c in range(min(components, 4)))
        return None if subsampled or x <= x0 or y <= y0 else (y - y0, x - x0, components)
    if data[4:12] != b"jP  \r\n\x87\n":
        return None
    header, stream, pos = None, None, 0
    while pos + 8 <= len(data):  # the boxes of a JP2 file
        length, kind = struct.unpack_from(">I4s", data, pos)
        start = pos + 8
        if length == 1:
            (length,), start = struct.unpack_from(">Q", data, pos + 8), pos + 16
        end = len(data) if length == 0 else pos + length
        if end <= pos or end > len(data):
            return None
        if kind == b"jp2h" and data[start + 4 : start + 8] == b"ihdr":
            height, width, components = struct.unpack_from(">IIH", data, start + 8)
            header = (height, width, components)
        elif kind == b"jp2c":
            stream = _j2k_size(data[start:end]) if data[start : start + 2] == b"\xff\x4f" else None
        pos = end
    return header if header is not None and header == stream else None


def _precision(data: bytes) -> int | None:
    """The bits per sample of a frame's first component: a JPEG 2000 codestream's SIZ marker (in a
    JP2 file, its codestream's), or a JPEG or JPEG-LS start-of-frame segment; None when not found."""
    try:
        if data[:2] == b"\xff\xd8":
            return _jpeg_frame_header(data)[2]
        at = data.find(b"\xff\x4f\xff\x51")  # SOC, SIZ
        return None if at < 0 else (data[at + 42] & 0x7F) + 1  # Ssiz: bit depth less 1, sign in the high bit
    except (struct.error, IndexError):
        return None


def _jpeg_size(data: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from the start-of-frame segment of a JPEG or JPEG-LS frame."""
    return _jpeg_frame_header(data)[1]


def _jpeg_sof(data: bytes) -> int | None:
    """The start-of-frame marker of a JPEG or JPEG-LS frame (0xC3: lossless, 0xF7: JPEG-LS), or None."""
    try:
        return _jpeg_frame_header(data)[0]
    except (struct.error, IndexError):
        return None


def _jpeg_frame_header(data: bytes) -> tuple[int | None, tuple[int, int, int] | None, int | None]:
    """The start-of-frame marker, (rows, columns, components) and sample precision of a JPEG or JPEG-LS frame."""
    if data[:2] != b"\xff\xd8":
        return None, None, None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None, None, None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in _SOF:
            precision, rows, columns, components = struct.unpack_from(">BHHB", data, pos + 4)
            return marker, (rows, columns, components), precision
        elif marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
        elif marker == 0xDA:  # scan data before any frame header
            return None, None, None
        else:
            pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    return None, None, None
