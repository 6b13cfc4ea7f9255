"""benchmarks/gpu_check.sh --smoke: the GPU script end to end on the CPU at S=16, so it cannot rot
between runs on a GPU (every section runs the code the GPU run runs, the explanation's included; memory
needs CUDA and says so), with the packages the GPU machine lacks made unimportable (tests/gpu_machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import ROOT, bytes_under


def test_the_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    # every process of the run (the server's stubs too) imports only what the GPU machine has or is carried
    lacking = str(ROOT / "tests" / "gpu_machine")
    out, scratch = tmp_path / "out", tmp_path / "tmp"
    scratch.mkdir()
    environment = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "TMPDIR": str(scratch)}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [lacking, os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--smoke"], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["failed_sections"] == [] and summary["out"] == str(out)
    written = ["smoke-cpu-s16-tritonserver.log", "smoke-cpu-s16.json", "smoke-cpu-s16.md", "smoke-cpu-s16.png"]
    assert sorted(p.name for p in out.iterdir()) == written
    assert "Started HTTPService" in (out / "smoke-cpu-s16-tritonserver.log").read_text()
    assert bytes_under(scratch) < 2**20, sorted(scratch.iterdir())  # the rendered repository (0.7 GB of weights at any S) is removed
    results = json.loads((out / "smoke-cpu-s16.json").read_text())

    rows = results["classifier"]["rows"]
    assert {(row["precision"], row["batch"], row["layout"]) for row in rows} >= {("fp32", 1, "channels_last"), ("fp32", 2, "channels_last")}
    assert all(row["studies_per_s"] > 0 and row["tflop_per_s"] >= 0 for row in rows)
    assert results["environment"]["study_tflop"] > 0 and results["memory"] == {"not_measured": "needs a CUDA device"}

    parity = results["parity"]["parity_set_fp32"]
    assert parity["passed"] and parity["comparisons"]["served_fp32_vs_torch"]["max_abs_diff"] <= 1e-4

    preprocessing = results["preprocessing"]
    assert preprocessing["max_abs_diff_vs_fast"] <= 1e-4 and preprocessing["same_mapping"]
    assert preprocessing["device_ms"]["median"] > 0 and preprocessing["upload_ms"]["median"] > 0

    explanation = results["explain"]  # benchmarks.explain: Grad-CAM beside one inference, each in a fresh process
    assert [(row["method"], row["size"]) for row in explanation["rows"]] == [("inference", 16), ("gradcam", 16)]
    assert all(row["s"] > 0 and row["ratio"] > 0 and row["peak_rss_mib"] > row["baseline_rss_mib"] > 0 for row in explanation["rows"])
    assert explanation["fits_8gb"] == "not measured: needs a CUDA device"

    served = results["served"]  # the ensemble on the torch classifier, through the bundled server
    assert served["warm_up"]["concurrency"] == 2 and served["warm_up"]["slowest_s"] > 0  # untimed, before the levels
    assert [level["concurrency"] for level in served["levels"]] == [1, 2] and served["levels_skipped_for_time"] == []
    assert all(level["failures"] == 0 and level["studies_per_s"] > 0 for level in served["levels"]), served
    explained = served["explained"]  # one study through ct_triage_explain on the same server
    assert explained["seconds"] > 0 and explained["seconds_first"] > 0 and "localization" in explained, explained
    assert served["gpu_memory"] == {"not_measured": "needs a CUDA device and nvidia-smi"}
    waits = served["batching_wait"]  # the torch-gpu config's 20 ms against none, at the middle level
    assert waits["concurrency"] == 2 and [(row["wait_us"], row["failures"]) for row in waits["summary"]] == [(20000, 0), (0, 0)]
    log = (out / "smoke-cpu-s16-tritonserver.log").read_text()
    assert "ct_explain: gradcam at S=16 on cpu" in log and "IEEE FP32 convolutions" in log  # TF32 off, as benchmarks.explain
    assert "warmed up" not in log  # ct_preprocess on the CPU: no device path to warm up
    # the budget counts from gpu_check.sh's start, before the imports: some of it is gone when run() starts
    assert 0 < results["seconds_before_run"] < results["seconds"]
    markdown = (out / "smoke-cpu-s16.md").read_text()
    assert "## Classifier" in markdown and "Not measured: needs a CUDA device" in markdown
    assert "## Explanation (explain.Explainer, Grad-CAM, FP32, S=16, beside one inference)" in markdown
    assert "The same study through ct_triage_explain" in markdown
    assert "Untimed first: one study from each of 2 clients at once" in markdown
    assert "The classifier's batching wait at concurrency 2 (ct_classifier reloaded to each wait" in markdown
