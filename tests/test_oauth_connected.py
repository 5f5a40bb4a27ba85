"""Connected apps: each client with its grants, listed and revoked through the API, the Studio
page and ``director oauth grants``; a revocation signs the client out at once."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest

from tests.accounts_helpers import Account, call, eventually, sign_up
from tests.harness import Daemon
from tests.oauth_helpers import (
    initialize,
    mcp_post,
    protected_playbook,
    register,
    start_flow,
    tool_call,
)
from tests.test_admin_cli import director, fails, ok

StartDaemon = Callable[..., Daemon]
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
PING = {"jsonrpc": "2.0", "id": 9, "method": "ping"}


@pytest.fixture
def daemon(start_daemon: StartDaemon, migrated_url: str) -> Daemon:
    """A daemon whose playbooks may run the reference stdio server."""
    started = start_daemon(DATABASE_URL=migrated_url,
                           DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS="true")
    started.wait_healthy()
    return started


def connect(daemon: Daemon, owner: Account, name: str, playbook: str = "ref",
            grant: tuple[str, ...] | None = None) -> tuple[str, dict[str, str]]:
    client = register(daemon, client_name=name)
    tokens = start_flow(daemon, owner, client["client_id"], playbook).tokens(grant=grant)
    return client["client_id"], tokens


def test_the_api_lists_grants_and_revokes_one(daemon: Daemon) -> None:
    owner = protected_playbook(daemon, playbooks=("Ref", "Other"))
    stranger = sign_up(daemon, "stranger@example.com")
    editor_id, editor = connect(daemon, owner, "Editor", grant=())
    _, agent = connect(daemon, owner, "Agent", "other")
    status, _, listing = call(daemon, "GET", "/api/v1/oauth/grants", key=owner.key)
    assert status == 200
    assert [(g["client"]["name"], g["playbook"]["id"], g["scope"])
            for g in listing["items"]] == [("Editor", "ref", "mcp:read"),
                                           ("Agent", "other", "mcp:read mcp:tools offline_access")]
    first = listing["items"][0]
    assert first["client"] == {"client_id": editor_id, "name": "Editor", "kind": "registered",
                               "redirect_uris": ["http://127.0.0.1:8765/callback"]}
    assert first["resource"].endswith("/playbooks/ref/mcp")
    # Paged like every list of the API.
    status, _, page = call(daemon, "GET", "/api/v1/oauth/grants?limit=1", key=owner.key)
    assert len(page["items"]) == 1 and page["next_cursor"]
    status, _, rest = call(daemon, "GET",
                           f"/api/v1/oauth/grants?limit=1&cursor={page['next_cursor']}",
                           key=owner.key)
    assert [g["client"]["name"] for g in rest["items"]] == ["Agent"]
    # Another user sees none of them, and cannot revoke them.
    assert call(daemon, "GET", "/api/v1/oauth/grants", key=stranger.key)[2]["items"] == []
    assert call(daemon, "DELETE", f"/api/v1/oauth/grants/{first['id']}",
                key=stranger.key)[0] == 404
    assert call(daemon, "DELETE", "/api/v1/oauth/grants/not-a-uuid", key=owner.key)[0] == 404
    session = initialize(daemon, editor["access_token"])
    assert call(daemon, "DELETE", f"/api/v1/oauth/grants/{first['id']}",
                key=owner.key)[0] == 204
    assert mcp_post(daemon, editor["access_token"], PING, session=session)[0] == 401
    assert mcp_post(daemon, agent["access_token"], tool_call("add", {"a": 1, "b": 1}),
                    playbook="other", session=initialize(daemon, agent["access_token"],
                                                         "other"))[0] == 200
    assert [g["client"]["name"] for g in call(daemon, "GET", "/api/v1/oauth/grants",
                                              key=owner.key)[2]["items"]] == ["Agent"]


def test_the_studio_page_shows_each_app_and_disconnects_it(daemon: Daemon) -> None:
    owner = protected_playbook(daemon)
    client_id, tokens = connect(daemon, owner, "Desk app")
    connect(daemon, owner, "Desk app")  # the same name, another registration
    headers = {"cookie": owner.cookie}
    status, _, page = daemon.request("GET", "/studio/account", headers=headers)
    assert status == 200 and b'href="/studio/account/apps"' in page
    status, _, page = daemon.request("GET", "/studio/account/apps", headers=headers)
    assert status == 200
    text = page.decode()
    assert text.count("<h2>Desk app ") == 2 and "unverified" in text
    assert client_id in text and "Call the playbook" in text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', text)
    assert csrf is not None
    session = initialize(daemon, tokens["access_token"])
    status, response, _ = daemon.request(
        "POST", "/studio/account/apps/disconnect",
        f"csrf_token={csrf[1]}&client_id={client_id}".encode(),
        {**headers, "content-type": "application/x-www-form-urlencoded",
         "origin": f"http://localhost:{daemon.port}"})
    assert status == 303 and response["location"] == "/studio/account/apps?notice=revoked"
    assert mcp_post(daemon, tokens["access_token"], PING, session=session)[0] == 401
    status, _, page = daemon.request("GET", "/studio/account/apps?notice=revoked",
                                     headers=headers)
    assert b"signed out everywhere" in page and page.count(b"<h2>Desk app ") == 1
    # A form without its token changes nothing.
    status, _, _ = daemon.request(
        "POST", "/studio/account/apps/disconnect", f"client_id={client_id}".encode(),
        {**headers, "content-type": "application/x-www-form-urlencoded",
         "origin": f"http://localhost:{daemon.port}"})
    assert status == 403


def test_the_command_lists_and_revokes_grants(daemon: Daemon, migrated_url: str) -> None:
    owner = protected_playbook(daemon)
    client_id, tokens = connect(daemon, owner, "Terminal app")
    session = initialize(daemon, tokens["access_token"])
    listed = json.loads(ok(director(migrated_url, "oauth", "grants", "list", "--user",
                                    owner.email, "--json")))
    assert [g["client"]["name"] for g in listed["grants"]] == ["Terminal app"]
    grant_id = listed["grants"][0]["id"]
    table = ok(director(migrated_url, "oauth", "grants", "list", "--user", owner.email))
    assert "Terminal app" in table and grant_id in table
    fails(director(migrated_url, "oauth", "grants", "revoke", "--user", owner.email), 2,
          "name one grant")
    fails(director(migrated_url, "oauth", "grants", "revoke", "--user", owner.email, "nope"),
          2, "is not a grant id")
    fails(director(migrated_url, "oauth", "grants", "list", "--user", "nobody@example.com"),
          1, "no user with email")
    out = ok(director(migrated_url, "oauth", "grants", "revoke", "--user", owner.email,
                      grant_id))
    assert f"revoked grant {grant_id}" in out
    # The running daemon hears of it: the token stops working, its session ends.
    eventually(lambda: mcp_post(daemon, tokens["access_token"], PING,
                                session=session)[0] == 401, timeout=5)
    fails(director(migrated_url, "oauth", "grants", "revoke", "--user", owner.email, grant_id),
          1, "has no grant")
    fails(director(migrated_url, "oauth", "grants", "revoke", "--user", owner.email,
                   "--client", client_id), 1, "has no grant of client")
    other_id, other = connect(daemon, owner, "Other terminal")
    out = ok(director(migrated_url, "oauth", "grants", "revoke", "--user", owner.email,
                      "--client", other_id, "--json"))
    assert len(json.loads(out)["revoked"]) == 1
    eventually(lambda: mcp_post(daemon, other["access_token"], INIT)[0] == 401, timeout=5)
    assert "has no connected apps" in ok(director(migrated_url, "oauth", "grants", "list",
                                                  "--user", owner.email))
