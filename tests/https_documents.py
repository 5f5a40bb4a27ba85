"""A local HTTPS server that publishes Client ID Metadata Documents, good and bad, for the
OAuth tests: a certificate authority of its own (the daemon trusts it through
``SSL_CERT_FILE``), a certificate for ``localhost`` and 127.0.0.1, and a handler per path.

It stands for the client's web site, a third party that cannot run here."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.oauth_helpers import REDIRECT

Answer = tuple[int, dict[str, str], bytes]


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) files, valid for a day."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("Director test CA"))
          .issuer_name(_name("Director test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                       crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (x509.CertificateBuilder().subject_name(_name("localhost"))
                   .issuer_name(ca.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([
                       x509.DNSName("localhost"),
                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]),
                                  critical=False)
                   .sign(ca_key, hashes.SHA256()))
    paths = (directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


class DocumentSite:
    """``https://localhost:{port}/…``: each path answered by a function of the site."""

    def __init__(self, directory: Path) -> None:
        self.ca, certificate, key = make_certificates(directory)
        self.hits: Counter[str] = Counter()
        self.routes: dict[str, Callable[[], Answer]] = {}
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                site.hits[self.path] += 1
                route = site.routes.get(self.path)
                status, headers, body = route() if route else (404, {}, b"")
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        if value != "omit":  # no length: the body ends when the connection does
                            self.send_header(name, value)
                    if "Content-Length" not in headers:
                        self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the daemon gave up on it (huge, slow): that is the point

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificate, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"https://localhost:{self.port}{path}"

    def document(self, path: str, **changes: Any) -> dict[str, Any]:
        """A valid document for ``path``, with ``changes`` (None removes a field)."""
        document: dict[str, Any] = {"client_id": self.url(path), "client_name": "Published app",
                                    "redirect_uris": [REDIRECT],
                                    "grant_types": ["authorization_code", "refresh_token"],
                                    "token_endpoint_auth_method": "none"}
        document.update(changes)
        return {k: v for k, v in document.items() if v is not None}

    def publish(self, path: str, document: Any, *, cache: str | None = "max-age=600",
                content_type: str = "application/json", delay: float = 0.0) -> str:
        body = json.dumps(document).encode()
        headers = {"Content-Type": content_type}
        if cache is not None:
            headers["Cache-Control"] = cache

        def answer() -> Answer:
            if delay:
                time.sleep(delay)
            return 200, headers, body

        self.routes[path] = answer
        return self.url(path)

    def answer(self, path: str, status: int, headers: dict[str, str], body: bytes) -> str:
        self.routes[path] = lambda: (status, headers, body)
        return self.url(path)

    def __enter__(self) -> DocumentSite:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def document_site(directory: Path) -> Iterator[DocumentSite]:
    with DocumentSite(directory) as site:
        yield site
