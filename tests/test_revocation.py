"""Revocation ends what is already open, on every instance: two daemons on one database, the
credential revoked through one (or the ``director`` command), streams held on the other with raw
HTTP — a Streamable HTTP GET stream, a legacy ``/sse`` stream, a 2026-07-28
``subscriptions/listen`` — and an upstream call in progress."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import psycopg2
import pytest

from tests.accounts_helpers import PASSWORD, Account, call, eventually, sign_up
from tests.harness import DIRECTOR, Daemon, base_environment, free_port
from tests.raw_stream import RawStream
from tests.test_mcp_gateway import ACCEPT, INIT, reference_server
from tests.test_metrics import parse, scrape, value

StartDaemon = Callable[..., Daemon]
MODERN_META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
               "io.modelcontextprotocol/clientCapabilities": {}}
DEADLINE = 10.0  # generous: the machine is shared; the bench measures how fast it really is


def authorization(credential: str) -> dict[str, str]:
    """An API key, or a cookie (the raw ``Set-Cookie`` value, echoed as clients do)."""
    if credential.startswith("dk_"):
        return {"x-api-key": credential}
    return {"cookie": credential}


class Held(RawStream):
    """One request whose response is held open and read in the background."""

    def __init__(self, daemon: Daemon, method: str, path: str, headers: dict[str, str],
                 body: bytes = b"") -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: localhost", *(
            f"{name}: {value}" for name, value in headers.items())]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        super().__init__(daemon.port, "\r\n".join(lines).encode() + b"\r\n\r\n" + body,
                         timeout=60)

    def status(self) -> int:
        eventually(lambda: b"\r\n\r\n" in self.data, timeout=DEADLINE)
        return int(self.data[9:12])

    def wait_for(self, fragment: bytes) -> None:
        eventually(lambda: fragment in self.body, timeout=DEADLINE)


@attrs.define
class Instance:
    daemon: Daemon
    metrics_port: int | None = None

    def post(self, credential: str, message: dict[str, Any], session: str | None = None,
             path: str = "/playbooks/ref/mcp") -> tuple[int, dict[str, str], bytes]:
        headers = {"accept": ACCEPT, "content-type": "application/json",
                   **authorization(credential)}
        if session is not None:
            headers["mcp-session-id"] = session
        return self.daemon.request("POST", path, json.dumps(message).encode(), headers)

    def ping(self, credential: str, session: str) -> int:
        return self.post(credential, {"jsonrpc": "2.0", "id": "p", "method": "ping"}, session)[0]

    def open_session(self, credential: str) -> str:
        status, headers, body = self.post(credential, INIT)
        assert status == 200, body
        session = headers["mcp-session-id"]
        assert self.post(credential, {"jsonrpc": "2.0", "method": "notifications/initialized"},
                         session)[0] == 202
        return session

    def get_stream(self, credential: str, session: str) -> Held:
        """The session's Streamable HTTP GET stream, open."""
        held = Held(self.daemon, "GET", "/playbooks/ref/mcp", {
            "accept": "text/event-stream", "mcp-session-id": session,
            **authorization(credential)})
        assert held.status() == 200, held.data
        held.wait_for(b"stream open")
        return held

    def sse_stream(self, credential: str) -> tuple[Held, str]:
        """A legacy HTTP+SSE stream, open, and its session id."""
        held = Held(self.daemon, "GET", "/playbooks/ref/sse", {
            "accept": "text/event-stream", **authorization(credential)})
        assert held.status() == 200, held.data
        held.wait_for(b"event: endpoint")
        endpoint = next(line for line in held.body.splitlines() if line.startswith(b"data: "))
        session = parse_qs(urlsplit(endpoint[len(b"data: "):].decode()).query)["sessionId"][0]
        return held, session

    def listen_stream(self, credential: str) -> Held:
        """A 2026-07-28 ``subscriptions/listen``, acknowledged."""
        body = json.dumps({"jsonrpc": "2.0", "id": "sub", "method": "subscriptions/listen",
                           "params": {"notifications": {"toolsListChanged": True},
                                      "_meta": MODERN_META}}).encode()
        held = Held(self.daemon, "POST", "/playbooks/ref/mcp", {
            "accept": ACCEPT, "content-type": "application/json",
            "mcp-protocol-version": "2026-07-28", "mcp-method": "subscriptions/listen",
            **authorization(credential)}, body)
        held.wait_for(b"notifications/subscriptions/acknowledged")
        return held

    def message_status(self, credential: str, session: str) -> int:
        """What ``POST /message`` of a legacy session answers."""
        return self.post(credential, {"jsonrpc": "2.0", "id": 1, "method": "ping"},
                         path=f"/playbooks/ref/message?sessionId={session}")[0]

    def samples(self) -> dict[Any, float]:
        assert self.metrics_port is not None
        return parse(scrape(self.metrics_port)[2])


@attrs.define
class Deployment:
    a: Instance
    b: Instance
    owner: Account
    database_url: str

    def login(self) -> str:
        """A new cookie session of the owner (made through A)."""
        status, headers, body = call(self.a.daemon, "POST", "/api/v1/auth/login",
                                     {"email": self.owner.email, "password": PASSWORD})
        assert status == 200, body
        return headers["set-cookie"]

    def new_key(self, name: str) -> tuple[str, str]:
        """A second API key of the owner, made through A and known to B."""
        status, _, created = call(self.a.daemon, "POST", "/api/v1/api-keys", {"name": name},
                                  key=self.owner.key)
        assert status == 201, created
        eventually(lambda: call(self.b.daemon, "GET", "/api/v1/me",
                                key=created["key"])[0] == 200, timeout=DEADLINE)
        return str(created["key"]), str(created["id"])

    def director(self, *args: str, stdin: str | None = None) -> str:
        result = subprocess.run(
            [DIRECTOR, *args], env=base_environment(DATABASE_URL=self.database_url),
            capture_output=True, text=True, input=stdin, timeout=60, check=False)
        assert result.returncode == 0, (result.stdout, result.stderr)
        return result.stdout


@pytest.fixture
def deployment(start_daemon: StartDaemon, migrated_url: str) -> Iterator[Deployment]:
    env = {"DATABASE_URL": migrated_url, "DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS": "true"}
    metrics_port = free_port()
    a = Instance(start_daemon(**env))
    b = Instance(start_daemon(**env, METRICS_LISTEN=f"127.0.0.1:{metrics_port}"), metrics_port)
    a.daemon.wait_healthy()
    b.daemon.wait_healthy()
    owner = sign_up(a.daemon, "revocation@example.com")
    assert call(a.daemon, "POST", "/api/v1/playbooks", {"name": "Ref"}, key=owner.key)[0] == 201
    assert call(a.daemon, "POST", "/api/v1/playbooks/ref/servers", reference_server(),
                key=owner.key)[0] == 201
    eventually(lambda: call(b.daemon, "GET", "/api/v1/playbooks/ref",
                            key=owner.key)[0] == 200, timeout=DEADLINE)
    yield Deployment(a, b, owner, migrated_url)


def wait_ended(*streams: Held) -> None:
    eventually(lambda: all(stream.ended for stream in streams), timeout=DEADLINE)


def revoked_count(instance: Instance, transport: str) -> float:
    return value(instance.samples(), "director_mcp_sessions_ended_total", transport=transport,
                 reason="revoked")


# --- the tests ----------------------------------------------------------------------------


def test_revoking_a_key_on_one_instance_ends_what_it_opened_on_the_other(
        deployment: Deployment) -> None:
    b, owner = deployment.b, deployment.owner
    key, key_id = deployment.new_key("laptop")
    # Everything the key can hold open on B: a session with its GET stream and a call waiting
    # on the upstream, a legacy /sse stream, a modern listen stream.
    session = b.open_session(key)
    get = b.get_stream(key, session)
    sse, sse_session = b.sse_stream(key)
    listen = b.listen_stream(key)
    slow = json.dumps({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {
        "name": "slow", "arguments": {"steps": 1000, "delay": 0.05},
        "_meta": {"progressToken": "t"}}}).encode()
    pending = Held(b.daemon, "POST", "/playbooks/ref/mcp", {
        "accept": ACCEPT, "content-type": "application/json", "mcp-session-id": session,
        "x-api-key": key}, slow)
    pending.wait_for(b"notifications/progress")  # the upstream is working on it
    # What the owner's other key opened must survive.
    other = b.open_session(owner.key)
    other_get = b.get_stream(owner.key, other)

    # A session is bound to the credential that opened it: another key of the same user does
    # not reach it.
    assert b.ping(key, session) == 200
    assert b.ping(owner.key, session) == 404
    assert b.message_status(owner.key, sse_session) == 404

    assert call(deployment.a.daemon, "DELETE", f"/api/v1/api-keys/{key_id}",
                key=owner.key)[0] == 204
    wait_ended(get, sse, listen, pending)
    # The call in progress was cancelled: its answer says so, and its stream ended.
    assert pending.messages()[-1] == {"jsonrpc": "2.0", "id": 9, "error": {
        "code": -32001, "message": "request cancelled"}}
    final = listen.messages()[-1]
    assert final["id"] == "sub" and final["error"]["data"] == {"code": "credential_revoked"}

    samples = b.samples()
    assert value(samples, "director_mcp_sessions_ended_total", transport="streamable",
                 reason="revoked") == 1
    assert value(samples, "director_mcp_sessions_ended_total", transport="sse",
                 reason="revoked") == 1
    assert value(samples, "director_mcp_sessions_ended_total", transport="modern",
                 reason="revoked") == 1
    assert b.ping(key, session) == 401  # the key itself is refused now
    assert b.message_status(owner.key, sse_session) == 404

    # The other key's session and stream are untouched.
    assert not other_get.ended
    assert b.ping(owner.key, other) == 200
    for stream in (get, sse, listen, pending, other_get):
        stream.close()


def test_disabling_a_user_ends_its_sessions_everywhere(deployment: Deployment) -> None:
    b, owner = deployment.b, deployment.owner
    cookie = deployment.login()
    by_key = b.open_session(owner.key)
    streams = [b.get_stream(owner.key, by_key), b.sse_stream(owner.key)[0],
               b.get_stream(cookie, b.open_session(cookie)), b.listen_stream(cookie)]
    bystander = sign_up(deployment.a.daemon, "bystander@example.com")
    assert call(deployment.a.daemon, "POST", "/api/v1/playbooks", {"name": "Ref"},
                key=bystander.key)[0] == 201
    eventually(lambda: call(b.daemon, "GET", "/api/v1/playbooks/ref",
                            key=bystander.key)[0] == 200, timeout=DEADLINE)
    bystander_session = b.open_session(bystander.key)
    bystander_stream = b.get_stream(bystander.key, bystander_session)

    deployment.director("users", "disable", owner.email)
    wait_ended(*streams)
    assert revoked_count(b, "streamable") == 2
    assert revoked_count(b, "sse") == 1
    assert revoked_count(b, "modern") == 1
    assert not bystander_stream.ended and b.ping(bystander.key, bystander_session) == 200

    # Active again, the same key works, but the session it had is gone.
    deployment.director("users", "activate", owner.email)
    eventually(lambda: b.ping(owner.key, by_key) != 401, timeout=DEADLINE)
    assert b.ping(owner.key, by_key) == 404
    assert b.ping(owner.key, b.open_session(owner.key)) == 200
    for stream in (*streams, bystander_stream):
        stream.close()


def test_set_password_ends_what_cookie_sessions_opened_not_what_keys_did(
        deployment: Deployment) -> None:
    b, owner = deployment.b, deployment.owner
    cookie = deployment.login()
    cookie_session = b.open_session(cookie)
    cookie_stream = b.get_stream(cookie, cookie_session)
    cookie_sse, _ = b.sse_stream(cookie)
    key_session = b.open_session(owner.key)
    key_stream = b.get_stream(owner.key, key_session)

    deployment.director("users", "set-password", owner.email, "--password-stdin",
                        stdin="a new password\n")
    wait_ended(cookie_stream, cookie_sse)
    assert revoked_count(b, "streamable") == 1 and revoked_count(b, "sse") == 1
    assert b.ping(cookie, cookie_session) == 401
    # API keys survive a password change, and so does what they opened.
    assert not key_stream.ended and b.ping(owner.key, key_session) == 200
    for stream in (cookie_stream, cookie_sse, key_stream):
        stream.close()


def test_logout_ends_what_that_cookie_session_opened(deployment: Deployment) -> None:
    b = deployment.b
    first, second = deployment.login(), deployment.login()
    first_session, second_session = b.open_session(first), b.open_session(second)
    first_stream = b.get_stream(first, first_session)
    second_stream = b.get_stream(second, second_session)

    status, _, _ = call(deployment.a.daemon, "POST", "/api/v1/auth/logout", cookie=first,
                        headers={"content-type": "application/json"})
    assert status == 204
    wait_ended(first_stream)
    assert revoked_count(b, "streamable") == 1
    assert b.ping(first, first_session) == 401
    assert b.ping(second, first_session) == 404
    assert not second_stream.ended and b.ping(second, second_session) == 200
    for stream in (first_stream, second_stream):
        stream.close()


def test_a_revocation_whose_notification_was_lost_is_caught_up_after_reconnecting(
        deployment: Deployment) -> None:
    b = deployment.b
    key, key_id = deployment.new_key("lost")
    session = b.open_session(key)
    stream = b.get_stream(key, session)
    # Revoke with no NOTIFY, while B's LISTEN connection is cut; holding a lock on ``users``
    # until the revocation commits makes B's reload (which reads users first) see it.
    connection = psycopg2.connect(deployment.database_url)
    try:
        with connection.cursor() as cursor:
            cursor.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s", (key_id,))
            cursor.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
            cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE query LIKE 'LISTEN%%' AND datname = current_database() "
                           "AND pid <> pg_backend_pid()")
            terminated = cursor.rowcount
        time.sleep(0.3)  # let both instances notice and start reloading (blocked on the lock)
        connection.commit()
    finally:
        connection.close()
    assert terminated >= 1
    wait_ended(stream)
    assert revoked_count(b, "streamable") == 1
    stream.close()


def test_the_cli_revoking_a_key_ends_its_streams(deployment: Deployment) -> None:
    b, owner = deployment.b, deployment.owner
    key, _ = deployment.new_key("ci")
    stream, session = b.sse_stream(key)
    deployment.director("keys", "revoke", "--user", owner.email, "ci")
    wait_ended(stream)
    assert b.message_status(key, session) == 401
    assert revoked_count(b, "sse") == 1
    stream.close()


def test_many_streams_of_one_key_end_together(deployment: Deployment) -> None:
    b = deployment.b
    key, key_id = deployment.new_key("many")
    streams = [b.get_stream(key, b.open_session(key)) for _ in range(20)]
    assert call(deployment.a.daemon, "DELETE", f"/api/v1/api-keys/{key_id}",
                key=deployment.owner.key)[0] == 204
    wait_ended(*streams)
    assert revoked_count(b, "streamable") == 20
    for stream in streams:
        stream.close()


def test_a_session_cannot_be_opened_with_a_key_revoked_while_its_request_waited(
        deployment: Deployment) -> None:
    """The request authenticated, then waited (here for its key's first rate-limit lease,
    held up by a lock) while the key was revoked: it must not open a session afterwards."""
    a, b, owner = deployment.a, deployment.b, deployment.owner
    status, _, created = call(a.daemon, "POST", "/api/v1/api-keys", {"name": "racing"},
                              key=owner.key)
    assert status == 201
    eventually(lambda: value(b.samples(), "director_cache_entries", cache="api_keys") == 2,
               timeout=DEADLINE)  # B knows the key (and has never leased permits for it)
    locker, observer = (psycopg2.connect(deployment.database_url) for _ in range(2))
    observer.autocommit = True  # each look at pg_stat_activity a fresh snapshot

    def blocked() -> bool:
        with observer.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = "
                           "'Lock' AND query LIKE '%%rate_limits%%'")
            return int(cursor.fetchone()[0]) > 0

    try:
        with locker.cursor() as cursor:
            cursor.execute("LOCK TABLE rate_limits IN ACCESS EXCLUSIVE MODE")
        waiting = Held(b.daemon, "GET", "/playbooks/ref/sse",
                       {"accept": "text/event-stream", "x-api-key": created["key"]})
        eventually(blocked, timeout=DEADLINE)
        deployment.director("keys", "revoke", "--user", owner.email, "racing")
        eventually(lambda: value(b.samples(), "director_cache_entries",
                                 cache="api_keys") == 1, timeout=DEADLINE)
        locker.commit()
    finally:
        locker.close()
        observer.close()
    assert waiting.status() == 401
    assert b"revoked" in waiting.body
    waiting.close()
