"""preprocess: every kind of bad input gets its typed StudyError with a clear, PHI-free message."""

from __future__ import annotations

import bz2
import io
import json
import logging
import math
import struct
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pydicom
import pytest
from helpers import edit, packaged_file, position

import preprocess
from preprocess import phantom
from preprocess.sources import expand
from settings import InputLimits

S = 24


@pytest.fixture(scope="module")
def series() -> list[bytes]:
    return phantom.study_files("series", slices=20, rows=64, columns=64, pixel_spacing=5.0, slice_spacing=5.0)


def refused(files, error, message, **options):
    with pytest.raises(error, match=message) as info:
        preprocess.preprocess_study(files, size=S, **options)
    assert isinstance(info.value, preprocess.StudyError)
    for value in phantom.FAKE_PHI.values():
        assert value not in str(info.value)
    return info.value


def zipped(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_nothing_sent():
    refused([], preprocess.EmptyInputError, "no files to read")
    refused([b""], preprocess.EmptyInputError, "file 1 is empty")


def test_non_dicom_bytes():
    refused([b"hello, this is a text file", b"\x89PNG\r\n\x1a\n" + bytes(100)], preprocess.NotDicomError, "no DICOM images found")


def test_truncated_pixel_data(series):
    files = list(series)
    files[7] = files[7][: len(files[7]) - 1000]
    refused(files, preprocess.DecodeError, "file 8: pixel data is truncated")


def test_truncated_header(series):
    files = list(series)
    files[3] = files[3][:300]
    refused(files, preprocess.CorruptDicomError, "file 4")


def test_single_slice(series):
    refused(series[:1], preprocess.TooFewSlicesError, "only 1 slice: a chest CT volume needs at least 16")


def test_no_usable_series_lists_every_reason(series):
    same_patient_mr = edit(
        [packaged_file("MR_small.dcm").read_bytes()], lambda ds, k: setattr(ds, "PatientID", phantom.FAKE_PHI["PatientID"])
    )
    error = refused([*series[:5], *same_patient_mr], preprocess.NoUsableSeriesError, "no usable chest-CT series among 2")
    assert sorted(s["reason"] for s in error.skipped) == ["only 5 slices: a chest CT volume needs at least 16", "series is MR, not CT"]


def test_no_usable_series_message_names_the_first_five_and_counts_the_rest(series):
    """2000 one-slice series made a 127 KB one-line message."""
    files = edit(series[:8], lambda ds, k: setattr(ds, "SeriesInstanceUID", f"1.2.826.0.1.{k}"))
    error = refused(files, preprocess.NoUsableSeriesError, r"series 5: only 1 slice[^;]*; and 3 more\)$")
    assert len(error.skipped) == 8 and "series 6" not in str(error)


def test_a_series_is_ct_only_if_every_image_says_so(series):
    """The first image CT and the others MR: refused like an MR series (every image is checked, not only the first)."""

    def mr(ds, k):
        if k:
            ds.Modality = "MR"

    refused(edit(series, mr), preprocess.NotCTError, "^19 of 20 images of the series are MR, not CT$")


def test_localizer_only(series):
    files = edit(series, lambda ds, k: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    refused(files, preprocess.LocalizerError, "localizer")


def test_empty_and_corrupt_zip(series):
    refused([zipped({})], preprocess.ArchiveError, "empty")
    refused([zipped({"folder/": b""})], preprocess.ArchiveError, "empty")
    refused([b"PK\x03\x04" + bytes(200)], preprocess.ArchiveError, "not a readable ZIP archive")
    damaged = bytearray(zipped({"IM1": series[0]}))
    damaged[60:160] = bytes(100)
    refused([bytes(damaged)], preprocess.ArchiveError, "archive member 1")


@pytest.mark.parametrize("name", ["../evil.dcm", "study/../../evil.dcm", "/etc/evil.dcm", "C:/evil.dcm", "..\\evil.dcm"])
def test_zip_paths_escaping_the_archive_are_refused(series, name):
    refused([zipped({"ok.dcm": series[0], name: series[1]})], preprocess.UnsafeArchiveError, "unsafe path in ZIP archive")


def test_zip_bomb_is_refused_before_unpacking():
    refused([zipped({"bomb.dcm": bytes(50 * 2**20)})], preprocess.UnsafeArchiveError, "treated as a ZIP bomb")


def _bzip2_bomb(unpacked: int) -> bytes:
    """A one-member ZIP whose bzip2 member unpacks to `unpacked` zero bytes but declares twice its compressed size."""
    compressor = bz2.BZ2Compressor(9)
    comp = b"".join(compressor.compress(bytes(2**20)) for _ in range(unpacked // 2**20)) + compressor.flush()
    name, size = b"IM1.dcm", 2 * len(comp) + 1000
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 12, 0, 0, 0, len(comp), size, len(name), 0) + name + comp
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 12, 0, 0, 0, len(comp), size, len(name), 0, 0, 0, 0, 0, 0)
    central += name
    return local + central + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(local), 0)


def test_bzip2_and_lzma_members_are_refused_before_unpacking(series, monkeypatch):
    """zipfile bounds only deflate's output: a bzip2 or LZMA chunk unpacks whole, whatever size it declares."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_LZMA) as archive:
        archive.writestr("IM1.dcm", series[0])
    bomb = _bzip2_bomb(2**26)  # 64 MiB from ~200 bytes, declared ~1 KiB
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda *args, **kwargs: pytest.fail("a member was unpacked"))
    refused([bomb], preprocess.ArchiveError, "archive member 1: ZIP compression bzip2 is not supported")
    refused([buffer.getvalue()], preprocess.ArchiveError, "ZIP compression LZMA is not supported")


def test_a_dicom_file_whose_preamble_starts_like_a_zip_is_read_as_dicom(series):
    study = preprocess.preprocess_study([b"PK\x03\x04" + data[4:] for data in series], size=S)
    assert study.volume.shape[-1] == S


def test_archive_limits(series):
    small = InputLimits(max_archive_members=3, max_uncompressed_bytes=10 * len(series[0]), max_archive_depth=1)
    with pytest.raises(preprocess.UnsafeArchiveError, match="more than the limit of 3 members"):
        expand([zipped({f"IM{k}": data for k, data in enumerate(series[:4])})], small)
    nested = InputLimits(max_archive_members=3)  # counted over all archives of a study, nested ones too
    with pytest.raises(preprocess.UnsafeArchiveError, match="more than the limit of 3 members"):
        expand([zipped({"a.zip": zipped({"IM1": series[0], "IM2": series[1]}), "IM3": series[2]})], nested)
    with pytest.raises(preprocess.UnsafeArchiveError, match="unpacks to"):
        expand(
            [zipped({f"IM{k}": data for k, data in enumerate(series[:3])}), zipped({f"X{k}": data for k, data in enumerate(series[3:11])})],
            InputLimits(max_uncompressed_bytes=10 * len(series[0])),
        )
    with pytest.raises(preprocess.ArchiveError, match="nested more than 1 levels"):
        expand([zipped({"inner.zip": zipped({"IM1": series[0]})})], small)


def test_nested_zip_within_the_limit_is_read(series):
    inner = zipped({f"IM{k}": data for k, data in enumerate(series)})
    study = preprocess.preprocess_study([zipped({"export/inner.zip": inner})], size=S)
    assert study.meta["original_shape"] == [20, 64, 64]


def test_absurd_dimensions_are_refused_before_allocating(series):
    files = edit(series, lambda ds, k: (setattr(ds, "Rows", 60000), setattr(ds, "Columns", 60000)))
    refused(files, preprocess.InputTooLargeError, "60000x60000 pixels exceed the limit of 1024x1024")


def test_absurd_frame_count_is_refused_before_allocating(series):
    files = edit(series[:1], lambda ds, k: setattr(ds, "NumberOfFrames", 10**9))
    refused(files, preprocess.InputTooLargeError, "1000000000 frames, more than the limit of 2000")


def test_inconsistent_slice_sizes(series):
    other = phantom.study_files("series", slices=20, rows=64, columns=48, pixel_spacing=5.0, slice_spacing=5.0)
    refused(series[:10] + other[10:], preprocess.InconsistentSlicesError, "different sizes \\(64x48, 64x64\\)")


def test_missing_pixel_data(series):
    def drop(ds, k):
        if k == 4:
            del ds.PixelData

    refused(edit(series, drop), preprocess.MissingPixelDataError, "1 of 20 images have no pixel data")


def test_missing_geometry(series):
    def drop(ds, k):
        if k == 2:
            del ds.ImagePositionPatient

    refused(edit(series, drop), preprocess.MissingGeometryError, "no 3D geometry")


def test_gap_in_the_stack(series):
    refused(series[:9] + series[10:], preprocess.SliceGapError, "steps from 5.00 to 10.00 mm .* 1 gap: missing slices")


def _moved(series, offsets):
    """The series with slice k moved by offsets[k] mm along z (the fixture's files run feet to head)."""

    def move(ds, k):
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], round(position(ds) + offsets[k], 4)]

    return edit(series, move)


def test_slices_drifting_off_an_even_grid_are_refused(series):
    """Each step within 10% of the median (9 of 4.55 mm, one of 5, 9 of 5.45) yet the middle slices lie
    4 mm from the even grid the volume assumes: resampled, the content would land 4 mm off."""
    steps = [4.55] * 9 + [5.0] + [5.45] * 9
    offsets = np.concatenate([[0.0], np.cumsum(steps)]) - 5.0 * np.arange(20)
    refused(
        _moved(series, offsets),
        preprocess.SliceGapError,
        r"uneven slice spacing: slice 1[01] of 20 .* lies 4.05 mm from .* even 5.00 mm grid",
    )
    jitter = np.random.default_rng(0).uniform(-0.002, 0.002, 20)  # what real scanners' positions do
    assert preprocess.preprocess_study(_moved(series, jitter), size=S).meta["original_spacing_mm"][0] == pytest.approx(5.0, abs=1e-3)


def test_two_slices_at_one_position(series):
    def clash(ds, k):
        if k == 6:
            ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], position(ds) - 5.0]

    refused(edit(series, clash), preprocess.DuplicateSliceError, "share one position")


def test_mixed_orientations(series):
    def tilt(ds, k):
        if k == 3:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, -0.0998334]

    refused(edit(series, tilt), preprocess.InconsistentSlicesError, "different orientations")


def test_gantry_tilt(series):
    shift = math.tan(math.radians(12)) * 5.0

    def tilt(ds, k):
        z = position(ds)
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], float(ds.ImagePositionPatient[1]) + shift * z / 5.0, z]

    refused(edit(series, tilt), preprocess.GantryTiltError, "gantry tilt of about 12.0 degrees")


def test_sagittal_series(series):
    def sagittal(ds, k):
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [position(ds), -100, 100]

    refused(edit(series, sagittal), preprocess.NotAxialError, "not axial \\(slice normal 90 degrees")


@pytest.mark.parametrize("degrees, message", [(40, "40 degrees from the nearest patient axis, at most 30"), (20, None)])
def test_slices_rotated_in_their_plane(series, degrees, message):
    """Axial slices whose rows run 40 degrees off the patient's x axis: flips and transposes would leave
    the chest rotated in the model's input, so it is refused; 20 degrees is within the limit."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    rotated = edit(series, lambda ds, k: setattr(ds, "ImageOrientationPatient", [c, s, 0, -s, c, 0]))
    if message:
        refused(rotated, preprocess.NotAxialError, f"slices are rotated in their plane \\(image rows or columns {message}\\)")
    else:
        assert preprocess.preprocess_study(rotated, size=S).volume.shape == (1, 1, S, S, S)


def test_all_air_is_an_empty_volume(series):
    def air(ds, k):
        ds.PixelData = np.full((ds.Rows, ds.Columns), 24, dtype=np.uint16).tobytes()  # -1000 HU

    for mode in preprocess.MODES:
        refused(edit(series, air), preprocess.EmptyVolumeError, "no voxel above -1000 HU", mode=mode)


@pytest.mark.parametrize("options", [dict(mode="fast"), dict(mode="reference"), dict(device="cpu")], ids=["fast", "reference", "device"])
def test_blank_pixel_data_is_refused_not_answered(series, options):
    """Wiped slices (all 0 with intercept 0: 0 HU everywhere) passed the crop whole and got a confident answer."""

    def blank(ds, k):
        ds.PixelData = bytes(len(ds.PixelData))
        ds.RescaleIntercept = 0

    message = r"^the images hold one value \(0 HU\): blank or wiped pixel data, nothing to classify$"
    refused(edit(series, blank), preprocess.EmptyVolumeError, message, **options)


def test_colour_and_unsupported_bit_depths(series):
    def rgb(ds, k):
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.PixelData = np.zeros((ds.Rows, ds.Columns, 3), dtype=np.uint8).tobytes()

    def float32(ds, k):
        ds.BitsAllocated = ds.BitsStored = 32
        ds.HighBit = 31
        ds.PixelData = np.zeros((ds.Rows, ds.Columns), dtype=np.uint32).tobytes()

    def grey_with_three_samples(ds, k):
        rgb(ds, k)
        ds.PhotometricInterpretation = "MONOCHROME2"

    refused(edit(series, rgb), preprocess.UnsupportedPixelDataError, r"colour images \(RGB\) are not CT slices")
    refused(edit(series, grey_with_three_samples), preprocess.UnsupportedPixelDataError, "3 samples per pixel: a CT slice has one")
    refused(edit(series, float32), preprocess.UnsupportedPixelDataError, "32-bit pixels are not supported for CT")


def test_invalid_rescale(series):
    refused(edit(series, lambda ds, k: setattr(ds, "RescaleSlope", 0)), preprocess.InconsistentSlicesError, "slope must be positive")


def test_programming_errors_are_not_study_errors(series):
    with pytest.raises(ValueError, match="mode must be one of") as info:
        preprocess.preprocess_study(series, mode="turbo")
    assert not isinstance(info.value, preprocess.StudyError)
    with pytest.raises(TypeError, match="sequence of byte strings"):
        preprocess.preprocess_study(series[0])


def _as_text(keyword: str, value):
    """Store a value as text whatever it is (pydicom would refuse a non-number in a DS element)."""
    from pydicom.datadict import tag_for_keyword

    def change(ds, k):
        if keyword in ds:
            del ds[keyword]
        ds.add_new(tag_for_keyword(keyword), "LO", value)

    return change


@pytest.mark.parametrize(
    "keyword, value, message",
    [
        ("ImagePositionPatient", ["0", "0", "nan"], "ImagePositionPatient is not a finite number in 20 of 20 slices"),
        ("ImageOrientationPatient", ["1", "0", "0", "0", "inf", "0"], "ImageOrientationPatient is not a finite number"),
        ("PixelSpacing", ["abc", "5"], "PixelSpacing is not a finite number"),
        ("RescaleSlope", "inf", "RescaleSlope is not a finite number"),
        ("RescaleIntercept", "x", "RescaleIntercept is not a finite number"),
        ("RescaleSlope", "1e300", "RescaleSlope 1e\\+300 / RescaleIntercept -1024 are outside what CT uses"),
        ("RescaleSlope", "1e-9", r"RescaleSlope 1e-09 / RescaleIntercept -1024 are outside what CT uses \(slope 0.025 to 1000,"),
        ("RescaleIntercept", "-1e9", "RescaleIntercept -1e\\+09 are outside what CT uses"),
        ("PixelSpacing", ["0.001", "0.001"], r"PixelSpacing 0.001\\0.001 mm is outside 0.05-20 mm"),
    ],
)
def test_non_finite_or_absurd_geometry_and_rescale_are_named(series, keyword, value, message):
    """NaN, infinity, text or absurd values never reach the volume: the attribute is named."""
    refused(edit(series, _as_text(keyword, value)), preprocess.ImplausibleValueError, message)


@pytest.mark.filterwarnings("error")  # found by the fuzzer: the spacing comparison divided by zero first
@pytest.mark.parametrize("first", [True, False])
def test_a_pixel_spacing_of_zero_is_named(series, first):
    def zero(ds, k):
        if k == 0 or not first:
            ds.PixelSpacing = [0, 0]

    message = f"PixelSpacing is not positive in {1 if first else 20} of 20 slices"
    refused(edit(series, zero), preprocess.ImplausibleValueError, message)


def test_slices_packed_closer_than_any_ct_are_refused(series):
    def squash(ds, k):
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], position(ds) / 1000]

    refused(edit(series, squash), preprocess.ImplausibleValueError, "slices 0.005 mm apart: outside 0.05-20 mm")


def test_a_broken_value_in_an_unused_attribute_or_another_series_refuses_nothing(series):
    """A malformed InstanceNumber is not needed; a second series with NaN geometry is skipped, named."""
    text_instance = edit(series, _as_text("InstanceNumber", "x"))
    assert preprocess.preprocess_study(text_instance, size=S).volume.shape == (1, 1, S, S, S)
    other = phantom.study_files("series", slices=20, rows=64, columns=64, pixel_spacing=5.0, slice_spacing=2.5, seed=9)
    broken = edit(other, _as_text("PixelSpacing", ["nan", "nan"]))
    study = preprocess.preprocess_study(series + broken, size=S)
    assert study.series_uid == preprocess.preprocess_study(series, size=S).series_uid
    (skipped,) = study.meta["series_selection"]["skipped"]
    assert "PixelSpacing is not a finite number" in skipped["reason"]


def test_a_folder_is_read_iteratively_bounded_and_only_its_dicom_files(tmp_path):
    study = phantom.write_study(tmp_path / "study", form="series", slices=20, rows=64, columns=64)
    with open(study / "export.bin", "wb") as big:  # a 3 GiB non-DICOM file beside the slices: never read whole
        big.truncate(3 * 2**30)
    (study / "notes.txt").write_text("not DICOM")
    assert len(preprocess.read_study(study)) == 20
    deep = tmp_path / "deep"
    deep.mkdir()
    path = deep
    for _ in range(40):  # deeper than the limit: refused, without recursion
        path = path / "d"
        path.mkdir()
    with pytest.raises(preprocess.InputTooLargeError, match="folders nested more than 32 levels deep"):
        preprocess.read_study(deep)
    with pytest.raises(preprocess.InputTooLargeError, match=r"holds 0\.2 MiB of DICOM, more than the limit of 0\.1 MiB"):
        preprocess.read_study(study, InputLimits(max_uncompressed_bytes=2**30 // 10_000))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("nothing here")
    with pytest.raises(preprocess.EmptyInputError, match="no DICOM or ZIP files"):
        preprocess.read_study(tmp_path / "empty")


def test_an_unreadable_part_of_a_folder_refuses_the_study_without_its_path(tmp_path, monkeypatch):
    """Half a study must not be classified; tests run as root, where permissions do not stop reads,
    so the refusals the kernel would give are raised where the folder and a file are opened."""
    from preprocess import sources

    study = phantom.write_study(tmp_path / "Smith_John", form="series", slices=20, rows=64, columns=64)
    (study / "sub").mkdir()
    real_scandir, real_open = sources.os.scandir, open

    def scandir(path):
        if str(path).endswith("sub"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(sources.os, "scandir", scandir)
    with pytest.raises(preprocess.UnreadableInputError, match=r"a folder 1 level down cannot be read \(Permission denied\)") as info:
        preprocess.read_study(study)
    assert "Smith" not in str(info.value)
    monkeypatch.setattr(sources.os, "scandir", real_scandir)
    victim = sorted(study.glob("*.dcm"))[3]

    def guarded_open(path, *args, **kwargs):
        if str(path) == str(victim):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", guarded_open)
    with pytest.raises(preprocess.UnreadableInputError, match=r"a file 0 levels down cannot be read \(Permission denied\)") as info:
        preprocess.read_study(study)
    assert "Smith" not in str(info.value)


def _stored_as_8_bit(ds):
    """Pixels squeezed into 8 bits (a display-level copy), as some converters and lossy exports store them."""
    stored = ds.pixel_array.astype(np.int32)
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = (stored >> 4).astype(np.uint8).tobytes()


def test_a_slice_stored_with_other_pixel_attributes_refuses_the_series(series):
    """One 8-bit slice among 16-bit ones would be decoded into the 16-bit volume as air."""

    def one_8_bit(ds, k):
        if k == 7:
            _stored_as_8_bit(ds)

    refused(edit(series, one_8_bit), preprocess.InconsistentSlicesError, "slices are stored differently: BitsAllocated 16 and 8")


def test_values_without_rescale_are_hu_only_when_they_can_be(series):
    """Without RescaleIntercept, 8-bit or unsigned values are refused; signed 16-bit values are read as HU."""

    def no_rescale(ds):
        del ds.RescaleSlope
        del ds.RescaleIntercept

    def eight_bit(ds, k):
        _stored_as_8_bit(ds)
        no_rescale(ds)

    def signed_hu(ds, k):
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
        ds.PixelData = hu.astype(np.int16).tobytes()
        no_rescale(ds)

    refused(edit(series, eight_bit), preprocess.NotHounsfieldError, "no RescaleIntercept: 8-bit unsigned stored values are not Hounsfield")
    refused(edit(series, lambda ds, k: no_rescale(ds)), preprocess.NotHounsfieldError, "12-bit unsigned")
    refused(
        edit(series, lambda ds, k: no_rescale(ds) if k % 2 else None),
        preprocess.InconsistentSlicesError,
        "RescaleIntercept is missing in 10 of 20",
    )
    expected = preprocess.preprocess_study(series, size=S).volume
    np.testing.assert_allclose(preprocess.preprocess_study(edit(series, signed_hu), size=S).volume, expected, atol=1e-6)


def test_series_of_two_patients_are_never_chosen_between_silently(series):
    """The other patient's thinner series would win the ranking: refused unless the series is named."""
    other = phantom.study_files("series", slices=20, rows=64, columns=64, pixel_spacing=5.0, slice_spacing=2.5, seed=9)
    other_patient = edit(other, lambda ds, k: setattr(ds, "PatientID", "OTHER-7"))
    message = r"^images of 2 patients \(2 series\): a study is one patient's, so none is chosen$"
    error = refused(series + other_patient, preprocess.MixedPatientsError, message)
    assert "OTHER-7" not in str(error)
    chosen = preprocess.preprocess_study(series, size=S)
    named = preprocess.preprocess_study(series + other_patient, size=S, series_uid=chosen.series_uid)
    np.testing.assert_array_equal(named.volume, chosen.volume)
    anonymous = [edit(files, lambda ds, k: delattr(ds, "PatientID")) for files in (series, other)]  # two studies, no IDs
    refused(anonymous[0] + anonymous[1], preprocess.MixedPatientsError, "images of 2 patients")
    thick_same_patient = phantom.study_files("zip", slices=24, rows=64, columns=64, extras=True)
    assert preprocess.preprocess_study(thick_same_patient, size=S).meta["series_selection"]["skipped"]


def test_usable_series_of_two_studies_are_never_chosen_between_silently(series):
    """A prior exam beside the current one (one patient): its thinner series would win the ranking.
    Unusable series of another study (a dose report, a scout filed elsewhere) do not count."""
    import pydicom

    patient = pydicom.dcmread(io.BytesIO(series[0])).PatientID
    prior = phantom.study_files("series", slices=20, rows=64, columns=64, pixel_spacing=5.0, slice_spacing=2.5, seed=9)
    prior = edit(prior, lambda ds, k: setattr(ds, "PatientID", patient))
    message = r"^usable series of 2 studies \(2 series\): one study is classified at a time, so none is chosen$"
    refused(series + prior, preprocess.MixedStudiesError, message)
    chosen = preprocess.preprocess_study(series, size=S)
    named = preprocess.preprocess_study(series + prior, size=S, series_uid=chosen.series_uid)
    np.testing.assert_array_equal(named.volume, chosen.volume)
    unusable = edit(prior[:2], lambda ds, k: None)  # two slices: too few for a volume
    assert preprocess.preprocess_study(series + unusable, size=S).series_uid == chosen.series_uid


def test_a_localizer_filed_in_the_volume_series_is_set_aside(series):
    """Some scanners give the scout the series UID of the volume: it must not refuse the volume."""
    import pydicom

    scout = pydicom.dcmread(io.BytesIO(series[0]))
    scout.SOPInstanceUID = scout.SOPInstanceUID[:60] + ".9"
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    buffer = io.BytesIO()
    scout.save_as(buffer, enforce_file_format=True)
    study = preprocess.preprocess_study([*series, buffer.getvalue()], size=S)
    np.testing.assert_array_equal(study.volume, preprocess.preprocess_study(series, size=S).volume)
    assert "1 localizer image in the series set aside" in study.meta["warnings"]


def test_slices_that_reuse_one_sop_instance_uid_are_read_by_position(series):
    """A broken exporter giving every slice one UID must not turn 20 slices into 1; exact copies still collapse."""
    same_uid = edit(series, lambda ds, k: setattr(ds, "SOPInstanceUID", "1.2.3.4"))
    study = preprocess.preprocess_study(same_uid + same_uid[:3], size=S)
    np.testing.assert_array_equal(study.volume, preprocess.preprocess_study(series, size=S).volume)
    assert study.meta["warnings"][-2:] == [
        "3 duplicate copies of slices ignored",
        "19 slices reuse another slice's SOPInstanceUID at a different position: read by position",
    ]


def test_reference_mode_refuses_a_1mm_grid_beyond_its_limit_before_decoding():
    """20 slices of 64x64 at 20 mm (a 170 KB upload) span a 1261 x 1261 x 381 mm grid: 606 M voxels."""
    sparse = phantom.study_files("series", slices=20, rows=64, columns=64, pixel_spacing=20.0, slice_spacing=20.0)
    refused(
        sparse,
        preprocess.InputTooLargeError,
        r"the 1 mm grid of this series would hold 606 M voxels \(381 x 1261 x 1261\), more than reference mode's limit of 268 M",
        mode="reference",
    )
    assert preprocess.preprocess_study(sparse, size=S).volume.shape == (1, 1, S, S, S)  # fast mode never builds that grid


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("1.2.840.10008", "1.2.840.10008"),
        ("ü 中 ok", "ü 中 ok"),
        ("a\x1b[2Jb", "a\\x1b[2Jb"),  # a terminal escape
        ("1.2.3\n[FORGED] all normal", "1.2.3\\n[FORGED] all normal"),  # a second log line
        ("M\udcdcLLER", "M\\udcdcLLER"),  # a Latin-1 file name read as UTF-8
        ("abc\u202edcba", "abc\\u202edcba"),  # a right-to-left override
    ],
)
def test_printable_text_can_neither_forge_a_line_nor_drive_a_terminal(text, shown):
    assert preprocess.printable(text) == shown


NAME = phantom.FAKE_PHI["PatientName"]


def emitted(files, caplog, **options) -> tuple[preprocess.PreprocessedStudy | preprocess.StudyError, list[str], list[logging.LogRecord]]:
    """preprocess_study's result (or the StudyError it raised), the warnings and the log records
    (pydicom's included) emitted meanwhile."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            outcome = preprocess.preprocess_study(files, size=S, **options)
        except preprocess.StudyError as error:
            outcome = error
    return outcome, [str(warning.message) for warning in caught], list(caplog.records)


def _transfer_syntax(files: list[bytes], value: str) -> list[bytes]:
    """Explicit VR little endian files whose TransferSyntaxUID holds `value` (as long as the UID, or shorter)."""
    explicit = pydicom.uid.ExplicitVRLittleEndian.encode() + b"\0"
    return [data.replace(explicit, value.encode().ljust(len(explicit), b"\0"), 1) for data in files]


def _without_image(sop_class: str) -> bytes:
    """An image-less object (as a structured report is) whose SOPClassUID holds `sop_class`."""
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.3.4"
    ds.Modality = "SR"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _photometric(value: str):
    return lambda ds, k: setattr(ds, "PhotometricInterpretation", value)


def _character_set(value: str):
    return lambda ds, k: setattr(ds, "SpecificCharacterSet", value)


def _deflated(ds, k):
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian


@pytest.fixture(scope="module")
def small_rle() -> list[bytes]:
    return phantom.study_files("series", slices=16, rows=32, columns=32, transfer_syntax="rle")


@pytest.mark.parametrize(
    "misfiled",
    [
        pytest.param(lambda series, rle: _transfer_syntax(series, "1.2." + NAME), id="TransferSyntaxUID"),
        pytest.param(
            lambda series, rle: _transfer_syntax(phantom.study_files("multiframe", slices=16, rows=32, columns=32), "1.3." + NAME),
            id="TransferSyntaxUID-enhanced",
        ),
        pytest.param(lambda series, rle: [*series, _without_image(NAME)], id="SOPClassUID"),
        pytest.param(lambda series, rle: edit(rle, _photometric("MONOCHROME2" + NAME)), id="PhotometricInterpretation"),
        pytest.param(
            lambda series, rle: edit(phantom.study_files("multiframe", slices=16, rows=32, columns=32), _character_set(NAME)),
            id="SpecificCharacterSet-enhanced",
        ),
    ],
)
@pytest.mark.filterwarnings("ignore:Unknown encoding")  # pydicom, while the test writes the files
def test_pydicom_never_warns_or_logs_a_misfiled_value(series, small_rle, misfiled, caplog):
    """pydicom's value checks quote the value they find invalid, on stderr (the server log) and its logger."""
    _, warned, records = emitted(misfiled(series, small_rle), caplog)
    assert not [text for text in warned if "Jane" in text]
    assert not [record.getMessage() for record in records if record.name.startswith("pydicom")]


def test_only_a_real_specific_character_set_is_blanked():
    """An Enhanced CT file without SpecificCharacterSet whose private element holds its tag's bytes:
    read as it is (a search for the tag's bytes blanked the megabyte after them and refused the file)."""
    files = phantom.study_files("multiframe", slices=16, rows=32, columns=32)

    def planted(ds, k):
        ds.add_new(0x00090010, "LO", "TEST")
        ds.add_new(0x00091001, "OB", b"\x08\x00\x05\x00" + (1 << 20).to_bytes(4, "little") + bytes(8))

    expected = preprocess.preprocess_study(files, size=S).volume
    assert np.array_equal(preprocess.preprocess_study(edit(files, planted), size=S).volume, expected)


@pytest.mark.filterwarnings("ignore:Unknown encoding")  # pydicom, while the test writes the files
def test_pydicom_messages_reach_neither_stderr_nor_the_log_of_a_process(series, tmp_path):
    """What a server's stub does (stderr is the server log): a deflated study whose SpecificCharacterSet
    holds a name; pydicom decodes it itself and warns with the value, which the process filters out."""
    for k, data in enumerate(edit(edit(series, _deflated), _character_set(NAME))):
        (tmp_path / f"{k}.dcm").write_bytes(data)
    code = (
        "import logging, sys, preprocess; logging.basicConfig(level=logging.DEBUG); "
        f"study = preprocess.preprocess_study(preprocess.read_study({str(tmp_path)!r}), size={S}); print(study.meta['transfer_syntaxes'])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and pydicom.uid.DeflatedExplicitVRLittleEndian in done.stdout, done.stderr[-2000:]
    assert "Jane" not in done.stderr and "pydicom" not in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize(
    ("value", "vr", "expected"),
    [
        ("CT", "CS", "CT"),
        ("MONOCHROME2", "CS", "MONOCHROME2"),
        ("", "CS", ""),
        (NAME, "CS", "<invalid Keyword>"),
        ("ct", "CS", "<invalid Keyword>"),
        ("MONOCHROME2 PLUS1", "CS", "<invalid Keyword>"),  # 17 characters
        ("1.2.840.10008.1.2.1", "UI", "1.2.840.10008.1.2.1"),
        ("1." + "2" * 62, "UI", "1." + "2" * 62),
        ("1." + "2" * 63, "UI", "<invalid Keyword>"),
        ("1.2." + NAME, "UI", "<invalid Keyword>"),
        ("1.2.3\n[FORGED] all normal", "UI", "<invalid Keyword>"),
        ("", "UI", "<invalid Keyword>"),
    ],
)
def test_a_header_value_is_shown_only_when_it_fits_its_vr(value, vr, expected):
    assert preprocess.shown(value, vr, "Keyword") == expected


@pytest.mark.parametrize(
    ("value", "keyword", "expected"),
    [
        ("MR", "Modality", "MR"),
        ("DOE JOHN", "Modality", "<unrecognised Modality>"),  # fits a code string
        (NAME, "Modality", "<invalid Modality>"),
        ("YBR_FULL_422", "PhotometricInterpretation", "YBR_FULL_422"),
        ("SMITH", "PhotometricInterpretation", "<unrecognised PhotometricInterpretation>"),
        ("MGML", "RescaleType", "MGML"),
        ("DOE", "RescaleType", "<unrecognised RescaleType>"),
    ],
)
def test_a_coded_value_is_shown_only_as_one_of_its_standard_terms(value, keyword, expected):
    assert preprocess.shown(value, "CS", keyword) == expected


def _set(keyword: str, value: str, only: int | None = None):
    def change(ds, k):
        if only is None or k == only:
            setattr(ds, keyword, value)

    return change


def _other_series(files: list[bytes], change) -> list[bytes]:
    """A second series of the same study, edited by change(ds, k)."""

    def other(ds, k):
        ds.SeriesInstanceUID = "1.2.3.999"
        ds.SOPInstanceUID += ".9"
        change(ds, k)

    return edit(files, other)


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # pydicom, while the test writes the files
@pytest.mark.parametrize(
    ("misfiled", "expected"),
    [
        pytest.param(lambda s: edit(s, _set("Modality", NAME)), "series is <invalid Modality>, not CT", id="Modality"),
        pytest.param(lambda s: edit(s, _set("Modality", "DOE JOHN")), "series is <unrecognised Modality>, not CT", id="Modality-code"),
        pytest.param(
            lambda s: edit(s, _set("PhotometricInterpretation", "DOE JOHN")),
            "colour images (<unrecognised PhotometricInterpretation>) are not CT slices",
            id="PhotometricInterpretation-code",
        ),
        pytest.param(
            lambda s: edit(s, _set("PhotometricInterpretation", NAME)),
            "colour images (<invalid PhotometricInterpretation>) are not CT slices",
            id="PhotometricInterpretation",
        ),
        pytest.param(
            lambda s: edit(s, _set("PhotometricInterpretation", "MONOCHROME2" + NAME, only=3)),
            "slices are stored differently: PhotometricInterpretation <invalid PhotometricInterpretation> and MONOCHROME2",
            id="PhotometricInterpretation-one-slice",
        ),
        pytest.param(
            lambda s: _transfer_syntax(s, "1.2." + NAME),
            "pixel data in transfer syntax <invalid TransferSyntaxUID>, which no installed decoder reads",
            id="TransferSyntaxUID",
        ),
        pytest.param(
            lambda s: [*s, _without_image(NAME)],
            "file 21 is a DICOM object without an image (<invalid SOPClassUID>): skipped",
            id="SOPClassUID",
        ),
        pytest.param(  # not taken for a truncated CT image either
            lambda s: [*s, _without_image(NAME + " Image Storage")],
            "without an image (<invalid SOPClassUID>): skipped",
            id="SOPClassUID-image",
        ),
        pytest.param(
            lambda s: edit(s, _set("StudyInstanceUID", "1.2." + NAME)), '"study_uid": "<invalid StudyInstanceUID>"', id="StudyInstanceUID"
        ),
        pytest.param(
            lambda s: edit(s, _set("SeriesInstanceUID", "1.2." + NAME)), '"chosen": "<invalid SeriesInstanceUID>"', id="SeriesInstanceUID"
        ),
        pytest.param(lambda s: edit(s, _set("SOPInstanceUID", "1.2." + NAME)), '["<invalid SOPInstanceUID>", ', id="SOPInstanceUID"),
        pytest.param(
            lambda s: s + _other_series(s, _set("Modality", NAME)),
            '"series_uid": "1.2.3.999", "reason": "series is <invalid Modality>, not CT"',
            id="Modality-skipped-series",
        ),
    ],
)
def test_a_misfiled_header_value_is_in_no_message_log_line_or_meta(series, misfiled, expected, caplog):
    """A patient's name misfiled in a coded value or a UID is never quoted: where the message or
    meta would show the value, it shows "<invalid KEYWORD>"."""
    outcome, warned, records = emitted(misfiled(series), caplog)
    if isinstance(outcome, preprocess.StudyError):
        shown_text = [str(outcome), json.dumps(outcome.skipped if isinstance(outcome, preprocess.NoUsableSeriesError) else [])]
    else:
        shown_text = [json.dumps(outcome.meta), outcome.study_uid, outcome.series_uid]
    texts = shown_text + warned + [record.getMessage() for record in records]
    for value in phantom.FAKE_PHI.values():
        assert not [text for text in texts if value in text]
    assert expected in "\n".join(shown_text)


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_a_uid_can_forge_no_log_line(series, caplog):
    """A StudyInstanceUID with a line break would forge a line of the server log after each warning."""
    forged = edit(series, _set("StudyInstanceUID", "1.2.3\n[FORGED] study normal"))
    study, _, records = emitted([*forged, b"not DICOM"], caplog)
    assert study.study_uid == study.meta["study_uid"] == "<invalid StudyInstanceUID>"
    lines = [record.getMessage() for record in records if record.name == "preprocess"]
    assert "study <invalid StudyInstanceUID>: file 21 is not a DICOM file: skipped" in lines
    assert not [line for line in lines if "\n" in line or "FORGED" in line]
    error, _, _ = emitted(series, caplog, series_uid="1.2.3\n[FORGED] " + NAME)
    assert str(error) == "series <invalid SeriesInstanceUID> is not in the study (1 series found)"


def _latin1_name(series: list[bytes], where: slice) -> bytes:
    """A ZIP of the series whose last member's name holds a Latin-1 byte under the UTF-8 flag (an
    archiver that sets the flag for every name), in the headers `where` picks (local, central)."""
    name = NAME + "-\u00fc.dcm"  # non-ASCII: zipfile sets the UTF-8 flag
    archive = zipped({**{f"{k}.dcm": data for k, data in enumerate(series)}, name: series[0]})
    utf8, latin1 = name.encode(), name.encode("latin-1") + b" "  # same length
    parts = archive.split(utf8)
    assert len(parts) == 3  # the local header, the central directory
    chosen = range(2)[where]
    return parts[0] + b"".join((latin1 if k in chosen else utf8) + part for k, part in enumerate(parts[1:]))


def test_a_zip_name_that_is_not_the_utf8_it_claims_is_named_as_such(series):
    """The refusal names the file name that is not UTF-8, not only that the archive is not readable."""
    message = r"^file 1: a file name in the ZIP archive is not valid UTF-8, although the archive marks it as UTF-8 \(re-create"
    refused([_latin1_name(series, slice(None))], preprocess.ArchiveError, message)
    message = r"^file 1, archive member 21: its file name is not valid UTF-8, although the archive marks it as UTF-8"
    refused([_latin1_name(series, slice(0, 1))], preprocess.ArchiveError, message)


def test_a_zip_member_that_cannot_be_opened_is_not_named(series, monkeypatch):
    """zipfile's errors quote the member's name (a folder name often holds the patient's)."""
    archive = bytearray(zipped({f"{NAME}/IM1.dcm": series[0]}))
    archive[archive.index(b"PK\x01\x02") + 8] |= 0x1  # marked encrypted in the central directory
    monkeypatch.setattr("preprocess.sources._check_member", lambda *args: None)  # which refuses it before it is opened
    refused([bytes(archive)], preprocess.ArchiveError, r"^file 1, archive member 1: damaged ZIP member \(RuntimeError\)$")


def test_a_series_whose_files_belong_to_two_studies_is_refused(series):
    """A prior exam relabelled with the current series' UID (or a UID reused) would be stacked with it
    into one volume, slices interleaved, and answered under one study."""
    uid = pydicom.dcmread(io.BytesIO(series[0])).SeriesInstanceUID
    prior = phantom.study_files("series", slices=20, rows=64, columns=64, pixel_spacing=5.0, slice_spacing=5.0, seed=9)
    relabelled = edit(
        prior,
        lambda ds, k: (
            setattr(ds, "SeriesInstanceUID", uid),
            setattr(ds, "ImagePositionPatient", [*ds.ImagePositionPatient[:2], position(ds) + 2.5]),
        ),
    )
    refused(series + relabelled, preprocess.MixedStudiesError, r"^the series' files belong to 2 studies \(StudyInstanceUID differs\)")
    each_its_own = edit(series, lambda ds, k: setattr(ds, "StudyInstanceUID", f"1.2.826.0.1.{k + 1}"))
    refused(each_its_own, preprocess.MixedStudiesError, "belong to 20 studies")


def test_copies_of_a_slice_with_other_pixel_data_refuse_the_series(series):
    """Exact copies are read once (test_slices_that_reuse_one_sop_instance_uid_are_read_by_position);
    copies that differ would be read from whichever came first."""
    other = edit(series[5:8], lambda ds, k: setattr(ds, "PixelData", (ds.pixel_array + 100).astype(ds.pixel_array.dtype).tobytes()))
    for files in (series + other, other + series):
        refused(files, preprocess.InconsistentSlicesError, r"^3 slices sent again with other pixel data \(the same SOPInstanceUID")


def test_pixel_data_longer_than_its_header_says_is_refused(series):
    """A wrong Rows keeps part of each image, a wrong Columns scrambles them: pydicom cuts the excess
    off in silence. Zeros after the image are padding, and read (pydicom's MR_small_padded.dcm has a
    row of them)."""
    for keyword in ("Rows", "Columns"):
        halved = edit(series, lambda ds, k, keyword=keyword: setattr(ds, keyword, getattr(ds, keyword) // 2))
        refused(halved, preprocess.CorruptDicomError, r"^file 1: pixel data holds 8192 bytes where its header describes 4096 .*is wrong$")
    one_row_short = edit(series, lambda ds, k: setattr(ds, "Rows", 63))
    refused(one_row_short, preprocess.CorruptDicomError, "describes 8064")
    expected = preprocess.preprocess_study(series, size=S).volume
    for pad in (bytes(8), bytes(128 * 3)):  # less than a row (64 x 2 bytes), and three rows of zeros
        padded = edit(series, lambda ds, k, pad=pad: setattr(ds, "PixelData", ds.PixelData + pad))
        np.testing.assert_array_equal(preprocess.preprocess_study(padded, size=S).volume, expected)
    data_after = edit(series, lambda ds, k: setattr(ds, "PixelData", ds.PixelData + b"\x01\x00" * 64))
    refused(data_after, preprocess.CorruptDicomError, "describes 8192")


def test_a_request_parameter_error_is_a_study_error_of_its_own():
    """A caller's unusable request parameter is refused like a bad study (400, a safe message) but is
    counted under its own reason (the type name), never as the feed's SeriesNotFoundError."""
    assert issubclass(preprocess.RequestParameterError, preprocess.StudyError)
    assert not issubclass(preprocess.RequestParameterError, preprocess.SeriesNotFoundError)
    assert "RequestParameterError" in preprocess.__all__
