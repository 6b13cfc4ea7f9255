"""The client's explanation parts without a server (issue 15): the answer's checks, the montage (slices
through the localisation, the box where it belongs, radiological orientation, lung window), the
.npy and its geometry sidecar, the explained report (column, journal, resume, thumbnails) and the
HTML summary page, sorted in headless Chromium."""

from __future__ import annotations

import asyncio
import fcntl
import html.parser
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from helpers import report_row

import client
from client import explanation as explained
from client import montage, summary
from client.report import EXPLAIN_COLUMNS, LOCALIZATION_COLUMN, journal_path, read_journal
from client.result import Explanation, TriageResult
from client.triage import TriageClient
from explain import Box, OriginalBox
from settings import NAMES

S = 32
CHROMIUM = Path("/usr/bin/chromium")


def _meta(size: int = S) -> dict:
    """A META as preprocess writes it for a 40-slice, 96 x 112 series (crop and resize per axis)."""
    return {
        "size": size,
        "original_shape": [40, 96, 112],
        "original_axes": ["slice", "row", "column"],
        "original_spacing_mm": [4.0, 2.5, 2.5],
        "origin_mm": [-140.0, -120.0, -80.0],
        "directions": {"slice": [0, 0, 1], "row": [0, 1, 0], "column": [1, 0, 0]},
        "resize_factors": {"D": 5.0, "H": 7.5, "W": 8.75},
        "output_to_original": {
            "D": {"source_axis": "slice", "offset": 0.125, "step": 1.25, "clamp": [0.0, 39.0]},
            "H": {"source_axis": "row", "offset": 0.5, "step": 3.0, "clamp": [0.0, 95.0]},
            "W": {"source_axis": "column", "offset": 0.75, "step": 3.5, "clamp": [0.0, 111.0]},
        },
        "slice_order": {"sorted_by": "position along the slice normal, feet to head"},
        "threshold": 0.5,
        "provenance": {"checkpoint": "sha256:" + "ab" * 32, "target": "cpu", "precision": "fp32", "size": size},
    }


class _Answer:
    """What tritonclient's answer offers the parser: as_numpy(name)."""

    def __init__(self, **outputs):
        self.outputs = outputs

    def as_numpy(self, name):
        return self.outputs[name]


def _outputs(size: int = S, box=(30, 40, 20, 30, 10, 15), **changes) -> dict:
    attribution = np.zeros((size, size, size), np.float16)
    attribution[8:12, 6:10, 9:12] = 1.0
    outputs = {
        NAMES.attribution: attribution,
        NAMES.volume: np.full((1, 1, size, size, size), -1.0, np.float32),
        NAMES.localization: np.array(box, np.int32),
        NAMES.probability: np.array([0.8], np.float32),
        NAMES.pathology: np.array([1], np.int32),
        NAMES.study_uid: np.array([b"1.2.3"], np.object_),
        NAMES.series_uid: np.array([b"1.2.3.4"], np.object_),
        NAMES.meta: np.array([json.dumps(_meta(size)).encode()], np.object_),
    }
    outputs.update(changes)
    return outputs


def _explained(probability: float = 0.8, box=((20, 24), (5, 9), (10, 14)), volume=None, attribution=None) -> TriageResult:
    meta = _meta()
    volume = np.full((S, S, S), -1.0, np.float32) if volume is None else volume
    if attribution is None:
        attribution = np.zeros((S, S, S), np.float16)
        if box is not None:
            (d0, d1), (h0, h1), (w0, w1) = box
            attribution[d0 : d1 + 1, h0 : h1 + 1, w0 : w1 + 1] = 1.0
    original = None if box is None else explained_original(box, meta)
    explanation = Explanation(attribution, volume, original, Box(box) if box is not None else None)
    provenance = json.dumps(meta["provenance"])
    return TriageResult("1.2.3", "1.2.3.4", probability, int(probability >= 0.5), client.SUCCESS, None, 1.0, meta, provenance, explanation)


def explained_original(box, meta) -> OriginalBox:
    from explain import to_original

    return to_original(Box(box), meta)


# --- the answer ---------------------------------------------------------------------------------


def test_an_explained_answer_is_parsed_and_checked_against_meta():
    result = explained.parse(_Answer(**_outputs()), _meta())
    assert result.attribution.dtype == np.float16 and result.attribution.shape == (S, S, S)
    assert result.volume.shape == (S, S, S) and result.volume.dtype == np.float32
    assert result.localization == OriginalBox(x=(30, 40), y=(20, 30), z=(10, 15))
    # the box on the model grid holds the cells of those voxels: k = round((i - offset) / step)
    assert result.box.ranges == ((8, 12), (6, 10), (8, 11))

    nothing = explained.parse(_Answer(**_outputs(box=(-1,) * 6)), _meta())
    assert nothing.localization is None and nothing.box is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({NAMES.attribution: np.zeros((S, S, S - 1), np.float16)}, r"ATTRIBUTION has shape \[32, 32, 31\], not \[32, 32, 32\]"),
        ({NAMES.volume: np.zeros((1, 1, 16, 16, 16), np.float32)}, "VOLUME has shape"),
        ({NAMES.attribution: np.full((S, S, S), 2.0, np.float16)}, r"ATTRIBUTION is not within \[0, 1\]"),
        ({NAMES.volume: np.full((1, 1, S, S, S), np.nan, np.float32)}, r"VOLUME is not within \[-1, 1\]"),
        ({NAMES.localization: np.array([1, 2, 3], np.int32)}, "LOCALIZATION has 3 values, not 6"),
        ({NAMES.localization: np.array([5, 4, 0, 1, 0, 1], np.int32)}, "is not a box inside the series"),
        ({NAMES.localization: np.array([0, 112, 0, 1, 0, 1], np.int32)}, "is not a box inside the series"),
    ],
)
def test_a_malformed_explanation_is_one_typed_line(changes, message):
    with pytest.raises(explained.ExplanationError, match=message):
        explained.parse(_Answer(**_outputs(**changes)), _meta())


def test_a_malformed_explanation_makes_the_study_a_failure_not_a_crash(monkeypatch):
    """Through the client's own request path: the study gets its Failure row with one line."""
    triage = TriageClient("127.0.0.1:1", "grpc", explain=True)
    assert triage.model == NAMES.triage_explain
    monkeypatch.setattr(
        triage, "_infer_once", lambda payload, region, series_uid: _Answer(**_outputs(**{NAMES.localization: np.arange(5)}))
    )
    result = triage.classify(b"\0" * 132)
    triage.close()
    assert not result.ok and result.explanation is None
    assert result.error == "ExplanationError: LOCALIZATION has 5 values, not 6" and "\n" not in result.error

    good = TriageClient("127.0.0.1:1", "grpc", explain=True)
    monkeypatch.setattr(good, "_infer_once", lambda payload, region, series_uid: _Answer(**_outputs()))
    result = good.classify(b"\0" * 132)
    good.close()
    assert result.ok and result.pathology_localization == "30,40,20,30,10,15"
    assert "explanation" not in result.to_dict() and json.dumps(result.to_dict())  # the printed JSON holds no arrays


def test_the_plain_client_is_unchanged():
    plain = TriageClient("127.0.0.1:1", "grpc")
    assert plain.model == NAMES.triage and not plain.explain
    plain.close()


def test_explanations_do_not_load_torch():
    code = (
        "import sys, explain, client, client.explanation, client.montage, client.summary; "
        "print(sorted({'torch', 'SimpleITK', 'captum', 'explain.attribution', 'matplotlib.pyplot'} & set(sys.modules)))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert run.stdout.strip() == "[]"


def test_grpc_allows_an_explained_answer_at_s256():
    """ATTRIBUTION FP16 (32 MiB) + VOLUME FP32 (64 MiB) at S=256: over gRPC's default 4 MiB, so both
    tritonclient channels (blocking and asyncio) must raise the limit, as they do to INT32_MAX."""
    import inspect

    import tritonclient.grpc
    import tritonclient.grpc.aio

    answer = 256**3 * 2 + 256**3 * 4 + 1024**2
    assert tritonclient.grpc.MAX_GRPC_MESSAGE_SIZE >= answer
    for module in (tritonclient.grpc.InferenceServerClient, tritonclient.grpc.aio.InferenceServerClient):
        source = inspect.getsource(module.__init__)
        assert '"grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE' in source, module


# --- the montage ----------------------------------------------------------------------------------


def _png(fig) -> np.ndarray:
    import matplotlib.image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi, facecolor=fig.get_facecolor())
    buffer.seek(0)
    return (matplotlib.image.imread(buffer)[..., :3] * 255).round().astype(np.int32)


def _panel(fig, png: np.ndarray, index: int) -> np.ndarray:
    """The PNG's pixels inside one panel's axes (matplotlib's display y runs upwards)."""
    box = fig.axes[index].get_window_extent()
    height = png.shape[0]
    return png[round(height - box.y1) : round(height - box.y0), round(box.x0) : round(box.x1)]


def _where(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: int = 40) -> tuple[np.ndarray, np.ndarray]:
    return np.nonzero((np.abs(pixels - np.array(colour)) <= tolerance).all(axis=-1))


def test_the_views_go_through_the_box_centre_in_millimetres():
    rng = np.random.default_rng(0)
    volume = rng.uniform(-1, 1, (S, S, S)).astype(np.float32)
    attribution = rng.uniform(0, 1, (S, S, S)).astype(np.float16)
    box = ((20, 24), (5, 9), (10, 14))
    axial, coronal, sagittal = montage.views(volume, attribution, box, mm_per_voxel=(5.0, 7.5, 8.75))
    np.testing.assert_array_equal(axial.image, volume[22])
    np.testing.assert_array_equal(coronal.image, volume[:, 7, :])
    np.testing.assert_array_equal(sagittal.overlay, attribution[:, :, 12])
    # boxes in mm: W 10..14 -> 87.5 mm + 5 x 8.75; H 5..9 -> 37.5 mm + 5 x 7.5; D 20..24 -> 100 mm + 5 x 5
    assert axial.box == (87.5, 37.5, 43.75, 37.5) and axial.extent == (0.0, S * 8.75, S * 7.5, 0.0) and axial.origin == "upper"
    assert coronal.box == (87.5, 100.0, 43.75, 25.0) and coronal.origin == "lower"
    assert sagittal.box == (37.5, 100.0, 37.5, 25.0) and sagittal.extent == (0.0, S * 7.5, 0.0, S * 5.0)
    centre = montage.views(volume, attribution, None)
    np.testing.assert_array_equal(centre[0].image, volume[S // 2])
    assert all(view.box is None for view in centre)


def _coloured(pixels: np.ndarray) -> np.ndarray:
    """Overlay pixels: not grey, not the magenta box; the orientation letters' band along the panel's
    edges left out."""
    spread = pixels.max(axis=-1) - pixels.min(axis=-1)
    magenta = (np.abs(pixels - np.array((255, 0, 255))) <= 60).all(axis=-1)
    inner = np.zeros(pixels.shape[:2], bool)
    rows, columns = pixels.shape[:2]
    inner[rows // 10 : rows - rows // 10, columns // 10 : columns - columns // 10] = True
    return (spread > 40) & ~magenta & inner


def test_the_montage_draws_the_box_around_the_lesion_in_each_view():
    """A bright cube inside the box on a dark volume: in every panel of the PNG the magenta box frames
    the cube's white pixels; with the attribution on the box, the overlay's colours stay inside it."""
    box = ((20, 24), (5, 9), (10, 14))
    volume = np.full((S, S, S), -1.0, np.float32)
    volume[21:24, 6:9, 11:14] = 1.0
    fig = montage.montage_figure(_explained(box=box, volume=volume, attribution=np.zeros((S, S, S), np.float16)))
    png = _png(fig)
    for index in range(3):
        pixels = _panel(fig, png, index)
        box_rows, box_columns = _where(pixels, (255, 0, 255))
        white_rows, white_columns = _where(pixels, (255, 255, 255), tolerance=10)
        assert box_rows.size > 20 and white_rows.size > 4, index
        assert box_rows.min() < white_rows.min() and white_rows.max() < box_rows.max(), index
        assert box_columns.min() < white_columns.min() and white_columns.max() < box_columns.max(), index
        # the box is small: far from the panel's edges (a box drawn in voxels instead of mm would not be)
        assert box_columns.max() - box_columns.min() < pixels.shape[1] / 2, index
        assert not _coloured(pixels).any(), index  # no attribution, no colour
    patches = [patch for axes in fig.axes[:3] for patch in axes.patches if patch.get_gid() == "localization"]
    assert len(patches) == 3

    fig = montage.montage_figure(_explained(box=box, volume=volume))  # attribution 1 on the box, 0 elsewhere
    png = _png(fig)
    for index in range(3):
        pixels = _panel(fig, png, index)
        box_rows, box_columns = _where(pixels, (255, 0, 255))
        rows, columns = np.nonzero(_coloured(pixels))
        assert rows.size > 20, index
        margin = 4  # bilinear display interpolation fades the map over half a voxel past its edge
        assert box_rows.min() - margin <= rows.min() and rows.max() <= box_rows.max() + margin, index
        assert box_columns.min() - margin <= columns.min() and columns.max() <= box_columns.max() + margin, index


@pytest.mark.parametrize(
    ("marker", "panel", "corner"),
    [
        # axial from the feet: anterior (H=0) up, the patient's right (W=0) on the viewer's left
        ((slice(None), slice(0, 6), slice(0, 6)), 0, ("top", "left")),
        # coronal from the front: head (D=S-1) up, the patient's left (W=S-1) on the viewer's right
        ((slice(S - 6, S), slice(None), slice(S - 6, S)), 1, ("top", "right")),
        # sagittal: head up, anterior (H=0) on the viewer's left; feet (D=0) down
        ((slice(0, 6), slice(0, 6), slice(None)), 2, ("bottom", "left")),
    ],
)
def test_the_views_are_oriented_as_radiologists_read_them(marker, panel, corner):
    volume = np.full((S, S, S), -1.0, np.float32)
    volume[marker] = 1.0
    fig = montage.figure(montage.views(volume, np.zeros((S, S, S), np.float16), None), "orientation")
    pixels = _panel(fig, _png(fig), panel)
    rows, columns = _where(pixels, (255, 255, 255), tolerance=10)
    assert rows.size > 0
    vertical = "top" if rows.mean() < pixels.shape[0] / 2 else "bottom"
    horizontal = "left" if columns.mean() < pixels.shape[1] / 2 else "right"
    assert (vertical, horizontal) == corner


def test_lung_window_and_overlay_transparency():
    low, high = montage.lung_window_limits()
    # W 1500 / L -600: -1350..150 HU; the model input maps -1000..600 HU to -1..1 (800 HU per unit)
    assert low == pytest.approx((-1350 + 1000) / 800 - 1) and high == pytest.approx((150 + 1000) / 800 - 1)
    colours = montage.overlay_colours()
    assert colours(0.0)[3] == 0.0 and colours(0.1)[3] == 0.0 and colours(1.0)[3] == pytest.approx(montage.OVERLAY_ALPHA)


def test_the_title_has_decision_probability_and_provenance_but_no_uid():
    result = _explained(probability=0.8125)
    title = montage.title_for(result)
    assert "P(pathology) = 0.813" in title and "PATHOLOGY (threshold 0.5)" in title  # rounded towards the decision
    assert "checkpoint sha256:abababababab, cpu, fp32, S=32" in title
    assert "1.2.3" not in title
    assert "no region attributed" in montage.title_for(_explained(probability=0.1, box=None))
    assert montage.captions_for(result, (22, 7, 12)) == ("axial, z = 28", "coronal, y = 22", "sagittal, x = 43")


# --- the files of classify --explain ----------------------------------------------------------------


def test_save_writes_the_montage_the_attribution_and_its_geometry(tmp_path):
    result = _explained()
    written = explained.save(result, tmp_path / "out")
    assert [path.name for path in written] == ["montage.png", "attribution.npy", "attribution.json"]
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    array = np.load(written[1])
    assert array.dtype == np.float16 and array.shape == (S, S, S)
    np.testing.assert_array_equal(array, result.explanation.attribution)
    geometry = json.loads(written[2].read_text())
    assert geometry["shape"] == [S, S, S] and geometry["axes"] == ["D", "H", "W"] and geometry["dtype"] == "float16"
    assert geometry["output_to_original"] == _meta()["output_to_original"]
    assert geometry["pathology_localization"]["text"] == result.pathology_localization
    assert geometry["pathology_localization"]["output"] == {"D": [20, 24], "H": [5, 9], "W": [10, 14]}
    # the documented mapping takes the output box's end cells into the original box
    for axis, letter in (("D", "z"), ("H", "y"), ("W", "x")):
        entry = geometry["output_to_original"][axis]
        lo, hi = geometry["pathology_localization"]["output"][axis]
        original = geometry["pathology_localization"]["original"][letter]
        for k in (lo, hi):  # the cell's centre lies within half a voxel of the box's voxels
            assert original[0] - 0.5 <= entry["offset"] + entry["step"] * k <= original[1] + 0.5, axis
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left


def test_save_moves_the_three_in_together_or_leaves_none_of_them(tmp_path, monkeypatch):
    """A new montage beside the last study's attribution would be a wrong answer on screen."""
    folder = tmp_path / "out"
    explained.save(_explained(probability=0.875), folder)

    def disk_full(result):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(explained, "sidecar", disk_full)  # the last of the three files written
        with pytest.raises(OSError, match="No space left"):
            explained.save(_explained(probability=0.125), folder)
    assert list(folder.iterdir()) == []  # neither the earlier study's files nor a staging folder
    explained.save(_explained(probability=0.875), folder)
    failed = client.result.failure("DICOM header has invalid or missing values", seconds=0.5, model=NAMES.triage_explain)
    assert explained.save(failed, folder) == [] and list(folder.iterdir()) == []  # a failed study leaves no one else's


def test_runs_saving_into_one_folder_take_turns_for_the_moves(tmp_path):
    """Two `classify --explain` runs into one --out-dir: while one moves its three files in, the other
    waits, so the folder never holds one study's montage beside another's attribution."""
    folder = tmp_path / "out"
    explained.save(_explained(probability=0.875), folder)
    before = {path.name: path.stat().st_ino for path in folder.iterdir()}
    held = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)  # another run, in the middle of its moves
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        other = threading.Thread(target=explained.save, args=(_explained(probability=0.125), folder))
        other.start()
        other.join(timeout=1.0)
        assert other.is_alive()  # staged, waiting for its turn
        assert {path.name: path.stat().st_ino for path in folder.iterdir() if not path.name.startswith(".")} == before
    finally:
        os.close(held)
    other.join(timeout=30)
    assert not other.is_alive()
    assert json.loads((folder / "attribution.json").read_text())["probability_of_pathology"] == 0.125
    assert sorted(path.name for path in folder.iterdir()) == sorted(before)  # the staging folder is gone


# --- the explained report and its page ---------------------------------------------------------------


class _FakeExplainClient:
    """An AsyncTriageClient built with explain=True, answering from a table instead of a server."""

    explain = True
    model = NAMES.triage_explain
    url, protocol = "fake:1", "grpc"

    def __init__(self, answers: dict[str, TriageResult], sent: list[str]):
        self.answers, self.sent = answers, sent

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    async def check_ready(self):
        return None

    async def classify(self, path):
        self.sent.append(Path(path).name)
        return self.answers[Path(path).name]


def _study(folder: Path, name: str) -> None:
    (folder / name).mkdir(parents=True, exist_ok=True)
    (folder / name / "IM1").write_bytes(b"\0" * 128 + b"DICM")


def _answers() -> dict[str, TriageResult]:
    failed = client.result.failure("DICOM header has invalid or missing values", seconds=0.5, model=NAMES.triage_explain)
    return {
        "a_low": _explained(probability=0.125, box=None),
        "b_failed": failed,
        "c_high": _explained(probability=0.875),
        "d_middle": _explained(probability=0.5, box=((3, 5), (3, 5), (3, 5))),
    }


def test_an_explained_report_has_the_localization_the_page_and_resumes(tmp_path):
    folder = tmp_path / "studies"
    for name in _answers():
        _study(folder, name)
    out = tmp_path / "R.xlsx"
    sent: list[str] = []
    run = client.build_report(folder, out, lambda: _FakeExplainClient(_answers(), sent), csv_out=tmp_path / "R.csv")
    result = asyncio.run(run)

    assert result.page == tmp_path / "R.html" and result.failed == 1
    for report in (out, tmp_path / "R.csv"):
        rows = client.read_report(report)
        assert [row["path_to_study"] for row in rows] == ["a_low", "b_failed", "c_high", "d_middle"]
        localizations = [None, None, _answers()["c_high"].pathology_localization, _answers()["d_middle"].pathology_localization]
        assert [row[LOCALIZATION_COLUMN] for row in rows] == localizations and all(localizations[2:])
    import openpyxl

    header = next(openpyxl.load_workbook(out, read_only=True).active.iter_rows(values_only=True))
    assert tuple(header) == EXPLAIN_COLUMNS
    thumbnails = sorted(path.name for path in (tmp_path / "R_thumbnails").iterdir())
    assert thumbnails == sorted(summary.thumbnail_name(name) for name in ("a_low", "c_high", "d_middle"))
    assert all(LOCALIZATION_COLUMN in row for row in read_journal(journal_path(out)).rows)

    page = (tmp_path / "R.html").read_text()
    table = _table(page)
    assert [row["data-row"] for row in table] == ["1", "2", "3", "4"]
    assert [row["data-probability"] for row in table] == ["0.125000", "", "0.875000", "0.500000"]
    assert "DICOM header has invalid or missing values" in page  # the failed study's row says why
    assert all(name not in page for name in _answers()) and "1.2.3" not in page  # no paths, no UIDs

    # --resume: nothing left to send, the rows and the page stay
    sent.clear()
    asyncio.run(client.build_report(folder, out, lambda: _FakeExplainClient(_answers(), sent), resume=True))
    assert sent == ["b_failed"]  # only the Failure is sent again
    assert [row[LOCALIZATION_COLUMN] for row in client.read_report(out)][2] == _answers()["c_high"].pathology_localization


def test_plain_reports_keep_their_columns_and_old_reports_still_read(tmp_path):
    rows = [report_row("a"), report_row("b", client.FAILURE)]
    client.write_report(rows, tmp_path / "plain.xlsx")
    assert client.read_report(tmp_path / "plain.xlsx") == rows  # 10 columns, no localization key
    explained_rows = [{**row, LOCALIZATION_COLUMN: "1,2,3,4,5,6" if row["pathology"] == 0 else None} for row in rows]
    client.write_report(explained_rows, tmp_path / "explained.csv", EXPLAIN_COLUMNS)
    assert client.read_report(tmp_path / "explained.csv") == explained_rows
    assert (tmp_path / "explained.csv").read_text().splitlines()[0] == ",".join(f'"{column}"' for column in EXPLAIN_COLUMNS)


def test_a_montage_that_cannot_be_drawn_costs_the_picture_not_the_row(tmp_path, monkeypatch):
    folder = tmp_path / "studies"
    _study(folder, "c_high")
    asyncio.run(client.build_report(folder, tmp_path / "R.xlsx", lambda: _FakeExplainClient({"c_high": _explained(probability=0.875)}, [])))
    assert (tmp_path / "R_thumbnails" / summary.thumbnail_name("c_high")).is_file()

    def broken(*args, **kwargs):
        raise RuntimeError("no canvas")

    monkeypatch.setattr(montage, "save_montage", broken)
    answers = {"c_high": _explained(probability=0.125, box=None)}  # a new run, another answer, no picture
    asyncio.run(client.build_report(folder, tmp_path / "R.xlsx", lambda: _FakeExplainClient(answers, [])))
    (row,) = client.read_report(tmp_path / "R.xlsx")
    assert row["processing_status"] == client.SUCCESS and row["probability_of_pathology"] == 0.125
    assert "no picture" in (tmp_path / "R.html").read_text()  # not the last run's P = 0.875 picture
    assert not (tmp_path / "R_thumbnails" / summary.thumbnail_name("c_high")).exists()


def test_a_page_that_is_not_this_reports_is_never_replaced(tmp_path):
    folder = tmp_path / "studies"
    _study(folder, "c_high")

    def report(out: Path, **options) -> client.ReportSummary:
        return asyncio.run(client.build_report(folder, out, lambda: _FakeExplainClient({"c_high": _explained()}, []), **options))

    own = tmp_path / "notes.html"
    own.write_text("<html>the ward's own notes</html>")
    with pytest.raises(client.ReportError, match=r"notes\.html exists and is not a report's summary page"):
        report(tmp_path / "notes.xlsx")
    assert own.read_text() == "<html>the ward's own notes</html>"
    assert report(tmp_path / "R.csv").page == tmp_path / "R.html"
    with pytest.raises(client.ReportError, match=r"R\.html is the summary page of R\.csv, not of R\.xlsx"):
        report(tmp_path / "R.xlsx")
    assert report(tmp_path / "R.csv", resume=True).page == tmp_path / "R.html"  # its own page, rewritten


def test_a_report_name_that_is_not_utf8_gets_its_page_and_working_links(tmp_path):
    folder = tmp_path / "studies"
    _study(folder, "c_high")
    out = tmp_path / "r\udce9sultats.xlsx"  # Latin-1 résultats.xlsx under a UTF-8 locale
    done = asyncio.run(client.build_report(folder, out, lambda: _FakeExplainClient({"c_high": _explained()}, [])))
    page = done.page.read_text(encoding="utf-8")
    assert "r\\udce9sultats.xlsx" in page  # named, escaped
    (link,) = {value for name, value in _images(page) if name == "src"}
    assert (tmp_path / urllib.parse.unquote_to_bytes(link).decode("utf-8", "surrogateescape")).is_file()  # the link resolves


def test_an_explained_journal_is_resumed_with_explanations_only(tmp_path):
    folder = tmp_path / "studies"
    _study(folder, "c_high")
    out = tmp_path / "R.xlsx"
    asyncio.run(client.build_report(folder, out, lambda: _FakeExplainClient({"c_high": _explained()}, [])))

    class Plain(_FakeExplainClient):
        explain = False  # the same model name: only the journal's own record tells them apart

    with pytest.raises(client.ReportError, match="journal of an explained report: resume with --explain"):
        asyncio.run(client.build_report(folder, out, lambda: Plain({}, []), resume=True))
    assert [row[LOCALIZATION_COLUMN] for row in client.read_report(out)] == [_explained().pathology_localization]


class _Rows(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows: list[dict] = []
        self._inside = False

    def handle_starttag(self, tag, attrs):
        if tag == "tbody":
            self._inside = True
        elif tag == "tr" and self._inside:
            self.rows.append(dict(attrs))

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._inside = False


def _images(page: str) -> list[tuple[str, str]]:
    """The attributes of the page's <img> tags."""
    found: list[tuple[str, str]] = []

    class Images(html.parser.HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "img":
                found.extend(attrs)

    Images().feed(page)
    return found


def _table(page: str) -> list[dict]:
    parser = _Rows()
    parser.feed(page)
    return parser.rows


def _page(tmp_path: Path) -> Path:
    rows = [
        {**report_row("s1", probability=0.25), LOCALIZATION_COLUMN: None},
        {**report_row("s2", client.FAILURE), LOCALIZATION_COLUMN: None},
        {**report_row("s3", probability=0.9375), "pathology": 1, LOCALIZATION_COLUMN: "10,20,30,40,5,9"},
        {**report_row("s4", probability=0.5), "pathology": 1, LOCALIZATION_COLUMN: "1,2,3,4,5,6"},
        {**report_row("s5", client.FAILURE), LOCALIZATION_COLUMN: None, "error": "server at x unreachable <b>"},
        {**report_row("s6", probability=0.0625), LOCALIZATION_COLUMN: None},
    ]
    thumbnails = tmp_path / "R_thumbnails"
    for name in ("s1", "s3", "s4"):  # s6 has no picture
        montage.save_montage(_explained(probability=0.5), thumbnails / summary.thumbnail_name(name), dpi=montage.THUMBNAIL_DPI)
    return summary.write_summary(rows, tmp_path / "R.html", thumbnails, report_name="R.xlsx")


def test_the_page_has_one_row_per_study_with_failures_and_escaped_errors(tmp_path):
    rows = [{**report_row("s1"), LOCALIZATION_COLUMN: ["1", "<b>"]}]  # a damaged journal row: shown, escaped
    assert (
        "[&#x27;1&#x27;, &#x27;&lt;b&gt;&#x27;]"
        in summary.write_summary(rows, tmp_path / "X.html", tmp_path, report_name="X.xlsx").read_text()
    )
    page = _page(tmp_path).read_text()
    table = _table(page)
    assert [row["data-row"] for row in table] == [str(n) for n in range(1, 7)]
    assert [row["class"] for row in table] == ["normal", "failure", "pathology", "pathology", "failure", "normal"]
    assert page.count('<img class="thumbnail"') == 3 and page.count("no picture") == 1
    assert "server at x unreachable &lt;b&gt;" in page and "<b>" not in page.split("<tbody")[1]
    assert "http://" not in page and "https://" not in page and 'src="//' not in page  # nothing fetched
    assert "Content-Security-Policy" in page


def test_the_page_shows_each_probability_on_its_decisions_side(tmp_path):
    rows = [{**report_row("s1", probability=0.4996), LOCALIZATION_COLUMN: None}]  # normal at threshold 0.5
    page = summary.write_summary(rows, tmp_path / "X.html", tmp_path, report_name="X.xlsx").read_text()
    assert '<td class="probability">0.499</td><td class="decision">normal (threshold 0.5)</td>' in page


def test_the_page_shows_each_decisions_threshold_beside_it(tmp_path):
    rows = [
        {**report_row("s1", probability=0.625, threshold=0.7), "pathology": 0, LOCALIZATION_COLUMN: None},
        {**report_row("s2", probability=0.625), "pathology": 1, LOCALIZATION_COLUMN: None},
        {**report_row("s3", probability=0.625, threshold=None), "pathology": 1, LOCALIZATION_COLUMN: None},  # a row that does not hold it
    ]
    page = summary.write_summary(rows, tmp_path / "X.html", tmp_path, report_name="X.xlsx").read_text()
    assert '<td class="decision">normal (threshold 0.7)</td>' in page
    assert '<td class="decision">pathology (threshold 0.5)</td>' in page and '<td class="decision">pathology</td>' in page


def test_a_thumbnail_folder_that_is_a_file_stops_the_run_before_any_study(tmp_path):
    """Refused before any study is sent: otherwise every picture is lost ("montage not drawn:
    NotADirectoryError"), and --resume never draws them."""
    folder, sent = tmp_path / "studies", []
    _study(folder, "c_high")
    (tmp_path / "R_thumbnails").write_text("my notes")
    expected = rf"^the thumbnail folder {re.escape(str(tmp_path / 'R_thumbnails'))} is a file, not a folder$"
    with pytest.raises(client.ReportError, match=expected):
        asyncio.run(client.build_report(folder, tmp_path / "R.csv", lambda: _FakeExplainClient({"c_high": _explained()}, sent)))
    assert sent == [] and not (tmp_path / "R.csv").exists() and (tmp_path / "R_thumbnails").read_text() == "my notes"


def _chromium(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make chromium` installs Debian's chromium (make test does)", pytrace=False)
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True)


def _sorted_rows(page: Path, fragment: str, profile: Path) -> list[str]:
    dom = _chromium(f"--user-data-dir={profile}", "--virtual-time-budget=3000", "--dump-dom", page.as_uri() + fragment).stdout
    return [row["data-row"] for row in _table(dom)]


def test_the_page_sorts_by_probability_in_headless_chromium(tmp_path):
    """The inline script sorts the rows (failures last, either way); a URL fragment asks for the order."""
    page = _page(tmp_path)
    profile = tmp_path / "profile"
    started = time.perf_counter()
    assert _sorted_rows(page, "", profile) == ["1", "2", "3", "4", "5", "6"]
    assert _sorted_rows(page, "#sort=probability-desc", profile) == ["3", "4", "1", "6", "2", "5"]
    assert _sorted_rows(page, "#sort=probability-asc", profile) == ["6", "1", "4", "3", "2", "5"]
    screenshot = tmp_path / "page.png"
    sorted_page = page.as_uri() + "#sort=probability-desc"
    _chromium(f"--user-data-dir={profile}", "--window-size=1400,1000", f"--screenshot={screenshot}", sorted_page)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000
    assert time.perf_counter() - started < 60
