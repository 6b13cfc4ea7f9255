"""The GPU check's verdicts on its targets, from results shaped as an S=256 CUDA run writes them: the
one table the GPU run is judged by must never call a target met that was not, nor drop one."""

from __future__ import annotations

from benchmarks import gpu_check

GPU_PLAN = gpu_check.Plan.gpu()


def level(concurrency: int, studies_per_s: float, failures: int = 0, requests: int = 32) -> dict:
    return {"concurrency": concurrency, "requests": requests, "failures": failures, "studies_per_s": studies_per_s}


def test_a_served_level_with_failed_studies_meets_no_target():
    results = {"served": {"levels": [level(4, 12.0), level(16, 22.0, failures=10)]}}
    served = gpu_check.targets(results, GPU_PLAN)["served >= 20 studies/s"]
    assert served["met"] is False
    assert served["value"].startswith("12.0 ") and "concurrency 16: 10 of 32 failed" in served["value"]
    results = {"served": {"levels": [level(16, 22.0, failures=1)]}}
    assert gpu_check.targets(results, GPU_PLAN)["served >= 20 studies/s"]["met"] is False
    results = {"served": {"levels": [level(4, 12.0), level(16, 22.0)]}}
    assert gpu_check.targets(results, GPU_PLAN)["served >= 20 studies/s"] == {"value": "22.0", "met": True}


def test_every_target_is_listed_with_why_it_was_not_measured():
    results = {"memory": {"error": "RuntimeError: CUDA error: out of memory"}, "explain": {"not_measured": "no time left"}}
    verdicts = gpu_check.targets(results, GPU_PLAN)
    assert len(verdicts) == 5 and all(v["met"] is None for v in verdicts.values())
    assert verdicts["FP16 batch >= 4 in 8 GB"]["value"] == "not measured: RuntimeError: CUDA error: out of memory"
    assert verdicts["Grad-CAM at S=256 (FP32) on an 8 GB card"]["value"] == "not measured: no time left"
    assert verdicts["classifier FP16 >= 40 studies/s"]["value"] == "not measured: section not run"
    smoke = gpu_check.targets(results, gpu_check.Plan.smoke())
    assert {v["value"] for v in smoke.values()} == {"not measured: the targets are for S=256; this run is S=16"}
    environment = gpu_check.environment(gpu_check.Plan.smoke())
    table = gpu_check.markdown({"command": "test", "seconds": 1.0, "environment": environment, "targets": verdicts})
    assert "| FP16 batch >= 4 in 8 GB | not measured: RuntimeError: CUDA error: out of memory | not measured |" in table


def test_the_preprocessing_verdict_states_the_upload_it_leaves_out():
    entry = {"shape": [300, 512, 512], "device_ms": {"median": 15.0}, "upload_ms": {"median": 45.0}, "max_abs_diff_vs_fast": 2e-5}
    verdict = gpu_check.targets({"preprocessing": entry}, GPU_PLAN)["GPU preprocessing <= 20 ms, parity <= 1e-4"]
    assert verdict == {"value": "15.0 ms on the device (upload beside it: 45.0 ms), max abs diff 2.0e-05", "met": True}
    entry = {**entry, "shape": [24, 64, 64]}
    assert gpu_check.targets({"preprocessing": entry}, GPU_PLAN)["GPU preprocessing <= 20 ms, parity <= 1e-4"]["met"] is None
