"""Typed errors for studies that cannot become a model input.

Every message is meant for the person who sent the study (radiology IT): it says what is wrong in
plain words and never contains patient name, ID or birth date. Files are named by their position
in the input ("file 3, archive member 17"), never by path, because folder names often carry PHI.
Anything raised by this package that is not a StudyError is an internal bug.
"""

from __future__ import annotations

import re

from pydicom.pixels.common import PhotometricInterpretation


class StudyError(ValueError):
    """Base class: the study (not the software) is the problem; the message is safe to show."""


class EmptyInputError(StudyError):
    """Nothing was sent, or every element was empty."""


class NotDicomError(StudyError):
    """No DICOM image was found among the inputs."""


class CorruptDicomError(StudyError):
    """A file claims to be DICOM (or is needed as one) but cannot be read: truncated or damaged."""


class UnreadableInputError(StudyError):
    """A file or folder of the study cannot be read: reading the rest would classify part of it."""


class ArchiveError(StudyError):
    """A ZIP archive is empty, damaged, encrypted or nested too deeply."""


class UnsafeArchiveError(ArchiveError):
    """A ZIP archive with member paths that escape its folder, or a ZIP bomb."""


class InputTooLargeError(StudyError):
    """Declared sizes beyond settings.INPUT_LIMITS: refused before any memory is allocated."""


class StudyTooLargeError(InputTooLargeError):
    """The study's files hold more bytes than `max_uncompressed_bytes` (checked from their sizes)."""


class SeriesNotFoundError(StudyError):
    """The SeriesInstanceUID asked for is not in the study."""


class RequestParameterError(StudyError):
    """A request parameter the server cannot use: an unknown name (a misspelt `series_uid` would
    otherwise be ignored, and another series answered) or a value that is no SeriesInstanceUID.
    The caller's mistake, not the study feed's: counted under its own reason."""


class MixedPatientsError(StudyError):
    """Images of more than one patient: no series is chosen across patients unless the caller names it."""


class MixedStudiesError(StudyError):
    """Usable series of more than one study (a prior exam beside the current one): which one the
    triage is for cannot be told from the images, so none is chosen unless the caller names it."""


class NoUsableSeriesError(StudyError):
    """Several series were found and none is a usable chest-CT volume; `skipped` says why each."""

    def __init__(self, message: str, skipped: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.skipped = list(skipped or [])


class UnusableSeriesError(StudyError):
    """Base for the reasons a single series cannot be used as the model input."""


class NotCTError(UnusableSeriesError):
    """The series is not CT (MR, PET, secondary capture, ...)."""


class LocalizerError(UnusableSeriesError):
    """The series is a localizer / scout / topogram, not a volume."""


class NotAxialError(UnusableSeriesError):
    """The slices are sagittal, coronal or strongly oblique."""


class TooFewSlicesError(UnusableSeriesError):
    """Too few slices to be a chest volume (e.g. a single image)."""


class MissingGeometryError(UnusableSeriesError):
    """Slices without position, orientation or pixel spacing: the volume cannot be built."""


class ImplausibleValueError(UnusableSeriesError):
    """A geometry or rescale value is not a finite number, or outside what a CT series can have."""


class InconsistentSlicesError(UnusableSeriesError):
    """Slices of one series disagree in size, pixel spacing, orientation or how their pixels are stored."""


class NotHounsfieldError(UnusableSeriesError):
    """Stored values that are not Hounsfield units: a RescaleType other than HU (an iodine map, electron
    density), or no RescaleIntercept with values that cannot be HU as they are (8-bit or unsigned)."""


class DuplicateSliceError(UnusableSeriesError):
    """Two different slices at the same position."""


class SliceGapError(UnusableSeriesError):
    """Uneven slice spacing: missing slices or a mix of reconstructions."""


class GantryTiltError(UnusableSeriesError):
    """Slices shifted sideways from one to the next (gantry tilt): not corrected, refused."""


class MissingPixelDataError(UnusableSeriesError):
    """Image objects without pixel data."""


class UnsupportedPixelDataError(UnusableSeriesError):
    """Pixel data this package does not decode (colour, float, unknown compression)."""


class DecodeError(CorruptDicomError):
    """Compressed or native pixel data that fails to decode, or is shorter than declared."""


class EmptyVolumeError(StudyError):
    """No voxel above the region-of-interest threshold, or every voxel of one value (blank pixel data): nothing to classify."""


def printable(text: str) -> str:
    """Text that came from a study (a file name, a header value) as a message may show it: control,
    format and unpaired surrogate characters become backslash escapes, so the text can neither
    forge a log line nor drive a terminal, and it still encodes as UTF-8."""
    if text.isprintable():
        return text
    return "".join(character if character.isprintable() else character.encode("unicode_escape").decode("ascii") for character in text)


# what a value of each VR may hold (PS3.5 6.2), as `shown` quotes it; stripped of padding first
_REPERTOIRES = {"CS": re.compile(r"[A-Z0-9 _]{0,16}"), "UI": re.compile(r"[0-9.]{1,64}")}

# the coded values a message quotes, each only as one of its standard terms: a code string can hold a
# name ("DOE JOHN" fits CS). Modality: PS3.3 C.7.3.1.1.1, current and retired terms; RescaleType:
# PS3.3 C.11.1.1.2; PhotometricInterpretation: the terms pydicom's pixel handlers know.
DEFINED_TERMS = {
    "Modality": frozenset(
        "ANN AR ASMT AU BDUS BI BMD CFM CR CT CTPROTOCOL DG DMS DOC DX ECG EEG EMG EOG EPS ES FID GM HC HD IO IOL IVOCT "
        "IVUS KER KO LEN LS M3D MG MR NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PA PLAN POS PR PT PX REG RESP RF RG "
        "RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA "
        "XA XAPROTOCOL XC AS CD CF CP CS DD DF DM DS EC FA FS LP MA MS OPR ST VF".split()
    ),
    "PhotometricInterpretation": frozenset(term.value for term in PhotometricInterpretation),
    "RescaleType": frozenset({"OD", "HU", "US", "MGML", "Z_EFF", "ED", "EDW", "HU_MOD", "PCT"}),
}


def fits_vr(value: str, vr: str) -> bool:
    """Whether `value` holds only the characters, and no more than the length, its VR allows."""
    return _REPERTOIRES[vr].fullmatch(value) is not None


def shown(value: str, vr: str, keyword: str) -> str:
    """A header value as a message, log line or meta may show it: the value where it fits its VR's
    characters and length, else "<invalid KEYWORD>"; for a keyword of `DEFINED_TERMS`, only one of
    its terms, else "<unrecognised KEYWORD>". A misfiled header (a patient's name in Modality or a
    UID) must not reach the sender, the server log or a report through a message."""
    if not fits_vr(value, vr):
        return f"<invalid {keyword}>"
    terms = DEFINED_TERMS.get(keyword)
    return value if terms is None or value in terms else f"<unrecognised {keyword}>"


__all__ = [name for name, value in list(globals().items()) if isinstance(value, type) and issubclass(value, StudyError)] + [
    "DEFINED_TERMS",
    "fits_vr",
    "printable",
    "shown",
]
