"""The explanation as a picture: axial, coronal and sagittal slices through the localised region,
attribution over the CT in a lung window, the region's box, a colour bar, and the decision and
model provenance in the title.

matplotlib's Agg canvas only (no pyplot, no display, no global backend switch); numpy only, no torch.
Orientation is the radiological convention, from the model grid's canonical axes (preprocess: D
slices feet->head, H anterior->posterior, W patient right->left):
- axial: viewed from the feet, anterior up, the patient's right on the viewer's left;
- coronal: viewed from the front, head up, the patient's right on the viewer's left;
- sagittal: viewed from the patient's left, head up, anterior on the viewer's left.
Each view is drawn in millimetres (the grid's voxels are not cubes: the crop box is resized to S
voxels per axis), so anatomy keeps its proportions.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.patheffects import withStroke

from contract import hu_window_affine, shown_probability
from preprocess import write_atomically

from .result import TriageResult

LUNG_WINDOW = (1500.0, -600.0)  # width, level in HU
OVERLAY_FROM = 0.2  # attribution below this is not drawn; opacity grows up to OVERLAY_FULL
OVERLAY_FULL = 0.6
OVERLAY_ALPHA = 0.6
BOX_COLOUR = "#ff00ff"  # magenta: in no part of the overlay's colour map, nor of the grey CT
FULL_DPI = 100
THUMBNAIL_DPI = 80  # the report's pictures: shown small on the summary page, readable when opened
_FIGURE_INCHES = (13.0, 5.6)
_BACKGROUND = "black"
_TEXT = "white"
# matplotlib's text layout and font cache are not thread-safe: one picture at a time per process.
_LOCK = threading.Lock()
_OUTLINE = [withStroke(linewidth=2.5, foreground="black")]  # orientation letters stay legible over bright tissue
_SOURCE_LETTER = {"slice": "z", "row": "y", "column": "x"}


@dataclass(frozen=True)
class View:
    """One panel: the slice shown, how its image axes map to the grid, the box drawn (in mm)."""

    name: str
    image: np.ndarray  # [rows, columns] as displayed before `origin`
    overlay: np.ndarray
    extent: tuple[float, float, float, float]  # left, right, bottom, top, in mm
    origin: str  # "upper": row 0 at the top; "lower": row 0 at the bottom
    box: tuple[float, float, float, float] | None  # x, y, width, height in mm
    edges: tuple[str, str, str, str]  # orientation letters: left, right, top, bottom
    caption: str


def lung_window_limits(width: float = LUNG_WINDOW[0], level: float = LUNG_WINDOW[1]) -> tuple[float, float]:
    """The window's HU limits in the model input's units (HU clipped to [hu_min, hu_max] mapped
    linearly to [-1, 1]); the lower limit lies below -1, so air shows dark grey, as in a lung window."""
    scale, offset = hu_window_affine()
    return scale * (level - width / 2) + offset, scale * (level + width / 2) + offset


def overlay_colours() -> ListedColormap:
    """'turbo' from cyan-blue to red (its dark ends left out: the peak must stand out on the CT), with
    opacity 0 below OVERLAY_FROM, rising to OVERLAY_ALPHA at OVERLAY_FULL."""
    from matplotlib import colormaps

    values = np.linspace(0.0, 1.0, 256)
    colours = colormaps["turbo"](0.15 + 0.75 * values)
    colours[:, 3] = OVERLAY_ALPHA * np.clip((values - OVERLAY_FROM) / (OVERLAY_FULL - OVERLAY_FROM), 0.0, 1.0)
    return ListedColormap(colours, name="attribution")


def views(
    volume: np.ndarray,
    attribution: np.ndarray,
    box: tuple[tuple[int, int], ...] | None,
    *,
    mm_per_voxel: tuple[float, float, float] = (1.0, 1.0, 1.0),
    captions: tuple[str, str, str] = ("axial", "coronal", "sagittal"),
) -> list[View]:
    """The three panels through the centre of `box` ((lo, hi) per D, H, W, inclusive; None: the
    centre of the grid). `volume` and `attribution` are [S, S, S] on the D, H, W grid."""
    if volume.shape != attribution.shape or volume.ndim != 3:
        raise ValueError(f"volume {list(volume.shape)} and attribution {list(attribution.shape)} must be one [S, S, S] grid")
    sizes = volume.shape
    d, h, w = box_centre(box, sizes)
    fd, fh, fw = (float(v) for v in mm_per_voxel)
    depth, height, width = sizes[0] * fd, sizes[1] * fh, sizes[2] * fw

    def rect(x_range, fx, y_range, fy):
        if box is None:
            return None
        (x0, x1), (y0, y1) = x_range, y_range
        return (x0 * fx, y0 * fy, (x1 - x0 + 1) * fx, (y1 - y0 + 1) * fy)

    dr, hr, wr = box if box is not None else (None, None, None)
    axial_box, coronal_box, sagittal_box = rect(wr, fw, hr, fh), rect(wr, fw, dr, fd), rect(hr, fh, dr, fd)
    axial, coronal, sagittal = captions
    return [
        # axial: rows H (anterior at the top), columns W (patient right on the left)
        View("axial", volume[d], attribution[d], (0.0, width, height, 0.0), "upper", axial_box, ("R", "L", "A", "P"), axial),
        # coronal: rows D (head at the top), columns W
        View(
            "coronal", volume[:, h, :], attribution[:, h, :], (0.0, width, 0.0, depth), "lower", coronal_box, ("R", "L", "S", "I"), coronal
        ),
        # sagittal: rows D, columns H (anterior on the left)
        View(
            "sagittal",
            volume[:, :, w],
            attribution[:, :, w],
            (0.0, height, 0.0, depth),
            "lower",
            sagittal_box,
            ("A", "P", "S", "I"),
            sagittal,
        ),
    ]


def box_centre(box: tuple[tuple[int, int], ...] | None, sizes: tuple[int, ...]) -> tuple[int, int, int]:
    """The slices the views go through: the box's centre voxel, or the grid's centre without a box."""
    if box is None:
        return tuple(n // 2 for n in sizes)
    return tuple(int(np.clip((lo + hi) // 2, 0, n - 1)) for (lo, hi), n in zip(box, sizes))


def figure(panels: list[View], title: str) -> Figure:
    """The montage: three panels, the colour bar, the title; black background, as on a reading screen."""
    fig = Figure(figsize=_FIGURE_INCHES, facecolor=_BACKGROUND)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, 4, width_ratios=[1, 1, 1, 0.05], left=0.02, right=0.95, top=0.8, bottom=0.06, wspace=0.12)
    low, high = lung_window_limits()
    colours = overlay_colours()
    layer = None
    for index, panel in enumerate(panels):
        axes = fig.add_subplot(grid[0, index])
        axes.set_facecolor(_BACKGROUND)
        axes.imshow(panel.image, cmap="gray", vmin=low, vmax=high, origin=panel.origin, extent=panel.extent, interpolation="bilinear")
        layer = axes.imshow(
            np.asarray(panel.overlay, dtype=np.float32),
            cmap=colours,
            vmin=0.0,
            vmax=1.0,
            origin=panel.origin,
            extent=panel.extent,
            interpolation="bilinear",
        )
        if panel.box is not None:
            x, y, dx, dy = panel.box
            axes.add_patch(Rectangle((x, y), dx, dy, fill=False, edgecolor=BOX_COLOUR, linewidth=1.5, gid="localization"))
        axes.set_xticks([])
        axes.set_yticks([])
        for spine in axes.spines.values():
            spine.set_visible(False)
        axes.set_title(panel.caption, color=_TEXT, fontsize=10)
        left, right, top, bottom = panel.edges
        style = dict(color="#ffd54f", fontsize=11, fontweight="bold", transform=axes.transAxes, path_effects=_OUTLINE)
        axes.text(0.01, 0.5, left, ha="left", va="center", **style)
        axes.text(0.99, 0.5, right, ha="right", va="center", **style)
        axes.text(0.5, 0.99, top, ha="center", va="top", **style)
        axes.text(0.5, 0.01, bottom, ha="center", va="bottom", **style)
    bar_axes = fig.add_subplot(grid[0, 3])
    # the bar is the overlay's colour map, with its transparency, over the black background, where the
    # panels blend it (alpha <= OVERLAY_ALPHA) over the lung-window CT: the hues match, not the shades
    bar_axes.set_facecolor(_BACKGROUND)
    bar = fig.colorbar(layer, cax=bar_axes)
    bar.set_label("attribution (evidence for pathology)", color=_TEXT)
    bar.ax.tick_params(colors=_TEXT)
    bar.outline.set_edgecolor(_TEXT)
    fig.suptitle(title, color=_TEXT, fontsize=11, x=0.02, y=0.98, ha="left", va="top", linespacing=1.5)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = FULL_DPI) -> Path:
    """The figure as a PNG, written atomically."""
    return write_atomically(Path(path), lambda stream: fig.savefig(stream, format="png", dpi=dpi, facecolor=fig.get_facecolor()))


def describe_model(provenance: Any) -> str:
    """One short line of model provenance: checkpoint, target, precision, S, export date."""
    if isinstance(provenance, str):
        try:
            provenance = json.loads(provenance)
        except ValueError:
            return provenance[:100]
    if not isinstance(provenance, dict):
        return "model provenance unknown"
    checkpoint = str(provenance.get("checkpoint", "unknown checkpoint"))
    if checkpoint.startswith("sha256:"):
        checkpoint = f"checkpoint sha256:{checkpoint[7:19]}"
    parts = [checkpoint]
    parts += [str(provenance[key]) for key in ("target", "precision") if provenance.get(key)]
    if provenance.get("size"):
        parts.append(f"S={provenance['size']}")
    if provenance.get("exported_at"):
        parts.append(f"exported {str(provenance['exported_at'])[:10]}")
    return "model: " + ", ".join(parts)


def title_for(result: TriageResult) -> str:
    """Decision, probability, localisation and provenance: no patient data, no UIDs."""
    meta = result.meta
    decision = "PATHOLOGY" if result.pathology else "NORMAL"
    rule = f" (threshold {result.threshold:g})" if result.threshold is not None else ""
    explanation = result.explanation
    where = (
        f"most attributed region: x {explanation.localization.x[0]}-{explanation.localization.x[1]}, "
        f"y {explanation.localization.y[0]}-{explanation.localization.y[1]}, "
        f"z {explanation.localization.z[0]}-{explanation.localization.z[1]} (series voxels: column, row, slice feet->head)"
        if explanation is not None and explanation.localization is not None
        else "no region attributed: nothing in the volume speaks for pathology"
    )
    provenance = meta.get("provenance", result.model)
    probability = shown_probability(result.probability_of_pathology, result.pathology)
    return f"P(pathology) = {probability}   {decision}{rule}\n{where}\n{describe_model(provenance)}"


def captions_for(result: TriageResult, centre: tuple[int, int, int]) -> tuple[str, str, str]:
    """Each panel's position as the series' own voxel index (the index the localisation uses)."""
    mapping = result.meta.get("output_to_original") or {}
    captions = []
    for name, axis, k in (("axial", "D", centre[0]), ("coronal", "H", centre[1]), ("sagittal", "W", centre[2])):
        entry = mapping.get(axis)
        if not isinstance(entry, dict):
            captions.append(name)
            continue
        lo, hi = entry["clamp"]
        index = int(np.clip(np.rint(entry["offset"] + entry["step"] * k), np.ceil(lo), np.floor(hi)))
        captions.append(f"{name}, {_SOURCE_LETTER.get(entry['source_axis'], entry['source_axis'])} = {index}")
    return tuple(captions)


def montage_figure(result: TriageResult) -> Figure:
    explanation = result.explanation
    if explanation is None:
        raise ValueError("the result has no explanation")
    factors = result.meta.get("resize_factors") or {}
    mm = tuple(float(factors.get(axis, 1.0)) for axis in ("D", "H", "W"))
    box = explanation.box.ranges if explanation.box is not None else None
    centre = box_centre(box, explanation.volume.shape)
    panels = views(explanation.volume, explanation.attribution, box, mm_per_voxel=mm, captions=captions_for(result, centre))
    return figure(panels, title_for(result))


def save_montage(result: TriageResult, path: str | os.PathLike[str], dpi: int = FULL_DPI) -> Path:
    """The montage of an explained result as a PNG at `path` (atomically)."""
    with _LOCK:
        fig = montage_figure(result)
        return save_figure(fig, path, dpi=dpi)
