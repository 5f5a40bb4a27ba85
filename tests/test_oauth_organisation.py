"""Organisations: signing in through an external OpenID Connect provider (a local one the
test starts, over HTTPS), people matched to accounts by verified email; what the provider
says is checked (issuer, audience, nonce, state, verified email) and a refusal is a page that
says why. It leads MCP clients' authorizations through too."""

from __future__ import annotations

import http.client
import json
import re
import ssl
import subprocess
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import attrs
import pytest
from twisted.internet import task

from director.oauth.server.organisation import FLOW_SECONDS, StateCookies
from tests.accounts_helpers import call, sign_up
from tests.harness import DIRECTOR, Daemon, base_environment, make_temp_dir
from tests.oauth_helpers import protected_playbook, register, start_flow
from tests.oidc_provider import Provider

StartDaemon = Callable[..., Daemon]


@pytest.fixture
def provider() -> Iterator[Provider]:
    started = Provider(make_temp_dir("director-test-oidc-"))
    yield started
    started.close()


@attrs.define
class Browser:
    """Just enough of a browser: follows redirects across the daemon and the provider, and
    keeps the cookies each sets (a dictionary per host is plenty here)."""

    daemon: Daemon
    provider: Provider
    cookies: dict[str, str] = attrs.Factory(dict)

    def get(self, location: str) -> tuple[int, dict[str, str], bytes]:
        for _ in range(10):
            parts = urlsplit(location)
            path = parts.path + ("?" + parts.query if parts.query else "")
            connection: http.client.HTTPConnection
            if parts.netloc == "" or parts.port == self.daemon.port:
                connection = http.client.HTTPConnection("127.0.0.1", self.daemon.port,
                                                        timeout=10)
                cookie = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
                connection.request("GET", path, headers={"cookie": cookie} if cookie else {})
            else:
                context = ssl.create_default_context(cafile=str(self.provider.ca))
                connection = http.client.HTTPSConnection(parts.hostname or "", parts.port,
                                                         context=context, timeout=10)
                connection.request("GET", path)
            response = connection.getresponse()
            status, body = response.status, response.read()
            headers = {k.lower(): v for k, v in response.getheaders()}
            if parts.netloc == "" or parts.port == self.daemon.port:
                for value in response.headers.get_all("set-cookie") or []:
                    name, _, rest = value.partition("=")
                    if rest.split(";")[0]:
                        self.cookies[name] = rest.split(";")[0]
                    else:
                        self.cookies.pop(name, None)
            connection.close()
            if status not in (301, 302, 303):
                return status, headers, body
            location = headers["location"]
        raise AssertionError("too many redirects")


def start(start_daemon: StartDaemon, database_url: str, provider: Provider,
          **more: str) -> Daemon:
    daemon = start_daemon(DATABASE_URL=database_url, **provider.environment(), **more)
    daemon.wait_healthy()
    return daemon


def me(browser: Browser) -> dict[str, Any]:
    cookie = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
    status, _, body = browser.daemon.request("GET", "/api/v1/me", headers={"cookie": cookie})
    assert status == 200, body
    return dict(json.loads(body))


def test_a_new_person_signs_in_and_gets_an_account(start_daemon: StartDaemon,
                                                   migrated_url: str, provider: Provider) -> None:
    daemon = start(start_daemon, migrated_url, provider)
    status, _, page = daemon.request("GET", "/studio/login?next=/studio/account")
    assert status == 200
    assert b"Sign in with Acme SSO" in page
    assert b'href="/studio/login/oidc?next=%2Fstudio%2Faccount"' in page
    provider.claims = {"email": "New.Person@Example.com", "email_verified": True}
    browser = Browser(daemon, provider)
    status, headers, _ = browser.get("/studio/login/oidc?next=/studio/account")
    assert status == 200, headers
    assert me(browser)["email"] == "new.person@example.com"
    assert me(browser)["status"] == "active"
    request = provider.token_requests[-1]
    assert request["redirect_uri"] == f"http://localhost:{daemon.port}/studio/login/oidc/callback"
    # The account has no password: signing in with one fails as for any wrong password.
    assert call(daemon, "POST", "/api/v1/auth/login", {
        "email": "new.person@example.com", "password": "oidc:no-password"})[0] == 401


def test_an_existing_account_is_matched_by_verified_email(start_daemon: StartDaemon,
                                                          migrated_url: str,
                                                          provider: Provider) -> None:
    daemon = start(start_daemon, migrated_url, provider)
    account = sign_up(daemon, "someone@example.com")
    # The email only in userinfo (for the same subject): it is asked there.
    provider.userinfo = {"email": "someone@example.com", "email_verified": True}
    browser = Browser(daemon, provider)
    browser.get("/studio/login/oidc")
    assert me(browser)["id"] == account.user_id


@pytest.mark.parametrize(("claims", "fragment"), [
    ({"email": "a@example.com", "email_verified": False}, b"did not give a verified email"),
    ({"email": "a@example.com"}, b"did not give a verified email"),
    ({"email": "a@example.com", "email_verified": True, "iss": "https://evil.example"},
     b"was issued by"),
    ({"email": "a@example.com", "email_verified": True, "aud": "another-client"},
     b"not for this Director"),
    ({"email": "a@example.com", "email_verified": True, "nonce": "replayed"},
     b"does not answer this sign-in (nonce)"),
    ({"email": "a@example.com", "email_verified": True, "exp": 1000}, b"has expired"),
])
def test_what_the_provider_says_is_checked(start_daemon: StartDaemon, migrated_url: str,
                                           provider: Provider, claims: dict[str, Any],
                                           fragment: bytes) -> None:
    daemon = start(start_daemon, migrated_url, provider)
    provider.claims = claims
    browser = Browser(daemon, provider)
    status, _, page = browser.get("/studio/login/oidc")
    assert status == 403, page[:2000]
    assert fragment in page
    assert "director_session" not in browser.cookies


def test_refusals_of_the_flow_itself(start_daemon: StartDaemon, migrated_url: str,
                                     provider: Provider) -> None:
    daemon = start(start_daemon, migrated_url, provider)
    # A callback nobody started here (no state cookie, or another state).
    status, _, page = daemon.request("GET", "/studio/login/oidc/callback?code=x&state=y")
    assert status == 403 and b"was not started here" in page
    # The provider refused.
    provider.error = "access_denied"
    status, _, page = Browser(daemon, provider).get("/studio/login/oidc")
    assert status == 403 and b"did not sign you in: access_denied" in page
    provider.error = None
    # A disabled account stays out.
    account = sign_up(daemon, "gone@example.com")
    subprocess.run([DIRECTOR, "users", "disable", account.email], check=True,
                   env=base_environment(DATABASE_URL=migrated_url), capture_output=True)
    provider.claims = {"email": "gone@example.com", "email_verified": True}
    status, _, page = Browser(daemon, provider).get("/studio/login/oidc")
    assert status == 403 and b"this account is disabled" in page


def test_without_a_provider_there_is_no_such_page(start_daemon: StartDaemon,
                                                  migrated_url: str) -> None:
    daemon = start_daemon(DATABASE_URL=migrated_url)
    daemon.wait_healthy()
    assert daemon.request("GET", "/studio/login/oidc")[0] == 404
    assert b"Sign in with" not in daemon.request("GET", "/studio/login")[2]


def test_an_mcp_client_authorization_signs_in_through_the_provider(
        start_daemon: StartDaemon, migrated_url: str, provider: Provider) -> None:
    daemon = start(start_daemon, migrated_url, provider,
                   DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS="true")
    owner = protected_playbook(daemon, "owner@example.com")
    client = register(daemon)
    flow = start_flow(daemon, owner, client["client_id"])
    provider.claims = {"email": "owner@example.com", "email_verified": True}
    browser = Browser(daemon, provider)
    status, headers, _ = daemon.request("GET", flow.authorize_path())
    assert status == 302 and headers["location"].startswith("/studio/login?next=")
    status, _, page = daemon.request("GET", headers["location"])
    link = re.search(rb'href="(/studio/login/oidc\?next=[^"]+)"', page)
    assert link is not None
    status, _, page = browser.get(link[1].decode().replace("&amp;", "&"))
    assert status == 200 and b"Connect Test client?" in page  # the consent page, signed in


def test_a_sign_in_state_cookie_opens_until_the_flow_expires() -> None:
    clock = task.Clock()
    clock.advance(1_700_000_000.0)  # the expiry is written as a wall-clock time
    cookies = StateCookies("s" * 32, clock)
    sealed = cookies.seal({"state": "abc", "nonce": "n", "verifier": "v", "next": "/"})
    clock.advance(FLOW_SECONDS)
    assert cookies.open(sealed) == {"state": "abc", "nonce": "n", "verifier": "v", "next": "/",
                                    "expires": 1_700_000_000 + FLOW_SECONDS}
    clock.advance(1.0)
    assert cookies.open(sealed) is None
    assert StateCookies("t" * 32, clock).open(cookies.seal({"state": "x"})) is None  # signed
