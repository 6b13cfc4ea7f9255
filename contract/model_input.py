"""The model input: a [1, 1, S, S, S] float32 volume, the HU window mapped linearly to [-1, 1]."""

from __future__ import annotations

import math

from settings import NAMES, PREPROCESSING, Preprocessing

from .errors import ContractError

SIZE_MULTIPLE = 8  # the network's stem, max-pool and layer2 each halve the grid
MIN_SIZE = 16  # below this the dilated layers see almost only padding
MAX_SIZE = 512  # 8x the trained input's voxels: beyond any card or CPU this serves on


RANGE_TOLERANCE = 1e-3  # float32 rounding of the window's affine map, far below any un-windowed value


class InvalidSizeError(ContractError):
    """S that the network cannot take or that no deployment would serve."""


class OutOfRangeError(ContractError):
    """A volume whose values no preprocessing makes: NaN, infinite, or outside [-1, 1] (HU not windowed)."""


def validate_size(size: object, what: str = "size") -> int:
    """S as an int, or InvalidSizeError naming the rule (the one check every package applies)."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise InvalidSizeError(f"{what} must be an integer, got {size!r}")
    if size % SIZE_MULTIPLE or not MIN_SIZE <= size <= MAX_SIZE:
        raise InvalidSizeError(f"{what} {size} is not usable: it must be a multiple of {SIZE_MULTIPLE} between {MIN_SIZE} and {MAX_SIZE}")
    return size


def hu_window_affine(settings: Preprocessing = PREPROCESSING) -> tuple[float, float]:
    """(scale, offset) with model value = scale * HU + offset, before clipping to [-1, 1]."""
    scale = 2.0 / (settings.hu_max - settings.hu_min)
    return scale, -settings.hu_min * scale - 1.0


def hu_to_model_range(x, settings: Preprocessing = PREPROCESSING):
    """HU -> model input, in place, for a numpy array or a torch tensor: clip to the window, then
    map it linearly to [-1, 1] (the trained preprocessing). Returns x."""
    lo, hi = settings.hu_min, settings.hu_max
    if hasattr(x, "clamp_"):
        x.clamp_(lo, hi)
    else:
        x.clip(lo, hi, out=x)
    scale, offset = hu_window_affine(settings)
    x *= scale
    x += offset
    return x


def check_model_range(volume, what: str = NAMES.volume) -> None:
    """OutOfRangeError unless every value of `volume` (numpy array or torch tensor, on any device) is
    finite and in [-1, 1]. The network answers anything with a confident probability (NaN volumes
    included), so the served classifiers check what a client that preprocesses itself sends."""
    lo, hi = (float(v) for v in volume.aminmax()) if hasattr(volume, "aminmax") else (float(volume.min()), float(volume.max()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise OutOfRangeError(f"{what} holds non-finite values (NaN or infinite)")
    if lo < -1.0 - RANGE_TOLERANCE or hi > 1.0 + RANGE_TOLERANCE:
        raise OutOfRangeError(
            f"{what} holds values from {lo:.4g} to {hi:.4g}, outside the model's [-1, 1]: "
            f"HU must be windowed to [{PREPROCESSING.hu_min:g}, {PREPROCESSING.hu_max:g}] and mapped to [-1, 1] as preprocess does"
        )
