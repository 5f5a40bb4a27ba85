"""Playbooks as YAML: the document format, ``director playbooks …`` and the export/import API,
against real PostgreSQL, real daemons and the real command."""

from __future__ import annotations

import datetime
import json
import os
import random
import re
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from director.config import Settings
from director.db import migrate
from director.playbooks import documents, rails
from director.playbooks.documents import DocumentInvalid, export_document, parse_document
from director.playbooks.model import Prompt, PromptArgument, SecretValue, Server
from director.playbooks.rails import check_server_sync
from director.playbooks.store import Playbook
from tests.accounts_helpers import Account, call, eventually, sign_up
from tests.harness import DIRECTOR, Daemon, base_environment, free_port, query

STDIO_FLAG = "DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS"
INSECURE_FLAG = "DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS"

#: CI replays the same generated cases (reproducible); EXPLORE=1 draws new ones each run.
DERANDOMIZE = os.environ.get("EXPLORE") != "1"


# --- fixtures: one database, two daemons on it (stdio allowed, and not) ---------------------


@pytest.fixture(scope="module")
def database(postgres: Any) -> Iterator[str]:
    name = postgres.create_database()
    url = postgres.url_for(name)
    migrate.upgrade(url)
    yield url
    postgres.drop_database(name)


def _daemon(url: str, **flags: str) -> Daemon:
    return Daemon(base_environment(DATABASE_URL=url, PORT=str(free_port()),
                                   API_KEY_RATE_LIMIT_MAX_REQUESTS="100000",
                                   USER_RATE_LIMIT_MAX_REQUESTS="100000", **flags))


@pytest.fixture(scope="module")
def daemons(database: str) -> Iterator[tuple[Daemon, Daemon]]:
    """``(open, strict)``: the first allows stdio servers, the second has every rail on."""
    started = [_daemon(database, **{STDIO_FLAG: "true"}), _daemon(database)]
    try:
        for daemon in started:
            daemon.wait_healthy()
        yield started[0], started[1]
    finally:
        for daemon in started:
            daemon.stop()


@pytest.fixture(scope="module")
def open_daemon(daemons: tuple[Daemon, Daemon]) -> Daemon:
    return daemons[0]


@pytest.fixture(scope="module")
def strict_daemon(daemons: tuple[Daemon, Daemon]) -> Daemon:
    return daemons[1]


def someone(daemon: Daemon, name: str) -> Account:
    return sign_up(daemon, f"{name}-{uuid.uuid4().hex[:8]}@example.com")


def api(daemon: Daemon, account: Account, method: str, path: str,
        body: Any = None, **headers: str) -> tuple[int, dict[str, str], Any]:
    return call(daemon, method, "/api/v1" + path, body, key=account.key,
                headers={k.replace("_", "-"): v for k, v in headers.items()})


def ok(result: tuple[int, dict[str, str], Any], status: int = 200) -> Any:
    assert result[0] == status, result
    return result[2]


def export(daemon: Daemon, account: Account, playbook_id: str, secrets: bool = False) -> str:
    query_string = "?include_secrets=true" if secrets else ""
    status, headers, body = api(daemon, account, "GET",
                                f"/playbooks/{playbook_id}/export{query_string}")
    assert status == 200, body
    assert headers["content-type"] == "application/yaml; charset=utf-8"
    assert headers["cache-control"] == "no-store"
    return bytes(body).decode()


def import_(daemon: Daemon, account: Account, text: str | bytes, query_string: str = "",
            content_type: str = "application/yaml") -> tuple[int, dict[str, str], Any]:
    raw = text.encode() if isinstance(text, str) else text
    return api(daemon, account, "POST", "/playbooks/import" + query_string, raw,
               content_type=content_type)


def history(daemon: Daemon, account: Account, playbook_id: str) -> list[dict[str, Any]]:
    return list(ok(api(daemon, account, "GET", f"/playbooks/{playbook_id}/history"))["items"])


def line_of(text: str, fragment: str, occurrence: int = 0) -> int:
    """1-based number of the line holding the ``occurrence``-th ``fragment``."""
    lines = [n for n, line in enumerate(text.splitlines(), 1) if fragment in line]
    return lines[occurrence]


# --- a playbook made through the API --------------------------------------------------------

SERVERS: list[dict[str, Any]] = [
    {"name": "github", "type": "stdio", "command": "npx",
     "args": ["-y", "@modelcontextprotocol/server-github", "--flag=yes"],
     "env": {"GITHUB_TOKEN": {"value": "ghp_0123456789", "secret": True}, "LOG_LEVEL": "debug",
             "ON": "010"},
     "cwd": "/srv/tools", "isolate_sessions": True, "timeout_seconds": 30},
    {"name": "search", "type": "http", "url": "https://mcp.example.com/mcp",
     "headers": {"Authorization": {"value": "Bearer s3cr3t", "secret": True},
                 "X-Team": "core"},
     "prefix": "s_", "exclude": ["delete_everything"], "expose_prompts": True},
    {"name": "events", "type": "sse", "url": "https://events.example.com/sse",
     "disabled": True, "include": [], "timeout_seconds": 0.5},
]
PROMPTS: list[dict[str, Any]] = [
    {"name": "review", "title": "Review a pull request", "description": "yes",
     "body": "Review {pr} carefully.\n\n  Be kind — ünïcödé, \"quotes\", 'single', #hash\n",
     "arguments": [{"name": "pr", "description": "PR number", "required": True},
                   {"name": "tone"}]},
    {"name": "short", "body": "one line: with a colon"},
]


def make_playbook(daemon: Daemon, account: Account, name: str = "GitHub tools") -> str:
    created = ok(api(daemon, account, "POST", "/playbooks",
                     {"name": name, "description": "Tools for GitHub.\nSecond line.",
                      "position": 2}), 201)
    playbook_id = created["id"]
    for server in SERVERS:
        ok(api(daemon, account, "POST", f"/playbooks/{playbook_id}/servers", server), 201)
    for prompt in PROMPTS:
        ok(api(daemon, account, "POST", f"/playbooks/{playbook_id}/prompts", prompt), 201)
    return str(playbook_id)


def contents(daemon: Daemon, account: Account, playbook_id: str) -> dict[str, Any]:
    """The playbook with secrets, less what differs between owners (version, times, URLs)."""
    body = ok(api(daemon, account, "GET", f"/playbooks/{playbook_id}?reveal_secrets=true"))
    return {k: v for k, v in body.items()
            if k not in ("version", "created_at", "updated_at", "urls")}


# --- the document format (no database) --------------------------------------------------------

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def playbook_of(servers: tuple[Server, ...] = (), prompts: tuple[Prompt, ...] = (),
                **fields: Any) -> Playbook:
    values: dict[str, Any] = {"id": "p", "name": "P", "description": "", "position": 0}
    values.update(fields)
    return Playbook(uuid.uuid4(), uuid.uuid4(), values["id"], values["name"],
                    values["description"], values["position"], 1, NOW, NOW, servers, prompts)


def same_contents(parsed: documents.ParsedPlaybook, playbook: Playbook) -> bool:
    return parsed.id == playbook.id and parsed.same_as(playbook)


def tricky_texts(count: int) -> list[str]:
    alphabet = list("a Z0\n\t#:-é'\"\\|>%!&*?[]{},`@~\r\x85\u2028\u2029\ufeff\x7f\x01😀")
    chooser = random.Random(1234)  # deterministic
    texts = ["yes", "no", "on", "null", "~", "010", "1e3", "2024-01-01", "- item", "a: b",
             " leading", "trailing ", "\n", "\n\n", "line\n", "x" * 300 + " " + "y" * 300,
             " ".join(["word"] * 80)]
    texts += ["".join(chooser.choice(alphabet) for _ in range(chooser.randint(1, 24)))
              for _ in range(count)]
    return texts


def test_round_trip_is_exact_for_any_text() -> None:
    texts = tricky_texts(300)
    prompts = tuple(Prompt(f"p{i}", body=text if text.strip() else "x" + text, title=text,
                           description=text, arguments=(PromptArgument("a", text, True),))
                    for i, text in enumerate(texts))
    servers = (
        Server("s", "stdio", command="run", args=tuple(texts[:50]),
               env=tuple(sorted((f"V{i}", SecretValue(t, i % 2 == 0))
                                for i, t in enumerate(texts[:50])))),
        Server("h", "http", url="https://example.com/x",
               headers=(("X-A", SecretValue("yes")), ("X-B", SecretValue("s", True))),
               include=(), timeout_seconds=1e-05),
    )
    playbook = playbook_of(servers, prompts, description=texts[20], position=-5, name="N")
    for secrets in (True, False):
        text = export_document(playbook, include_secrets=secrets)
        parsed = parse_document(text)
        if secrets:
            assert same_contents(parsed, playbook)
        else:
            assert len(parsed.redacted) == 26
            assert same_contents(parsed.with_stored_secrets(playbook), playbook)
        assert export_document(parsed.with_stored_secrets(playbook), secrets) == text


def test_export_leaves_defaults_out_and_orders_keys() -> None:
    server = Server("s", "http", url="https://example.com/mcp")
    playbook = playbook_of((server,), (Prompt("p", "Hello\nworld\n"),), id="x", name="X")
    assert export_document(playbook) == (
        "version: 1\nid: x\nname: X\nservers:\n  - name: s\n    type: http\n"
        "    url: https://example.com/mcp\nprompts:\n  - name: p\n    body: |\n"
        "      Hello\n      world\n")
    # What a default means is fixed by version 1, not by the model's current default.
    assert parse_document("version: 1\nname: X\nservers:\n- {name: s, type: http, url: "
                          "'https://e.com'}").servers[0].timeout_seconds == 60.0


def test_null_means_not_given_and_id_comes_from_the_name() -> None:
    parsed = parse_document("version: 1\nname: My GitHub Tools!\nid:\ndescription: ~\n"
                            "servers:\nprompts: null\n")
    assert (parsed.id, parsed.fields.description, parsed.servers) == ("my-github-tools", "", ())


def problems_of(text: str | bytes) -> dict[str, tuple[str, int | None, int | None]]:
    with pytest.raises(DocumentInvalid) as raised:
        parse_document(text)
    return {p.path: (p.message, p.line, p.column) for p in raised.value.problems()}


HEADER = "version: 1\nname: Demo\n"


@pytest.mark.parametrize(("text", "path", "line", "column", "fragment"), [
    # wrong types
    (HEADER + "position: high\n", "position", 3, 11, "whole number"),
    (HEADER + "description: yes\n", "description", 3, 14, "unquoted 'yes' as a boolean"),
    (HEADER + "servers:\n  - name: a\n    type: stdio\n    command: x\n    args: x\n",
     "servers[0].args", 7, 11, "must be a list"),
    (HEADER + "servers:\n  - name: a\n    type: http\n    url: https://e.com\n"
              "    timeout_seconds: '5'\n", "servers[0].timeout_seconds", 7, 22, "seconds"),
    (HEADER + "servers: {a: 1}\n", "servers", 3, 10, "must be a list"),
    (HEADER + "prompts:\n  - name: p\n    body: hi\n    arguments: [{name: a, required: 1}]\n",
     "prompts[0].arguments[0].required", 6, 37, "true or false"),
    # unknown keys, at every level
    (HEADER + "colour: blue\n", "colour", 3, 1, "not a known field"),
    (HEADER + "servers:\n  - name: a\n    type: stdio\n    command: x\n    comand: y\n",
     "servers[0].comand", 7, 5, "not a known field"),
    (HEADER + "servers:\n  - name: a\n    type: stdio\n    command: x\n"
              "    env: {T: {value: v, secrt: true}}\n", "servers[0].env.T.secrt", 7, 25,
     "not a known field"),
    (HEADER + "prompts:\n  - {name: p, body: b, arguments: [{name: a, type: s}]}\n",
     "prompts[0].arguments[0].type", 4, 46, "not a known field"),
    # the version
    ("name: Demo\n", "version", 1, 1, "is required"),
    ("version: 2\nname: Demo\n", "version", 1, 10, "must be 1"),
    ("version: '1'\nname: Demo\n", "version", 1, 10, "must be 1"),
    ("version: true\nname: Demo\n", "version", 1, 10, "must be 1"),
    # duplicates
    (HEADER + "servers:\n  - {name: a, type: stdio, command: x}\n"
              "  - {name: b, type: stdio, command: x}\n  - {name: a, type: sse, url: "
              "'https://e.com'}\n", "servers[2].name", 6, 12, "also servers[0]"),
    (HEADER + "prompts:\n  - {name: p, body: x}\n  - {name: p, body: y}\n",
     "prompts[1].name", 5, 12, "repeats the prompt name 'p'"),
    (HEADER + "name: Again\n", "name", 3, 1, "appears twice"),
    (HEADER + "prompts:\n  - {name: p, body: x, arguments: [{name: a}, {name: a}]}\n",
     "prompts[0].arguments[1].name", 4, 54, "repeats the argument"),
    # include and exclude together
    (HEADER + "servers:\n  - name: a\n    type: sse\n    url: https://e.com\n"
              "    include: [x]\n    exclude: [y]\n", "servers[0].include", 7, 14,
     "cannot be combined with exclude"),
    # syntax, structure, what the safe loader refuses
    (HEADER + "servers: [\n", "$", 4, 1, "invalid YAML"),
    (HEADER + "description: a\n  b: c\n", "$", 4, 4, "mapping values are not allowed"),
    (HEADER + "servers:\n\t- x\n", "$", 4, 1, "invalid YAML"),
    (HEADER + "---\nversion: 1\n", "$", 3, 1, "expected a single document"),
    ("- version: 1\n", "$", 1, 1, "must be a mapping"),
    ("", "$", 1, 1, "empty"),
    (HEADER + "description: !!python/object/apply:os.system [ls]\n", "$", 3, 14,
     "could not determine a constructor"),
    (HEADER + "description: &d text\nservers:\n  - {name: a, type: stdio, command: *d}\n",
     "servers[0].command", 5, 37, "aliases"),
    (HEADER + "1: one\n", "1", 3, 1, "keys must be strings"),
    (HEADER + "servers:\n  - name: a\n    type: stdio\n    command: x\n    env: {ON: x}\n",
     "servers[0].env.ON", 7, 11, "keys must be strings: quote"),
    (HEADER.encode() + b"description: caf\xe9\n", "$", 3, 17, "not valid UTF-8"),
    (HEADER + "description: 2024-13-01\n", "description", 3, 14, "month must be in 1..12"),
    (HEADER + "position: " + "9" * 5000 + "\n", "position", 3, 11, "cannot be read"),
    (HEADER + "description: \x07\n", "$", 3, 14, "not allowed"),
    # model rules, located
    (HEADER + "id: Not A Slug\n", "id", 3, 5, "lower-case"),
    (HEADER + "servers:\n  - name: a\n    type: stdio\n    command: x\n    url: https://e.com\n",
     "servers[0].url", 7, 10, "does not apply to a stdio server"),
    (HEADER + "servers:\n  - name: a\n    type: ftp\n", "servers[0].type", 5, 11,
     "one of stdio, http, sse"),
    (HEADER + "servers:\n  - name: a\n    type: http\n", "servers[0].url", 4, 5,
     "must be a string"),
    (HEADER + "servers:\n  - name: a\n    type: http\n    url: https://e.com\n"
              "    headers: {\"X-A\\n\": v}\n", "servers[0].headers.X-A\n", 7, 15,
     "HTTP header name"),  # the model refuses it first now
])
def test_invalid_documents_name_path_line_and_column(text: str | bytes, path: str, line: int,
                                                     column: int, fragment: str) -> None:
    found = problems_of(text)
    assert path in found, found
    message, at_line, at_column = found[path]
    assert (at_line, at_column) == (line, column), found
    assert fragment in message, found


def test_every_problem_is_reported_at_once_in_document_order() -> None:
    text = (HEADER + "position: x\nservers:\n  - name: a\n    type: stdio\n    command: 3\n"
            "    bogus: 1\n  - name: b\n    type: http\n    url: ftp://x\n"
            "prompts:\n  - name: p\n")
    with pytest.raises(DocumentInvalid) as raised:
        parse_document(text)
    lines = raised.value.lines("pb.yaml")
    assert lines == [
        "pb.yaml:3:11: position: must be a whole number",
        "pb.yaml:7:14: servers[0].command: must be a string (YAML reads the unquoted '3' as "
        "a number: quote it)",
        "pb.yaml:8:5: servers[0].bogus: is not a known field",
        "pb.yaml:11:10: servers[1].url: must be an http(s) URL",
        "pb.yaml:13:5: prompts[0].body: must be a string",
    ]


def test_any_input_is_either_a_playbook_that_round_trips_or_a_located_refusal() -> None:
    import yaml
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    keys = st.sampled_from(["version", "id", "name", "description", "position", "servers",
                            "prompts", "type", "command", "args", "env", "url", "headers",
                            "include", "exclude", "timeout_seconds", "secret", "value", "body",
                            "arguments", "required", "A", "X-Y", "prefix", "cwd"])
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6),
                        st.sampled_from(["stdio", "http", "sse", "https://e.com", "/srv", "a"]))
    data = st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=5)), max_leaves=25)

    @given(st.dictionaries(keys, data, max_size=7), st.booleans())
    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def check(document: dict[str, Any], version_one: bool) -> None:
        if version_one:
            document["version"] = 1
        try:
            parsed = parse_document(yaml.safe_dump(document))
        except DocumentInvalid as invalid:
            assert invalid.fields and invalid.lines("f") and invalid.summary()
            return
        if not parsed.redacted:
            text = export_document(parsed, include_secrets=True)
            assert parse_document(text) == parsed
            assert export_document(parse_document(text), include_secrets=True) == text

    check()


def test_the_documented_example_is_what_export_writes() -> None:
    page = (Path(__file__).parent.parent / "docs" / "playbook-yaml.rst").read_text()
    block = page.split(".. code-block:: yaml\n\n", 1)[1].split("\n\n", 1)[0]
    example = "".join(line.removeprefix("   ") + "\n" for line in block.splitlines())
    parsed = parse_document(example)
    assert [r.path for r in parsed.redacted] == [
        "servers[0].env.GITHUB_PERSONAL_ACCESS_TOKEN", "servers[1].headers.Authorization"]
    assert export_document(parsed) == example


def test_size_is_capped() -> None:
    big = HEADER + "description: '" + "x" * documents.MAX_DOCUMENT_BYTES + "'\n"
    with pytest.raises(documents.DocumentTooLarge):
        parse_document(big)
    with pytest.raises(documents.DocumentTooLarge):
        parse_document(big.encode())


def test_alias_bombs_are_refused_without_expanding() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]\n"
        for i in range(8))
    found = problems_of(HEADER + bomb)
    assert any("aliases" in message for message, _, _ in found.values())


def test_redacted_secrets_keep_the_stored_value_or_are_refused() -> None:
    stored = playbook_of((Server("s", "stdio", command="x",
                                 env=(("A", SecretValue("kept", True)),
                                      ("B", SecretValue("plain")))),))
    text = (HEADER + "id: p\nservers:\n  - name: s\n    type: stdio\n    command: x\n"
            "    env:\n      A: {secret: true}\n      B: {secret: true, value: null}\n"
            "      C: {secret: true}\n")
    parsed = parse_document(text)
    with pytest.raises(DocumentInvalid) as raised:
        parsed.with_stored_secrets(stored)
    assert raised.value.lines("f") == [
        "f:11:10: servers[0].env.C: is a secret without a value ({secret: true}) and there is "
        "no stored value to keep (playbook 'p' has no env 'C' for server 's'); write the "
        "value, or import a document exported with its secrets"]
    with pytest.raises(DocumentInvalid, match="no playbook 'p' exists yet"):
        parsed.with_stored_secrets(None)
    kept = parse_document(text.replace("      C: {secret: true}\n", "")).with_stored_secrets(
        stored)
    assert kept.servers[0].env == (("A", SecretValue("kept", True)),
                                   ("B", SecretValue("plain", True)))


def test_the_document_schema_is_valid_json_schema() -> None:
    import jsonschema  # schemathesis (a test dependency) requires it
    jsonschema.Draft202012Validator.check_schema(documents.JSON_SCHEMA)
    validator = jsonschema.Draft202012Validator(documents.JSON_SCHEMA)
    import yaml

    playbook = playbook_of((Server("s", "stdio", command="x", env=(
        ("A", SecretValue("v", True)),)), Server("h", "sse", url="https://e.com")),
        (Prompt("p", "b", arguments=(PromptArgument("a"),)),))
    for secrets in (True, False):
        assert not list(validator.iter_errors(yaml.safe_load(
            export_document(playbook, secrets))))
    assert list(validator.iter_errors({"version": 1, "name": "x", "servers": [
        {"name": "s", "type": "stdio", "command": "x", "include": [], "exclude": []}]}))


# --- the rails: the command's synchronous check answers as the daemon's ---------------------

RAIL_CASES = [
    Server("a", "stdio", command="x"),
    Server("b", "http", url="http://mcp.example.com/"),
    Server("c", "sse", url="https://127.0.0.1/sse"),
    Server("d", "http", url="https://[::1]:8443/"),
    Server("e", "http", url="https://localhost:8443/mcp"),
    Server("f", "http", url="https://name.invalid/mcp"),
]


@pytest_twisted.ensureDeferred
async def test_command_and_daemon_enforce_the_same_rails() -> None:
    for flags in ({}, {"allow_arbitrary_stdio_servers": True},
                  {"allow_insecure_http_servers": True}):
        settings = Settings(**flags)
        for server in RAIL_CASES:
            answers = []
            for check in (rails.check_server, check_server_sync):
                try:
                    result = check(settings, server, "servers[0].")
                    if result is not None:
                        await result
                    answers.append(None)
                except rails.RailViolation as violation:
                    answers.append(violation.fields)
            assert answers[0] == answers[1], (flags, server, answers)
    refused = [Server("a", "stdio", command="x"), Server("e", "http", url="https://localhost/")]
    for server in refused:
        with pytest.raises(rails.RailViolation):
            check_server_sync(Settings(), server)


# --- the API ------------------------------------------------------------------------------------


def test_api_round_trip_between_users_is_exact(open_daemon: Daemon) -> None:
    alice, bob = someone(open_daemon, "alice"), someone(open_daemon, "bob")
    playbook_id = make_playbook(open_daemon, alice)
    with_secrets = export(open_daemon, alice, playbook_id, secrets=True)
    redacted = export(open_daemon, alice, playbook_id)
    assert "ghp_0123456789" in with_secrets and "Bearer s3cr3t" in with_secrets
    assert "ghp_0123456789" not in redacted and "s3cr3t" not in redacted
    assert redacted.count("secret: true") == 2 and "value:" not in redacted
    assert "LOG_LEVEL: debug" in redacted  # plain values are not secrets
    status, _, body = api(open_daemon, alice, "GET",
                          f"/playbooks/{playbook_id}/export?include_secrets=maybe")
    assert status == 400 and body["error"]["details"]["fields"] == {
        "include_secrets": "must be true or false"}
    assert api(open_daemon, bob, "GET", f"/playbooks/{playbook_id}/export")[0] == 404

    status, headers, body = import_(open_daemon, bob, with_secrets)
    assert status == 201, body
    assert (body["result"], body["dry_run"], body["id"]) == ("created", False, playbook_id)
    assert headers["etag"] == f'"{body["version"]}"'
    assert body["changes"]["servers"]["added"] == ["github", "search", "events"]
    assert export(open_daemon, bob, playbook_id, secrets=True) == with_secrets
    assert export(open_daemon, bob, playbook_id) == redacted
    assert contents(open_daemon, bob, playbook_id) == contents(open_daemon, alice, playbook_id)


def test_reimport_changes_nothing_and_keeps_redacted_secrets(open_daemon: Daemon) -> None:
    alice, carol = someone(open_daemon, "alice"), someone(open_daemon, "carol")
    playbook_id = make_playbook(open_daemon, alice)
    before = ok(api(open_daemon, alice, "GET", f"/playbooks/{playbook_id}"))["version"]
    entries = history(open_daemon, alice, playbook_id)
    stored = contents(open_daemon, alice, playbook_id)
    for secrets in (True, False):
        text = export(open_daemon, alice, playbook_id, secrets)
        for query_string in ("", "?dry_run=true"):
            body = ok(import_(open_daemon, alice, text, query_string))
            assert (body["result"], body["version"]) == ("unchanged", before), body
            assert body["dry_run"] is bool(query_string)
    assert ok(api(open_daemon, alice, "GET", f"/playbooks/{playbook_id}"))["version"] == before
    assert history(open_daemon, alice, playbook_id) == entries
    assert contents(open_daemon, alice, playbook_id) == stored  # secret values kept

    # Redacted secrets cannot be imported where nothing is stored: refused, nothing written.
    redacted = export(open_daemon, alice, playbook_id)
    status, _, body = import_(open_daemon, carol, redacted)
    assert status == 400 and body["error"]["code"] == "validation_failed"
    fields, locations = body["error"]["details"]["fields"], body["error"]["details"]["locations"]
    assert set(fields) == {"servers[0].env.GITHUB_TOKEN", "servers[1].headers.Authorization"}
    assert locations["servers[0].env.GITHUB_TOKEN"]["line"] == line_of(redacted, "GITHUB_TOKEN")
    assert "line " in body["error"]["message"]
    assert ok(api(open_daemon, carol, "GET", "/playbooks"))["items"] == []


def test_import_updates_and_dry_run_reports_without_writing(open_daemon: Daemon) -> None:
    alice = someone(open_daemon, "alice")
    playbook_id = make_playbook(open_daemon, alice)
    text = export(open_daemon, alice, playbook_id)
    version = ok(api(open_daemon, alice, "GET", f"/playbooks/{playbook_id}"))["version"]
    edited = (text.replace("name: GitHub tools", "name: GitHub tools, edited")
              .replace("prefix: s_", "prefix: search_"))
    edited = re.sub(r"  - name: events\n(    .*\n)+", "", edited)

    body = ok(import_(open_daemon, alice, edited, "?dry_run=true"))
    assert (body["result"], body["dry_run"], body["version"], body["playbook"]) == (
        "updated", True, version, None)
    assert body["changes"]["fields"] == ["name"]
    assert body["changes"]["servers"] == {"added": [], "removed": ["events"],
                                          "changed": ["search"], "reordered": False}
    assert ok(api(open_daemon, alice, "GET", f"/playbooks/{playbook_id}"))["version"] == version

    body = ok(import_(open_daemon, alice, edited, content_type="text/yaml; charset=UTF-8"))
    assert (body["result"], body["version"]) == ("updated", version + 1)
    assert body["playbook"]["name"] == "GitHub tools, edited"
    assert [s["name"] for s in body["playbook"]["servers"]] == ["github", "search"]
    assert export(open_daemon, alice, playbook_id) == edited
    newest = history(open_daemon, alice, playbook_id)[0]
    assert (newest["action"], newest["version"], newest["actor"]) == (
        "import", version + 1, alice.email)
    # A brand-new playbook: dry run says "created" and creates nothing (its secrets must be
    # written out: there are no stored ones to keep).
    fresh = export(open_daemon, alice, playbook_id, secrets=True).replace(
        f"id: {playbook_id}", "id: brand-new")
    assert ok(import_(open_daemon, alice, fresh, "?dry_run=1"))["result"] == "created"
    assert api(open_daemon, alice, "GET", "/playbooks/brand-new")[0] == 404


def test_api_refuses_invalid_documents_and_other_media_types(open_daemon: Daemon) -> None:
    alice = someone(open_daemon, "alice")
    text = HEADER + "servers:\n  - name: a\n    type: stdio\n    comand: x\n"
    status, _, body = import_(open_daemon, alice, text)
    assert status == 400, body
    assert body["error"]["details"]["fields"] == {
        "servers[0].comand": "is not a known field", "servers[0].command": "must be a string"}
    assert body["error"]["details"]["locations"] == {
        "servers[0].comand": {"line": 6, "column": 5},
        "servers[0].command": {"line": 4, "column": 5}}  # missing: where the server starts

    status, _, body = import_(open_daemon, alice, HEADER + "servers: [\n")
    assert status == 400 and body["error"]["details"]["locations"]["$"] == {
        "line": 4, "column": 1}
    for content_type in ("application/json", "text/plain", "application/yaml; charset=latin-1"):
        status, _, body = import_(open_daemon, alice, HEADER, content_type=content_type)
        assert (status, body["error"]["code"]) == (415, "unsupported_media_type"), content_type
    status, _, body = import_(open_daemon, alice, HEADER + "#" * documents.MAX_DOCUMENT_BYTES)
    assert (status, body["error"]["code"]) == (413, "payload_too_large")
    assert api(open_daemon, alice, "GET", "/playbooks/nope/export")[0] == 404
    status, _, _ = call(open_daemon, "POST", "/api/v1/playbooks/import", HEADER.encode(),
                        headers={"content-type": "application/yaml"})
    assert status == 401
    assert ok(api(open_daemon, alice, "GET", "/playbooks"))["items"] == []


def test_api_applies_the_rails(strict_daemon: Daemon, open_daemon: Daemon) -> None:
    alice, dave = someone(open_daemon, "alice"), someone(strict_daemon, "dave")
    text = export(open_daemon, alice, make_playbook(open_daemon, alice), secrets=True)
    insecure = text.replace("https://events.example.com/sse", "http://events.example.com/sse")
    status, _, body = import_(strict_daemon, dave, insecure)
    assert status == 400, body
    fields, locations = body["error"]["details"]["fields"], body["error"]["details"]["locations"]
    assert set(fields) == {"servers[0].type", "servers[2].url"}
    assert f"{STDIO_FLAG}=true" in fields["servers[0].type"]
    assert f"{INSECURE_FLAG}=true" in fields["servers[2].url"]
    assert locations["servers[0].type"]["line"] == line_of(insecure, "type: stdio")
    assert locations["servers[2].url"]["line"] == line_of(insecure, "http://events")
    assert ok(api(strict_daemon, dave, "GET", "/playbooks"))["items"] == []
    # The same document, checked by the daemon that allows stdio (dry run: nothing written).
    eve = someone(open_daemon, "eve")
    status, _, body = import_(open_daemon, eve, insecure, "?dry_run=true")
    assert status == 400 and set(body["error"]["details"]["fields"]) == {"servers[2].url"}


def test_openapi_paths_describe_the_routes(open_daemon: Daemon) -> None:
    """schemathesis drives both operations from OPENAPI_PATHS merged into the served document,
    with valid and invalid input, and checks every answer against it."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import (
        negative_data_rejection,
        positive_data_acceptance,
    )

    from director.web.openapi import document
    from director.web.playbooks_yaml_api import OPENAPI_PATHS

    merged = document()
    merged["paths"] = {**merged["paths"], **OPENAPI_PATHS}
    schema = schemathesis.openapi.from_dict(merged)
    schema.config.update(base_url=f"{open_daemon.base}/api/v1")
    account = someone(open_daemon, "schema")
    make_playbook(open_daemon, account, name="Exported")
    checked, drawn = [], []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path not in OPENAPI_PATHS:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(mode))
            @settings(max_examples=15, deadline=None, database=None, derandomize=DERANDOMIZE,
                      suppress_health_check=list(HealthCheck))
            def conforms(case: Any) -> None:
                # A schema cannot say "unique server names" nor know the deployment's rails:
                # a schema-valid document may rightly be refused, so not that check on import.
                excluded = [positive_data_acceptance] if case.method == "POST" else []
                drawn.append(case)
                if case.path_parameters and len(drawn) % 2:  # half of them: one that exists
                    case.path_parameters["playbook_id"] = "exported"
                headers = {"x-api-key": account.key}
                response = case.call(headers=headers)
                if response.status_code == 413:
                    # A generated document over the 1 MiB cap: refused for its size, which the
                    # negative-data check does not count among refusals.
                    excluded.append(negative_data_rejection)
                case.validate_response(response, headers=headers, excluded_checks=excluded,
                                       transport_kwargs={"headers": headers})

            conforms()
        checked.append(operation.label)
    assert sorted(checked) == ["GET /playbooks/{playbook_id}/export", "POST /playbooks/import"]


# --- the command ------------------------------------------------------------------------------


def director(url: str, *args: str, stdin: str | None = None,
             **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DIRECTOR, "playbooks", *args], env=base_environment(DATABASE_URL=url, **env),
        capture_output=True, text=True, input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None, timeout=60, check=False)


def succeeds(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


def fails(result: subprocess.CompletedProcess[str], code: int) -> list[str]:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""
    return result.stderr.strip().splitlines()


ALLOW_STDIO = {STDIO_FLAG: "true"}


def test_command_exports_imports_and_lists(open_daemon: Daemon, database: str,
                                           tmp_path: Path) -> None:
    alice, erin = someone(open_daemon, "alice"), someone(open_daemon, "erin")
    playbook_id = make_playbook(open_daemon, alice)
    api_text = export(open_daemon, alice, playbook_id, secrets=True)

    assert succeeds(director(database, "export", playbook_id, "--user", alice.email,
                             "--include-secrets")) == api_text
    assert succeeds(director(database, "export", playbook_id, "--user", alice.email)) == \
        export(open_daemon, alice, playbook_id)
    path = tmp_path / "github.yaml"
    result = director(database, "export", playbook_id, "--user", alice.email,
                      "--include-secrets", "-o", str(path))
    assert succeeds(result) == "" and "with its secrets" in result.stderr
    assert path.read_text() == api_text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    listed = json.loads(succeeds(director(database, "list", "--user", alice.email, "--json")))
    assert [(p["id"], p["servers"], p["prompts"]) for p in listed["playbooks"]] == [
        (playbook_id, 3, 2)]

    out = succeeds(director(database, "import", str(path), "--user", erin.email, **ALLOW_STDIO))
    assert out.startswith(f"created playbook '{playbook_id}' of {erin.email} (version 2)")
    # Running daemons see it (NOTIFY), and serve exactly what was imported.
    eventually(lambda: api(open_daemon, erin, "GET", f"/playbooks/{playbook_id}")[0] == 200)
    assert export(open_daemon, erin, playbook_id, secrets=True) == api_text

    # The same file again: nothing changes, no version, no history entry.
    entries = history(open_daemon, erin, playbook_id)
    out = succeeds(director(database, "import", str(path), "--user", erin.email, **ALLOW_STDIO))
    assert out == f"playbook '{playbook_id}' of {erin.email} unchanged (version 2): " \
                  "nothing to import\n"
    assert history(open_daemon, erin, playbook_id) == entries

    # A dry run from standard input says what would change and writes nothing.
    edited = api_text.replace("prefix: s_", "prefix: x_")
    out = succeeds(director(database, "import", "-", "--user", erin.email, "--dry-run",
                            stdin=edited, **ALLOW_STDIO))
    assert out == f"would update playbook '{playbook_id}' of {erin.email} (version 2): " \
                  "servers changed: search\n"
    report = json.loads(succeeds(director(database, "import", "-", "--user", erin.email,
                                          "--json", stdin=edited, **ALLOW_STDIO)))
    assert (report["result"], report["version"], report["dry_run"]) == ("updated", 3, False)
    assert report["changes"]["servers"]["changed"] == ["search"]

    shown = json.loads(succeeds(director(database, "history", playbook_id, "--user",
                                         erin.email, "--json", "--limit", "2")))
    assert [(e["action"], e["version"]) for e in shown["history"]] == [("import", 3),
                                                                       ("import", 2)]
    assert shown["history"][0]["actor"].startswith("cli")
    table = succeeds(director(database, "history", playbook_id, "--user", erin.email))
    assert table.splitlines()[0].split() == ["SEQ", "AT", "VERSION", "ACTION", "ACTOR", "DETAIL"]
    assert len(table.splitlines()) == 4  # header, import, import, create


def test_command_refuses_invalid_documents_and_applies_the_rails(
        open_daemon: Daemon, database: str, tmp_path: Path) -> None:
    alice, frank = someone(open_daemon, "alice"), someone(open_daemon, "frank")
    text = export(open_daemon, alice, make_playbook(open_daemon, alice), secrets=True)
    path = tmp_path / "pb.yaml"
    path.write_text(text)

    # Without the flag, the command refuses stdio servers as the daemon does.
    lines = fails(director(database, "import", str(path), "--user", frank.email), 2)
    assert lines == [f"{path}:{line_of(text, 'type: stdio')}:11: servers[0].type: stdio servers "
                     "run commands on the gateway host and are disabled; an operator can allow "
                     f"them with {STDIO_FLAG}=true (never in production)"]
    insecure = text.replace("https://mcp.example.com", "http://mcp.example.com")
    lines = fails(director(database, "import", "-", "--user", frank.email, stdin=insecure,
                           **ALLOW_STDIO), 2)
    assert len(lines) == 1 and lines[0].startswith(
        f"<stdin>:{line_of(insecure, 'http://mcp')}:10: servers[1].url: must use https")
    assert f"{INSECURE_FLAG}=true" in lines[0]

    path.write_text(HEADER + "position: x\nservers:\n  - name: a\n    type: stdio\n    bogus: 1\n")
    assert fails(director(database, "import", str(path), "--user", frank.email), 2) == [
        f"{path}:3:11: position: must be a whole number",
        f"{path}:5:5: servers[0].command: must be a string",
        f"{path}:7:5: servers[0].bogus: is not a known field"]
    path.write_text(HEADER + "description: [\n")
    assert fails(director(database, "import", str(path), "--user", frank.email), 2)[0].startswith(
        f"{path}:4:1: invalid YAML")
    # Redacted secrets with nothing stored for them.
    redacted = export(open_daemon, alice, "github-tools")
    lines = fails(director(database, "import", "-", "--user", frank.email, stdin=redacted,
                           **ALLOW_STDIO), 2)
    assert [line.split(": ")[1] for line in lines] == ["servers[0].env.GITHUB_TOKEN",
                                                       "servers[1].headers.Authorization"]
    assert json.loads(succeeds(director(database, "list", "--user", frank.email, "--json")))[
        "playbooks"] == []

    # Everything else is exit 1, one line.
    assert fails(director(database, "import", str(tmp_path / "missing.yaml"), "--user",
                          frank.email), 1)[0].startswith("director: cannot read")
    assert fails(director(database, "export", "nope", "--user", frank.email), 1) == [
        f"director: {frank.email} has no playbook 'nope'"]
    assert fails(director(database, "list", "--user", "nobody@example.com"), 1) == [
        "director: no user with email 'nobody@example.com'"]
    assert fails(director(database, "history", "x", "--user", frank.email, "--limit", "0"),
                 2) == ["director: --limit must be from 1 to 1000"]


def test_nothing_is_written_when_any_part_is_invalid(open_daemon: Daemon, database: str) -> None:
    grace = someone(open_daemon, "grace")
    text = (HEADER + "id: half\nservers:\n  - {name: ok, type: sse, url: 'https://e.com'}\n"
            "  - {name: bad, type: sse, url: 'ftp://e.com'}\n")
    assert import_(open_daemon, grace, text)[0] == 400
    fails(director(database, "import", "-", "--user", grace.email, stdin=text), 2)
    assert query(database, "SELECT count(*) FROM playbooks p JOIN users u ON u.id = p.user_id "
                           "WHERE u.email = %s", grace.email) == [(0,)]


def test_command_writes_private_files_only_with_secrets(open_daemon: Daemon, database: str,
                                                        tmp_path: Path) -> None:
    alice = someone(open_daemon, "alice")
    playbook_id = make_playbook(open_daemon, alice)
    plain = tmp_path / "plain.yaml"
    old_umask = os.umask(0o022)
    try:
        succeeds(director(database, "export", playbook_id, "--user", alice.email, "-o",
                          str(plain)))
    finally:
        os.umask(old_umask)
    assert "secret: true" in plain.read_text() and "ghp_" not in plain.read_text()
    assert stat.S_IMODE(plain.stat().st_mode) == 0o644
