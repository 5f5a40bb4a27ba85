"""The handshake era's ``initialize``, and the messages a legacy ``/sse`` client POSTs.

A legacy ``/sse`` session has one stream, which is the session: every answer, to ``initialize``
as to any request, travels on it rather than in the POST's response (``sse_message``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer

from director.mcp import jsonrpc
from director.mcp.jsonrpc import Message
from director.mcp.upstream.base import LEGACY_VERSIONS
from director.playbooks.store import Playbook

if TYPE_CHECKING:
    from director.mcp.downstream import DownstreamSession

SERVER_INFO = {"name": "director", "title": "Director MCP gateway", "version": "0.1.0"}
SERVER_CAPABILITIES = {
    "tools": {"listChanged": True},
    "prompts": {"listChanged": True},
    "resources": {"subscribe": True, "listChanged": True},
    "logging": {},
    "completions": {},
}


def initialize_result(session: DownstreamSession, params: dict[str, Any],
                      playbook: Playbook) -> dict[str, Any]:
    """The answer to ``initialize`` on ``session``, whose negotiated facts it sets."""
    requested = params.get("protocolVersion")
    version = requested if requested in LEGACY_VERSIONS else LEGACY_VERSIONS[0]
    session.protocol_version = version
    if session.engine.metrics is not None:
        session.engine.metrics.initialized(session.transport, version)
    capabilities = params.get("capabilities")
    session.client_capabilities = capabilities if isinstance(capabilities, dict) else {}
    info = params.get("clientInfo")
    session.client_info = info if isinstance(info, dict) else {}
    result: dict[str, Any] = {"protocolVersion": version,
                              "capabilities": SERVER_CAPABILITIES,
                              "serverInfo": dict(SERVER_INFO, name=f"director/{playbook.id}")}
    if playbook.description:
        result["instructions"] = playbook.description
    return result


def sse_message(session: DownstreamSession, message: Message) -> None:
    """A message POSTed to ``/message`` of ``session``, held here (posted here, or relayed
    from the instance it was posted to); ``ProtocolError`` for a refused notification."""
    if jsonrpc.is_notification(message):
        session.handle_notification(message)
    elif jsonrpc.is_response(message):
        session.handle_response(message)
    elif message["method"] == "initialize":
        playbook = session.engine.playbooks.by_pk(session.playbook_pk)
        if playbook is None:
            return
        result = initialize_result(session, message.get("params") or {}, playbook)
        session.channel.send(jsonrpc.result(message["id"], result))
        session.facts_changed()
    else:
        handling = defer.ensureDeferred(session.handle(message, session.channel))
        session.in_flight[message["id"]] = handling

        def answered(response: Message) -> None:
            session.in_flight.pop(message["id"], None)
            session.channel.send(response)

        handling.addCallback(answered)
