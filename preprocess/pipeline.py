"""The one entry point: DICOM payload (bytes) -> model input tensor plus metadata."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from contract import validate_size
from settings import PREPROCESSING

from . import resample
from .dicom import decode_into, native_views, parse, volume_dtype
from .series import ARRAY_AXES, CANONICAL_AXES, select_series
from .sources import expand
from .workers import worker_threads

MODES = ("fast", "reference")
log = logging.getLogger("preprocess")


@dataclass
class PreprocessedStudy:
    """The model input for one study: volume [1, 1, S, S, S] float32 in [-1, 1] and JSON-ready meta."""

    volume: np.ndarray
    study_uid: str
    series_uid: str
    meta: dict = field(default_factory=dict)


def preprocess_study(
    files: Sequence[bytes],
    *,
    size: int = PREPROCESSING.size,
    mode: str = "fast",
    series_uid: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
) -> PreprocessedStudy:
    """Each element of `files` is one DICOM file, one ZIP archive or one multi-frame file.

    `threads`: worker threads for decoding and resampling (None: every CPU this process may use).
    Raises a StudyError subclass (message safe to show, no PHI) for anything wrong with the study,
    and contract.InvalidSizeError / ValueError for a size, mode or thread count the caller got wrong.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    validate_size(size)
    threads = worker_threads(threads)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    start = clock

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(now - clock, 4)
        clock = now

    blobs, warnings = expand(files)
    lap("unpack")
    frames, parse_warnings = parse(blobs)
    warnings += parse_warnings
    lap("parse")
    stack, selection = select_series(frames, series_uid=series_uid)
    if stack.duplicates_removed:
        warnings.append(f"{stack.duplicates_removed} duplicate copies of slices ignored")
    lap("select")
    slices = native_views(stack.frames, blobs) if mode == "fast" else None
    if slices is None:  # compressed, sign-extended, or reference mode: one decoded array
        slices = np.empty(stack.shape, dtype=volume_dtype(stack.frames))
        decode_into(slices, stack.frames, blobs, threads=threads)
    lap("decode")
    if mode == "fast":
        volume, mapping = resample.fast(slices, stack, size, device=device, threads=threads)
    else:
        volume, mapping = resample.reference(slices, stack, size)
    del slices
    lap("resample")
    timings["total"] = round(time.perf_counter() - start, 4)
    for warning in warnings:
        log.warning("study %s: %s", stack.study_uid, warning)
    multiframe = any(f.pixels.frames > 1 for f in stack.frames)
    meta = {
        "study_uid": stack.study_uid,
        "series_uid": stack.series_uid,
        "series_selection": selection,
        "original_shape": list(stack.shape),
        "original_axes": list(ARRAY_AXES),
        "original_spacing_mm": [round(s, 6) for s in stack.spacing],
        "origin_mm": [round(v, 4) for v in stack.origin],
        "directions": {name: [round(v, 6) for v in d] for name, d in zip(ARRAY_AXES, stack.directions)},
        "output_axes": {
            name: {"source_axis": ARRAY_AXES[axis], "reversed": flip} for name, (axis, flip) in zip(CANONICAL_AXES, stack.canonical)
        },
        **mapping.to_meta(stack),
        "slice_order": {
            "sorted_by": "position along the slice normal, feet to head",
            "sop_instance_uids": [f.sop_uid for f in stack.frames],
            **({"frame_numbers": [f.frame + 1 for f in stack.frames]} if multiframe else {}),
        },
        "rescale": _rescale_summary(stack),
        "transfer_syntaxes": sorted({f.pixels.transfer_syntax for f in stack.frames}),
        "mode": mode,
        "size": size,
        "timings_s": timings,
        "warnings": warnings,
    }
    log.info("study %s series %s preprocessed (%s, S=%d) in %.3f s", stack.study_uid, stack.series_uid, mode, size, timings["total"])
    return PreprocessedStudy(volume=volume, study_uid=stack.study_uid, series_uid=stack.series_uid, meta=meta)


def _rescale_summary(stack) -> dict:
    slopes, intercepts = stack.slopes, stack.intercepts
    if np.ptp(slopes) == 0 and np.ptp(intercepts) == 0:
        return {"slope": float(slopes[0]), "intercept": float(intercepts[0]), "per_slice": False}
    return {"slope": [float(v) for v in slopes], "intercept": [float(v) for v in intercepts], "per_slice": True}
