"""preprocess: which series of a study is classified, and why each other one is not."""

from __future__ import annotations

import re

import pydicom
import pytest
from helpers import edit

import preprocess
from preprocess import phantom

S = 24


def _series(**options) -> list[bytes]:
    return phantom.study_files("series", rows=32, columns=32, **options)


def _relabel(files: list[bytes], uid: str, change=None) -> list[bytes]:
    """The files as series `uid` of the same study, each further edited by change(ds, k)."""

    def relabel(ds, k):
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, f"{uid}.{k + 1}"
        if change is not None:
            change(ds, k)

    return edit(files, relabel)


def _selection(files: list[bytes]) -> tuple[preprocess.PreprocessedStudy, dict]:
    study = preprocess.preprocess_study(files, size=S)
    return study, study.meta["series_selection"]


def test_a_partial_slab_loses_to_the_full_chest_however_thin():
    """Thinnest-first alone chose a 16 mm slab of 1 mm slices over the 80 mm chest series."""
    full = _series(slices=20, slice_spacing=4.0)
    slab = _relabel(_series(slices=16, slice_spacing=1.0), "1.2.3.1")
    study, selection = _selection(full + slab)
    assert study.meta["original_shape"][0] == 20
    assert "among the 1 of 2 usable series that cover at least 80% of the widest one's 80 mm" in selection["reason"]
    assert selection["skipped"] == [
        {
            "series_uid": "1.2.3.1",
            "reason": "usable (16 axial CT slices, 1.00 mm apart, 32x32 pixels) but covers 16 mm, less than 80% of the widest one's 80 mm",
        }
    ]
    thin = _relabel(_series(slices=64, slice_spacing=1.0), "1.2.3.2")  # 64 mm: 80% of the chest, so it competes
    study, selection = _selection(full + thin)
    assert study.series_uid == "1.2.3.2"
    assert selection["skipped"][0]["reason"].endswith("but thicker slices than the chosen series")


def test_a_tie_goes_to_the_smaller_uid_as_text_and_the_other_says_so():
    files = _series(slices=20)
    study, selection = _selection(_relabel(files, "1.2.3.9") + _relabel(files, "1.2.3.10"))
    assert study.series_uid == "1.2.3.10"  # "1.2.3.10" < "1.2.3.9" as text
    (skipped,) = selection["skipped"]
    assert skipped["series_uid"] == "1.2.3.9"
    assert skipped["reason"].endswith("but the same spacing and number of slices as the chosen series, whose SeriesInstanceUID sorts first")


def _iodine_map(ds, k):
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL", "IODINE"]
    ds.RescaleType, ds.RescaleSlope, ds.RescaleIntercept = "MGML", 0.1, 0


def test_a_series_of_another_quantity_than_hu_is_skipped_for_the_hu_one():
    """A dual-energy iodine map (mg/ml), thinner than the HU series beside it, is neither chosen nor read as HU."""
    iodine = _relabel(_series(slices=40, slice_spacing=2.0), "1.2.3.1", _iodine_map)
    study, selection = _selection(_series(slices=20, slice_spacing=4.0) + iodine)
    assert study.meta["original_spacing_mm"][0] == 4.0 and study.meta["rescale"]["intercept"] == -1024.0
    assert selection["skipped"] == [{"series_uid": "1.2.3.1", "reason": "RescaleType MGML: the stored values are not Hounsfield units"}]
    named = edit(iodine, lambda ds, k: setattr(ds, "RescaleType", "DOE JOHN"))  # a name fits a code string
    with pytest.raises(preprocess.NotHounsfieldError, match=r"^RescaleType <unrecognised RescaleType>: the stored values are not"):
        preprocess.preprocess_study(named, size=S)


def test_an_enhanced_ct_frame_of_another_quantity_than_hu_is_refused():
    def electron_density(ds, k):
        for group in ds.PerFrameFunctionalGroupsSequence:
            group.PixelValueTransformationSequence[0].RescaleType = "EDW"

    files = edit(phantom.study_files("multiframe", slices=16, rows=32, columns=32), electron_density)
    with pytest.raises(preprocess.NotHounsfieldError, match=r"^RescaleType EDW: the stored values are not Hounsfield units$"):
        preprocess.preprocess_study(files, size=S)


def _encapsulated_as(syntax: str):
    """Files whose pixel data are encapsulated in `syntax`: written as MPEG2 (pydicom writes no unknown
    syntax), then relabelled in place (both UIDs have 23 characters)."""

    def relabel(files: list[bytes]) -> list[bytes]:
        def mpeg2(ds, k):
            ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
            ds.PixelData = pydicom.encaps.encapsulate([bytes(64)])
            ds["PixelData"].VR = "OB"

        return [data.replace(pydicom.uid.MPEG2MPML.encode(), syntax.encode(), 1) for data in edit(files, mpeg2)]

    return relabel


def _native_as(syntax: str):
    """Uncompressed files that declare `syntax` (a UID of 19 characters, as Explicit VR Little Endian's)."""
    return lambda files: [data.replace(pydicom.uid.ExplicitVRLittleEndian.encode() + b"\0", syntax.encode() + b"\0", 1) for data in files]


@pytest.mark.parametrize(
    ("unsupported", "named"),
    [
        pytest.param(_encapsulated_as("1.2.840.10008.1.2.4.110"), "1.2.840.10008.1.2.4.110", id="JPEG-XL"),
        pytest.param(_encapsulated_as(pydicom.uid.MPEG2MPML), "MPEG2 Main Profile / Main Level", id="MPEG2"),
        pytest.param(_native_as("1.2.840.10008.1.2.7"), "1.2.840.10008.1.2.7", id="unknown-native"),
    ],
)
def test_a_series_no_installed_decoder_reads_is_skipped_for_a_usable_one(unsupported, named):
    """The preferred series in an unsupported syntax refused the whole study as a DecodeError."""
    thin = unsupported(_relabel(_series(slices=40, slice_spacing=2.0), "1.2.3.1"))
    study, selection = _selection(_series(slices=20, slice_spacing=4.0) + thin)
    assert study.meta["original_spacing_mm"][0] == 4.0
    message = f"pixel data in transfer syntax {named}, which no installed decoder reads"
    assert selection["skipped"] == [{"series_uid": "1.2.3.1", "reason": f"file 21: {message}"}]
    with pytest.raises(preprocess.UnsupportedPixelDataError, match=f"^file 1: {re.escape(message)}$"):
        preprocess.preprocess_study(thin, size=S)


def test_every_transfer_syntax_of_a_series_is_checked_before_decoding():
    """One file of the series in a syntax no decoder reads refused the study as a DecodeError."""
    files = _series(slices=20)
    files[3:4] = _encapsulated_as("1.2.840.10008.1.2.4.110")(files[3:4])
    message = "file 4: pixel data in transfer syntax 1.2.840.10008.1.2.4.110, which no installed decoder reads"
    with pytest.raises(preprocess.UnsupportedPixelDataError, match=f"^{re.escape(message)}$"):
        preprocess.preprocess_study(files, size=S)


def test_an_image_without_patient_id_is_the_patient_its_study_names():
    """One file without PatientID in a one-patient series counted as a second patient."""
    one_without = edit(_series(slices=20), lambda ds, k: delattr(ds, "PatientID") if k == 3 else None)
    assert preprocess.preprocess_study(one_without, size=S).meta["original_shape"][0] == 20
    unnamed_study = edit(_series(slices=20, seed=9), lambda ds, k: delattr(ds, "PatientID"))  # names nobody: its own patient
    with pytest.raises(preprocess.MixedPatientsError, match=r"^images of 2 patients"):
        preprocess.preprocess_study(one_without + unnamed_study, size=S)
