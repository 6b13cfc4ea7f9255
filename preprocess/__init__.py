"""DICOM chest-CT study -> the trained model's input tensor [1, 1, S, S, S] (SEED.md preprocessing).

Public API: `preprocess_study` (bytes in), `read_study` (path -> bytes), `PreprocessedStudy`,
the `StudyError` hierarchy, the series `SelectionRule`, and `phantom` (synthetic studies as DICOM).
No Triton imports: the serving layer, the CLI, benchmarks and tests all call these functions.
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
from .pipeline import MODES, PreprocessedStudy, preprocess_study
from .series import SELECTION_RULE, SelectionRule
from .sources import read_study

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
