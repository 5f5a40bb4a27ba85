"""Helpers for the OAuth tests: a playbook to protect, a client registered, and the
authorization code flow driven with raw HTTP (the consent form posted as a browser would)."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import secrets
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import attrs

from tests.accounts_helpers import Account, call, sign_up
from tests.harness import Daemon
from tests.test_mcp_gateway import ACCEPT, INIT, reference_server

REDIRECT = "http://127.0.0.1:8765/callback"
SCOPE = "mcp:read mcp:tools"


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    return verifier, challenge.decode().rstrip("=")


def form(daemon: Daemon, path: str, fields: dict[str, str], *,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """A form POST, as OAuth clients send to the token and revocation endpoints."""
    status, response_headers, raw = daemon.request(
        "POST", path, urlencode(fields).encode(),
        {"content-type": "application/x-www-form-urlencoded", **(headers or {})})
    body = json.loads(raw) if raw and response_headers.get("content-type", "").startswith(
        "application/json") else raw
    return status, response_headers, body


def register(daemon: Daemon, **metadata: Any) -> dict[str, Any]:
    body = {"client_name": "Test client", "redirect_uris": [REDIRECT],
            "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code", "refresh_token"], **metadata}
    status, _, answer = call(daemon, "POST", "/oauth/register", body)
    assert status == 201, answer
    return dict(answer)


def hidden_fields(page: bytes) -> list[tuple[str, str]]:
    return [(html.unescape(name.decode()), html.unescape(value.decode()))
            for name, value in re.findall(rb'<input type="hidden" name="([^"]+)" value="([^"]*)"',
                                          page)]


@attrs.define
class Flow:
    """One authorization: its request parameters and PKCE verifier."""

    daemon: Daemon
    account: Account
    client_id: str
    verifier: str
    parameters: dict[str, str]

    def authorize_path(self) -> str:
        return "/oauth/authorize?" + urlencode(self.parameters)

    def open(self) -> tuple[int, dict[str, str], bytes]:
        """GET the authorization endpoint as the signed-in user's browser."""
        return self.daemon.request("GET", self.authorize_path(),
                                   headers={"cookie": self.account.cookie})

    def decide(self, decision: str = "allow", grant: tuple[str, ...] | None = None,
               page: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        """Post the consent form shown by ``open`` (the hidden fields as the page has them)."""
        if page is None:
            status, _, page = self.open()
            assert status == 200, page[:3000]
        fields = hidden_fields(page)
        chosen = grant if grant is not None else tuple(
            v.decode() for v in re.findall(rb'name="grant" value="([^"]+)"', page))
        fields += [("grant", scope) for scope in chosen]
        fields.append(("decision", decision))
        return self.daemon.request(
            "POST", "/oauth/authorize", urlencode(fields).encode(),
            {"content-type": "application/x-www-form-urlencoded",
             "cookie": self.account.cookie, "origin": base_url(self.daemon)})

    def code(self, **decide: Any) -> str:
        status, headers, body = self.decide(**decide)
        assert status == 302, body[:3000]
        answer = redirected(headers["location"])
        assert "code" in answer, answer
        assert answer["state"] == self.parameters.get("state")
        assert answer["iss"] == base_url(self.daemon)
        return answer["code"]

    def exchange(self, code: str, **overrides: str) -> tuple[int, dict[str, str], Any]:
        fields = {"grant_type": "authorization_code", "code": code,
                  "redirect_uri": self.parameters["redirect_uri"], "client_id": self.client_id,
                  "code_verifier": self.verifier, "resource": self.parameters["resource"],
                  **overrides}
        return form(self.daemon, "/oauth/token", {k: v for k, v in fields.items() if v})

    def tokens(self, **decide: Any) -> dict[str, Any]:
        status, headers, body = self.exchange(self.code(**decide))
        assert status == 200, body
        assert headers["cache-control"] == "no-store"
        return dict(body)


def redirected(location: str) -> dict[str, str]:
    """The parameters the authorization endpoint sent back on the redirect URI."""
    return {name: values[0] for name, values in parse_qs(urlsplit(location).query).items()}


def start_flow(daemon: Daemon, account: Account, client_id: str, playbook: str = "ref", *,
               redirect_uri: str = REDIRECT, scope: str | None = SCOPE,
               transport: str = "mcp", **overrides: str) -> Flow:
    verifier, challenge = pkce()
    parameters = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
                  "code_challenge": challenge, "code_challenge_method": "S256",
                  "state": secrets.token_urlsafe(8),
                  "resource": f"{base_url(daemon)}/playbooks/{playbook}/{transport}"}
    if scope is not None:
        parameters["scope"] = scope
    parameters.update(overrides)
    return Flow(daemon, account, client_id, verifier,
                {k: v for k, v in parameters.items() if v is not None})


def base_url(daemon: Daemon) -> str:
    """The daemons here run with the default BASE_URL: http://localhost:PORT."""
    return f"http://localhost:{daemon.port}"


def mcp_post(daemon: Daemon, token: str, message: dict[str, Any], playbook: str = "ref",
             session: str | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = {"accept": ACCEPT, "content-type": "application/json",
               "authorization": f"Bearer {token}"}
    if session is not None:
        headers["mcp-session-id"] = session
    return daemon.request("POST", f"/playbooks/{playbook}/mcp", json.dumps(message).encode(),
                          headers)


def initialize(daemon: Daemon, token: str, playbook: str = "ref") -> str:
    status, headers, body = mcp_post(daemon, token, INIT, playbook)
    assert status == 200, body
    session = headers["mcp-session-id"]
    assert mcp_post(daemon, token, {"jsonrpc": "2.0", "method": "notifications/initialized"},
                    playbook, session)[0] == 202
    return session


def tool_call(name: str, arguments: dict[str, Any], request_id: int = 7) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
            "params": {"name": name, "arguments": arguments}}


def protected_playbook(daemon: Daemon, email: str = "owner@example.com",
                       playbooks: tuple[str, ...] = ("Ref",)) -> Account:
    """A user with playbooks, each serving the reference stdio server."""
    owner = sign_up(daemon, email)
    for name in playbooks:
        status, _, body = call(daemon, "POST", "/api/v1/playbooks", {"name": name},
                               key=owner.key)
        assert status == 201, body
        status, _, body = call(daemon, "POST", f"/api/v1/playbooks/{body['id']}/servers",
                               reference_server(), key=owner.key)
        assert status == 201, body
    return owner
