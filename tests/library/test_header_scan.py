"""The fast header scanner (`preprocess.dicom._scan`) reads what pydicom reads, on every file that
pydicom and pydicom-data ship.

`parse` reads little-endian Part-10 headers with `_scan` and everything else with pydicom up to the
pixel data. Whichever reads a file, the outcome must be the same: equal frames and warnings, or the
same StudyError. Any other exception is a bug and fails the test as it is raised.
"""

from __future__ import annotations

import dataclasses
import io
import random
import struct
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info

import preprocess
from preprocess import phantom
from preprocess.dicom import _scan, parse
from preprocess.errors import CorruptDicomError, StudyError
from preprocess.sources import Blob, expand
from settings import INPUT_LIMITS


def packaged_files() -> dict[str, Path]:
    """Every file under pydicom's test_files and pydicom-data's data folder, by its path relative to
    that folder, found on disk: pydicom's get_testdata_files may go to the network."""
    import data_store  # pydicom-data

    files = {}
    for folder in (Path(pydicom.data.__file__).parent / "test_files", Path(data_store.__file__).parent / "data"):
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                files[path.relative_to(folder).as_posix()] = path
    return files


FILES = packaged_files()
# Measured with pydicom 3.0.2 and pydicom-data 1.0.0: 204 of 244 files. pydicom reads the rest: big
# endian, deflated, Enhanced (functional groups), no file meta, damaged, or not DICOM at all.
SCANNER_READS_AT_LEAST = 200


def outcome(blobs: list[Blob]):
    """What parse gives: (frames, warnings), or a StudyError as (type, message)."""
    try:
        return parse(blobs)
    except StudyError as exc:
        return type(exc), str(exc)


def read_both_ways(blobs: list[Blob], monkeypatch: pytest.MonkeyPatch) -> tuple[object, object]:
    """parse's outcome with the scanner, then with every header read by pydicom."""
    by_scanner = outcome(blobs)
    with monkeypatch.context() as patch:
        patch.setattr("preprocess.dicom._scan", lambda data: None)
        return by_scanner, outcome(blobs)


@pytest.mark.filterwarnings("ignore:Expected explicit VR, but found implicit VR")  # SC_rgb_jpeg.dcm, by design
@pytest.mark.parametrize("name", FILES)
def test_scanner_reads_each_packaged_file_as_pydicom_does(name, monkeypatch):
    blobs, _ = expand([FILES[name].read_bytes()])
    by_scanner, by_pydicom = read_both_ways(blobs, monkeypatch)
    assert by_scanner == by_pydicom


def test_scanner_reads_most_packaged_files():
    """The comparison above means little if the scanner declines the files: count those it reads."""
    read = [name for name, path in FILES.items() if any(_scan(blob.data) is not None for blob in expand([path.read_bytes()])[0])]
    assert len(read) >= SCANNER_READS_AT_LEAST, f"the scanner read {len(read)} of {len(FILES)} files"


def implicit_data_set_under_explicit_syntax(name: str) -> bytes:
    """The file with its data set rewritten in implicit VR, its file meta still saying explicit VR: a
    writer fault that pydicom detects (and reads implicit); SC_rgb_jpeg.dcm ships with it."""
    ds = pydicom.dcmread(FILES[name])
    meta, body = DicomBytesIO(), DicomBytesIO()
    meta.is_little_endian = body.is_little_endian = True
    meta.is_implicit_VR, body.is_implicit_VR = False, True
    write_file_meta_info(meta, ds.file_meta)
    write_dataset(body, ds)
    return b"\0" * 128 + b"DICM" + meta.getvalue() + body.getvalue()


def element_header_at(name: str, keyword: str) -> int:
    """Offset of a short-VR element's header in the file (its value starts 8 bytes later)."""
    return pydicom.dcmread(FILES[name], stop_before_pixels=True).get_item(keyword).value_tell - 8


def one_element_in_implicit_vr(name: str, keyword: str) -> bytes:
    """One explicit element (short VR) rewritten as tag + 4-byte length, as some writers do for a few
    elements: pydicom switches to implicit VR for that element."""
    data = FILES[name].read_bytes()
    at = element_header_at(name, keyword)
    length = struct.unpack_from("<H", data, at + 6)[0]
    return data[: at + 4] + struct.pack("<I", length) + data[at + 8 :]


def stray_item_delimiter(name: str, keyword: str) -> bytes:
    """An item delimiter (FFFE,E00D) outside any sequence, before `keyword`: pydicom ends the data set there."""
    data = FILES[name].read_bytes()
    at = element_header_at(name, keyword)
    return data[:at] + b"\xfe\xff\x0d\xe0\0\0\0\0" + data[at:]


MALFORMED = {
    "implicit VR data set under explicit syntax": lambda: implicit_data_set_under_explicit_syntax("OBXXXX1A.dcm"),
    "one element in implicit VR": lambda: one_element_in_implicit_vr("OBXXXX1A.dcm", "StudyDate"),
    "stray item delimiter": lambda: stray_item_delimiter("CT_small.dcm", "Manufacturer"),
}


@pytest.mark.filterwarnings("ignore:Expected explicit VR, but found implicit VR")
@pytest.mark.parametrize("variant", MALFORMED)
def test_malformed_encodings_the_scanner_misreads_are_left_to_pydicom(variant, monkeypatch):
    """Variants of shipped files whose declared encoding lies: the scanner must hand them to pydicom."""
    data = MALFORMED[variant]()
    scanned = _scan(data) is not None
    assert not scanned
    by_scanner, by_pydicom = read_both_ways([Blob(data, "file 1")], monkeypatch)
    assert by_scanner == by_pydicom


# Mutated copies of the packaged files: the ways a header is damaged or lies about its encoding.
# Each file the scanner reads gets every kind, at offsets drawn from a generator seeded by its name.
_EXPLICIT_LE, _IMPLICIT_LE = pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian
_ITEM, _ITEM_END, _SEQUENCE_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\x0d\xe0", b"\xfe\xff\xdd\xe0"
_LONG = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UN", b"UT", b"UC", b"UR", b"SV", b"UV"}


def element_headers(data: bytes) -> list[tuple[int, int]]:
    """(offset of the element header, size of its length field) of every top-level element before the
    pixel data, file meta included, as pydicom found them."""
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    implicit = ds.original_encoding[0]
    headers = []
    for dataset, is_implicit in ((getattr(ds, "file_meta", pydicom.Dataset()), False), (ds, implicit)):
        for tag in list(dataset.keys()):
            value_at = getattr(dataset.get_item(tag), "value_tell", None)
            if value_at is None or value_at < 12:
                continue
            if not is_implicit and data[value_at - 8 : value_at - 6] in _LONG and data[value_at - 6 : value_at - 4] == b"\0\0":
                headers.append((value_at - 12, 4))
            else:
                headers.append((value_at - 8, 4 if is_implicit else 2))
    return headers


def data_set_start(data: bytes) -> int:
    """Offset of the first element after the file meta group (explicit VR little endian)."""
    pos = 132
    while data[pos : pos + 2] == b"\x02\x00":
        vr = data[pos + 4 : pos + 6]
        pos += 12 + struct.unpack_from("<I", data, pos + 8)[0] if vr in _LONG else 8 + struct.unpack_from("<H", data, pos + 6)[0]
    return pos


def with_syntax(data: bytes, syntax: str) -> bytes:
    """The file with another transfer syntax declared in its file meta, the data set's bytes unchanged."""
    start = data_set_start(data)
    meta = pydicom.dcmread(io.BytesIO(data[:start] + b"\x08\x00\x16\x00UI\x00\x00"), force=True).file_meta
    meta.TransferSyntaxUID = syntax
    stream = DicomBytesIO()
    stream.is_little_endian, stream.is_implicit_VR = True, False
    write_file_meta_info(stream, meta, enforce_standard=False)
    return data[:128] + b"DICM" + stream.getvalue() + data[start:]


def nested_sequence(depth: int, implicit: bool, defined_items: bool) -> bytes:
    """A private element (0009,1010) holding sequences nested `depth` deep, each in one item."""
    inner = b""
    for _ in range(depth):
        sequence_header = b"\x09\x00\x10\x10" + (b"\xff\xff\xff\xff" if implicit else b"SQ\0\0\xff\xff\xff\xff")
        # the innermost item holds one short element so that pydicom's per-item VR test sees an element
        content = inner or (b"\x09\x00\x11\x10" + (b"\x02\0\0\0" if implicit else b"LO\x02\0") + b"AB")
        length = struct.pack("<I", len(content)) if defined_items else b"\xff\xff\xff\xff"
        item = b"\xfe\xff\x00\xe0" + length + content + (b"" if defined_items else b"\xfe\xff\x0d\xe0\0\0\0\0")
        inner = sequence_header + item + b"\xfe\xff\xdd\xe0\0\0\0\0"
    return inner


def mutations(name: str, data: bytes) -> dict[str, bytes]:
    """Four of the kinds below, drawn per file (each kind for about 50 files), plus sequences
    nested 2, 16 (the limit) or 17 deep."""
    rng = random.Random(name)
    stream = io.BytesIO(data)
    implicit = pydicom.dcmread(stream, stop_before_pixels=True).original_encoding[0]
    header_end = stream.tell()
    data = data[: header_end + 1024]  # the pixels' first bytes: parse reads no further, and copies stay small
    headers = element_headers(data)
    (at, size), (at2, size2) = rng.choice(headers), rng.choice(headers)
    start = data_set_start(data)
    kinds = {
        "truncated in the header": lambda: data[: rng.randrange(132, header_end)],
        "truncated in an element header": lambda: data[: at2 + rng.randrange(1, 8 + size2)],
        "length + 1 (odd)": lambda: _add_to_length(data, at, size, 1),
        "length - 1": lambda: _add_to_length(data, at2, size2, -1),
        "length beyond the file": lambda: _set_length(data, at, size, len(data) + 100),
        "undefined length": lambda: _set_length(data, at2, size2, 0xFFFFFFFF),
        "VR replaced": lambda: data[: at + 4] + rng.choice([b"SQ", b"UN", b"OB", b"US", b"UT", b"QQ", b"\0\0", b"a1"]) + data[at + 6 :],
        "bytes flipped in the header": lambda: _flip(data, rng, 132, header_end, 4),
        "other VR declared": lambda: with_syntax(data, _EXPLICIT_LE if implicit else _IMPLICIT_LE),
        "big endian declared": lambda: with_syntax(data, pydicom.uid.ExplicitVRBigEndian),
        "deflated declared": lambda: with_syntax(data, pydicom.uid.DeflatedExplicitVRLittleEndian),
        "JPEG 2000 declared": lambda: with_syntax(data, pydicom.uid.JPEG2000Lossless),
        "unknown syntax declared": lambda: with_syntax(data, "1.2.3.4"),
        "stray item tag": lambda: data[:at] + rng.choice([_ITEM, _ITEM_END, _SEQUENCE_END]) + bytes(4) + data[at:],
        "sequence in the other VR": lambda: data[:start] + nested_sequence(3, not implicit, False) + data[start:],
    }
    out = {kind: kinds[kind]() for kind in rng.sample(sorted(kinds), 4)}
    depth = rng.choice([2, 2, 16, 17])  # 1000 deep: test_sequences_nested_a_thousand_deep_are_refused
    out[f"sequences nested {depth} deep"] = data[:start] + nested_sequence(depth, implicit, depth % 2 == 1) + data[start:]
    return out


def _set_length(data: bytes, at: int, size: int, value: int) -> bytes:
    where = at + (8 if size == 4 and data[at + 4 : at + 6] in _LONG else 4) if size == 4 else at + 6
    if size == 4 and data[at + 6 : at + 8] != b"\0\0" and data[at + 4 : at + 6] not in _LONG:
        where = at + 4  # implicit VR
    return data[:where] + struct.pack("<I" if size == 4 else "<H", value & (0xFFFFFFFF if size == 4 else 0xFFFF)) + data[where + size :]


def _add_to_length(data: bytes, at: int, size: int, delta: int) -> bytes:
    where = at + (8 if data[at + 4 : at + 6] in _LONG and size == 4 else 4 if size == 4 else 6)
    (length,) = struct.unpack_from("<I" if size == 4 else "<H", data, where)
    return _set_length(data, at, size, length + delta)


def _flip(data: bytes, rng: random.Random, start: int, end: int, count: int) -> bytes:
    out = bytearray(data)
    for _ in range(count):
        out[rng.randrange(start, max(start + 1, end))] ^= 1 << rng.randrange(8)
    return bytes(out)


SCANNED = [name for name, path in FILES.items() if _scan(path.read_bytes()) is not None]
TOO_DEEP = "DICOM sequences nested more than"


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", SCANNED)
def test_scanner_reads_mutated_copies_as_pydicom_does_or_refuses_them(name, monkeypatch):
    """Where the scanner cannot read a damaged copy exactly as pydicom does, it hands it to pydicom;
    the only refusal of its own is nesting beyond max_sequence_depth (pydicom recurses per level)."""
    for kind, data in mutations(name, FILES[name].read_bytes()).items():
        by_scanner, by_pydicom = read_both_ways([Blob(data, "file 1")], monkeypatch)
        if isinstance(by_scanner, tuple) and isinstance(by_scanner[1], str) and TOO_DEEP in by_scanner[1]:
            assert "nested 17" in kind, kind
            continue
        assert by_scanner == by_pydicom, kind


def test_sequences_nested_a_thousand_deep_are_refused_by_either_reader(monkeypatch):
    """The scanner refuses nesting beyond max_sequence_depth before pydicom recurses into it; files it
    leaves to pydicom (here a bare data set) are refused too, never a RecursionError."""
    data = FILES["CT_small.dcm"].read_bytes()
    deep = data[: data_set_start(data)] + nested_sequence(1000, False, False) + data[data_set_start(data) :]
    with pytest.raises(CorruptDicomError, match="file 1: DICOM sequences nested more than 16 levels deep"):
        parse([Blob(deep, "file 1")])
    bare = pydicom.dcmread(FILES["CT_small.dcm"], stop_before_pixels=True)
    stream = DicomBytesIO()
    stream.is_little_endian, stream.is_implicit_VR = True, False
    write_dataset(stream, bare)
    body = stream.getvalue()
    at = body.index(b"\x08\x00\x16\x00")  # after SpecificCharacterSet/ImageType: still a bare data set's start
    with pytest.raises(CorruptDicomError, match="file 1: DICOM sequences nested too deeply"):
        parse([Blob(body[:at] + nested_sequence(1000, False, False) + body[at:], "file 1")])


def test_files_pydicom_reads_are_bounded_in_sequence_depth_like_the_scanner(monkeypatch):
    """Files the scanner leaves to pydicom (Enhanced CT, big endian, deflated) are refused at the same nesting depth."""
    data = FILES["CT_small.dcm"].read_bytes()
    for depth in (16, 17):
        nested = data[: data_set_start(data)] + nested_sequence(depth, False, depth % 2 == 1) + data[data_set_start(data) :]
        by_scanner, by_pydicom = read_both_ways([Blob(nested, "file 1")], monkeypatch)
        assert by_pydicom == by_scanner
        assert (by_pydicom == (CorruptDicomError, f"file 1: {TOO_DEEP} 16 levels deep")) == (depth == 17)


def test_files_pydicom_reads_are_bounded_in_sequence_items_before_it_reads_them(monkeypatch):
    """A million empty items in a private sequence cost pydicom 24 s and 1.3 GB: the file is refused first."""
    monkeypatch.setattr("preprocess.dicom.INPUT_LIMITS", dataclasses.replace(INPUT_LIMITS, max_sequence_items=100))
    monkeypatch.setattr("preprocess.dicom._scan", lambda data: None)
    monkeypatch.setattr(pydicom, "dcmread", lambda *args, **kwargs: pytest.fail("pydicom read the file"))
    data = FILES["CT_small.dcm"].read_bytes()
    items = b"\x09\x00\x10\x10SQ\0\0\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\0\0\0\0" * 101 + b"\xfe\xff\xdd\xe0\0\0\0\0"
    with pytest.raises(preprocess.InputTooLargeError, match=r"^file 1: more than the limit of 100 DICOM sequence items$"):
        parse([Blob(data[: data_set_start(data)] + items + data[data_set_start(data) :], "file 1")])


def data_set_in_other_vr(data: bytes) -> bytes:
    """The file with its data set re-encoded in the other VR, the file meta unchanged (still declaring
    the original): the writer fault that pydicom detects and reads through."""
    ds = pydicom.dcmread(io.BytesIO(data))
    meta, body = DicomBytesIO(), DicomBytesIO()
    meta.is_little_endian = body.is_little_endian = True
    meta.is_implicit_VR, body.is_implicit_VR = False, not ds.original_encoding[0]
    write_file_meta_info(meta, ds.file_meta)
    write_dataset(body, ds)
    return data[:128] + b"DICM" + meta.getvalue() + body.getvalue()


@pytest.mark.filterwarnings("ignore:Expected")
@pytest.mark.parametrize("syntax", ["explicit", "implicit"])
def test_pixels_are_read_in_the_encoding_the_data_set_has_not_the_declared_one(syntax):
    """An implicit data set declared explicit (or the other way round) is read by pydicom, and its
    pixel data element in that encoding: read with the declared one, its pixels would be refused as
    truncated (implicit) or read 4 bytes off (explicit)."""
    files = phantom.study_files("series", transfer_syntax=syntax, slices=16, rows=32, columns=32, pixel_spacing=10.0, slice_spacing=20.0)
    lying = [data_set_in_other_vr(data) for data in files]
    assert all(_scan(data) is None for data in lying)
    expected = preprocess.preprocess_study(files, size=16).volume
    assert np.array_equal(preprocess.preprocess_study(lying, size=16).volume, expected)


@pytest.mark.parametrize("transfer_syntax", ["explicit", "rle"])
def test_an_element_written_after_the_pixel_data_refuses_the_file(transfer_syntax):
    """The header is read up to the pixel data, as tag order puts it last: a rescale written after it
    would be left unread and the intercept taken as 0 (HU off by 1024). Padding after it is no element."""
    files = phantom.study_files("series", slices=16, rows=32, columns=32, rescale="per_slice", transfer_syntax=transfer_syntax)

    def rescale_last(data: bytes) -> bytes:
        ds = pydicom.dcmread(io.BytesIO(data))
        intercept = f"{float(ds.RescaleIntercept):g}".encode()
        del ds.RescaleIntercept
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        value = intercept + b" " * (len(intercept) % 2)
        return buffer.getvalue() + struct.pack("<HH2sH", 0x0028, 0x1052, b"DS", len(value)) + value

    refusal = r"^file 1: element \(0028,1052\) follows the pixel data, out of tag order: not read$"
    with pytest.raises(CorruptDicomError, match=refusal):
        parse([Blob(rescale_last(files[0]), "file 1")])
    padded, _ = parse([Blob(files[0] + bytes(16), "file 1")])  # zeros after the data set: no element
    assert len(padded) == 1
