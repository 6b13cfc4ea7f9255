"""Helpers for the preprocess tests: locate packaged DICOM files and edit phantom files."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import pydicom


def packaged_file(name: str) -> Path:
    """A test file shipped by pydicom or pydicom-data, found on disk (get_testdata_files may hit the network)."""
    import data_store
    import pydicom.data

    for folder in (Path(pydicom.data.__file__).parent / "test_files", Path(data_store.__file__).parent / "data"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(name)


def edit(files: list[bytes], change: Callable[[pydicom.Dataset, int], None]) -> list[bytes]:
    """Re-encode each file after change(dataset, index): a phantom with one defect."""
    out = []
    for k, data in enumerate(files):
        ds = pydicom.dcmread(io.BytesIO(data))
        change(ds, k)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def position(ds: pydicom.Dataset) -> float:
    return float(ds.ImagePositionPatient[2])
