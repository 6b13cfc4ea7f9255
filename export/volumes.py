"""Seeded model-space volumes ([1, 1, S, S, S] in [-1, 1]) for demo-weight calibration and parity.

They exercise the network the way real inputs do (air at -1, soft tissue, lungs, bone at +1,
structure at several scales) without any patient data; the chest is preprocess's own phantom,
windowed by the contract's own HU mapping.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from contract import hu_to_model_range
from preprocess import phantom


def uniform(size: int, generator: torch.Generator) -> torch.Tensor:
    """Independent voxels: the worst case for numeric agreement (no smoothness to average out)."""
    return torch.rand(1, 1, size, size, size, generator=generator) * 2 - 1


def smooth(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random fields squashed into [-1, 1], like normalised CT texture."""
    noise = torch.randn(count, 1, size, size, size, generator=generator)
    blurred = F.avg_pool3d(noise, kernel_size=5, stride=1, padding=2, count_include_pad=False)
    return torch.tanh(3 * blurred / blurred.std())


def chest(size: int, seed: int, lesion: bool) -> torch.Tensor:
    """The chest phantom (body, fat, lungs, spine, optionally a dense lesion) sampled on an S^3 grid
    that spans the body as a crop box does, in the model's input range."""
    hu = phantom.hu_volume(
        slices=size, rows=size, columns=size, pixel_spacing=400.0 / size, slice_spacing=300.0 / size, seed=seed, lesion=lesion
    )
    return hu_to_model_range(torch.from_numpy(hu).float())[None, None]
