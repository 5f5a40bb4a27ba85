"""API keys in query strings never reach the logs, in any spelling the authenticator reads.

The rule (``director.web.querykey``): the authenticator reads, and the log lines redact, every
query parameter whose name decodes to ``key`` in any case, split and decoded exactly as Twisted
fills ``request.args``. The property tests hold the redaction to Twisted's own parser; the
daemon tests send every spelling to a real daemon and read its whole output.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.web.http import parse_qs

from director.web.querykey import REDACTED, is_key_name, query_keys, redact, redact_key_parameters
from tests.accounts_helpers import Account, call, sign_up
from tests.harness import Daemon

StartDaemon = Callable[..., Daemon]
ACCEPT = "application/json, text/event-stream"
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "redaction-test", "version": "1"}}}


# --- the rule, against Twisted's parser -----------------------------------------------------

#: Query strings built from the bytes that matter to the parse: separators, escapes, ``+``,
#: the letters of ``key`` in both cases, and anything else.
_PIECES = st.sampled_from([b"key", b"KEY", b"Key", b"k", b"e", b"y", b"%6B", b"%65", b"%79",
                           b"%6b", b"%4B", b"=", b"&", b";", b"+", b"%20", b"%", b"?", b"#",
                           b"amp", b"dk_", b"x", b"%3D", b"%26", b"%3B", b" ", b"\t"])
QUERIES = st.lists(st.one_of(_PIECES, st.binary(max_size=3)), max_size=14).map(b"".join)


def key_values(query: bytes) -> list[bytes]:
    return [v for name, values in parse_qs(query, 1).items() if is_key_name(name) for v in values]


def other_parameters(query: bytes) -> dict[bytes, list[bytes]]:
    return {name: values for name, values in parse_qs(query, 1).items() if not is_key_name(name)}


@settings(max_examples=3000, derandomize=True)
@given(QUERIES)
def test_every_value_the_parser_gives_a_key_parameter_is_redacted(query: bytes) -> None:
    redacted = redact_key_parameters(b"/playbooks/p/mcp?" + query)
    path, _, redacted_query = redacted.partition(b"?")
    assert path == b"/playbooks/p/mcp"
    assert all(value == REDACTED for value in key_values(redacted_query))
    assert len(key_values(redacted_query)) == len(key_values(query))
    assert other_parameters(redacted_query) == other_parameters(query)  # nothing else changes


KEY = "dk_" + "Q" * 30 + "z9" * 17


def every_encoding(text: str) -> str:
    return "".join(f"%{ord(c):02X}" for c in text)


#: (query string, what the authenticator reads from it): every odd spelling of the parameter.
SPELLINGS = [
    (f"key={KEY}", [KEY]),
    (f"%6Bey={KEY}", [KEY]),
    (f"k%65y={KEY}", [KEY]),
    (f"{every_encoding('key')}={every_encoding(KEY)}", [KEY]),
    (f"KEY={KEY}", [KEY]),
    (f"kEy={KEY}", [KEY]),
    (f"x=1;key={KEY}", [KEY]),
    (f";key={KEY}", [KEY]),
    (f"x=1&amp;key={KEY}", [KEY]),
    (f"key=+{KEY}+", [KEY]),
    (f"key=%20{KEY}%09", [KEY]),
    (f"+key+={KEY}", [KEY]),
    (f"key%20={KEY}", [KEY]),
    (f"key=d%6B_{KEY[3:]}", [KEY]),
    (f"key={KEY}&key={KEY}", [KEY]),
    (f"key={KEY}&KEY=dk_other", [KEY, "dk_other"]),
    (f"key=&key={KEY}", ["", KEY]),
    (f"key=dk_{quote(KEY[3:], safe='')}#fragment", [KEY + "#fragment"]),
]


@pytest.mark.parametrize(("query", "read"), SPELLINGS)
def test_the_authenticator_reads_and_the_log_hides_each_spelling(query: str,
                                                                  read: list[str]) -> None:
    assert query_keys(parse_qs(query.encode(), 1)) == read
    logged = redact(b"/playbooks/p/mcp?" + query.encode())
    assert KEY not in logged and KEY[3:] not in logged and every_encoding(KEY) not in logged
    assert logged.startswith("/playbooks/p/mcp?")


@pytest.mark.parametrize("query", [f"token={KEY}", f"api_key={KEY}", f"a=1?key={KEY}",
                                   f"{KEY}", f"keys={KEY}", f"key%00={KEY}"])
def test_other_parameters_are_not_keys_but_a_key_shaped_word_is_hidden(query: str) -> None:
    assert query_keys(parse_qs(query.encode(), 1)) == []
    assert KEY[3:] not in redact(b"/playbooks/p/mcp?" + query.encode())


def test_redaction_keeps_the_rest_of_the_uri_readable() -> None:
    assert redact(b"/no/route?key=dk_secretvalue&x=1") == "/no/route?key=[REDACTED]&x=1"
    assert redact(b"/a?x=1;%6Bey=dk_abc&y=%41") == "/a?x=1;%6Bey=[REDACTED]&y=%41"
    assert redact(b"/api/v1/api-keys?limit=2&cursor=abc") == "/api/v1/api-keys?limit=2&cursor=abc"
    assert redact(b"/plain/path") == "/plain/path"


# --- a real daemon: every spelling, the whole output ----------------------------------------


@pytest.fixture
def daemon(start_daemon: StartDaemon, migrated_url: str) -> Daemon:
    started = start_daemon(DATABASE_URL=migrated_url, MAX_REQUEST_BODY_BYTES="100000",
                           BASE_URL="https://director.example.com")
    started.wait_healthy()
    return started


@pytest.fixture
def account(daemon: Daemon) -> Account:
    owner = sign_up(daemon, "query-keys@example.com")
    assert call(daemon, "POST", "/api/v1/playbooks", {"name": "Empty"}, key=owner.key)[0] == 201
    return owner


def spell(template: str, key: str) -> str:
    """A spelling of SPELLINGS with the account's real key in place of KEY."""
    return (template.replace(every_encoding(KEY), every_encoding(key))
            .replace(quote(KEY[3:], safe=""), quote(key[3:], safe=""))
            .replace(KEY[3:], key[3:]).replace(KEY, key))


def leaked(output: str, key: str) -> bool:
    return key[3:] in output or every_encoding(key) in output or every_encoding(key[3:]) in output


def test_no_spelling_of_a_query_key_reaches_the_log(daemon: Daemon, account: Account) -> None:
    key = account.key
    for template, read in SPELLINGS:
        query = spell(template, key)
        status, headers, raw = daemon.request(
            "POST", f"/playbooks/empty/mcp?{query}", json.dumps(INIT).encode(),
            {"accept": ACCEPT, "content-type": "application/json"})
        distinct = {spell(value, key) for value in read}
        if distinct == {key}:
            assert status == 200 and headers.get("mcp-session-id"), (query, status, raw)
        elif len(distinct) > 1:
            body = json.loads(raw)
            assert status == 400, (query, status, raw)
            assert body["error"]["data"]["code"] == "ambiguous_api_key"
        else:
            assert status == 401, (query, status, raw)  # "#fragment" is part of the value
        assert not leaked(daemon.output(), key), query
        # Management routes never read a query key: refused, and not logged either.
        status, _, _ = daemon.request("GET", f"/api/v1/me?{query}")
        assert status == 401
    for refused in ({"host": "evil.example"}, {"origin": "https://evil.example"}):
        status, _, _ = daemon.request("GET", f"/playbooks/empty/mcp?%6Bey={key}", headers=refused)
        assert status == 403
    status, _, _ = daemon.request("POST", f"/playbooks/empty/mcp?;KEY={key}", b"x" * 200_000,
                                  {"content-type": "application/json"})
    assert status == 413
    daemon.wait_for_log("413 body too large")
    daemon.wait_for_log("refused GET")
    records = daemon.records()
    assert sum(1 for r in records if r.get("path", "").startswith("/playbooks/empty/mcp?")) >= \
        len(SPELLINGS)
    assert not leaked(daemon.output(), key)


def test_the_sse_endpoint_event_gives_the_key_back_to_its_owner_only(daemon: Daemon,
                                                                     account: Account) -> None:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    try:
        connection.request("GET", f"/playbooks/empty/sse?x=1;%4BEY=+{account.key}",
                           headers={"accept": "text/event-stream"})
        response = connection.getresponse()
        assert response.status == 200
        lines = [response.readline().decode().strip() for _ in range(2)]
    finally:
        connection.close()
    assert lines[0] == "event: endpoint"
    # The client posts its messages with the canonical spelling of the key it sent.
    assert lines[1].startswith("data: /playbooks/empty/message?sessionId=")
    assert lines[1].endswith(f"&key={account.key}")
    daemon.wait_for_log("legacy SSE session opened")
    assert not leaked(daemon.output(), account.key)
