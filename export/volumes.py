"""Seeded model-space volumes ([1, 1, S, S, S] in [-1, 1]) for demo-weight calibration and parity.

They exercise the network the way real inputs do (air at -1, soft tissue, lungs, bone at +1,
structure at several scales) without any patient data.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from preprocess.resample import hu_to_model_range


def uniform(size: int, generator: torch.Generator) -> torch.Tensor:
    """Independent voxels: the worst case for numeric agreement (no smoothness to average out)."""
    return torch.rand(1, 1, size, size, size, generator=generator) * 2 - 1


def smooth(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random fields squashed into [-1, 1], like normalised CT texture."""
    noise = torch.randn(count, 1, size, size, size, generator=generator)
    blurred = F.avg_pool3d(noise, kernel_size=5, stride=1, padding=2, count_include_pad=False)
    return torch.tanh(3 * blurred / blurred.std())


def chest_phantom(size: int, generator: torch.Generator, nodule: bool = False) -> torch.Tensor:
    """An idealised cropped chest: body ellipse, two lungs, heart, spine, optional lung nodule."""
    axis = torch.linspace(-1, 1, size)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")  # D (cranio-caudal), H (anterior-posterior), W
    volume = torch.full((size, size, size), -1000.0)
    volume[(x / 0.95) ** 2 + (y / 0.75) ** 2 <= 1] = 40.0  # soft tissue
    for side in (-1, 1):
        lung = ((x - side * 0.45) / 0.35) ** 2 + ((y + 0.05) / 0.5) ** 2 + (z / 0.95) ** 2 <= 1
        volume[lung] = -850.0
    volume[(x / 0.25) ** 2 + ((y + 0.1) / 0.3) ** 2 + ((z + 0.2) / 0.5) ** 2 <= 1] = 45.0  # heart
    volume[(x / 0.12) ** 2 + ((y - 0.55) / 0.12) ** 2 <= 1] = 700.0  # spine (bone, clipped)
    if nodule:
        volume[(x + 0.45) ** 2 + (y + 0.1) ** 2 + (z - 0.3) ** 2 <= 0.1**2] = 30.0
    volume = hu_to_model_range(volume)  # HU above, then the preprocessing's own window
    volume = volume + 0.02 * torch.randn(volume.shape, generator=generator)
    return volume.clamp(-1, 1)[None, None]
