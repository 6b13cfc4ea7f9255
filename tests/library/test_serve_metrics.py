"""serve.metrics.parse: the names the endpoint shows (which PromQL uses), every label, escapes undone,
a timestamp ignored, and a line that is no sample named. The server tests read a real endpoint. Also
where the watchdog's notes go (the launcher's log, and the server log unless that is a stream)."""

import re

import pytest

from serve import TritonServer
from serve.launcher import LOG_STREAMS
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


@pytest.mark.parametrize("stream", sorted(LOG_STREAMS))
def test_the_watchdogs_note_is_appended_to_a_log_file_and_not_again_to_a_stream(stream, tmp_path, capfd, caplog):
    """Where an operator looks first: the server log gets the note; /dev/stdout or /dev/stderr (a container's
    log) already carries the launcher's own line, and one appended through a reopened stream would be
    overwritten by Triton's next line."""
    log_file = tmp_path / "tritonserver.log"
    TritonServer(tmp_path, log_file=log_file)._note("the stub of ct_explain_0 died: reloading ct_explain")
    TritonServer(tmp_path, log_file=stream)._note("the stub of ct_localize_0 died: reloading ct_localize")
    written = log_file.read_text()
    assert re.fullmatch(
        r"W \d{4}-\d\d-\d\d \d\d:\d\d:\d\d ct-triage watchdog: the stub of ct_explain_0 died: reloading ct_explain\n", written
    )
    captured = capfd.readouterr()
    assert "ct-triage watchdog" not in captured.out + captured.err
    assert [record.getMessage() for record in caplog.records] == [
        "watchdog: the stub of ct_explain_0 died: reloading ct_explain",
        "watchdog: the stub of ct_localize_0 died: reloading ct_localize",
    ]
