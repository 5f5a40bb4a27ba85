"""Upstream OAuth against a real authorization server and a protected MCP server (the ``mcp``
SDK's, ``fixtures/oauth_server.py``), through real daemons: discovery, client identities,
the flow and its refusals, refresh (once across instances), step-up, disconnect, rotation."""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg2
import pytest

from tests.accounts_helpers import Account, call, eventually, sign_up
from tests.harness import (
    DIRECTOR,
    SECRET,
    Daemon,
    base_environment,
    free_port,
    make_temp_dir,
    query,
)
from tests.studio_client import StudioClient
from tests.upstream_oauth_helpers import (
    ProtectedServer,
    TlsDaemon,
    WatchingClient,
    add_protected,
    authorize,
    authorize_url,
    call_tool,
    callback,
    follow_to_callback,
    open_session,
    protected_server,
    server_status,
    throwaway_ca,
    tool_names,
)

INSECURE = {"DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS": "true"}


@pytest.fixture
def server() -> Iterator[ProtectedServer]:
    with protected_server() as running:
        yield running


def started(start_daemon: Callable[..., Daemon], migrated_url: str, port: int | None = None,
            **environ: str) -> Daemon:
    """A daemon on the database, its BASE_URL its own loopback address (``port``: a given one,
    e.g. a stopped daemon's, so that its redirect URIs stay the same)."""
    port = port or free_port()
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
    add_protected(daemon, owner, "team", server)
    client = WatchingClient(daemon, owner.key, "team")
    # Tools absent, the server unauthorized with the way to authorize it.
    assert client.outcome["before"] == []
    status = server_status(daemon, owner, "team")
    assert status["authorization"]["state"] == "unauthorized"
    assert status["authorization"]["authorize_url"] == \
        f"{daemon.base}/studio/playbooks/team/servers/prot/connect"

    landed = authorize(daemon, owner, "team", server)
    assert landed == "/studio/playbooks/team?notice=server-authorized"
    outcome = client.result()
    assert outcome["after"] == ["admin_echo", "echo", "whoami"]
    assert outcome["called"] == "through Director"

    status = server_status(daemon, owner, "team")
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


def test_a_server_of_the_http_sse_transport_is_authorized_too(
        daemon: Daemon, migrated_url: str) -> None:
    """Its resource is the SSE URL; the token also goes to the message endpoint the stream
    names (on the same origin, outside the resource's path)."""
    with protected_server(sse=True) as legacy:
        owner = sign_up(daemon, "legacy@example.com")
        add_protected(daemon, owner, "team", legacy, kind="sse")
        session = open_session(daemon, owner.key, "team")
        assert tool_names(daemon, owner.key, "team", session) == []
        assert server_status(daemon, owner, "team")["authorization"]["state"] == "unauthorized"
        authorize(daemon, owner, "team", legacy)
        eventually(lambda: "echo" in tool_names(daemon, owner.key, "team", session),
                   timeout=20, interval=0.2)
        assert echoed(call_tool(daemon, owner.key, "team", session, "echo",
                                {"text": "legacy"}, 5)) == "legacy"


def test_director_registers_as_a_web_application(daemon: Daemon,
                                                 server: ProtectedServer) -> None:
    """SEP-837: a dynamic registration says which kind of application registers (the
    conformance suite's ``sep-837-application-type-present``); Director, whose redirect URI is
    on its own server, is a web one."""
    owner = sign_up(daemon, "web@example.com")
    add_protected(daemon, owner, "team", server)
    authorize_url(daemon, owner, "team")
    [registered] = server.stats()["registered"]
    assert registered["application_type"] == "web"
    assert registered["redirect_uris"] == [f"{daemon.base}/oauth/team/prot/callback"]


def test_a_client_the_user_entered_is_used_where_the_server_offers_no_registration(
        daemon: Daemon, server: ProtectedServer) -> None:
    server.knobs(registration=False)
    owner = sign_up(daemon, "entered@example.com")
    add_protected(daemon, owner, "team", server)
    path = "/api/v1/playbooks/team/servers/prot/authorize"
    status, _, body = call(daemon, "POST", path, key=owner.key)
    assert (status, body["error"]["code"]) == (409, "client_required"), body
    assert "offers no dynamic client registration" in body["error"]["message"]
    # The user registered Director by hand at the authorization server.
    redirect = f"{daemon.base}/oauth/team/prot/callback"
    assert server.request("POST", "/debug/clients", {
        "client_id": "by-hand", "client_secret": "s3cret-by-hand",
        "redirect_uris": [redirect]})[0] == 200
    status, _, body = call(daemon, "POST", path, {"client_id": "", "extra": 1}, key=owner.key)
    assert status == 400 and set(body["error"]["details"]["fields"]) == {"extra"}, body
    url = authorize_url(daemon, owner, "team", body={"client_id": "by-hand",
                                                      "client_secret": "s3cret-by-hand"})
    assert "client_id=by-hand" in url
    assert callback(daemon, owner, follow_to_callback(server, url)) == \
        "/studio/playbooks/team?notice=server-authorized"
    session = open_session(daemon, owner.key, "team")
    assert call_tool(daemon, owner.key, "team", session, "echo", {"text": "hi"})[
        "result"]["content"][0]["text"] == "hi"
    # Remembered for that authorization server: the next authorization needs no client id.
    assert "client_id=by-hand" in authorize_url(daemon, owner, "team")
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
    add_protected(daemon, owner, "team", server)
    add_protected(daemon, owner, "team", server, name="twin")
    add_protected(daemon, intruder, "team", server)
    back = follow_to_callback(server, authorize_url(daemon, owner, "team"))
    connect = "/studio/playbooks/team/servers/prot/connect"

    # Another user's browser, with the owner's answer: refused, and the flow left alone.
    landed = callback(daemon, intruder, back)
    assert landed == f"{connect}?refused=other"
    assert "started by another user" in connect_page(daemon, intruder, landed)
    # The owner's answer on another server's callback: refused too.
    twin = back.replace("/prot/callback", "/twin/callback")
    assert callback(daemon, owner, twin) == \
        "/studio/playbooks/team/servers/twin/connect?refused=other"
    # A state nobody issued, and none at all.
    forged = back.replace("state=", "state=forged")
    assert callback(daemon, owner, forged) == f"{connect}?refused=unknown"
    assert callback(daemon, owner, "/oauth/team/prot/callback?code=x") == \
        f"{connect}?refused=no-state"
    assert stored_credentials(migrated_url) == 0

    # The owner's own: once.
    assert callback(daemon, owner, back) == "/studio/playbooks/team?notice=server-authorized"
    landed = callback(daemon, owner, back)
    assert landed == f"{connect}?refused=used"
    assert "already completed" in connect_page(daemon, owner, landed)
    assert server.stats()["codes"] == 1



def test_a_browser_signed_out_signs_in_and_the_authorization_goes_on(
        daemon: Daemon, server: ProtectedServer) -> None:
    owner = sign_up(daemon, "signedout@example.com")
    add_protected(daemon, owner, "team", server)
    back = follow_to_callback(server, authorize_url(daemon, owner, "team"))
    status, headers, _ = call(daemon, "GET", back)
    # To the sign-in page, which leads back to the callback; the answer waits in a cookie
    # (not in the URL, where the access log would see the code).
    assert status == 303
    assert headers["location"] == "/studio/login?next=%2Foauth%2Fteam%2Fprot%2Fcallback"
    kept = headers["set-cookie"].split(";", 1)[0]
    assert kept.startswith("director_oauth_answer=") and "code=" in kept
    assert "Path=/oauth/" in headers["set-cookie"] and "HttpOnly" in headers["set-cookie"]
    # Signed in, the browser comes back without the answer in the URL.
    status, headers, _ = call(daemon, "GET", "/oauth/team/prot/callback",
                              cookie=f"{owner.cookie.split(';', 1)[0]}; {kept}")
    assert (status, headers["location"]) == (303,
                                            "/studio/playbooks/team?notice=server-authorized")
    assert "director_oauth_answer=;" in headers["set-cookie"]
    code = dict(part.split("=", 1) for part in back.split("?", 1)[1].split("&"))["code"]
    assert code not in daemon.output()


def test_a_replayed_code_is_refused_by_the_authorization_server_and_changes_nothing(
        daemon: Daemon, server: ProtectedServer, migrated_url: str) -> None:
    owner = sign_up(daemon, "replay@example.com")
    add_protected(daemon, owner, "team", server)
    first = follow_to_callback(server, authorize_url(daemon, owner, "team"))
    assert callback(daemon, owner, first) == "/studio/playbooks/team?notice=server-authorized"
    before = query(migrated_url, "SELECT generation FROM upstream_oauth_credentials")
    # A second authorization, answered with the first one's (already used) code.
    second = follow_to_callback(server, authorize_url(daemon, owner, "team"))
    code = dict(part.split("=", 1) for part in first.split("?", 1)[1].split("&"))["code"]
    state = dict(part.split("=", 1) for part in second.split("?", 1)[1].split("&"))["state"]
    landed = callback(daemon, owner, f"/oauth/team/prot/callback?code={code}&state={state}"
                                     f"&iss={server.issuer}")
    assert landed.startswith("/studio/playbooks/team/servers/prot/connect?failed=")
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
    add_protected(daemon, owner, "team", server)
    url = authorize_url(daemon, owner, "team")
    server.knobs(**knobs)
    landed = callback(daemon, owner, follow_to_callback(server, url))
    assert landed.startswith("/studio/playbooks/team/servers/prot/connect?failed=")
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
    add_protected(daemon, owner, "team", server)
    status, _, body = call(daemon, "POST", "/api/v1/playbooks/team/servers/prot/authorize",
                           key=owner.key)
    assert (status, body["error"]["code"]) == (502, "upstream_authorization_failed"), body
    assert expected.format(port=server.port) in body["error"]["message"]
    # A client's list: the server is left out, and says why.
    session = open_session(daemon, owner.key, "team")
    assert tool_names(daemon, owner.key, "team", session) == []
    stats = server.stats()
    assert (stats["authorizations"], stats["registrations"]) == (0, 0)


def test_openid_discovery_is_the_fallback(daemon: Daemon, server: ProtectedServer) -> None:
    server.knobs(openid_only=True)
    owner = sign_up(daemon, "openid@example.com")
    add_protected(daemon, owner, "team", server)
    assert authorize(daemon, owner, "team", server) == \
        "/studio/playbooks/team?notice=server-authorized"


@pytest.mark.parametrize("prm_at", ["path", "root"])
def test_a_challenge_naming_no_metadata_is_followed_by_the_well_known_urls(
        daemon: Daemon, server: ProtectedServer, prm_at: str) -> None:
    """RFC 9728 §3 through the MCP authorization spec: without ``resource_metadata`` in the
    401, the path-aware well-known URL first, then the root one."""
    server.knobs(bare_challenge=True, prm_at=prm_at)
    owner = sign_up(daemon, f"bare-{prm_at}@example.com")
    add_protected(daemon, owner, "team", server)
    assert authorize(daemon, owner, "team", server) == \
        "/studio/playbooks/team?notice=server-authorized"
    session = open_session(daemon, owner.key, "team")
    assert "echo" in tool_names(daemon, owner.key, "team", session)
    tried = server.stats()["metadata_paths"]
    path_aware = "/.well-known/oauth-protected-resource/mcp"
    assert tried[0] == path_aware
    if prm_at == "root":
        assert tried[1] == "/.well-known/oauth-protected-resource"


# --- refresh ------------------------------------------------------------------------------------


def authorized_session(daemon: Daemon, server: ProtectedServer, email: str
                       ) -> tuple[Account, str]:
    """A new user, their playbook "team" with the protected server, authorized, and an MCP
    session on it."""
    owner = sign_up(daemon, email)
    add_protected(daemon, owner, "team", server)
    authorize(daemon, owner, "team", server)
    return owner, open_session(daemon, owner.key, "team")


def valid_tokens(server: ProtectedServer) -> int:
    return int(server.request("GET", "/debug/valid")[2])


def echo(daemon: Daemon, owner: Account, session: str, text: str, request_id: int = 2
         ) -> dict[str, Any]:
    return call_tool(daemon, owner.key, "team", session, "echo", {"text": text}, request_id)


def echoed(answer: dict[str, Any]) -> str:
    assert "result" in answer, answer
    return str(answer["result"]["content"][0]["text"])


def test_a_token_is_refreshed_before_it_expires_and_a_rotated_refresh_token_is_kept(
        daemon: Daemon, server: ProtectedServer, migrated_url: str) -> None:
    server.knobs(token_lifetime=3, rotate=True)
    owner, session = authorized_session(daemon, server, "expiry@example.com")
    assert echoed(echo(daemon, owner, session, "fresh")) == "fresh"
    for refreshes in (1, 2):
        eventually(lambda: valid_tokens(server) == 0, timeout=15, interval=0.1)
        assert echoed(echo(daemon, owner, session, f"after {refreshes}")) == f"after {refreshes}"
        # Refreshed before use (no request with a stale token), with the rotated refresh token
        # the second time (the first one was revoked by its use).
        stats = server.stats()
        assert (stats["refreshes"], stats["stale_tokens"]) == (refreshes, 0)
    assert query(migrated_url, "SELECT generation FROM upstream_oauth_credentials") == [(3,)]


@pytest.mark.parametrize("rotate", [True, False])
def test_an_upstream_401_refreshes_once_and_retries(
        daemon: Daemon, server: ProtectedServer, rotate: bool) -> None:
    server.knobs(rotate=rotate)
    owner, session = authorized_session(daemon, server, "on401@example.com")
    assert echoed(echo(daemon, owner, session, "one")) == "one"
    for refreshes in (1, 2):
        server.post("/debug/expire")  # the server no longer takes the token Director holds
        assert echoed(echo(daemon, owner, session, "again")) == "again"
        stats = server.stats()
        assert (stats["refreshes"], stats["stale_tokens"]) == (refreshes, refreshes)


def test_a_revoked_refresh_token_leaves_the_server_unauthorized_until_authorized_again(
        daemon: Daemon, server: ProtectedServer, migrated_url: str) -> None:
    owner, session = authorized_session(daemon, server, "revoked@example.com")
    assert echoed(echo(daemon, owner, session, "one")) == "one"
    server.post("/debug/revoke-refresh")
    server.post("/debug/expire")
    answer = echo(daemon, owner, session, "two")
    assert "HTTP 401: the server refused the token and it could not be refreshed: authorize it " \
        "again" in answer["error"]["message"], answer
    assert stored_credentials(migrated_url) == 0
    assert server_status(daemon, owner, "team")["authorization"]["state"] == "unauthorized"
    assert server.stats()["refreshes"] == 0
    authorize(daemon, owner, "team", server)
    eventually(lambda: "echo" in tool_names(daemon, owner.key, "team", session), timeout=20,
               interval=0.2)
    assert echoed(echo(daemon, owner, session, "three", 5)) == "three"


def test_a_server_that_moved_to_another_authorization_server_is_authorized_there(
        daemon: Daemon, server: ProtectedServer) -> None:
    """SEP-2352 (the conformance suite's ``auth/authorization-server-migration``): when the
    server refuses the token for good and its metadata now names another authorization
    server, Director discovers that one, shows the server unauthorized there, and the next
    authorization registers with it: the old server's client is not shown to the new one."""
    owner, session = authorized_session(daemon, server, "moved@example.com")
    assert echoed(echo(daemon, owner, session, "one")) == "one"
    with protected_server() as elsewhere:
        server.knobs(authorization_server=elsewhere.issuer)
        # The token is refused, refreshed (the old server still answers), refused again.
        answer = echo(daemon, owner, session, "two")
        assert f"the server now names another authorization server ({elsewhere.issuer})" in \
            answer["error"]["message"], answer
        assert server.stats()["refreshes"] == 1
        status = server_status(daemon, owner, "team")["authorization"]
        assert (status["state"], status["issuer"]) == ("unauthorized", elsewhere.issuer)
        url = authorize_url(daemon, owner, "team")
        assert url.startswith(f"{elsewhere.issuer}/authorize?")
        # Registered there (which knows only its own clients: the authorization below
        # would fail with the old server's).
        [registered] = elsewhere.stats()["registered"]
        assert registered["redirect_uris"] == [f"{daemon.base}/oauth/team/prot/callback"]
        assert callback(daemon, owner, follow_to_callback(elsewhere, url)) == \
            "/studio/playbooks/team?notice=server-authorized"
        status = server_status(daemon, owner, "team")["authorization"]
        assert (status["state"], status["issuer"]) == ("authorized", elsewhere.issuer)


@pytest.fixture
def instances(start_daemon: Callable[..., Daemon], migrated_url: str
              ) -> tuple[Daemon, Daemon]:
    """Two instances on one database."""
    return started(start_daemon, migrated_url), started(start_daemon, migrated_url)


def test_two_instances_and_100_concurrent_calls_at_expiry_refresh_once(
        instances: tuple[Daemon, Daemon], server: ProtectedServer) -> None:
    first, second = instances
    owner = sign_up(first, "concurrent@example.com")
    add_protected(first, owner, "team", server)
    authorize(first, owner, "team", server)
    # Ten client sessions on each instance, each with its upstream session (and the token).
    sessions = [(daemon, open_session(daemon, owner.key, "team"))
                for daemon in (first, second) for _ in range(10)]
    for daemon, session in sessions:
        assert echoed(call_tool(daemon, owner.key, "team", session, "echo", {"text": "w"})) == "w"
    server.knobs(refresh_delay=1.0)  # the race stays open a whole second
    server.post("/debug/expire")

    def one_call(index: int) -> str:
        daemon, session = sessions[index % len(sessions)]
        return echoed(call_tool(daemon, owner.key, "team", session, "echo",
                                {"text": f"call {index}"}, 100 + index))

    with ThreadPoolExecutor(100) as pool:
        answers = list(pool.map(one_call, range(100)))
    assert answers == [f"call {index}" for index in range(100)]
    refreshes = server.stats()["refreshes"]
    print(f"\nrefreshes seen by the authorization server for 100 concurrent calls at expiry "
          f"on two instances: {refreshes}")
    assert refreshes == 1


def test_a_flow_started_on_one_instance_completes_on_the_other(
        instances: tuple[Daemon, Daemon], server: ProtectedServer) -> None:
    first, second = instances
    owner = sign_up(first, "two@example.com")
    add_protected(first, owner, "team", server)
    client = WatchingClient(first, owner.key, "team")
    assert client.outcome["before"] == []
    # Started on the first instance, the browser comes back to the second one.
    back = follow_to_callback(server, authorize_url(first, owner, "team"))
    assert callback(second, owner, back) == "/studio/playbooks/team?notice=server-authorized"
    # The first instance's client hears of it (NOTIFY), and gets the tools.
    outcome = client.result()
    assert outcome["after"] == ["admin_echo", "echo", "whoami"]
    assert outcome["called"] == "through Director"
    assert server_status(first, owner, "team")["authorization"]["state"] == "authorized"


# --- step-up, disconnect, secrecy ---------------------------------------------------------------


def test_a_403_insufficient_scope_asks_for_the_scope_and_a_new_authorization_grants_it(
        daemon: Daemon, server: ProtectedServer) -> None:
    owner = sign_up(daemon, "stepup@example.com")
    add_protected(daemon, owner, "team", server)
    first = authorize_url(daemon, owner, "team")
    assert "scope=mcp&" in first or first.endswith("scope=mcp")
    callback(daemon, owner, follow_to_callback(server, first))
    session = open_session(daemon, owner.key, "team")
    answer = call_tool(daemon, owner.key, "team", session, "admin_echo", {"text": "x"})
    assert "HTTP 403: the server needs more access than was granted (scope mcp admin)" in \
        answer["error"]["message"], answer
    status = server_status(daemon, owner, "team")["authorization"]
    assert status["state"] == "unauthorized"
    assert status["reason"] == "the server asks for more access (scope mcp admin)"
    # The tools that need no more keep working meanwhile.
    assert echoed(echo(daemon, owner, session, "still", 3)) == "still"
    # Authorizing again asks for what was granted plus what the server asked for.
    again = authorize_url(daemon, owner, "team")
    assert "scope=mcp+admin" in again
    callback(daemon, owner, follow_to_callback(server, again))
    answer = call_tool(daemon, owner.key, "team", session, "admin_echo", {"text": "x"}, 4)
    assert echoed(answer) == "admin: x"
    assert server_status(daemon, owner, "team")["authorization"]["state"] == "authorized"


def test_disconnect_revokes_at_the_authorization_server_and_deletes(
        daemon: Daemon, server: ProtectedServer, migrated_url: str) -> None:
    owner, session = authorized_session(daemon, server, "disconnect@example.com")
    assert "echo" in tool_names(daemon, owner.key, "team", session)
    path = "/api/v1/playbooks/team/servers/prot/authorization"
    status, _, body = call(daemon, "DELETE", path, key=owner.key)
    assert status == 204, body
    assert server.stats()["revocations"] == ["refresh_token", "access_token"]
    assert stored_credentials(migrated_url) == 0
    assert server_status(daemon, owner, "team")["authorization"]["state"] == "unauthorized"
    eventually(lambda: tool_names(daemon, owner.key, "team", session) == [], timeout=20,
               interval=0.2)
    status, _, body = call(daemon, "DELETE", path, key=owner.key)
    assert (status, body["error"]["code"]) == (404, "not_found")
    status, _, body = call(daemon, "DELETE", "/api/v1/playbooks/team/servers/none/"
                                             "authorization", key=owner.key)
    assert status == 404


def test_tokens_are_never_logged_exported_or_shown(
        start_daemon: Callable[..., Daemon], migrated_url: str, server: ProtectedServer) -> None:
    metrics = free_port()
    daemon = started(start_daemon, migrated_url, METRICS_LISTEN=f"127.0.0.1:{metrics}")
    owner, session = authorized_session(daemon, server, "secrecy@example.com")
    assert echoed(echo(daemon, owner, session, "one")) == "one"
    server.post("/debug/expire")
    assert echoed(echo(daemon, owner, session, "two", 3)) == "two"
    server.post("/debug/revoke-refresh")
    server.post("/debug/expire")
    echo(daemon, owner, session, "three", 4)  # fails: refresh refused
    tokens = json.loads(server.request("GET", "/debug/tokens")[2])
    assert len(tokens) >= 4
    seen = [daemon.output()]
    for path in ("/api/v1/playbooks/team?reveal_secrets=true",
                 "/api/v1/playbooks/team/servers/prot?reveal_secrets=true",
                 "/api/v1/playbooks/team/export?include_secrets=true",
                 "/api/v1/playbooks/team/history", "/studio/playbooks/team",
                 "/studio/playbooks/team/servers/prot/connect"):
        studio = path.startswith("/studio/")
        status, _, body = call(daemon, "GET", path, key=None if studio else owner.key,
                               cookie=owner.cookie if studio else None)
        assert status == 200, (path, body)
        seen.append(json.dumps(body) if not isinstance(body, bytes) else body.decode())
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as answer:
        seen.append(answer.read().decode())
    leaked = [token for token in tokens if any(token in text for text in seen)]
    assert leaked == []


# --- the command line ---------------------------------------------------------------------------


def cli(daemon: Daemon, migrated_url: str, *argv: str) -> subprocess.Popen[str]:
    environ = base_environment(DATABASE_URL=migrated_url, BASE_URL=daemon.base, **INSECURE)
    return subprocess.Popen([DIRECTOR, *argv], env=environ, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_director_playbooks_authorize_prints_the_url_and_waits_for_the_browser(
        daemon: Daemon, server: ProtectedServer, migrated_url: str) -> None:
    owner = sign_up(daemon, "cli@example.com")
    add_protected(daemon, owner, "team", server)
    command = ("playbooks", "authorize", "team", "prot", "--user", owner.email)
    process = cli(daemon, migrated_url, *command)
    assert process.stdout is not None
    url = process.stdout.readline().strip()
    assert url.startswith(f"{server.issuer}/authorize?"), url
    callback(daemon, owner, follow_to_callback(server, url))
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 0, errors
    assert "authorized: 'prot' of playbook 'team'" in errors
    assert server_status(daemon, owner, "team")["authorization"]["state"] == "authorized"

    # Declined in the browser: the command says so and fails.
    server.knobs(deny=True)
    process = cli(daemon, migrated_url, *command)
    assert process.stdout is not None
    callback(daemon, owner, follow_to_callback(server, process.stdout.readline().strip()))
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "'prot' was not authorized: the authorization server answered access_denied" in errors

    # A server that is not there, and one that is not HTTP.
    process = cli(daemon, migrated_url, "playbooks", "authorize", "team", "nope", "--user",
                  owner.email)
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 1 and "playbook 'team' has no server 'nope'" in errors


# --- the secret that seals them -----------------------------------------------------------------

NEW_SECRET = "rotated-secret-" + "y" * 40
LOST_SECRET = "another-secret-" + "z" * 40


def sealed_values_opening_with(url: str, secret: str) -> tuple[int, int]:
    """(values that open with ``secret`` alone, all sealed values), OAuth and server secrets."""
    from director.crypto import SecretBox
    from director.oauth.client.maintenance import reseal_everything

    connection = psycopg2.connect(url)
    try:
        tally = reseal_everything(connection, SecretBox(secret), reseal=False)
    finally:
        connection.close()
    return tally.current, tally.current + tally.resealed + len(tally.unreadable)


def test_a_new_secret_opens_old_values_with_the_previous_one_and_rotate_reseals_them(
        start_daemon: Callable[..., Daemon], migrated_url: str, server: ProtectedServer) -> None:
    daemon = started(start_daemon, migrated_url)
    owner = sign_up(daemon, "rotate@example.com")
    add_protected(daemon, owner, "team", server)
    status, _, body = call(daemon, "POST", "/api/v1/playbooks/team/servers", {
        "name": "with-secret", "type": "http", "url": server.url, "disabled": True,
        "headers": {"X-Token": {"value": "header-secret", "secret": True}}}, key=owner.key)
    assert status == 201, body
    authorize(daemon, owner, "team", server)
    daemon.terminate()
    assert sealed_values_opening_with(migrated_url, NEW_SECRET)[0] == 0

    # The new secret, the old one kept as the previous: everything opens; the tokens the
    # daemon loads are sealed again with the new one at once.
    rotated = started(start_daemon, migrated_url, daemon.port, BETTER_AUTH_SECRET=NEW_SECRET,
                      BETTER_AUTH_SECRET_PREVIOUS=SECRET)
    session = open_session(rotated, owner.key, "team")
    assert echoed(echo(rotated, owner, session, "rotated")) == "rotated"
    opening, total = sealed_values_opening_with(migrated_url, NEW_SECRET)
    assert (opening, total) == (total - 2, total)  # all but the header and the registration
    authorize_url(rotated, owner, "team")  # uses the registration: sealed again
    assert sealed_values_opening_with(migrated_url, NEW_SECRET) == (total - 1, total)
    # `director secrets rotate` seals the rest.
    environ = base_environment(DATABASE_URL=migrated_url, BETTER_AUTH_SECRET=NEW_SECRET,
                               BETTER_AUTH_SECRET_PREVIOUS=SECRET)
    done = subprocess.run([DIRECTOR, "secrets", "rotate"], env=environ, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("sealed 1 value(s) again with BETTER_AUTH_SECRET;")
    assert sealed_values_opening_with(migrated_url, NEW_SECRET) == (total, total)
    rotated.terminate()
    # The previous secret can go.
    alone = started(start_daemon, migrated_url, daemon.port, BETTER_AUTH_SECRET=NEW_SECRET)
    session = open_session(alone, owner.key, "team")
    assert echoed(echo(alone, owner, session, "alone")) == "alone"


def registered(url: str) -> str:
    return str(query(url, "SELECT client_id FROM upstream_oauth_clients")[0][0])


def test_tokens_sealed_with_a_lost_secret_mean_authorizing_again_and_doctor_says_so(
        start_daemon: Callable[..., Daemon], migrated_url: str, server: ProtectedServer) -> None:
    daemon = started(start_daemon, migrated_url)
    owner = sign_up(daemon, "lost@example.com")
    add_protected(daemon, owner, "team", server)
    authorize(daemon, owner, "team", server)
    daemon.terminate()
    environ = base_environment(DATABASE_URL=migrated_url, BETTER_AUTH_SECRET=LOST_SECRET)
    checked = subprocess.run([DIRECTOR, "doctor", "--json"], env=environ, capture_output=True,
                             text=True, timeout=90, check=False)
    check = next(c for c in json.loads(checked.stdout)["checks"] if c["name"] == "upstream-oauth")
    assert check["status"] == "warn", check
    assert check["summary"].startswith("2 stored upstream OAuth credential(s) or client "
                                       "registration(s) do not open")
    assert check["details"] == [f"lost@example.com: {server.url} ({server.issuer})",
                                f"client registration {registered(migrated_url)} at "
                                f"{server.issuer}"]
    # The daemon starts all the same; the server is unauthorized, saying why.
    lost = started(start_daemon, migrated_url, daemon.port, BETTER_AUTH_SECRET=LOST_SECRET)
    authorization = server_status(lost, owner, "team")["authorization"]
    assert authorization["state"] == "unauthorized"
    assert "sealed with another BETTER_AUTH_SECRET" in authorization["reason"]
    # Authorizing again registers Director again (the old registration's secret is lost too).
    authorize(lost, owner, "team", server)
    session = open_session(lost, owner.key, "team")
    assert echoed(echo(lost, owner, session, "again")) == "again"
    assert server.stats()["registrations"] == 2


# --- the Studio ---------------------------------------------------------------------------------


def test_the_studio_connects_and_disconnects_a_server(
        daemon: Daemon, server: ProtectedServer) -> None:
    owner = sign_up(daemon, "studio@example.com")
    add_protected(daemon, owner, "team", server)
    browser = StudioClient(daemon)
    name, _, value = owner.cookie.split(";", 1)[0].partition("=")
    browser.cookies[name] = value
    # The page lists the tools (the server answers 401): unauthorized, with Connect.
    eventually(lambda: browser.get("/studio/playbooks/team").has(
        'href="/studio/playbooks/team/servers/prot/connect"'), timeout=30, interval=0.3)
    assert browser.last is not None and browser.last.has("unauthorized")

    page = browser.get("/studio/playbooks/team/servers/prot/connect")
    assert page.status == 200, page.text
    assert page.has(server.issuer) and page.has("Connect prot")
    # The form may lead to the authorization server (form-action covers the redirect).
    assert f"form-action 'self' {server.origin};" in page.headers["content-security-policy"]
    page = browser.post("/studio/playbooks/team/servers/prot/connect")
    assert page.status == 303 and page.location.startswith(f"{server.issuer}/authorize?")
    landed = browser.get(follow_to_callback(server, page.location))
    assert landed.status == 303 and landed.location == \
        "/studio/playbooks/team?notice=server-authorized"
    page = browser.get(landed.location)
    assert page.has("Server authorized.") and page.has("Disconnect")
    eventually(lambda: browser.get("/studio/playbooks/team").has("admin_echo"), timeout=30,
               interval=0.3)

    page = browser.post("/studio/playbooks/team/servers/prot/disconnect")
    assert page.status == 303 and page.location == \
        "/studio/playbooks/team?notice=server-disconnected"
    assert server.stats()["revocations"] == ["refresh_token", "access_token"]
    assert server_status(daemon, owner, "team")["authorization"]["state"] == "unauthorized"
    # Without a CSRF token nothing happens.
    assert browser.post("/studio/playbooks/team/servers/prot/connect",
                        with_csrf=False).status == 403


# --- over HTTPS, with Director's client metadata document ---------------------------------------


def test_over_https_with_a_throwaway_ca_director_identifies_itself_by_its_metadata_document(
        migrated_url: str) -> None:
    directory = make_temp_dir("director-oauth-tls-")
    ca, certificate, key = throwaway_ca(directory)
    trust = ssl.create_default_context(cafile=str(ca))
    port = free_port()
    environ = base_environment(DATABASE_URL=migrated_url, PORT=str(port),
                               BASE_URL=f"https://127.0.0.1:{port}", SSL_CERT_FILE=str(ca),
                               **INSECURE)
    with protected_server(certificate, key, ca, trust) as server:
        server.knobs(cimd=True, registration=False)
        daemon = TlsDaemon(environ, certificate, key, trust)
        try:
            daemon.wait_healthy()
            owner = sign_up(daemon, "tls@example.com")
            add_protected(daemon, owner, "team", server)
            assert server.url.startswith("https://")
            url = authorize_url(daemon, owner, "team")
            metadata_url = f"https://127.0.0.1:{port}/oauth/client-metadata.json"
            assert f"client_id={urllib.parse.quote(metadata_url, safe='')}&" in url
            # The document lists the redirect URI of the flow under way, and is never cached.
            status, headers, body = daemon.request("GET", "/oauth/client-metadata.json")
            document = json.loads(body)
            assert (status, headers["cache-control"]) == (200, "no-store")
            assert document["client_id"] == metadata_url
            assert document["redirect_uris"] == [
                f"https://127.0.0.1:{port}/oauth/team/prot/callback"]
            assert document["token_endpoint_auth_method"] == "none"
            # The authorization server fetched it (trusting the same CA), and approved.
            assert callback(daemon, owner, follow_to_callback(server, url)) == \
                "/studio/playbooks/team?notice=server-authorized"
            session = open_session(daemon, owner.key, "team")
            assert echoed(echo(daemon, owner, session, "over TLS")) == "over TLS"
            stats = server.stats()
            assert stats["cimd_fetches"] >= 1 and stats["registrations"] == 0
            # Used, the flow's redirect URI leaves the document.
            assert json.loads(daemon.request("GET", "/oauth/client-metadata.json")[2])[
                "redirect_uris"] == []
        finally:
            daemon.stop()


def test_no_metadata_document_unless_base_url_is_https(daemon: Daemon) -> None:
    status, _, body = call(daemon, "GET", "/oauth/client-metadata.json")
    assert (status, body["error"]["code"]) == (404, "not_found")
