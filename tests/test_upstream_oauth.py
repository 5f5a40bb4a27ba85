"""Upstream OAuth against a real authorization server and a protected MCP server (the ``mcp``
SDK's, ``fixtures/oauth_server.py``), through real daemons: discovery, client identities,
the flow and its refusals, refresh (once across instances), step-up, disconnect, rotation."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from tests.accounts_helpers import Account, call, sign_up
from tests.harness import Daemon, free_port, query
from tests.oauth_helpers import (
    ProtectedServer,
    add_protected,
    authorize,
    authorize_url,
    call_tool,
    callback,
    follow_to_callback,
    open_session,
    protected_server,
    server_status,
    tool_names,
)

INSECURE = {"DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS": "true"}


@pytest.fixture
def server() -> Iterator[ProtectedServer]:
    with protected_server() as running:
        yield running


def started(start_daemon: Callable[..., Daemon], migrated_url: str, **environ: str) -> Daemon:
    port = free_port()
    daemon = start_daemon(DATABASE_URL=migrated_url, PORT=str(port),
                          BASE_URL=f"http://127.0.0.1:{port}", **INSECURE, **environ)
    daemon.wait_healthy()
    return daemon


@pytest.fixture
def daemon(start_daemon: Callable[..., Daemon], migrated_url: str) -> Daemon:
    return started(start_daemon, migrated_url)


def test_the_sdk_client_calls_a_protected_tool_once_the_owner_authorized(
        daemon: Daemon, server: ProtectedServer, migrated_url: str) -> None:
    owner = sign_up(daemon, "owner@example.com")
    add_protected(daemon, owner, "work", server)
    url = f"{daemon.base}/playbooks/work/mcp"
    changed = threading.Event()
    authorized = threading.Event()
    outcome: dict[str, Any] = {}

    async def client() -> None:
        async def on_message(message: Any) -> None:
            if getattr(getattr(message, "root", message), "method", "") == \
                    "notifications/tools/list_changed":
                changed.set()

        http = create_mcp_http_client(headers={"x-api-key": owner.key})
        async with http, Client(streamable_http_client(url, http_client=http), mode="legacy",
                                message_handler=on_message) as session:
            outcome["before"] = [tool.name for tool in (await session.list_tools()).tools]
            authorized.set()
            await asyncio.to_thread(changed.wait, 60)
            outcome["after"] = [tool.name for tool in (await session.list_tools()).tools]
            outcome["called"] = await session.call_tool("echo", {"text": "through Director"})

    running = threading.Thread(target=lambda: asyncio.run(asyncio.wait_for(client(), 90)))
    running.start()
    assert authorized.wait(60)
    # Tools absent, the server unauthorized with the way to authorize it.
    assert outcome["before"] == []
    status = server_status(daemon, owner, "work")
    assert status["authorization"]["state"] == "unauthorized"
    assert status["authorization"]["authorize_url"] == \
        f"{daemon.base}/studio/playbooks/work/servers/prot/connect"

    landed = authorize(daemon, owner, "work", server)
    assert landed == "/studio/playbooks/work?notice=server-authorized"
    running.join(90)
    assert changed.is_set()
    assert sorted(outcome["after"]) == ["admin_echo", "echo", "whoami"]
    assert outcome["called"].content[0].text == "through Director"

    status = server_status(daemon, owner, "work")
    assert status["authorization"]["state"] == "authorized"
    assert status["authorization"]["issuer"] == server.issuer
    stats = server.stats()
    assert (stats["registrations"], stats["codes"], stats["refreshes"]) == (1, 1, 0)
    # The token went to the resource only: never to the authorization server's endpoints.
    assert not any(header and header.lower().startswith("bearer")
                   for header in stats["as_authorization_headers"])
    # Sealed at rest, never in clear.
    rows = query(migrated_url, "SELECT access_token, refresh_token, client_secret FROM "
                               "upstream_oauth_credentials")
    assert len(rows) == 1 and all(value is None or value.startswith("v1:") for value in rows[0])


# --- client identities ------------------------------------------------------------------------


def test_a_client_the_user_entered_is_used_where_the_server_offers_no_registration(
        daemon: Daemon, server: ProtectedServer) -> None:
    server.knobs(registration=False)
    owner = sign_up(daemon, "entered@example.com")
    add_protected(daemon, owner, "work", server)
    path = "/api/v1/playbooks/work/servers/prot/authorize"
    status, _, body = call(daemon, "POST", path, key=owner.key)
    assert (status, body["error"]["code"]) == (409, "client_required"), body
    assert "offers no dynamic client registration" in body["error"]["message"]
    # The user registered Director by hand at the authorization server.
    redirect = f"{daemon.base}/oauth/work/prot/callback"
    assert server.request("POST", "/debug/clients", {
        "client_id": "by-hand", "client_secret": "s3cret-by-hand",
        "redirect_uris": [redirect]})[0] == 200
    status, _, body = call(daemon, "POST", path, {"client_id": "", "extra": 1}, key=owner.key)
    assert status == 400 and set(body["error"]["details"]["fields"]) == {"extra"}, body
    url = authorize_url(daemon, owner, "work", body={"client_id": "by-hand",
                                                      "client_secret": "s3cret-by-hand"})
    assert "client_id=by-hand" in url
    assert callback(daemon, owner, follow_to_callback(server, url)) == \
        "/studio/playbooks/work?notice=server-authorized"
    session = open_session(daemon, owner.key, "work")
    assert call_tool(daemon, owner.key, "work", session, "echo", {"text": "hi"})[
        "result"]["content"][0]["text"] == "hi"
    # Remembered for that authorization server: the next authorization needs no client id.
    assert "client_id=by-hand" in authorize_url(daemon, owner, "work")
    assert server.stats()["registrations"] == 0


def test_one_authorization_serves_every_playbook_of_the_user_using_that_server(
        daemon: Daemon, server: ProtectedServer) -> None:
    owner = sign_up(daemon, "shared@example.com")
    add_protected(daemon, owner, "one", server)
    authorize(daemon, owner, "one", server)
    add_protected(daemon, owner, "two", server, name="same-server")
    session = open_session(daemon, owner.key, "two")
    assert "echo" in tool_names(daemon, owner.key, "two", session)
    assert server_status(daemon, owner, "two", "same-server")["authorization"]["state"] == \
        "authorized"
    # Another user's playbook with the same server is not authorized by it.
    other = sign_up(daemon, "other@example.com")
    add_protected(daemon, other, "mine", server)
    session = open_session(daemon, other.key, "mine")
    assert tool_names(daemon, other.key, "mine", session) == []
    assert server_status(daemon, other, "mine")["authorization"]["state"] == "unauthorized"
    assert server.stats()["codes"] == 1


# --- the flow's refusals ------------------------------------------------------------------------


def stored_credentials(url: str) -> int:
    return int(query(url, "SELECT count(*) FROM upstream_oauth_credentials")[0][0])


def connect_page(daemon: Daemon, account: Account, location: str) -> str:
    status, _, body = call(daemon, "GET", location, cookie=account.cookie)
    assert status == 200, body
    return bytes(body).decode()


def test_a_state_is_single_use_bound_to_its_user_and_server(
        daemon: Daemon, server: ProtectedServer, migrated_url: str) -> None:
    owner = sign_up(daemon, "state@example.com")
    intruder = sign_up(daemon, "intruder@example.com")
    add_protected(daemon, owner, "work", server)
    add_protected(daemon, owner, "work", server, name="twin")
    add_protected(daemon, intruder, "work", server)
    back = follow_to_callback(server, authorize_url(daemon, owner, "work"))
    connect = "/studio/playbooks/work/servers/prot/connect"

    # Another user's browser, with the owner's answer: refused, and the flow left alone.
    landed = callback(daemon, intruder, back)
    assert landed == f"{connect}?refused=other"
    assert "started by another user" in connect_page(daemon, intruder, landed)
    # The owner's answer on another server's callback: refused too.
    twin = back.replace("/prot/callback", "/twin/callback")
    assert callback(daemon, owner, twin) == \
        "/studio/playbooks/work/servers/twin/connect?refused=other"
    # A state nobody issued, and none at all.
    forged = back.replace("state=", "state=forged")
    assert callback(daemon, owner, forged) == f"{connect}?refused=unknown"
    assert callback(daemon, owner, "/oauth/work/prot/callback?code=x") == \
        f"{connect}?refused=no-state"
    assert stored_credentials(migrated_url) == 0

    # The owner's own: once.
    assert callback(daemon, owner, back) == "/studio/playbooks/work?notice=server-authorized"
    landed = callback(daemon, owner, back)
    assert landed == f"{connect}?refused=used"
    assert "already completed" in connect_page(daemon, owner, landed)
    assert server.stats()["codes"] == 1

    # Signed out: through the sign-in page, then back to the callback.
    status, headers, _ = call(daemon, "GET", back)
    assert status == 303
    assert headers["location"].startswith("/studio/login?next=%2Foauth%2Fwork%2Fprot%2Fcallback")


def test_a_replayed_code_is_refused_by_the_authorization_server_and_changes_nothing(
        daemon: Daemon, server: ProtectedServer, migrated_url: str) -> None:
    owner = sign_up(daemon, "replay@example.com")
    add_protected(daemon, owner, "work", server)
    first = follow_to_callback(server, authorize_url(daemon, owner, "work"))
    assert callback(daemon, owner, first) == "/studio/playbooks/work?notice=server-authorized"
    before = query(migrated_url, "SELECT generation FROM upstream_oauth_credentials")
    # A second authorization, answered with the first one's (already used) code.
    second = follow_to_callback(server, authorize_url(daemon, owner, "work"))
    code = dict(part.split("=", 1) for part in first.split("?", 1)[1].split("&"))["code"]
    state = dict(part.split("=", 1) for part in second.split("?", 1)[1].split("&"))["state"]
    landed = callback(daemon, owner, f"/oauth/work/prot/callback?code={code}&state={state}"
                                     f"&iss={server.issuer}")
    assert landed.startswith("/studio/playbooks/work/servers/prot/connect?failed=")
    assert "invalid_grant" in connect_page(daemon, owner, landed)
    assert server.stats()["refused_codes"] == 1
    assert query(migrated_url, "SELECT generation FROM upstream_oauth_credentials") == before


@pytest.mark.parametrize(("knobs", "expected"), [
    ({"iss": "wrong"}, "another authorization server ('https://attacker.example/as')"),
    ({"iss": "none"}, "promises to name itself (iss)"),
    ({"deny": True}, "access_denied (the user said no); you declined"),
])
def test_an_answer_from_another_issuer_or_a_refusal_stores_nothing(
        daemon: Daemon, server: ProtectedServer, migrated_url: str, knobs: dict[str, Any],
        expected: str) -> None:
    owner = sign_up(daemon, "iss@example.com")
    add_protected(daemon, owner, "work", server)
    url = authorize_url(daemon, owner, "work")
    server.knobs(**knobs)
    landed = callback(daemon, owner, follow_to_callback(server, url))
    assert landed.startswith("/studio/playbooks/work/servers/prot/connect?failed=")
    page = connect_page(daemon, owner, landed)
    assert expected in page.replace("&#x27;", "'").replace("&#39;", "'"), page
    assert stored_credentials(migrated_url) == 0
    assert server.stats()["codes"] == 0


@pytest.mark.parametrize(("knobs", "expected"), [
    ({"no_s256": True}, "does not offer PKCE with S256"),
    ({"no_pkce_field": True}, "does not offer PKCE with S256"),
    ({"prm": "mismatch"}, "is for the resource http://127.0.0.1:{port}/other, not for "
                          "http://127.0.0.1:{port}/mcp: refusing to authorize with it"),
    ({"prm": "huge"}, "the answer is larger than 65536 bytes"),
    ({"prm": "malformed"}, "protected-resource metadata at http://127.0.0.1:{port}/.well-known"
                           "/oauth-protected-resource/mcp is not JSON"),
    ({"asm": "huge"}, "the answer is larger than 65536 bytes"),
    ({"asm": "malformed"}, "is not JSON"),
    ({"wrong_issuer": True}, "names another issuer ('https://elsewhere.example/as'); refusing "
                             "it (RFC 8414 §3.3)"),
])
def test_a_server_whose_metadata_is_refused_is_never_authorized(
        daemon: Daemon, server: ProtectedServer, knobs: dict[str, Any], expected: str) -> None:
    server.knobs(**knobs)
    owner = sign_up(daemon, "metadata@example.com")
    add_protected(daemon, owner, "work", server)
    status, _, body = call(daemon, "POST", "/api/v1/playbooks/work/servers/prot/authorize",
                           key=owner.key)
    assert (status, body["error"]["code"]) == (502, "upstream_authorization_failed"), body
    assert expected.format(port=server.port) in body["error"]["message"]
    # A client's list: the server is left out, and says why.
    session = open_session(daemon, owner.key, "work")
    assert tool_names(daemon, owner.key, "work", session) == []
    stats = server.stats()
    assert (stats["authorizations"], stats["registrations"]) == (0, 0)


def test_openid_discovery_is_the_fallback(daemon: Daemon, server: ProtectedServer) -> None:
    server.knobs(openid_only=True)
    owner = sign_up(daemon, "openid@example.com")
    add_protected(daemon, owner, "work", server)
    assert authorize(daemon, owner, "work", server) == \
        "/studio/playbooks/work?notice=server-authorized"
