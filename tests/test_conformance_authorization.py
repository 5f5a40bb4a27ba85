"""The official MCP conformance suite's *authorization-server* scenarios (``conformance
authorization``, the 0.2 pre-release: ``authorization-server-metadata-endpoint`` and
``authorization-code-grant``) against Director's OAuth authorization server (issue 13).

The code-grant scenario prints an authorization URL and waits for a browser to bring the user
back to its callback (``http://127.0.0.1:<port>/callback``); the test is that browser: it opens
the URL as a signed-in user, approves the consent page, and follows the redirect to the
callback. The suite then redeems the code itself (PKCE S256, ``resource`` = the playbook's MCP
URL) and checks the token response.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

from tests.accounts_helpers import call, eventually, sign_up
from tests.conformance.runner import NEXT, describe, missing_tools, run_authorization
from tests.harness import Daemon, free_port
from tests.oauth_helpers import Flow, base_url, register

StartDaemon = Callable[..., Daemon]

# Every check each scenario makes; a scenario that stops running one fails the test.
EXPECTED = {
    ("authorization-server-metadata-endpoint", "authorization-server-metadata"),
    ("authorization-server-metadata-endpoint", "authorization-server-metadata-cimd"),
    ("authorization-code-grant", "authorization-code-grant"),
}


def follow(location: str) -> None:
    """GET the suite's callback, as the browser does after the consent redirect (retried
    briefly: the suite prints the URL before its callback server is listening)."""

    def reached() -> bool:
        try:
            with urllib.request.urlopen(location, timeout=5) as response:  # noqa: S310 (loopback)
                assert response.status == 200, response.read()
            return True
        except urllib.error.URLError as error:
            if isinstance(error, urllib.error.HTTPError):
                raise
            return False

    eventually(reached, timeout=5)


def test_director_passes_the_authorization_server_scenarios(
        start_daemon: StartDaemon, migrated_url: str) -> None:
    reason = missing_tools(NEXT)
    assert reason is None, reason  # make test installs it; missing is a failure, not a skip
    daemon = start_daemon(DATABASE_URL=migrated_url)
    daemon.wait_healthy()
    issuer = base_url(daemon)
    owner = sign_up(daemon, "authorization@example.com")
    status, _, playbook = call(daemon, "POST", "/api/v1/playbooks", {"name": "conformance"},
                               key=owner.key)
    assert status == 201, playbook
    resource = f"{issuer}/playbooks/{playbook['id']}/mcp"
    port = free_port()
    client = register(daemon, client_name="MCP conformance suite",
                      redirect_uris=[f"http://127.0.0.1:{port}/callback"])
    opened: list[str] = []

    def browser(url: str) -> None:
        """The signed-in owner's browser: the consent page for exactly the suite's request,
        approved, and the redirect followed to the suite's callback."""
        opened.append(url)
        assert url.startswith(f"{issuer}/oauth/authorize?"), url
        parameters = {name: values[0] for name, values in parse_qs(urlsplit(url).query).items()}
        assert parameters["resource"] == resource and "code_challenge" in parameters
        flow = Flow(daemon, owner, client["client_id"], "", parameters)
        status, headers, body = flow.decide("allow")
        assert status == 302, body[:3000]
        assert headers["location"].startswith(f"http://127.0.0.1:{port}/callback?")
        follow(headers["location"])

    run = run_authorization(issuer, client_id=client["client_id"], resource=resource,
                            port=port, browser=browser, keep="authorization")
    print(f"\nconformance {NEXT.version()} authorization against Director: "
          f"{run.total_line} in {run.seconds:.1f}s")
    for check in run.checks:
        print("  " + describe(check))
    assert len(opened) == 1, run.output[-3000:]  # the code grant ran, through the consent page
    assert {check.key for check in run.checks} == EXPECTED, run.output[-3000:]
    failing = [describe(check) for check in run.checks if check.status != "SUCCESS"]
    assert not failing, "\n".join(failing) + "\n" + run.output[-3000:]
    assert run.total_line == f"Total: {len(EXPECTED)} passed, 0 failed", run.output[-3000:]
    # The suite compares iss with the metadata's issuer only when the redirect carries one:
    # Director's does (RFC 9207), so that comparison was made; and a real token came back.
    [grant] = run.of(("authorization-code-grant", "authorization-code-grant"))
    returned = parse_qs(urlsplit(grant.details["authorizationResponseUrl"]).query)
    assert returned["iss"] == [issuer]
    assert grant.details["body"]["token_type"] == "Bearer"
    assert grant.details["body"]["access_token"].startswith("dat_")
