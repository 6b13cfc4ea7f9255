"""serve.metrics.parse: the names the endpoint shows (which PromQL uses), every label, escapes undone,
a timestamp ignored, and a line that is no sample named. The server tests read a real endpoint."""

import pytest

from serve.metrics import parse


def test_samples_keep_their_exposed_names_labels_and_values():
    text = """# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="ct_triage",version="1"} 12
ct_triage_refused_studies_total{reason="NotCTError"} 0

ct_triage_probability_bucket{le="+Inf"} 3
ct_triage_probability_sum 1.25e0
odd{path="C:\\\\studies\\\\a \\"b\\"\\nc"} 1 1700000000000
"""
    assert parse(text) == {
        ("nv_inference_request_success", (("model", "ct_triage"), ("version", "1"))): 12.0,
        ("ct_triage_refused_studies_total", (("reason", "NotCTError"),)): 0.0,
        ("ct_triage_probability_bucket", (("le", "+Inf"),)): 3.0,
        ("ct_triage_probability_sum", ()): 1.25,
        ("odd", (("path", 'C:\\studies\\a "b"\nc'),)): 1.0,
    }


def test_a_line_that_is_no_sample_is_named():
    with pytest.raises(ValueError, match="not a Prometheus sample: '<html>'"):
        parse("# TYPE x counter\n<html>\n")
