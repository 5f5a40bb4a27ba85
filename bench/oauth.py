"""OAuth (issue 13): what an access token costs on the MCP hot path next to an API key, and
how long the whole sign-in takes a real client.

* In process: the authenticator's resolution of a request's credential to its user, the
  work every MCP request does before anything else — for ``Authorization: Bearer dat_…``
  (``Authenticator._oauth``: the header parsed and the token's shape checked, SHA-256, the
  token cache, the user) and for ``x-api-key: dk_…`` (``Authenticator._resolve``: the same
  steps through the account cache), on warm caches of 10,000 credentials each, timed call by
  call and interleaved in rounds so that drift affects both alike. The caches get a database
  stub that fails if it is ever asked.
* The browser flow: the ``mcp`` SDK client with its OAuth client provider, knowing only a
  playbook's URL, signs in through Debian's headless Chromium (discovery, dynamic
  registration, the login page, the consent page, the token) and calls a tool; timed from its
  first request to the tool's answer, and the part spent in the browser (from the browser
  opened to the browser back at the client's redirect URI). Each round is a new client with
  nothing stored, and the person signs in again (cookies cleared).
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast
from uuid import uuid4

from bench import api
from bench.accounts import _drive, _NoDatabase, _summary, _time_calls
from bench.daemon import start_director
from bench.probe import free_port
from bench.reaper import Reaper
from bench.report import Figure, formatted

CREDENTIALS = 10_000


def _request(headers: dict[bytes, bytes]) -> Any:
    from twisted.web.test.requesthelper import DummyRequest

    request = DummyRequest([b"playbooks", b"ref", b"mcp"])
    request.method = b"POST"
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(name, [value])
    return request


def validation_cost(calls: int) -> list[Figure]:
    """Credential → user on the hot path, per call, in µs: OAuth token vs API key."""
    import time

    from twisted.internet.task import Clock

    from director.accounts import store
    from director.accounts.cache import AccountCache
    from director.accounts.credentials import generate_api_key, hash_token
    from director.config import Settings
    from director.db.database import Database
    from director.oauth.server.grants import ACCESS_PREFIX, AccessGrant, new_secret
    from director.oauth.server.tokens import TokenCache
    from director.web.auth import Authenticator

    database = cast(Database, _NoDatabase())
    clock = Clock()
    clock.advance(time.time())  # the tokens' expiry is compared with it
    accounts = AccountCache(database, clock)
    tokens = TokenCache(database, clock)
    now = datetime.datetime.now(datetime.UTC)
    user = store.User(uuid4(), "bench@bench.invalid", "active", now)
    accounts.users[user.id] = user
    keys = [generate_api_key() for _ in range(CREDENTIALS)]
    for value in keys:
        accounts.remember_key(store.ApiKey(uuid4(), user.id, "default", value[:10], now,
                                           key_hash=hash_token(value)))
    values = [new_secret(ACCESS_PREFIX) for _ in range(CREDENTIALS)]
    expires = time.time() + 3600
    for value in values:
        tokens._remember(hash_token(value), AccessGrant(
            uuid4(), user.id, "dc_bench", uuid4(), frozenset(("mcp:read", "mcp:tools")),
            expires))
    authenticator = Authenticator(Settings(), database, accounts, cast(Any, None), clock,
                                  oauth_tokens=tokens)
    key_request = _request({b"x-api-key": keys[CREDENTIALS // 2].encode()})
    token_request = _request({
        b"authorization": b"Bearer " + values[CREDENTIALS // 2].encode()})
    assert _drive(authenticator._resolve(key_request, True)).key is not None
    assert _drive(authenticator._oauth(token_request, True)).grant is not None

    def nothing() -> None:
        return None

    measured: dict[str, Callable[[], object]] = {
        "token": lambda: _drive(authenticator._oauth(token_request, True)),
        "key": lambda: _drive(authenticator._resolve(key_request, True)),
    }
    gc.collect()
    gc.disable()
    try:
        overhead = statistics.median(_time_calls(nothing, calls))
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in measured}
        for _ in range(5):
            for name, call in measured.items():
                rounds[name].append(_summary(_time_calls(call, calls), overhead))
    finally:
        gc.enable()

    def median_of(name: str, stat: str) -> float:
        return statistics.median(r[stat] for r in rounds[name])

    details = {"calls_per_round": calls, "cached_credentials": CREDENTIALS,
               "timer_overhead_ns_subtracted": overhead, "rounds_us": rounds}
    return [
        Figure("oauth_token_resolve_p50",
               "OAuth access token → user (Authenticator._oauth) p50", "µs",
               tuple(r["p50"] for r in rounds["token"]),
               baseline=f"API key → user (_resolve) {formatted(median_of('key', 'p50'), 'µs')}",
               details=details),
        Figure("oauth_token_resolve_p99", "  p99", "µs",
               tuple(r["p99"] for r in rounds["token"]),
               baseline=f"API key {formatted(median_of('key', 'p99'), 'µs')}"),
    ]


def browser_flow(reaper: Reaper, workdir: Path, database_url: str, rounds: int) -> list[Figure]:
    """The SDK client's whole OAuth sign-in through headless Chromium, then a tool call."""
    from tests.oauth_browser import sign_in_and_call
    from tests.studio_browser import start_browser

    port = free_port()
    server = start_director(reaper, port=port, state_directory=workdir / "state-external",
                            log_path=workdir / "director-oauth.log", database_url=database_url,
                            extra_env={"DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS": "true",
                                       "BASE_URL": f"http://127.0.0.1:{port}",
                                       "OAUTH_REGISTRATIONS_PER_HOUR": "1000"})
    client = api.sign_up(port, "oauth")
    playbook = api.create_playbook(client, "OAuth bench")
    api.add_echo_server(client, playbook)
    status = client.request("GET", "/api/v1/me")
    url = f"http://127.0.0.1:{port}/playbooks/{playbook}/mcp"
    browsers = start_browser()
    browser = next(browsers)
    totals: list[float] = []
    in_browser: list[float] = []
    try:
        for _ in range(rounds):
            outcome = asyncio.run(asyncio.wait_for(sign_in_and_call(
                browser, url, status["email"], "bench-password-1234", "echo",
                {"text": "bench"}), 180))
            totals.append(outcome.seconds)
            in_browser.append(outcome.browser_seconds)
    finally:
        browsers.close()
        server.stop()
    return [
        Figure("oauth_browser_flow", "OAuth sign-in, SDK client + Chromium, to a tool's answer",
               "s", tuple(totals),
               baseline=f"of which in the browser {formatted(statistics.median(in_browser), 's')}",
               details={"browser_seconds": in_browser}),
    ]
