"""DICOM chest-CT study -> the trained model's input tensor [1, 1, S, S, S] (docs/model.md).

Public API: `preprocess_study` (bytes in), `read_study` (path -> bytes), `PreprocessedStudy`,
the `StudyError` hierarchy with `printable` and `shown` (study text as messages show it), the series
`SelectionRule`, `phantom` (synthetic studies as DICOM), `available_cpus` (the default worker count),
`write_atomically` (result files), and what tells a study's files by their first `HEAD_BYTES` bytes
(`looks_like_dicom`, `is_zip`).
No Triton imports: the serving layer, the CLI, benchmarks and tests all call these functions.
`preprocess_study`, `PreprocessedStudy` and `MODES` load on first use: they bring torch and
SimpleITK (seconds), which a client that only reads studies from disk never needs.
"""

from . import errors
from .dicom import looks_like_dicom
from .errors import *  # noqa: F403  (the StudyError hierarchy, printable and shown, listed in errors.__all__)
from .output import write_atomically
from .series import SELECTION_RULE, SelectionRule
from .sources import HEAD_BYTES, is_zip, read_study
from .workers import available_cpus

_PIPELINE = ("preprocess_study", "PreprocessedStudy", "MODES")
_LAZY_MODULES = ("phantom",)  # loaded on use: `python -m preprocess.phantom` then runs it once, as __main__


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    if name in _PIPELINE:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [  # noqa: PLE0604 (the pipeline names and the error classes are strings too)
    *_PIPELINE,
    "read_study",
    "HEAD_BYTES",
    "is_zip",
    "looks_like_dicom",
    "SelectionRule",
    "SELECTION_RULE",
    *_LAZY_MODULES,
    "available_cpus",
    "write_atomically",
    *errors.__all__,
]
