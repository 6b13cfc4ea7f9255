"""HU volume -> model input [1, 1, S, S, S] in [-1, 1]: the seed's algorithm twice.

`reference` runs the trained preprocessing (docs/model.md) literally: HU float volume, SimpleITK linear resample to 1 mm, crop to
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
`fast` computes the same function on the CPU with far less work, straight from the stored integers:
  * uncompressed slices are read where they lie in the DICOM bytes (no volume is assembled); the
    crop box is found on the stored values (per-slice threshold from slope/intercept; once a box is
    found only the bands outside it are scanned) and mapped to the 1 mm grid points whose
    interpolation touches it;
  * both linear interpolations (original -> 1 mm -> S^3) are composed, per axis, into one filter of
    at most 4 taps (the grids are axis-aligned, so the composition is separable and exact); only the
    cropped part of the volume is read, and the 1 mm volume is never built;
  * in-plane, each stored slice is converted to float32 and filtered along its rows (the strided
    axis) by a sparse matrix product, which computes only the taps, while the converted slice is
    still in cache; then a block of slices is filtered along its columns (the contiguous axis) by
    one batched product of equally spaced windows of the band matrix with a strided view of the
    rows (a gather along the contiguous axis, a transpose to use the sparse product, and dense
    tiles one product each, all measured slower); blocks go to worker threads;
  * along D, slope and the [-1000, 600] -> [-1, 1] window are folded into the filter weights and
    intercepts into a per-slice offset; the output slices whose (at most 4) taps all lie in one
    block are one matrix product over that block's planes plus the offsets, then one clamp; the
    few that straddle two blocks wait for the other block and are combined in tap order, so the
    result never depends on thread timing.
`on_device` computes `fast`'s function again, for a GPU, as a few whole-volume tensor operations
instead of thousands of small ones: the stored values go to the device once (one page-locked host
buffer, one copy); the crop box is found there (per-slice row and column maxima against the same
thresholds) and mapped to the 1 mm grid by the same code as `fast`; the cropped values are
converted to float32 and filtered by three dense products with the same composed filters (the same
folded D filter and bias), then one clamp. Decoding and DICOM parsing stay on the CPU. It agrees
with `fast` to float32 rounding (~1e-6) as long as float32 products are IEEE, torch's default
(TF32, e.g. after torch.set_float32_matmul_precision("high"), keeps 10 mantissa bits: expect
differences near 1e-3).
The one remaining difference from reference is where the clip happens: reference clips between the
two interpolations, fast and on_device after both, which only matters next to voxels outside
[-1000, 600] HU (bone edges): measured mean |fast - reference| ~ 4e-5, max ~ 0.12, on phantoms.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from contract import hu_to_model_range, hu_window_affine
from settings import INPUT_LIMITS, PREPROCESSING, InputLimits, Preprocessing

from .errors import EmptyVolumeError, InputTooLargeError
from .series import ARRAY_AXES, CANONICAL_AXES, Stack


@dataclass(frozen=True)
class GridMapping:
    """Where each S^3 output voxel reads the original volume (for localisation back in DICOM space).

    For canonical axis a and output index k: x = clamp((k + 0.5) * L / S - 0.5, 0, L - 1) in the
    L voxels of the 1 mm crop, i.e. original array index = offset + step * k, clamped to the crop box.
    """

    grid_shape: tuple[int, int, int]  # 1 mm grid, canonical D, H, W
    crop_box: tuple[tuple[int, int], ...]  # inclusive 1 mm grid indices, canonical D, H, W
    size: int

    def crop_points(self, stack: Stack, canonical_axis: int) -> np.ndarray:
        """Original array coordinates of the 1 mm grid points inside the crop box along one axis."""
        axis, flip = stack.canonical[canonical_axis]
        lo, hi = self.crop_box[canonical_axis]
        n = stack.shape[axis]
        u = np.clip(
            np.arange(lo, hi + 1, dtype=np.float64) * PREPROCESSING.spacing_mm / stack.canonical_spacing()[canonical_axis], 0, n - 1
        )
        return n - 1 - u if flip else u

    def output_points(self, canonical_axis: int) -> np.ndarray:
        """Crop-local 1 mm coordinates read by the S output voxels (torch trilinear, align_corners=False)."""
        lo, hi = self.crop_box[canonical_axis]
        length = hi - lo + 1
        return np.clip((np.arange(self.size, dtype=np.float64) + 0.5) * length / self.size - 0.5, 0, length - 1)

    def axis_filter(self, stack: Stack, canonical_axis: int) -> tuple[np.ndarray, np.ndarray]:
        """Both linear interpolations along one axis composed into one filter on the original array
        axis: indices and weights [S, K] (K <= 4; flips included; all-zero taps dropped)."""
        axis = stack.canonical[canonical_axis][0]
        n = stack.shape[axis]
        points, x = self.crop_points(stack, canonical_axis), self.output_points(canonical_axis)
        j0 = np.floor(x).astype(np.int64)
        f = x - j0
        j1 = np.minimum(j0 + 1, len(points) - 1)
        index, weight = [], []
        for j, wj in ((j0, 1 - f), (j1, f)):
            i, g = _linear_taps(points[j], n)
            index += [i, np.minimum(i + 1, n - 1)]
            weight += [wj * (1 - g), wj * g]
        index, weight = np.stack(index, axis=1), np.stack(weight, axis=1)
        keep = weight.max(axis=0) > 0
        return index[:, keep], weight[:, keep]

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
            crop[ARRAY_AXES[axis]] = [round(ends[0], 4), round(ends[1], 4)]
            axes[name] = {
                "source_axis": ARRAY_AXES[axis],
                "offset": round(offset, 6),
                "step": round(step, 6),
                "clamp": crop[ARRAY_AXES[axis]],
            }
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
        math.floor((n - 1) * s / settings.spacing_mm + 1e-6) + 1 for n, s in zip(stack.canonical_shape(), stack.canonical_spacing())
    )


def check_reference_grid(stack: Stack, settings: Preprocessing = PREPROCESSING, limits: InputLimits = INPUT_LIMITS) -> None:
    """Reference mode builds the whole 1 mm volume: a few slices 20 mm apart with 20 mm pixels (a
    300 KB upload) would ask for gigabytes, so its size is checked before anything is decoded."""
    shape = grid_shape(stack, settings)
    voxels = math.prod(shape)
    if voxels > limits.max_grid_1mm_voxels:
        raise InputTooLargeError(
            f"the {settings.spacing_mm:g} mm grid of this series would hold {voxels / 1e6:.0f} M voxels "
            f"({' x '.join(map(str, shape))}), more than reference mode's limit of {limits.max_grid_1mm_voxels / 1e6:.0f} M"
        )


def _margin_box(lo_hi: list[tuple[int, int]], shape: tuple[int, int, int], margin: int) -> tuple[tuple[int, int], ...]:
    return tuple((max(0, lo - margin), min(n - 1, hi + margin)) for (lo, hi), n in zip(lo_hi, shape))


def fast(
    slices: Sequence[np.ndarray], stack: Stack, size: int, *, threads: int, settings: Preprocessing = PREPROCESSING
) -> tuple[np.ndarray, GridMapping]:
    """The reference's result in one pass over the cropped stored values, on the CPU (see the module docstring).

    `slices`: the stored values of each sorted slice, [rows, columns] each: views into the DICOM
    bytes (nothing copied) or a decoded [slices, rows, columns] array. `threads` workers filter
    blocks of slices in-plane, each torch op on one intra-op thread: OpenMP's own threads were
    measured 10x slower, not faster, whenever the cores are shared (several server instances,
    other processes), while plain worker threads degrade gracefully.
    """
    with _torch_threads(1):
        return _fast(slices, stack, size, threads, settings)


def _fast(slices: Sequence[np.ndarray], stack: Stack, size: int, threads: int, settings: Preprocessing) -> tuple[np.ndarray, GridMapping]:
    with ThreadPoolExecutor(threads) as pool:
        mapping = GridMapping(grid_shape(stack, settings), _box_1mm(_array_box(slices, stack, settings), stack, settings), size)
        check_not_uniform(((values.min(), values.max()) for values in slices), stack)
        # in-plane: rows (the strided axis) by a sparse matrix product, which computes only the
        # taps; columns (the contiguous axis) by the band of their matrix, in tiles
        transposed = stack.canonical[1][0] == 2  # image rows run along canonical W
        rows, columns = (mapping.axis_filter(stack, c) for c in ((2, 1) if transposed else (1, 2)))
        rows, columns = _Sparse(*rows), _Band(*columns)
        crop = (slice(rows.lo, rows.hi + 1), slice(columns.lo, columns.hi + 1))
        # along D: one composed filter, with rescale and window folded in (one add and one clamp)
        index, weight, bias = _depth_filter(mapping, stack, settings)
        taps = [[(int(i), float(w)) for i, w in zip(*row) if w != 0] for row in zip(index, weight)]
        mixing = torch.from_numpy(_matrix(index, weight, 0, stack.shape[0]).astype(np.float32))  # [output, stored slice]
        offsets = torch.from_numpy(bias.astype(np.float32)[:, None])
        feeds = defaultdict(list)  # stored slice -> the output slices it feeds, with weights
        for k, row in enumerate(taps):
            for i, w in row:
                feeds[i].append((k, w))
        done = [0] * size  # taps filtered per output slice
        kept = {}  # filtered planes that an output slice still waits for, from blocks already done
        lock = threading.Lock()
        # allocated by numpy, which asks for huge pages (measured 3x fewer page-fault costs on a
        # 64 MB output than torch's allocator)
        out = torch.from_numpy(np.empty((size, size, size), dtype=np.float32))

        buffers = queue.SimpleQueue()  # one set per worker, reused: fresh blocks cost page faults
        for _ in range(threads):
            buffers.put((np.empty((rows.n, columns.n), dtype=np.float32), columns.input_buffer(_CHUNK * size)))

        def filter_slices(i0: int) -> None:  # stored slices i0 ...: int -> float32 of the crop only, both in-plane axes, then along D
            i1 = min(i0 + _CHUNK, max(feeds) + 1)
            buffer = buffers.get()
            try:  # the buffer goes back even on failure: a lost one would leave later tasks waiting forever
                stored, rows_done = buffer
                # one stored slice at a time, so that its float copy is still in cache for the rows
                for values, result in zip(slices[i0:i1], columns.input_rows(rows_done, (i1 - i0) * size).view(i1 - i0, size, columns.n)):
                    np.copyto(stored, values[crop], casting="unsafe")
                    rows.apply(torch.from_numpy(stored), out=result)
                planes = columns.apply(rows_done, (i1 - i0) * size).view(i1 - i0, size, size)
            finally:
                buffers.put(buffer)
            if transposed:
                planes = planes.transpose(1, 2)
            fed = sorted({k for i in range(i0, i1) for k, _ in feeds[i]})
            inside = [k for k in fed if all(i0 <= i < i1 for i, _ in taps[k])]  # consecutive (taps move with k)
            if inside:  # all their taps are in this block: one product over its planes, one clamp
                k0, k1 = inside[0], inside[-1] + 1
                flat = planes.reshape(i1 - i0, size * size)  # a view unless transposed
                torch.addmm(offsets[k0:k1], mixing[k0:k1, i0:i1], flat, out=out[k0:k1].view(k1 - k0, size * size)).clamp_(-1.0, 1.0)
            local = dict(zip(range(i0, i1), planes))
            for k in (k for k in fed if k not in inside):  # the rest wait for a neighbouring block's planes
                with lock:
                    done[k] += sum(i in local for i, _ in taps[k])
                    complete = done[k] == len(taps[k])
                    if not complete:  # the other taps come from another block: keep this block's
                        kept.update((i, local[i].clone()) for i, _ in taps[k] if i in local and i not in kept)
                if complete:  # combined in tap order, so the result never depends on thread timing
                    (i, w), *rest = taps[k]
                    torch.mul(local.get(i, kept.get(i)), w, out=out[k])
                    for i, w in rest:
                        out[k].add_(local.get(i, kept.get(i)), alpha=w)
                    out[k].add_(float(bias[k])).clamp_(-1.0, 1.0)  # HU offset and window, while in cache

        list(pool.map(filter_slices, range(min(feeds), max(feeds) + 1, _CHUNK)))
    return out.numpy()[None, None], mapping


_CHUNK = 8  # slices per worker task: amortises per-call overhead while the buffers stay small


def on_device(
    slices: Sequence[np.ndarray], stack: Stack, size: int, *, device: str, settings: Preprocessing = PREPROCESSING
) -> tuple[torch.Tensor, GridMapping]:
    """`fast`'s function as whole-volume tensor operations on `device` (a GPU, or "cpu" for tests):
    the stored values go there once (`upload`), then `from_stored`."""
    return from_stored(upload(slices, device), stack, size, settings=settings)


def upload(slices: Sequence[np.ndarray], device: str) -> torch.Tensor:
    """The stored values of the sorted slices as one [slices, rows, columns] tensor on `device`.

    Gathered into one host buffer (page-locked for CUDA, so that the copy is one DMA transfer that
    does not block the host). int16 stays int16; unsigned 16-bit values become int32, with the same
    values (torch's uint16 support is limited), and so do decoded int32 arrays.
    """
    device = torch.device(device)
    dtypes = {slices.dtype} if isinstance(slices, np.ndarray) else {values.dtype for values in slices}
    dtype = np.promote_types(np.result_type(*dtypes), np.int16)  # int16 -> int16, uint16 -> int32
    host = torch.empty((len(slices), *slices[0].shape), dtype=getattr(torch, dtype.name), pin_memory=device.type == "cuda")
    buffer = host.numpy()
    for k, values in enumerate(slices):
        buffer[k] = values
    return host.to(device, non_blocking=True)


def from_stored(
    stored: torch.Tensor, stack: Stack, size: int, *, settings: Preprocessing = PREPROCESSING
) -> tuple[torch.Tensor, GridMapping]:
    """The model input [1, 1, S, S, S] (float32, C-contiguous, on the device of `stored`) from the
    uploaded stored values, and its mapping: the same function as `fast`.

    Crop box: per slice, the row and column maxima of the stored values against the slice's integer
    threshold (exact, as on the CPU), one transfer of three flag vectors and each slice's lowest and
    highest value back, then the CPU path's own mapping to the 1 mm grid and its check for one
    value. Then the cropped values only are converted to float32 and filtered by three dense
    products with the composed filters (along D, with rescale and window folded in, then columns,
    then rows), plus the bias and one clamp. Device memory: the stored values, plus at
    any time at most two float32 arrays: the crop and its product along D ([S, crop rows, crop
    columns]), then each product and the next, smaller one. For CUDA it returns once the result is
    computed (the current stream is synchronised), so that other streams, DLPack consumers and
    timings all see the finished values.
    """
    device = stored.device
    n, rows, _ = stored.shape
    # a stored integer v is above threshold t exactly when v > floor(t)
    limits = torch.from_numpy(np.floor(_thresholds(stack, settings)).clip(-(2**31), 2**31 - 1).astype(np.int64)).to(device)[:, None]
    row_maxima = stored.amax(dim=2)  # [slice, row]
    above_rows, above_columns = row_maxima > limits, stored.amax(dim=1) > limits  # [slice, row], [slice, column]
    flags = torch.cat([above_rows.any(dim=1), above_rows.any(dim=0), above_columns.any(dim=0)])
    extremes = torch.stack([stored.amin(dim=(1, 2)), row_maxima.amax(dim=1)], dim=1)  # [slice, (min, max)]
    host = torch.cat([flags.to(stored.dtype), extremes.flatten()]).cpu().numpy()  # one transfer back
    flags, extremes = host[: len(flags)].astype(bool), host[len(flags) :].reshape(n, 2)
    present, found = np.flatnonzero(flags[:n]), [np.flatnonzero(part) for part in np.split(flags[n:], [rows])]
    array_box = [(int(a[0]), int(a[-1])) for a in (present, *found)] if len(present) else None
    mapping = GridMapping(grid_shape(stack, settings), _box_1mm(array_box, stack, settings), size)
    check_not_uniform(extremes, stack)

    *depth_filter, bias = _depth_filter(mapping, stack, settings)
    canonical = {axis: c for c, (axis, _) in enumerate(stack.canonical)}  # array axis -> canonical axis
    crop, matrices = [], []  # per array axis: the stored values it reads, its filter as a dense matrix
    for index, weight in [depth_filter, *(mapping.axis_filter(stack, canonical[axis]) for axis in (1, 2))]:
        lo, hi = int(index.min()), int(index.max())
        crop.append(slice(lo, hi + 1))
        matrices.append(torch.from_numpy(_matrix(index, weight, lo, hi - lo + 1).astype(np.float32)).to(device))
    depth, row_filter, column_filter = matrices
    region = stored[tuple(crop)].to(torch.float32, memory_format=torch.contiguous_format)  # int -> float32 of the crop only
    d, r, c = region.shape
    volume = torch.mm(depth, region.view(d, r * c)).view(size, r, c)
    del region
    volume = torch.mm(volume.view(size * r, c), column_filter.T).view(size, r, size)
    volume = torch.matmul(row_filter, volume)  # [S, S, S]: rows filtered in each output slice
    volume.add_(torch.from_numpy(bias.astype(np.float32)).to(device)[:, None, None]).clamp_(-1.0, 1.0)
    volume = volume.permute([axis for axis, _ in stack.canonical]).contiguous()[None, None]  # array axes -> D, H, W
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return volume, mapping


def _thresholds(stack: Stack, settings: Preprocessing) -> np.ndarray:
    """Per slice, the stored value above which HU > the crop threshold."""
    return (settings.crop_threshold_hu - stack.intercepts.astype(np.float64)) / stack.slopes


def _array_box(slices: Sequence[np.ndarray], stack: Stack, settings: Preprocessing) -> list[tuple[int, int]] | None:
    """First and last present slice, row and column holding a stored value above the slice's
    threshold (None: there is none), in one pass that reads little more than the box's border."""
    threshold = _thresholds(stack, settings)
    present, box = [], None  # box: extent in-plane of the voxels above threshold so far
    for i, values in enumerate(slices):
        # only the bands outside the box can widen it (a few rows and columns once the box has
        # grown), and a slice with nothing there is present if its box part holds such a voxel
        if box is None:
            found = [_extent(values, threshold[i], 0, 0)]
        else:
            r0, r1, c0, c1 = box
            inner = values[r0 : r1 + 1]
            found = [
                _extent(values[:r0], threshold[i], 0, 0),
                _extent(values[r1 + 1 :], threshold[i], r1 + 1, 0),
                _extent(inner[:, :c0], threshold[i], r0, 0),
                _extent(inner[:, c1 + 1 :], threshold[i], r0, c1 + 1),
            ]
        found = [extent for extent in found if extent is not None]
        if found or (box is not None and _any_above(inner[:, c0 : c1 + 1], threshold[i])):
            present.append(i)
        for extent in found:
            box = (
                extent if box is None else (min(box[0], extent[0]), max(box[1], extent[1]), min(box[2], extent[2]), max(box[3], extent[3]))
            )
    return [(present[0], present[-1]), box[:2], box[2:]] if present else None


# HU: a volume spanning less holds one value, up to the rescale's rounding
_ONE_VALUE_HU = 1.0


def check_not_uniform(extremes: Iterable[tuple[float, float]], stack: Stack) -> None:
    """Refuse a volume of one value (blank or wiped pixel data): above -1000 HU it passes the crop
    whole, and the model would answer it confidently. `extremes`: the lowest and highest stored
    value of each sorted slice, read only until two values differ (on CT, within the first slice)."""
    low, high = math.inf, -math.inf
    for (lowest, highest), slope, intercept in zip(extremes, stack.slopes.astype(np.float64), stack.intercepts.astype(np.float64)):
        low = min(low, float(lowest) * slope + intercept)  # slopes are positive
        high = max(high, float(highest) * slope + intercept)
        if high - low >= _ONE_VALUE_HU:
            return
    raise EmptyVolumeError(f"the images hold one value ({round(low, 1):g} HU): blank or wiped pixel data, nothing to classify")


def _box_1mm(array_box: list[tuple[int, int]] | None, stack: Stack, settings: Preprocessing) -> tuple[tuple[int, int], ...]:
    """The reference's crop box (canonical, 1 mm grid indices) from the array box of the values above
    the threshold: the 1 mm points whose interpolation touches such a voxel, plus the margin."""
    if array_box is None:
        raise EmptyVolumeError(f"no voxel above {settings.crop_threshold_hu:.0f} HU: the images are empty")
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
    return _margin_box(box_1mm, shape, settings.crop_margin_voxels)


def _depth_filter(mapping: GridMapping, stack: Stack, settings: Preprocessing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The composed filter along D with each slice's slope and the window's scale to [-1, 1] folded
    into its weights, and intercepts and the window's offset into one bias per output slice:
    filtering the stored values, adding the bias and clamping to [-1, 1] gives the model input.
    Indices and weights [S, K] (float64), bias [S]."""
    index, weight = mapping.axis_filter(stack, 0)
    scale, offset = hu_window_affine(settings)
    bias = (weight * stack.intercepts.astype(np.float64)[index]).sum(axis=1) * scale + offset
    return index, weight * stack.slopes.astype(np.float64)[index] * scale, bias


def _matrix(index: np.ndarray, weight: np.ndarray, lo: int, n: int) -> np.ndarray:
    """A composed filter as a dense float64 matrix [S, n] over inputs lo .. lo + n - 1 (duplicate taps summed)."""
    matrix = np.zeros((index.shape[0], n), dtype=np.float64)
    np.add.at(matrix, (np.repeat(np.arange(index.shape[0]), index.shape[1]), (index - lo).ravel()), weight.ravel())
    return matrix


def _extent(block: np.ndarray, threshold: float, row: int, column: int) -> tuple[int, int, int, int] | None:
    """First and last row and column of `block` (at `row`, `column` in its slice) holding a value above threshold."""
    if block.size == 0 or block.max() <= threshold:  # one reduction answers the common case: nothing there
        return None
    rows = np.flatnonzero(block.max(axis=1) > threshold)
    columns = np.flatnonzero(block.max(axis=0) > threshold)
    return row + int(rows[0]), row + int(rows[-1]), column + int(columns[0]), column + int(columns[-1])


def _any_above(block: np.ndarray, threshold: float) -> bool:
    """Whether any value is above threshold; the middle row alone answers yes for most slices."""
    return bool(block[len(block) // 2].max() > threshold or block.max() > threshold)


class _Band:
    """A composed 1-D filter as a banded matrix, applied along the contiguous axis in tiles.

    Tile t (`tile` consecutive outputs) reads a window of `width` inputs starting at
    `first + t * step`: equally spaced windows, so all tiles are one batched product over a strided
    view of the input rows (no copy), written straight into the output rows. The step is the
    integer near the tiles' mean step that gives the narrowest windows. A filter whose inputs run
    backwards (a flipped axis) is applied to its outputs in reverse order, then mirrored back.
    """

    tile = 16  # outputs per tile: measured fastest among 8..64 (less band waste vs fewer, larger products)

    def __init__(self, index: np.ndarray, weight: np.ndarray):
        self.lo, self.hi = int(index.min()), int(index.max())
        self.n, self.size = self.hi - self.lo + 1, index.shape[0]
        self.reversed = self.size > 1 and index[-1].max() < index[0].max()
        if self.reversed:
            index, weight = index[::-1], weight[::-1]
        matrix = _matrix(index, weight, self.lo, self.n)
        self.tiles = -(-self.size // self.tile)
        used = [np.nonzero(np.abs(matrix[t * self.tile : (t + 1) * self.tile]).max(axis=0))[0] for t in range(self.tiles)]
        starts, ends = [int(u.min()) for u in used], [int(u.max()) for u in used]

        def layout(step: int) -> tuple[int, int, int]:  # (width, step, first): every window covers its tile's inputs
            first = min(a - t * step for t, a in enumerate(starts))
            return max(b - first - t * step + 1 for t, b in enumerate(ends)), step, first

        mean = (starts[-1] - starts[0]) / max(self.tiles - 1, 1)
        self.width, self.step, self.first = min(layout(step) for step in range(max(0, math.floor(mean) - 1), math.ceil(mean) + 2))
        # windows may start before the row or end after it: they then read the neighbouring row, or
        # zeros before the first and after the last, always with weight 0
        self.front = max(0, -self.first)
        self.back = max(0, self.first + (self.tiles - 1) * self.step + self.width - self.n)
        padded = np.pad(matrix, ((0, self.tiles * self.tile - self.size), (self.front, self.back)))
        windows = [
            padded[t * self.tile : (t + 1) * self.tile, self.front + self.first + t * self.step :][:, : self.width].T
            for t in range(self.tiles)
        ]
        self.matrices = torch.from_numpy(np.stack(windows).astype(np.float32))  # [tiles, width, tile]

    def input_buffer(self, rows: int) -> torch.Tensor:
        """Flat storage for up to `rows` input rows and the zeros around them (never written)."""
        return torch.zeros(self.front + rows * self.n + self.back)

    def input_rows(self, storage: torch.Tensor, rows: int) -> torch.Tensor:
        """The first `rows` input rows in `storage`, [rows, n], to be filled before `apply`."""
        return storage[self.front : self.front + rows * self.n].view(rows, self.n)

    def apply(self, storage: torch.Tensor, rows: int) -> torch.Tensor:
        """Filter the first `rows` input rows held in `storage` into [rows, S]."""
        windows = storage.as_strided((self.tiles, rows, self.width), (self.step, self.n, 1), self.front + self.first)
        out = torch.empty((rows, self.tiles, self.tile))
        torch.bmm(windows, self.matrices, out=out.permute(1, 0, 2))  # each tile's [rows, tile] lands in place
        out = out.view(rows, self.tiles * self.tile)[:, : self.size]
        return out.flip(1) if self.reversed else out


class _Sparse:
    """A composed 1-D filter as a sparse [S, n] matrix over the input window it reads."""

    def __init__(self, index: np.ndarray, weight: np.ndarray):
        self.lo, self.hi = int(index.min()), int(index.max())
        self.n = self.hi - self.lo + 1
        rows = np.repeat(np.arange(index.shape[0]), index.shape[1])
        # checked in the opt-in context, not with check_invariants=True: torch 2.11 warns at each such call
        with torch.sparse.check_sparse_tensor_invariants(enable=True):
            coo = torch.sparse_coo_tensor(np.stack([rows, (index - self.lo).ravel()]), weight.ravel(), (index.shape[0], self.n))
        self.matrix = coo.coalesce().to(torch.float32)  # duplicate taps summed; COO measured faster than CSR here

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Filter the rows of a [n, m] tensor into out [S, m]."""
        return torch.mm(self.matrix, x, out=out)


@contextlib.contextmanager
def _torch_threads(threads: int):
    """Run torch ops on `threads` intra-op threads, then restore the process setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _linear_taps(u: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower neighbour index and upper weight of linear interpolation at coordinates u in [0, n - 1]."""
    i = np.clip(np.floor(u + 1e-9), 0, max(n - 2, 0)).astype(np.int64)
    return i, np.clip(u - i, 0.0, 1.0)


def canonical_array(array: np.ndarray, stack: Stack) -> np.ndarray:
    """Reorder a [slice, row, column] array to canonical [D, H, W] (flips and at most one transpose)."""
    view = array.transpose([axis for axis, _ in stack.canonical])
    flips = tuple(i for i, (_, flip) in enumerate(stack.canonical) if flip)
    return np.ascontiguousarray(np.flip(view, flips) if flips else view)


def reference(raw: np.ndarray, stack: Stack, size: int, *, settings: Preprocessing = PREPROCESSING) -> tuple[np.ndarray, GridMapping]:
    """The trained preprocessing step by step with SimpleITK and torch (see the module docstring for the
    open choices). SimpleITK is imported here: the fast path and the GPU never need it."""
    import SimpleITK as sitk

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
    check_not_uniform(((values.min(), values.max()) for values in raw), stack)
    box = []
    for axis in range(3):
        present = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        box.append((int(present[0]), int(present[-1])))
    del mask
    crop = _margin_box(box, shape, settings.crop_margin_voxels)
    cropped = torch.from_numpy(np.ascontiguousarray(hu_1mm[tuple(slice(lo, hi + 1) for lo, hi in crop)]))
    del hu_1mm
    hu_to_model_range(cropped, settings)
    out = F.interpolate(cropped[None, None], size=(size, size, size), mode="trilinear", align_corners=False)
    return np.ascontiguousarray(out.numpy()), GridMapping(shape, crop, size)
