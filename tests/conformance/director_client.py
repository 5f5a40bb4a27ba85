"""The conformance suite's client under test, for its authorization scenarios (``auth/*``):
``director_client.py SERVER_URL`` is run by ``conformance client --command …`` once the
scenario's MCP server and authorization server listen, and plays everything around Director
that a real deployment has: the user who adds the server to a playbook and authorizes it in
a browser, and the MCP client that then uses the playbook.

Director itself is the OAuth client: a daemon the test started, reached through
``DIRECTOR_CLIENT_PORT`` (loopback), as the user whose API key and Studio cookie are
``DIRECTOR_CLIENT_KEY`` and ``DIRECTOR_CLIENT_COOKIE``, in a new playbook named
``DIRECTOR_CLIENT_PLAYBOOK`` (by default, after the scenario). The suite's own variables name the
scenario (``MCP_CONFORMANCE_SCENARIO``) and, for a pre-registered client, its credentials
(``MCP_CONFORMANCE_CONTEXT``: ``client_id``, ``client_secret``), which the user enters when
authorizing, as Studio lets them.

The steps, each printed (the suite saves this script's output with the scenario's checks):

1. the playbook, holding the server (``http``, the URL given);
2. an MCP session on the playbook lists its tools: Director connects to the server, meets its
   401 and discovers its authorization (the server shows ``unauthorized``);
3. the user authorizes: ``POST …/authorize`` gives the authorize URL, the browser opens it
   (the scenarios' authorization servers approve at once and redirect) and follows the
   redirect to Director's callback, signed in;
4. the client lists the tools again until the server's (``test-tool``) are there, and calls
   one. A call refused for want of scope (step-up: the server shows ``unauthorized`` again,
   asking for more) sends the user back to step 3, ``MAX_AUTHORIZATIONS`` times at most.

It exits 0 when the tool call succeeded, 1 otherwise (the scenarios that expect the client to
give up still judge only what reached their servers).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.accounts_helpers import Account, call
from tests.harness import Daemon
from tests.upstream_oauth_helpers import (
    authorize_url,
    callback,
    mcp_post,
    open_session,
    server_status,
    tool_names,
)

SERVER = "conformance"
MAX_AUTHORIZATIONS = 3
TOOL = "test-tool"


class RunningDaemon(Daemon):
    """The test's daemon, already running: only its address (``Daemon.request``)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"


def say(text: str) -> None:
    print(text, flush=True)


def browse(url: str) -> str:
    """The browser at the authorization server: the redirect it answers (no user there)."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        connection.request("GET", f"{parts.path}?{parts.query}")
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    location = response.getheader("location")
    if response.status not in (301, 302, 303, 307) or not location:
        raise SystemExit(f"the authorization server answered {response.status} without a "
                         f"redirect: {body[:500]!r}")
    return location


def authorize(daemon: Daemon, user: Account, playbook: str, entered: dict[str, str]) -> bool:
    """Step 3; whether Director took the answer (it lands on its notice)."""
    url = authorize_url(daemon, user, playbook, SERVER, body=entered or None)
    say(f"authorize URL: {url}")
    back = urllib.parse.urlsplit(browse(url))
    say(f"redirected to: {back.geturl()}")
    landed = callback(daemon, user, f"{back.path}?{back.query}")
    say(f"landed on: {landed}")
    return "notice=server-authorized" in landed


def call_tool(daemon: Daemon, user: Account, playbook: str) -> dict[str, Any] | None:
    """Step 4: the tool's result, or None while it is not listed or its call fails."""
    session = open_session(daemon, user.key, playbook)
    names = tool_names(daemon, user.key, playbook, session)
    if TOOL not in names:
        return None
    status, _, answer = mcp_post(daemon, user.key, playbook, {
        "jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": TOOL, "arguments": {}}}, session)
    say(f"tools/call {TOOL}: HTTP {status} {json.dumps(answer)[:300]}")
    result = (answer or {}).get("result")
    return None if result is None or result.get("isError") else dict(result)


def main(server_url: str) -> int:
    daemon = RunningDaemon(int(os.environ["DIRECTOR_CLIENT_PORT"]))
    user = Account("", os.environ["DIRECTOR_CLIENT_KEY"], "", os.environ["DIRECTOR_CLIENT_COOKIE"],
                   "")
    scenario = os.environ.get("MCP_CONFORMANCE_SCENARIO", "scenario")
    context = json.loads(os.environ.get("MCP_CONFORMANCE_CONTEXT") or "{}")
    entered = {key: context[key] for key in ("client_id", "client_secret") if context.get(key)}
    playbook = re.sub(r"[^A-Za-z0-9_.-]+", "-", os.environ.get(
        "DIRECTOR_CLIENT_PLAYBOOK") or scenario).strip("-")[:64]
    say(f"{scenario}: {server_url} in playbook {playbook}")
    status, _, body = call(daemon, "POST", "/api/v1/playbooks", {"name": playbook},
                           key=user.key)
    assert status == 201, body
    status, _, body = call(daemon, "POST", f"/api/v1/playbooks/{playbook}/servers",
                           {"name": SERVER, "type": "http", "url": server_url}, key=user.key)
    assert status == 201, body

    deadline = time.monotonic() + 20
    authorizations = 0
    seen: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        result = call_tool(daemon, user, playbook)
        if result is not None:
            say(f"called {TOOL}: {json.dumps(result)[:300]}")
            return 0
        found = server_status(daemon, user, playbook, SERVER).get("authorization") or {}
        if found != seen:
            say(f"authorization: {json.dumps(found)[:500]}")
            seen = found
        # Unauthorized, or nothing known yet: the user authorizes (the API discovers what it
        # does not know, or says why it cannot).
        if found.get("state", "unauthorized") == "unauthorized":
            if authorizations == MAX_AUTHORIZATIONS:
                say(f"still unauthorized after {authorizations} authorizations: giving up")
                return 1
            authorizations += 1
            if not authorize(daemon, user, playbook, entered):
                say("the authorization was not accepted")
                return 1
        time.sleep(0.25)
    say("no tool call succeeded in time")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
