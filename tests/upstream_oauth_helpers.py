"""Helpers for the upstream OAuth tests: the protected server (``fixtures/oauth_server.py``),
its knobs and counters, and the browser's part of an authorization."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import ssl
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.accounts_helpers import Account, call
from tests.harness import DIRECTOR, Daemon, free_port, local_servers

FIXTURES = Path(__file__).parent / "fixtures"


class ProtectedServer:
    """The running fixture: the MCP server at ``url``, its authorization server beside it."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None, path: str = "/mcp") -> None:
        self.port = port
        self.tls = tls
        self.origin = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        self.url = f"{self.origin}{path}"
        self.issuer = f"{self.origin}/as"

    def request(self, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        connection: http.client.HTTPConnection = (
            http.client.HTTPSConnection("127.0.0.1", self.port, context=self.tls, timeout=30)
            if self.tls else http.client.HTTPConnection("127.0.0.1", self.port, timeout=30))
        try:
            data = json.dumps(body).encode() if body is not None else None
            connection.request(method, path, body=data, headers=headers or {})
            response = connection.getresponse()
            return (response.status, {k.lower(): v for k, v in response.getheaders()},
                    response.read())
        finally:
            connection.close()

    def knobs(self, **values: Any) -> None:
        assert self.request("POST", "/debug/knobs", values)[0] == 200

    def stats(self) -> dict[str, Any]:
        status, _, body = self.request("GET", "/debug/stats")
        assert status == 200
        return dict(json.loads(body))

    def post(self, path: str) -> None:
        assert self.request("POST", path, {})[0] == 200


@contextlib.contextmanager
def protected_server(certificate: Path | None = None, key: Path | None = None,
                     ca: Path | None = None, tls: ssl.SSLContext | None = None,
                     sse: bool = False) -> Iterator[ProtectedServer]:
    port = free_port()
    argv = [sys.executable, str(FIXTURES / "oauth_server.py"), "--port", str(port)]
    if sse:
        argv += ["--transport", "sse"]
    if certificate is not None and key is not None:
        argv += ["--certfile", str(certificate), "--keyfile", str(key)]
    if ca is not None:
        argv += ["--ca", str(ca)]
    with local_servers([argv], [port]):
        yield ProtectedServer(port, tls, "/sse" if sse else "/mcp")


def add_protected(daemon: Daemon, account: Account, playbook: str, server: ProtectedServer,
                  name: str = "prot", kind: str = "http") -> None:
    status, _, body = call(daemon, "POST", "/api/v1/playbooks", {"name": playbook},
                           key=account.key)
    assert status in (201, 409), body
    status, _, body = call(daemon, "POST", f"/api/v1/playbooks/{playbook}/servers",
                           {"name": name, "type": kind, "url": server.url}, key=account.key)
    assert status == 201, body


def server_status(daemon: Daemon, account: Account, playbook: str, name: str = "prot"
                  ) -> dict[str, Any]:
    status, _, body = call(daemon, "GET", f"/api/v1/playbooks/{playbook}/servers/{name}",
                           key=account.key)
    assert status == 200, body
    return dict(body["status"])


def authorize_url(daemon: Daemon, account: Account, playbook: str, name: str = "prot",
                  body: Any = None) -> str:
    status, _, answer = call(daemon, "POST",
                             f"/api/v1/playbooks/{playbook}/servers/{name}/authorize", body,
                             key=account.key)
    assert status == 200, answer
    return str(answer["authorize_url"])


def follow_to_callback(server: ProtectedServer, url: str) -> str:
    """The browser at the authorization server (which approves at once): where it is sent
    back, as a path and query on Director."""
    parts = urllib.parse.urlsplit(url)
    assert parts.port == server.port, url
    status, headers, body = server.request("GET", f"{parts.path}?{parts.query}")
    assert status == 302, body
    back = urllib.parse.urlsplit(headers["location"])
    return f"{back.path}?{back.query}"


def callback(daemon: Daemon, account: Account, path: str) -> str:
    """The browser, signed in, back at Director: where it lands."""
    status, headers, body = call(daemon, "GET", path, cookie=account.cookie)
    assert status == 303, body
    return headers["location"]


def authorize(daemon: Daemon, account: Account, playbook: str, server: ProtectedServer,
              name: str = "prot") -> str:
    """A whole authorization through the API and a signed-in browser: where it lands."""
    return callback(daemon, account, follow_to_callback(
        server, authorize_url(daemon, account, playbook, name)))


def mcp_post(daemon: Daemon, key: str, playbook: str, message: dict[str, Any],
             session: str | None = None) -> tuple[int, dict[str, str], Any]:
    headers = {"content-type": "application/json", "x-api-key": key,
               "accept": "application/json, text/event-stream"}
    if session is not None:
        headers["mcp-session-id"] = session
    status, answer_headers, raw = daemon.request("POST", f"/playbooks/{playbook}/mcp",
                                                 json.dumps(message).encode(), headers)
    text = raw.decode()
    if answer_headers.get("content-type", "").startswith("text/event-stream"):
        text = next(line[5:] for line in text.splitlines() if line.startswith("data:"))
    return status, answer_headers, json.loads(text) if text.strip() else None


def open_session(daemon: Daemon, key: str, playbook: str) -> str:
    status, headers, _ = mcp_post(daemon, key, playbook, {
        "jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "raw", "version": "1"}}})
    assert status == 200
    session = headers["mcp-session-id"]
    assert mcp_post(daemon, key, playbook, {"jsonrpc": "2.0",
                                            "method": "notifications/initialized"},
                    session)[0] == 202
    return session


def tool_names(daemon: Daemon, key: str, playbook: str, session: str) -> list[str]:
    status, _, answer = mcp_post(daemon, key, playbook, {"jsonrpc": "2.0", "id": 1,
                                                         "method": "tools/list"}, session)
    assert status == 200, answer
    return [tool["name"] for tool in answer["result"]["tools"]]


def call_tool(daemon: Daemon, key: str, playbook: str, session: str, name: str,
              arguments: dict[str, Any], request_id: int = 2) -> dict[str, Any]:
    status, _, answer = mcp_post(daemon, key, playbook, {
        "jsonrpc": "2.0", "id": request_id, "method": "tools/call",
        "params": {"name": name, "arguments": arguments}}, session)
    assert status == 200, answer
    return dict(answer)


class WatchingClient:
    """The ``mcp`` SDK client on a playbook, in a thread of its own: it lists the tools
    (``before``; ``listed`` is set then), waits for ``tools/list_changed`` (``changed``),
    lists again (``after``) and calls ``echo`` (``called``: its text)."""

    def __init__(self, daemon: Daemon, key: str, playbook: str) -> None:
        self.url = f"{daemon.base}/playbooks/{playbook}/mcp"
        self.key = key
        self.listed = threading.Event()
        self.changed = threading.Event()
        self.outcome: dict[str, Any] = {}
        self.thread = threading.Thread(
            target=lambda: asyncio.run(asyncio.wait_for(self._run(), 90)), daemon=True)
        self.thread.start()
        assert self.listed.wait(60), "the client did not list the tools"

    async def _run(self) -> None:
        from mcp import Client
        from mcp.client.streamable_http import streamable_http_client
        from mcp.shared._httpx_utils import create_mcp_http_client

        async def on_message(message: Any) -> None:
            if getattr(getattr(message, "root", message), "method", "") == \
                    "notifications/tools/list_changed":
                self.changed.set()

        http = create_mcp_http_client(headers={"x-api-key": self.key})
        async with http, Client(streamable_http_client(self.url, http_client=http),
                                mode="legacy", message_handler=on_message) as session:
            self.outcome["before"] = [tool.name for tool in (await session.list_tools()).tools]
            self.listed.set()
            await asyncio.to_thread(self.changed.wait, 60)
            self.outcome["after"] = sorted(
                tool.name for tool in (await session.list_tools()).tools)
            called = await session.call_tool("echo", {"text": "through Director"})
            self.outcome["called"] = called.content[0].text

    def result(self) -> dict[str, Any]:
        self.thread.join(90)
        assert self.changed.is_set(), "no tools/list_changed reached the client"
        return self.outcome


def throwaway_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A certificate authority of this test's own and a certificate it signed for 127.0.0.1:
    (the CA's certificate, the certificate, its key), as PEM files in ``directory``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def built(subject: str, issuer: str, key: Any, signer: Any, ca: bool) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    ca = built("Director tests CA", "Director tests CA", ca_key, ca_key, True)
    leaf = built("127.0.0.1", "Director tests CA", leaf_key, ca_key, False)
    paths = directory / "ca.pem", directory / "leaf.pem", directory / "leaf.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return paths


class TlsDaemon(Daemon):
    """A daemon listening with TLS (``--listen ssl:…``), talked to over https."""

    def __init__(self, environ: dict[str, str], certificate: Path, key: Path,
                 trust: ssl.SSLContext) -> None:
        self.trust = trust
        port = environ["PORT"]
        super().__init__(environ, argv=[DIRECTOR, "serve", "--listen",
                                        f"ssl:{port}:interface=127.0.0.1:privateKey={key}:"
                                        f"certKey={certificate}"])
        self.base = f"https://127.0.0.1:{port}"

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Any = None) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=30,
                                                 context=self.trust)
        try:
            connection.request(method, path, body=body, headers=dict(headers or {}))
            response = connection.getresponse()
            return (response.status, {k.lower(): v for k, v in response.getheaders()},
                    response.read())
        finally:
            connection.close()
