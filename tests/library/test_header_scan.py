"""The fast header scanner (`preprocess.dicom._scan`) reads what pydicom reads, on every file that
pydicom and pydicom-data ship.

`parse` reads little-endian Part-10 headers with `_scan` and everything else with pydicom up to the
pixel data. Whichever reads a file, the outcome must be the same: equal frames and warnings, or the
same StudyError. Any other exception is a bug and fails the test as it is raised.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info

from preprocess.dicom import _scan, parse
from preprocess.errors import StudyError
from preprocess.sources import Blob, expand


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
