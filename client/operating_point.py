"""Change a running server's operating point without re-export (Triton's model load API).

The override lives in the server only: it is lost on restart. To make it permanent, edit the
`threshold` parameter of the repository's ct_postprocess/config.pbtxt (serve/README.md).
A server started with an admin key (CT_TRIAGE_ADMIN_KEY) accepts the load only with that key, which
goes only to a server on this host (a port-forward or SSH tunnel ends there) or over TLS (an
https:// URL), never in clear across a network.
"""

from __future__ import annotations

import json

import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from contract import parse_threshold
from settings import ADMIN, NAMES, SERVING

from .tls import PathLike, endpoint
from .triage import checked_timeout, http_timeouts


class KeyInClearError(ValueError):
    """The admin key would cross a network in clear: plain http to another host."""


_FORBIDDEN = "403"  # what Triton answers over HTTP when a restricted API is called without the right key


def set_threshold(
    http_url: str,
    threshold: float,
    *,
    admin_key: str | None = None,
    ca_file: PathLike | None = None,
    client_cert: tuple[PathLike, PathLike] | None = None,
    timeout_s: float = SERVING.request_timeout_s,
) -> dict:
    """Reload ct_postprocess with `threshold`; returns the config now in force.

    The load API replaces the whole config, so the running one is read, changed in one field
    and sent back. ct_triage keeps serving: Triton swaps the composing model in place.
    Raises PermissionError when the server refuses the load for want of the right admin key, and
    KeyInClearError before sending anything when the key would cross a network in clear (plain http
    to another host); a port that is not Triton's HTTP one gives http.client.HTTPException or a
    ValueError of the JSON parser. `http_url` `https://HOST[:PORT]` is TLS, verified against `ca_file`, presenting
    `client_cert` where the server asks for one (client.tls). `timeout_s` bounds each request, as the
    classify client's does: a server that accepts the connection and never answers is TimeoutError.
    """
    value = parse_threshold(threshold)
    seconds = checked_timeout(timeout_s)
    ADMIN.checked_key(admin_key)  # names the rule; an unsendable header's own error would quote the key
    server = endpoint(http_url, ca_file, client_cert=client_cert)
    if admin_key is not None and not server.tls and not server.on_this_host:
        raise KeyInClearError(
            f"the admin key is not sent in clear to {server.address}: use https:// (TLS in front of Triton), "
            "or reach the server through localhost (kubectl port-forward, an SSH tunnel)"
        )
    client = triton_http.InferenceServerClient(server.address, **http_timeouts(seconds), **server.http_sync_options())
    try:
        config = client.get_model_config(NAMES.postprocess)
        config.setdefault("parameters", {})["threshold"] = {"string_value": repr(value)}
        headers = {ADMIN.header: admin_key} if admin_key is not None else None
        try:
            client.load_model(NAMES.postprocess, headers=headers, config=json.dumps(config))
        except InferenceServerException as error:
            if error.status() != _FORBIDDEN:
                raise
            which = "without the admin key" if admin_key is None else "with this admin key"
            raise PermissionError(f"the server refuses model-repository changes {which} ({ADMIN.key_env})") from None
        return client.get_model_config(NAMES.postprocess)
    finally:
        client.close()
