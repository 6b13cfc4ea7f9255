"""Change a running server's operating point without re-export (Triton's model load API).

The override lives in the server only: it is lost on restart. To make it permanent, edit the
`threshold` parameter of the repository's ct_postprocess/config.pbtxt (serve/README.md).
"""

from __future__ import annotations

import json

import tritonclient.http as triton_http

from contract import parse_threshold
from settings import NAMES

from .triage import _strip_scheme


def set_threshold(http_url: str, threshold: float) -> dict:
    """Reload ct_postprocess with `threshold`; returns the config now in force.

    The load API replaces the whole config, so the running one is read, changed in one field
    and sent back. ct_triage keeps serving: Triton swaps the composing model in place.
    """
    value = parse_threshold(threshold)
    client = triton_http.InferenceServerClient(_strip_scheme(http_url))
    try:
        config = client.get_model_config(NAMES.postprocess)
        config.setdefault("parameters", {})["threshold"] = {"string_value": repr(value)}
        client.load_model(NAMES.postprocess, config=json.dumps(config))
        return client.get_model_config(NAMES.postprocess)
    finally:
        client.close()
