"""Group frames into series, check each one as a volume, and choose the series to classify.

The rule is data (`SelectionRule`), applied in this order to every series:
  1. modality is CT (every image);  2. not a localizer/scout/topogram (localizer images filed in a volume's series
  are set aside);  3. every slice has pixels in a transfer syntax an installed decoder reads,
  position, orientation and pixel spacing, all slices the same size, spacing, orientation and pixel
  storage, with stored values that are (or rescale to) HU (a RescaleType other than HU is another quantity);
  4. axial (slice normal within `max_axial_angle_deg` of the patient's cranio-caudal axis, rows and
     columns within `max_inplane_angle_deg` of a patient axis);
  5. at least `min_slices` distinct slices, within settings.INPUT_LIMITS;
  6. slices sorted by position projected on the slice normal are evenly spaced (no gap, no
     duplicate position, each within `grid_tolerance` of a step of its place on the even grid)
     and stacked along the normal (no gantry tilt).
A study is one patient's: images of several patients (PatientID; images without it count as the
patient their study's images name, or as their study's own when none does) are refused unless the
caller names the series. Among the series that pass, those covering at least `min_coverage_fraction`
of the widest one's length along the body compete (a partial slab must not beat the full chest,
while thin and thick reconstructions of one chest both do): the thinnest slice spacing wins, then
the most slices, then the smallest SeriesInstanceUID compared as text, "1.2.3.10" before "1.2.3.9"
(only so that the choice is deterministic). A forced SeriesInstanceUID skips the ranking but not
the checks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from settings import INPUT_LIMITS, InputLimits

from .dicom import Frame, check_decodable
from .errors import (
    DuplicateSliceError,
    GantryTiltError,
    ImplausibleValueError,
    InconsistentSlicesError,
    InputTooLargeError,
    LocalizerError,
    MissingGeometryError,
    MissingPixelDataError,
    MixedPatientsError,
    MixedStudiesError,
    NotAxialError,
    NotCTError,
    NotDicomError,
    NotHounsfieldError,
    NoUsableSeriesError,
    SeriesNotFoundError,
    SliceGapError,
    StudyError,
    TooFewSlicesError,
    shown,
)


@dataclass(frozen=True)
class SelectionRule:
    """Which series is a usable chest-CT volume, and which usable one to prefer."""

    modality: str = "CT"
    localizer_image_types: tuple[str, ...] = ("LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW")
    max_axial_angle_deg: float = 30.0  # slice normal vs patient z
    max_inplane_angle_deg: float = 30.0  # image rows and columns vs the nearest patient axis
    spacing_tolerance: float = 0.10  # relative deviation of one slice step from the median step
    grid_tolerance: float = 0.25  # deviation of a slice from the even grid the volume assumes, in slice steps
    max_tilt_deg: float = 1.0  # sideways shift of the stack per step, as an angle
    same_geometry_tolerance: float = 1e-3  # direction cosines and relative pixel spacing
    min_coverage_fraction: float = 0.8  # of the widest usable series' length along the body, to compete in the ranking
    limits: InputLimits = INPUT_LIMITS


SELECTION_RULE = SelectionRule()

# canonical axes of the model input: D feet->head (+z), H anterior->posterior (+y), W right->left (+x)
CANONICAL_AXES = ("D", "H", "W")
ARRAY_AXES = ("slice", "row", "column")


@dataclass(frozen=True)
class Stack:
    """A checked series: frames sorted along patient z and the geometry of the volume they form.

    The volume array is [slice, row, column] in this order. `canonical[a]` gives, for canonical
    axis a in (D, H, W), the array axis it reads and whether it runs backwards along it.
    """

    study_uid: str
    series_uid: str
    frames: tuple[Frame, ...]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # mm between slices, rows, columns
    origin: tuple[float, float, float]  # patient position of array voxel [0, 0, 0]
    directions: tuple[tuple[float, float, float], ...]  # unit vectors of array axes slice, row, column
    canonical: tuple[tuple[int, bool], ...]
    notes: tuple[str, ...] = ()  # images set aside or read despite a flaw: warnings for the metadata

    @property
    def slopes(self) -> np.ndarray:
        return np.array([f.slope for f in self.frames], dtype=np.float32)

    @property
    def intercepts(self) -> np.ndarray:
        return np.array([f.intercept for f in self.frames], dtype=np.float32)

    @property
    def coverage_mm(self) -> float:
        """Length along the slice normal the slices stand for (slices x spacing): a thin and a thick
        reconstruction of one range cover the same."""
        return len(self.frames) * self.spacing[0]

    def canonical_shape(self) -> tuple[int, int, int]:
        return tuple(self.shape[axis] for axis, _ in self.canonical)

    def canonical_spacing(self) -> tuple[float, float, float]:
        return tuple(self.spacing[axis] for axis, _ in self.canonical)

    def describe(self) -> str:
        return f"{len(self.frames)} axial CT slices, {self.spacing[0]:.2f} mm apart, {self.shape[1]}x{self.shape[2]} pixels"


def build_stack(frames: Sequence[Frame], rule: SelectionRule = SELECTION_RULE) -> Stack:
    """Check one series against the rule and sort it into a volume, or raise the reason it is unusable."""
    first = frames[0]
    limits = rule.limits
    others = [f for f in frames if f.modality.upper() != rule.modality]
    if others:  # every frame: a series of MR slices behind one CT header would be read as HU
        modality = " and ".join(sorted({shown(f.modality, "CS", "Modality") if f.modality else "unknown" for f in others}))
        if len(others) == len(frames):
            raise NotCTError(f"series is {modality}, not {rule.modality}")
        raise NotCTError(f"{len(others)} of {len(frames)} images of the series are {modality}, not {rule.modality}")
    notes: list[str] = []
    volume = [f for f in frames if not any(t in rule.localizer_image_types for t in f.image_type)]
    if not volume:
        raise LocalizerError("series is a localizer/scout image, not a volume")
    if len(volume) < len(frames):  # some scanners file the scout in the series of the volume
        notes.append(f"{_count(len(frames) - len(volume), 'localizer image')} in the series set aside")
        frames, first = volume, volume[0]
    missing = sum(not f.pixels.present for f in frames)
    if missing:
        raise MissingPixelDataError(f"{missing} of {len(frames)} images have no pixel data (truncated or image-less files)")
    by_syntax: dict[str, Frame] = {}
    for f in frames:  # the first image of each transfer syntax
        by_syntax.setdefault(f.pixels.transfer_syntax, f)
    for f in by_syntax.values():
        check_decodable(f)
    _check_same_storage(frames)
    if any(f.position is None or f.orientation is None or f.pixel_spacing is None for f in frames):
        raise MissingGeometryError("slices lack ImagePositionPatient, ImageOrientationPatient or PixelSpacing: no 3D geometry")
    _check_finite(frames)
    if len({(f.rows, f.columns) for f in frames}) > 1:
        sizes = sorted({f"{f.rows}x{f.columns}" for f in frames})
        raise InconsistentSlicesError(f"slices have different sizes ({', '.join(sizes)})")
    if first.rows > limits.max_rows or first.columns > limits.max_columns:
        raise InputTooLargeError(
            f"slices of {first.rows}x{first.columns} pixels exceed the limit of {limits.max_rows}x{limits.max_columns}"
        )
    if first.rows < 2 or first.columns < 2:
        raise InconsistentSlicesError(f"slices of {first.rows}x{first.columns} pixels are not CT images")
    orientations = np.array([f.orientation for f in frames], dtype=np.float64)
    spacings = np.array([f.pixel_spacing for f in frames], dtype=np.float64)
    if np.abs(orientations - orientations[0]).max() > rule.same_geometry_tolerance:
        raise InconsistentSlicesError("slices have different orientations (mixed stacks in one series)")
    not_positive = int((spacings <= 0).any(axis=1).sum())
    if not_positive:
        raise ImplausibleValueError(f"PixelSpacing is not positive in {not_positive} of {len(frames)} slices")
    if np.abs(spacings / spacings[0] - 1).max() > rule.same_geometry_tolerance:
        raise InconsistentSlicesError("slices have different pixel spacing")
    if not all(limits.min_spacing_mm <= s <= limits.max_spacing_mm for s in spacings[0]):
        raise ImplausibleValueError(
            f"PixelSpacing {spacings[0][0]:g}\\{spacings[0][1]:g} mm is outside {limits.min_spacing_mm:g}-{limits.max_spacing_mm:g} mm"
        )
    _check_hounsfield(frames)
    if any(f.slope <= 0 for f in frames):
        raise InconsistentSlicesError("invalid RescaleSlope/RescaleIntercept (slope must be positive)")
    slopes = [f.slope for f in frames]
    slope = min(slopes) if min(slopes) < limits.min_rescale_slope else max(slopes)
    intercept = max((f.intercept for f in frames), key=abs)
    if not limits.min_rescale_slope <= slope <= limits.max_rescale_slope or abs(intercept) > limits.max_abs_rescale_intercept:
        raise ImplausibleValueError(
            f"RescaleSlope {slope:g} / RescaleIntercept {intercept:g} are outside what CT uses "
            f"(slope {limits.min_rescale_slope:g} to {limits.max_rescale_slope:g}, |intercept| up to {limits.max_abs_rescale_intercept:g})"
        )
    row_dir, col_dir = _unit(orientations[0][:3]), _unit(orientations[0][3:])
    if row_dir is None or col_dir is None or abs(float(row_dir @ col_dir)) > 1e-3:
        raise MissingGeometryError("ImageOrientationPatient is not two perpendicular unit vectors")
    normal = np.cross(row_dir, col_dir)
    angle = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    if angle > rule.max_axial_angle_deg:
        raise NotAxialError(f"slices are not axial (slice normal {angle:.0f} degrees from the body axis)")
    # axes are put in the model's order by flips and transposes only: a rotation within the plane would stay in the volume
    rotation = max(math.degrees(math.acos(min(1.0, float(np.abs(d).max())))) for d in (row_dir, col_dir))
    if rotation > rule.max_inplane_angle_deg:
        raise NotAxialError(
            f"slices are rotated in their plane (image rows or columns {rotation:.0f} degrees from the nearest patient axis, "
            f"at most {rule.max_inplane_angle_deg:g})"
        )
    if normal[2] < 0:
        normal = -normal  # stack towards the head whatever the acquisition direction
    conflicting = sum(f.conflicting_copy for f in frames)
    if conflicting:
        raise InconsistentSlicesError(
            f"{_count(conflicting, 'slice')} sent again with other pixel data (the same SOPInstanceUID and position): "
            "which copy is right is unknown"
        )
    unique: dict[tuple, Frame] = {}
    for f in frames:  # a copy of a file has its SOP instance, frame and position: kept once
        unique.setdefault((f.sop_uid, f.frame, f.position), f)
    if len(unique) < len(frames):
        notes.append(f"{_count(len(frames) - len(unique), 'duplicate copy', 'duplicate copies')} of slices ignored")
    frames = list(unique.values())
    sharing = len(frames) - len({(f.sop_uid, f.frame) for f in frames})
    if sharing:  # distinct slices (they lie at different positions) with a reused UID: read by position
        notes.append(f"{_count(sharing, 'slice')} reuse another slice's SOPInstanceUID at a different position: read by position")
    n = len(frames)
    if n < limits.min_slices:
        raise TooFewSlicesError(f"only {n} slice{'s' if n != 1 else ''}: a chest CT volume needs at least {limits.min_slices}")
    if n > limits.max_slices or n * first.rows * first.columns > limits.max_voxels:
        raise InputTooLargeError(
            f"{n} slices of {first.rows}x{first.columns} exceed the limit of {limits.max_slices} slices / {limits.max_voxels} voxels"
        )
    positions = np.array([f.position for f in frames], dtype=np.float64)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    frames = [frames[i] for i in order]
    positions, along = positions[order], along[order]
    steps = np.diff(along)
    if steps.min() < 1e-3:
        raise DuplicateSliceError("two different slices share one position (duplicate or overlapping reconstructions)")
    median = float(np.median(steps))
    if not limits.min_spacing_mm <= median <= limits.max_spacing_mm:
        raise ImplausibleValueError(f"slices {median:g} mm apart: outside {limits.min_spacing_mm:g}-{limits.max_spacing_mm:g} mm")
    worst = float(np.abs(steps - median).max())
    if worst > rule.spacing_tolerance * median + 1e-2:
        gaps = int(np.sum(steps > median * (1 + rule.spacing_tolerance)))
        raise SliceGapError(
            f"uneven slice spacing: steps from {steps.min():.2f} to {steps.max():.2f} mm (typical {median:.2f} mm)"
            + (f", {gaps} gap{'s' if gaps != 1 else ''}: missing slices?" if gaps else "")
        )
    slice_spacing = float(along[-1] - along[0]) / (n - 1)
    # the volume puts slice k at along[0] + k * slice_spacing: steps each near the median can still drift off that grid
    off_grid = np.abs(along - (along[0] + np.arange(n) * slice_spacing))
    if off_grid.max() > rule.grid_tolerance * slice_spacing + 1e-2:
        k = int(off_grid.argmax())
        raise SliceGapError(
            f"uneven slice spacing: slice {k + 1} of {n} from the feet lies {off_grid[k]:.2f} mm "
            f"from its place on an even {slice_spacing:.2f} mm grid"
        )
    sideways = np.diff(positions, axis=0) - steps[:, None] * normal
    tilt = math.degrees(math.atan(float(np.linalg.norm(sideways, axis=1).max()) / median))
    if tilt > rule.max_tilt_deg:
        raise GantryTiltError(f"slices are shifted sideways along the stack (gantry tilt of about {tilt:.1f} degrees): not supported")
    return Stack(
        study_uid=first.study_uid,
        series_uid=first.series_uid,
        frames=tuple(frames),
        shape=(n, first.rows, first.columns),
        spacing=(slice_spacing, float(spacings[0][0]), float(spacings[0][1])),
        origin=tuple(float(v) for v in positions[0]),
        directions=(tuple(normal), tuple(col_dir), tuple(row_dir)),
        canonical=_canonical(row_dir, col_dir),
        notes=tuple(notes),
    )


def _count(n: int, singular: str, plural: str | None = None) -> str:
    return f"{n} {singular if n == 1 else plural or singular + 's'}"


_LISTED = 5  # series whose reasons NoUsableSeriesError's message gives
_STORAGE = (
    ("BitsAllocated", lambda p: p.bits_allocated),
    ("BitsStored", lambda p: p.bits_stored),
    ("PixelRepresentation", lambda p: int(p.signed)),
    ("SamplesPerPixel", lambda p: p.samples_per_pixel),
    ("PhotometricInterpretation", lambda p: p.photometric),
)


def _check_same_storage(frames: Sequence[Frame]) -> None:
    """One pixel layout for the whole series: a slice stored otherwise (8 among 16 bits) would be
    decoded into the volume's layout as wrong values, not refused."""
    for keyword, read in _STORAGE:
        values = {read(f.pixels) for f in frames}
        if len(values) > 1:
            named = sorted({str(v) if isinstance(v, int) else shown(v, "CS", keyword) for v in values})
            raise InconsistentSlicesError(f"slices are stored differently: {keyword} {' and '.join(named)}")


def _check_hounsfield(frames: Sequence[Frame]) -> None:
    """Stored values become HU through RescaleSlope/RescaleIntercept (type 1 in a CT image), unless
    RescaleType names another quantity (a CT image must give it when the values are not HU: a
    dual-energy iodine map in mg/ml read as HU would be a confident wrong answer). Without a rescale
    only signed values of more than 8 bits can already be HU; 8-bit or unsigned ones are display
    levels or offset values (a lossy 8-bit export read as HU would be one too)."""
    other = sorted({f.rescale_type.upper() for f in frames if f.rescale_type and f.rescale_type.upper() != "HU"})
    if other:
        named = " and ".join(shown(value, "CS", "RescaleType") for value in other)
        raise NotHounsfieldError(f"RescaleType {named}: the stored values are not Hounsfield units")
    missing = sum(not f.rescaled for f in frames)
    if not missing:
        return
    if missing < len(frames):
        raise InconsistentSlicesError(f"RescaleIntercept is missing in {missing} of {len(frames)} slices")
    p = frames[0].pixels
    if p.bits_stored <= 8 or not p.signed:
        kind = f"{p.bits_stored}-bit {'signed' if p.signed else 'unsigned'}"
        raise NotHounsfieldError(f"no RescaleIntercept: {kind} stored values are not Hounsfield units")


def _check_one_patient(frames: Sequence[Frame]) -> None:
    """Choosing among series of different patients would answer for whoever has the thinner slices:
    patients are told apart by PatientID digest. An image without PatientID is its study's patient
    where that study's other images name one (an export that dropped it from a file), else counts
    as a patient of its own study."""
    named: dict[str, set[str]] = {}
    for f in frames:
        if f.patient:
            named.setdefault(f.study_uid, set()).add(f.patient)
    patients = {f.patient or _only(named.get(f.study_uid, ())) or f"study {f.study_uid}" for f in frames}
    if len(patients) > 1:
        series = len({f.series_uid for f in frames})
        raise MixedPatientsError(
            f"images of {len(patients)} patients ({_count(series, 'series', 'series')}): a study is one patient's, so none is chosen"
        )


def _only(values) -> str | None:
    """The one element of a collection, None unless there is exactly one."""
    return next(iter(values)) if len(values) == 1 else None


def _check_finite(frames: Sequence[Frame]) -> None:
    """Every geometry and rescale value a finite number (a NaN or text there would propagate into
    the volume silently): the first attribute that is not, named, with how many slices hold it."""
    for name, values in (
        ("ImagePositionPatient", [f.position for f in frames]),
        ("ImageOrientationPatient", [f.orientation for f in frames]),
        ("PixelSpacing", [f.pixel_spacing for f in frames]),
        ("RescaleSlope", [(f.slope,) for f in frames]),
        ("RescaleIntercept", [(f.intercept,) for f in frames]),
    ):
        bad = sum(not all(math.isfinite(v) for v in value) for value in values)
        if bad:
            raise ImplausibleValueError(f"{name} is not a finite number in {bad} of {len(frames)} slices")


def _unit(v: np.ndarray) -> np.ndarray | None:
    norm = float(np.linalg.norm(v))
    return v / norm if abs(norm - 1) < 1e-2 else None


def _canonical(row_dir: np.ndarray, col_dir: np.ndarray) -> tuple[tuple[int, bool], ...]:
    """Array axis and flip for D, H, W so that the model sees every series as head-first supine does."""
    if abs(row_dir[0]) >= abs(row_dir[1]):  # columns run along x (the usual case)
        return ((0, False), (1, bool(col_dir[1] < 0)), (2, bool(row_dir[0] < 0)))
    return ((0, False), (2, bool(row_dir[1] < 0)), (1, bool(col_dir[0] < 0)))


def select_series(frames: Sequence[Frame], *, series_uid: str | None = None, rule: SelectionRule = SELECTION_RULE) -> tuple[Stack, dict]:
    """The stack to classify and a JSON-ready record of the choice: {chosen, reason, skipped}."""
    if not frames:
        raise NotDicomError("no DICOM images found in the input")
    if series_uid is None:
        _check_one_patient(frames)
    groups: dict[str, list[Frame]] = {}
    for f in frames:
        groups.setdefault(f.series_uid, []).append(f)
    if series_uid is not None and series_uid not in groups:
        raise SeriesNotFoundError(f"series {_shown_uid(series_uid)} is not in the study ({len(groups)} series found)")
    stacks: dict[str, Stack] = {}
    errors: dict[str, StudyError] = {}
    for uid in sorted(groups):
        if series_uid is not None and uid != series_uid:
            continue
        try:
            _check_one_patient(groups[uid])
            _check_one_study(groups[uid])
            stacks[uid] = build_stack(groups[uid], rule)
        except StudyError as exc:
            errors[uid] = exc
    skipped = [{"series_uid": _shown_uid(uid), "reason": str(exc)} for uid, exc in errors.items()]
    if series_uid is not None:
        skipped += [{"series_uid": _shown_uid(uid), "reason": "not the requested series"} for uid in sorted(groups) if uid != series_uid]
    if not stacks:
        if len(errors) == 1:
            (error,) = errors.values()
            raise error
        listing = "; ".join(f"series {i + 1}: {s['reason']}" for i, s in enumerate(skipped[:_LISTED]))
        if len(skipped) > _LISTED:  # one line, whatever the study: `skipped` has them all
            listing += f"; and {len(skipped) - _LISTED} more"
        raise NoUsableSeriesError(f"no usable chest-CT series among {len(groups)} ({listing})", skipped)
    studies = {s.study_uid for s in stacks.values()}
    if series_uid is None and len(studies) > 1:  # the thinnest series could be the prior exam's
        raise MixedStudiesError(
            f"usable series of {len(studies)} studies ({len(stacks)} series): one study is classified at a time, so none is chosen"
        )
    # string order of the UIDs: any fixed order makes the choice deterministic
    ranked = sorted(stacks.values(), key=lambda s: (round(s.spacing[0], 3), -len(s.frames), s.series_uid))
    widest = max(s.coverage_mm for s in ranked)
    enough = rule.min_coverage_fraction * widest
    competing, partial = [s for s in ranked if s.coverage_mm >= enough], [s for s in ranked if s.coverage_mm < enough]
    chosen = competing[0]
    if series_uid is not None:
        reason = f"{chosen.describe()}: requested by SeriesInstanceUID"
    elif len(ranked) == 1:
        reason = f"{chosen.describe()}: the only usable series"
    else:
        reason = (
            f"{chosen.describe()}: thinnest slices, then most slices, among the {len(competing)} of {len(ranked)} usable series "
            f"that cover at least {rule.min_coverage_fraction:.0%} of the widest one's {widest:.0f} mm"
        )
    skipped += [
        {"series_uid": _shown_uid(s.series_uid), "reason": f"usable ({s.describe()}) but {_behind(s, chosen)}"} for s in competing[1:]
    ]
    skipped += [
        {
            "series_uid": _shown_uid(s.series_uid),
            "reason": f"usable ({s.describe()}) but covers {s.coverage_mm:.0f} mm, less than "
            f"{rule.min_coverage_fraction:.0%} of the widest one's {widest:.0f} mm",
        }
        for s in partial
    ]
    return chosen, {"chosen": _shown_uid(chosen.series_uid), "reason": reason, "skipped": skipped}


def _behind(stack: Stack, chosen: Stack) -> str:
    """Why a competing series ranks after the chosen one."""
    if round(stack.spacing[0], 3) > round(chosen.spacing[0], 3):
        return "thicker slices than the chosen series"
    if len(stack.frames) < len(chosen.frames):
        return "fewer slices than the chosen series"
    return "the same spacing and number of slices as the chosen series, whose SeriesInstanceUID sorts first"


def _check_one_study(frames: Sequence[Frame]) -> None:
    """A series belongs to one study: files of one SeriesInstanceUID from several studies (a prior
    exam relabelled, a UID reused) would be stacked into one volume and answered under one study."""
    studies = len({f.study_uid for f in frames})
    if studies > 1:
        raise MixedStudiesError(f"the series' files belong to {studies} studies (StudyInstanceUID differs): it is not one volume")


def _shown_uid(uid: str) -> str:
    return shown(uid, "UI", "SeriesInstanceUID")


__all__ = ["ARRAY_AXES", "CANONICAL_AXES", "SELECTION_RULE", "SelectionRule", "Stack", "build_stack", "select_series"]
