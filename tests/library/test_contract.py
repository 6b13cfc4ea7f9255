"""The triage contract (no server): the operating-point rule, the response META, the valid sizes S
and the HU window; and the launcher's backend directory."""

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT

from contract import (
    DecisionError,
    InvalidSizeError,
    MetaError,
    OutOfRangeError,
    check_model_range,
    decide,
    hu_to_model_range,
    parse_provenance,
    parse_threshold,
    shown_probability,
    triage_meta,
    validate_size,
)
from serve import find_installation, prepare_backend_directory
from settings import PREPROCESSING


@pytest.mark.parametrize("p, threshold, expected", [(0.3, 0.5, 0), (0.5, 0.5, 1), (0.7, 0.5, 1), (0.05, 0.1, 0), (0.1, 0.1, 1)])
def test_pathology_when_probability_reaches_threshold(p, threshold, expected):
    decision = decide(np.array([[1 - p, p]], dtype=np.float32), threshold)
    assert decision.pathology == expected
    assert decision.probability == pytest.approx(p, abs=1e-7)
    assert decision.threshold == threshold


@pytest.mark.parametrize(
    "probabilities",
    [[0.5, 0.5, 0.0], [0.2], [np.nan, 1.0], [0.7, 0.7], [-0.2, 1.2], [np.inf, 0.0], [0.0, 1.0009], [1.0009, 0.0]],
)
def test_decision_refuses_what_is_not_a_distribution(probabilities):
    with pytest.raises(DecisionError):
        decide(np.array(probabilities, dtype=np.float32), 0.5)


def test_a_probability_one_float32_step_above_1_is_reported_as_1():
    decision = decide(np.array([0.0, np.nextafter(np.float32(1), np.float32(2))], dtype=np.float32), 0.5)
    assert decision.probability == 1.0 and decision.pathology == 1


@pytest.mark.parametrize("p, threshold", [(0.0719, 0.0734), (0.4996, 0.5), (0.296, 0.2951), (0.5, 0.5), (0.9999, 0.99995), (3e-8, 1e-8)])
def test_the_shown_probability_never_contradicts_its_decision(p, threshold):
    """Sites set thresholds such as 0.0734: P rounded to the nearest (0.072, 0.500) read as the
    wrong side of the threshold beside its decision."""
    decision = decide(np.array([1 - p, p], dtype=np.float32), threshold)
    shown = float(shown_probability(decision.probability, decision.pathology))
    assert (shown >= threshold) == bool(decision.pathology)
    assert abs(shown - decision.probability) <= 1e-3


def test_the_shown_probability_is_the_classifiers_float32_value_rounded():
    assert shown_probability(float(np.float32(0.296)), 1) == "0.296"  # not 0.297 from 0.29600000381...
    assert shown_probability(0.4996, 0, decimals=6) == "0.499600"


@pytest.mark.parametrize("value", ["0", "0.35", "1", 0.2])
def test_threshold_accepts_probabilities(value):
    assert parse_threshold(value) == float(value)


@pytest.mark.parametrize("value", ["", None, "abc", "-0.1", "1.5", "nan", "${threshold}"])
def test_threshold_refuses_anything_else(value):
    with pytest.raises(DecisionError, match="threshold"):
        parse_threshold(value)


def test_meta_adds_operating_point_and_provenance_to_preprocess_meta():
    preprocess_meta = json.dumps({"study_uid": "1.2.3", "timings_s": {"total": 1.5}}).encode()
    provenance = parse_provenance('{"weights": "demo, untrained", "size": 64}')
    meta = json.loads(triage_meta(preprocess_meta, decide(np.array([0.2, 0.8]), 0.4), provenance))
    assert meta["study_uid"] == "1.2.3" and meta["timings_s"] == {"total": 1.5}
    assert meta["threshold"] == 0.4
    assert meta["provenance"] == {"weights": "demo, untrained", "size": 64}
    assert parse_provenance("not json") == "not json"
    with pytest.raises(MetaError, match="META is not a JSON object"):
        triage_meta(b"[1, 2]", decide(np.array([0.2, 0.8]), 0.4), provenance)
    with pytest.raises(MetaError, match="META is not valid JSON"):  # nested past Python's recursion limit: not a traceback
        triage_meta(b"[" * 100_000 + b"]" * 100_000, decide(np.array([0.2, 0.8]), 0.4), provenance)
    for constant in (b"NaN", b"Infinity", b"-Infinity"):  # Python's json reads them; the answer's META would not be JSON
        with pytest.raises(MetaError, match="META is not valid JSON"):
            triage_meta(b'{"size": ' + constant + b"}", decide(np.array([0.2, 0.8]), 0.4), provenance)


def test_backend_directory_holds_python_backend_and_the_stub_for_this_python(tmp_path):
    installation = find_installation()
    assert os.access(installation.binary, os.X_OK)
    backends = prepare_backend_directory(tmp_path / "backends", installation)
    python = backends / "python"
    assert (python / "libtriton_python.so").is_file()
    assert (python / "triton_python_backend_utils.py").is_file()
    assert os.access(python / "triton_python_backend_stub", os.X_OK)


@pytest.mark.parametrize("size", [16, 64, 256, 512])
def test_sizes_the_network_takes(size):
    assert validate_size(size) == size


@pytest.mark.parametrize("size", [8, 30, 37, 520, 1024, 5000, 0, -64, 64.0, True, "64"])
def test_every_other_size_is_refused_with_the_rule(size):
    with pytest.raises(InvalidSizeError, match="must be"):
        validate_size(size)


def test_hu_window_maps_to_the_model_range_for_numpy_and_torch():
    hu = np.array([-3000.0, PREPROCESSING.hu_min, -200.0, PREPROCESSING.hu_max, 3000.0], dtype=np.float32)
    expected = np.array([-1.0, -1.0, 0.0, 1.0, 1.0], dtype=np.float32)
    assert np.allclose(hu_to_model_range(hu.copy()), expected, atol=1e-6)
    tensor = torch.from_numpy(hu.copy())
    assert hu_to_model_range(tensor) is tensor and np.allclose(tensor.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize(
    "steps",
    [
        # what ct_postprocess, then ct_preprocess (before its first study), then a client process imports
        [
            ("contract", "serve export preprocess client torch SimpleITK"),
            ("preprocess", "serve export client torch SimpleITK"),
            ("client", "serve export torch SimpleITK"),
        ],
        [("serve", "contract preprocess export client torch")],  # the launcher needs none of them
        [("classifier", "serve export preprocess client contract onnx onnxruntime tritonclient")],  # the torch-gpu model
    ],
    ids=["models and clients", "launcher", "torch classifier"],
)
def test_imports_run_one_way(steps):
    """Each package, imported after the ones before it, loads none of the packages it must not."""
    code = "import importlib, sys\n" + "".join(
        f"importlib.import_module({name!r}); print({name!r}, sorted(m for m in {never.split()!r} if m in sys.modules))\n"
        for name, never in steps
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:-1] == [f"{name} []" for name, _ in steps]


@pytest.mark.parametrize("as_tensor", [np.asarray, torch.from_numpy], ids=["numpy", "torch"])
def test_only_volumes_in_the_model_range_pass(as_tensor):
    hu = np.random.default_rng(0).uniform(-1100, 700, (1, 1, 16, 16, 16)).astype(np.float32)
    check_model_range(as_tensor(hu_to_model_range(hu.copy())))  # what preprocess makes: every value in [-1, 1]
    check_model_range(as_tensor(np.full((2, 2), 1.0005, np.float32)))  # float32 rounding of the window is tolerated
    for values, message in [
        (hu, r"VOLUME holds values from -1\d+ to [\d.]+, outside the model's \[-1, 1\]: HU must be windowed"),
        (np.where(hu > 0, np.nan, 0).astype(np.float32), "VOLUME holds non-finite values"),
        (np.full((2, 2), -np.inf, np.float32), "VOLUME holds non-finite values"),
        (np.full((2, 2), 1.01, np.float32), "outside the model's"),
    ]:
        with pytest.raises(OutOfRangeError, match=message):
            check_model_range(as_tensor(values))


@pytest.mark.parametrize(
    "module, args, message",
    [
        ("serve.__main__", ["--http-port", "70000"], "argument --http-port: must be from 1 to 65535, got 70000"),  # not a traceback
        ("serve.__main__", ["--grpc-port", "0"], "argument --grpc-port: must be from 1 to 65535, got 0"),  # not a wait on port 0
        ("serve.__main__", ["--log-verbose", "-1"], "argument --log-verbose: must be from 0 to"),
        ("serve.sizing", ["--preprocess-instances", "-3"], "argument --preprocess-instances: must be from 1 to 64"),  # not negative MiB
        ("serve.sizing", ["--size", "0"], "argument --size: size 0 is not usable"),
        ("serve.sizing", ["--largest-study-mib", "-1"], "argument --largest-study-mib: must be from 1 to"),
        ("demo.__main__", ["--matrix", "100000000"], "--matrix: must be from 32 to 1024, got 100000000"),  # not 71 PiB asked of numpy
        ("demo.__main__", ["--slices", "-3"], "argument --slices: must be from 16 to 2000, got -3"),  # not a traceback
        ("demo.__main__", ["--size", "-5"], "argument --size: size -5 is not usable"),  # refused before the export, not after it
        ("demo.__main__", ["--timeout", "nan"], "argument --timeout: must be a number above 0 and at most 86400, got nan"),
        ("preprocess.__main__", ["study.zip", "-o", "out.pt", "--threads", "5000"], "argument --threads: must be from 0 to 1024, got 5000"),
        ("fuzz.__main__", ["--seconds", "0"], "argument --seconds: must be from 1 to"),
        ("benchmarks.serving", ["--size", "7"], "argument --size: size 7 is not usable"),  # not a traceback
        ("benchmarks.soak", ["--minutes", "nan"], "argument --minutes: must be a number above 0 and at most 10080, got nan"),
        ("benchmarks.batching_wait", ["--waits", "20000", "-1"], "argument --waits: must be from 0 to 10000000, got -1"),
    ],
)
def test_commands_refuse_numbers_they_cannot_use_in_one_line(module, args, message, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as stopped:  # while the options are read: anything later would be an exception here
        main(args)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_an_internal_error_is_answered_by_its_type_and_logged_with_where():
    """What every served model does with its own bug: the caller never sees the message (it could
    quote what was sent) nor a traceback; the log says where, and the message only when asked."""
    from contract import internal_error

    def failing():
        raise ValueError("PatientName=DOE^JANE\nsecond line")

    try:
        failing()
    except ValueError as error:
        logged, answered = internal_error("ct_x", error)
        with_message, _ = internal_error("ct_x", error, with_message=True)
    assert answered == "ct_x: internal error (ValueError)"
    assert logged.startswith("ct_x internal error ValueError at ") and f"{__file__}:" in logged and "DOE" not in logged
    assert with_message.startswith(logged) and "DOE^JANE" in with_message and "second line" not in with_message


def test_a_metric_that_cannot_be_updated_costs_its_sample_not_the_answer():
    """The served models update their Prometheus metrics through this: a failure is one line to log
    (the type only) and never an exception that would fail the study."""
    from contract import metric_update

    updated = []
    assert metric_update("ct_x", lambda: updated.append(1)) is None and updated == [1]

    def failing():
        raise KeyError("NotARefusalReason")

    assert metric_update("ct_x", failing) == "ct_x: metrics not updated (KeyError)"
