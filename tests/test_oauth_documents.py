"""Clients identified by a Client ID Metadata Document: fetched from a real local HTTPS site
(its own CA, trusted by the daemon through ``SSL_CERT_FILE``), checked, cached, and refused
when the document is huge, slow, redirects, names another URL, or sits where the SSRF rail
forbids."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import attrs
import pytest

from tests.accounts_helpers import Account
from tests.harness import Daemon, make_temp_dir
from tests.https_documents import DocumentSite, document_site
from tests.oauth_helpers import initialize, mcp_post, protected_playbook, start_flow, tool_call

StartDaemon = Callable[..., Daemon]


@pytest.fixture
def site() -> Iterator[DocumentSite]:
    yield from document_site(make_temp_dir("director-test-cimd-"))


@attrs.define
class Setup:
    daemon: Daemon
    owner: Account
    site: DocumentSite


def start(start_daemon: StartDaemon, database_url: str, site: DocumentSite,
          insecure: bool = True) -> Setup:
    environment = {"DATABASE_URL": database_url, "SSL_CERT_FILE": str(site.ca),
                   "DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS": "true"}
    if insecure:  # the site is on localhost: only this flag lets the rail through
        environment["DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS"] = "true"
    daemon = start_daemon(**environment)
    daemon.wait_healthy()
    return Setup(daemon, protected_playbook(daemon), site)


@pytest.fixture
def setup(start_daemon: StartDaemon, migrated_url: str, site: DocumentSite) -> Setup:
    return start(start_daemon, migrated_url, site)


def page_of(setup: Setup, client_id: str) -> tuple[int, bytes]:
    status, headers, page = start_flow(setup.daemon, setup.owner, client_id).open()
    assert "location" not in headers or status == 302
    return status, page


def test_a_published_client_signs_in_and_its_document_is_cached(setup: Setup) -> None:
    client_id = setup.site.publish("/client.json", setup.site.document("/client.json"))
    flow = start_flow(setup.daemon, setup.owner, client_id)
    status, _, page = flow.open()
    assert status == 200, page[:2000]
    assert b"Connect Published app?" in page
    assert b"published by localhost" in page
    assert b"Unverified application" not in page
    tokens = flow.tokens()
    session = initialize(setup.daemon, tokens["access_token"])
    status, _, body = mcp_post(setup.daemon, tokens["access_token"],
                               tool_call("echo", {"text": "published"}), session=session)
    assert status == 200 and b"published" in body
    # A second authorization within max-age uses the cached document.
    assert start_flow(setup.daemon, setup.owner, client_id).open()[0] == 200
    assert setup.site.hits["/client.json"] == 1


def test_a_document_that_says_no_store_is_fetched_each_time(setup: Setup) -> None:
    client_id = setup.site.publish("/fresh.json", setup.site.document("/fresh.json"),
                                   cache="no-store")
    for _ in range(2):
        assert page_of(setup, client_id)[0] == 200
    assert setup.site.hits["/fresh.json"] == 2


def test_documents_that_cannot_identify_a_client_are_refused(setup: Setup) -> None:
    site = setup.site
    cases = {
        "/huge.json": (site.publish("/huge.json", site.document(
            "/huge.json", client_name="x" * 100, padding="p" * 1_000_000)),
            b"larger than 32768 bytes"),
        "/unsized.json": (site.answer("/unsized.json", 200, {
            "Content-Type": "application/json", "Content-Length": "omit"}, b" " * 200_000),
            b"larger than 32768 bytes"),
        "/redirect.json": (site.answer("/redirect.json", 302,
                                       {"Location": site.url("/client.json")}, b""),
                           b"redirect, which is not followed"),
        "/elsewhere.json": (site.publish("/elsewhere.json", site.document(
            "/elsewhere.json", client_id="https://elsewhere.example/client.json")),
            b"is not its own URL"),
        "/secret.json": (site.publish("/secret.json", site.document(
            "/secret.json", client_secret="s3cret")), b"must not contain client_secret"),
        "/basic.json": (site.publish("/basic.json", site.document(
            "/basic.json", token_endpoint_auth_method="client_secret_basic")),
            b"not supported for a metadata document"),
        "/unnamed.json": (site.publish("/unnamed.json", site.document(
            "/unnamed.json", client_name=None)), b"has no client_name"),
        "/html.json": (site.publish("/html.json", site.document("/html.json"),
                                    content_type="text/html"), b"not application/json"),
        "/missing.json": (site.url("/missing.json"), b"answered 404"),
        "/bad-redirect.json": (site.publish("/bad-redirect.json", site.document(
            "/bad-redirect.json", redirect_uris=["http://evil.example/cb"])),
            b"plain http is allowed only to this computer"),
    }
    for path, (client_id, fragment) in cases.items():
        status, page = page_of(setup, client_id)
        assert status == 400, (path, page[:1500])
        assert fragment in page, (path, page[:3000])
    assert setup.site.hits["/redirect.json"] == 1  # not followed, and the failure remembered
    assert page_of(setup, cases["/redirect.json"][0])[0] == 400
    assert setup.site.hits["/redirect.json"] == 1


def test_a_slow_document_is_given_up_on(setup: Setup) -> None:
    client_id = setup.site.publish("/slow.json", setup.site.document("/slow.json"), delay=8)
    status, page = page_of(setup, client_id)
    assert status == 400
    assert b"took longer than 5 s" in page, page[page.find(b"error-box"):][:600]


def test_a_client_id_url_must_be_https_with_a_path(setup: Setup) -> None:
    for client_id, fragment in [(f"https://localhost:{setup.site.port}/", b"must have a path"),
                                (f"https://localhost:{setup.site.port}/a/../b.json",
                                 b"must not have . or .. path segments"),
                                ("https://user:pw@localhost/c.json", b"user name or password")]:
        status, page = page_of(setup, client_id)
        assert status == 400 and fragment in page, (client_id, page[:2000])


def test_the_ssrf_rail_keeps_documents_off_local_addresses(start_daemon: StartDaemon,
                                                           migrated_url: str,
                                                           site: DocumentSite) -> None:
    setup = start(start_daemon, migrated_url, site, insecure=False)
    client_id = site.publish("/client.json", site.document("/client.json"))
    status, page = page_of(setup, client_id)
    assert status == 400
    assert b"cannot be fetched" in page and b"DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS" in page
    assert site.hits["/client.json"] == 0
