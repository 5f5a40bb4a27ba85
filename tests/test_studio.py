"""The Studio over plain HTTP, as a browser without JavaScript uses it: first-run setup,
security headers, CSRF, isolation between users, the waitlist, every core form (playbooks,
servers with write-only secrets, tools, try a tool, prompts, YAML, connect, account).
The same flows in a real browser: tests/test_studio_browser.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from director.db import migrate
from tests.accounts_helpers import call, eventually
from tests.harness import DIRECTOR, Daemon, PostgresServer, base_environment, free_port
from tests.studio_client import (
    StudioClient,
    first_account,
    http_reference_server,
    setup_token,
    sign_up,
)

PASSWORD = "correct horse battery"
REFERENCE = str(Path(__file__).parent / "fixtures" / "reference_server.py")
HOSTILE = Path(__file__).parent / "fixtures" / "hostile_server.py"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")


def start(postgres: PostgresServer, **env: str) -> tuple[Daemon, str]:
    url = postgres.url_for(postgres.create_database())
    migrate.upgrade(url)
    return start_on(url, **env), url


def start_on(url: str, **env: str) -> Daemon:
    port = free_port()
    # Forms are posted with the Origin of the address the pages came from, which the edge
    # accepts only as BASE_URL's (or ALLOWED_ORIGINS').
    daemon = Daemon(base_environment(DATABASE_URL=url, PORT=str(port),
                                     BASE_URL=f"http://127.0.0.1:{port}", **env))
    daemon.wait_healthy()
    return daemon


@pytest.fixture(scope="module")
def studio(postgres: PostgresServer) -> Iterator[tuple[Daemon, StudioClient]]:
    daemon, _ = start(postgres, DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS="true",
                      DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS="true")
    admin = first_account(daemon, "admin@example.com", PASSWORD)
    yield daemon, admin
    daemon.stop()


@pytest.fixture(scope="module")
def http_upstream() -> Iterator[int]:
    with http_reference_server("authorization=Bearer s3cr3t") as port:
        yield port


def new_user(daemon: Daemon, email: str) -> StudioClient:
    client, page = sign_up(daemon, email, PASSWORD)
    assert page.status == 200 and page.has("Your account is ready"), page.text
    return client


def create_playbook(client: StudioClient, name: str) -> str:
    client.get("/studio/")
    page = client.post("/studio/playbooks", {"name": name, "description": ""})
    assert page.status == 303, page.text
    return page.location.split("/studio/playbooks/", 1)[1].split("?")[0]


def form_version(client: StudioClient, path: str) -> str:
    page = client.get(path)
    found = re.search(r'name="version" value="(\d+)"', page.text)
    assert found, page.text
    return found[1]


# --- first run -----------------------------------------------------------------------------


def test_first_run_setup_by_one_time_token(postgres: PostgresServer) -> None:
    daemon, url = start(postgres)
    try:
        status, headers, _ = daemon.request("GET", "/")
        assert (status, headers["location"]) == (302, "/studio/")
        visitor = StudioClient(daemon)
        first_run = visitor.get("/studio/")
        assert first_run.has("director setup-url") and "sudo" not in first_run.text
        assert visitor.get("/studio/setup").has("needs the one-time setup link")
        wrong = visitor.get("/studio/setup?token=not-the-token")
        assert wrong.status == 403 and wrong.has("does not work")
        token = setup_token(daemon)
        page = visitor.get(f"/studio/setup?token={token}")
        assert page.status == 200 and page.has("Create the account")
        refused = visitor.post("/studio/setup", {"token": token, "email": "a@example.com",
                                                 "password": PASSWORD,
                                                 "password_again": PASSWORD}, csrf="forged")
        assert refused.status == 403
        visitor.get(f"/studio/setup?token={token}")
        mismatch = visitor.post("/studio/setup", {"token": token, "email": "a@example.com",
                                                  "password": PASSWORD, "password_again": "x"})
        assert mismatch.status == 400 and mismatch.has("does not match the password")
        # A fresh link from the CLI replaces the logged one.
        printed = subprocess.run([DIRECTOR, "setup-url", "--json"], capture_output=True,
                                 text=True, env=base_environment(DATABASE_URL=url), check=True)
        fresh = json.loads(printed.stdout)["url"].rsplit("token=", 1)[1]
        assert visitor.get(f"/studio/setup?token={token}").status == 403
        visitor.get(f"/studio/setup?token={fresh}")
        done = visitor.post("/studio/setup", {"token": fresh, "email": "Admin@Example.com",
                                              "password": PASSWORD, "password_again": PASSWORD})
        assert done.status == 200 and done.has("Your account is ready")
        key = re.search(r'id="new-key">(dk_[A-Za-z0-9]+)<', done.text)
        assert key, done.text
        status, _, me = call(daemon, "GET", "/api/v1/me", key=key[1])
        assert (status, me["email"], me["status"]) == (200, "admin@example.com", "active")
        assert visitor.get("/studio/").status == 200  # signed in
        # The setup page is closed for good, and so is the CLI's.
        assert StudioClient(daemon).get(f"/studio/setup?token={fresh}").status == 404
        late = subprocess.run([DIRECTOR, "setup-url"], capture_output=True, text=True,
                              env=base_environment(DATABASE_URL=url))
        assert late.returncode == 1 and "an account exists already" in late.stderr
    finally:
        daemon.stop()


def test_wrong_setup_links_are_throttled_per_address(postgres: PostgresServer) -> None:
    daemon, _ = start(postgres)
    try:
        visitor = StudioClient(daemon)
        # Five free failures, then a delay that doubles with each one more (1 s, 2 s, …):
        # on a slow machine a guess may come after the first delay ran out.
        wrong: list[int] = []
        while 429 not in wrong and len(wrong) < 12:
            wrong.append(visitor.get(f"/studio/setup?token=guess-{len(wrong)}").status)
        assert wrong[-1] == 429 and set(wrong[:-1]) == {403} and len(wrong) > 5, wrong
        throttled = visitor.get(f"/studio/setup?token={setup_token(daemon)}")
        assert throttled.status == 429 and throttled.has("too many wrong setup links")
        assert int(throttled.headers["retry-after"]) >= 1
    finally:
        daemon.stop()


# --- headers, static files, CSRF --------------------------------------------------------------


def test_pages_carry_csp_and_assets_are_hashed(studio: tuple[Daemon, StudioClient]) -> None:
    daemon, admin = studio
    page = admin.get("/studio/")
    assert page.status == 200
    assert page.headers["content-security-policy"] == CSP
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["x-frame-options"] == "DENY"
    assert "style=" not in page.text and "onclick" not in page.text.lower()
    assets = re.findall(r'(?:href|src)="(/studio/static/[^"]+)"', page.text)
    assert len(set(assets)) == 3
    for asset in set(assets):
        status, headers, body = daemon.request("GET", asset, headers={"accept-encoding": "gzip"})
        assert status == 200 and headers["cache-control"].endswith("immutable")
        assert headers["content-encoding"] == "gzip" and body[:2] == b"\x1f\x8b"
    stale = re.sub(r"\.[0-9a-f]{10}\.", ".0000000000.", assets[0])
    assert daemon.request("GET", stale)[0] == 404
    assert admin.get("/studio/no-such-page").status == 404


def test_a_form_without_its_csrf_token_is_refused(studio: tuple[Daemon, StudioClient]) -> None:
    daemon, admin = studio
    admin.get("/studio/")
    for fields, kwargs in (({"name": "Forged"}, {"with_csrf": False}),
                           ({"name": "Forged"}, {"csrf": "0" * 64})):
        page = admin.post("/studio/playbooks", fields, **kwargs)
        assert page.status == 403 and page.has("This form has expired"), page.text
    # The token of another session is refused too.
    other = new_user(daemon, "csrf-other@example.com")
    other.get("/studio/")
    assert admin.post("/studio/playbooks", {"name": "Forged"},
                      csrf=other.last.csrf() if other.last else "").status == 403
    assert not [p for p in admin.get("/studio/").text.split() if "Forged" in p]
    # Sign-in forms are bound to their own cookie.
    anonymous = StudioClient(daemon)
    anonymous.get("/studio/login")
    stranger = StudioClient(daemon)
    assert stranger.post("/studio/login", {"email": "admin@example.com", "password": PASSWORD},
                         csrf=anonymous.last.csrf() if anonymous.last else "").status == 403


def test_a_second_user_cannot_see_or_reach_the_first_users_pages(
        studio: tuple[Daemon, StudioClient]) -> None:
    daemon, admin = studio
    playbook = create_playbook(admin, "Private things")
    intruder = new_user(daemon, "intruder@example.com")
    for path in (f"/studio/playbooks/{playbook}", f"/studio/playbooks/{playbook}/settings",
                 f"/studio/playbooks/{playbook}/connect", f"/studio/playbooks/{playbook}/history",
                 f"/studio/playbooks/{playbook}/export", f"/studio/playbooks/{playbook}/prompts",
                 f"/studio/playbooks/{playbook}/servers/new?type=http"):
        assert intruder.get(path).status == 404, path
    intruder.get("/studio/")
    assert intruder.post(f"/studio/playbooks/{playbook}/delete", {"version": "1"}).status == 404
    assert admin.get(f"/studio/playbooks/{playbook}").status == 200
    assert not intruder.get("/studio/").has("Private things")
    # Signed out: every page sends to the login page, and back after signing in.
    anonymous = StudioClient(daemon)
    page = anonymous.get(f"/studio/playbooks/{playbook}")
    assert page.status == 303 and page.location.startswith("/studio/login?next=")
    login = anonymous.get(page.location)
    assert login.status == 200
    back = anonymous.post("/studio/login", {"email": "admin@example.com", "password": PASSWORD,
                                            "next": f"/studio/playbooks/{playbook}"})
    assert (back.status, back.location) == (303, f"/studio/playbooks/{playbook}")
    stranger = StudioClient(daemon)
    stranger.get("/studio/login")
    offsite = stranger.post("/studio/login", {"email": "admin@example.com",
                                               "password": PASSWORD, "next": "//evil.example/"})
    assert offsite.location == "/studio/"


def test_login_errors_and_logout(studio: tuple[Daemon, StudioClient]) -> None:
    daemon, _ = studio
    client = StudioClient(daemon)
    client.get("/studio/login")
    wrong = client.post("/studio/login", {"email": "admin@example.com", "password": "wrong-one"})
    assert wrong.status == 401 and wrong.has("wrong email or password")
    assert 'value="admin@example.com"' in wrong.text
    right = client.post("/studio/login", {"email": "admin@example.com", "password": PASSWORD})
    assert right.status == 303
    client.get("/studio/")
    out = client.post("/studio/logout")
    assert (out.status, out.location) == (303, "/studio/login?notice=signed-out")
    assert client.get("/studio/").status == 303


def test_waitlist_sign_up_waits(postgres: PostgresServer) -> None:
    daemon, url = start(postgres, WAITLIST_ENABLED="true")
    try:
        first_account(daemon, "boss@example.com", PASSWORD)
        client, page = sign_up(daemon, "waiting@example.com", PASSWORD)
        assert (page.status, page.location) == (303, "/studio/waiting")
        waiting = client.get("/studio/waiting")
        assert waiting.status == 200 and waiting.has("waitlist")
        assert client.get("/studio/").location == "/studio/waiting"
        assert client.get("/studio/account").location == "/studio/waiting"
        subprocess.run([DIRECTOR, "users", "activate", "waiting@example.com"], check=True,
                       capture_output=True, env=base_environment(DATABASE_URL=url))
        eventually(lambda: client.get("/studio/").status == 200)
    finally:
        daemon.stop()


# --- playbooks, servers, tools -------------------------------------------------------------


def test_playbook_forms_without_javascript(studio: tuple[Daemon, StudioClient]) -> None:
    _daemon, admin = studio
    playbook = create_playbook(admin, "Forms <b>& co</b>")
    page = admin.get(f"/studio/playbooks/{playbook}?notice=created")
    assert page.has("Playbook created.") and "<b>&" not in page.text
    assert page.has("Forms <b>& co</b>")
    admin.get("/studio/")
    duplicate = admin.post("/studio/playbooks", {"name": "Forms <b>& co</b>"})
    assert duplicate.status == 409 and duplicate.has("already have a playbook")
    empty = admin.post("/studio/playbooks", {"name": "  "})
    assert empty.status == 400 and empty.has("must not be empty")
    assert admin.get("/studio/?q=forms").has("Forms <b>& co</b>")
    assert admin.get("/studio/?q=nothing-like-it").has("No playbook matches")
    # Rename with the version the form was shown at; a stale one is a conflict.
    version = form_version(admin, f"/studio/playbooks/{playbook}/settings")
    saved = admin.post(f"/studio/playbooks/{playbook}/settings",
                       {"name": "Renamed", "description": "For tests", "version": version})
    assert saved.status == 303
    admin.get(f"/studio/playbooks/{playbook}/settings")
    stale = admin.post(f"/studio/playbooks/{playbook}/settings",
                       {"name": "Again", "description": "", "version": version})
    assert stale.status == 409 and stale.has("changed meanwhile")
    history = admin.get(f"/studio/playbooks/{playbook}/history")
    assert history.has("create") and history.has("update")
    # Delete asks first.
    confirm = admin.get(f"/studio/playbooks/{playbook}/delete")
    assert confirm.has("Delete the playbook")
    gone = admin.post(f"/studio/playbooks/{playbook}/delete",
                      {"version": form_version(admin, f"/studio/playbooks/{playbook}/delete")})
    assert (gone.status, gone.location) == (303, "/studio/?notice=deleted")
    assert admin.get(f"/studio/playbooks/{playbook}").status == 404


def test_http_server_secret_headers_are_write_only(studio: tuple[Daemon, StudioClient],
                                                   http_upstream: int) -> None:
    daemon, admin = studio
    playbook = create_playbook(admin, "Remote")
    base = f"/studio/playbooks/{playbook}"
    form = admin.get(f"{base}/servers/new?type=http")
    assert form.status == 200
    fields = [("name", "remote"), ("type", "http"),
              ("url", f"http://127.0.0.1:{http_upstream}/mcp"),
              ("header_name", "Authorization"), ("header_value", "Bearer s3cr3t"),
              ("header_kind", "secret"), ("header_name", "X-Plain"), ("header_value", "visible"),
              ("header_kind", "plain"), ("prefix", ""), ("timeout_seconds", "30"),
              ("version", form_version(admin, f"{base}/servers/new?type=http"))]
    admin.get(f"{base}/servers/new?type=http")
    added = admin.post(f"{base}/servers", fields)
    assert added.status == 303, added.text
    page = admin.get(base)
    eventually(lambda: admin.get(base).has('data-status="connected"'), timeout=30)
    page = admin.get(base)
    assert "s3cr3t" not in page.text and page.has("echo") and page.has("describe")
    edit = admin.get(f"{base}/servers/remote")
    assert "s3cr3t" not in edit.text and edit.has("stored secret (leave empty to keep)")
    assert edit.has("visible")
    # Saving the edit form with the secret left empty keeps it; the server still answers.
    version = form_version(admin, f"{base}/servers/remote")
    saved = admin.post(f"{base}/servers/remote", [
        ("name", "remote"), ("url", f"http://127.0.0.1:{http_upstream}/mcp"),
        ("header_name", "Authorization"), ("header_value", ""), ("header_kind", "secret"),
        ("prefix", "r_"), ("timeout_seconds", "30"), ("version", version)])
    assert saved.status == 303, saved.text
    _status, _, stored = call(daemon, "GET", f"/api/v1/playbooks/{playbook}/servers/remote"
                                            "?reveal_secrets=true", cookie=_cookie(admin))
    assert stored["headers"] == {"Authorization": {"secret": True, "value": "Bearer s3cr3t"}}
    eventually(lambda: admin.get(base).has("r_echo"), timeout=30)
    # Without its credentials the same server is "unauthorized", with the server's answer.
    admin.get(f"{base}/servers/new?type=http")
    assert admin.post(f"{base}/servers", [
        ("name", "anonymous"), ("type", "http"), ("url", f"http://127.0.0.1:{http_upstream}/mcp"),
        ("version", form_version(admin, f"{base}/servers/new?type=http"))]).status == 303
    eventually(lambda: admin.get(base).has('data-status="unauthorized"'), timeout=30)
    assert admin.get(base).has("HTTP 401")
    # A server may be called "new": its edit page is /servers/new without ?type=.
    admin.get(f"{base}/servers/new?type=http")
    assert admin.post(f"{base}/servers", [
        ("name", "new"), ("type", "http"), ("url", f"http://127.0.0.1:{http_upstream}/mcp"),
        ("version", form_version(admin, f"{base}/servers/new?type=http"))]).status == 303
    assert admin.get(f"{base}/servers/new").has("Edit new")
    assert admin.get(f"{base}/servers/new?type=http").has("Add an HTTP server")
    # Bad input is refused with the model's own message, next to the form.
    admin.get(f"{base}/servers/new?type=http")
    bad = admin.post(f"{base}/servers", [("name", "bad name!"), ("type", "http"),
                                         ("url", "ftp://x"), ("timeout_seconds", "9999")])
    assert bad.status == 400 and bad.has("must be 1-64 letters") and bad.has("http(s) URL")


def _cookie(client: StudioClient) -> str:
    return "; ".join(f"{k}={v}" for k, v in client.cookies.items())


def test_tools_settings_and_try_a_tool(studio: tuple[Daemon, StudioClient]) -> None:
    daemon, admin = studio
    playbook = create_playbook(admin, "Local tools")
    base = f"/studio/playbooks/{playbook}"
    for name, prefix in (("ref", ""), ("twin", "")):
        admin.get(f"{base}/servers/new?type=stdio")
        added = admin.post(f"{base}/servers", [
            ("name", name), ("type", "stdio"), ("command", sys.executable),
            ("args", REFERENCE), ("prefix", prefix), ("timeout_seconds", "30"),
            ("version", form_version(admin, base + "/servers/new?type=stdio"))])
        assert added.status == 303, added.text
    eventually(lambda: admin.get(base).has('data-complete="true"'), timeout=40)
    page = admin.get(base)
    assert page.has("shadowed by ref"), page.text
    assert page.text.count('data-status="connected"') == 2
    assert page.has("stdio · legacy era")
    # Hide "add" on ref and give twin a prefix: the shadowing ends.
    tools = re.findall(r'name="listed" value="([^"]+)"', page.text)
    ref_tools = tools[:len(tools) // 2]
    admin.get(base)
    admin.post(f"{base}/servers/ref/tools", [("listed", t) for t in ref_tools]
               + [("expose", t) for t in ref_tools if t != "add"]
               + [("prefix", ""), ("version", form_version(admin, base))])
    admin.get(base)
    saved = admin.post(f"{base}/servers/twin/tools", [("listed", t) for t in ref_tools]
                       + [("expose", t) for t in ref_tools]
                       + [("prefix", "t_"), ("version", form_version(admin, base))])
    assert saved.status == 303
    eventually(lambda: admin.get(base).has("t_echo"), timeout=30)
    page = admin.get(base)
    assert not page.has("shadowed by") and page.has("hidden")
    _status, _, body = call(daemon, "GET", f"/api/v1/playbooks/{playbook}/servers/ref",
                           cookie=_cookie(admin))
    assert body["exclude"] == ["add"]
    # Try a tool: the text comes back escaped.
    form = admin.get(f"{base}/tools/echo")
    assert form.status == 200 and form.has("Run the tool")
    result = admin.post(f"{base}/tools/echo", {"arg.text": "<b>bold</b> & more"})
    assert result.status == 200 and "&lt;b&gt;bold&lt;/b&gt; &amp; more" in result.text
    admin.get(f"{base}/tools/t_add")
    added = admin.post(f"{base}/tools/t_add", {"arg.a": "2", "arg.b": "40"})
    assert added.has("42") and added.has("Structured content")
    admin.get(f"{base}/tools/t_add")
    wrong = admin.post(f"{base}/tools/t_add", {"arg.a": "two", "arg.b": ""})
    assert wrong.status == 400 and wrong.has("must be a whole number") and wrong.has("is required")
    admin.get(f"{base}/tools/norm")
    json_arg = admin.post(f"{base}/tools/norm", {"arg.points": '[{"x": 1, "y": 2}]'})
    assert json_arg.has("3.0") or json_arg.has("3"), json_arg.text
    assert admin.get(f"{base}/tools/add").status == 404  # hidden: clients do not see it
    # A tool that asks the client to sample fails at once, readably.
    admin.get(f"{base}/tools/ask")
    asked = admin.post(f"{base}/tools/ask", {"arg.question": "anyone?"})
    assert asked.status == 200 and asked.has("cannot answer the server's sampling/createMessage")
    # Restart: the shared process is closed and started again.
    admin.get(base)
    restarted = admin.post(f"{base}/servers/ref/restart")
    assert restarted.status == 303
    eventually(lambda: admin.get(base).text.count('data-status="connected"') == 2, timeout=30)


def test_what_a_stdio_server_says_on_stderr_shows_on_its_status(
        studio: tuple[Daemon, StudioClient]) -> None:
    """The hostile server reports each refused attempt on stderr: its owner reads them on the
    server's status, escaped (issue 14: "the failures are reported on that server's status")."""
    _daemon, admin = studio
    playbook = create_playbook(admin, "Hostile")
    base = f"/studio/playbooks/{playbook}"
    admin.get(f"{base}/servers/new?type=stdio")
    added = admin.post(f"{base}/servers", [
        ("name", "hostile"), ("type", "stdio"), ("command", sys.executable),
        ("args", str(HOSTILE)), ("timeout_seconds", "30"),
        ("version", form_version(admin, base + "/servers/new?type=stdio"))])
    assert added.status == 303, added.text
    eventually(lambda: admin.get(base).has('data-status="connected"'), timeout=40)
    assert not admin.get(base).has("lines on stderr")
    admin.get(f"{base}/tools/probe")
    probed = admin.post(f"{base}/tools/probe",
                        {"arg.targets": '{"reads": ["/etc/shadow", "/<nowhere>"]}'})
    assert probed.status == 200 and probed.has("denied"), probed.text
    page = admin.get(base)
    assert page.has("Its last 2 lines on stderr"), page.text
    assert page.has("hostile probe: \"reads\": {\"/etc/shadow\": \"denied: "), page.text
    assert "/&lt;nowhere&gt;" in page.text and "/<nowhere>" not in page.text


def test_stdio_form_names_the_flag_when_the_rail_forbids_it(postgres: PostgresServer) -> None:
    # A stdio server added while the flag was on...
    allowed, url = start(postgres, DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS="true")
    try:
        admin = first_account(allowed, "railed@example.com", PASSWORD)
        playbook = create_playbook(admin, "Railed")
        base = f"/studio/playbooks/{playbook}"
        admin.get(f"{base}/servers/new?type=stdio")
        assert admin.post(f"{base}/servers", [
            ("name", "legacy"), ("type", "stdio"), ("command", sys.executable),
            ("args", REFERENCE), ("version", "1")]).status == 303
    finally:
        allowed.stop()
    # ...is shown refused by configuration once it is off, and new ones are refused.
    daemon = start_on(url)
    try:
        admin = StudioClient(daemon)
        admin.get("/studio/login")
        assert admin.post("/studio/login", {"email": "railed@example.com",
                                            "password": PASSWORD}).status == 303
        page = admin.get(base)
        assert page.has('data-status="refused"') and page.has("refused by configuration")
        form = admin.get(f"{base}/servers/new?type=stdio")
        assert form.has("DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS=true")
        assert re.search(r'<button type="submit" disabled="disabled"[^>]*>Add server',
                         form.text), form.text
        refused = admin.post(f"{base}/servers", [("name", "x"), ("type", "stdio"),
                                                 ("command", "true")])
        assert refused.status == 400 and refused.has("DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS")
        http_form = admin.get(f"{base}/servers/new?type=http")
        assert http_form.has("DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS=true")
    finally:
        daemon.stop()


# --- prompts, YAML, connect, account --------------------------------------------------------


def test_prompts_with_preview(studio: tuple[Daemon, StudioClient]) -> None:
    _daemon, admin = studio
    playbook = create_playbook(admin, "Prompted")
    base = f"/studio/playbooks/{playbook}"
    admin.get(f"{base}/prompts/new?new=1")
    created = admin.post(f"{base}/prompts", [
        ("name", "welcome"), ("title", "Welcome"), ("description", ""),
        ("body", "Welcome {{name}} to {{place}}."),
        ("arg_name", "name"), ("arg_description", "Who"), ("arg_required", "yes"),
        ("arg_name", "place"), ("arg_description", ""), ("arg_required", "no"),
        ("version", form_version(admin, f"{base}/prompts/new?new=1"))])
    assert created.status == 303, created.text
    preview = admin.get(f"{base}/prompts/welcome?preview=1&preview.name=Ada&preview.place=<Lab>")
    assert "Welcome Ada to &lt;Lab&gt;." in preview.text
    missing = admin.get(f"{base}/prompts/welcome?preview=1&preview.place=x")
    assert missing.has("missing required argument(s): name")
    admin.get(f"{base}/prompts/new?new=1")
    bad = admin.post(f"{base}/prompts", [("name", "welcome"), ("body", "x")])
    assert bad.status == 409 and bad.has("already has a prompt")
    admin.get(f"{base}/prompts/welcome")
    removed = admin.post(f"{base}/prompts/welcome/remove",
                         {"version": form_version(admin, f"{base}/prompts/welcome")})
    assert removed.status == 303
    assert admin.get(f"{base}/prompts").has("No prompt yet")


def test_yaml_export_and_import_with_line_and_column_errors(
        studio: tuple[Daemon, StudioClient]) -> None:
    _daemon, admin = studio
    playbook = create_playbook(admin, "Yaml source")
    exported = admin.get(f"/studio/playbooks/{playbook}/export")
    assert exported.status == 200 and exported.headers["content-type"].startswith(
        "application/yaml") and "attachment" in exported.headers["content-disposition"]
    document = exported.body.replace(b"yaml-source", b"yaml-copy")
    page = admin.get("/studio/import")
    imported = admin.post_multipart("/studio/import", {"csrf_token": page.csrf()},
                                    {"document": ("copy.yaml", document)})
    assert imported.status == 303 and "/studio/playbooks/yaml-copy" in imported.location
    page = admin.get("/studio/import")
    broken = b"version: 1\nid: broken\nname: Broken\nservers:\n  - name: x\n    type: http\n" \
             b"    url: ftp://nope\n"
    refused = admin.post_multipart("/studio/import", {"csrf_token": page.csrf()},
                                   {"document": ("broken.yaml", broken)})
    assert refused.status == 400
    assert re.search(r"broken\.yaml:7:\d+: servers\[0\]\.url: must be an http\(s\) URL",
                     refused.text), refused.text
    assert admin.get("/studio/playbooks/broken").status == 404


def test_connect_page_and_account(studio: tuple[Daemon, StudioClient]) -> None:
    daemon, admin = studio
    playbook = create_playbook(admin, "Connected")
    page = admin.get(f"/studio/playbooks/{playbook}/connect")
    assert page.has(f"{daemon.base}/playbooks/{playbook}/mcp")
    assert page.has("value of your key 'default'") and "dk_" not in re.sub(
        r"\(dk_[A-Za-z0-9]{7}(…|\.\.\.)\)", "", page.text)
    assert "vscode:mcp/install" not in page.text
    created = admin.post(f"/studio/playbooks/{playbook}/connect/key", {"name": "laptop"})
    key = re.search(r'id="new-key">(dk_[A-Za-z0-9]{64})<', created.text)
    assert key, created.text
    assert created.has(f'claude mcp add --transport http {playbook} ') and \
        key[1] in re.search(r'id="claude-code">([^<]+)<', created.text)[1]  # type: ignore[index]
    assert "vscode:mcp/install?" in created.text and \
        "cursor://anysphere.cursor-deeplink/mcp/install?name=" in created.text
    assert call(daemon, "GET", "/api/v1/me", key=key[1])[0] == 200
    assert key[1] not in admin.get(f"/studio/playbooks/{playbook}/connect").text
    # The account page: the new key listed (never its value), revoked.
    account = admin.get("/studio/account")
    assert account.has("laptop") and key[1] not in account.text
    laptop_row = re.search(r"<tr><td><strong>laptop</strong>.*?</tr>", account.text)
    default_row = re.search(r"<tr><td><strong>default</strong>.*?</tr>", account.text)
    assert laptop_row and laptop_row[0].count("<time") == 2  # created, last used
    assert default_row and "never" in default_row[0]
    _, _, listed = call(daemon, "GET", "/api/v1/api-keys", key=key[1])
    laptop = next(item["id"] for item in listed["items"] if item["name"] == "laptop")
    revoked = admin.post(f"/studio/account/keys/{laptop}/revoke")
    assert revoked.status == 303
    eventually(lambda: call(daemon, "GET", "/api/v1/me", key=key[1])[0] == 401)
    admin.get("/studio/account")
    made = admin.post("/studio/account/keys", {"name": "ci"})
    first = re.search(r'id="new-key">(dk_[A-Za-z0-9]{64})<', made.text)
    assert made.has("shown only this once") and first
    ci_id = re.findall(r"/studio/account/keys/([0-9a-f-]{36})/regenerate", made.text)[-1]
    renewed = admin.post(f"/studio/account/keys/{ci_id}/regenerate", csrf=made.csrf())
    second = re.search(r'id="new-key">(dk_[A-Za-z0-9]{64})<', renewed.text)
    assert renewed.status == 200 and second and second[1] != first[1]
    eventually(lambda: call(daemon, "GET", "/api/v1/me", key=first[1])[0] == 401)
    assert call(daemon, "GET", "/api/v1/me", key=second[1])[0] == 200
    admin.get("/studio/account")
    duplicate = admin.post("/studio/account/keys", {"name": "ci"})
    assert duplicate.status == 409 and duplicate.has("already have an API key")


def test_sessions_and_password(studio: tuple[Daemon, StudioClient]) -> None:
    daemon, _ = studio
    one = new_user(daemon, "sessions@example.com")
    two = StudioClient(daemon)
    two.get("/studio/login")
    assert two.post("/studio/login", {"email": "sessions@example.com",
                                      "password": PASSWORD}).status == 303
    account = one.get("/studio/account")
    assert account.has("(this one)") and account.has("Sign out every other session")
    ended = one.post("/studio/account/sessions/others")
    assert ended.status == 303
    assert two.get("/studio/").status == 303  # signed out
    assert one.get("/studio/").status == 200
    one.get("/studio/account")
    wrong = one.post("/studio/account/password", {"current_password": "not-it-at-all",
                                                  "new_password": "another password",
                                                  "new_password_again": "another password"})
    assert wrong.status == 403 and wrong.has("current password is wrong")
    changed = one.post("/studio/account/password", {"current_password": PASSWORD,
                                                    "new_password": "another password",
                                                    "new_password_again": "another password"},
                       csrf=wrong.csrf())
    assert changed.status == 303, changed.text
    assert one.get(changed.location).has("Password changed")  # still signed in
