"""Where the model looked, in the voxels the radiologist's viewer shows.

numpy and scipy.ndimage, no torch: the most attributed region of an attribution volume on the model's
S^3 grid, and its box mapped back to the original voxel indices of the chosen series through the crop
box and the resize that preprocess recorded in META (`output_to_original`: per output axis D, H, W the
source array axis and original index = offset + step * k, clamped to the crop).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

DEFAULT_FRACTION = 0.5  # the region: attribution >= this fraction of the maximum
OUTPUT_AXES = ("D", "H", "W")
SOURCE_AXES = ("slice", "row", "column")  # preprocess's array axes, as META's original_axes names them
_TOLERANCE = 1e-4  # META rounds offset and step to 6 decimals
_MAX_INDEX = 2**16 - 1  # no series has more voxels along an axis: Rows and Columns are 16-bit, files are fewer


class LocalizationError(ValueError):
    """The attribution or META cannot give a box (wrong shape, no mapping, nothing attributed)."""


@dataclass(frozen=True)
class Box:
    """Inclusive voxel index ranges, one (lo, hi) per axis, in the order the grid names them."""

    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class OriginalBox:
    """A box in the chosen series' DICOM voxel grid: x = column, y = row, z = slice (as sorted by
    preprocess, feet to head), inclusive indices."""

    x: tuple[int, int]
    y: tuple[int, int]
    z: tuple[int, int]

    def as_list(self) -> list[int]:
        """x_min, x_max, y_min, y_max, z_min, z_max: the report's pathology_localization order."""
        return [*self.x, *self.y, *self.z]

    def as_text(self) -> str:
        return ",".join(str(v) for v in self.as_list())


def most_attributed_region(attribution: np.ndarray, fraction: float = DEFAULT_FRACTION) -> Box:
    """Bounding box (output grid, D, H, W) of the largest 26-connected component of the voxels at or
    above `fraction` of the maximum; ties in size go to the component holding the maximum."""
    if attribution.ndim != 3:
        raise LocalizationError(f"attribution must be a 3-D volume, not shape {list(attribution.shape)}")
    if not 0.0 < fraction <= 1.0:
        raise LocalizationError(f"fraction must be in (0, 1], not {fraction}")
    values = np.asarray(attribution, dtype=np.float32)
    if not np.isfinite(values).all():
        raise LocalizationError("attribution holds non-finite values")
    peak = float(values.max())
    if peak <= 0.0:
        raise LocalizationError("nothing is attributed: the attribution is zero everywhere")
    labels, count = ndimage.label(values >= fraction * peak, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    at_peak = labels[np.unravel_index(int(values.argmax()), values.shape)]
    largest = int(np.flatnonzero(sizes == sizes.max())[0])
    chosen = at_peak if sizes[at_peak] == sizes[largest] else largest
    (slices,) = ndimage.find_objects((labels == chosen).astype(np.int32))
    return Box(tuple((s.start, s.stop - 1) for s in slices))


def axis_to_original(lo: int, hi: int, axis_meta: dict, extent: int) -> tuple[int, int]:
    """Output indices lo..hi on one axis -> the original voxels whose nearest output sample lies in
    lo..hi (the original voxel i belongs to output cell round((i - offset) / step)), within the crop,
    which must lie in the series' `extent` voxels along that axis (a box past them is no answer)."""
    offset, step = _number(axis_meta["offset"], "offset"), _number(axis_meta["step"], "step")
    clamp = axis_meta["clamp"]
    if not isinstance(clamp, list) or len(clamp) != 2:
        raise LocalizationError("META output_to_original clamp is not a pair of voxel indices")
    clamp_lo, clamp_hi = (_number(v, "clamp") for v in clamp)
    if not np.isfinite([offset, step, clamp_lo, clamp_hi]).all():
        raise LocalizationError("META output_to_original holds a number that is not finite")
    if step == 0.0:
        raise LocalizationError("META output_to_original has a zero step")
    if clamp_lo > clamp_hi:
        raise LocalizationError("META output_to_original clamp ends before it starts")
    ends = sorted((offset + step * (lo - 0.5), offset + step * (hi + 0.5)))
    # finite numbers can still map beyond any series, or past float's range (inf: no integer index)
    if not (np.isfinite(ends).all() and -_MAX_INDEX <= ends[0] and ends[1] <= 2 * _MAX_INDEX):
        raise LocalizationError(f"META output_to_original maps to voxels {ends[0]:.6g}..{ends[1]:.6g}, outside any series")
    if clamp_lo < 0 or clamp_hi > extent - 1:
        raise LocalizationError(f"META output_to_original clamp {clamp_lo:g}..{clamp_hi:g} is outside the series' {extent} voxels")
    first = max(int(np.ceil(ends[0] - _TOLERANCE)), int(np.ceil(clamp_lo - _TOLERANCE)))
    last = min(int(np.floor(ends[1] + _TOLERANCE)), int(np.floor(clamp_hi + _TOLERANCE)))
    if first > last:  # an upsampled axis (cells narrower than a voxel): the voxel nearest the cells' centre
        centre = int(np.clip(np.rint((ends[0] + ends[1]) / 2), np.ceil(clamp_lo - _TOLERANCE), np.floor(clamp_hi + _TOLERANCE)))
        first = last = centre
    return first, last


def _number(value, name: str) -> float:
    """A JSON number of META (a string or a bool is not preprocess's mapping, whatever float() makes of it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LocalizationError(f"META output_to_original {name} is not a number")
    return float(value)


def to_original(box: Box, meta: dict) -> OriginalBox:
    """A box on the S^3 grid (D, H, W) -> the same region in the chosen series' voxel grid."""
    mapping = meta.get("output_to_original") if isinstance(meta, dict) else None
    if not isinstance(mapping, dict) or set(mapping) != set(OUTPUT_AXES):
        raise LocalizationError("META has no output_to_original mapping for D, H, W (not from preprocess_study?)")
    size = _size(meta)
    if len(box.ranges) != 3 or any(not 0 <= lo <= hi < (size or hi + 1) for lo, hi in box.ranges):
        raise LocalizationError(f"box {list(box.ranges)} is not inside the {size}^3 grid")
    extents = _original_shape(meta)
    by_source: dict[str, tuple[int, int]] = {}
    for name, (lo, hi) in zip(OUTPUT_AXES, box.ranges):
        axis = mapping[name]
        try:
            by_source[axis["source_axis"]] = axis_to_original(lo, hi, axis, extents[axis["source_axis"]])
        except LocalizationError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as error:  # a field missing, not a number (or pair), an int past float
            raise LocalizationError(f"META output_to_original[{name}] is not preprocess's mapping ({type(error).__name__})") from None
    if set(by_source) != set(SOURCE_AXES):
        raise LocalizationError("META output_to_original does not name slice, row and column once each")
    return OriginalBox(x=by_source["column"], y=by_source["row"], z=by_source["slice"])


def to_output(original: OriginalBox, meta: dict) -> Box:
    """The inverse, for drawing: the output cells (D, H, W) holding the original box's voxels."""
    mapping = meta["output_to_original"]
    size = int(meta["size"])
    source = {"column": original.x, "row": original.y, "slice": original.z}
    ranges = []
    for name in OUTPUT_AXES:
        axis = mapping[name]
        lo, hi = source[axis["source_axis"]]
        ks = np.rint((np.array([lo, hi], dtype=np.float64) - float(axis["offset"])) / float(axis["step"]))
        ranges.append(tuple(int(v) for v in np.clip(np.sort(ks), 0, size - 1)))
    return Box(tuple(ranges))


def localize(attribution: np.ndarray, meta: dict, fraction: float = DEFAULT_FRACTION) -> tuple[Box, OriginalBox]:
    """The most attributed region on the S^3 grid and in the original voxel grid of the chosen series."""
    size = _size(meta)
    if size is not None and attribution.shape != (size, size, size):
        raise LocalizationError(f"attribution shape {list(attribution.shape)} does not match META's S={size}")
    box = most_attributed_region(attribution, fraction)
    return box, to_original(box, meta)


def _original_shape(meta: dict) -> dict[str, int]:
    """META's voxel counts of the chosen series by array axis: what bounds a box mapped back."""
    shape, axes = meta.get("original_shape"), meta.get("original_axes")
    if (
        not isinstance(shape, list)
        or not isinstance(axes, list)
        or sorted(map(str, axes)) != sorted(SOURCE_AXES)
        or len(shape) != len(axes)
        or any(isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= _MAX_INDEX + 1 for n in shape)
    ):
        raise LocalizationError("META has no original_shape and original_axes of the series' slice, row and column counts")
    return dict(zip(axes, shape))


def _size(meta: dict) -> int | None:
    """META's S, where it says one."""
    size = meta.get("size") if isinstance(meta, dict) else None
    if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
        raise LocalizationError("META size is not an integer")
    return size
