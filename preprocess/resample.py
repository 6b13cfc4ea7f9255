"""HU volume -> model input [1, 1, S, S, S] in [-1, 1]: the seed's algorithm twice.

`reference` runs SEED.md literally: HU float volume, SimpleITK linear resample to 1 mm, crop to
HU > -1000 plus 5 voxels, clip and scale, torch trilinear resize to S^3. Choices the seed leaves open:
  * orientation: the volume is first reoriented so that D runs feet->head, H anterior->posterior and
    W right->left (array flips/transposes only; the identity for head-first supine axial series, which
    is what SimpleITK's GetArrayFromImage gives for them);
  * 1 mm grid: same origin (centre of the first voxel) and direction as the input, size
    floor((n - 1) * spacing / 1 mm) + 1 per axis, so every grid point lies inside the input's voxel
    centres (no extrapolation, no default value ever used);
  * crop: bounding box of voxels with HU strictly above -1000, widened by 5 voxels and clamped at the
    volume border (no padding);
  * resize: torch.nn.functional.interpolate(mode="trilinear", align_corners=False), the PyTorch
    default, in float32.
`fast` computes the same function with one interpolation: the crop box is found on the stored
values (per-slice threshold from slope/intercept), mapped onto the 1 mm grid, and each S^3 grid point
is traced back through both interpolations to one position in the original grid. The mapping is
separable per axis, so it is three 1-D linear passes (columns, rows, then slices) that only read the
cropped part, with slope/intercept applied per slice between the in-plane and slice passes (exact:
linear interpolation within a slice commutes with that slice's affine HU mapping). All torch ops, so
the same code runs on CUDA tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from settings import PREPROCESSING, Preprocessing

from .errors import EmptyVolumeError
from .series import ARRAY_AXES, CANONICAL_AXES, Stack


@dataclass(frozen=True)
class GridMapping:
    """Where each S^3 output voxel reads the original volume (for localisation back in DICOM space).

    For canonical axis a and output index k: x = clamp((k + 0.5) * L / S - 0.5, 0, L - 1) in the
    L voxels of the 1 mm crop, i.e. original array index = offset + step * k before clamping.
    """

    grid_shape: tuple[int, int, int]  # 1 mm grid, canonical D, H, W
    crop_box: tuple[tuple[int, int], ...]  # inclusive 1 mm grid indices, canonical D, H, W
    size: int

    def coordinates(self, stack: Stack) -> list[np.ndarray]:
        """Original array coordinates sampled by the output grid, per array axis (slice, row, column)."""
        coords: list[np.ndarray] = [np.empty(0)] * 3
        for (axis, flip), (lo, hi), spacing in zip(stack.canonical, self.crop_box, stack.canonical_spacing()):
            length = hi - lo + 1
            k = np.arange(self.size, dtype=np.float64)
            x = np.clip((k + 0.5) * length / self.size - 0.5, 0, length - 1)
            u = np.clip((lo + x) * PREPROCESSING.spacing_mm / spacing, 0, stack.shape[axis] - 1)
            coords[axis] = stack.shape[axis] - 1 - u if flip else u
        return coords

    def to_meta(self, stack: Stack) -> dict:
        """Crop box in original voxel indices and the linear map from output index to original index."""
        axes, crop, factors = {}, {}, {}
        for name, (axis, flip), (lo, hi), spacing in zip(CANONICAL_AXES, stack.canonical, self.crop_box, stack.canonical_spacing()):
            n = stack.shape[axis]
            length = hi - lo + 1
            scale = PREPROCESSING.spacing_mm / spacing
            step = length / self.size * scale
            offset = (lo + 0.5 * length / self.size - 0.5) * scale
            ends = sorted(((n - 1 - lo * scale) if flip else lo * scale, (n - 1 - hi * scale) if flip else hi * scale))
            if flip:
                offset, step = n - 1 - offset, -step
            axes[name] = {"source_axis": ARRAY_AXES[axis], "offset": round(offset, 6), "step": round(step, 6), "clamp": [0, n - 1]}
            crop[ARRAY_AXES[axis]] = [round(ends[0], 4), round(ends[1], 4)]
            factors[name] = round(length / self.size, 6)
        return {
            "crop_box": crop,
            "crop_box_1mm": {name: list(box) for name, box in zip(CANONICAL_AXES, self.crop_box)},
            "grid_1mm_shape": list(self.grid_shape),
            "resize_factors": factors,
            "output_to_original": axes,
        }


def grid_shape(stack: Stack, settings: Preprocessing = PREPROCESSING) -> tuple[int, int, int]:
    """Points of the 1 mm grid per canonical axis: floor((n - 1) * spacing / 1 mm) + 1."""
    return tuple(
        int(math.floor((n - 1) * s / settings.spacing_mm + 1e-6)) + 1 for n, s in zip(stack.canonical_shape(), stack.canonical_spacing())
    )


def _margin_box(lo_hi: list[tuple[int, int]], shape: tuple[int, int, int], margin: int) -> tuple[tuple[int, int], ...]:
    return tuple((max(0, lo - margin), min(n - 1, hi + margin)) for (lo, hi), n in zip(lo_hi, shape))


def _to_unit_range(x: torch.Tensor, settings: Preprocessing) -> torch.Tensor:
    lo, hi = settings.hu_min, settings.hu_max
    return x.clamp_(lo, hi).sub_(lo).mul_(2.0 / (hi - lo)).sub_(1.0)


def fast(raw: np.ndarray, stack: Stack, size: int, *, device: str = "cpu", settings: Preprocessing = PREPROCESSING) -> tuple[np.ndarray, GridMapping]:
    """One interpolation from the stored values to S^3 over the crop box found on the stored values."""
    volume = torch.from_numpy(raw).to(device)
    slopes = torch.from_numpy(stack.slopes).to(device)
    intercepts = torch.from_numpy(stack.intercepts).to(device)
    threshold = (settings.crop_threshold_hu - intercepts) / slopes  # stored value above which HU > -1000
    above_rows = volume.amax(dim=2) > threshold[:, None]  # [slices, rows]
    above_cols = volume.amax(dim=1) > threshold[:, None]  # [slices, columns]
    present = [above_rows.any(dim=1), above_rows.any(dim=0), above_cols.any(dim=0)]
    if not bool(present[0].any()):
        raise EmptyVolumeError(f"no voxel above {settings.crop_threshold_hu:.0f} HU: the images are empty")
    array_box = []
    for mask in present:
        index = torch.nonzero(mask).flatten()
        array_box.append((int(index[0]), int(index[-1])))
    shape = grid_shape(stack, settings)
    box_1mm = []
    for (axis, flip), n_grid, spacing in zip(stack.canonical, shape, stack.canonical_spacing()):
        n = stack.shape[axis]
        lo, hi = array_box[axis]
        if flip:
            lo, hi = n - 1 - hi, n - 1 - lo
        # 1 mm points whose linear interpolation touches an above-threshold voxel: |j/s - i| < 1
        scale = spacing / settings.spacing_mm
        first = max(0, math.floor((lo - 1) * scale + 1e-9) + 1)
        last = min(n_grid - 1, math.ceil((hi + 1) * scale - 1e-9) - 1)
        box_1mm.append((first, last))
    mapping = GridMapping(shape, _margin_box(box_1mm, shape, settings.crop_margin_voxels), size)
    coords = mapping.coordinates(stack)
    taps = [_taps(c, stack.shape[a], device) for a, c in enumerate(coords)]
    (s0, s1, ws), (r0, r1, wr), (c0, c1, wc) = taps
    s_lo, s_hi = int(s0.min()), int(s1.max())
    r_lo, r_hi = int(r0.min()), int(r1.max())
    c_lo, c_hi = int(c0.min()), int(c1.max())
    cropped = volume[s_lo : s_hi + 1, r_lo : r_hi + 1, c_lo : c_hi + 1]
    c0, c1, r0, r1 = c0 - c_lo, c1 - c_lo, r0 - r_lo, r1 - r_lo
    planes = torch.empty((cropped.shape[0], size, size), dtype=torch.float32, device=device)
    chunk = 16
    for start in range(0, cropped.shape[0], chunk):
        block = cropped[start : start + chunk]
        x = torch.lerp(block.index_select(2, c0).float(), block.index_select(2, c1).float(), wc)
        x = torch.lerp(x.index_select(1, r0), x.index_select(1, r1), wr[:, None])
        x.mul_(slopes[s_lo + start : s_lo + start + chunk, None, None]).add_(intercepts[s_lo + start : s_lo + start + chunk, None, None])
        planes[start : start + chunk] = x
    s0, s1 = s0 - s_lo, s1 - s_lo
    out = torch.empty((size, size, size), dtype=torch.float32, device=device)
    for start in range(0, size, chunk):
        sl = slice(start, start + chunk)
        out[sl] = torch.lerp(planes.index_select(0, s0[sl]), planes.index_select(0, s1[sl]), ws[sl, None, None])
    del planes
    _to_unit_range(out, settings)
    if stack.canonical[1][0] == 2:  # rows run along x: transpose so that H is anterior->posterior
        out = out.permute(0, 2, 1)
    return np.ascontiguousarray(out.cpu().numpy())[None, None], mapping


def _taps(coords: np.ndarray, n: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two neighbour indices and the weight of the upper one, for linear interpolation at coords."""
    low = np.clip(np.floor(coords), 0, max(n - 2, 0)).astype(np.int64)
    weight = (coords - low).astype(np.float32)
    high = np.minimum(low + 1, n - 1)
    return torch.from_numpy(low).to(device), torch.from_numpy(high).to(device), torch.from_numpy(weight).to(device)


def canonical_array(array: np.ndarray, stack: Stack) -> np.ndarray:
    """Reorder a [slice, row, column] array to canonical [D, H, W] (flips and at most one transpose)."""
    view = array.transpose([axis for axis, _ in stack.canonical])
    flips = tuple(i for i, (_, flip) in enumerate(stack.canonical) if flip)
    return np.ascontiguousarray(np.flip(view, flips) if flips else view)


def reference(raw: np.ndarray, stack: Stack, size: int, *, settings: Preprocessing = PREPROCESSING) -> tuple[np.ndarray, GridMapping]:
    """SEED.md step by step with SimpleITK and torch (see the module docstring for the open choices)."""
    hu = raw.astype(np.float32)
    hu *= stack.slopes[:, None, None]
    hu += stack.intercepts[:, None, None]
    hu = canonical_array(hu, stack)
    image = sitk.GetImageFromArray(hu)
    del hu
    vectors = [np.array(stack.directions[axis]) * (-1.0 if flip else 1.0) for axis, flip in stack.canonical]
    corner = [stack.shape[axis] - 1 if flip else 0 for axis, flip in stack.canonical]
    origin = np.array(stack.origin, dtype=np.float64)
    for (axis, _), index in zip(stack.canonical, corner):
        origin = origin + index * stack.spacing[axis] * np.array(stack.directions[axis])
    spacing_xyz = tuple(reversed(stack.canonical_spacing()))
    direction = np.stack(list(reversed(vectors)), axis=1)  # columns: x (W), y (H), z (D)
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(tuple(origin))
    image.SetDirection(tuple(direction.flatten()))
    shape = grid_shape(stack, settings)
    resampled = sitk.Resample(
        image,
        list(reversed(shape)),
        sitk.Transform(),
        sitk.sitkLinear,
        tuple(origin),
        (settings.spacing_mm,) * 3,
        tuple(direction.flatten()),
        settings.hu_min,
        sitk.sitkFloat32,
    )
    del image
    hu_1mm = sitk.GetArrayFromImage(resampled)
    del resampled
    mask = hu_1mm > settings.crop_threshold_hu
    if not mask.any():
        raise EmptyVolumeError(f"no voxel above {settings.crop_threshold_hu:.0f} HU: the images are empty")
    box = []
    for axis in range(3):
        present = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        box.append((int(present[0]), int(present[-1])))
    del mask
    crop = _margin_box(box, shape, settings.crop_margin_voxels)
    cropped = torch.from_numpy(np.ascontiguousarray(hu_1mm[tuple(slice(lo, hi + 1) for lo, hi in crop)]))
    del hu_1mm
    _to_unit_range(cropped, settings)
    out = F.interpolate(cropped[None, None], size=(size, size, size), mode="trilinear", align_corners=False)
    return np.ascontiguousarray(out.numpy()), GridMapping(shape, crop, size)
