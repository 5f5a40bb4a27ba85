"""The methods a client calls on a downstream session: routed by the session's aggregator to
an upstream, or answered by the gateway (the playbook's own prompts, ``ping``, the log level).

Functions of the session (``DownstreamSession._dispatch`` is ``dispatch``, which a subclass
extends), calling back its ``_forward`` for what an upstream answers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger

from director import tracing
from director.mcp.channels import Channel
from director.mcp.fanout import apply_log_level, users_of
from director.mcp.jsonrpc import INVALID_PARAMS, METHOD_NOT_FOUND, ProtocolError
from director.mcp.router import enabled_servers, render_prompt, settled_within
from director.mcp.upstream.base import UpstreamError
from director.playbooks.model import Server
from director.playbooks.store import Playbook

if TYPE_CHECKING:
    from director.mcp.downstream import DownstreamSession

log = Logger(namespace="mcp.sessions")


async def dispatch(session: DownstreamSession, method: str, params: dict[str, Any],
                   channel: Channel) -> Any:
    """The result of a client request on ``session`` (``DownstreamSession._dispatch``)."""
    playbook = session.playbook
    if method == "ping":
        return {}
    if method == "tools/list":
        return await session.aggregator.tools(playbook)
    if method == "prompts/list":
        return await session.aggregator.prompts(playbook)
    if method == "resources/list":
        return await session.aggregator.resources(playbook)
    if method == "resources/templates/list":
        return await session.aggregator.templates(playbook)
    if method == "tools/call":
        name = required_string(params, "name")
        if not tracing.spans():
            server, original = await session.aggregator.tool_route(playbook, name)
        else:
            with tracing.span("route", attributes={"gen_ai.tool.name": name}) as routed:
                server, original = await session.aggregator.tool_route(playbook, name)
                assert routed is not None
                routed.set_attribute("director.server.name", server.name)
        return await session._forward(server, method, dict(params, name=original), channel)
    if method == "prompts/get":
        name = required_string(params, "name")
        source = await session.aggregator.prompt_route(playbook, name)
        if source is None:
            prompt = playbook.prompt(name)
            assert prompt is not None
            arguments = params.get("arguments") or {}
            if not isinstance(arguments, dict):
                raise ProtocolError(INVALID_PARAMS, "arguments must be an object")
            return render_prompt(prompt, arguments)
        return await session._forward(source, method, params, channel)
    if method in ("resources/read", "resources/subscribe", "resources/unsubscribe"):
        uri = required_string(params, "uri")
        server = await session.aggregator.resource_route(playbook, uri)
        if method == "resources/read":
            return await session._forward(server, method, params, channel)
        return await _subscription(session, server, method, uri, params, channel)
    if method == "completion/complete":
        return await _complete(session, playbook, params, channel)
    if method == "logging/setLevel":
        session.log_level = required_string(params, "level")
        session.facts_changed()
        await _set_upstream_log_levels(session, playbook)
        return {}
    raise ProtocolError(METHOD_NOT_FOUND, f"method not found: {method}")


async def resume(session: DownstreamSession) -> None:
    """Adopted from another instance: this instance's upstreams are told what the client
    asked there — its log level and its subscriptions, each routed by its URI — as the
    client's own ``logging/setLevel`` and ``resources/subscribe`` tell them (a shared stdio
    process counts this session among those wanting the URI, ``_subscription``)."""
    playbook = session.playbook
    if session.log_level is not None:
        await _set_upstream_log_levels(session, playbook)
    for uri in sorted(session._subscriptions or ()):
        if session.closed:
            return
        try:
            server = await session.aggregator.resource_route(playbook, uri)
            await _subscription(session, server, "resources/subscribe", uri, {"uri": uri},
                                session.channel, changed=False)
        except (ProtocolError, UpstreamError) as failure:
            log.info("re-subscribing {uri} of an adopted session failed: {error}",
                     uri=uri, error=str(failure))


async def _subscription(session: DownstreamSession, server: Server, method: str, uri: str,
                        params: dict[str, Any], channel: Channel, changed: bool = True
                        ) -> dict[str, Any]:
    """``resources/(un)subscribe``: an upstream shared with other sessions is unsubscribed
    only when none of them still wants the URI (``changed``: the session's stored facts
    are updated; not when they are what is re-applied, ``resume``)."""
    upstream = session.upstream(server)
    if method == "resources/subscribe":
        result = await session._forward(server, method, params, channel)
        session.subscriptions.add(uri)
        upstream.subscribed.add(uri)
        if changed:
            session.facts_changed()
        return result
    session.subscriptions.discard(uri)
    session.facts_changed()
    if any(uri in (user._subscriptions or ()) for user in users_of(upstream)):
        return {}
    upstream.subscribed.discard(uri)
    return await session._forward(server, method, params, channel)


async def _complete(session: DownstreamSession, playbook: Playbook, params: dict[str, Any],
                    channel: Channel) -> Any:
    ref = params.get("ref")
    if not isinstance(ref, dict):
        raise ProtocolError(INVALID_PARAMS, "ref must be an object")
    server: Server | None
    if ref.get("type") == "ref/prompt":
        server = await session.aggregator.prompt_route(playbook, required_string(ref, "name"))
        if server is None:
            return {"completion": {"values": [], "hasMore": False}}
    elif ref.get("type") == "ref/resource":
        server = await session.aggregator.template_route(playbook, required_string(ref, "uri"))
    else:
        raise ProtocolError(INVALID_PARAMS, "ref.type must be ref/prompt or ref/resource")
    return await session._forward(server, "completion/complete", params, channel)


async def _set_upstream_log_levels(session: DownstreamSession, playbook: Playbook) -> None:
    """Each upstream gets the most verbose level any of its sessions asked for (a shared
    stdio process serves several): every session still sees only what it asked for, since
    log lines are filtered per session on their way down."""
    async def one(server: Server) -> None:
        upstream = await session._fetch(server)
        if upstream is not None:
            await apply_log_level(session.engine.upstreams, upstream)

    # Not longer than a list waits: a server still starting gets the level once it is
    # ready (``one`` goes on).
    setting = [defer.ensureDeferred(one(s)).addErrback(
        lambda failure: log.failure("logging/setLevel upstream", failure))
        for s in enabled_servers(playbook)]
    await settled_within(setting, session.engine.settings.mcp_list_wait_seconds,
                         session.engine.clock)


def required_string(params: dict[str, Any], name: str) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value:
        raise ProtocolError(INVALID_PARAMS, f"{name} must be a non-empty string")
    return value
