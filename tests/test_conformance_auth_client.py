"""The official MCP conformance suite's client authorization scenarios (``conformance client
--scenario auth/…``) with Director as the OAuth client under test (issue 12, upstream OAuth).

Each scenario starts its own protected MCP server and authorization server and runs
``tests/conformance/director_client.py <server URL>``, which adds the server to a playbook of
a signed-in user of a daemon started here, has the user authorize it (the scenario's
authorization server approves without a user and redirects to Director's callback), and uses
the playbook's tools. The suite then judges what Director sent its servers. See
``tests/conformance/README.rst``, *The client authorization scenarios*.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.accounts_helpers import Account, sign_up
from tests.conformance.runner import (
    NEXT,
    NODE,
    STABLE,
    Run,
    Suite,
    describe,
    missing_tools,
    run_client,
)
from tests.harness import Daemon, PostgresServer, base_environment, free_port

ADAPTER = Path(__file__).parent / "conformance" / "director_client.py"

LEGACY = ("spec-permitted, not implemented: the 2025-03-26 revision's discovery (no "
          "protected-resource metadata; the authorization server at the MCP server's origin, "
          "or default /authorize, /token, /register endpoints). Director discovers as "
          "2025-06-18 and later require (RFC 9728 metadata first, which this server does not "
          "have: the authorization is refused with 'protected-resource metadata was not "
          "found'), so it never reaches this scenario's authorization server")

#: The client authorization scenarios of 0.2.0-alpha.12 that Director is tested against, each
#: with the checks it is known not to pass (check id: the status it has, why). Every other
#: check a scenario makes must be SUCCESS (INFO checks are the suite's log, not verdicts).
SCENARIOS: dict[str, dict[str, tuple[str, str]]] = {
    "auth/metadata-default": {},
    "auth/metadata-var1": {},
    "auth/metadata-var2": {},
    "auth/metadata-var3": {},
    "auth/scope-from-www-authenticate": {},
    "auth/scope-from-scopes-supported": {},
    "auth/scope-omitted-when-undefined": {},
    "auth/scope-step-up": {},
    "auth/scope-retry-limit": {},
    "auth/token-endpoint-auth-basic": {},
    "auth/token-endpoint-auth-post": {},
    "auth/token-endpoint-auth-none": {},
    "auth/pre-registration": {},
    "auth/resource-mismatch": {},
    "auth/offline-access-scope": {},
    "auth/offline-access-not-supported": {},
    "auth/authorization-server-migration": {},
    "auth/iss-supported": {},
    "auth/iss-not-advertised": {},
    "auth/iss-supported-missing": {},
    "auth/iss-wrong-issuer": {},
    "auth/iss-unexpected": {},
    "auth/iss-normalized": {},
    "auth/metadata-issuer-mismatch": {},
    "auth/2025-03-26-oauth-metadata-backcompat": {
        check: ("FAILURE", LEGACY) for check in (
            "authorization-server-metadata", "client-registration", "authorization-request",
            "token-request")},
    "auth/2025-03-26-oauth-endpoint-fallback": {
        check: ("FAILURE", LEGACY) for check in (
            "client-registration", "authorization-request", "token-request")},
}

#: Of those, the ones the pinned stable line (0.1.16) has too (run with both).
ONLY_NEXT = frozenset({"auth/authorization-server-migration", "auth/metadata-issuer-mismatch",
                       "auth/iss-supported", "auth/iss-not-advertised",
                       "auth/iss-supported-missing", "auth/iss-wrong-issuer",
                       "auth/iss-unexpected", "auth/iss-normalized"})
SUITES = {STABLE.label: STABLE, NEXT.label: NEXT}
CASES = [pytest.param(suite, scenario, id=f"{suite.label}:{scenario}")
         for suite in (STABLE, NEXT) for scenario in sorted(SCENARIOS)
         if suite is NEXT or scenario not in ONLY_NEXT]

GRANT = ("not what Director does: it is authorized by its users with the authorization code "
         "grant, never as itself")
#: The client authorization scenarios not run, and why.
NOT_APPLICABLE: dict[str, str] = {
    "auth/basic-cimd": (
        "the scenario expects the suite's own client id, https://conformance-test.local/"
        "client-metadata.json; Director's client id is the metadata document it serves at its "
        "own https BASE_URL (used when the server advertises client_id_metadata_document_"
        "supported: tests/test_upstream_oauth.py covers it over TLS)"),
    "auth/client-credentials-jwt": f"client credentials grant (SEP-1046): {GRANT}",
    "auth/client-credentials-basic": f"client credentials grant (SEP-1046): {GRANT}",
    "auth/enterprise-managed-authorization": f"token exchange / JWT bearer (SEP-990): {GRANT}",
    "auth/cross-app-access-complete-flow": f"cross-app access (token exchange): {GRANT}",
    "auth/wif-jwt-bearer": f"workload identity federation (SEP-1933): {GRANT}",
    "auth/dpop": "the DPoP extension (sender-constrained tokens), which Director does not "
                 "implement (an extension: not required of clients)",
    "auth/dpop-nonce": "the DPoP extension, which Director does not implement",
}


@pytest.fixture(scope="module")
def director(postgres: PostgresServer) -> Iterator[tuple[Daemon, Account]]:
    from director.db import migrate

    name = postgres.create_database()
    url = postgres.url_for(name)
    migrate.upgrade(url)
    port = free_port()
    daemon = Daemon(base_environment(DATABASE_URL=url, PORT=str(port),
                                     BASE_URL=f"http://127.0.0.1:{port}",
                                     DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS="true",
                                     API_KEY_RATE_LIMIT_MAX_REQUESTS="100000"))
    try:
        daemon.wait_healthy()
        yield daemon, sign_up(daemon, "conformance-client@example.com")
    finally:
        daemon.stop()
        postgres.drop_database(name)


def run(director: tuple[Daemon, Account], suite: Suite, scenario: str) -> Run:
    daemon, user = director
    return run_client(f"{sys.executable} {ADAPTER}", scenario, timeout=30,
                      keep=f"{suite.label}/{scenario.replace('/', '-')}", suite=suite,
                      environ={"DIRECTOR_CLIENT_PLAYBOOK": f"{suite.label}-{scenario}",
                               "DIRECTOR_CLIENT_PORT": str(daemon.port),
                               "DIRECTOR_CLIENT_KEY": user.key,
                               "DIRECTOR_CLIENT_COOKIE": user.cookie})


@pytest.mark.parametrize("suite", [STABLE, NEXT], ids=lambda suite: suite.label)
def test_every_client_authorization_scenario_is_run_or_said_not_applicable(
        suite: Suite) -> None:
    reason = missing_tools(suite)
    if reason:
        pytest.fail(reason)
    listed = subprocess.run([str(NODE), str(suite.index), "list", "--client"],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    scenarios = set(re.findall(r"^\s*- (auth/\S+)", listed, re.MULTILINE))
    assert len(scenarios) > 20, listed
    run_here = {case.values[1] for case in CASES if case.values[0] is suite}
    assert run_here <= scenarios, listed
    assert scenarios - run_here <= set(NOT_APPLICABLE), listed
    assert not set(SCENARIOS) & set(NOT_APPLICABLE)


@pytest.mark.parametrize(("suite", "scenario"), CASES)
def test_director_passes_the_scenario(director: tuple[Daemon, Account], suite: Suite,
                                      scenario: str) -> None:
    reason = missing_tools(suite)
    if reason:
        pytest.fail(reason)
    result = run(director, suite, scenario)
    # INFO checks are the suite's log of the exchanges (each request and answer), no verdict.
    verdicts = [check for check in result.checks if check.status != "INFO"]
    print(f"\n{scenario} ({suite.label}): {len(verdicts)} checks in {result.seconds:.1f}s")
    for check in verdicts:
        print(f"  {describe(check)}")
    assert verdicts, result.output[-4000:]
    known = SCENARIOS[scenario]
    wrong = [describe(check) for check in verdicts
             if check.status != known.get(check.id, ("SUCCESS", ""))[0]]
    assert not wrong, "\n".join(wrong) + "\n" + result.output[-6000:]
    # Each known failure is there (the list stays exact), and some checks pass.
    assert set(known) <= {check.id for check in verdicts}, known
    if known:
        print(f"  known: {next(iter(known.values()))[1]}")
    else:
        assert all(check.status == "SUCCESS" for check in verdicts)
