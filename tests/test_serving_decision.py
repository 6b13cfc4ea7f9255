"""The decision rule and response metadata of ct_postprocess, and the launcher's preparation (no server)."""
import json
import os

import numpy as np
import pytest

from serve import DecisionError, decide, find_installation, parse_threshold, prepare_backend_directory, triage_meta
from serve.decision import parse_provenance


@pytest.mark.parametrize("p, threshold, expected", [(0.3, 0.5, 0), (0.5, 0.5, 1), (0.7, 0.5, 1), (0.05, 0.1, 0), (0.1, 0.1, 1)])
def test_pathology_when_probability_reaches_threshold(p, threshold, expected):
    decision = decide(np.array([[1 - p, p]], dtype=np.float32), threshold)
    assert decision.pathology == expected
    assert decision.probability == pytest.approx(p, abs=1e-7)
    assert decision.threshold == threshold


@pytest.mark.parametrize(
    "probabilities",
    [[0.5, 0.5, 0.0], [0.2], [np.nan, 1.0], [0.7, 0.7], [-0.2, 1.2], [np.inf, 0.0]],
)
def test_decision_refuses_what_is_not_a_distribution(probabilities):
    with pytest.raises(DecisionError):
        decide(np.array(probabilities, dtype=np.float32), 0.5)


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
    with pytest.raises(DecisionError):
        triage_meta(b"[1, 2]", decide(np.array([0.2, 0.8]), 0.4), provenance)


def test_backend_directory_holds_python_backend_and_the_stub_for_this_python(tmp_path):
    installation = find_installation()
    assert os.access(installation.binary, os.X_OK)
    backends = prepare_backend_directory(tmp_path / "backends", installation)
    python = backends / "python"
    assert (python / "libtriton_python.so").is_file()
    assert (python / "triton_python_backend_utils.py").is_file()
    assert os.access(python / "triton_python_backend_stub", os.X_OK)
