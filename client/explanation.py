"""The explanation half of a ct_triage_explain answer: checked, and saved as files a viewer can use.

numpy only (plus `explain.geometry`, numpy and scipy): the client never loads torch. The attribution
volume is on the model's S^3 grid (D slices feet->head, H anterior->posterior, W patient
right->left); META's `output_to_original` maps it back to the chosen series' voxels, and the JSON
sidecar written beside the .npy carries that mapping (client/README.md, "Explanations").
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from preprocess import write_atomically
from settings import NAMES

from .result import Explanation, TriageResult

# The served attribution is scaled to [0, 1] and the volume to [-1, 1]; FP16 rounding stays well inside this.
_RANGE_TOLERANCE = 1e-2
_NONE = -1  # LOCALIZATION is all -1 when nothing is attributed
ATTRIBUTION_FILE = "attribution.npy"
SIDECAR_FILE = "attribution.json"
MONTAGE_FILE = "montage.png"
AXES = ("D", "H", "W")
AXES_MEANING = {"D": "slices, feet -> head", "H": "anterior -> posterior", "W": "patient right -> left"}


class ExplanationError(ValueError):
    """The server's explanation does not fit its own META (shape, range, localisation)."""


def parse(answer: Any, meta: dict[str, Any]) -> Explanation:
    """ATTRIBUTION, VOLUME and LOCALIZATION of a tritonclient answer, checked against META."""
    from explain import LocalizationError, OriginalBox, to_output  # explain's geometry (numpy, scipy), loaded on first use

    size = meta.get("size")
    if not isinstance(size, int) or size < 1:
        raise ExplanationError("META does not give the model's size S")
    attribution = _grid(answer.as_numpy(NAMES.attribution), size, NAMES.attribution)
    volume = _grid(answer.as_numpy(NAMES.volume), size, NAMES.volume)
    if not np.isfinite(attribution).all() or attribution.min() < -_RANGE_TOLERANCE or attribution.max() > 1 + _RANGE_TOLERANCE:
        raise ExplanationError(f"{NAMES.attribution} is not within [0, 1]")
    if not np.isfinite(volume).all() or np.abs(volume).max() > 1 + _RANGE_TOLERANCE:
        raise ExplanationError(f"{NAMES.volume} is not within [-1, 1]")
    values = np.asarray(answer.as_numpy(NAMES.localization)).reshape(-1)
    if values.size != 6:
        raise ExplanationError(f"{NAMES.localization} has {values.size} values, not 6")
    values = [int(v) for v in values]
    if all(v == _NONE for v in values):
        return Explanation(attribution.astype(np.float16, copy=False), volume.astype(np.float32, copy=False), None, None)
    localization = OriginalBox(x=(values[0], values[1]), y=(values[2], values[3]), z=(values[4], values[5]))
    limits = dict(zip(("z", "y", "x"), meta.get("original_shape") or (None, None, None)))
    for axis in ("x", "y", "z"):
        lo, hi = getattr(localization, axis)
        if not 0 <= lo <= hi or (limits.get(axis) is not None and hi >= limits[axis]):
            raise ExplanationError(f"{NAMES.localization} {localization.as_text()} is not a box inside the series")
    try:
        box = to_output(localization, meta)
    except (KeyError, TypeError, ValueError, LocalizationError) as error:
        raise ExplanationError(f"META cannot map {NAMES.localization} back to the model grid ({type(error).__name__})") from None
    return Explanation(attribution.astype(np.float16, copy=False), volume.astype(np.float32, copy=False), localization, box)


def _grid(array: np.ndarray, size: int, name: str) -> np.ndarray:
    """The [S, S, S] volume of an output ([S, S, S], or [1, 1, S, S, S] for VOLUME)."""
    array = np.asarray(array)
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    if array.shape != (size, size, size):
        raise ExplanationError(f"{name} has shape {list(np.shape(array))}, not [{size}, {size}, {size}] (META's S)")
    if array.dtype.kind != "f":
        raise ExplanationError(f"{name} is {array.dtype}, not floating point")
    return array


def sidecar(result: TriageResult) -> dict[str, Any]:
    """The geometry of the attribution .npy: its grid, the mapping back to the series' voxels (and
    to patient mm) and the localisation in both grids. UIDs name the series; no patient data."""
    explanation = result.explanation
    if explanation is None:
        raise ValueError("the result has no explanation")
    meta = result.meta
    localization = None
    if explanation.localization is not None:
        localization = {
            "text": explanation.localization.as_text(),
            "original": {axis: list(getattr(explanation.localization, axis)) for axis in ("x", "y", "z")},
            "output": dict(zip(AXES, (list(r) for r in explanation.box.ranges))),
        }
    return {
        "file": ATTRIBUTION_FILE,
        "shape": list(explanation.attribution.shape),
        "dtype": "float16",
        "axes": list(AXES),
        "axes_meaning": AXES_MEANING,
        "values": "evidence for pathology, scaled to [0, 1] (0 everywhere when nothing speaks for pathology)",
        "output_to_original": meta.get("output_to_original"),
        "mapping": (
            "for output index k on axis A (D, H, W): index along the series' array axis output_to_original[A].source_axis "
            "= offset + step * k, clamped to clamp (the crop box); the series' voxel (slice, row, column) is at "
            "origin_mm + slice * spacing_mm[0] * directions.slice + row * spacing_mm[1] * directions.row "
            "+ column * spacing_mm[2] * directions.column"
        ),
        "mm_per_output_voxel": meta.get("resize_factors"),
        "series": {
            "study_uid": result.study_uid,
            "series_uid": result.series_uid,
            "shape": meta.get("original_shape"),
            "axes": meta.get("original_axes"),
            "slices_sorted_by": (meta.get("slice_order") or {}).get("sorted_by"),
            "spacing_mm": meta.get("original_spacing_mm"),
            "origin_mm": meta.get("origin_mm"),
            "directions": meta.get("directions"),
        },
        "pathology_localization": localization,
        "probability_of_pathology": result.probability_of_pathology,
        "pathology": result.pathology,
        "threshold": result.threshold,
        "model": meta.get("provenance", result.model),
    }


def save(result: TriageResult, out_dir: str | os.PathLike[str]) -> list[Path]:
    """montage.png, attribution.npy (float16 [S, S, S]) and attribution.json in `out_dir`; returns
    the paths written. The three are written into a temporary folder inside `out_dir`, then moved in
    together: a failure (a full disk) leaves none of them, never a new montage beside the last
    study's attribution. A result without explanation (a failed study) removes the last study's.
    Runs saving into one folder at once take turns for the moves: the folder then holds the three
    files of the run that moved last, never a mix of two studies."""
    from .montage import save_montage

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    names = (MONTAGE_FILE, ATTRIBUTION_FILE, SIDECAR_FILE)

    def remove() -> None:  # what is left would be taken for this study's explanation
        for name in names:
            (folder / name).unlink(missing_ok=True)

    if result.explanation is None:
        with _one_writer(folder):
            remove()
        return []
    try:
        with tempfile.TemporaryDirectory(dir=folder, prefix=".explanation-") as staging:
            staged = Path(staging)
            save_montage(result, staged / MONTAGE_FILE)
            attribution = np.ascontiguousarray(result.explanation.attribution, dtype=np.float16)
            write_atomically(staged / ATTRIBUTION_FILE, lambda stream: np.save(stream, attribution))
            text = json.dumps(sidecar(result), indent=2) + "\n"
            write_atomically(staged / SIDECAR_FILE, lambda stream: stream.write(text.encode("utf-8")))
            with _one_writer(folder):
                for name in names:
                    os.replace(staged / name, folder / name)
    except BaseException:
        with _one_writer(folder):
            remove()
        raise
    return [folder / name for name in names]


@contextlib.contextmanager
def _one_writer(folder: Path):
    """The kernel's lock (flock) on the folder itself: no lock file beside the three, and a killed
    run holds it no longer."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)
