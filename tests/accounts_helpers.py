"""Helpers for account tests: sign up, log in, and call the API as someone."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import reactor, task

from director.db.database import Database
from tests.harness import Daemon

PASSWORD = "correct horse battery"


@attrs.define
class Account:
    email: str
    key: str
    key_id: str
    cookie: str  # the raw Set-Cookie value, echoed back as clients do
    user_id: str


def call(daemon: Daemon, method: str, path: str, body: Any = None, *,
         key: str | None = None, cookie: str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    sent = dict(headers or {})
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        sent.setdefault("content-type", "application/json")
    if key is not None:
        sent["x-api-key"] = key
    if cookie is not None:
        sent["cookie"] = cookie
    status, response_headers, raw = daemon.request(method, path, data, sent)
    payload = json.loads(raw) if raw and response_headers.get("content-type", "").startswith(
        "application/json") else raw
    return status, response_headers, payload


def sign_up(daemon: Daemon, email: str, password: str = PASSWORD) -> Account:
    status, headers, body = call(daemon, "POST", "/api/v1/auth/signup",
                                 {"email": email, "password": password})
    assert status == 201, body
    return Account(body["user"]["email"], body["api_key"]["key"], body["api_key"]["id"],
                   headers["set-cookie"], body["user"]["id"])


def error_code(body: Any) -> str:
    return str(body["error"]["code"])


def eventually(condition: Callable[[], bool], timeout: float = 5.0,
               interval: float = 0.02) -> float:
    """Seconds until ``condition()`` held; fails the test past ``timeout``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)
    return time.monotonic() - started


async def until_available(database: Database) -> None:
    """Until ``database`` (started in process) has its connections, without blocking the reactor."""
    deadline = time.monotonic() + 15
    while not database.available:
        assert time.monotonic() < deadline, database.unavailable_reason
        await task.deferLater(reactor, 0.02, lambda: None)
