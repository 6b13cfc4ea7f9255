"""Benchmark parts that need no server: perf_analyzer's input data, the load loop's statistics."""

from __future__ import annotations

import json

import pytest

from benchmarks import load
from benchmarks import perf_analyzer as pa
from preprocess import phantom


def test_input_data_round_trips_the_study_exactly():
    payload = [*phantom.study_files("series", slices=16, rows=32, columns=32), b"ends with NULs\x00\x00"]
    data = json.loads(json.dumps(pa.input_data(payload)))  # as perf_analyzer reads it from the file
    entry = data["data"][0]["DICOM"]
    assert entry["shape"] == [len(payload)] and set(entry["content"]) == {"b64"}
    assert pa.payload_of(data) == payload


def test_input_data_elements_are_length_prefixed_little_endian():
    assert pa.encode_element(b"abc") == b"\x03\x00\x00\x00abc"


def test_percentiles_interpolate_between_ranks():
    values = [4.0, 1.0, 3.0, 2.0]
    assert load.percentile(values, 0) == 1.0 and load.percentile(values, 100) == 4.0
    assert load.percentile(values, 50) == pytest.approx(2.5)


def test_closed_loop_counts_every_request_and_failure():
    calls = []

    def make():
        def send():
            calls.append(1)
            if len(calls) % 3 == 0:
                raise RuntimeError("refused")

        return send

    result = load.closed_loop("fake", make, concurrency=2, requests=9)
    assert len(calls) == 2 + 9  # one warm-up per worker, then the requests
    assert result.requests == 9 and 0 < result.failures < 9 and result.first_error == "refused"
    assert result.studies_per_s > 0 and result.p50_s <= result.p95_s


def test_decoding_benchmark_times_both_paths_and_checks_their_values(tmp_path):
    pytest.importorskip("imagecodecs")
    from benchmarks import decoding

    args = ["--slices", "16", "--size", "32", "--repeat", "1", "--encodings", "jpeg2000,rle", "--out", str(tmp_path)]
    assert decoding.main(args) == 0
    result = json.loads((tmp_path / "decoding-cpu.json").read_text())
    assert set(result["encodings"]) == {"jpeg2000", "rle"} and result["target"].split()[0] in ("met", "not")
    for row in result["encodings"].values():
        assert row["old"]["max_abs_hu_diff"] == row["new"]["max_abs_hu_diff"] == 0
        assert row["new"]["frames_by_decoder"]["imagecodecs"] == 16 and row["old"]["frames_by_decoder"]["pydicom"] == 16
    assert (tmp_path / "decoding-cpu.md").read_text().startswith("# Compressed studies")
