"""Every management route x every kind of caller, with the status each must get.

The table is checked against the routes the daemon actually has and the OpenAPI document, so a
route cannot be added without deciding here who may call it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import attrs
import psycopg2
import pytest

from director.accounts import store
from director.db.interactions import run_sync
from director.web import v1  # noqa: F401 - importing it registers every route
from director.web.api import api
from director.web.openapi import document
from tests.accounts_helpers import Account, call, eventually, sign_up
from tests.harness import Daemon

CALLERS = ("anonymous", "wrong_key", "revoked_key", "other_user", "owner", "pending_user")

#: (method, OpenAPI path) -> expected status per caller. "other_user" acts on the owner's
#: objects (404: never reveal that they exist); on routes without an object it acts on itself.
MATRIX: dict[tuple[str, str], dict[str, int]] = {
    ("post", "/auth/logout"): dict(anonymous=401, wrong_key=401, revoked_key=401,
                                   other_user=204, owner=204, pending_user=204),
    ("get", "/me"): dict(anonymous=401, wrong_key=401, revoked_key=401, other_user=200,
                         owner=200, pending_user=200),
    ("post", "/me/password"): dict(anonymous=401, wrong_key=401, revoked_key=401,
                                   other_user=204, owner=204, pending_user=204),
    ("get", "/api-keys"): dict(anonymous=401, wrong_key=401, revoked_key=401, other_user=200,
                               owner=200, pending_user=403),
    ("post", "/api-keys"): dict(anonymous=401, wrong_key=401, revoked_key=401, other_user=201,
                                owner=201, pending_user=403),
    ("delete", "/api-keys/{key_id}"): dict(anonymous=401, wrong_key=401, revoked_key=401,
                                           other_user=404, owner=204, pending_user=403),
    ("post", "/api-keys/{key_id}/regenerate"): dict(anonymous=401, wrong_key=401,
                                                    revoked_key=401, other_user=404, owner=200,
                                                    pending_user=403),
}


def _playbook_row(success: int, *, own_object: bool = True) -> dict[str, int]:
    """Playbook routes: only an active owner may act; another user's playbook is not found."""
    return dict(anonymous=401, wrong_key=401, revoked_key=401,
                other_user=404 if own_object else success, owner=success, pending_user=403)


MATRIX.update({
    ("get", "/playbooks"): _playbook_row(200, own_object=False),
    ("post", "/playbooks"): _playbook_row(201, own_object=False),
    ("get", "/playbooks/{playbook_id}"): _playbook_row(200),
    ("patch", "/playbooks/{playbook_id}"): _playbook_row(200),
    ("delete", "/playbooks/{playbook_id}"): _playbook_row(204),
    ("get", "/playbooks/{playbook_id}/servers"): _playbook_row(200),
    ("post", "/playbooks/{playbook_id}/servers"): _playbook_row(201),
    ("get", "/playbooks/{playbook_id}/servers/{name}"): _playbook_row(200),
    ("patch", "/playbooks/{playbook_id}/servers/{name}"): _playbook_row(200),
    ("delete", "/playbooks/{playbook_id}/servers/{name}"): _playbook_row(204),
    ("patch", "/playbooks/{playbook_id}/tools"): _playbook_row(200),
    ("get", "/playbooks/{playbook_id}/prompts"): _playbook_row(200),
    ("post", "/playbooks/{playbook_id}/prompts"): _playbook_row(201),
    ("get", "/playbooks/{playbook_id}/prompts/{name}"): _playbook_row(200),
    ("patch", "/playbooks/{playbook_id}/prompts/{name}"): _playbook_row(200),
    ("delete", "/playbooks/{playbook_id}/prompts/{name}"): _playbook_row(204),
    ("get", "/playbooks/{playbook_id}/connection"): _playbook_row(200),
    ("get", "/playbooks/{playbook_id}/history"): _playbook_row(200),
    ("get", "/playbooks/{playbook_id}/export"): _playbook_row(200),
    ("post", "/playbooks/import"): _playbook_row(201, own_object=False),
})
MATRIX.update({
    ("get", "/registry/servers"): _playbook_row(200, own_object=False),
    ("get", "/registry/servers/{namespace}/{name}"): _playbook_row(200, own_object=False),
    ("post", "/playbooks/{playbook_id}/servers/from-registry"): _playbook_row(201),
    ("get", "/playbooks/{playbook_id}/servers/{name}/registry"): _playbook_row(200),
    ("post", "/playbooks/{playbook_id}/servers/{name}/registry-update"): _playbook_row(200),
})
MATRIX.update({
    # Upstream OAuth on the owner's https server, whose name does not resolve here: past the
    # authorization, the owner's request reaches discovery (502: cannot be discovered) and
    # finds no stored authorization to disconnect (404, "no authorization of yours").
    ("post", "/playbooks/{playbook_id}/servers/{name}/authorize"): _playbook_row(502),
    ("delete", "/playbooks/{playbook_id}/servers/{name}/authorization"): _playbook_row(404),
})
MATRIX.update({
    ("get", "/oauth/grants"): _playbook_row(200, own_object=False),
    ("delete", "/oauth/grants/{grant_id}"): _playbook_row(204),
})
PUBLIC = {("post", "/auth/signup"), ("post", "/auth/login"), ("get", "/openapi.json")}


def test_every_route_is_documented_and_in_the_matrix() -> None:
    documented = {(method, path) for path, item in document()["paths"].items()
                  for method in item}
    assert documented == set(MATRIX) | PUBLIC
    routed = set()
    for rule in api.url_map.iter_rules():
        path = rule.rule.replace("<", "{").replace(">", "}")
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                routed.add((method.lower(), path))
    assert routed == documented


@pytest.fixture(scope="module")
def world(postgres: Any) -> Any:  # one daemon and its users for the whole matrix
    from director.db import migrate
    from tests.harness import Daemon as DaemonClass
    from tests.harness import base_environment, free_port

    name = postgres.create_database()
    url = postgres.url_for(name)
    migrate.upgrade(url)
    from tests import registry_catalogue
    from tests.harness import make_temp_dir

    catalogue = registry_catalogue.write(make_temp_dir("director-test-matrix-") / "c.json")
    daemon = DaemonClass(base_environment(DATABASE_URL=url, PORT=str(free_port()),
                                          WAITLIST_ENABLED="true",
                                          REGISTRY_URL=f"file://{catalogue}",
                                          # One owner (and key) makes every case's objects:
                                          # thousands of requests a minute on a fast machine,
                                          # over the default limits (test_rate_limits's part).
                                          USER_RATE_LIMIT_MAX_REQUESTS="1000000",
                                          API_KEY_RATE_LIMIT_MAX_REQUESTS="1000000"))
    daemon.wait_healthy()
    yield daemon, url
    daemon.stop()
    postgres.drop_database(name)


@pytest.fixture(scope="module")
def owner_account(world: Any) -> Account:
    """The owner of every case's objects: one account (a password hash per case made the
    matrix slow), a fresh key per case (so no case shares another's rate limit)."""
    daemon, url = world
    owner = sign_up(daemon, f"owner-{uuid.uuid4().hex[:10]}@example.com")
    _activate(daemon, url, owner)
    return owner


def _activate(daemon: Daemon, url: str, account: Account) -> None:
    connection = psycopg2.connect(url)
    try:
        run_sync(connection, store.set_status(account.email, "active"))
    finally:
        connection.close()
    eventually(lambda: call(daemon, "GET", "/api/v1/api-keys", key=account.key)[0] == 200, 1.0)


def _new_key(daemon: Daemon, account: Account) -> dict[str, Any]:
    status, _, body = call(daemon, "POST", "/api/v1/api-keys",
                           {"name": f"k-{uuid.uuid4().hex[:8]}"}, key=account.key)
    assert status == 201, body
    return dict(body)


#: What the owner's fresh playbook holds, for the routes that act on a server or a prompt. An
#: https URL whose name does not resolve here passes the default rails.
_SERVER = {"name": "web", "type": "http", "url": "https://mcp.example.com/mcp"}
_PROMPT = {"name": "greet", "body": "Say hello to {{who}}", "arguments": [{"name": "who"}]}
#: A remote entry of tests/registry_catalogue.py: an https server, so the default rails pass.
_FROM_REGISTRY = {"name": "io.example/weather", "server_name": "weather",
                  "inputs": {"url.tenant": "acme", "header.Authorization.token": "t"}}
#: A valid body for each playbook route that takes one.
_PLAYBOOK_BODIES: dict[tuple[str, str], Any] = {
    ("post", "/playbooks"): {"name": "Matrix"},
    ("patch", "/playbooks/{playbook_id}"): {"description": "changed"},
    ("post", "/playbooks/{playbook_id}/servers"): {
        "name": "added", "type": "sse", "url": "https://mcp.example.com/sse"},
    ("patch", "/playbooks/{playbook_id}/servers/{name}"): {"timeout_seconds": 30},
    ("patch", "/playbooks/{playbook_id}/tools"): {
        "tools": [{"server": "web", "name": "search", "disabled": True}]},
    ("post", "/playbooks/{playbook_id}/prompts"): {"name": "added", "body": "Hi"},
    ("patch", "/playbooks/{playbook_id}/prompts/{name}"): {"title": "Changed"},
    ("post", "/playbooks/{playbook_id}/servers/from-registry"): _FROM_REGISTRY,
    ("post", "/playbooks/{playbook_id}/servers/{name}/registry-update"): {},
}


def _new_playbook(daemon: Daemon, owner: Account, path: str) -> str:
    """A fresh playbook of the owner's, with the server or prompt ``path`` acts on."""
    playbook_id = f"pb-{uuid.uuid4().hex[:10]}"
    status, _, body = call(daemon, "POST", "/api/v1/playbooks",
                           {"name": "Matrix", "id": playbook_id}, key=owner.key)
    assert status == 201, body
    parts: list[tuple[str, Any]] = []
    if "/registry" in path and "/servers/{name}" in path:
        parts.append(("servers/from-registry", _FROM_REGISTRY))
    elif "/servers/" in path or path.endswith("/tools"):
        parts.append(("servers", _SERVER))
    if "/prompts/" in path:
        parts.append(("prompts", _PROMPT))
    for part, payload in parts:
        status, _, body = call(daemon, "POST", f"/api/v1/playbooks/{playbook_id}/{part}",
                               payload, key=owner.key)
        assert status == 201, body
    return playbook_id


def _new_grant(url: str, daemon: Daemon, owner: Account) -> str:
    """A grant of the owner's to a client on a fresh playbook (as the consent would make)."""
    playbook_id = _new_playbook(daemon, owner, "")
    client_id = f"dc_matrix{uuid.uuid4().hex[:10]}"
    connection = psycopg2.connect(url)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO oauth_clients (client_id, kind, redirect_uris, metadata) "
                           "VALUES (%s, 'registered', %s, '{}')",
                           (client_id, ["http://127.0.0.1:1/cb"]))
            cursor.execute(
                "INSERT INTO oauth_grants (user_id, client_id, playbook_pk, resource, scope) "
                "SELECT user_id, %s, pk, 'r', 'mcp:read' FROM playbooks WHERE id = %s "
                "AND user_id = %s RETURNING id", (client_id, playbook_id, owner.user_id))
            return str(cursor.fetchone()[0])
    finally:
        connection.close()


def _request_for(method: str, path: str, owner: Account, daemon: Daemon,
                 password: str, url: str) -> tuple[str, Any]:
    concrete = path
    if "{grant_id}" in path:
        concrete = path.replace("{grant_id}", _new_grant(url, daemon, owner))
    if "{key_id}" in path:
        concrete = path.replace("{key_id}", _new_key(daemon, owner)["id"])
    if "{playbook_id}" in path:
        concrete = concrete.replace("{playbook_id}", _new_playbook(daemon, owner, path))
        concrete = concrete.replace("{name}", _PROMPT["name"] if "/prompts/" in path
                                    else _FROM_REGISTRY["server_name"] if "/registry" in path
                                    else _SERVER["name"])
    if "{namespace}" in path:
        namespace, name = str(_FROM_REGISTRY["name"]).split("/")
        concrete = concrete.replace("{namespace}", namespace).replace("{name}", name)
    body: Any = {}
    if path == "/api-keys" and method == "post":
        body = {"name": f"n-{uuid.uuid4().hex[:8]}"}
    elif path == "/me/password":
        body = {"current_password": password, "new_password": password}
    elif (method, path) in _PLAYBOOK_BODIES:
        body = _PLAYBOOK_BODIES[(method, path)]
    elif path == "/playbooks/import":
        body = f"version: 1\nname: Matrix {uuid.uuid4().hex[:8]}\n".encode()
    return "/api/v1" + concrete, (body if method != "get" else None)


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize(("method", "path"), sorted(MATRIX))
def test_authorization(world: Any, owner_account: Account, method: str, path: str,
                       caller: str) -> None:
    daemon, url = world
    suffix = uuid.uuid4().hex[:10]
    fresh = _new_key(daemon, owner_account)
    owner = attrs.evolve(owner_account, key=fresh["key"], key_id=fresh["id"])
    presented: dict[str, Callable[[], dict[str, str]]] = {
        "anonymous": lambda: {},
        "wrong_key": lambda: {"x-api-key": "dk_" + "Z" * 64},
        "owner": lambda: {"x-api-key": owner.key},
    }
    if caller == "revoked_key":
        doomed = _new_key(daemon, owner)
        assert call(daemon, "DELETE", f"/api/v1/api-keys/{doomed['id']}", key=owner.key)[0] == 204
        presented["revoked_key"] = lambda: {"x-api-key": doomed["key"]}
    elif caller == "other_user":
        other = sign_up(daemon, f"other-{suffix}@example.com")
        _activate(daemon, url, other)
        presented["other_user"] = lambda: {"x-api-key": other.key}
    elif caller == "pending_user":
        pending = sign_up(daemon, f"pending-{suffix}@example.com")
        presented["pending_user"] = lambda: {"x-api-key": pending.key}

    target, body = _request_for(method, path, owner, daemon, "correct horse battery", url)
    if path in ("/auth/logout", "/me/password") and caller in ("owner", "other_user",
                                                               "pending_user"):
        # Cookie routes: sign the caller in and use the session.
        email = {"owner": owner.email}.get(caller) or f"{caller.split('_')[0]}-{suffix}@example.com"
        _, headers, _ = call(daemon, "POST", "/api/v1/auth/login",
                             {"email": email, "password": "correct horse battery"})
        status, _, response = call(daemon, method.upper(), target, body,
                                   cookie=headers["set-cookie"])
    else:
        headers = presented[caller]()
        if path == "/playbooks/import":
            headers["content-type"] = "application/yaml"
        status, _, response = call(daemon, method.upper(), target, body, headers=headers)
    assert status == MATRIX[(method, path)][caller], (caller, method, path, response)
    if status >= 400:
        assert set(response["error"]) == {"code", "message", "details"}
