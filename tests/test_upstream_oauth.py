"""Upstream OAuth against a real authorization server and a protected MCP server (the ``mcp``
SDK's, ``fixtures/oauth_server.py``), through real daemons: discovery, client identities,
the flow and its refusals, refresh (once across instances), step-up, disconnect, rotation."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from tests.accounts_helpers import sign_up
from tests.harness import Daemon, free_port, query
from tests.oauth_helpers import (
    ProtectedServer,
    add_protected,
    authorize,
    protected_server,
    server_status,
)

INSECURE = {"DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS": "true"}


@pytest.fixture
def server() -> Iterator[ProtectedServer]:
    with protected_server() as running:
        yield running


def started(start_daemon: Callable[..., Daemon], migrated_url: str, **environ: str) -> Daemon:
    port = free_port()
    daemon = start_daemon(DATABASE_URL=migrated_url, PORT=str(port),
                          BASE_URL=f"http://127.0.0.1:{port}", **INSECURE, **environ)
    daemon.wait_healthy()
    return daemon


@pytest.fixture
def daemon(start_daemon: Callable[..., Daemon], migrated_url: str) -> Daemon:
    return started(start_daemon, migrated_url)


def test_the_sdk_client_calls_a_protected_tool_once_the_owner_authorized(
        daemon: Daemon, server: ProtectedServer, migrated_url: str) -> None:
    owner = sign_up(daemon, "owner@example.com")
    add_protected(daemon, owner, "work", server)
    url = f"{daemon.base}/playbooks/work/mcp"
    changed = threading.Event()
    authorized = threading.Event()
    outcome: dict[str, Any] = {}

    async def client() -> None:
        async def on_message(message: Any) -> None:
            if getattr(getattr(message, "root", message), "method", "") == \
                    "notifications/tools/list_changed":
                changed.set()

        http = create_mcp_http_client(headers={"x-api-key": owner.key})
        async with http, Client(streamable_http_client(url, http_client=http), mode="legacy",
                                message_handler=on_message) as session:
            outcome["before"] = [tool.name for tool in (await session.list_tools()).tools]
            authorized.set()
            await asyncio.to_thread(changed.wait, 60)
            outcome["after"] = [tool.name for tool in (await session.list_tools()).tools]
            outcome["called"] = await session.call_tool("echo", {"text": "through Director"})

    running = threading.Thread(target=lambda: asyncio.run(asyncio.wait_for(client(), 90)))
    running.start()
    assert authorized.wait(60)
    # Tools absent, the server unauthorized with the way to authorize it.
    assert outcome["before"] == []
    status = server_status(daemon, owner, "work")
    assert status["authorization"]["state"] == "unauthorized"
    assert status["authorization"]["authorize_url"] == \
        f"{daemon.base}/studio/playbooks/work/servers/prot/connect"

    landed = authorize(daemon, owner, "work", server)
    assert landed == "/studio/playbooks/work?notice=server-authorized"
    running.join(90)
    assert changed.is_set()
    assert sorted(outcome["after"]) == ["admin_echo", "echo", "whoami"]
    assert outcome["called"].content[0].text == "through Director"

    status = server_status(daemon, owner, "work")
    assert status["authorization"]["state"] == "authorized"
    assert status["authorization"]["issuer"] == server.issuer
    stats = server.stats()
    assert (stats["registrations"], stats["codes"], stats["refreshes"]) == (1, 1, 0)
    # The token went to the resource only: never to the authorization server's endpoints.
    assert not any(header and header.lower().startswith("bearer")
                   for header in stats["as_authorization_headers"])
    # Sealed at rest, never in clear.
    rows = query(migrated_url, "SELECT access_token, refresh_token, client_secret FROM "
                               "upstream_oauth_credentials")
    assert len(rows) == 1 and all(value is None or value.startswith("v1:") for value in rows[0])
