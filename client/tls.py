"""Which server a URL names, and whether to reach it over TLS: the one rule of the clients and the CLI.

Triton serves HTTP in clear text only, so a site terminates TLS at a reverse proxy in front of it
(serve/README.md, "TLS in front of Triton"). The URL's scheme is the one way to ask for TLS:
`https://HOST[:PORT]` is TLS for both protocols (HTTP/1.1 over TLS; gRPC over TLS, ALPN h2),
`HOST:PORT` or `http://HOST:PORT` plain, and any other scheme is refused rather than guessed at:
a scheme dropped in silence would send studies, and the admin key, in clear.

`ca_file` names a PEM bundle of the CA that signed the proxy's certificate (hospitals use private
CAs). Without it each library verifies against its own default roots (client/README.md, "TLS").
`client_cert`, a (certificate, key) pair of PEM files, is what the client presents to a proxy that
asks for client certificates (mutual TLS, as `ssl_verify_client on` in nginx).
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import stat
from dataclasses import dataclass
from typing import Any, Union

from tritonclient.utils import InferenceServerException

HTTPS_PORT = 443  # `https://HOST` without a port, for HTTP and gRPC alike: where a TLS proxy listens by default
_SCHEMES = ("http", "https")

PathLike = Union[str, "os.PathLike[str]"]


class CAFileError(ValueError):
    """The CA bundle cannot be read, or holds no PEM certificate."""


class ClientCertificateError(ValueError):
    """The client certificate or its key cannot be read, or they do not make a pair."""


@dataclass(frozen=True)
class Endpoint:
    """`address` as tritonclient takes it (HOST:PORT, for HTTP with an optional /base-path), and
    whether to speak TLS to it, trusting `ca_file` (None: the library's default roots)."""

    address: str
    tls: bool = False
    ca_file: str | None = None
    client_cert: tuple[str, str] | None = None  # (certificate, key) PEM files, for mutual TLS

    @property
    def on_this_host(self) -> bool:
        """Whether the address is a loopback one (localhost, 127.0.0.0/8, ::1): plain text to it never
        leaves the machine (a port-forward or SSH tunnel ends there too)."""
        host = _HOST_PORT.match(self.address.partition("/")[0])["host"].strip("[]")
        if host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:  # a host name other than localhost
            return False

    @property
    def url(self) -> str:
        """How messages name the server: with `https://` when the connection is TLS."""
        return f"https://{self.address}" if self.tls else self.address

    def http_sync_options(self) -> dict[str, Any]:
        """tritonclient.http (geventhttpclient): hostname checked, CERT_REQUIRED."""
        if not self.tls:
            return {}
        options = {"ca_certs": self.ca_file} if self.ca_file else {}
        if self.client_cert:
            options.update(zip(("certfile", "keyfile"), self.client_cert))
        return {"ssl": True, "ssl_options": options or None}

    def http_aio_options(self) -> dict[str, Any]:
        """tritonclient.http.aio (aiohttp): a verifying context; None is aiohttp's own default one."""
        if not self.tls:
            return {}
        if not (self.ca_file or self.client_cert):
            return {"ssl": True, "ssl_context": None}
        context = ssl.create_default_context(cafile=self.ca_file)  # cafile None: the default roots, as aiohttp's own
        if self.client_cert:
            context.load_cert_chain(*self.client_cert)
        return {"ssl": True, "ssl_context": context}

    def grpc_options(self) -> dict[str, Any]:
        """tritonclient.grpc and tritonclient.grpc.aio (grpc.ssl_channel_credentials): a path it reads."""
        if not self.tls:
            return {}
        certificate, key = self.client_cert or (None, None)
        return {"ssl": True, "root_certificates": self.ca_file, "certificate_chain": certificate, "private_key": key}


def endpoint(
    url: str, ca_file: PathLike | None = None, protocol: str = "http", client_cert: tuple[PathLike, PathLike] | None = None
) -> Endpoint:
    """The server `url` names. ValueError for a scheme other than http:// or https://, a URL that is
    not [SCHEME://]HOST[:PORT] (a base path only for HTTP), and `ca_file` or `client_cert` without
    https://; CAFileError for a CA bundle, ClientCertificateError for a client certificate and key
    that cannot be used."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    scheme = scheme.lower()
    if scheme and scheme not in _SCHEMES:
        raise ValueError(f"URL scheme {scheme!r} is not supported in {url!r}: https://HOST[:PORT] for TLS, HOST:PORT without")
    host_port, slash, path = rest.partition("/")
    host, port = _host_and_port(host_port, url)
    if slash and protocol == "grpc":
        raise ValueError(f"a gRPC URL has no path: {url!r}")
    tls = scheme == "https"
    if ca_file is not None and not tls:
        raise ValueError(f"a CA file is for TLS, which only an https:// URL asks for, not {url!r}")
    if client_cert is not None and not tls:
        raise ValueError(f"a client certificate is for TLS, which only an https:// URL asks for, not {url!r}")
    if tls and port is None:
        host_port = f"{host}:{HTTPS_PORT}"
    return Endpoint(
        f"{host_port}{slash}{path}",
        tls,
        None if ca_file is None else checked_ca_file(ca_file),
        None if client_cert is None else checked_client_cert(client_cert),
    )


def checked_ca_file(path: PathLike) -> str:
    """`path` as a string, once it loads as a CA bundle: a bad one fails here with one line, not
    inside gevent, aiohttp or gRPC (which reads it only at the first connection)."""
    name = os.fspath(path)
    try:
        if not stat.S_ISREG(os.stat(name).st_mode):  # a FIFO would block the read for ever
            raise CAFileError(f"CA file {name} is not a regular file")
        ssl.create_default_context(cafile=name)
    except ssl.SSLError as error:  # an OSError too: before the OSError branch
        raise CAFileError(f"CA file {name} holds no PEM certificate ({error.reason or error})") from None
    except OSError as error:
        raise CAFileError(f"CA file {name} cannot be read: {error.strerror or type(error).__name__}") from None
    return name


def checked_client_cert(client_cert: tuple[PathLike, PathLike]) -> tuple[str, str]:
    """(certificate, key) as strings, once they load as a pair. An encrypted key is refused: each
    library would ask for its passphrase on the terminal at the first connection, which in a
    service waits for ever."""
    try:
        certificate, key = (os.fspath(name) for name in client_cert)
    except (TypeError, ValueError):
        raise ClientCertificateError(f"a client certificate is a (certificate file, key file) pair, not {client_cert!r}") from None
    for name in (certificate, key):
        try:
            if not stat.S_ISREG(os.stat(name).st_mode):
                raise ClientCertificateError(f"client certificate file {name} is not a regular file")
        except OSError as error:
            raise ClientCertificateError(
                f"client certificate file {name} cannot be read: {error.strerror or type(error).__name__}"
            ) from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(certificate, key, password=_no_passphrase)
    except (ssl.SSLError, _EncryptedKey) as error:
        if isinstance(error, _EncryptedKey):
            reason = "the key is encrypted: give it decrypted"
        elif error.reason == "KEY_VALUES_MISMATCH":
            reason = "the key is not the certificate's"
        else:  # OpenSSL's "PEM lib": no certificate or no key where one was expected
            reason = "not a PEM certificate and its PEM key"
        raise ClientCertificateError(f"client certificate {certificate} with key {key} cannot be used ({reason})") from None
    return certificate, key


class _EncryptedKey(Exception):
    pass


def _no_passphrase() -> bytes:
    """OpenSSL asks for a passphrase only for an encrypted key."""
    raise _EncryptedKey


def _host_and_port(host_port: str, url: str) -> tuple[str, str | None]:
    """HOST and PORT (None when there is none) of HOST[:PORT]; an IPv6 host is in brackets: [::1]:8001.
    Nothing else passes (user info, a stray bracket, a port that is no number from 1 to 65535), so
    the clients never connect somewhere the URL did not say."""
    if not host_port or host_port.startswith(":"):
        raise ValueError(f"no host in URL {url!r}")
    matched = _HOST_PORT.match(host_port)
    if matched is None or (matched["ipv6"] is not None and not _is_ipv6(matched["ipv6"])):
        raise ValueError(f"{host_port!r} in URL {url!r} is not HOST[:PORT] (an IPv6 address in brackets: [::1]:8001)")
    port = matched["port"]
    if port is not None and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"port {port!r} in URL {url!r} is not a number from 1 to 65535")
    return matched["host"], port


# a name or an IPv4 address (no ':', '@', brackets or spaces), or an IPv6 address in brackets; then :PORT
_HOST_PORT = re.compile(r"^(?P<host>\[(?P<ipv6>[^\]]*)\]|[^:@\[\]\s]+)(?::(?P<port>[^:]*))?$")


def _is_ipv6(address: str) -> bool:
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        return False
    return True


# gRPC names a failed verification only in its status text (UNAVAILABLE, as for a server that is down).
_GRPC_VERIFY_FAILED = re.compile(r"CERTIFICATE_VERIFY_FAILED: ([^:]+)")
_GRPC_WRONG_NAME = ("Hostname Verification Check failed", "is not in peer certificate")


def certificate_problem(error: BaseException) -> str | None:
    """What is wrong with the server's certificate when `error` is a failed verification (wrong CA,
    wrong host name), else None. Such an error is an answer, not an outage: resending cannot change it."""
    verification = _verification_error(error)
    if verification is not None:
        detail = (verification.verify_message or str(verification)).rstrip(".")
        return f"certificate verify failed: {detail}"
    if isinstance(error, InferenceServerException):
        message = error.message() or ""
        failed = _GRPC_VERIFY_FAILED.search(message)
        if failed:
            return f"certificate verify failed: {failed.group(1).strip()}"
        if any(text in message for text in _GRPC_WRONG_NAME):
            return "certificate verify failed: the certificate is not valid for this host name"
    return None


PLAIN_TEXT_ANSWER = "it answered the TLS handshake in plain text (WRONG_VERSION_NUMBER): is that the plain port?"


def speaks_no_tls(error: BaseException) -> bool:
    """Whether `error` is a TLS handshake answered in plain text (OpenSSL's WRONG_VERSION_NUMBER): an
    https:// URL naming a port where Triton or a proxy speaks plain HTTP or gRPC. Resending cannot
    change it either. The ssl module, aiohttp (its cause) and gRPC (its status text) all name it."""
    return any("WRONG_VERSION_NUMBER" in text for text in _texts(error))


# How a proxy that asks for client certificates refuses a client without one, or with one its CA did
# not sign: a TLS alert, as OpenSSL and BoringSSL name it (TLS 1.3: certificate_required; TLS 1.2:
# handshake_failure), or, from nginx (`ssl_verify_client on`), an HTTP 400 page after the handshake.
_REFUSAL_ALERT = re.compile(
    r"(?:SSLV3|TLSV1|TLSV13)_ALERT_(?:CERTIFICATE_[A-Z]+|HANDSHAKE_FAILURE|BAD_CERTIFICATE|UNKNOWN_CA|UNSUPPORTED_CERTIFICATE|ACCESS_DENIED)"
)
_NGINX_REFUSALS = ("No required SSL certificate was sent", "The SSL certificate error")
CLIENT_CERTIFICATE_HINT = "a proxy that asks for client certificates takes one its CA signed: --client-cert FILE --client-key FILE"


def client_refused(error: BaseException) -> str | None:
    """The alert or page with which the server refused this client's TLS connection, else None. Such a
    refusal is an answer, not an outage: resending cannot change it. Some refusals name nothing (a
    proxy that closes the connection without an alert; gRPC over TLS 1.3 logs the alert but reports
    a failed read): those read as a server gone."""
    for text in _texts(error):
        alert = _REFUSAL_ALERT.search(text)
        if alert:
            return alert.group()
        refusal = next((page for page in _NGINX_REFUSALS if page in text), None)
        if refusal:
            return f"HTTP 400: {refusal}"
    return None


def _texts(error: BaseException | None):
    """The messages of `error` and its causes (aiohttp keeps the ssl module's error as the cause)."""
    for _ in range(5):
        if error is None:
            return
        yield (error.message() if isinstance(error, InferenceServerException) else str(error)) or ""
        error = error.__cause__


def _verification_error(error: BaseException | None) -> ssl.SSLCertVerificationError | None:
    """The ssl module's verification error, itself or inside aiohttp's (`certificate_error`: aiohttp's
    error is an ssl.CertificateError too, without the details) or a cause."""
    for _ in range(5):
        if error is None:
            return None
        inner = getattr(error, "certificate_error", None)
        if inner is None and isinstance(error, ssl.SSLCertVerificationError):
            return error
        error = inner or error.__cause__
    return None
