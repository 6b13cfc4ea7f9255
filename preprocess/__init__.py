"""DICOM chest-CT study -> the trained model's input tensor [1, 1, S, S, S] (SEED.md preprocessing).

Public API: `preprocess_study` (bytes in), `read_study` (path -> bytes), `PreprocessedStudy`,
the `StudyError` hierarchy, the series `SelectionRule`, and `phantom` (synthetic studies as DICOM).
No Triton imports: the serving layer, the CLI, benchmarks and tests all call these functions.
`preprocess_study`, `PreprocessedStudy` and `MODES` load on first use: they bring torch and
SimpleITK (seconds), which a client that only reads studies from disk never needs.
"""
from . import phantom
from .errors import (
    ArchiveError,
    CorruptDicomError,
    DecodeError,
    DuplicateSliceError,
    EmptyInputError,
    EmptyVolumeError,
    GantryTiltError,
    InconsistentSlicesError,
    InputTooLargeError,
    LocalizerError,
    MissingGeometryError,
    MissingPixelDataError,
    NoUsableSeriesError,
    NotAxialError,
    NotCTError,
    NotDicomError,
    SeriesNotFoundError,
    SliceGapError,
    StudyError,
    TooFewSlicesError,
    UnsafeArchiveError,
    UnsupportedPixelDataError,
    UnusableSeriesError,
)
from .series import SELECTION_RULE, SelectionRule
from .sources import read_study

_PIPELINE = ("preprocess_study", "PreprocessedStudy", "MODES")


def __getattr__(name: str):
    if name in _PIPELINE:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "preprocess_study",
    "read_study",
    "PreprocessedStudy",
    "MODES",
    "SelectionRule",
    "SELECTION_RULE",
    "phantom",
    "StudyError",
    "ArchiveError",
    "CorruptDicomError",
    "DecodeError",
    "DuplicateSliceError",
    "EmptyInputError",
    "EmptyVolumeError",
    "GantryTiltError",
    "InconsistentSlicesError",
    "InputTooLargeError",
    "LocalizerError",
    "MissingGeometryError",
    "MissingPixelDataError",
    "NoUsableSeriesError",
    "NotAxialError",
    "NotCTError",
    "NotDicomError",
    "SeriesNotFoundError",
    "SliceGapError",
    "TooFewSlicesError",
    "UnsafeArchiveError",
    "UnsupportedPixelDataError",
    "UnusableSeriesError",
]
