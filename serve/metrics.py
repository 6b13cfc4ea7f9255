"""A running server's Prometheus metrics endpoint, read back: Triton's `nv_*` and the service's own
`ct_triage_*` (settings.METRICS), for deploy/verify.py and the tests.

The samples keep the names the endpoint shows, which PromQL queries use: prometheus_client's parser
would rename Triton's counters to OpenMetrics names (`nv_inference_request_success_total`).
"""

from __future__ import annotations

import re
import urllib.request

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# name{label="value",...} value [timestamp], as Triton (prometheus-cpp) writes it
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(url: str, timeout_s: float = 10.0) -> Samples:
    """Every sample at `url` (http://HOST:PORT/metrics) as {(name, sorted label pairs): value}; a
    histogram's are its `_bucket`, `_count` and `_sum`. ValueError names a line that is no sample."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode()
    return parse(text)


def parse(text: str) -> Samples:
    """The samples of Prometheus text exposition format (comments and blank lines skipped)."""
    samples: Samples = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        matched = _SAMPLE.match(line.strip())
        if matched is None:
            raise ValueError(f"not a Prometheus sample: {line[:120]!r}")
        name, labels, value = matched.groups()
        pairs = tuple(sorted((key, _unescape(raw)) for key, raw in _LABEL.findall(labels or "")))
        samples[(name, pairs)] = float(value)
    return samples


def _unescape(value: str) -> str:
    """A label value as written, its escapes (\\\\, \\", \\n) undone."""
    return re.sub(r"\\(.)", lambda escaped: "\n" if escaped[1] == "n" else escaped[1], value)
