"""The client's TLS settings, no server: which URL asks for TLS and on which port, and the refusals,
at construction, of what would otherwise go out in clear (another scheme, a CA file or a client
certificate without https://) or fail deep inside gevent or gRPC (a CA file, a client certificate or
key that cannot be used; an encrypted key, whose passphrase they would ask for on the terminal). tests/server/test_client_tls.py
sends real requests through a TLS proxy; here, proxies that refuse a client without a certificate
answer without one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import ssl
import threading
import time

import pytest
import trustme
from helpers import answering

import client
from client.cli import main as client_main
from client.tls import CAFileError, ClientCertificateError


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="module")
def client_files(tmp_path_factory):
    """A client certificate and key, a key of another certificate, and the right key encrypted."""
    from cryptography.hazmat.primitives import serialization  # trustme's own dependency

    folder = tmp_path_factory.mktemp("client-certificate")
    ca = trustme.CA()
    mine, other = ca.issue_cert("reader@example.org"), ca.issue_cert("someone-else@example.org")
    mine.cert_chain_pems[0].write_to_path(str(folder / "client.crt"))
    mine.private_key_pem.write_to_path(str(folder / "client.key"))
    other.private_key_pem.write_to_path(str(folder / "other.key"))
    key = serialization.load_pem_private_key(mine.private_key_pem.bytes(), password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"a passphrase")
    )
    (folder / "encrypted.key").write_bytes(encrypted)
    return {name: folder / name for name in ("client.crt", "client.key", "other.key", "encrypted.key")}


def _sync(url, protocol, **options):
    with client.TriageClient(url, protocol, **options) as triage:
        return triage.endpoint, triage.url


def _async(url, protocol, **options):
    async def build():
        async with client.AsyncTriageClient(url, protocol, **options) as triage:
            return triage.endpoint, triage.url

    return asyncio.run(build())


CLIENTS = pytest.mark.parametrize("make", [_sync, _async], ids=["blocking", "asyncio"])
PROTOCOLS = pytest.mark.parametrize("protocol", ["http", "grpc"])


@CLIENTS
@PROTOCOLS
@pytest.mark.parametrize(
    ("url", "address", "tls", "shown"),
    [
        ("https://ct-triage.example.org", "ct-triage.example.org:443", True, "https://ct-triage.example.org:443"),
        ("https://ct-triage.example.org:8443", "ct-triage.example.org:8443", True, "https://ct-triage.example.org:8443"),
        ("HTTPS://[::1]", "[::1]:443", True, "https://[::1]:443"),
        ("http://localhost:8000", "localhost:8000", False, "localhost:8000"),
        ("localhost:8001", "localhost:8001", False, "localhost:8001"),
    ],
)
def test_https_is_tls_on_port_443_unless_named_and_the_rest_stays_plain(make, protocol, url, address, tls, shown):
    endpoint, url_shown = make(url, protocol)
    assert (endpoint.address, endpoint.tls, endpoint.ca_file) == (address, tls, None)
    assert url_shown == shown


@CLIENTS
@PROTOCOLS
@pytest.mark.parametrize("url", ["grpc://localhost:8001", "ftp://localhost:8000", "unix:///run/triton.sock"])
def test_another_scheme_is_refused_at_construction_naming_it(make, protocol, url):
    scheme = url.partition("://")[0]
    with pytest.raises(ValueError, match=f"URL scheme '{scheme}' is not supported"):
        make(url, protocol)


@CLIENTS
@PROTOCOLS
@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("https://ct-triage.example.org:https", "port 'https' in URL"),
        ("localhost:99999", "port '99999' in URL"),
        ("http://localhost:0", "port '0' in URL"),
        ("https://:8443", "no host in URL"),
        ("[::1]:-1", "port '-1' in URL"),
        ("https://ct-triage.example.org:\uff18\uff14\uff14\uff13", "in URL"),  # full-width digits: no port number
        ("https://[::1]x:8443", "'[::1]x:8443' in URL 'https://[::1]x:8443' is not HOST[:PORT]"),  # once read as [::1]:443
        ("https://[::1", "is not HOST[:PORT]"),
        ("https://[]:8443", "is not HOST[:PORT]"),
        ("https://[not-an-address]:8443", "is not HOST[:PORT]"),
        ("https://user:secret@ct-triage.example.org:8443", "is not HOST[:PORT]"),
        ("https://::1", "no host in URL"),
    ],
)
def test_a_url_without_a_host_or_with_a_bad_port_is_refused_at_construction(make, protocol, url, says):
    """Not left to tritonclient, which would take it and fail every request with the resolver's message."""
    with pytest.raises(ValueError, match=re.escape(says)):
        make(url, protocol)


@CLIENTS
def test_a_grpc_url_with_a_path_is_refused_and_an_http_one_keeps_it(make):
    """gRPC has no base path (its resolver would fail each request); HTTP keeps one, as behind a proxy's prefix."""
    with pytest.raises(ValueError, match=re.escape("a gRPC URL has no path: 'https://ct-triage.example.org/triton'")):
        make("https://ct-triage.example.org/triton", "grpc")
    endpoint, _ = make("https://ct-triage.example.org/triton", "http")
    assert endpoint.address == "ct-triage.example.org:443/triton"


@CLIENTS
@PROTOCOLS
@pytest.mark.parametrize("url", ["localhost:8001", "http://localhost:8000"])
def test_a_ca_file_without_https_is_refused(make, protocol, url, ca_file):
    """A CA file says the user expects TLS: a plain connection would silently not use it."""
    with pytest.raises(ValueError, match="only an https:// URL"):
        make(url, protocol, ca_file=ca_file)


@CLIENTS
@PROTOCOLS
def test_a_ca_file_with_https_is_taken(make, protocol, ca_file):
    endpoint, _ = make("https://ct-triage.example.org", protocol, ca_file=ca_file)
    assert (endpoint.tls, endpoint.ca_file) == (True, str(ca_file))


@CLIENTS
@PROTOCOLS
def test_a_client_certificate_with_https_is_taken_and_without_it_refused(make, protocol, client_files):
    pair = (client_files["client.crt"], client_files["client.key"])
    endpoint, _ = make("https://ct-triage.example.org", protocol, client_cert=pair)
    assert endpoint.client_cert == tuple(str(path) for path in pair)
    with pytest.raises(ValueError, match="a client certificate is for TLS, which only an https:// URL asks for"):
        make("localhost:8001", protocol, client_cert=pair)


@CLIENTS
@PROTOCOLS
def test_an_unusable_client_certificate_is_one_typed_line_at_construction(make, protocol, client_files, tmp_path):
    certificate, key = client_files["client.crt"], client_files["client.key"]
    cases = {
        (certificate, client_files["other.key"]): "cannot be used (the key is not the certificate's)",
        (certificate, client_files["encrypted.key"]): "cannot be used (the key is encrypted: give it decrypted)",
        (key, key): "cannot be used (not a PEM certificate and its PEM key)",
        (certificate, tmp_path / "missing.key"): "cannot be read: No such file or directory",
        (tmp_path, key): "is not a regular file",
    }
    for pair, says in cases.items():
        with pytest.raises(ClientCertificateError) as refused:
            make("https://ct-triage.example.org", protocol, client_cert=pair)
        assert str(refused.value).startswith("client certificate ") and says in str(refused.value), (pair, refused.value)
        assert "\n" not in str(refused.value)


def _unusable_ca_files(tmp_path):
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("not a certificate\n")
    fifo = tmp_path / "ca.fifo"  # reading it would block for ever
    if not fifo.exists():
        os.mkfifo(fifo)
    return {
        tmp_path / "missing.pem": "cannot be read: No such file or directory",
        tmp_path: "is not a regular file",
        fifo: "is not a regular file",
        not_pem: "holds no PEM certificate",
    }


@CLIENTS
@PROTOCOLS
def test_an_unusable_ca_file_is_one_typed_line_at_construction(make, protocol, tmp_path):
    for path, says in _unusable_ca_files(tmp_path).items():
        with pytest.raises(CAFileError) as refused:
            make("https://ct-triage.example.org", protocol, ca_file=path)
        assert str(refused.value) == f"CA file {path} {says}" or str(refused.value).startswith(f"CA file {path} {says} (")
        assert "\n" not in str(refused.value)


def test_set_threshold_refuses_the_same_before_sending_anything(tmp_path, ca_file, client_files):
    """Nothing listens on these ports: each refusal comes before any connection (and any key)."""
    with pytest.raises(ValueError, match="URL scheme 'ftp' is not supported"):
        client.set_threshold("ftp://127.0.0.1:9", 0.3, admin_key="a-key-for-the-test")
    with pytest.raises(ValueError, match="only an https:// URL"):
        client.set_threshold("127.0.0.1:9", 0.3, ca_file=ca_file)
    with pytest.raises(CAFileError, match="cannot be read"):
        client.set_threshold("https://127.0.0.1:9", 0.3, ca_file=tmp_path / "missing.pem")
    with pytest.raises(ClientCertificateError, match="the key is encrypted"):
        client.set_threshold("https://127.0.0.1:9", 0.3, client_cert=(client_files["client.crt"], client_files["encrypted.key"]))


def test_the_admin_key_never_crosses_a_network_in_clear(monkeypatch, capsys):
    """Plain http to another host would carry the key readable on every hop: refused before any
    connection (these names do not resolve: a connection would fail otherwise, not be refused).
    Loopback URLs (a port-forward, an SSH tunnel) and https:// ones are where it may go."""
    refusal = "the admin key is not sent in clear to ct-triage.invalid:8000: use https://"
    for url in ("ct-triage.invalid:8000", "http://ct-triage.invalid:8000"):
        with pytest.raises(client.KeyInClearError, match=re.escape(refusal)):
            client.set_threshold(url, 0.3, admin_key="a-key-for-the-test")
    monkeypatch.setenv("CT_TRIAGE_ADMIN_KEY", "a-key-for-the-test")
    assert client_main(["set-threshold", "0.3", "--url", "ct-triage.invalid:8000"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {refusal}") and error.count("\n") == 1 and "a-key-for-the-test" not in error
    # where it may go, the request is made: nothing listens on port 9, so the server is not reachable
    for url in ("localhost:9", "127.0.0.1:9", "[::1]:9", "https://127.0.0.1:9"):
        with pytest.raises(OSError):
            client.set_threshold(url, 0.3, admin_key="a-key-for-the-test")
    with pytest.raises(OSError):  # an open server (no key): nothing secret to keep
        client.set_threshold("ct-triage.invalid:8000", 0.3)


@pytest.mark.parametrize("command", [["classify", "study.zip"], ["report", ".", "--out", "report.xlsx"], ["set-threshold", "0.3"]])
def test_the_cli_says_each_refusal_in_one_line_with_exit_2(tmp_path, capsys, monkeypatch, ca_file, client_files, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "study.zip").write_bytes(b"PK\x03\x04")  # never read: the URL is refused first
    certificate, key = ("--client-cert", str(client_files["client.crt"])), ("--client-key", str(client_files["client.key"]))
    cases = {
        ("--url", "ftp://127.0.0.1:9"): "URL scheme 'ftp' is not supported",
        ("--url", "127.0.0.1:9", "--ca-file", str(ca_file)): "only an https:// URL",
        ("--url", "https://127.0.0.1:9", "--ca-file", str(tmp_path / "missing.pem")): "cannot be read: No such file or directory",
        ("--url", "https://127.0.0.1:9", *certificate): "--client-cert and --client-key go together",
        ("--url", "https://127.0.0.1:9", *key): "--client-cert and --client-key go together",
        ("--url", "127.0.0.1:9", *certificate, *key): "a client certificate is for TLS",
        ("--url", "https://127.0.0.1:9", *certificate, "--client-key", str(client_files["encrypted.key"])): "the key is encrypted",
    }
    for options, says in cases.items():
        assert client_main([*command, *options]) == 2, options
        stderr = capsys.readouterr().err
        assert stderr.startswith("error: ") and says in stderr and stderr.count("\n") == 1, stderr
    assert not (tmp_path / "report.xlsx").exists()  # refused before the run


@pytest.fixture(scope="module")
def plain_port():
    """A port that answers in plain text, as Triton's own ports do: what an https:// URL names by mistake."""
    url, listener = answering(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")  # to the TLS ClientHello
    yield int(url.rsplit(":", 1)[1])
    listener.close()


@CLIENTS
@PROTOCOLS
def test_an_https_url_naming_a_plain_port_is_one_line_and_never_retried(make, protocol, plain_port):
    """OpenSSL's WRONG_VERSION_NUMBER cannot pass with time: a Failure row at the first answer (a retry
    would wait 30 s first), naming the likely mistake."""
    url = f"https://127.0.0.1:{plain_port}"
    retry = client.RetryPolicy(attempts=2, initial_backoff_s=30.0)
    if make is _sync:
        with client.TriageClient(url, protocol, retry=retry, timeout_s=20) as triage:
            result = triage.classify(b"DICM")
    else:

        async def classify():
            async with client.AsyncTriageClient(url, protocol, retry=retry, timeout_s=20) as triage:
                return await triage.classify(b"DICM")

        result = asyncio.run(classify())
    plain = "it answered the TLS handshake in plain text (WRONG_VERSION_NUMBER): is that the plain port?"
    assert result.error == f"server at {url} does not speak TLS: {plain}"
    assert result.time_of_processing < 30


def test_set_threshold_to_a_plain_port_over_https_exits_3_in_one_line(plain_port, capsys):
    url = f"https://127.0.0.1:{plain_port}"
    assert client_main(["set-threshold", "0.3", "--url", url]) == 3
    plain = "it answered the TLS handshake in plain text (WRONG_VERSION_NUMBER): is that the plain port?"
    assert capsys.readouterr().err == f"error: the server at {url} does not speak TLS: {plain}\n"


@pytest.mark.parametrize(
    "reply",
    [
        b"\x00\x00\x12\x04\x00\x00\x00\x00\x00\x00\x03\x7f\xff\xff\xff",  # Triton's gRPC port: HTTP/2, not HTTP/1.1
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",  # no JSON: a port that is not Triton's HTTP API (metrics)
    ],
    ids=["grpc-port", "no-json"],
)
def test_set_threshold_at_a_port_that_is_not_tritons_http_api_is_one_line_and_exit_3(reply, capsys):
    url, listener = answering(reply)
    try:
        assert client_main(["set-threshold", "0.3", "--url", url]) == 3
    finally:
        listener.close()
    error = capsys.readouterr().err
    assert error == f"error: the server at {url} did not answer as Triton's HTTP API: is that its HTTP port?\n"


# nginx's answer, after the handshake, to a client without a certificate when `ssl_verify_client on`
_NGINX_NO_CERTIFICATE = (
    b"<html>\r\n<head><title>400 No required SSL certificate was sent</title></head>\r\n<body>\r\n"
    b"<center><h1>400 Bad Request</h1></center>\r\n<center>No required SSL certificate was sent</center>\r\n"
    b"<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


@pytest.fixture(scope="module")
def site_ca(tmp_path_factory):
    """A CA, its PEM file, and a server certificate it signed for 127.0.0.1."""
    ca = trustme.CA()
    path = tmp_path_factory.mktemp("site") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return ca, path, ca.issue_cert("127.0.0.1")


@contextlib.contextmanager
def _refusing_proxy(site_ca, refusal: str):
    """https URL of a proxy that asks for a client certificate and refuses a client without one:
    "alert" as OpenSSL-based proxies do (TLS 1.2 here: the handshake_failure alert comes in the
    handshake, where TLS 1.3's certificate_required comes after it and races the client's first
    request), "nginx" as nginx does (the handshake completes, each request gets its 400 page)."""
    ca, _, certificate = site_ca
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate.configure_cert(context)
    context.set_alpn_protocols(["h2", "http/1.1"])
    if refusal == "alert":
        ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    reply = b"HTTP/1.1 400 Bad Request\r\nServer: nginx\r\nContent-Type: text/html\r\nConnection: close\r\n"
    reply += b"Content-Length: %d\r\n\r\n%s" % (len(_NGINX_NO_CERTIFICATE), _NGINX_NO_CERTIFICATE)

    def answer(connection: socket.socket) -> None:
        with contextlib.suppress(OSError), context.wrap_socket(connection, server_side=True) as tls:
            tls.recv(65536)
            tls.sendall(reply)

    def accept_each() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # the listener closed: the test is over
                return
            threading.Thread(target=answer, args=(connection,), daemon=True).start()

    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=accept_each, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def _checked_and_classified(make, url, protocol, ca_file):
    """check_ready's ServerUnavailable line, and the Failure row of classify without it (a retry would wait 30 s)."""
    options = {"ca_file": ca_file, "timeout_s": 20, "retry": client.RetryPolicy(attempts=2, initial_backoff_s=30.0)}
    if make is _sync:
        with client.TriageClient(url, protocol, **options) as triage:
            with pytest.raises(client.ServerUnavailable) as unusable:
                triage.check_ready()
            return str(unusable.value), triage.classify(b"DICM")

    async def run():
        async with client.AsyncTriageClient(url, protocol, **options) as triage:
            with pytest.raises(client.ServerUnavailable) as unusable:
                await triage.check_ready()
            return str(unusable.value), await triage.classify(b"DICM")

    return asyncio.run(run())


@CLIENTS
@pytest.mark.parametrize(
    ("refusal", "protocol", "named"),
    [
        ("alert", "http", "SSLV3_ALERT_HANDSHAKE_FAILURE"),
        ("alert", "grpc", "SSLV3_ALERT_HANDSHAKE_FAILURE"),
        ("nginx", "http", "HTTP 400: No required SSL certificate was sent"),
    ],
)
def test_a_proxy_that_refuses_a_client_without_a_certificate_is_named_and_never_retried(make, refusal, protocol, named, site_ca):
    """Not a server gone (retried, then "unreachable"), nor another port (nginx's page is no Triton
    answer): the refusal and what to pass, in one line, at the first answer."""
    hint = "a proxy that asks for client certificates takes one its CA signed: --client-cert FILE --client-key FILE"
    with _refusing_proxy(site_ca, refusal) as url:
        started = time.monotonic()
        line, result = _checked_and_classified(make, url, protocol, site_ca[1])
    assert line == f"Triton server at {url} ({protocol}) is not usable: TLS: the server refused the connection ({named}): {hint}"
    assert result.error == f"server at {url} refused the TLS connection ({named}): {hint}"
    assert time.monotonic() - started < 20


def test_the_commands_name_a_proxy_that_refuses_a_client_without_a_certificate(site_ca, tmp_path, capsys):
    """report (exit 3 before any study, no report) and set-threshold (exit 3), one line each."""
    (tmp_path / "studies" / "s1").mkdir(parents=True)
    (tmp_path / "studies" / "s1" / "IM1.dcm").write_bytes(bytes(128) + b"DICM")
    hint = "a proxy that asks for client certificates takes one its CA signed: --client-cert FILE --client-key FILE"
    ca_file = str(site_ca[1])
    with _refusing_proxy(site_ca, "alert") as url:
        report = ["report", str(tmp_path / "studies"), "--out", str(tmp_path / "r.csv"), "--url", url, "--ca-file", ca_file]
        assert client_main(report) == 3
        reason = "TLS: the server refused the connection (SSLV3_ALERT_HANDSHAKE_FAILURE)"
        assert capsys.readouterr().err == f"error: Triton server at {url} (grpc) is not usable: {reason}: {hint}\n"
    assert not (tmp_path / "r.csv").exists()
    with _refusing_proxy(site_ca, "nginx") as url:
        assert client_main(["set-threshold", "0.3", "--url", url, "--ca-file", ca_file]) == 3
        refusal = "HTTP 400: No required SSL certificate was sent"
        assert capsys.readouterr().err == f"error: the server at {url} refused the TLS connection ({refusal}): {hint}\n"
