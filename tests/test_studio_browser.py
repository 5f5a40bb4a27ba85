"""The Studio in a real browser (Debian's headless Chromium through Selenium), end to end:
first-run setup → a playbook → a stdio and an HTTP server → their tools → try a tool → the
connect page's Claude Code line and key, copied → the ``mcp`` SDK client uses exactly what
the page showed and calls the tool. Also: a failing server's error appears live (no reload),
a form without its CSRF token is refused (403), a second user gets 404 for the first user's
pages, the registry's pages (search, entry, install form). Every page visited is checked with
axe-core (no serious or critical violation) and photographed light and dark, narrow and wide,
into tests/screenshots/."""

from __future__ import annotations

import asyncio
import shlex
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from selenium import webdriver
from selenium.webdriver.common.by import By

from director.db import migrate
from tests import registry_catalogue as rc
from tests.harness import Daemon, PostgresServer, base_environment, free_port, make_temp_dir
from tests.studio_browser import (
    fill,
    find,
    record,
    start_browser,
    submit,
    wait_for,
)
from tests.studio_client import http_reference_server, setup_token

PASSWORD = "correct horse battery"
REFERENCE = str(Path(__file__).parent / "fixtures" / "reference_server.py")


@pytest.fixture(scope="module")
def daemon(postgres: PostgresServer) -> Iterator[Daemon]:
    name = postgres.create_database()
    url = postgres.url_for(name)
    migrate.upgrade(url)
    port = free_port()
    catalogue = rc.write(make_temp_dir("director-test-catalogue-", 0o755) / "catalogue.json")
    started = Daemon(base_environment(
        DATABASE_URL=url, PORT=str(port), BASE_URL=f"http://127.0.0.1:{port}",
        REGISTRY_URL=catalogue.as_uri(), REGISTRY_TRUST="any",
        DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS="true",
        DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS="true"))
    started.wait_healthy()
    yield started
    started.stop()
    shutil.rmtree(catalogue.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    yield from start_browser()


@pytest.fixture(scope="module")
def http_upstream() -> Iterator[int]:
    with http_reference_server("authorization=Bearer s3cr3t") as port:
        yield port


def open_page(browser: webdriver.Chrome, daemon: Daemon, path: str) -> None:
    browser.get(daemon.base + path)
    wait_for(browser, lambda: browser.execute_script("return document.readyState") == "complete")


def live(browser: webdriver.Chrome) -> None:
    """Wait until the page's event stream is open."""
    wait_for(browser, lambda: browser.execute_script(
        "return document.documentElement.dataset.live") == "connected", 20, "the live stream")


def statuses(browser: webdriver.Chrome) -> list[str]:
    return [element.get_attribute("data-status") or ""
            for element in browser.find_elements(By.CSS_SELECTOR, "[data-status]")]


def add_server(browser: webdriver.Chrome, daemon: Daemon, playbook: str, kind: str,
               values: dict[str, str], more: dict[str, str] | None = None,
               headers: list[tuple[str, str, str]] | None = None) -> None:
    open_page(browser, daemon, f"/studio/playbooks/{playbook}/servers/new?type={kind}")
    record(browser, f"server-form-{kind}")
    fill(browser, values)
    for index, (name, value, secret) in enumerate(headers or []):
        find(browser, f"#f-header-{index}-name").send_keys(name)
        find(browser, f"#f-header-{index}-value").send_keys(value)
        if secret == "secret":
            find(browser, f"#f-header-{index}-kind option[value=secret]").click()
    if more:
        find(browser, "details summary").click()
        fill(browser, more)
    submit(browser, "Add server")
    assert f"/studio/playbooks/{playbook}" in browser.current_url


def test_end_to_end_from_first_run_to_an_sdk_client(daemon: Daemon, browser: webdriver.Chrome,
                                                    http_upstream: int) -> None:
    # First run: the setup link from the log.
    open_page(browser, daemon, "/")
    assert browser.current_url.endswith("/studio/") and "setup-url" in browser.page_source
    record(browser, "first-run")
    open_page(browser, daemon, f"/studio/setup?token={setup_token(daemon)}")
    record(browser, "setup")
    fill(browser, {"email": "owner@example.com", "password": PASSWORD,
                   "password_again": PASSWORD})
    submit(browser, "Create the account")
    assert "Your account is ready" in browser.page_source
    record(browser, "welcome")
    find(browser, "a.button").click()
    wait_for(browser, lambda: "Playbooks" in browser.title)
    live(browser)
    record(browser, "playbooks-empty")

    # A playbook, a stdio server and an HTTP server with a secret header.
    fill(browser, {"name": "Demo tools", "description": "Tools for the demo."})
    submit(browser, "Create playbook")
    assert browser.current_url.endswith("/studio/playbooks/demo-tools?notice=created")
    add_server(browser, daemon, "demo-tools", "stdio",
               {"name": "local", "command": sys.executable, "args": REFERENCE})
    add_server(browser, daemon, "demo-tools", "http",
               {"name": "remote", "url": f"http://127.0.0.1:{http_upstream}/mcp"},
               more={"prefix": "web_"},
               headers=[("Authorization", "Bearer s3cr3t", "secret")])
    live(browser)
    # Their tools appear by themselves (live), both servers connected.
    wait_for(browser, lambda: statuses(browser) == ["connected", "connected"], 40,
             "both servers connected")
    wait_for(browser, lambda: find(browser, "#tools-summary").get_attribute(
        "data-complete") == "true", 40, "the tools listed")
    names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#tools .tool-name")]
    assert "echo" in names and "web_echo" in names and "web_describe" in names
    assert "s3cr3t" not in browser.page_source
    record(browser, "playbook")

    # Try a tool.
    browser.find_element(By.CSS_SELECTOR, "a[aria-label='Try echo']").click()
    wait_for(browser, lambda: "Try echo" in browser.title)
    record(browser, "try-form")
    fill(browser, {"arg.text": "<hello & welcome>"})
    submit(browser, "Run the tool")
    result = find(browser, "#result .result-text").text
    assert result == "<hello & welcome>"
    record(browser, "try-result")
    open_page(browser, daemon, "/studio/playbooks/demo-tools/tools/web_describe")
    find(browser, "textarea[name='arg.item']").send_keys('{"name": "widget", "kind": "tool"}')
    fill(browser, {"arg.count": "3"})
    submit(browser, "Run the tool")
    assert find(browser, "#result .result-text").text == "3 of widget (tool)"

    # Connect: a key for this connection, the Claude Code line copied.
    open_page(browser, daemon, "/studio/playbooks/demo-tools/connect")
    record(browser, "connect")
    fill(browser, {"name": "sdk test"})
    submit(browser, "Create a key for this connection")
    record(browser, "connect-new-key")
    browser.execute_cdp_cmd("Browser.grantPermissions", {
        "origin": daemon.base, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    find(browser, "button[data-copy='claude-code']").click()
    copied_line = wait_for(browser, lambda: browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "navigator.clipboard.readText().then(done, () => done(''));"), 10, "the copied line")
    assert copied_line == find(browser, "#claude-code").text
    find(browser, "button[data-copy='new-key']").click()
    copied_key = wait_for(browser, lambda: browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "navigator.clipboard.readText().then(done, () => done(''));"), 10, "the copied key")
    assert copied_key.startswith("dk_") and copied_key == find(browser, "#new-key").text
    assert find(browser, "#install-vscode").get_attribute("href").startswith(
        "vscode:mcp/install?")

    # The mcp SDK client uses exactly what the page showed.
    words = shlex.split(copied_line)
    assert words[:5] == ["claude", "mcp", "add", "--transport", "http"]
    name, url, header_flag, header = words[5:9]
    assert (name, header_flag) == ("demo-tools", "--header")
    header_name, _, header_value = header.partition(": ")
    assert header_value == copied_key

    async def use() -> tuple[list[str], Any]:
        http = create_mcp_http_client(headers={header_name: header_value})
        async with http, Client(streamable_http_client(url, http_client=http),
                                mode="legacy") as client:
            tools = await client.list_tools()
            called = await client.call_tool("web_echo", {"text": "through the gateway"})
            return [tool.name for tool in tools.tools], called

    tool_names, called = asyncio.run(asyncio.wait_for(use(), 60))
    assert "echo" in tool_names and "web_echo" in tool_names
    assert called.content[0].text == "through the gateway"

    # The other pages, each checked and photographed.
    for path, name in (("/studio/playbooks/demo-tools/prompts", "prompts"),
                       ("/studio/playbooks/demo-tools/prompts/new?new=1", "prompt-new"),
                       ("/studio/playbooks/demo-tools/history", "history"),
                       ("/studio/playbooks/demo-tools/settings", "settings"),
                       ("/studio/playbooks/demo-tools/delete", "delete"),
                       ("/studio/playbooks/demo-tools/servers/remote", "server-edit"),
                       ("/studio/playbooks/demo-tools/servers/remote/remove", "server-remove"),
                       ("/studio/import", "import"), ("/studio/account", "account"),
                       ("/studio/", "playbooks")):
        open_page(browser, daemon, path)
        record(browser, name)
    assert "s3cr3t" not in browser.page_source
    # An invalid document is refused with the CLI's FILE:LINE:COLUMN lines.
    open_page(browser, daemon, "/studio/import")
    find(browser, "#f-text").send_keys("version: 1\nid: bad\nname: Bad\nservers:\n"
                                       "  - name: x\n    type: http\n    url: ftp://no\n")
    submit(browser, "Import")
    assert "pasted document:7:" in find(browser, "#errors").text
    record(browser, "import-errors")


def test_prompt_preview_in_the_browser(daemon: Daemon, browser: webdriver.Chrome) -> None:
    open_page(browser, daemon, "/studio/playbooks/demo-tools/prompts/new?new=1")
    fill(browser, {"name": "greet", "title": "Greeting", "body": "Hello {{who}}!"})
    find(browser, "#f-arg-0-name").send_keys("who")
    find(browser, "#f-arg-0-required option[value=yes]").click()
    submit(browser, "Save prompt")
    assert "Prompt saved." in browser.page_source
    fill(browser, {"preview.who": "Ada"})
    submit(browser, "Preview")
    assert find(browser, "#preview-text").text == "Hello Ada!"
    record(browser, "prompt-edit")


def test_a_failing_servers_error_appears_live(daemon: Daemon, browser: webdriver.Chrome) -> None:
    open_page(browser, daemon, "/studio/")
    fill(browser, {"name": "Fragile"})
    submit(browser, "Create playbook")
    add_server(browser, daemon, "fragile", "stdio",
               {"name": "doomed", "command": "sh",
                "args": "-c\nsleep 5; echo 'cannot open the database' >&2; exit 3"})
    live(browser)
    browser.execute_script("window.notReloaded = true;")
    assert statuses(browser) == ["starting"]
    wait_for(browser, lambda: statuses(browser) == ["error"], 30, "the error shown live")
    assert browser.execute_script("return window.notReloaded === true;")
    badge = find(browser, "[data-status='error']").text
    assert "failed to run" in badge and "cannot open the database" in badge
    record(browser, "playbook-error")


def test_the_registry_pages_in_the_browser(daemon: Daemon, browser: webdriver.Chrome) -> None:
    """Find a server, its page, and the install form with its secret input: each checked by
    axe-core and photographed like the other pages."""
    open_page(browser, daemon, "/studio/registry?playbook=demo-tools")
    fill(browser, {"q": "everything"})
    submit(browser, "Search")
    assert rc.EVERYTHING in browser.page_source
    record(browser, "registry-search")
    find(browser, "a[href*='/studio/registry/entry']").click()
    wait_for(browser, lambda: "Install" in browser.page_source)
    record(browser, "registry-entry")
    open_page(browser, daemon, f"/studio/registry/install?into=demo-tools&name={rc.EVERYTHING}"
                               f"&version={rc.NEW}&choice=package:0")
    assert "/servers/from-registry" in browser.current_url
    assert browser.find_elements(By.CSS_SELECTOR, "input[type=password]")
    record(browser, "registry-install")
    open_page(browser, daemon, "/studio/registry/entry?name=io.example/container")
    assert "need a container runtime" in browser.page_source
    record(browser, "registry-refused")


def test_csrf_and_another_users_pages_in_the_browser(daemon: Daemon,
                                                     browser: webdriver.Chrome) -> None:
    # A form whose token was removed is refused.
    open_page(browser, daemon, "/studio/")
    browser.execute_script("document.querySelectorAll(\"input[name='csrf_token']\")"
                           ".forEach(e => e.remove());")
    fill(browser, {"name": "Forged"})
    submit(browser, "Create playbook")
    assert "This form has expired" in browser.page_source
    record(browser, "error-403")
    open_page(browser, daemon, "/studio/")
    assert "Forged" not in browser.page_source
    # A second user: the first user's pages do not exist for them.
    browser.delete_all_cookies()
    open_page(browser, daemon, "/studio/signup")
    record(browser, "signup")
    fill(browser, {"email": "second@example.com", "password": PASSWORD})
    submit(browser, "Create my account")
    assert "Your account is ready" in browser.page_source
    for path in ("/studio/playbooks/demo-tools", "/studio/playbooks/demo-tools/connect",
                 "/studio/playbooks/demo-tools/tools/echo"):
        open_page(browser, daemon, path)
        assert "Not found" in browser.title, path
    record(browser, "error-404")
    browser.delete_all_cookies()
    open_page(browser, daemon, "/studio/playbooks/demo-tools")
    assert "/studio/login?next=" in browser.current_url
    record(browser, "login")
