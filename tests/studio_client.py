"""A plain HTTP client for Studio pages, as a browser without JavaScript uses them: cookies,
forms with their CSRF token, redirects not followed (tests look at them)."""

from __future__ import annotations

import contextlib
import html
import http.client
import re
import sys
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tests.harness import Daemon, free_port, local_servers

HTTP_REFERENCE = str(Path(__file__).parent / "fixtures" / "http_reference_server.py")

CSRF = re.compile(r'name="csrf_token" value="([^"]*)"')


class Page:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.header_list = headers
        self.headers = {name.lower(): value for name, value in headers}
        self.body = body
        self.text = body.decode("utf-8", "replace")

    @property
    def location(self) -> str:
        return self.headers.get("location", "")

    def csrf(self) -> str:
        found = CSRF.search(self.text)
        assert found, f"no CSRF token on the page:\n{self.text[:2000]}"
        return html.unescape(found[1])

    def has(self, text: str) -> bool:
        return html.escape(text, quote=False) in self.text or text in self.text


class StudioClient:
    def __init__(self, daemon: Daemon, origin: bool = True) -> None:
        self.daemon = daemon
        self.cookies: dict[str, str] = {}
        self.origin = origin
        self.last: Page | None = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Page:
        sent = dict(headers or {})
        if self.cookies:
            sent["cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if method == "POST" and self.origin:
            sent.setdefault("origin", self.daemon.base)
        connection = http.client.HTTPConnection("127.0.0.1", self.daemon.port, timeout=30)
        try:
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            page = Page(response.status, response.getheaders(), response.read())
        finally:
            connection.close()
        for name, value in page.header_list:
            if name.lower() == "set-cookie":
                cookie, _, attributes = value.partition(";")
                key, _, content = cookie.partition("=")
                if "max-age=0" in attributes.lower() or not content:
                    self.cookies.pop(key.strip(), None)
                else:
                    self.cookies[key.strip()] = content.strip()
        self.last = page
        return page

    def get(self, path: str) -> Page:
        return self.request("GET", path)

    def post(self, path: str, fields: dict[str, Any] | Iterable[tuple[str, str]] = (),
             csrf: str | None = None, with_csrf: bool = True) -> Page:
        pairs = list(fields.items()) if isinstance(fields, dict) else list(fields)
        if with_csrf:
            token = csrf if csrf is not None else (self.last.csrf() if self.last else "")
            pairs.append(("csrf_token", token))
        body = urllib.parse.urlencode(pairs).encode()
        return self.request("POST", path, body,
                            {"content-type": "application/x-www-form-urlencoded"})

    def post_multipart(self, path: str, fields: dict[str, str],
                       files: dict[str, tuple[str, bytes]]) -> Page:
        boundary = "studio-test-boundary-7d1"
        chunks: list[bytes] = []
        for name, value in fields.items():
            chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
                          f"\r\n\r\n{value}\r\n".encode())
        for name, (filename, content) in files.items():
            chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                          f'filename="{filename}"\r\nContent-Type: application/yaml\r\n\r\n'
                          .encode() + content + b"\r\n")
        chunks.append(f"--{boundary}--\r\n".encode())
        return self.request("POST", path, b"".join(chunks),
                            {"content-type": f"multipart/form-data; boundary={boundary}"})


def setup_token(daemon: Daemon) -> str:
    record = daemon.wait_for_log("create the first account")
    return str(record["url"]).rsplit("token=", 1)[1]


def first_account(daemon: Daemon, email: str, password: str) -> StudioClient:
    """Run the first-run setup in a fresh client; it ends signed in."""
    client = StudioClient(daemon)
    page = client.get(f"/studio/setup?token={setup_token(daemon)}")
    assert page.status == 200, page.text
    page = client.post("/studio/setup", {"token": setup_token(daemon), "email": email,
                                         "password": password, "password_again": password})
    assert page.status == 200 and page.has("Your account is ready"), page.text
    return client


def sign_up(daemon: Daemon, email: str, password: str) -> tuple[StudioClient, Page]:
    client = StudioClient(daemon)
    client.get("/studio/signup")
    return client, client.post("/studio/signup", {"email": email, "password": password})


@contextlib.contextmanager
def http_reference_server(required_header: str) -> Iterator[int]:
    """The SDK's reference server over Streamable HTTP, answering 401 without the header
    (``name=value``); yields its port."""
    port = free_port()
    with local_servers([[sys.executable, HTTP_REFERENCE, "--transport", "streamable-http",
                         "--port", str(port), "--require-header", required_header]], [port]):
        yield port
