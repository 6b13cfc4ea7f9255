"""DICOM objects -> per-slice records (headers only) and pixel decoding into one preallocated array.

Headers are parsed with pydicom up to the pixel data (`stop_before_pixels`), so selecting a series
never touches pixels. Native (uncompressed) little-endian pixels are then copied straight from the
input bytes into the volume with numpy (no per-file pixel copy); compressed transfer syntaxes
(JPEG Lossless, JPEG 2000, RLE, JPEG-LS) go through pydicom's pixel handlers, backed by the pinned
pylibjpeg plugins (libjpeg, openjpeg, rle) that support numpy 1.26.
"""
from __future__ import annotations

import io
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from .errors import CorruptDicomError, DecodeError, UnsupportedPixelDataError
from .sources import Blob

_PIXEL_DATA = (0x7FE0, 0x0010)
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UN", b"UT", b"UC", b"UR", b"SV", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


@dataclass(frozen=True)
class PixelFormat:
    """How one object's pixels are stored; shared by all frames of that object."""

    transfer_syntax: str
    bits_allocated: int
    bits_stored: int
    signed: bool
    samples_per_pixel: int
    photometric: str
    frames: int
    offset: int | None  # first native pixel byte in the blob; None when encapsulated or absent
    length: int  # declared length of the native pixel value
    present: bool

    @property
    def native_fast(self) -> bool:
        """Whether the pixels can be copied straight from the bytes (the common CT case)."""
        ts = UID(self.transfer_syntax)
        return (
            self.offset is not None
            and ts in (pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian)
            and self.bits_allocated == 16
            and self.samples_per_pixel == 1
        )


@dataclass(frozen=True)
class Frame:
    """One 2D image (a single-frame file, or one frame of a multi-frame object), header only."""

    blob: int
    frame: int  # 0-based index in its object
    label: str
    study_uid: str
    series_uid: str
    sop_uid: str
    modality: str
    image_type: tuple[str, ...]
    instance_number: int | None
    rows: int
    columns: int
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns) in mm
    slice_thickness: float | None
    slope: float
    intercept: float
    pixels: PixelFormat


def parse(blobs: Sequence[Blob]) -> tuple[list[Frame], list[str]]:
    """Every image frame found in the blobs, plus warnings for what was skipped (non-DICOM, DICOMDIR...)."""
    frames: list[Frame] = []
    warnings: list[str] = []
    for index, blob in enumerate(blobs):
        stream = io.BytesIO(blob.data)
        try:
            ds = pydicom.dcmread(stream, stop_before_pixels=True)
        except InvalidDicomError:
            warnings.append(f"{blob.label} is not a DICOM file: skipped")
            continue
        except Exception as exc:  # pydicom raises many types on damaged headers
            if blob.data[128:132] == b"DICM":
                raise CorruptDicomError(f"{blob.label} is a damaged or truncated DICOM file ({type(exc).__name__})") from None
            warnings.append(f"{blob.label} is not a DICOM file: skipped")
            continue
        try:
            pixels = _pixel_format(ds, blob.data, stream.tell())
            if "Rows" not in ds and not pixels.present:
                kind = getattr(UID(str(ds.get("SOPClassUID", ""))), "name", "") or "unknown object"
                warnings.append(f"{blob.label} is a DICOM object without an image ({kind}): skipped")
                continue
            frames.extend(_frames(ds, index, blob.label, pixels))
        except CorruptDicomError:
            raise
        except Exception as exc:
            raise CorruptDicomError(f"{blob.label}: DICOM header has invalid or missing values ({type(exc).__name__}: {exc})") from None
    return frames, warnings


def _pixel_format(ds: pydicom.Dataset, data: bytes, at: int) -> PixelFormat:
    ts = str(ds.file_meta.get("TransferSyntaxUID", pydicom.uid.ImplicitVRLittleEndian))
    uid = UID(ts)
    offset, length, present = None, 0, False
    if at + 8 <= len(data):
        little = uid.is_little_endian if uid.is_transfer_syntax else True
        implicit = uid.is_implicit_VR if uid.is_transfer_syntax else False
        group, element = struct.unpack_from("<HH" if little else ">HH", data, at)
        if (group, element) == _PIXEL_DATA:
            present = True
            if implicit:
                (length,) = struct.unpack_from("<I", data, at + 4)
                start = at + 8
            elif data[at + 4 : at + 6] in _LONG_VRS:
                (length,) = struct.unpack_from("<I" if little else ">I", data, at + 8)
                start = at + 12
            else:
                (length,) = struct.unpack_from("<H" if little else ">H", data, at + 6)
                start = at + 8
            if length != _UNDEFINED:
                offset = start
    return PixelFormat(
        transfer_syntax=ts,
        bits_allocated=int(ds.get("BitsAllocated", 16)),
        bits_stored=int(ds.get("BitsStored", ds.get("BitsAllocated", 16))),
        signed=int(ds.get("PixelRepresentation", 0)) == 1,
        samples_per_pixel=int(ds.get("SamplesPerPixel", 1)),
        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")),
        frames=int(ds.get("NumberOfFrames", 1) or 1),
        offset=offset,
        length=length,
        present=present,
    )


def _floats(value, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = [float(v) for v in (value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value])]
    return tuple(values) if len(values) == n else None


def _item(group: pydicom.Dataset | None, sequence: str) -> pydicom.Dataset | None:
    if group is None or sequence not in group or not group[sequence].value:
        return None
    return group[sequence].value[0]


def _functional(per_frame, shared, sequence: str, keyword: str):
    """A value from the per-frame functional group, else the shared one (Enhanced CT rules)."""
    for group in (per_frame, shared):
        item = _item(group, sequence)
        if item is not None and keyword in item:
            return item[keyword].value
    return None


def _frames(ds: pydicom.Dataset, blob: int, label: str, pixels: PixelFormat) -> list[Frame]:
    common = dict(
        blob=blob,
        label=label,
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        modality=str(ds.get("Modality", "")),
        instance_number=int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None,
        rows=int(ds.get("Rows", 0) or 0),
        columns=int(ds.get("Columns", 0) or 0),
        pixels=pixels,
    )
    image_type = tuple(str(v).upper() for v in (ds.get("ImageType") or []))
    per_frame_groups = ds.get("PerFrameFunctionalGroupsSequence")
    shared_groups = _item(ds, "SharedFunctionalGroupsSequence")
    thickness = ds.get("SliceThickness")
    if per_frame_groups is None and shared_groups is None:
        spacing = _floats(ds.get("PixelSpacing"), 2)
        frame = Frame(
            frame=0,
            image_type=image_type,
            position=_floats(ds.get("ImagePositionPatient"), 3),
            orientation=_floats(ds.get("ImageOrientationPatient"), 6),
            pixel_spacing=spacing,
            slice_thickness=float(thickness) if thickness not in (None, "") else None,
            slope=float(ds.get("RescaleSlope", 1) or 1),
            intercept=float(ds.get("RescaleIntercept", 0) or 0),
            **common,
        )
        if pixels.frames == 1:
            return [frame]
        # legacy multi-frame without functional groups: one geometry for all frames is unknowable
        return [Frame(**{**frame.__dict__, "frame": k, "position": None}) for k in range(pixels.frames)]
    per_frame_groups = list(per_frame_groups or [None] * pixels.frames)
    if len(per_frame_groups) != pixels.frames:
        raise CorruptDicomError(f"{label}: {pixels.frames} frames but {len(per_frame_groups)} per-frame functional groups")
    result = []
    for k, group in enumerate(per_frame_groups):
        frame_type = _functional(group, shared_groups, "CTImageFrameTypeSequence", "FrameType")
        thick = _functional(group, shared_groups, "PixelMeasuresSequence", "SliceThickness")
        slope = _functional(group, shared_groups, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional(group, shared_groups, "PixelValueTransformationSequence", "RescaleIntercept")
        result.append(
            Frame(
                frame=k,
                image_type=tuple(str(v).upper() for v in frame_type) if frame_type else image_type,
                position=_floats(_functional(group, shared_groups, "PlanePositionSequence", "ImagePositionPatient"), 3),
                orientation=_floats(_functional(group, shared_groups, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
                pixel_spacing=_floats(_functional(group, shared_groups, "PixelMeasuresSequence", "PixelSpacing"), 2),
                slice_thickness=float(thick) if thick not in (None, "") else None,
                slope=float(slope if slope not in (None, "") else ds.get("RescaleSlope", 1) or 1),
                intercept=float(intercept if intercept not in (None, "") else ds.get("RescaleIntercept", 0) or 0),
                **common,
            )
        )
    return result


def volume_dtype(frames: Sequence[Frame]) -> np.dtype:
    """int16 holds every CT encoding except unsigned 16-bit stored values, which need int32."""
    if all(f.pixels.bits_allocated <= 16 and (f.pixels.signed or f.pixels.bits_stored <= 15) for f in frames):
        return np.dtype(np.int16)
    return np.dtype(np.int32)


def check_decodable(frame: Frame) -> None:
    """Refuse pixel layouts that are not a grey-level CT image before anything is allocated."""
    p = frame.pixels
    if p.samples_per_pixel != 1 or not p.photometric.startswith("MONOCHROME"):
        raise UnsupportedPixelDataError(f"{frame.label}: colour images ({p.photometric}) are not CT slices")
    if p.bits_allocated not in (8, 16):
        raise UnsupportedPixelDataError(f"{frame.label}: {p.bits_allocated}-bit pixels are not supported for CT")


def decode_into(out: np.ndarray, frames: Sequence[Frame], blobs: Sequence[Blob], threads: int = 2) -> None:
    """Fill out[k] with the stored values of frames[k]; native pixels are copied without decoding."""
    by_blob: dict[int, list[int]] = {}
    for k, frame in enumerate(frames):
        by_blob.setdefault(frame.blob, []).append(k)
    jobs = list(by_blob.items())

    def run(job: tuple[int, list[int]]) -> None:
        blob_index, ks = job
        if frames[ks[0]].pixels.native_fast:
            _copy_native(out, frames, ks, blobs[blob_index].data)
        else:
            _decode_with_pydicom(out, frames, ks, blobs[blob_index])

    if threads > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, jobs, chunksize=max(1, len(jobs) // (4 * threads))))
    else:
        for job in jobs:
            run(job)


def _copy_native(out: np.ndarray, frames: Sequence[Frame], ks: list[int], data: bytes) -> None:
    first = frames[ks[0]]
    p = first.pixels
    count = first.rows * first.columns
    dtype = np.dtype("<i2" if p.signed else "<u2")
    end = min(len(data), p.offset + p.length)
    for k in ks:
        start = p.offset + frames[k].frame * count * 2
        if start + count * 2 > end:
            raise DecodeError(f"{frames[k].label}: pixel data is truncated ({max(0, end - start)} of {count * 2} bytes)")
        out[k] = np.frombuffer(data, dtype, count, start).reshape(first.rows, first.columns)
        if p.signed and p.bits_stored < 16:
            shift = 16 - p.bits_stored  # sign-extend values stored in fewer bits
            out[k] = (out[k] << shift) >> shift


def _decode_with_pydicom(out: np.ndarray, frames: Sequence[Frame], ks: list[int], blob: Blob) -> None:
    first = frames[ks[0]]
    if not first.pixels.present:
        raise DecodeError(f"{blob.label}: no pixel data")
    try:
        ds = pydicom.dcmread(io.BytesIO(blob.data))
        array = ds.pixel_array
    except Exception as exc:
        name = getattr(UID(first.pixels.transfer_syntax), "name", first.pixels.transfer_syntax)
        raise DecodeError(f"{blob.label}: pixel data could not be decoded ({name}): {type(exc).__name__}: {exc}") from None
    if first.pixels.frames == 1:
        array = array[None]
    if array.shape != (first.pixels.frames, first.rows, first.columns):
        raise DecodeError(f"{blob.label}: decoded pixel data has shape {array.shape[1:]}, header says {first.rows}x{first.columns}")
    for k in ks:
        out[k] = array[frames[k].frame]
