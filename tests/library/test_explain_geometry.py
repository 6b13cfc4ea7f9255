"""explain.geometry: the most attributed region on the S^3 grid, and its box mapped back through
preprocess's crop and resize to the chosen series' voxel indices (issue 15)."""

import numpy as np
import pytest

from explain import Box, LocalizationError, OriginalBox, localize, most_attributed_region, to_original, to_output
from preprocess import phantom, preprocess_study

SIZE = 32
SHAPE = {"slices": 40, "rows": 96, "columns": 112, "pixel_spacing": 2.5, "slice_spacing": 4.0}


def _lesion_box(order: str) -> OriginalBox:
    """Where the phantom's lesion is in the stored images' (slice, row, column) indices, from the HU
    volumes themselves (a feet-first phantom stores its columns mirrored)."""
    with_lesion = phantom.hu_volume(**SHAPE, lesion=True)
    without = phantom.hu_volume(**SHAPE, lesion=False)
    s, r, c = np.nonzero(with_lesion != without)
    if order == "feet_first":
        c = SHAPE["columns"] - 1 - c
    return OriginalBox(x=(int(c.min()), int(c.max())), y=(int(r.min()), int(r.max())), z=(int(s.min()), int(s.max())))


@pytest.mark.parametrize("order", ["ascending", "feet_first"])
def test_the_lesion_of_a_phantom_is_found_in_the_original_voxels(order):
    """Attribution = where the lesion changed the model input; the box mapped back is the lesion's
    box in DICOM voxels, to within one output cell (the resize's resolution) on each side."""
    studies = [preprocess_study(phantom.study_files(**SHAPE, order=order, lesion=lesion), size=SIZE) for lesion in (True, False)]
    attribution = np.abs(studies[0].volume[0, 0] - studies[1].volume[0, 0])
    meta = studies[0].meta
    _, found = localize(attribution, meta)
    truth = _lesion_box(order)
    steps = {axis["source_axis"]: abs(axis["step"]) for axis in meta["output_to_original"].values()}
    for name, source in (("x", "column"), ("y", "row"), ("z", "slice")):
        tolerance = int(np.ceil(steps[source]))
        got, want = getattr(found, name), getattr(truth, name)
        assert abs(got[0] - want[0]) <= tolerance and abs(got[1] - want[1]) <= tolerance, (name, got, want, tolerance)
    assert found.as_text() == ",".join(map(str, found.as_list())) and len(found.as_list()) == 6


def test_the_mapping_is_exact_voxel_by_voxel():
    """Every original voxel inside the crop is in the mapped box exactly when its nearest output
    sample (round((i - offset) / step)) lies in the output box: checked by brute force, flips included."""
    meta = preprocess_study(phantom.study_files(**SHAPE, order="feet_first"), size=SIZE).meta
    rng = np.random.default_rng(0)
    for _ in range(50):
        ranges = tuple(tuple(sorted(int(v) for v in rng.integers(0, SIZE, 2))) for _ in range(3))
        found = to_original(Box(ranges), meta)
        source_box = {"column": found.x, "row": found.y, "slice": found.z}
        for name, (lo, hi) in zip("DHW", ranges):
            axis = meta["output_to_original"][name]
            n = meta["original_shape"][["slice", "row", "column"].index(axis["source_axis"])]
            crop_lo, crop_hi = axis["clamp"]
            inside = [
                i
                for i in range(n)
                if crop_lo - 1e-4 <= i <= crop_hi + 1e-4 and lo - 0.5 - 1e-4 <= (i - axis["offset"]) / axis["step"] <= hi + 0.5 + 1e-4
            ]
            assert source_box[axis["source_axis"]] == (min(inside), max(inside)), (name, lo, hi)
        back = to_output(found, meta)
        for (lo, hi), (blo, bhi) in zip(ranges, back.ranges):
            assert lo <= blo <= bhi <= hi


def test_the_largest_component_wins_and_ties_go_to_the_peak():
    attribution = np.zeros((16, 16, 16), np.float32)
    attribution[1:3, 1:3, 1:3] = 1.0  # the peak, 8 voxels
    attribution[8:12, 8:12, 8:12] = 0.9  # larger, 64 voxels
    assert most_attributed_region(attribution).ranges == ((8, 11), (8, 11), (8, 11))
    attribution[8:12, 8:12, 8:12] = 0.4  # below half the maximum: gone
    assert most_attributed_region(attribution).ranges == ((1, 2), (1, 2), (1, 2))


def _meta(**d_axis) -> dict:
    """A mapping as preprocess writes it at S=4 (identity), its D axis changed as given."""
    axes = {
        name: {"source_axis": source, "offset": 0.0, "step": 1.0, "clamp": [0, 3]}
        for name, source in zip("DHW", ("slice", "row", "column"))
    }
    axes["D"] = {**axes["D"], **d_axis}
    return {"size": 4, "original_shape": [4, 4, 4], "original_axes": ["slice", "row", "column"], "output_to_original": axes}


@pytest.mark.parametrize(
    ("attribution", "meta", "message"),
    [
        (np.zeros((4, 4, 4)), {"size": 4}, "zero everywhere"),
        (np.full((4, 4, 4), np.nan), {"size": 4}, "non-finite"),
        (np.ones((4, 4)), {}, "3-D"),
        (np.ones((4, 4, 4)), {"size": 8}, "does not match"),
        (np.ones((4, 4, 4)), {"size": 4}, "no output_to_original"),
        # a META that is not preprocess's (a client calling ct_localize itself): a named refusal, never a traceback or a box
        (np.ones((4, 4, 4)), {**_meta(), "size": "4"}, "size is not an integer"),
        (
            np.ones((4, 4, 4)),
            {**_meta(), "output_to_original": {"D": {}, "H": {}, "W": {}}},
            r"\[D\] is not preprocess's mapping \(KeyError\)",
        ),
        (np.ones((4, 4, 4)), _meta(offset=float("nan")), "not finite"),
        # float() would take these: "12" as a clamp would be read as 1..2, "nan" as a number
        (np.ones((4, 4, 4)), _meta(offset="nan"), "offset is not a number"),
        (np.ones((4, 4, 4)), _meta(step=True), "step is not a number"),
        (np.ones((4, 4, 4)), _meta(clamp=3), "clamp is not a pair of voxel indices"),
        (np.ones((4, 4, 4)), _meta(clamp="12"), "clamp is not a pair of voxel indices"),
        (np.ones((4, 4, 4)), _meta(clamp={"5": 0, "9": 0}), "clamp is not a pair of voxel indices"),
        (np.ones((4, 4, 4)), _meta(clamp=[0, "9"]), "clamp is not a number"),
        (np.ones((4, 4, 4)), _meta(clamp=[3, 0]), "clamp ends before it starts"),
        (np.ones((4, 4, 4)), _meta(step=1e10, clamp=[0, 1e12]), "outside any series"),  # would wrap around in int32
        # finite numbers whose box ends are infinite, or huge: no integer index (an OverflowError traceback)
        (np.ones((4, 4, 4)), _meta(step=1e308), r"maps to voxels -5e\+307\.\.inf, outside any series"),
        (np.ones((4, 4, 4)), _meta(offset=1e308, step=1e308), r"maps to voxels 5e\+307\.\.inf, outside any series"),
        (np.ones((4, 4, 4)), _meta(offset=-1e308, step=-1e308), "outside any series"),
        (np.ones((4, 4, 4)), _meta(offset=1e300), r"maps to voxels 1e\+300\.\.1e\+300, outside any series"),
        (np.ones((4, 4, 4)), _meta(offset=10**400), r"\[D\] is not preprocess's mapping \(OverflowError\)"),  # JSON has such integers
        # a crop past the series' own voxels: the box would leave the series (ct_localize answered z 9501..19500 of 40 slices)
        (np.ones((4, 4, 4)), _meta(step=1000.0, clamp=[0, 1e9]), r"clamp 0\.\.1e\+09 is outside the series' 4 voxels"),
        (np.ones((4, 4, 4)), _meta(clamp=[0, 4]), r"clamp 0\.\.4 is outside the series' 4 voxels"),
        (np.ones((4, 4, 4)), _meta(clamp=[-1, 3]), r"clamp -1\.\.3 is outside the series' 4 voxels"),
        (np.ones((4, 4, 4)), {**_meta(), "original_shape": None}, "META has no original_shape and original_axes"),
        (np.ones((4, 4, 4)), {**_meta(), "original_shape": [4, 4, 0]}, "META has no original_shape and original_axes"),
        (np.ones((4, 4, 4)), {**_meta(), "original_axes": ["slice", "slice", "column"]}, "META has no original_shape and original_axes"),
    ],
)
def test_what_cannot_be_localised_is_named(attribution, meta, message):
    with pytest.raises(LocalizationError, match=message):
        localize(attribution, meta)
