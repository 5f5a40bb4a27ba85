"""The ``mcp`` SDK client signing in to Director with OAuth through a real browser: its
loopback redirect URI (a local server that receives the answer), its token storage, what
the person does in the browser, and the whole flow timed. Used by tests/test_oauth_browser.py
and by the bench (``python -m bench --only oauth``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import attrs
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.auth import (
    AuthorizationCodeResult,
    OAuthClientInformationFull,
    OAuthClientMetadata,
    OAuthToken,
)
from pydantic import AnyUrl
from selenium import webdriver

from tests.studio_browser import fill, find, submit, wait_for

CLIENT_NAME = "Director test client"


class Callback:
    """The client's loopback redirect URI: a local server that receives the answer."""

    def __init__(self) -> None:
        self.received: dict[str, str] | None = None
        self.arrived = threading.Event()
        callback = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                if parts.path == "/callback" and not callback.arrived.is_set():  # not favicon
                    query = parse_qs(parts.query)
                    callback.received = {name: values[0] for name, values in query.items()}
                    callback.arrived.set()
                body = b"<!DOCTYPE html><title>Done</title><p>You may close this window.</p>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}/callback"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self) -> dict[str, str]:
        assert self.arrived.wait(120), "the browser never came back to the redirect URI"
        assert self.received is not None
        return self.received

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Memory:
    """The SDK's TokenStorage, in memory."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


def sign_in_and_allow(browser: webdriver.Chrome, url: str, email: str, password: str,
                      callback: Callback, check: Callable[[str, webdriver.Chrome], None]
                      ) -> None:
    """What the person does in the browser the client opened: sign in, look, allow.
    ``check(page name, browser)`` looks at the login and consent pages on the way."""
    browser.delete_all_cookies()
    browser.get(url)
    wait_for(browser, lambda: "/studio/login" in browser.current_url, 30, "the login page")
    check("oauth-login", browser)
    fill(browser, {"email": email, "password": password})
    submit(browser, "Sign in")
    wait_for(browser, lambda: "/oauth/authorize" in browser.current_url, 30, "the consent page")
    check("oauth-consent", browser)
    find(browser, "button[value=allow]").click()
    wait_for(browser, lambda: browser.current_url.startswith(callback.uri), 30,
             "the redirect to the client")


@attrs.frozen
class Outcome:
    result: Any  # the tool's CallToolResult
    storage: Memory
    seconds: float  # from the first request to the tool's answer
    browser_seconds: float  # from the browser opened to the browser back at the client


async def sign_in_and_call(browser: webdriver.Chrome, server_url: str, email: str,
                           password: str, tool: str, arguments: dict[str, Any],
                           check: Callable[[str, webdriver.Chrome], None] = lambda *_: None
                           ) -> Outcome:
    """A fresh SDK client (nothing stored: it discovers and registers) calls ``tool`` on
    ``server_url``, the person signing in through ``browser`` when it asks."""
    callback = Callback()
    storage = Memory()
    timings: dict[str, float] = {}

    async def redirect(url: str) -> None:
        timings["browser"] = time.monotonic()
        await anyio.to_thread.run_sync(sign_in_and_allow, browser, url, email, password,
                                       callback, check)

    async def came_back() -> AuthorizationCodeResult:
        answer = await anyio.to_thread.run_sync(callback.wait)
        timings["back"] = time.monotonic()
        assert "code" in answer, answer
        return AuthorizationCodeResult(code=answer["code"], state=answer.get("state"),
                                       iss=answer.get("iss"))

    provider = OAuthClientProvider(
        server_url=server_url,
        client_metadata=OAuthClientMetadata(
            client_name=CLIENT_NAME, redirect_uris=[AnyUrl(callback.uri)],
            grant_types=["authorization_code", "refresh_token"], response_types=["code"],
            token_endpoint_auth_method="none"),
        storage=storage, redirect_handler=redirect, callback_handler=came_back)
    try:
        started = time.monotonic()
        async with create_mcp_http_client(auth=provider) as http, Client(
                streamable_http_client(server_url, http_client=http), mode="legacy") as client:
            result = await client.call_tool(tool, arguments)
        finished = time.monotonic()
    finally:
        callback.close()
    return Outcome(result, storage, finished - started, timings["back"] - timings["browser"])
