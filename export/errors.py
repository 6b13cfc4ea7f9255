"""Typed, user-facing export errors: one clear line each, never a traceback, never PHI."""

from __future__ import annotations


class ExportError(ValueError):
    """Base of every error caused by the user's input (checkpoint, flags, output folder)."""


class CheckpointError(ExportError):
    """The checkpoint file cannot be read safely as weights (missing, not a state dict, pickled objects)."""


class ArchitectureError(CheckpointError):
    """The weights are not MedicalNet's ResNet-34 (missing/unexpected keys, wrong shapes, other layout)."""


class OutputFolderError(ExportError):
    """The output folder exists and was not written by export: refused, never deleted."""


class TargetUnavailableError(ExportError):
    """The target needs something this machine lacks (e.g. TensorRT and an NVIDIA GPU)."""
