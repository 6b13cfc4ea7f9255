"""The cpu target exported with --precision bf16 (the explicit opt-in): parity of OpenVINO BF16
against OpenVINO FP32 within the half-precision bound, the precision in provenance, parity.json and
the rendered config, and the bundled server loading it and logging the precision OpenVINO uses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from helpers import discard
from tritonclient import http

import export
from export.parity import FP16_BOUND, FP32_BOUND
from serve import start_on_free_ports
from settings import NAMES

SIZE = 16


def cpu_has_bf16() -> bool:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return bool(set(line.split(":", 1)[1].split()) & {"avx512_bf16", "amx_bf16"})
    return False


def test_cpu_target_at_bf16_is_checked_against_fp32_recorded_and_served(tmp_path):
    result = export.write_repository(tmp_path / "repo", target="cpu", size=SIZE, demo_weights=True, precision="bf16")
    report = json.loads((result.artifacts / export.repository.PARITY_FILE).read_text())
    assert report["passed"]
    comparisons = report["comparisons"]
    assert comparisons["openvino_fp32_vs_torch"]["bound"] == FP32_BOUND
    half = comparisons["openvino_bf16_vs_openvino_fp32"]
    assert half["bound"] == FP16_BOUND and half["decisions_agree"] and half["max_abs_diff"] <= FP16_BOUND
    in_use = "bf16" if cpu_has_bf16() else "fp32"
    assert report["precision_in_use"] == {"openvino_fp32": "fp32", "openvino_bf16": in_use}
    assert bool(report["notes"]) == (in_use != "bf16")  # a fallback to FP32 is said, not failed
    provenance = json.loads((tmp_path / "repo" / NAMES.classifier / "1" / "provenance.json").read_text())
    assert provenance["precision"] == "bf16" and "openvino_bf16_vs_openvino_fp32" in provenance["parity"]
    config = (tmp_path / "repo" / NAMES.classifier / "config.pbtxt").read_text()
    assert 'key: "precision"' in config and 'string_value: "bf16"' in config

    volume = np.stack([np.linspace(-1, 1, SIZE**3, dtype=np.float32).reshape(1, SIZE, SIZE, SIZE)])
    log = tmp_path / "tritonserver.log"
    server = start_on_free_ports(tmp_path / "repo", log_file=log, models=[NAMES.classifier])  # the model under test alone
    try:
        triton = http.InferenceServerClient(server.http_url)
        tensor = http.InferInput(NAMES.volume, list(volume.shape), "FP32")
        tensor.set_data_from_numpy(volume)
        probabilities = triton.infer(NAMES.classifier, [tensor]).as_numpy(NAMES.probabilities)
        triton.close()
    finally:
        discard(server)
    assert probabilities.shape == (1, 2) and abs(float(probabilities.sum()) - 1) < 1e-3
    assert f"OpenVINO at {in_use} (bf16 asked)" in log.read_text()
