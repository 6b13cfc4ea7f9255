"""Compressed slices decoded by imagecodecs on every worker thread: the
stored values and HU must be those of the uncompressed study, and equal to what pydicom decodes,
for every lossless syntax, unsigned and signed, 12 and 16 bits stored; the rest goes to pydicom."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from helpers import packaged_file
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless

import preprocess
from preprocess import dicom, phantom
from preprocess.dicom import decode_into, parse
from preprocess.sources import Blob

imagecodecs = pytest.importorskip("imagecodecs")

SMALL = dict(slices=16, rows=64, columns=64, pixel_spacing=5.0, slice_spacing=8.0)
PIXELS = {"unsigned 12": (False, 12), "unsigned 16": (False, 16), "signed 12": (True, 12), "signed 16": (True, 16)}
CODECS = {
    "JPEG 2000 lossless": JPEG2000Lossless,
    "JPEG-LS lossless": JPEGLSLossless,
    "RLE": RLELossless,
    "JPEG lossless SV1": JPEGLosslessSV1,
}


def _recoded(data: bytes, signed: bool, bits: int, syntax: str | None) -> bytes:
    """One phantom slice with its HU stored in another pixel module, then compressed as `syntax`."""
    ds = pydicom.dcmread(io.BytesIO(data))
    hu = ds.pixel_array.astype(np.int64) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    intercept = 0 if signed else -1024
    stored = hu - intercept
    assert stored.min() >= (-(2 ** (bits - 1)) if signed else 0) and stored.max() < 2 ** (bits - signed)
    values = stored.astype(np.int16 if signed else np.uint16)
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = int(signed), bits, bits - 1
    ds.RescaleIntercept, ds.RescaleSlope = intercept, 1
    ds.PixelData = values.tobytes()
    if syntax in (JPEG2000Lossless, RLELossless):
        ds.compress(syntax, values)  # pylibjpeg-openjpeg's encoder (signed codestreams for signed data), pydicom's RLE
    elif syntax is not None:
        raw = values.view(np.uint16) & np.uint16(2**bits - 1)  # the stored bits, as DICOM holds them
        if syntax == JPEGLSLossless:  # CharLS writes 16-bit precision from uint16: keep the sign bits
            frame = imagecodecs.jpegls_encode(values.view(np.uint16) if signed else raw)
        else:  # libjpeg-turbo: lossless (SOF3), first-order prediction, BitsStored precision
            frame = imagecodecs.jpeg8_encode(raw, lossless=True, predictor=1, bitspersample=bits)
        ds.PixelData = encapsulate([bytes(frame)])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _decoded(files: list[bytes], threads: int = 2) -> tuple[np.ndarray, dict[str, int], list]:
    blobs = [Blob(data, f"file {k}") for k, data in enumerate(files, start=1)]
    frames, _ = parse(blobs)
    out = np.zeros((len(frames), frames[0].rows, frames[0].columns), np.int32)
    return out, decode_into(out, frames, blobs, threads=threads), frames


def _hu(out: np.ndarray, frames) -> np.ndarray:
    return out * np.array([f.slope for f in frames])[:, None, None] + np.array([f.intercept for f in frames])[:, None, None]


@pytest.fixture(scope="module")
def plain_series() -> list[bytes]:
    return phantom.study_files("series", **SMALL)


@pytest.mark.parametrize("pixels", PIXELS, ids=list(PIXELS))
@pytest.mark.parametrize("codec", CODECS, ids=list(CODECS))
def test_lossless_copies_of_a_ct_study_decode_to_the_uncompressed_values(plain_series, codec, pixels, monkeypatch):
    signed, bits = PIXELS[pixels]
    plain, counts, plain_frames = _decoded([_recoded(d, signed, bits, None) for d in plain_series])
    assert counts["native"] == len(plain_frames)
    compressed_files = [_recoded(d, signed, bits, CODECS[codec]) for d in plain_series]
    assert all(pydicom.dcmread(io.BytesIO(d)).file_meta.TransferSyntaxUID == CODECS[codec] for d in compressed_files)
    compressed, counts, frames = _decoded(compressed_files)
    assert counts == {"native": 0, "imagecodecs": len(frames), "pydicom": 0}  # every frame by the GIL-free decoder
    np.testing.assert_array_equal(compressed, plain)
    np.testing.assert_array_equal(_hu(compressed, frames), _hu(plain, plain_frames))
    monkeypatch.setattr(dicom, "DECODER", "pydicom")  # the previous path gives the same values
    by_pydicom, counts, _ = _decoded(compressed_files)
    assert counts == {"native": 0, "imagecodecs": 0, "pydicom": len(frames)}
    np.testing.assert_array_equal(by_pydicom, plain)


def test_a_multi_frame_object_is_decoded_frame_by_frame_on_the_workers():
    plain, _, _ = _decoded(phantom.study_files("multiframe", **SMALL))
    compressed, counts, frames = _decoded(phantom.study_files("multiframe", transfer_syntax="jpeg2000", **SMALL), threads=2)
    assert len(frames) == SMALL["slices"] and counts["imagecodecs"] == len(frames)
    np.testing.assert_array_equal(compressed, plain)


def test_the_pipeline_gives_the_same_volume_for_the_jpeg2000_copy():
    plain = preprocess.preprocess_study(phantom.study_files("series", **SMALL), size=16)
    j2k = preprocess.preprocess_study(phantom.study_files("series", transfer_syntax="jpeg2000", **SMALL), size=16)
    assert np.abs(j2k.volume - plain.volume).max() <= 1e-6


def _with_bits_above_stored(syntax: str | None, bit: int):
    """Unsigned 12-bit stored values (the phantom's) with `bit` set in a box, above BitsStored: a
    retired overlay plane or an encoder's garbage; compressed losslessly at 16 bits of precision."""
    import imagecodecs

    def change(ds, k):
        values = ds.pixel_array.astype(np.uint16)
        values[20:28, 4:28] |= np.uint16(bit)
        if syntax is None:
            ds.PixelData = values.tobytes()
            return
        encode = imagecodecs.jpeg2k_encode if syntax == JPEG2000Lossless else imagecodecs.jpegls_encode
        options = {"codecformat": "J2K", "reversible": True} if syntax == JPEG2000Lossless else {}
        ds.PixelData = encapsulate([encode(values, level=0, **options)])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax

    return change


@pytest.mark.parametrize("syntax", [None, JPEG2000Lossless, JPEGLSLossless], ids=["native", "jpeg2000", "jpeg-ls"])
@pytest.mark.parametrize("bit", [0x1000, 0x8000])
@pytest.mark.parametrize("decoder", dicom.DECODERS)
def test_bits_above_bits_stored_are_cleared_on_every_path(syntax, bit, decoder, monkeypatch):
    """pydicom clears them for native data but leaves JPEG 2000's and JPEG-LS's, and the native views
    kept them: a box read as +3999 HU, or wrapped to -32865 in the int16 volume."""
    from helpers import edit

    from preprocess.pipeline import stored_values
    from preprocess.series import select_series

    monkeypatch.setattr(dicom, "DECODER", decoder)
    clean = phantom.study_files("series", slices=16, rows=32, columns=32)
    dirty = edit(clean, _with_bits_above_stored(syntax, bit))
    stacks = []
    for files in (clean, dirty):
        blobs = [Blob(data, f"file {k}") for k, data in enumerate(files, start=1)]
        frames, _ = parse(blobs)
        stack, _ = select_series(frames)
        for in_place in (True, False):
            values = stored_values(stack, blobs, in_place=in_place, threads=1)
            stacks.append(np.stack([np.asarray(v, dtype=np.int32) for v in values]))
    for values in stacks[1:]:
        np.testing.assert_array_equal(values, stacks[0])
    plain = preprocess.preprocess_study(clean, size=16, threads=1).volume
    assert np.abs(preprocess.preprocess_study(dirty, size=16, threads=1).volume - plain).max() == 0


def test_an_object_pydicom_decodes_whole_is_bounded_by_all_its_frames(monkeypatch):
    """pydicom's pixel_array decodes every frame of a multi-frame object, also those set aside (1000
    localizer frames beside 16 kept ones): the bound is on the object, not the frames kept."""
    import dataclasses

    monkeypatch.setattr(dicom, "DECODER", "pydicom")
    monkeypatch.setattr(dicom, "INPUT_LIMITS", dataclasses.replace(dicom.INPUT_LIMITS, max_voxels=10_000))
    files = phantom.study_files("multiframe", transfer_syntax="jpeg2000", slices=16, rows=32, columns=32)
    blobs = [Blob(data, "file 1") for data in files]
    frames, _ = parse(blobs)
    kept = frames[:4]  # 4 x 32 x 32 voxels: within the limit, the object's 16 frames are not
    with pytest.raises(
        preprocess.InputTooLargeError, match=r"^file 1: 16 frames of 32x32 to decode at once, more than the limit of 10000 voxels$"
    ):
        decode_into(np.empty((4, 32, 32), np.int16), kept, blobs, threads=1)


# real files: imagecodecs where exact, pydicom for the rest; both equal to pydicom's pixel_array
FAST_FILES = [
    "693_J2KR.dcm",  # a CT slice, signed 16-bit
    "MR_small_jp2klossless.dcm",
    "emri_small_jpeg_2k_lossless.dcm",
    "MR2_J2KR.dcm",
    "RG1_J2KR.dcm",
    "RG3_J2KR.dcm",
    "J2K_pixelrep_mismatch.dcm",  # unsigned 13-bit codestream, PixelRepresentation 1: pydicom's sign correction
    "explicit_VR-UN.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "emri_small_jpeg_ls_lossless.dcm",
    "JPEG-LL.dcm",
    "JPGLosslessP14SV1_1s_1f_8b.dcm",
    "bad_sequence.dcm",
    "MR_small_RLE.dcm",
    "emri_small_RLE.dcm",
]
PYDICOM_FILES = ["693_J2KI.dcm", "MR2_J2KI.dcm", "JPEG2000.dcm", "JPEGLSNearLossless_16.dcm"]  # lossy: decoder arithmetic


@pytest.mark.parametrize("name", FAST_FILES + PYDICOM_FILES)
def test_packaged_compressed_files_decode_as_pydicom_decodes_them(name):
    path = packaged_file(name)
    out, counts, frames = _decoded([path.read_bytes()])
    assert counts[("imagecodecs" if name in FAST_FILES else "pydicom")] == len(frames)
    expected = pydicom.dcmread(path).pixel_array.reshape(out.shape)
    np.testing.assert_array_equal(out, expected.astype(np.int32))


@pytest.mark.parametrize("decoder", dicom.DECODERS)
def test_a_damaged_codestream_is_the_same_decode_error_on_either_path(plain_series, decoder, monkeypatch):
    data = bytearray(_recoded(plain_series[0], False, 12, JPEG2000Lossless))
    at = data.index(b"\xff\x4f\xff\x51")  # SOC, SIZ: kept, so the size check passes and the decoder runs
    end = at + 4 + int.from_bytes(data[at + 4 : at + 6], "big")
    data[end : end + 300] = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
    blobs = [Blob(bytes(data), "file 1")]
    frames, _ = parse(blobs)
    monkeypatch.setattr(dicom, "DECODER", decoder)
    message = r"^file 1: pixel data could not be decoded \(JPEG 2000 Image Compression \(Lossless Only\), RuntimeError\)$"
    with pytest.raises(preprocess.DecodeError, match=message):
        decode_into(np.zeros((1, 64, 64), np.int32), frames, blobs, threads=1)


@pytest.mark.parametrize("codec", ["JPEG lossless SV1", "JPEG-LS lossless"])
@pytest.mark.parametrize("decoder", dicom.DECODERS)
def test_a_jpeg_frame_cut_short_is_a_decode_error(plain_series, codec, decoder, monkeypatch):
    """Without its end-of-image marker a frame is cut short: imagecodecs and pydicom fill in the
    missing rows, each its own way, and report nothing."""
    ds = pydicom.dcmread(io.BytesIO(_recoded(plain_series[5], True, 16, CODECS[codec])))
    codestream = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([codestream[: len(codestream) * 7 // 10]])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    monkeypatch.setattr(dicom, "DECODER", decoder)
    with pytest.raises(preprocess.DecodeError, match=r"^file 1: frame 1 is cut short \(no JPEG end-of-image marker\)$"):
        _decoded([buffer.getvalue()])
    padded = ds.copy()
    padded.PixelData = encapsulate([codestream + b"\0\0"])  # trailing padding after the marker is not cut short
    buffer = io.BytesIO()
    padded.save_as(buffer, enforce_file_format=True)
    assert _decoded([buffer.getvalue()])[0].any()


@pytest.mark.parametrize("codec", ["JPEG 2000 lossless", "JPEG lossless SV1", "JPEG-LS lossless"])
@pytest.mark.parametrize("decoder", dicom.DECODERS)
def test_a_codestream_wider_than_bits_allocated_is_a_decode_error(plain_series, codec, decoder, monkeypatch):
    """12-bit samples under BitsAllocated = BitsStored = 8 are refused, not decoded with their high bits cut off."""
    ds = pydicom.dcmread(io.BytesIO(_recoded(plain_series[5], False, 12, CODECS[codec])))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    monkeypatch.setattr(dicom, "DECODER", decoder)
    message = r"^file 1: frame 1 is a JPEG.* image of 1[26]-bit samples, the DICOM header allocates 8 bits$"
    with pytest.raises(preprocess.DecodeError, match=message):
        _decoded([buffer.getvalue()])


def test_an_object_imagecodecs_fails_on_is_decoded_by_pydicom(plain_series, monkeypatch):
    files = [_recoded(d, True, 16, JPEG2000Lossless) for d in plain_series[:4]]
    expected, _, _ = _decoded(files)

    def fails(*args, **kwargs):
        raise RuntimeError("imagecodecs failed")

    monkeypatch.setattr(imagecodecs, "jpeg2k_decode", fails)
    for threads in (1, 2, 8):  # per object, and per frame (fewer objects than workers)
        out, counts, frames = _decoded(files, threads=threads)
        assert counts == {"native": 0, "imagecodecs": 0, "pydicom": len(frames)}
        np.testing.assert_array_equal(out, expected)


def test_the_jpeg2000_decoder_releases_the_gil():
    """While one thread decodes, another counts: a decoder that holds the GIL stops the count
    (measured: ~0.02 of the rate while sleeping for pylibjpeg-openjpeg, 0.4-1 for imagecodecs)."""
    from benchmarks.decoding import gil_check

    rates = gil_check()
    assert rates["imagecodecs"] > 0.1 and rates["imagecodecs"] > 3 * rates["pylibjpeg-openjpeg"], rates


@pytest.mark.parametrize("vr", ["OB", "OW"])
def test_big_endian_8_bit_pixels_read_as_pydicom_reads_them_by_their_vr(vr):
    """Explicit VR Big Endian (retired): 8-bit values in OW are in 16-bit words, bytes swapped in
    pairs; pydicom unswaps them only when told the VR, which the pixel data handed to it lacked."""

    def big_endian_8_bit(data: bytes) -> bytes:
        ds = pydicom.dcmread(io.BytesIO(data))
        values = np.clip(np.round((ds.pixel_array.astype(np.int32) - 1000) / 8), -128, 127).astype(np.int8)
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation, ds.RescaleSlope, ds.RescaleIntercept = 7, 1, 8, -24
        raw = values.tobytes()
        ds.PixelData = np.frombuffer(raw, "<u2").astype(">u2").tobytes() if vr == "OW" else raw
        ds["PixelData"].VR = vr
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian
        buffer = io.BytesIO()
        pydicom.filewriter.dcmwrite(buffer, ds, implicit_vr=False, little_endian=False, force_encoding=True)
        return buffer.getvalue()

    files = [big_endian_8_bit(data) for data in phantom.study_files("series", slices=16, rows=32, columns=32)]
    blobs = [Blob(data, f"file {k}") for k, data in enumerate(files, start=1)]
    frames, _ = parse(blobs)
    out = np.empty((len(frames), 32, 32), np.int16)
    decode_into(out, frames, blobs, threads=1)
    for k, frame in enumerate(frames):
        np.testing.assert_array_equal(out[k], pydicom.dcmread(io.BytesIO(files[frame.blob])).pixel_array)
