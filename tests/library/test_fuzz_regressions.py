"""Inputs the fuzzer (`python -m fuzz`) or the issue found, generated here: each is refused with a
typed StudyError naming the problem, before any allocation its header alone would cause.

Memory bounds: a compressed frame's own header (JPEG 2000 SIZ / JP2 image header, JPEG and JPEG-LS
start of frame) must agree with Rows/Columns, ZIP members and deflated data sets are bounded by a
compression ratio whatever their size, and a malformed value refuses a study only where it is used.
"""

from __future__ import annotations

import io
import struct
import tempfile
import zipfile
import zlib

import numpy as np
import pydicom
import pytest
from helpers import edit, packaged_file
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info

import preprocess
from fuzz.target import DEPTHS, FORMS, SEPARATOR, Target, encode, split
from preprocess import phantom
from preprocess.dicom import _j2k_size, decode_into, parse
from preprocess.sources import Blob, expand

TINY = dict(slices=16, rows=8, columns=8, pixel_spacing=20.0, slice_spacing=20.0)
S = 16


def refused(files, error, message):
    with pytest.raises(error, match=message) as info:
        preprocess.preprocess_study(files, size=S, threads=1)
    for value in phantom.FAKE_PHI.values():
        assert value not in str(info.value)
    return info.value


def zipped(members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


# found by the fuzzer


def test_zip_member_without_a_name_is_read_not_an_index_error():
    """ZipInfo.is_dir() raised IndexError on an empty member name."""
    series = phantom.study_files("series", **TINY)
    members = [(zipfile.ZipInfo(""), series[0]), *((f"IM{k}", data) for k, data in enumerate(series[1:]))]
    study = preprocess.preprocess_study([zipped(members)], size=S)
    assert study.meta["original_shape"] == [16, 8, 8]


def overlong_rle_run(data: bytes) -> bytes:
    """The slice with its first RLE segment starting with a run of 128 bytes, twice the segment's size."""
    frame = next(pydicom.encaps.generate_frames(pydicom.dcmread(io.BytesIO(data)).PixelData, number_of_frames=1))
    segment = data.index(frame) + struct.unpack_from("<I", frame, 4)[0]
    return data[:segment] + b"\x81" + data[segment + 1 :]


def test_rle_decoder_panic_is_a_decode_error():
    """A run longer than its segment made pylibjpeg-rle panic (PanicException, a BaseException)."""
    series = phantom.study_files("series", transfer_syntax="rle", **TINY)
    refused([overlong_rle_run(data) for data in series], preprocess.DecodeError, "RLE Lossless, PanicException")


def test_file_meta_pydicom_cannot_convert_is_refused():
    """A TransferSyntaxUID with an unknown VR made pydicom raise NotImplementedError on conversion."""
    data = packaged_file("CT_small.dcm").read_bytes()
    at = data.index(b"\x02\x00\x10\x00UI")
    broken = data[: at + 4] + b"U." + data[at + 6 :]
    with pytest.raises(preprocess.CorruptDicomError, match="file 1 is a damaged or truncated DICOM file"):
        parse([Blob(broken, "file 1")])


def test_transfer_syntax_read_as_a_sequence_is_refused():
    """A TransferSyntaxUID encoded as a sequence holding an unknown VR: pydicom's text form of it raised
    NotImplementedError (found by the whole-pipeline fuzz run)."""
    data = packaged_file("CT_small.dcm").read_bytes()
    at = data.index(b"\x02\x00\x10\x00UI")
    length = struct.unpack_from("<H", data, at + 6)[0]
    item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + b"\x49\x47\x49\x4eAL\x02\x00xx" + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    sequence = b"\x02\x00\x10\x00SQ\x00\x00\xff\xff\xff\xff" + item + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    with pytest.raises(preprocess.CorruptDicomError, match="file 1: TransferSyntaxUID has a malformed value"):
        parse([Blob(data[:at] + sequence + data[at + 8 + length :], "file 1")])


# memory bounds


def with_codestream_size(data: bytes, rows: int, columns: int) -> bytes:
    """A JPEG 2000 slice whose codestream's SIZ marker claims rows x columns (the DICOM header unchanged)."""
    at = data.index(b"\xff\x4f\xff\x51")
    return data[: at + 8] + struct.pack(">II", columns, rows) + data[at + 16 :]


def test_jpeg2000_frame_claiming_20000_by_20000_pixels_is_refused_before_decoding():
    series = phantom.study_files("series", transfer_syntax="jpeg2000", **{**TINY, "rows": 32, "columns": 32})
    huge = [with_codestream_size(data, 20000, 20000) for data in series]
    assert max(len(data) for data in huge) < 10_000
    refused(huge, preprocess.DecodeError, "file 1: frame 1 is a JPEG 2000 image of 20000x20000 pixels .* header says 32x32")


def test_htj2k_frame_is_checked_like_jpeg2000():
    def as_htj2k(ds, k):
        ds.file_meta.TransferSyntaxUID = pydicom.uid.HTJ2KLossless

    series = phantom.study_files("series", transfer_syntax="jpeg2000", **{**TINY, "rows": 32, "columns": 32})
    refused(edit([with_codestream_size(d, 32, 20000) for d in series], as_htj2k), preprocess.DecodeError, "32x20000 pixels")


def jp2(header_rows: int, stream_rows: int) -> bytes:
    """A JP2 file (signature, file type, header with its image header box, codestream box)."""
    ihdr = struct.pack(">I4sIIHBBBB", 22, b"ihdr", header_rows, 32, 1, 15, 7, 0, 0)
    siz = b"\xff\x4f\xff\x51" + struct.pack(">HHIIIIIIIIH", 41, 0, 32, stream_rows, 0, 0, 32, stream_rows, 0, 0, 1) + b"\x0f\x01\x01"
    boxes = [(b"ftyp", b"jp2 \0\0\0\0jp2 "), (b"jp2h", ihdr), (b"jp2c", siz + b"\xff\xd9")]
    return b"\0\0\0\x0cjP  \r\n\x87\n" + b"".join(struct.pack(">I4s", 8 + len(body), kind) + body for kind, body in boxes)


def test_jp2_image_header_must_agree_with_its_codestream():
    assert _j2k_size(jp2(32, 32)) == (32, 32, 1)
    assert _j2k_size(jp2(20000, 32)) is None  # refused as "no readable JPEG 2000 frame header"
    assert _j2k_size(jp2(20000, 20000)) == (20000, 32, 1)  # then refused: not Rows x Columns


@pytest.mark.parametrize("name, start_of_frame", [("JPEG-lossy.dcm", b"\xff\xc1"), ("MR_small_jpeg_ls_lossless.dcm", b"\xff\xf7")])
def test_jpeg_and_jpeg_ls_frame_headers_must_agree_with_rows_and_columns(name, start_of_frame):
    data = packaged_file(name).read_bytes()
    at = data.index(start_of_frame)
    huge = data[: at + 5] + struct.pack(">HH", 20000, 20000) + data[at + 9 :]
    blobs = [Blob(huge, "file 1")]
    frames, _ = parse(blobs)
    out = np.empty((1, frames[0].rows, frames[0].columns), np.int32)
    with pytest.raises(preprocess.DecodeError, match="frame 1 is a JPEG image of 20000x20000 pixels"):
        decode_into(out, frames[:1], blobs, threads=1)


def test_zip_members_of_exactly_one_mib_do_not_escape_the_ratio_check():
    """Small members are not exempt from the ratio check: 2.3 MB of 1 MiB members unpack to 2.45 GB."""
    with pytest.raises(preprocess.UnsafeArchiveError, match=r"archive member 1: compression ratio .* treated as a ZIP bomb"):
        expand([zipped([(f"IM{k}", bytes(2**20)) for k in range(3)])])


def test_many_small_members_are_bounded_by_the_archive_ratio():
    """Members too small for their own ratio to mean anything are bounded by the archive's."""
    archive = zipped([(f"IM{k}", bytes(60_000)) for k in range(300)])
    with pytest.raises(preprocess.UnsafeArchiveError, match=r"unpacks to 17\.2 MiB, more than 200 times its size"):
        expand([archive])


def deflated_ct_small(private_value: bytes) -> bytes:
    """CT_small.dcm as a Deflated Explicit VR Little Endian file, with a private OB element added."""
    ds = pydicom.dcmread(packaged_file("CT_small.dcm"))
    ds.add_new(0x00091010, "OB", private_value)
    meta, body = DicomBytesIO(), DicomBytesIO()
    meta.is_little_endian = body.is_little_endian = True
    meta.is_implicit_VR, body.is_implicit_VR = False, False
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    write_file_meta_info(meta, ds.file_meta)
    write_dataset(body, ds)
    deflate = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return b"\0" * 128 + b"DICM" + meta.getvalue() + deflate.compress(body.getvalue()) + deflate.flush()


def test_deflate_bomb_in_a_dicom_file_is_refused_before_pydicom_inflates_it():
    data = deflated_ct_small(bytes(20 * 2**20))
    with pytest.raises(preprocess.InputTooLargeError, match=r"file 1: the deflated data set inflates to more than .* treated as a bomb"):
        parse([Blob(data, "file 1")])


def test_a_deflated_file_within_the_ratio_is_read_with_its_pixels():
    """The bound does not refuse ordinary deflated files: their pixels are read, not reported missing."""
    blobs = [Blob(packaged_file("image_dfl.dcm").read_bytes(), "file 1")]
    frames, _ = parse(blobs)
    out = np.empty((1, frames[0].rows, frames[0].columns), np.int16)
    decode_into(out, frames, blobs, threads=1)
    assert np.array_equal(out[0], pydicom.dcmread(packaged_file("image_dfl.dcm")).pixel_array)


@pytest.mark.timeout(60)
def test_bytes_after_a_deflated_data_set_over_one_mib_end_the_bound_check():
    """The bound's inflate loop spun forever (the fuzzer's timeout): once a call is cut at 1 MiB, the
    bytes after the stream's end stay in zlib's unconsumed_tail and nothing more comes out."""
    data = deflated_ct_small(np.random.default_rng(0).bytes(3 * 2**19)) + b"\xff" * 100  # 1.5 MiB that do not compress
    frames, _ = parse([Blob(data, "file 1")])
    assert [(frame.rows, frame.columns) for frame in frames] == [(128, 128)]


# malformed values: refused only where used, and named


def with_raw_value(files: list[bytes], keyword: str, value: bytes) -> list[bytes]:
    """Each explicit-VR file with one top-level element's value replaced (or inserted) as raw bytes:
    values pydicom would refuse to write."""
    tag = tag_for_keyword(keyword)
    element = struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, dictionary_VR(tag).encode(), len(value)) + value
    out = []
    for data in files:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        for other in ds.keys():
            raw = ds.get_item(other)
            start = raw.value_tell - (12 if raw.VR in ("OB", "OW", "SQ", "UN", "UT") else 8)
            if other >= tag:
                end = raw.value_tell + raw.length if other == tag else start
                out.append(data[:start] + element + data[end:])
                break
    return out


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("form, syntax", [("series", "explicit"), ("series", "rle"), ("multiframe", "explicit")])
def test_a_malformed_value_in_an_unused_attribute_refuses_nothing(form, syntax):
    """Scanned and read in place, scanned and decoded by pydicom, read by pydicom (Enhanced CT):
    a SpecificCharacterSet pydicom cannot look up refused the last two as undecodable or damaged."""
    series = phantom.study_files(form, transfer_syntax=syntax, **TINY)
    expected = preprocess.preprocess_study(series, size=S).volume
    unused = [("HighBit", b"\x0b"), ("WindowCenter", b"abc\\"), ("PatientWeight", b"x"), ("SpecificCharacterSet", b"\xff\xfe\x00\x01")]
    for keyword, value in unused:
        broken = with_raw_value(series, keyword, value)
        assert np.array_equal(preprocess.preprocess_study(broken, size=S).volume, expected), keyword


@pytest.mark.parametrize(
    "keyword, value",
    [("Rows", b"\x08\x00\x08\x00"), ("BitsAllocated", b"\x10"), ("NumberOfFrames", b"x "), ("PixelRepresentation", b"")],
)
def test_a_malformed_value_in_a_used_attribute_refuses_the_study_naming_it(keyword, value):
    series = phantom.study_files("series", **TINY)
    if value == b"":  # an empty value is the attribute's default, not malformed
        assert preprocess.preprocess_study(with_raw_value(series, keyword, value), size=S).volume.shape == (1, 1, S, S, S)
        return
    refused(with_raw_value(series, keyword, value), preprocess.CorruptDicomError, f"file 1: {keyword} has a malformed value$")


def test_a_multi_frame_file_sent_twice_is_compared_once_not_once_per_frame(monkeypatch):
    """Each frame's copy compared the whole object's pixel data: quadratic in the frame count."""
    multiframe = phantom.study_files("multiframe", **TINY)[0]
    compared = []
    pixel_bytes = preprocess.dicom._pixel_bytes
    monkeypatch.setattr("preprocess.dicom._pixel_bytes", lambda frame, blobs: compared.append(frame.blob) or pixel_bytes(frame, blobs))
    assert preprocess.preprocess_study([multiframe, multiframe], size=S, threads=1).volume.shape == (1, 1, S, S, S)
    assert len(compared) == 2


def legacy_multiframe(k: int, frames: int, rows: int, pixel_bytes: int) -> bytes:
    """A legacy multi-frame CT object (no functional groups, no positions) with `pixel_bytes` of pixel data."""
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = pydicom.uid.CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = f"1.2.3.{k}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", "1.2.3.4", "CT"
    ds.Rows = ds.Columns = rows
    ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.PixelData = bytes(pixel_bytes)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_the_frames_of_a_study_are_bounded_before_their_records_are_made(monkeypatch):
    """The frame limit counts the whole study, not each file: 2000 files of 2000 frames each would make 4 million records."""
    made = []
    frames = preprocess.dicom._frames
    monkeypatch.setattr("preprocess.dicom._frames", lambda *args: made.append(len(records := frames(*args))) or records)
    files = [legacy_multiframe(k, frames=2000, rows=1, pixel_bytes=4000) for k in range(6)]
    refused(files, preprocess.InputTooLargeError, "^file 6: the study's files hold more than the limit of 10000 frames in all$")
    assert sum(made) == 10_000


def test_multi_frame_pixel_data_far_short_of_its_frames_is_refused_while_parsing():
    """8 bytes of pixel data declared as 2000 frames of 512 x 512 made 2000 records before anything failed."""
    refused(
        [legacy_multiframe(0, frames=2000, rows=512, pixel_bytes=8)],
        preprocess.CorruptDicomError,
        r"^file 1: pixel data holds 8 bytes where its header describes 1048576000 \(2000 x 512 x 512\): truncated",
    )


# the fuzz target itself


@pytest.mark.parametrize("depth", DEPTHS)
def test_fuzz_target_passes_study_errors_and_raises_anything_else(depth, monkeypatch):
    """What `python -m fuzz` counts as a crash: any exception but a StudyError, in every form."""
    series = phantom.study_files("series", **TINY)
    target = Target(depth)
    for form in FORMS:
        assert split(encode(form, series[:3]))[1] == (series[:3] if form != "file" else [SEPARATOR.join(series[:3])])
        target(encode(form, series[:3]))  # too few slices (study, read) or read (header): no crash
    monkeypatch.setattr("preprocess.sources.expand", None)  # a bug in the reading path: TypeError
    monkeypatch.setattr("preprocess.pipeline.expand", None)
    monkeypatch.setattr("fuzz.target.expand", None)
    with pytest.raises(TypeError):
        target(encode("payload", series[:3]))


def test_the_fuzz_target_leaves_no_folder_behind(tmp_path, monkeypatch):
    """Each run of the harness removes its /tmp/fuzz-study-* folder, also when reading it raises."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    target, series = Target("header"), phantom.study_files("series", **TINY)[:2]
    target(encode("folder", series))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr("preprocess.read_study", None)  # a crash while the folder is read
    with pytest.raises(TypeError):
        target(encode("folder", series))
    assert list(tmp_path.iterdir()) == []
