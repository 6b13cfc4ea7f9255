"""The client's explanations against the real server (shared session server, S=TEST_SIZE, demo weights):
`classify --explain` and `report --explain`, over gRPC and HTTP (issue 15)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import openpyxl
import pytest
from helpers import TEST_SIZE, packaged_file, run_module

import client
from client.report import EXPLAIN_COLUMNS, LOCALIZATION_COLUMN
from client.summary import thumbnail_name
from preprocess import phantom

S = TEST_SIZE
PHI = tuple(phantom.FAKE_PHI.values())
CHROMIUM = Path("/usr/bin/chromium")
BOX = re.compile(r"^\d+,\d+,\d+,\d+,\d+,\d+$")


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    """Two phantoms (with and without the lesion), a broken ZIP and an MR image (no CT series)."""
    folder = tmp_path_factory.mktemp("explained")
    phantom.write_study(folder / "a_lesion.zip", form="zip", seed=1)
    phantom.write_study(folder / "b_clear.zip", form="zip", seed=2, lesion=False)
    whole = (folder / "a_lesion.zip").read_bytes()
    (folder / "c_broken.zip").write_bytes(whole[: len(whole) // 2])
    (folder / "d_mr").mkdir()
    (folder / "d_mr" / "MR_small.dcm").write_bytes(packaged_file("MR_small.dcm").read_bytes())
    return folder


def _classify(study: Path, out: Path, server) -> subprocess.CompletedProcess:
    return run_module("client", "classify", str(study), "--explain", "--out-dir", str(out), "--url", server.grpc_url)


def _no_phi(*texts: str) -> None:
    for text in texts:
        assert not any(value in text for value in PHI)


def test_classify_explain_writes_the_montage_and_the_attribution_with_its_geometry(triton_server, studies, tmp_path):
    out = tmp_path / "explained"
    run = _classify(studies / "a_lesion.zip", out, triton_server)
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["processing_status"] == "Success" and answer["meta"]["size"] == S
    assert answer["files"] == [str(out / name) for name in ("montage.png", "attribution.npy", "attribution.json")]
    assert (out / "montage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    attribution = np.load(out / "attribution.npy")
    assert attribution.dtype == np.float16 and attribution.shape == (S, S, S)
    assert 0.0 <= float(attribution.min()) and float(attribution.max()) <= 1.0
    geometry = json.loads((out / "attribution.json").read_text())
    assert geometry["output_to_original"] == answer["meta"]["output_to_original"] and geometry["axes"] == ["D", "H", "W"]
    localization = answer["pathology_localization"]
    if localization is None:  # demo weights: nothing may speak for pathology
        assert geometry["pathology_localization"] is None and float(attribution.max()) == 0.0
    else:
        assert BOX.match(localization) and geometry["pathology_localization"]["text"] == localization
    _no_phi(run.stdout, run.stderr, (out / "attribution.json").read_text())

    # the library over HTTP gives the same explanation as the CLI over gRPC
    with client.TriageClient(triton_server.http_url, "http", explain=True) as triage:
        result = triage.classify(studies / "a_lesion.zip")
    assert result.ok and result.pathology_localization == localization
    np.testing.assert_array_equal(result.explanation.attribution, attribution)
    assert result.explanation.volume.shape == (S, S, S) and np.abs(result.explanation.volume).max() <= 1.0


def test_classify_explain_of_a_bad_study_is_one_line_and_writes_nothing(triton_server, studies, tmp_path):
    out = tmp_path / "nothing"
    run = _classify(studies / "c_broken.zip", out, triton_server)
    assert run.returncode == 1
    answer = json.loads(run.stdout)
    assert answer["processing_status"] == "Failure" and answer["pathology_localization"] is None and answer["files"] == []
    assert len(run.stderr.strip().splitlines()) == 1 and run.stderr.startswith("error: ")
    assert not out.exists() or not any(out.iterdir())
    usage = run_module("client", "classify", str(studies / "a_lesion.zip"), "--explain", "--url", triton_server.grpc_url)
    assert usage.returncode == 2 and "--out-dir" in usage.stderr


def test_report_explain_fills_the_localization_and_writes_the_page(triton_server, studies, tmp_path):
    out = tmp_path / "R.xlsx"
    arguments = ["report", str(studies), "--out", str(out), "--explain", "--concurrency", "2", "--protocol", "http"]
    run = run_module("client", *arguments, "--url", triton_server.http_url)
    assert run.returncode == 0, run.stderr
    header = next(openpyxl.load_workbook(out, read_only=True).active.iter_rows(values_only=True))
    assert tuple(header) == EXPLAIN_COLUMNS
    rows = client.read_report(out)
    assert [row["path_to_study"] for row in rows] == ["a_lesion.zip", "b_clear.zip", "c_broken.zip", "d_mr"]
    assert [row["processing_status"] for row in rows] == ["Success", "Success", "Failure", "Failure"]
    for row in rows:
        if row["processing_status"] == "Success":
            assert row[LOCALIZATION_COLUMN] is None or BOX.match(row[LOCALIZATION_COLUMN])
            assert (tmp_path / "R_thumbnails" / thumbnail_name(row["path_to_study"])).is_file()
        else:
            assert row[LOCALIZATION_COLUMN] is None and row["error"]
    page = (tmp_path / "R.html").read_text()
    assert page.count("<tr class=") == 4 and page.count('<img class="thumbnail"') == 2
    assert all(row["path_to_study"] not in page for row in rows) and rows[0]["study_uid"] not in page
    _no_phi(page, run.stderr)

    # headless Chromium sorts the real page: the highest probability first, failures last
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make chromium` installs it", pytrace=False)
    browser = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [*browser, "--virtual-time-budget=3000", "--dump-dom", (tmp_path / "R.html").as_uri() + "#sort=probability-desc"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    order = [int(number) for number in re.findall(r'<tr class="[a-z]+" data-row="(\d+)"', dom)]
    successes = sorted((1, 2), key=lambda number: -rows[number - 1]["probability_of_pathology"])
    assert order == [*successes, 3, 4]

    # resume: only the failures are sent again; a plain resume of this journal is refused
    again = run_module("client", *arguments, "--resume", "--url", triton_server.http_url)
    assert again.returncode == 0 and "(2 sent, 2 already done)" in again.stderr
    assert [row[LOCALIZATION_COLUMN] for row in client.read_report(out)] == [row[LOCALIZATION_COLUMN] for row in rows]
    plain = run_module("client", "report", str(studies), "--out", str(out), "--resume", "--url", triton_server.grpc_url)
    assert plain.returncode == 2 and "journal of an explained report: resume with --explain" in plain.stderr
