"""A small OpenID Connect provider for the tests, over HTTPS with a certificate authority of
its own (the daemon trusts it through ``SSL_CERT_FILE``): discovery, an authorization endpoint
that signs in whoever the test says (no page), a token endpoint that checks the client's
secret, the code, the redirect URI and the PKCE verifier, and userinfo.

It stands for the company's identity provider, a third party that cannot run here. What it
puts in the ID token can be changed per test (``claims``) to play a provider that lies or errs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from tests.https_documents import make_certificates

CLIENT_ID = "director-test"
CLIENT_SECRET = "provider-secret-" + "s" * 20


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


class Provider:
    def __init__(self, directory: Path) -> None:
        self.ca, certificate, key = make_certificates(directory)
        #: Who signs in next: claims of the ID token (iss, aud, exp, nonce are added unless
        #: given here; a value None removes the claim).
        self.claims: dict[str, Any] = {}
        #: What userinfo answers (sub is the ID token's unless given).
        self.userinfo: dict[str, Any] = {}
        #: An error the authorization endpoint answers instead of a code.
        self.error: str | None = None
        self.codes: dict[str, dict[str, str]] = {}
        self.token_requests: list[dict[str, str]] = []
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                provider.get(self)

            def do_POST(self) -> None:
                provider.post(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificate, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.issuer = f"https://localhost:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def environment(self) -> dict[str, str]:
        return {"OIDC_ISSUER": self.issuer, "OIDC_CLIENT_ID": CLIENT_ID,
                "OIDC_CLIENT_SECRET": CLIENT_SECRET, "OIDC_NAME": "Acme SSO",
                "SSL_CERT_FILE": str(self.ca)}

    # --- answers -----------------------------------------------------------------------------

    @staticmethod
    def _answer(handler: BaseHTTPRequestHandler, status: int, body: Any,
                headers: dict[str, str] | None = None) -> None:
        raw = json.dumps(body).encode() if body is not None else b""
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(raw)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(raw)

    def get(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        query = {name: values[0] for name, values in parse_qs(parts.query).items()}
        if parts.path == "/.well-known/openid-configuration":
            self._answer(handler, 200, {
                "issuer": self.issuer, "authorization_endpoint": self.issuer + "/authorize",
                "token_endpoint": self.issuer + "/token",
                "userinfo_endpoint": self.issuer + "/userinfo",
                "token_endpoint_auth_methods_supported": ["client_secret_basic"],
                "response_types_supported": ["code"], "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "code_challenge_methods_supported": ["S256"]})
        elif parts.path == "/authorize":
            self._authorize(handler, query)
        elif parts.path == "/userinfo":
            self._answer(handler, 200, {"sub": "person-1", **self.userinfo})
        else:
            self._answer(handler, 404, {"error": "not_found"})

    def _authorize(self, handler: BaseHTTPRequestHandler, query: dict[str, str]) -> None:
        if self.error is not None:
            values = {"error": self.error, "state": query.get("state", "")}
        else:
            code = secrets.token_urlsafe(16)
            self.codes[code] = query
            values = {"code": code, "state": query.get("state", "")}
        handler.send_response(302)
        handler.send_header("Location", query["redirect_uri"] + "?" + urlencode(values))
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def post(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length", "0"))
        fields = {name: values[0] for name, values in
                  parse_qs(handler.rfile.read(length).decode()).items()}
        self.token_requests.append(fields)
        expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        if handler.headers.get("Authorization") != expected:
            self._answer(handler, 401, {"error": "invalid_client"})
            return
        request = self.codes.pop(fields.get("code", ""), None)
        challenge = _b64(hashlib.sha256(fields.get("code_verifier", "").encode()).digest())
        if request is None or request["redirect_uri"] != fields.get("redirect_uri") or \
                request["code_challenge"] != challenge:
            self._answer(handler, 400, {"error": "invalid_grant"})
            return
        claims = {"iss": self.issuer, "aud": CLIENT_ID, "sub": "person-1",
                  "iat": int(time.time()), "exp": int(time.time()) + 300,
                  "nonce": request["nonce"], **self.claims}
        claims = {name: value for name, value in claims.items() if value is not None}
        token = ".".join((_b64(json.dumps({"alg": "RS256", "typ": "JWT"}).encode()),
                          _b64(json.dumps(claims).encode()), _b64(b"signature")))
        self._answer(handler, 200, {"id_token": token, "access_token": "access-1",
                                    "token_type": "Bearer", "expires_in": 300},
                     {"Cache-Control": "no-store"})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
