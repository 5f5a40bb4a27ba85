"""The OAuth authorization server and the protected playbooks, over raw HTTP: discovery, the
authorization code flow with PKCE and consent, tokens on the MCP endpoint, refresh with
rotation and reuse detection, revocation, registration, and every error path of issue 13."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import psycopg2
import pytest

from director.db.interactions import run_sync
from director.oauth.server.grants import purge_expired
from tests.accounts_helpers import Account, call, eventually
from tests.harness import Daemon, query
from tests.oauth_helpers import (
    REDIRECT,
    base_url,
    form,
    initialize,
    mcp_post,
    protected_playbook,
    redirected,
    register,
    start_flow,
    tool_call,
)

StartDaemon = Callable[..., Daemon]


@attrs.define
class Setup:
    daemon: Daemon
    owner: Account
    client: dict[str, Any]


@pytest.fixture
def setup(start_daemon: StartDaemon, migrated_url: str) -> Iterator[Setup]:
    daemon = start_daemon(DATABASE_URL=migrated_url,
                          DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS="true")
    daemon.wait_healthy()
    owner = protected_playbook(daemon, playbooks=("Ref", "Other"))
    yield Setup(daemon, owner, register(daemon))


def challenge_of(headers: dict[str, str]) -> str:
    return headers["www-authenticate"]


# --- discovery ------------------------------------------------------------------------------


def test_a_playbook_without_credentials_says_where_to_sign_in(setup: Setup) -> None:
    daemon = setup.daemon
    status, headers, _ = daemon.request("POST", "/playbooks/ref/mcp", json.dumps({}).encode(),
                                        {"content-type": "application/json"})
    assert status == 401
    base = base_url(daemon)
    assert challenge_of(headers) == (
        f'Bearer resource_metadata="{base}/.well-known/oauth-protected-resource/playbooks/ref'
        '/mcp", scope="mcp:read mcp:tools"')
    status, headers, body = call(daemon, "GET",
                                 "/.well-known/oauth-protected-resource/playbooks/ref/mcp")
    assert status == 200
    assert body == {"resource": f"{base}/playbooks/ref/mcp", "authorization_servers": [base],
                    "scopes_supported": ["mcp:read", "mcp:tools"],
                    "bearer_methods_supported": ["header"],
                    "resource_name": "Director playbook ref"}
    status, _, body = call(daemon, "GET", "/.well-known/oauth-authorization-server")
    assert status == 200
    assert body["issuer"] == base
    assert body["code_challenge_methods_supported"] == ["S256"]
    assert body["client_id_metadata_document_supported"] is True
    assert body["authorization_response_iss_parameter_supported"] is True
    assert call(daemon, "GET", "/.well-known/openid-configuration")[2] == body
    assert call(daemon, "GET", "/.well-known/oauth-protected-resource")[2]["resource"] == base
    assert call(daemon, "GET", "/.well-known/oauth-protected-resource/nothing")[0] == 404


# --- the flow -------------------------------------------------------------------------------


def test_authorization_code_with_pkce_gives_a_token_for_the_playbook(setup: Setup) -> None:
    daemon = setup.daemon
    flow = start_flow(daemon, setup.owner, setup.client["client_id"])
    tokens = flow.tokens()
    assert tokens["token_type"] == "Bearer"
    # Registered for refresh tokens: offline_access is offered, and was left checked.
    assert tokens["scope"] == "mcp:read mcp:tools offline_access"
    assert tokens["access_token"].startswith("dat_")
    assert tokens["refresh_token"].startswith("drt_")
    session = initialize(daemon, tokens["access_token"])
    status, _, body = mcp_post(daemon, tokens["access_token"],
                               tool_call("add", {"a": 2, "b": 40}), session=session)
    assert status == 200, body
    assert b'"42"' in body or b"42" in body


def test_the_consent_page_says_who_asks_where_it_returns_and_for_what(setup: Setup) -> None:
    daemon = setup.daemon
    flow = start_flow(daemon, setup.owner, setup.client["client_id"])
    status, headers, page = flow.open()
    assert status == 200
    text = page.decode()
    assert "Connect Test client?" in text
    assert "unverified" in text and "Unverified application" in text
    assert "It returns to a program on this computer" in text  # a loopback redirect
    assert "127.0.0.1" in text and REDIRECT in text
    assert "Ref" in text and "<code>ref</code>" in text
    assert "Call the playbook" in text
    # The form may lead to the client's redirect and nowhere else.
    assert "form-action 'self' http://127.0.0.1:8765;" in headers["content-security-policy"]


def test_signing_in_comes_back_to_the_authorization(setup: Setup) -> None:
    daemon = setup.daemon
    flow = start_flow(daemon, setup.owner, setup.client["client_id"])
    status, headers, _ = daemon.request("GET", flow.authorize_path())
    assert status == 302
    location = headers["location"]
    assert location.startswith("/studio/login?next=%2Foauth%2Fauthorize%3F")
    status, _, page = daemon.request("GET", location)
    assert status == 200 and b'name="next" value="/oauth/authorize?' in page
    # /connect, the original's consent path, leads to the same place.
    status, headers, _ = daemon.request("GET", "/connect?" + flow.authorize_path().split("?")[1])
    assert status == 302 and headers["location"] == flow.authorize_path()


def test_denying_sends_access_denied_back(setup: Setup) -> None:
    flow = start_flow(setup.daemon, setup.owner, setup.client["client_id"])
    status, headers, _ = flow.decide("deny")
    assert status == 302
    answer = redirected(headers["location"])
    assert answer["error"] == "access_denied"
    assert answer["state"] == flow.parameters["state"]
    assert answer["iss"] == base_url(setup.daemon)
    assert "code" not in answer


def test_a_consent_form_without_its_csrf_token_is_refused(setup: Setup) -> None:
    flow = start_flow(setup.daemon, setup.owner, setup.client["client_id"])
    fields = "&".join(f"{k}={v}" for k, v in flow.parameters.items()) + "&decision=allow"
    status, _, page = setup.daemon.request(
        "POST", "/oauth/authorize", fields.encode(),
        {"content-type": "application/x-www-form-urlencoded", "cookie": setup.owner.cookie,
         "origin": base_url(setup.daemon)})
    assert status == 403 and b"Cannot connect this application" in page


# --- authorization errors ---------------------------------------------------------------------


def test_an_unregistered_redirect_uri_is_never_redirected_to(setup: Setup) -> None:
    for redirect in ("https://evil.example/callback", "http://127.0.0.1:8765/other"):
        flow = start_flow(setup.daemon, setup.owner, setup.client["client_id"],
                          redirect_uri=redirect)
        status, headers, page = flow.open()
        assert status == 400, page[:2000]
        assert "location" not in headers
        assert b"not one of the addresses it registered" in page
    # An unknown client is a page too.
    status, headers, page = start_flow(setup.daemon, setup.owner, "dc_unknown").open()
    assert status == 400 and "location" not in headers and b"No application is registered" in page


def test_a_loopback_redirect_may_come_back_on_another_port(setup: Setup) -> None:
    flow = start_flow(setup.daemon, setup.owner, setup.client["client_id"],
                      redirect_uri="http://127.0.0.1:40123/callback")
    tokens = flow.tokens()  # exchanged with the same redirect_uri, port included
    assert tokens["access_token"].startswith("dat_")


@pytest.mark.parametrize(("overrides", "error", "fragment"), [
    ({"code_challenge": None}, "invalid_request", "code_challenge is required"),
    ({"code_challenge_method": "plain"}, "invalid_request", "must be S256"),
    ({"code_challenge": "short"}, "invalid_request", "43-character"),
    ({"resource": None}, "invalid_target", "resource is required"),
    ({"resource": "https://elsewhere.example/mcp"}, "invalid_target", "not a resource of"),
    ({"resource": "{base}/api/v1/me"}, "invalid_target", "name a playbook"),
    ({"resource": "{base}/playbooks/nobodys/mcp"}, "invalid_target", "has no playbook"),
    ({"scope": "mcp:read admin"}, "invalid_scope", "unknown scope 'admin'"),
    ({"response_type": "token"}, "unsupported_response_type", "must be code"),
])
def test_a_bad_authorization_request_goes_back_with_its_error(
        setup: Setup, overrides: dict[str, str | None], error: str, fragment: str) -> None:
    base = base_url(setup.daemon)
    values = {name: value.format(base=base) if value else value
              for name, value in overrides.items()}
    flow = start_flow(setup.daemon, setup.owner, setup.client["client_id"], **values)
    status, headers, body = flow.open()
    assert status == 302, body[:2000]
    answer = redirected(headers["location"])
    assert answer["error"] == error
    assert fragment in answer["error_description"]
    assert answer["state"] == flow.parameters["state"]
    assert answer["iss"] == base


# --- the token endpoint -----------------------------------------------------------------------


def test_the_code_is_bound_to_its_verifier_client_redirect_and_resource(setup: Setup) -> None:
    daemon = setup.daemon
    other = register(daemon, client_name="Other client")
    flow = start_flow(daemon, setup.owner, setup.client["client_id"])
    code = flow.code()
    for overrides, error, fragment in [
        ({"code_verifier": ""}, "invalid_request", "code_verifier is required"),
        ({"code_verifier": "x" * 50}, "invalid_grant", "does not match the code_challenge"),
        ({"code_verifier": "short"}, "invalid_grant", "43 to 128"),
        ({"redirect_uri": "http://127.0.0.1:8765/elsewhere"}, "invalid_grant", "redirect_uri"),
        ({"client_id": other["client_id"]}, "invalid_grant", "another client"),
        ({"resource": f"{base_url(daemon)}/playbooks/other/mcp"}, "invalid_target",
         "resource must be"),
        ({"resource": "https://elsewhere.example/mcp"}, "invalid_target", "not a resource"),
    ]:
        status, _, body = flow.exchange(code, **overrides)
        assert status == 400, (overrides, body)
        assert body["error"] == error, body
        assert fragment in body["error_description"], body
    # None of that used the code up.
    status, _, body = flow.exchange(code)
    assert status == 200, body


def test_a_code_used_twice_revokes_what_it_gave(setup: Setup) -> None:
    daemon = setup.daemon
    flow = start_flow(daemon, setup.owner, setup.client["client_id"])
    code = flow.code()
    status, _, tokens = flow.exchange(code)
    assert status == 200
    initialize(daemon, tokens["access_token"])
    status, _, body = flow.exchange(code)
    assert (status, body["error"]) == (400, "invalid_grant")
    assert "used already" in body["error_description"]
    status, headers, _ = mcp_post(daemon, tokens["access_token"], {"jsonrpc": "2.0", "id": 1,
                                                                  "method": "ping"})
    assert status == 401
    assert 'error="invalid_token"' in headers["www-authenticate"]
    status, _, body = form(daemon, "/oauth/token", {
        "grant_type": "refresh_token", "refresh_token": tokens["refresh_token"],
        "client_id": setup.client["client_id"]})
    assert (status, body["error"]) == (400, "invalid_grant")


def test_an_expired_code_is_refused(setup: Setup, migrated_url: str) -> None:
    flow = start_flow(setup.daemon, setup.owner, setup.client["client_id"])
    code = flow.code()
    query(migrated_url, "UPDATE oauth_codes SET expires_at = now() - interval '1 second'")
    status, _, body = flow.exchange(code)
    assert (status, body["error"]) == (400, "invalid_grant")
    assert "expired" in body["error_description"]


def test_token_endpoint_requests_it_cannot_read(setup: Setup) -> None:
    daemon = setup.daemon
    client_id = setup.client["client_id"]
    cases: list[tuple[dict[str, str], int, str]] = [
        ({"grant_type": "password", "client_id": client_id}, 400, "unsupported_grant_type"),
        ({"client_id": client_id}, 400, "invalid_request"),
        ({"grant_type": "authorization_code"}, 401, "invalid_client"),
        ({"grant_type": "authorization_code", "client_id": "dc_nobody"}, 401, "invalid_client"),
        ({"grant_type": "authorization_code", "client_id": client_id, "code": "nothing",
          "code_verifier": "v" * 43}, 400, "invalid_grant"),
        ({"grant_type": "authorization_code", "client_id": client_id,
          "client_secret": "a public client has none"}, 401, "invalid_client"),
    ]
    for fields, status_wanted, error in cases:
        status, headers, body = form(daemon, "/oauth/token", fields)
        assert (status, body["error"]) == (status_wanted, error), (fields, body)
        assert headers["cache-control"] == "no-store"
    status, _, body = daemon.request("POST", "/oauth/token", b"{}",
                                     {"content-type": "application/json"})
    assert status == 400 and json.loads(body)["error"] == "invalid_request"
    status, _, body = daemon.request(
        "POST", "/oauth/token", b"grant_type=a&grant_type=b&client_id=" + client_id.encode(),
        {"content-type": "application/x-www-form-urlencoded"})
    assert status == 400 and b"given 2 times" in body


# --- refresh --------------------------------------------------------------------------------


def refresh(setup: Setup, token: str, **more: str) -> tuple[int, dict[str, str], Any]:
    return form(setup.daemon, "/oauth/token", {
        "grant_type": "refresh_token", "refresh_token": token,
        "client_id": setup.client["client_id"], **more})


def test_refresh_rotates_and_a_reused_refresh_token_revokes_its_family(setup: Setup) -> None:
    daemon = setup.daemon
    first = start_flow(daemon, setup.owner, setup.client["client_id"]).tokens()
    status, _, second = refresh(setup, first["refresh_token"],
                                resource=f"{base_url(daemon)}/playbooks/ref/mcp")
    assert status == 200, second
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    session = initialize(daemon, second["access_token"])
    # The first refresh token again: a stolen copy, or a confused client. The family goes.
    status, _, body = refresh(setup, first["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")
    assert "used already" in body["error_description"]
    ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
    assert mcp_post(daemon, second["access_token"], ping, session=session)[0] == 401
    assert refresh(setup, second["refresh_token"])[2]["error"] == "invalid_grant"


def test_no_refresh_token_without_offline_access(setup: Setup) -> None:
    tokens = start_flow(setup.daemon, setup.owner, setup.client["client_id"]).tokens(
        grant=("mcp:tools",))
    assert tokens["scope"] == "mcp:read mcp:tools"
    assert "refresh_token" not in tokens
    # A client that did not register for refresh tokens is not offered them unless it asks.
    plain = register(setup.daemon, grant_types=["authorization_code"])
    flow = start_flow(setup.daemon, setup.owner, plain["client_id"])
    assert b"Stay connected" not in flow.open()[2]
    assert "refresh_token" not in flow.tokens()
    asking = start_flow(setup.daemon, setup.owner, plain["client_id"],
                        scope="mcp:read offline_access")
    assert asking.tokens()["refresh_token"].startswith("drt_")


def test_refresh_may_ask_for_less_never_for_more(setup: Setup) -> None:
    daemon = setup.daemon
    read_only = start_flow(daemon, setup.owner, setup.client["client_id"]).tokens(
        grant=("offline_access",))
    assert read_only["scope"] == "mcp:read offline_access"
    status, _, body = refresh(setup, read_only["refresh_token"], scope="mcp:read mcp:tools")
    assert (status, body["error"]) == (400, "invalid_scope")
    full = start_flow(daemon, setup.owner, setup.client["client_id"]).tokens()
    status, _, narrowed = refresh(setup, full["refresh_token"], scope="mcp:read")
    assert status == 200 and narrowed["scope"] == "mcp:read"
    session = initialize(daemon, narrowed["access_token"])
    status, _, _ = mcp_post(daemon, narrowed["access_token"], tool_call("add", {"a": 1, "b": 2}),
                            session=session)
    assert status == 403
    # The grant keeps its scope: the next refresh may have it all again.
    status, _, again = refresh(setup, narrowed["refresh_token"])
    assert status == 200 and again["scope"] == "mcp:read mcp:tools offline_access"
    status, _, body = refresh(setup, full["refresh_token"], resource="https://x.example/mcp")
    assert (status, body["error"]) == (400, "invalid_target")


# --- the resource side ------------------------------------------------------------------------


def test_a_token_for_one_playbook_is_refused_by_another(setup: Setup) -> None:
    daemon = setup.daemon
    tokens = start_flow(daemon, setup.owner, setup.client["client_id"]).tokens()
    status, headers, body = mcp_post(daemon, tokens["access_token"],
                                     {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                                      "params": {}}, playbook="other")
    assert status == 401, body
    header = headers["www-authenticate"]
    assert 'error="invalid_token"' in header
    assert "oauth-protected-resource/playbooks/other/mcp" in header
    assert b"issued for another playbook" in body
    # A playbook that does not exist for this user says the same (nothing to learn from it).
    assert mcp_post(daemon, tokens["access_token"], {"jsonrpc": "2.0", "id": 1, "method": "ping"},
                    playbook="missing")[0] == 401
    # And the REST API does not take it at all.
    status, _, body = daemon.request("GET", "/api/v1/me", headers={
        "authorization": f"Bearer {tokens['access_token']}"})
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_token"


def test_read_only_access_gets_insufficient_scope_on_a_tool_call(setup: Setup) -> None:
    daemon = setup.daemon
    tokens = start_flow(daemon, setup.owner, setup.client["client_id"]).tokens(grant=())
    token = tokens["access_token"]
    session = initialize(daemon, token)
    status, _, body = mcp_post(daemon, token, {"jsonrpc": "2.0", "id": 3,
                                               "method": "tools/list"}, session=session)
    assert status == 200 and b"echo" in body
    status, headers, body = mcp_post(daemon, token, tool_call("echo", {"text": "hi"}),
                                     session=session)
    assert status == 403
    header = headers["www-authenticate"]
    assert header.startswith('Bearer error="insufficient_scope"')
    assert 'scope="mcp:read mcp:tools"' in header
    assert "resource_metadata=" in header
    assert json.loads(body)["error"]["data"]["code"] == "insufficient_scope"


def test_a_token_asked_for_the_sse_endpoint_serves_the_legacy_transport(setup: Setup) -> None:
    daemon = setup.daemon
    tokens = start_flow(daemon, setup.owner, setup.client["client_id"], transport="sse").tokens()
    status, headers, _ = daemon.request("GET", "/playbooks/ref/sse")
    assert status == 401
    assert "oauth-protected-resource/playbooks/ref/sse" in headers["www-authenticate"]
    # The same playbook's Streamable HTTP endpoint takes it too.
    initialize(daemon, tokens["access_token"])


def test_a_garbled_or_expired_token_is_invalid(start_daemon: StartDaemon,
                                               migrated_url: str) -> None:
    daemon = start_daemon(DATABASE_URL=migrated_url, OAUTH_ACCESS_TOKEN_SECONDS="1",
                          DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS="true")
    daemon.wait_healthy()
    owner = protected_playbook(daemon)
    client = register(daemon)
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    status, headers, _ = mcp_post(daemon, "dat_" + "x" * 43, ping)
    assert status == 401 and 'error="invalid_token"' in headers["www-authenticate"]
    tokens = start_flow(daemon, owner, client["client_id"]).tokens()
    assert tokens["expires_in"] == 1
    eventually(lambda: mcp_post(daemon, tokens["access_token"], INIT_REQUEST)[0] == 401,
               timeout=15, interval=0.2)
    status, _, fresh = refresh_token(daemon, client["client_id"], tokens["refresh_token"])
    assert status == 200
    assert mcp_post(daemon, fresh["access_token"], INIT_REQUEST)[0] == 200


INIT_REQUEST = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                           "clientInfo": {"name": "raw", "version": "1"}}}


def refresh_token(daemon: Daemon, client_id: str, token: str) -> tuple[int, dict[str, str], Any]:
    return form(daemon, "/oauth/token", {"grant_type": "refresh_token", "refresh_token": token,
                                         "client_id": client_id})


# --- revocation -----------------------------------------------------------------------------


def test_revoking_a_token_revokes_its_grant_for_its_client_only(setup: Setup) -> None:
    daemon = setup.daemon
    client_id = setup.client["client_id"]
    tokens = start_flow(daemon, setup.owner, client_id).tokens()
    session = initialize(daemon, tokens["access_token"])
    other = register(daemon, client_name="Someone else")
    status, _, body = form(daemon, "/oauth/revoke", {"token": tokens["refresh_token"],
                                                     "client_id": other["client_id"]})
    assert status == 200 and body == b""  # says nothing, changes nothing
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    assert mcp_post(daemon, tokens["access_token"], ping, session=session)[0] == 200
    status, _, _ = form(daemon, "/oauth/revoke", {"token": tokens["refresh_token"],
                                                  "token_type_hint": "refresh_token",
                                                  "client_id": client_id})
    assert status == 200
    assert mcp_post(daemon, tokens["access_token"], ping, session=session)[0] == 401
    assert refresh(setup, tokens["refresh_token"])[2]["error"] == "invalid_grant"
    # Revoking what is gone already is still a 200 (RFC 7009 section 2.2).
    assert form(daemon, "/oauth/revoke", {"token": tokens["access_token"],
                                          "client_id": client_id})[0] == 200
    assert form(daemon, "/oauth/revoke", {"client_id": client_id})[2]["error"] == \
        "invalid_request"


# --- dynamic client registration ------------------------------------------------------------


@pytest.mark.parametrize(("metadata", "error", "fragment"), [
    ({"redirect_uris": []}, "invalid_redirect_uri", "redirect_uris is required"),
    ({"redirect_uris": ["http://attacker.example/cb"]}, "invalid_redirect_uri",
     "plain http is allowed only to this computer"),
    ({"redirect_uris": ["javascript:alert(1)"]}, "invalid_redirect_uri", "javascript: scheme"),
    ({"redirect_uris": ["https://app.example/cb#frag"]}, "invalid_redirect_uri", "fragment"),
    ({"redirect_uris": ["/relative"]}, "invalid_redirect_uri", "absolute URI"),
    ({"token_endpoint_auth_method": "private_key_jwt"}, "invalid_client_metadata",
     "not supported"),
    ({"grant_types": ["client_credentials"]}, "invalid_client_metadata", "client_credentials"),
    ({"grant_types": ["refresh_token"]}, "invalid_client_metadata", "must include"),
    ({"response_types": ["token"]}, "invalid_client_metadata", "response_types"),
    ({"client_name": 42}, "invalid_client_metadata", "client_name must be a string"),
    ({"scope": "everything"}, "invalid_client_metadata", "unknown scope"),
])
def test_a_registration_the_server_cannot_accept_says_why(
        setup: Setup, metadata: dict[str, Any], error: str, fragment: str) -> None:
    body = {"client_name": "Bad", "redirect_uris": [REDIRECT], **metadata}
    status, _, answer = call(setup.daemon, "POST", "/oauth/register", body)
    assert status == 400, answer
    assert answer["error"] == error
    assert fragment in answer["error_description"]


def test_registration_defaults_to_a_confidential_client_with_a_secret(setup: Setup) -> None:
    daemon = setup.daemon
    status, _, client = call(daemon, "POST", "/oauth/register", {
        "client_name": "Web app", "redirect_uris": ["https://app.example/callback"],
        "unknown_field": "ignored, as RFC 7591 says"})
    assert status == 201, client
    assert client["token_endpoint_auth_method"] == "client_secret_basic"
    assert client["client_secret_expires_at"] == 0
    assert "unknown_field" not in client
    flow = start_flow(daemon, setup.owner, client["client_id"],
                      redirect_uri="https://app.example/callback")
    status, headers, _ = flow.open()
    assert "form-action 'self' https://app.example;" in headers["content-security-policy"]
    code = flow.code()

    def basic(secret: str) -> dict[str, str]:
        raw = f"{client['client_id']}:{secret}".encode()
        return {"authorization": "Basic " + base64.b64encode(raw).decode()}

    fields = {"grant_type": "authorization_code", "code": code, "code_verifier": flow.verifier,
              "redirect_uri": "https://app.example/callback"}
    status, headers, body = form(daemon, "/oauth/token", fields, headers=basic("wrong"))
    assert (status, body["error"]) == (401, "invalid_client")
    assert headers["www-authenticate"].startswith("Basic")
    status, _, body = form(daemon, "/oauth/token", {**fields, "client_id": client["client_id"]})
    assert (status, body["error"]) == (401, "invalid_client")  # no secret at all
    status, _, body = form(daemon, "/oauth/token", fields,
                           headers=basic(client["client_secret"]))
    assert status == 200, body
    # client_secret_post works too, for the refresh.
    status, _, body = form(daemon, "/oauth/token", {
        "grant_type": "refresh_token", "refresh_token": body.get("refresh_token", "none"),
        "client_id": client["client_id"], "client_secret": client["client_secret"]})
    assert (status, body["error"]) == (400, "invalid_grant")  # it registered no refresh_token


def test_registrations_are_limited_per_address(start_daemon: StartDaemon,
                                               migrated_url: str) -> None:
    daemon = start_daemon(DATABASE_URL=migrated_url, OAUTH_REGISTRATIONS_PER_HOUR="2")
    daemon.wait_healthy()
    register(daemon)
    # A refused body costs nothing.
    assert call(daemon, "POST", "/oauth/register", {"redirect_uris": []})[0] == 400
    register(daemon)
    status, headers, body = call(daemon, "POST", "/oauth/register", {
        "client_name": "Third", "redirect_uris": [REDIRECT]})
    assert status == 429, body
    assert int(headers["retry-after"]) > 0
    assert body["error"] == "temporarily_unavailable"
    status, _, body = daemon.request("POST", "/oauth/register", b"not json",
                                     {"content-type": "application/json"})
    assert status == 400 and json.loads(body)["error"] == "invalid_client_metadata"


def test_unused_registrations_expire(setup: Setup, migrated_url: str) -> None:
    used = setup.client["client_id"]
    start_flow(setup.daemon, setup.owner, used).code()
    unused = register(setup.daemon)["client_id"]
    query(migrated_url, "UPDATE oauth_clients SET created_at = now() - interval '2 days'")
    connection = psycopg2.connect(migrated_url)
    try:
        run_sync(connection, purge_expired())
    finally:
        connection.close()
    left = {row[0] for row in query(migrated_url, "SELECT client_id FROM oauth_clients")}
    assert used in left and unused not in left


def test_a_session_continues_with_the_refreshed_token(setup: Setup) -> None:
    """Sessions are bound to the grant, not to one access token: a refresh every hour does
    not end them (another grant's token does not reach them)."""
    daemon = setup.daemon
    first = start_flow(daemon, setup.owner, setup.client["client_id"]).tokens()
    session = initialize(daemon, first["access_token"])
    status, _, second = refresh(setup, first["refresh_token"])
    assert status == 200
    ping = {"jsonrpc": "2.0", "id": 4, "method": "ping"}
    assert mcp_post(daemon, second["access_token"], ping, session=session)[0] == 200
    other = start_flow(daemon, setup.owner, setup.client["client_id"]).tokens()
    assert mcp_post(daemon, other["access_token"], ping, session=session)[0] == 404
