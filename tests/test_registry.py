"""The registry: finding servers in a local MCP Registry (API v0.1) that the tests run, with odd
and hostile entries; installing a real npm server from it and calling its tools through the
gateway; update and removal; a registry gone wrong changes nothing; the trust setting in
production."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from director.registry import catalogue, install
from tests import registry_catalogue as rc
from tests.accounts_helpers import Account, call, error_code, eventually, sign_up
from tests.harness import (
    DIRECTOR,
    SECRET,
    Daemon,
    base_environment,
    free_port,
    local_servers,
    make_temp_dir,
    query,
)
from tests.test_mcp_gateway import Gateway, parse_response

StartDaemon = Callable[..., Daemon]
REGISTRY_SERVER = str(Path(__file__).parent / "fixtures" / "registry_server.py")
OWNER = "registry@example.com"
TOKEN = "s3cret-token-value"
EVERYTHING_INPUTS = {"env.EVERYTHING_TOKEN": TOKEN}


class Registry:
    """A local registry process serving a catalogue file."""

    def __init__(self, directory: Path, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.catalogue = directory / "catalogue.json"

    def requests(self) -> int:
        with urllib.request.urlopen(f"{self.url}/debug/requests",  # noqa: S310 - http only
                                    timeout=5) as answer:
            return int(json.load(answer)["requests"])


@contextlib.contextmanager
def running_registry(mode: str = "ok", latest: str = rc.NEW) -> Iterator[Registry]:
    directory = make_temp_dir("director-test-registry-")
    try:
        registry = Registry(directory, free_port())
        rc.write(registry.catalogue, latest)
        with local_servers([[sys.executable, REGISTRY_SERVER, str(registry.catalogue),
                             str(registry.port), "--mode", mode]], [registry.port]):
            yield registry
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def registry() -> Iterator[Registry]:
    with running_registry() as running:
        yield running


def playbook_of(daemon: Daemon) -> Account:
    daemon.wait_healthy()
    owner = sign_up(daemon, OWNER)
    status, _, body = call(daemon, "POST", "/api/v1/playbooks", {"name": "Ref"}, key=owner.key)
    assert status == 201, body
    return owner


def version_of(daemon: Daemon, owner: Account) -> int:
    return int(call(daemon, "GET", "/api/v1/playbooks/ref", key=owner.key)[2]["version"])


def install_everything(daemon: Daemon, owner: Account, **body: Any) -> tuple[int, Any]:
    sent = {"name": rc.EVERYTHING, "version": rc.OLD, "inputs": EVERYTHING_INPUTS} | body
    status, _, answer = call(daemon, "POST", "/api/v1/playbooks/ref/servers/from-registry",
                             sent, key=owner.key)
    return status, answer


def tool_names(gateway: Gateway) -> list[str]:
    status, _, body = gateway.post({"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
                                   gateway.open_session())
    assert status == 200, body
    return [tool["name"] for tool in parse_response(body)["result"]["tools"]]


# --- the entries: read defensively, judged precisely -------------------------------------


def test_odd_and_hostile_entries_are_skipped_or_refused_with_the_reason() -> None:
    page = catalogue.parse_page(rc.catalogue())
    names = [entry.name for entry in page.entries]
    assert page.skipped == 4  # no name, no version, an invalid name, not an object
    huge = page.entries[names.index("io.example/huge")]
    assert len(huge.description) == catalogue.MAX_DESCRIPTION
    problems = {entry.name: install.options(entry)[0].problem for entry in page.entries
                if entry.packages}
    assert "container runtime" in problems["io.example/container"]
    assert "'bogus' packages are not supported" in problems["io.example/bogus-type"]
    assert "--x; rm -rf /" in problems["io.example/flag-injection"]
    assert "is not a valid npm package name" in problems["io.example/identifier-injection"]
    assert "not an exact version" in problems["io.example/latest"]
    assert "not an exact version" in problems["io.example/range"]
    assert "runtimeArguments" in problems["io.example/runtime-args"]
    assert "https://registry.npmjs.org only" in problems["io.example/other-npm"]
    with pytest.raises(install.InstallError, match="lists no packages and no remotes"):
        install.choose(page.entries[names.index("io.example/no-packages")], None)


def test_inputs_become_one_argument_each_and_are_checked() -> None:
    page = catalogue.parse_page(rc.catalogue())
    entry = next(e for e in page.entries if e.name == "io.example/shell-arguments")
    option = install.choose(entry, None)
    assert option.recipe is not None
    with pytest.raises(install.InstallError) as refused:
        install.check_inputs(option.recipe, {"arg.path": "relative; rm -rf /", "x": "1"})
    assert refused.value.fields == {
        "inputs.arg.path": "must be an absolute path on the gateway host",
        "inputs.x": "is not an input of this server (its inputs: arg.path)"}
    values = install.check_inputs(option.recipe, {"arg.path": "/srv/$(reboot); rm -rf /"})
    assert install.materialize(option.recipe, values)["args"] == (
        "-y", "--", "left-pad@1.3.0", "/srv/$(reboot); rm -rf /")
    remote = next(e for e in page.entries if e.name == "io.example/weather")
    option = install.choose(remote, None)
    assert option.recipe is not None
    with pytest.raises(install.InstallError) as refused:
        install.check_inputs(option.recipe, {"header.Authorization.token": "a\r\nX-Evil: 1"})
    assert refused.value.fields == {
        "inputs.header.Authorization.token": "must not contain line breaks",
        "inputs.url.tenant": "is required (Your tenant)"}
    values = install.check_inputs(option.recipe, {"url.tenant": "acme",
                                                  "header.Authorization.token": "t"})
    made = install.materialize(option.recipe, values)
    assert made["url"] == "https://acme.weather.example/mcp"
    assert made["headers"][0][0] == "Authorization"
    assert made["headers"][0][1].value == "Bearer t" and made["headers"][0][1].secret


def test_a_pypi_package_runs_with_uvx_pinned_and_its_inputs_follow() -> None:
    page = catalogue.parse_page({"servers": [
        {"server": {"name": "io.example/fetch", "version": "2025.4.7", "description": "fetch",
                    "packages": [{"registryType": "pypi", "identifier": "mcp-server-fetch",
                                  "version": "2025.4.7", "transport": {"type": "stdio"},
                                  "packageArguments": [{"type": "named",
                                                        "name": "--user-agent",
                                                        "isRequired": True}],
                                  "environmentVariables": [{"name": "FETCH_TOKEN",
                                                            "isSecret": True}]}]}},
        {"server": {"name": "io.example/fetch-latest", "version": "1.0.0", "description": "x",
                    "packages": [{"registryType": "pypi", "identifier": "mcp-server-fetch",
                                  "version": "latest", "transport": {"type": "stdio"}}]}},
        {"server": {"name": "io.example/fetch-bad", "version": "1.0.0", "description": "x",
                    "packages": [{"registryType": "pypi", "identifier": "fetch==1; rm -rf /",
                                  "version": "1.0.0", "transport": {"type": "stdio"}}]}}]})
    fetch, latest, bad = page.entries
    option = install.choose(fetch, None)
    assert option.recipe is not None and option.problem is None
    values = install.check_inputs(option.recipe, {"arg.user-agent": "director-test",
                                                  "env.FETCH_TOKEN": "s3cret"})
    made = install.materialize(option.recipe, values)
    assert (made["command"], made["args"]) == (
        "uvx", ("mcp-server-fetch==2025.4.7", "--user-agent", "director-test"))
    assert made["env"][0][0] == "FETCH_TOKEN" and made["env"][0][1].secret
    assert "not an exact version" in (install.options(latest)[0].problem or "")
    assert install.options(bad)[0].problem


# --- finding ----------------------------------------------------------------------------


def test_search_pages_and_caches_and_shows_entries(start_daemon: StartDaemon,
                                                  migrated_url: str,
                                                  registry: Registry) -> None:
    daemon = start_daemon(DATABASE_URL=migrated_url, REGISTRY_URL=registry.url)
    owner = playbook_of(daemon)
    status, _, page = call(daemon, "GET", "/api/v1/registry/servers?limit=5", key=owner.key)
    assert status == 200, page
    assert page["next_cursor"] and page["registry"] == registry.url
    seen = [item["name"] for item in page["items"]]
    skipped = page["skipped"]
    while page["next_cursor"]:
        status, _, page = call(daemon, "GET", "/api/v1/registry/servers?limit=5&cursor="
                               + page["next_cursor"], key=owner.key)
        assert status == 200, page
        seen += [item["name"] for item in page["items"]]
        skipped += page["skipped"]
    assert rc.EVERYTHING in seen and "io.example/huge" in seen
    assert skipped == 3  # the entries that are no servers (the registry's dedup kept 3)
    assert len(seen) == len(set(seen))  # the latest version of each, once
    before = registry.requests()
    for _ in range(2):
        status, _, found = call(daemon, "GET", "/api/v1/registry/servers?q=everything",
                                key=owner.key)
        assert status == 200
    assert registry.requests() == before + 1  # max-age=60: the second answer was cached
    assert [(item["name"], item["version"]) for item in found["items"]] == [(rc.EVERYTHING,
                                                                              rc.NEW)]
    status, _, entry = call(daemon, "GET", f"/api/v1/registry/servers/{rc.EVERYTHING}",
                            key=owner.key)
    assert status == 200, entry
    assert entry["version"] == rc.NEW and entry["versions"] == [rc.NEW, rc.OLD]
    (option,) = entry["options"]
    assert option["installable"] and option["runtime"] == "npx"
    token, mode = option["fields"]
    assert token | {} == {"id": "env.EVERYTHING_TOKEN", "label": "EVERYTHING_TOKEN",
                          "description": "A token (ignored)", "required": True, "secret": True,
                          "default": None, "choices": None, "format": "string",
                          "placeholder": None}
    assert mode["choices"] == ["calm", "busy"] and mode["default"] == "calm"
    status, _, entry = call(daemon, "GET", "/api/v1/registry/servers/io.example/container",
                            key=owner.key)
    assert status == 200 and not entry["options"][0]["installable"]
    assert "container runtime" in entry["options"][0]["problem"]
    for path, code in (("io.example/nothing", "not_in_registry"),
                       (f"{rc.EVERYTHING}?version=9.9.9", "not_in_registry")):
        status, _, body = call(daemon, "GET", f"/api/v1/registry/servers/{path}", key=owner.key)
        assert (status, error_code(body)) == (404, code), body
    assert call(daemon, "GET", "/api/v1/registry/servers")[0] == 401


@pytest.mark.parametrize("mode", ["nonsense", "huge", "error", "down"])
def test_a_registry_gone_wrong_is_a_clear_error_and_changes_nothing(
        start_daemon: StartDaemon, migrated_url: str, mode: str) -> None:
    with contextlib.ExitStack() as stack:
        if mode == "down":
            url = f"http://127.0.0.1:{free_port()}"
        else:
            url = stack.enter_context(running_registry(mode)).url
        daemon = start_daemon(DATABASE_URL=migrated_url, REGISTRY_URL=url,
                              REGISTRY_TRUST="any")
        owner = playbook_of(daemon)
        version = version_of(daemon, owner)
        status, _, body = call(daemon, "GET", "/api/v1/registry/servers?q=x", key=owner.key)
        assert (status, error_code(body)) == (502, "registry_unavailable"), body
        assert body["error"]["message"].startswith(f"the registry {url}")
        expected = {"nonsense": "not JSON", "huge": "larger than", "error": "HTTP 500",
                    "down": "cannot be reached"}[mode]
        assert expected in body["error"]["message"]
        status, answer = install_everything(daemon, owner)
        assert (status, error_code(answer)) == (502, "registry_unavailable"), answer
        assert version_of(daemon, owner) == version


# --- installing, calling, updating, removing ------------------------------------------------


def test_install_a_real_npm_server_call_it_update_it_remove_it(
        start_daemon: StartDaemon, migrated_url: str, registry: Registry) -> None:
    daemon = start_daemon(DATABASE_URL=migrated_url, REGISTRY_URL=registry.url,
                          REGISTRY_TRUST="allowlist",
                          REGISTRY_ALLOW="io.github.modelcontextprotocol/*")
    owner = playbook_of(daemon)
    version = version_of(daemon, owner)
    status, answer = install_everything(daemon, owner, inputs={})
    assert status == 400 and answer["error"]["details"]["fields"] == {
        "inputs.env.EVERYTHING_TOKEN": "is required (A token (ignored))"}
    status, answer = install_everything(daemon, owner, choice="remote:0")
    assert status == 400 and "has no 'remote:0'" in answer["error"]["details"]["fields"]["choice"]
    assert version_of(daemon, owner) == version

    status, server = install_everything(daemon, owner)
    assert status == 201, server
    assert server["name"] == "everything" and server["status"] == {"state": "allowed"}
    assert server["command"] == "npx"
    assert server["args"] == ["-y", "--", f"{rc.EVERYTHING_PACKAGE}@{rc.OLD}", "stdio"]
    assert server["env"] == {"EVERYTHING_MODE": "calm",
                             "EVERYTHING_TOKEN": {"secret": True, "value": None}}
    assert server["registry"] == {"registry": registry.url, "name": rc.EVERYTHING,
                                  "version": rc.OLD, "inputs": {
                                      "env.EVERYTHING_MODE": "calm",
                                      "env.EVERYTHING_TOKEN": {"secret": True, "value": None}}}
    stored = query(migrated_url, "SELECT config::text FROM playbook_servers")[0][0]
    assert TOKEN not in stored and "sealed" in stored  # the secret input rests sealed

    gateway = Gateway(daemon, owner, Path("/nonexistent"))
    eventually(lambda: "echo" in tool_names(gateway), timeout=180, interval=1)
    session = gateway.open_session()
    status, _, body = gateway.post({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                                    "params": {"name": "echo",
                                               "arguments": {"message": "from the registry"}}},
                                   session)
    assert status == 200
    assert "from the registry" in json.dumps(parse_response(body)["result"])

    # The command is the registry's: never edited directly, never faked.
    for change in ({"command": "/bin/sh"}, {"args": ["-c", "id"]}, {"env": {"X": "1"}}):
        status, _, body = call(daemon, "PATCH", "/api/v1/playbooks/ref/servers/everything",
                               change, key=owner.key)
        assert status == 400 and "comes from the registry entry" in json.dumps(body), body
    status, _, body = call(daemon, "POST", "/api/v1/playbooks/ref/servers", {
        "name": "fake", "type": "stdio", "command": "npx", "args": ["-y", "evil"],
        "registry": {"name": rc.EVERYTHING, "version": rc.OLD}}, key=owner.key)
    assert status == 400 and body["error"]["details"]["fields"] == {
        "registry": "is not a known field"}
    status, _, body = call(daemon, "PATCH", "/api/v1/playbooks/ref/servers/everything",
                           {"prefix": "e_"}, key=owner.key)
    assert status == 200 and body["prefix"] == "e_", body

    status, _, state = call(daemon, "GET", "/api/v1/playbooks/ref/servers/everything/registry",
                            key=owner.key)
    assert status == 200, state
    assert (state["version"], state["latest_version"], state["update_available"]) == (
        rc.OLD, rc.NEW, True)
    status, _, updated = call(daemon, "POST",
                              "/api/v1/playbooks/ref/servers/everything/registry-update",
                              {}, key=owner.key)
    assert status == 200, updated
    assert updated["registry"]["version"] == rc.NEW and updated["prefix"] == "e_"
    assert updated["args"][2] == f"{rc.EVERYTHING_PACKAGE}@{rc.NEW}"
    status, _, revealed = call(daemon, "GET", "/api/v1/playbooks/ref/servers/everything"
                               "?reveal_secrets=true", key=owner.key)
    assert revealed["env"]["EVERYTHING_TOKEN"] == {"secret": True, "value": TOKEN}  # kept
    eventually(lambda: "e_echo" in tool_names(gateway), timeout=180, interval=1)
    status, _, state = call(daemon, "GET", "/api/v1/playbooks/ref/servers/everything/registry",
                            key=owner.key)
    assert state["update_available"] is False

    assert call(daemon, "DELETE", "/api/v1/playbooks/ref/servers/everything",
                key=owner.key)[0] == 204
    eventually(lambda: not any(name.startswith("e_") for name in tool_names(gateway)),
               timeout=30, interval=0.2)


# --- trust, in production ---------------------------------------------------------------------


@pytest.mark.parametrize(("trust", "allow", "allowed"), [
    ("none", "", False),
    ("allowlist", "io.github.modelcontextprotocol/everything", True),
    ("allowlist", "io.github.modelcontextprotocol/*", True),
    ("allowlist", "io.github.someone-else/*", False),
    ("any", "", True),
])
def test_trust_decides_which_packages_install_in_production(
        start_daemon: StartDaemon, migrated_url: str, registry: Registry, trust: str,
        allow: str, allowed: bool) -> None:
    port = free_port()
    production = {"NODE_ENV": "production", "DATABASE_URL": migrated_url, "PORT": str(port),
                  "BASE_URL": f"http://127.0.0.1:{port}", "BETTER_AUTH_SECRET": SECRET,
                  "REGISTRY_URL": registry.url, "REGISTRY_TRUST": trust}
    daemon = start_daemon(**production, **({"REGISTRY_ALLOW": allow} if allow else {}))
    owner = playbook_of(daemon)
    status, answer = install_everything(daemon, owner)
    if allowed:
        assert status == 201 and answer["status"] == {"state": "allowed"}, answer
    else:
        assert status == 400, answer
        assert "REGISTRY" in answer["error"]["details"]["fields"]["registry"]
    # A remote entry is an https server like any other: trust is about code run here.
    status, _, remote = call(daemon, "POST", "/api/v1/playbooks/ref/servers/from-registry", {
        "name": "io.example/weather", "inputs": {"url.tenant": "acme",
                                                 "header.Authorization.token": "t"}},
        key=owner.key)
    assert status == 201, remote
    assert (remote["type"], remote["url"]) == ("http", "https://acme.weather.example/mcp")
    assert remote["headers"] == {"Authorization": {"secret": True, "value": None}}
    status, _, refused = call(daemon, "POST", "/api/v1/playbooks/ref/servers/from-registry",
                              {"name": "io.example/metadata-service"}, key=owner.key)
    assert status == 400 and "must use https" in json.dumps(refused), refused


def test_a_package_installed_under_trust_is_refused_at_start_once_trust_is_withdrawn(
        start_daemon: StartDaemon, migrated_url: str, registry: Registry) -> None:
    trusted = start_daemon(DATABASE_URL=migrated_url, REGISTRY_URL=registry.url,
                           REGISTRY_TRUST="any")
    owner = playbook_of(trusted)
    assert install_everything(trusted, owner)[0] == 201
    trusted.stop()
    daemon = start_daemon(DATABASE_URL=migrated_url, REGISTRY_URL=registry.url)
    daemon.wait_healthy()
    status, _, server = call(daemon, "GET", "/api/v1/playbooks/ref/servers/everything",
                             key=owner.key)
    assert status == 200 and server["status"] == {
        "state": "refused", "reason": "refused by configuration: registry packages need "
                                      "REGISTRY_TRUST=allowlist (with REGISTRY_ALLOW) or any"}
    assert tool_names(Gateway(daemon, owner, Path("/nonexistent"))) == []
    daemon.wait_for_log("not started: refused by configuration")
    moved = start_daemon(DATABASE_URL=migrated_url, REGISTRY_URL="file:///nonexistent.json",
                         REGISTRY_TRUST="any")
    moved.wait_healthy()
    server = call(moved, "GET", "/api/v1/playbooks/ref/servers/everything", key=owner.key)[2]
    assert server["status"]["reason"] == ("refused by configuration: packages installed from "
                                          f"another registry need REGISTRY_URL={registry.url}")


# --- the command line, from a file catalogue ----------------------------------------------------


def director(url: str, catalogue_url: str, *args: str,
             **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DIRECTOR, *args], env=base_environment(DATABASE_URL=url, REGISTRY_URL=catalogue_url,
                                                REGISTRY_TRUST="any", **env),
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60, check=False)


def test_the_cli_finds_installs_updates_and_removes(start_daemon: StartDaemon,
                                                    migrated_url: str) -> None:
    directory = make_temp_dir("director-test-registry-cli-")
    catalogue_url = f"file://{rc.write(directory / 'catalogue.json')}"
    daemon = start_daemon(DATABASE_URL=migrated_url, REGISTRY_URL=catalogue_url,
                          REGISTRY_TRUST="any")
    owner = playbook_of(daemon)

    found = director(migrated_url, catalogue_url, "registry", "search", "everything")
    assert found.returncode == 0, found.stderr
    assert rc.EVERYTHING in found.stdout and rc.NEW in found.stdout
    shown = director(migrated_url, catalogue_url, "registry", "show", rc.EVERYTHING)
    assert shown.returncode == 0, shown.stderr
    assert "--input env.EVERYTHING_TOKEN=…  (required; secret)" in shown.stdout
    refused = director(migrated_url, catalogue_url, "registry", "show", "io.example/container")
    assert "cannot be installed: oci (container) packages need a container runtime" \
        in refused.stdout
    missing = director(migrated_url, catalogue_url, "playbooks", "install", "ref",
                       rc.EVERYTHING, "--user", OWNER, "--version", rc.OLD)
    assert missing.returncode == 2
    assert "inputs.env.EVERYTHING_TOKEN: is required" in missing.stderr

    inputs = directory / "inputs.json"
    inputs.write_text(json.dumps(EVERYTHING_INPUTS))
    installed = director(migrated_url, catalogue_url, "playbooks", "install", "ref",
                         rc.EVERYTHING, "--user", OWNER, "--version", rc.OLD,
                         "--inputs-file", str(inputs), "--input", "env.EVERYTHING_MODE=busy",
                         "--server-name", "all")
    assert installed.returncode == 0, installed.stderr
    assert f"installed {rc.EVERYTHING} {rc.OLD} as server 'all'" in installed.stdout
    status, _, server = call(daemon, "GET", "/api/v1/playbooks/ref/servers/all?"
                             "reveal_secrets=true", key=owner.key)
    assert status == 200 and server["registry"]["version"] == rc.OLD
    assert server["env"] == {"EVERYTHING_MODE": "busy",
                             "EVERYTHING_TOKEN": {"secret": True, "value": TOKEN}}

    def runtimes(**env: str) -> dict[str, Any]:
        checked = director(migrated_url, catalogue_url, "doctor", "--json", **env)
        return next(r for r in json.loads(checked.stdout)["checks"]
                    if r["name"] == "registry-runtimes")

    found = runtimes()  # (uvx may be missing: a warning, with REGISTRY_TRUST=any)
    assert found["status"] in ("ok", "warn") and "npx: /" in found["summary"]
    missing = runtimes(PATH="/nonexistent")
    assert missing["status"] == "fail", missing
    assert missing["summary"].startswith("1 stored servers need npx, which is not on PATH")

    updated = director(migrated_url, catalogue_url, "playbooks", "update-server", "ref", "all",
                       "--user", OWNER)
    assert updated.returncode == 0, updated.stderr
    assert f"from {rc.OLD} to {rc.NEW}" in updated.stdout
    server = call(daemon, "GET", "/api/v1/playbooks/ref/servers/all", key=owner.key)[2]
    assert server["registry"]["version"] == rc.NEW and server["env"]["EVERYTHING_MODE"] == "busy"

    exported = director(migrated_url, catalogue_url, "playbooks", "export", "ref",
                        "--user", OWNER)
    assert exported.returncode == 0 and "type: registry" in exported.stdout
    document = directory / "ref.yaml"
    document.write_text(exported.stdout.replace(f"version: {rc.NEW}", f"version: {rc.OLD}"))
    imported = director(migrated_url, catalogue_url, "playbooks", "import", str(document),
                        "--user", OWNER)
    assert imported.returncode == 0, imported.stderr
    assert "servers changed: all" in imported.stdout
    server = call(daemon, "GET", "/api/v1/playbooks/ref/servers/all", key=owner.key)[2]
    assert server["registry"]["version"] == rc.OLD

    removed = director(migrated_url, catalogue_url, "playbooks", "remove-server", "ref", "all",
                       "--user", OWNER)
    assert removed.returncode == 0, removed.stderr
    assert call(daemon, "GET", "/api/v1/playbooks/ref/servers/all", key=owner.key)[0] == 404
    down = director(migrated_url, "file:///nonexistent/catalogue.json", "registry", "search")
    assert down.returncode == 1
    assert "the catalogue /nonexistent/catalogue.json cannot be read" in down.stderr
    shutil.rmtree(directory, ignore_errors=True)


# --- the Studio -----------------------------------------------------------------------------------


def test_the_studio_finds_installs_updates_and_removes(migrated_url: str,
                                                       registry: Registry) -> None:
    from tests.studio_client import first_account
    from tests.test_studio import start_on

    daemon = start_on(migrated_url, REGISTRY_URL=registry.url, REGISTRY_TRUST="any")
    try:
        studio = first_account(daemon, OWNER, "correct horse battery")
        page = studio.post("/studio/playbooks", {"name": "Ref", "description": ""},
                           csrf=studio.get("/studio/").csrf())
        assert page.status == 303, page.text
        page = studio.get("/studio/registry?q=everything&playbook=ref")
        assert page.status == 200 and page.has(rc.EVERYTHING) and page.has(rc.NEW)
        assert "script-src 'self'" in page.headers["content-security-policy"]
        page = studio.get(f"/studio/registry/entry?name={rc.EVERYTHING}&playbook=ref")
        assert page.status == 200 and page.has("Install…")
        page = studio.get("/studio/registry/entry?name=io.example/container")
        assert page.has("Cannot be installed: oci (container) packages need a container "
                        "runtime")
        page = studio.get(f"/studio/registry/install?into=ref&name={rc.EVERYTHING}"
                          f"&version={rc.OLD}&choice=package:0")
        assert page.status == 303
        form = studio.get(page.location)
        assert form.status == 200 and form.has('type="password"')  # the secret input
        fields = {"version": "1", "name": rc.EVERYTHING, "entry_version": rc.OLD,
                  "choice": "package:0", "server_name": "everything",
                  "input.env.EVERYTHING_MODE": "busy"}
        refused = studio.post("/studio/playbooks/ref/servers/from-registry", fields)
        assert refused.status == 400 and refused.has("inputs.env.EVERYTHING_TOKEN")
        assert studio.post("/studio/playbooks/ref/servers/from-registry", fields | {
            "input.env.EVERYTHING_TOKEN": TOKEN}, csrf=form.csrf(), with_csrf=True
        ).status == 303
        assert studio.post("/studio/playbooks/ref/servers/from-registry", fields,
                           csrf="forged").status == 403
        page = studio.get("/studio/playbooks/ref/servers/everything")
        assert page.status == 200 and page.has("Update available: ") and page.has(rc.NEW)
        assert not page.has(TOKEN)
        updated = studio.post("/studio/playbooks/ref/servers/everything/registry-update",
                              {"version": "2", "input.env.EVERYTHING_MODE": "calm"},
                              csrf=page.csrf())
        assert updated.status == 303, updated.text
        server = query(migrated_url, "SELECT config::text FROM playbook_servers")[0][0]
        assert rc.NEW in server and TOKEN not in server and '"calm"' in server
        page = studio.get("/studio/playbooks/ref/servers/everything/remove")
        assert studio.post("/studio/playbooks/ref/servers/everything/remove",
                           {"version": "3"}, csrf=page.csrf()).status == 303
        assert query(migrated_url, "SELECT count(*) FROM playbook_servers")[0][0] == 0
    finally:
        daemon.stop()


# --- playbook documents (YAML) ------------------------------------------------------------------


def test_a_registry_server_in_a_document_is_its_provenance_never_its_command(
        start_daemon: StartDaemon, migrated_url: str) -> None:
    import yaml

    directory = make_temp_dir("director-test-registry-yaml-")
    catalogue_url = f"file://{rc.write(directory / 'catalogue.json')}"
    daemon = start_daemon(DATABASE_URL=migrated_url, REGISTRY_URL=catalogue_url,
                          REGISTRY_TRUST="any")
    owner = playbook_of(daemon)
    assert install_everything(daemon, owner)[0] == 201

    def export() -> str:
        status, _, text = call(daemon, "GET", "/api/v1/playbooks/ref/export", key=owner.key)
        assert status == 200
        return bytes(text).decode()

    def load(document: str) -> tuple[int, Any]:
        status, _, body = call(daemon, "POST", "/api/v1/playbooks/import",
                               document.encode(), key=owner.key,
                               headers={"content-type": "application/yaml"})
        return status, body

    text = export()
    document = yaml.safe_load(text)
    assert document["servers"] == [{"name": "everything", "type": "registry", "registry": {
        "url": catalogue_url, "name": rc.EVERYTHING, "version": rc.OLD,
        "inputs": {"env.EVERYTHING_MODE": "calm", "env.EVERYTHING_TOKEN": {"secret": True}}}}]
    # (as a word: the catalogue's temporary directory has a random name that may contain it)
    assert not re.search(r"\bnpx\b", text) and TOKEN not in text
    assert load(text) == (200, load(text)[1]) and load(text)[1]["result"] == "unchanged"

    # A newer version is fetched from the registry; the redacted secret is kept.
    document["servers"][0]["registry"]["version"] = rc.NEW
    status, body = load(yaml.safe_dump(document))
    assert (status, body["result"]) == (200, "updated"), body
    status, _, server = call(daemon, "GET", "/api/v1/playbooks/ref/servers/everything"
                             "?reveal_secrets=true", key=owner.key)
    assert server["args"][2] == f"{rc.EVERYTHING_PACKAGE}@{rc.NEW}"
    assert server["env"]["EVERYTHING_TOKEN"] == {"secret": True, "value": TOKEN}

    # What runs is never the document's: another registry, an unknown version, a command.
    for change, path, expected in (
            ({"url": "http://registry.evil.example"}, "servers[0].registry.url",
             "is not this daemon's REGISTRY_URL"),
            ({"version": "6.6.6"}, "servers[0].registry.name", "has no version '6.6.6'")):
        forged = json.loads(json.dumps(document))
        forged["servers"][0]["name"] = "other"
        forged["servers"][0]["registry"] |= change
        forged["servers"][0]["registry"]["inputs"] = {"env.EVERYTHING_TOKEN": "t"}
        status, body = load(yaml.safe_dump(forged))
        assert status == 400, body
        assert expected in body["error"]["details"]["fields"][path], body
    forged = json.loads(json.dumps(document))
    forged["servers"][0]["command"] = "/bin/sh"
    status, body = load(yaml.safe_dump(forged))
    assert status == 400 and body["error"]["details"]["fields"] == {
        "servers[0].command": "is not a known field of a registry server"}
    shutil.rmtree(directory, ignore_errors=True)
