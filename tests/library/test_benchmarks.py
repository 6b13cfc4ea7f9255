"""Benchmark parts that need no server: perf_analyzer's input data, the load loop's statistics, the
decoding and explanation benchmarks at tiny sizes, the GPU check's reading of nvidia-smi and its
sections' handling of a precision that fails."""

from __future__ import annotations

import argparse
import json
import threading
import time
import types
from pathlib import Path

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


def test_nvidia_smi_rows_are_read_as_integers_and_unreported_values_left_out():
    from benchmarks.gpu_check import parse_smi

    text = "12345, 4013\n12377, [N/A]\n\n 99, 512 \n"  # --query-compute-apps=pid,used_memory --format=csv,noheader,nounits
    assert parse_smi(text) == [[12345, 4013], [99, 512]]
    assert parse_smi("81559\n") == [[81559]] and parse_smi("[Not Supported]\n") == []


def test_a_precision_that_fails_on_the_card_keeps_the_others_numbers(monkeypatch, tmp_path):
    """On a GPU run, a precision whose kernels fail (say BF16 3D convolutions) must not cost the
    FP32 and FP16 rows: its rows carry the one-line error, the markdown shows them."""
    import dataclasses

    from benchmarks import gpu_check
    from classifier import TorchClassifier
    from export import build_classifier, demo_weights

    class NoBf16(TorchClassifier):
        def __call__(self, volumes):
            if self.precision == "bf16":
                raise RuntimeError("CUDNN_STATUS_NOT_SUPPORTED\nwhere it happened")
            return super().__call__(volumes)

    def no_bf16_parity(*args, precision, **kwargs):
        raise RuntimeError("no bf16 here")

    monkeypatch.setattr(gpu_check, "TorchClassifier", NoBf16)
    monkeypatch.setattr(gpu_check, "check_torch_parity", no_bf16_parity)
    plan = dataclasses.replace(gpu_check.Plan.smoke(), precisions=("fp32", "bf16"), batches=(1,), seconds=0.01)
    network = build_classifier(demo_weights())
    section = gpu_check.classifier_section(network, plan, tflop=gpu_check.study_tflop(plan.size))
    rows = {(row["precision"], row["layout"]): row for row in section["rows"]}
    assert rows[("fp32", "channels_last")]["studies_per_s"] > 0 and rows[("fp32", "contiguous")]["studies_per_s"] > 0
    assert rows[("bf16", "channels_last")]["error"] == "RuntimeError: CUDNN_STATUS_NOT_SUPPORTED"
    assert section["best"]["precision"] == "fp32" and section["channels_last_speedup"] > 0
    parity = gpu_check.parity_section(network, plan)
    assert parity == {"parity_set_bf16": {"error": "RuntimeError: no bf16 here"}}

    results = {
        "command": "test",
        "seconds": 1.0,
        "environment": gpu_check.environment(plan),
        "classifier": section,
        "parity": parity,
        "memory": {
            "card_gib": 8,
            "context_mib": 500,
            "cap_mib": 7692,
            "precisions": {
                "fp16": {
                    "weights_mib": 122,
                    "rows": [{"batch": 1, "fits": True, "peak_allocated_mib": 900, "peak_reserved_mib": 1000}],
                    "largest_batch": 1,
                    "largest_batch_bounded_by_measurement": True,
                    "complete": False,  # the section's time ran out after batch 1
                },
                "bf16": {"error": "RuntimeError: no bf16 here"},
            },
        },
    }
    results["targets"] = gpu_check.targets(results, plan)
    text = gpu_check.markdown(results)
    assert "| bf16 | channels_last | 1 | RuntimeError: CUDNN_STATUS_NOT_SUPPORTED |" in text
    assert "| parity_set_bf16 | RuntimeError: no bf16 here |" in text and "| bf16 |  | RuntimeError: no bf16 here |" in text
    assert "Largest batch that fits: fp16 1 or more (the search stopped for time)." in text
    gpu_check.plot(results, tmp_path / "plot.png")


def test_the_classifier_section_records_the_rows_its_time_share_left_out():
    import dataclasses

    from benchmarks import gpu_check
    from export import build_classifier, demo_weights

    plan = dataclasses.replace(gpu_check.Plan.smoke(), batches=(1, 2), seconds=0.01)
    section = gpu_check.classifier_section(build_classifier(demo_weights()), plan, tflop=1.0, limit_s=0.0)
    assert [row["error"] for row in section["rows"]] == ["not measured: the section's 0 s were spent"] * 2
    assert section["best"] is None and section["channels_last_speedup"] is None


def test_a_gpu_check_section_starts_only_with_the_time_it_needs_left():
    from benchmarks.gpu_check import not_started

    assert not_started("served", 269, 420) is None and not_started("memory", 419, 420) is None
    assert not_started("served", 271, 420) == "time budget of 420 s: 271 s spent, served needs about 150 s"
    assert not_started("memory", 421, 420) == "time budget of 420 s: 421 s spent"


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


def test_a_level_whose_warm_up_failed_in_one_worker_counts_every_study_as_failed():
    """Three of four workers cannot connect: the level did not run at concurrency 4, so nothing of it
    may read as a success (the others would otherwise send every study, failures 0)."""
    made = []
    lock = threading.Lock()

    def make():
        with lock:
            made.append(1)
            broken = len(made) <= 3
        if broken:
            raise ConnectionRefusedError("connection refused")
        return lambda: time.sleep(0.01)

    result = load.closed_loop("fake", make, concurrency=4, requests=8)
    assert result.failures == result.requests == 8 and result.studies_per_s == 0
    assert result.first_error == "warm-up: connection refused"


def _level(target: str, concurrency: int, failures: int = 0, studies_per_s: float = 4.0, p95_s: float = 0.3) -> dict:
    return {
        "target": target,
        "concurrency": concurrency,
        "requests": 8,
        "failures": failures,
        "studies_per_s": studies_per_s,
        "p95_s": p95_s,
    }


def _serving_results(load_rows: list[dict], served_failures: int = 0) -> dict:
    return {
        "levels": [1, 4],
        "load": load_rows,
        "in_process": {"rounds": 8, "served_s": 0.25, "total_s": 0.24, "served_failures": served_failures},
        "locust": {"failures": 0, "exit_code": 0},
        "memory": {"shm_idle_mib": 64.0, "shm_peak_mib": 128.0, "shm_after_stop_mib": 0.0},
    }


def test_serving_targets_are_met_only_over_studies_that_all_succeeded():
    from benchmarks import serving

    clean = [
        _level("triton", 1),
        _level("baseline", 1, studies_per_s=0.8, p95_s=1.5),
        _level("triton", 4),
        _level("baseline", 4, studies_per_s=0.8),
    ]
    met = serving.targets(_serving_results(clean))
    assert all(verdict["met"] for verdict in met.values()), met
    ratio, p95, overhead = (met[name] for name in list(met)[:3])
    assert ratio["value"] == 5.0 and p95["value"] == "0.3 s vs 1.5 s" and overhead["value"] == "0.25 s vs 0.24 s: +4.2%"

    baseline_failed = [_level("triton", 1), _level("baseline", 1, 8, 0.0), _level("triton", 4), _level("baseline", 4, 8, 0.0)]
    verdicts = list(serving.targets(_serving_results(baseline_failed)).values())
    assert verdicts[0] == {"value": "not measured: baseline: 8 of 8 failed", "met": None}
    assert verdicts[1]["met"] is False and verdicts[1]["value"].endswith("(baseline: 8 of 8 failed)")

    triton_failed = [_level("triton", 1, 6, 1.0, 0.01), clean[1], _level("triton", 4, 6, 1.3), clean[3]]
    verdicts = list(serving.targets(_serving_results(triton_failed, served_failures=1)).values())
    assert [verdict["met"] for verdict in verdicts[:3]] == [False, False, False]
    assert verdicts[0]["value"] == "1.62 (triton: 6 of 8 failed)" and verdicts[2]["value"].endswith("(1 of 8 served studies failed)")


def test_a_soak_that_sent_nothing_does_not_pass():
    import argparse

    from benchmarks import soak

    args = argparse.Namespace(minutes=0.000001, size=16, concurrency=4, warm_up_s=0.0, command="python -m benchmarks.soak")
    sample = {"t_s": 0.0, "phase": "start", "rss_mib": {"tritonserver": 40.0}, "shm_mib": 0.0}
    results = soak.summarise(args, [], soak.Tally(), {"sent": 0, "unexpected": []}, [sample], sample, sample, 0.0, [], [], "")
    assert results["sent"] == 0 and not results["checks"]["ran its length with studies sent"] and not results["passed"]


def test_soak_p95_stays_within_the_times_measured():
    import argparse

    from benchmarks import soak

    tally = soak.Tally()
    case = soak.Case("phantom, ZIP", [b""], None)
    for seconds in (0.1, 0.2, 0.3, 5.0):
        tally.check(case, ("grpc", False), types.SimpleNamespace(processing_status="Failure", error="", time_of_processing=seconds))
    args = argparse.Namespace(minutes=0.01, size=16, concurrency=1, warm_up_s=0.0, command="python -m benchmarks.soak")
    sample = {"t_s": 0.0, "phase": "start", "rss_mib": {"tritonserver": 40.0}, "shm_mib": 0.0}
    results = soak.summarise(args, [case], tally, {"sent": 0, "unexpected": []}, [sample], sample, sample, 1.0, [], [], "")
    p95 = results["cases"]["phantom, ZIP"]["p95_s"]
    assert p95 <= 5.0 and p95 == pytest.approx(4.295, abs=1e-3)


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        ("http_faults", ["--form-mib", "200000"]),
        ("http_faults", ["--chunks", "4000001"]),
        ("report_scale", ["--studies", "1", "--window", "2"]),
        ("report_scale", ["--studies", "100", "--window", "1"]),
        ("report_scale", ["--studies", "1999", "--window", "1000"]),
        ("decoding", ["--encodings", ","]),
        ("explain", ["--steps", "257"]),  # explain.attribution.MAX_STEPS
        ("explain", ["--methods", "occlusion", "--size", "64", "--window", "24"]),  # a window that does not divide S
        ("explain", ["--methods", "occlusion", "--size", "64", "--window", "2", "--max-size", "occlusion=64"]),  # 32^3 + 1 passes
    ],
)
def test_benchmark_options_they_cannot_use_are_usage_errors(module, argv, capsys, tmp_path):
    import importlib

    with pytest.raises(SystemExit) as exited:
        importlib.import_module(f"benchmarks.{module}").main([*argv, "--out", str(tmp_path)])
    assert exited.value.code == 2 and "error:" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--studies", "1999", "--window", "1000"], ["--studies", "0"]], ids=["window", "studies"])
def test_report_scale_checks_its_options_before_it_makes_its_out_folder(argv, capsys, tmp_path):
    """A bad option after --out, or one only the options together rule out, leaves no empty folder behind."""
    from benchmarks import report_scale

    out = tmp_path / "new" / "results"
    with pytest.raises(SystemExit) as exited:
        report_scale.main(["--out", str(out), *argv])
    assert exited.value.code == 2 and "error:" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_http_faults_default_chunks_are_within_their_bound():
    from benchmarks import option_types

    assert option_types.CHUNKS("2000000") == 2_000_000  # the default, the committed result's count


def test_perf_analyzer_throughput_is_requests_over_first_send_to_last_answer(tmp_path):
    """Its profile export, as perf_analyzer 2.51 writes it: the requests' inputs as raw, non-UTF-8 bytes."""
    pairs = [(1_000_000_000, 1_300_000_000), (1_300_000_000, 1_600_000_000), (1_600_000_000, 2_500_000_000)]
    requests = [{"timestamp": sent, "request_inputs": {"DICOM": "RAW"}, "response_timestamps": [answered]} for sent, answered in pairs]
    text = json.dumps({"experiments": [{"experiment": {"mode": "concurrency", "value": 1}, "requests": requests}]})
    profile = tmp_path / "profile.json"
    profile.write_bytes(text.encode().replace(b'"RAW"', b'"PK\\u0003\\u0004\xe9\x83"'))
    assert pa.throughput(profile) == {"requests": 3, "elapsed_s": 1.5, "throughput": 2.0}


def test_decoding_benchmark_times_both_paths_and_checks_their_values(tmp_path, capsys):
    pytest.importorskip("imagecodecs")
    from benchmarks import decoding

    args = ["--slices", "16", "--size", "32", "--repeat", "1", "--encodings", "jpeg2000,rle", "--out", str(tmp_path)]
    assert decoding.main(args) == 0
    result = json.loads((tmp_path / "decoding-cpu.json").read_text())
    assert set(result["encodings"]) == {"jpeg2000", "rle"} and result["target"].split()[0] in ("met", "not")
    for row in result["encodings"].values():
        assert row["pydicom"]["max_abs_hu_diff"] == row["imagecodecs"]["max_abs_hu_diff"] == 0
        assert row["imagecodecs"]["frames_by_decoder"]["imagecodecs"] == 16 and row["pydicom"]["frames_by_decoder"]["pydicom"] == 16
    text = (tmp_path / "decoding-cpu.md").read_text()
    assert text.startswith("# Compressed studies") and f"`python -m benchmarks.decoding {' '.join(args)}`, one run on " in text
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["imagecodecs_over_pydicom"].keys() == {"jpeg2000", "rle"}


def test_explain_benchmark_writes_its_table_with_positive_numbers(tmp_path):
    """benchmarks.explain at S=16: inference and Grad-CAM each in a fresh process, occlusion over its --max-size."""
    pytest.importorskip("captum")
    from benchmarks import explain

    args = ["--size", "16", "--methods", "gradcam", "occlusion", "--max-size", "occlusion=0", "--repeat", "1", "--out", str(tmp_path)]
    assert explain.main(args) == 0
    result = json.loads((tmp_path / "explain-cpu.json").read_text())
    assert [(row["method"], row["size"]) for row in result["rows"]] == [("inference", 16), ("gradcam", 16)]
    for row in result["rows"]:
        assert row["s"] > 0 and row["inference_s"] > 0 and row["ratio"] > 0 and row["rounds"] == 1
        assert row["peak_rss_mib"] > row["baseline_rss_mib"] > 0 and row["peak_above_baseline_mib"] >= 0
        assert row["child_wall_s"] > 0 and row["load_1min_before"] >= 0
    gradcam = result["rows"][1]
    assert set(gradcam["calls"]) == {"gradcam", "inference"} and gradcam["ratio"] == pytest.approx(gradcam["s"] / gradcam["inference_s"])
    assert [(entry["method"], entry["size"]) for entry in result["not_measured"]] == [("occlusion", 16)]

    text = (tmp_path / "explain-cpu.md").read_text()
    assert f"`python -m benchmarks.explain {' '.join(args)}` on " in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header[:5] == ["method", "S", "time s", "ratio to inference", "peak RSS MiB"]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    assert all(len(row) == len(header) for row in rows) and [row[:2] for row in rows] == [
        ["inference", "16"],
        ["gradcam", "16"],
        ["occlusion", "16"],
    ]
    for row in rows[:2]:
        assert float(row[2]) > 0 and float(row[3].split()[0]) > 0 and float(row[4]) > 0
    assert rows[2][2:6] == ["not measured"] * 4 and rows[2][6] == "2 F"
    assert "integrated_gradients: steps x (F + full B to the input) + 1 F" in text and "occlusion at S=16: too slow" in text


def test_the_real_ct_series_is_one_series_of_the_real_slice_5_mm_apart():
    """benchmarks.preprocessing --real-ct: copies of a real slice read as one series, stacked as said."""
    import preprocess
    from benchmarks.preprocessing import real_ct_series

    study = preprocess.preprocess_study(real_ct_series(), size=16, mode="fast")
    assert study.meta["original_shape"] == [20, 512, 512]
    assert study.meta["original_spacing_mm"][0] == pytest.approx(5.0)


# -- what every benchmark's command line does before and after its work ---------------------------
WITH_OUT = ["soak", "decoding", "explain", "cpu_engines", "report_scale", "batching_wait", "explain_opt_in", "http_faults", "serving"]
WORK = {"decoding": "studies", "shared_memory": "triton_version", "preprocessing": "measure", "baseline": "create_app"}  # else run


def _benchmark(name: str, monkeypatch, work):
    """benchmarks.<name> with the function its main() starts the work with replaced by `work`."""
    import importlib

    module = importlib.import_module(f"benchmarks.{name}")
    monkeypatch.setattr(module, WORK.get(name, "run"), work)
    return module


def _no_work(*args, **kwargs):
    pytest.fail("the benchmark started its work")


@pytest.mark.parametrize("name", [*WITH_OUT, "shared_memory"])
def test_an_out_that_is_a_file_is_a_usage_error_before_any_work(name, monkeypatch, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    extra = ["--http-url", "127.0.0.1:1"] if name == "shared_memory" else []
    with pytest.raises(SystemExit) as exited:
        _benchmark(name, monkeypatch, _no_work).main([*extra, "--out", str(afile)])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.splitlines()[-1].endswith(f"argument --out: {afile} is a file, not a folder"), err


def test_an_out_folder_is_checked_while_the_options_are_read_and_made_with_the_results(tmp_path):
    import argparse

    from benchmarks import load, option_types

    assert option_types.out_folder(str(tmp_path / "a" / "b")) == tmp_path / "a" / "b"
    assert not list(tmp_path.iterdir())  # the write check leaves nothing, the folder is not made yet
    load.write_results(tmp_path / "a" / "b", "r", {"x": 1}, "table\n")
    assert sorted(path.name for path in (tmp_path / "a" / "b").iterdir()) == ["r.json", "r.md"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(argparse.ArgumentTypeError, match=r"cannot write results in .*afile/sub: .*afile is a file, not a folder"):
        option_types.out_folder(str(tmp_path / "afile" / "sub"))


@pytest.mark.parametrize("name", [*WITH_OUT, "shared_memory", "preprocessing", "baseline"])
def test_ctrl_c_ends_a_benchmark_with_one_line_and_status_130(name, monkeypatch, tmp_path, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    argv = {
        "shared_memory": ["--http-url", "127.0.0.1:1"],
        "preprocessing": ["--real-ct", "--size", "16"],
        "baseline": ["--weights", "w.pt", "--size", "16"],
    }.get(name, ["--out", str(tmp_path)])
    try:
        status = _benchmark(name, monkeypatch, interrupted).main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C left main() as a traceback")
    assert status == 130 and capsys.readouterr().err == f"python -m benchmarks.{name}: interrupted: no results written\n"


def test_ctrl_c_during_the_perf_analyzer_install_is_one_line_and_status_130(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(pa, "install", interrupted)
    try:
        status = pa.main(["install"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C left main() as a traceback")
    assert status == 130 and capsys.readouterr().err == "python -m benchmarks.perf_analyzer: interrupted: no results written\n"


def test_a_study_or_checkpoint_a_benchmark_cannot_use_is_one_line_and_status_2(tmp_path, capsys):
    from benchmarks import baseline, cpu_engines, explain, preprocessing

    notes = tmp_path / "notes.txt"
    notes.write_text("not DICOM")
    assert preprocessing.main(["--study", str(notes), "--size", "16"]) == 2
    assert capsys.readouterr().err == "python -m benchmarks.preprocessing: error: no DICOM images found in the input\n"
    assert baseline.main(["--weights", str(notes), "--size", "16"]) == 2
    assert capsys.readouterr().err.startswith("python -m benchmarks.baseline: error: notes.txt is not a PyTorch checkpoint")
    missing = tmp_path / "missing.pt"
    for module in (cpu_engines, explain):  # explain: in this process, before any measurement's child
        assert module.main(["--checkpoint", str(missing), "--size", "16", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err == f"python -m {module.__name__}: error: checkpoint not found: {missing}\n", err
    assert not list(tmp_path.glob("*.json"))


def test_a_device_a_benchmark_cannot_use_is_a_usage_error(capsys):
    import torch

    from benchmarks import preprocessing

    bad = ["xyz", "meta"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        with pytest.raises(SystemExit) as exited:
            preprocessing.main(["--device", device])
        assert exited.value.code == 2 and "argument --device: " in capsys.readouterr().err.splitlines()[-1]


def test_serving_at_a_url_where_no_server_answers_is_one_line_and_leaves_nothing(tmp_path, capsys):
    import tempfile

    from benchmarks import serving
    from serve import free_ports

    before = set(Path(tempfile.gettempdir()).glob("ct_triage_bench_*"))
    http, grpc = free_ports(2)
    with pytest.raises(SystemExit) as exited:
        serving.main(["--url", f"127.0.0.1:{http}", "--grpc-url", f"127.0.0.1:{grpc}", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"python -m benchmarks.serving: error: --url 127.0.0.1:{http}: no ct_classifier config")
    assert set(Path(tempfile.gettempdir()).glob("ct_triage_bench_*")) == before and not list(tmp_path.iterdir())


def test_the_command_a_results_file_names_is_the_one_run():
    import argparse

    from benchmarks import option_types

    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving")
    assert option_types.command_line(parser, ["--size", "16", "--out", "my results"]) == (
        "python -m benchmarks.serving --size 16 --out 'my results'"
    )


def test_the_serving_report_names_its_command_and_what_locust_sent():
    from benchmarks import serving

    machine = {"date": "today", "cpu": "a CPU", "cores": 2, "available_cpus": 2, "memory_gib": 1.0, "size": 16}
    machine |= {"python": "3.11", "triton": "2.51.0", "versions": {"numpy": "1.26.4"}}
    locust = {"users": 1, "seconds": 2, "requests": 5, "failures": 2, "succeeded": 3, "succeeded_per_s": 1.5}
    locust |= {"succeeded_p50_ms": 12, "succeeded_p95_ms": 20, "requests_per_type": {"http": 5}, "exit_code": 1}
    row = {"target": "triton", "concurrency": 1, "requests": 2, "failures": 0, "studies_per_s": 9.0, "p50_s": 0.1, "p95_s": 0.1}
    results = {"command": "python -m benchmarks.serving --size 16 --levels 1 --locust-seconds 2", "machine": machine, "levels": [1]}
    results |= {"requests_per_level": 2, "perf_analyzer_requests": 2, "server": "127.0.0.1:8000", "perf_analyzer": {}}
    results |= {"study": {"slices": 16, "rows": 32, "columns": 32, "dicom_mib": 0.1}, "load": [row], "locust": locust, "targets": {}}
    text = serving.markdown(results, "remote-s16")
    assert "`python -m benchmarks.serving --size 16 --levels 1 --locust-seconds 2` on today" in text and "Triton 2.51.0;" in text
    assert "5 studies (5 over HTTP), 2 failed; 3 answered with a result, 1.5 per second, p50 12 ms, p95 20 ms" in text
    assert "gRPC" not in text.split("## locust")[1]


def test_serving_counts_only_its_own_servers_shared_memory(tmp_path):
    """Another job's region in /dev/shm is neither a leak of this server nor a reason to miss the target."""
    import os

    from benchmarks import serving

    other = Path("/dev/shm") / f"another_job_{os.getpid()}"
    other.write_bytes(bytes(4 << 20))
    server = types.SimpleNamespace(pid=os.getpid(), shm_bytes=lambda: 1 << 20)
    try:
        with serving.MemoryPeaks(server) as peaks:
            time.sleep(0.6)
    finally:
        other.unlink()
    assert peaks.shm_mib == 1.0
    leaked = {**_serving_results([]), "memory": {"shm_idle_mib": 1.0, "shm_peak_mib": 2.0, "shm_after_stop_mib": 1.0}}
    verdict = serving.targets(leaked)["no /dev/shm region of the server's left after it stopped"]
    assert verdict == {"value": "1.0 MiB idle, 2.0 MiB at peak, 1.0 MiB after", "met": False}


class _Parsed(Exception):
    """Raised where a command line's main() would parse its arguments: carries the parser it built."""


def _parser_of(main) -> argparse.ArgumentParser:
    """The parser `main` builds, taken where it would parse (nothing after that runs)."""

    def caught(parser, *args, **kwargs):
        raise _Parsed(parser)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", caught)
        with pytest.raises(_Parsed) as parsed:
            main([])
    return parsed.value.args[0]


def _every_parser(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                yield from _every_parser(command)


def test_every_cli_option_has_a_help_text_that_shows_its_default():
    """Every option of every command line says what it does, and --help adds its default, once."""
    import importlib
    import importlib.util

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location("deploy_verify", ROOT / "deploy" / "verify.py")
    verify = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verify)
    module = importlib.import_module
    benchmarks = (
        *("serving", "decoding", "report_scale", "soak", "shared_memory", "baseline", "preprocessing", "explain", "perf_analyzer"),
        *("gpu_check", "cpu_engines", "http_faults", "batching_wait", "explain_opt_in"),
    )
    parsers = {
        "serve": module("serve.__main__").parser(),
        "export": module("export.__main__")._parser(),
        "client": module("client.cli")._parser(),
        "deploy/verify.sh": _parser_of(verify.main),
        **{name: _parser_of(module(name).main) for name in ("serve.sizing", "demo.__main__", "fuzz.__main__", "preprocess.__main__")},
        "preprocess.phantom": _parser_of(phantom.main),
        **{f"benchmarks.{name}": _parser_of(module(f"benchmarks.{name}").main) for name in benchmarks},
    }
    shared = argparse.ArgumentParser(prog="benchmarks.load.add_arguments", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    load.add_arguments(shared, levels=[1, 4], requests=16, rounds=4, compared="state")
    parsers["benchmarks.load"] = shared
    for name, top in parsers.items():
        for parser in _every_parser(top):
            assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter), parser.prog
            assert parser.format_help()  # every help string formats
            formatter = parser._get_formatter()
            for action in parser._actions:
                if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                    continue
                where = f"{name}: {parser.prog} {action.option_strings or action.dest}"
                assert action.help and action.help is not argparse.SUPPRESS, f"{where} has no help"
                shown = formatter._expand_help(action)
                assert "(default " not in shown, f"{where}: a default written by hand: {shown}"
                if action.option_strings or action.nargs == "?":
                    assert shown.count("(default:") == 1, f"{where}: {shown}"


def test_verify_sh_help_needs_no_container():
    """`bash deploy/verify.sh --help` prints verify.py's options here, without docker compose."""
    import subprocess

    from helpers import ROOT

    done = subprocess.run(["bash", "deploy/verify.sh", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: deploy/verify.sh") and "--parity-inputs" in done.stdout
