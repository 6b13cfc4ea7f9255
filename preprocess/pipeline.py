"""The one entry point: DICOM payload (bytes) -> model input tensor plus metadata."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from contract import validate_size
from settings import PREPROCESSING

from . import resample
from .dicom import decode_into, native_views, parse, volume_dtype
from .errors import shown
from .series import ARRAY_AXES, CANONICAL_AXES, Stack, select_series
from .sources import Blob, expand
from .workers import worker_threads

MODES = ("fast", "reference")
log = logging.getLogger("preprocess")


@dataclass
class PreprocessedStudy:
    """The model input for one study: volume [1, 1, S, S, S] float32 in [-1, 1], C-contiguous, and
    JSON-ready meta. The volume is a numpy array, or a torch tensor on the device `preprocess_study`
    was given (so that a GPU's result stays there for the classifier). The UIDs, here and in meta,
    are as `errors.shown` shows them: an invalid one is "<invalid KEYWORD>"."""

    volume: np.ndarray | torch.Tensor
    study_uid: str
    series_uid: str
    meta: dict = field(default_factory=dict)


def preprocess_study(
    files: Sequence[bytes],
    *,
    size: int = PREPROCESSING.size,
    mode: str = "fast",
    series_uid: str | None = None,
    device: str | None = None,
    threads: int | None = None,
) -> PreprocessedStudy:
    """Each element of `files` is one DICOM file, one ZIP archive or one multi-frame file.

    `device`: None runs fast mode on the CPU (numpy volume); a torch device ("cuda", "cuda:1", or
    "cpu" for the same tensor path on the CPU) runs it there (`resample.on_device`) and returns the
    volume as a tensor on it; parsing and decoding stay on the CPU. `threads`: worker threads for
    decoding and CPU resampling (None: every CPU this process may use).
    Raises a StudyError subclass (message safe to show, no PHI) for anything wrong with the study,
    and contract.InvalidSizeError / ValueError for a size, mode, device or thread count the caller got wrong.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    validate_size(size)
    if device is not None:
        check_device(device, mode)
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
    warnings += stack.notes
    if mode == "reference":
        resample.check_reference_grid(stack)
    lap("select")
    slices = stored_values(stack, blobs, in_place=mode == "fast", threads=threads)
    lap("decode")
    if mode == "reference":
        volume, mapping = resample.reference(slices, stack, size)
    elif device is None:
        volume, mapping = resample.fast(slices, stack, size, threads=threads)
    else:
        volume, mapping = resample.on_device(slices, stack, size, device=device)
    del slices
    lap("resample")
    timings["total"] = round(time.perf_counter() - start, 4)
    study_uid, series_uid = shown(stack.study_uid, "UI", "StudyInstanceUID"), shown(stack.series_uid, "UI", "SeriesInstanceUID")
    for warning in warnings:
        log.warning("study %s: %s", study_uid, warning)
    multiframe = any(f.pixels.frames > 1 for f in stack.frames)
    meta = {
        "study_uid": study_uid,
        "series_uid": series_uid,
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
            "sop_instance_uids": [shown(f.sop_uid, "UI", "SOPInstanceUID") for f in stack.frames],
            **({"frame_numbers": [f.frame + 1 for f in stack.frames]} if multiframe else {}),
        },
        "rescale": _rescale_summary(stack),
        "transfer_syntaxes": sorted({shown(f.pixels.transfer_syntax, "UI", "TransferSyntaxUID") for f in stack.frames}),
        "mode": mode,
        "device": None if device is None else str(volume.device),
        "size": size,
        "timings_s": timings,
        "warnings": warnings,
    }
    log.info("study %s series %s preprocessed (%s, S=%d) in %.3f s", study_uid, series_uid, mode, size, timings["total"])
    return PreprocessedStudy(volume=volume, study_uid=study_uid, series_uid=series_uid, meta=meta)


def stored_values(stack: Stack, blobs: Sequence[Blob], *, in_place: bool, threads: int) -> Sequence[np.ndarray]:
    """The stored values of the stack's sorted slices: read-only views into the DICOM bytes where
    `in_place` and the encoding allow it (nothing copied), else one decoded [slices, rows, columns]
    array (compressed or sign-extended values, or in_place=False)."""
    slices = native_views(stack.frames, blobs) if in_place else None
    if slices is None:
        slices = np.empty(stack.shape, dtype=volume_dtype(stack.frames))
        decode_into(slices, stack.frames, blobs, threads=threads)
    return slices


def check_device(device: str, mode: str) -> None:
    """Refuse a device the caller got wrong before any work: a bad name, an absent GPU, reference mode."""
    if mode == "reference":
        raise ValueError(f"device={device!r} needs mode='fast': reference mode runs on the CPU only (SimpleITK)")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be None (the CPU fast path) or a torch device such as 'cuda', 'cuda:1' or 'cpu', not {device!r}")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: torch sees {torch.cuda.device_count()} CUDA devices here")


def _rescale_summary(stack) -> dict:
    slopes, intercepts = stack.slopes, stack.intercepts
    if np.ptp(slopes) == 0 and np.ptp(intercepts) == 0:
        return {"slope": float(slopes[0]), "intercept": float(intercepts[0]), "per_slice": False}
    return {"slope": [float(v) for v in slopes], "intercept": [float(v) for v in intercepts], "per_slice": True}
