"""Explanations of the classifier's decision: attribution maps and where they point.

Public API:
- geometry (numpy and scipy.ndimage, no torch: safe for clients): `localize(attribution, meta)` ->
  (Box on the S^3 grid, OriginalBox in the chosen series' voxels), `most_attributed_region`,
  `to_original`, `to_output`, `Box`, `OriginalBox`, `LocalizationError`.
- `Explainer` (torch + Captum, loaded on first use): Grad-CAM on the last residual layer by default,
  Integrated Gradients or Occlusion on request; volume in, attribution in [0, 1] and probabilities out.
  `METHODS` names them, `ExplainError` is a bad request.
Imports `settings`, `contract` and `classifier`; never `serve`, `export` or `client`.
"""

from .geometry import Box, LocalizationError, OriginalBox, localize, most_attributed_region, to_original, to_output

_LAZY = {"Explainer": "Explainer", "METHODS": "METHODS", "ExplainError": "ExplainError"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import attribution

        return getattr(attribution, _LAZY[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [  # noqa: PLE0604
    *_LAZY,
    "Box",
    "LocalizationError",
    "OriginalBox",
    "localize",
    "most_attributed_region",
    "to_original",
    "to_output",
]
