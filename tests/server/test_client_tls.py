"""The clients over TLS, as a site deploys them: a TLS-terminating proxy in front of Triton's plain HTTP
and gRPC ports (serve/README.md, "TLS in front of Triton"; here a small asyncio proxy in front of the
shared server, with a private test CA from trustme, instead of nginx). Over https:// every client
answers as over the plain ports; a certificate that does not verify is one line, at once, never
retried; a proxy that asks for client certificates (mutual TLS) answers a client that presents one.
Refusals that need no server are in tests/library/test_client_tls_offline.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from helpers import run_module

import client
from client.cli import main as client_main
from preprocess import phantom
from settings import OPERATING_POINT


class TLSProxy:
    """TLS in front of a plain TCP port, as nginx's `listen 443 ssl` (HTTP/1.1, ALPN http/1.1) and
    `listen 8443 ssl; http2 on` (gRPC: ALPN h2, which gRPC clients require) do; bytes pass unchanged.
    With `client_ca`, only clients presenting a certificate it signed get through (`ssl_verify_client on`)."""

    def __init__(self, backend_port: int, certificate: trustme.LeafCert, alpn: str, client_ca: trustme.CA | None = None):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        certificate.configure_cert(context)
        context.set_alpn_protocols([alpn])
        if client_ca is not None:
            client_ca.configure_trust(context)
            context.verify_mode = ssl.CERT_REQUIRED
        self._backend_port = backend_port
        self._connections: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(lambda loop, context: None)  # refused handshakes are what some tests want
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-proxy", daemon=True)
        self._thread.start()
        self._server = self._run(asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context))
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            backend_reader, backend_writer = await asyncio.open_connection("127.0.0.1", self._backend_port)
        except OSError:
            writer.close()
            return
        self._connections |= {writer, backend_writer}
        await asyncio.gather(self._pipe(reader, backend_writer), self._pipe(backend_reader, writer))
        self._connections -= {writer, backend_writer}

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def close(self) -> None:
        async def stop():
            self._server.close()
            for writer in list(self._connections):
                writer.close()
            await self._server.wait_closed()

        self._run(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@dataclass(frozen=True)
class Site:
    """A TLS proxy pair in front of the shared server, and the CA files a client may be given."""

    urls: dict[str, str]  # protocol -> https URL of its proxy
    ca_file: Path  # the CA that signed the proxies' certificate
    other_ca_file: Path  # a CA that did not


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    other.cert_pem.write_to_path(str(folder / "other-ca.pem"))
    reader = ca.issue_cert("reader@example.org")  # a client certificate, as a site's own CA issues them
    reader.cert_chain_pems[0].write_to_path(str(folder / "client.crt"))
    reader.private_key_pem.write_to_path(str(folder / "client.key"))
    return {
        "client_cert": (folder / "client.crt", folder / "client.key"),
        "ca": ca,
        "ca_file": folder / "ca.pem",
        "other_ca_file": folder / "other-ca.pem",
        "server": ca.issue_cert("127.0.0.1", "localhost"),
        "wrong_name": ca.issue_cert("ct-triage.example.org"),  # the right CA, another host's name
    }


def _site(server, pki, certificate, client_ca=None):
    """The server's plain ports behind TLS proxies presenting `certificate`, for a fixture to yield from."""
    proxies = {
        "http": TLSProxy(server.http_port, certificate, "http/1.1", client_ca),
        "grpc": TLSProxy(server.grpc_port, certificate, "h2", client_ca),
    }
    try:
        yield Site({protocol: proxy.url for protocol, proxy in proxies.items()}, pki["ca_file"], pki["other_ca_file"])
    finally:
        for proxy in proxies.values():
            proxy.close()


@pytest.fixture(scope="module")
def site(shared_server, pki):
    """The shared server behind TLS with a certificate for 127.0.0.1 and localhost."""
    yield from _site(shared_server, pki, pki["server"])


@pytest.fixture(scope="module")
def misnamed_site(shared_server, pki):
    """The same behind a certificate of the right CA for another host name."""
    yield from _site(shared_server, pki, pki["wrong_name"])


@pytest.fixture(scope="module")
def mutual_site(shared_server, pki):
    """The shared server behind TLS that lets through only clients with a certificate of the site's CA."""
    yield from _site(shared_server, pki, pki["server"], client_ca=pki["ca"])


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return phantom.write_study(tmp_path_factory.mktemp("study") / "study.zip", form="zip")


@pytest.fixture(scope="module")
def plain_probability(shared_server, study) -> float:
    with client.TriageClient(shared_server.grpc_url, "grpc") as triage:
        result = triage.classify(study)
    assert result.ok, result.error
    return result.probability_of_pathology


def _classify_sync(url, protocol, study, **options) -> client.TriageResult:
    with client.TriageClient(url, protocol, **options) as triage:
        triage.check_ready()
        return triage.classify(study)


def _classify_async(url, protocol, study, **options) -> client.TriageResult:
    async def run():
        async with client.AsyncTriageClient(url, protocol, **options) as triage:
            await triage.check_ready()
            return await triage.classify(study)

    return asyncio.run(run())


CLIENTS = pytest.mark.parametrize("classify", [_classify_sync, _classify_async], ids=["blocking", "asyncio"])
PROTOCOLS = pytest.mark.parametrize("protocol", ["http", "grpc"])


@CLIENTS
@PROTOCOLS
def test_https_answers_as_the_plain_port(triton_server, site, study, plain_probability, classify, protocol):
    result = classify(site.urls[protocol], protocol, study, ca_file=site.ca_file)
    assert result.ok, result.error
    assert result.probability_of_pathology == plain_probability


def _untrusted(site, misnamed_site) -> dict:
    """(URL, CA file) of each way a certificate fails to verify, and the reason it must name."""
    return {
        "a CA that did not sign it": (site, site.other_ca_file, "unable to get local issuer certificate"),
        "the library's default roots": (site, None, "unable to get local issuer certificate"),
        "another host's certificate": (misnamed_site, site.ca_file, "not valid for"),
    }


@CLIENTS
@PROTOCOLS
def test_a_certificate_that_does_not_verify_is_one_line_at_once(triton_server, site, misnamed_site, study, classify, protocol):
    """check_ready's ServerUnavailable, and a Failure row without check_ready; no retries (the default
    policy would wait 7.5 s between them), the outcome in well under a second."""
    for case, (where, ca_file, reason) in _untrusted(site, misnamed_site).items():
        url = where.urls[protocol]
        started = time.monotonic()
        with pytest.raises(client.ServerUnavailable) as unavailable:
            classify(url, protocol, study, ca_file=ca_file)
        line = str(unavailable.value)
        assert f"at {url} ({protocol})" in line and "TLS: certificate verify failed" in line and reason in line, (case, line)
        assert "\n" not in line
        if classify is _classify_sync:
            with client.TriageClient(url, protocol, ca_file=ca_file) as triage:
                result = triage.classify(study)
        else:
            result = asyncio.run(_classify_unchecked(url, protocol, study, ca_file))
        assert result.processing_status == client.FAILURE
        assert result.error.startswith(f"server at {url} is not trusted (TLS: certificate verify failed"), (case, result.error)
        assert reason in result.error and "\n" not in result.error
        assert time.monotonic() - started < 3.0, case


async def _classify_unchecked(url, protocol, study, ca_file) -> client.TriageResult:
    async with client.AsyncTriageClient(url, protocol, ca_file=ca_file) as triage:
        return await triage.classify(study)


def test_set_threshold_over_https(triton_server, site, study):
    """On the shared server, set back in `finally` over its plain port: a threshold left changed
    would skew every later test's answer."""
    try:
        config = client.set_threshold(site.urls["http"], 1.0, ca_file=site.ca_file)
        assert config["parameters"]["threshold"]["string_value"] == "1.0"
        strict = _classify_sync(site.urls["grpc"], "grpc", study, ca_file=site.ca_file)
        assert strict.ok and strict.meta["threshold"] == 1.0 and strict.pathology == 0
    finally:
        client.set_threshold(triton_server.http_url, OPERATING_POINT.threshold)
    with client.TriageClient(triton_server.grpc_url, "grpc") as triage:
        assert triage.classify(study).meta["threshold"] == OPERATING_POINT.threshold


def test_set_threshold_cli_refuses_an_untrusted_server_in_one_line(triton_server, site, capsys):
    code = client_main(["set-threshold", "1", "--url", site.urls["http"], "--ca-file", str(site.other_ca_file)])
    stderr = capsys.readouterr().err
    assert code == 3
    reason = "certificate verify failed: unable to get local issuer certificate"
    assert stderr == f"error: the server at {site.urls['http']} is not trusted (TLS: {reason})\n"


def test_classify_cli_with_a_ca_file(triton_server, site, study, plain_probability):
    """The real command: the answer of the plain port; with another CA, exit 3 and its one line alone
    on stderr (gRPC's core would add its own line about the failed handshake)."""
    url = site.urls["grpc"]
    done = run_module("client", "classify", str(study), "--url", url, "--ca-file", str(site.ca_file), timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["probability_of_pathology"] == plain_probability
    refused = run_module("client", "classify", str(study), "--url", url, "--ca-file", str(site.other_ca_file), timeout=120)
    assert refused.returncode == 3
    reason = "TLS: certificate verify failed: unable to get local issuer certificate"
    assert refused.stderr == f"error: Triton server at {url} (grpc) is not usable: {reason}\n"


@CLIENTS
@PROTOCOLS
def test_a_client_certificate_gets_through_a_proxy_that_asks_for_one(
    triton_server, mutual_site, pki, study, plain_probability, classify, protocol
):
    """Without one this proxy closes the connection after the handshake and sends no alert (asyncio's
    TLS does not), so nothing names the reason and it reads as a server gone (client/README.md, TLS;
    refusals that name themselves: tests/library/test_client_tls_offline.py)."""
    url = mutual_site.urls[protocol]
    result = classify(url, protocol, study, ca_file=mutual_site.ca_file, client_cert=pki["client_cert"])
    assert result.ok, result.error
    assert result.probability_of_pathology == plain_probability
    with pytest.raises(client.ServerUnavailable) as refused:
        classify(url, protocol, study, ca_file=mutual_site.ca_file, retry=client.RetryPolicy(attempts=1))
    assert str(refused.value).startswith(f"Triton server at {url} ({protocol}) is not usable: "), refused.value


def test_the_commands_present_a_client_certificate(triton_server, mutual_site, pki, study, plain_probability):
    """classify over HTTP, and set-threshold (set back in `finally` over the plain port)."""
    url = mutual_site.urls["http"]
    tls = ["--url", url, "--ca-file", str(mutual_site.ca_file), "--client-cert", str(pki["client_cert"][0])]
    tls += ["--client-key", str(pki["client_cert"][1])]
    done = run_module("client", "classify", str(study), "--protocol", "http", *tls, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["probability_of_pathology"] == plain_probability
    try:
        assert client_main(["set-threshold", "0.75", *tls]) == 0
        with client.TriageClient(triton_server.grpc_url, "grpc") as triage:
            assert triage.classify(study).meta["threshold"] == 0.75
    finally:
        client.set_threshold(triton_server.http_url, OPERATING_POINT.threshold)
