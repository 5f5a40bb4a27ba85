"""What upstreams send and ask, routed to the downstream sessions using them.

An upstream session serves the downstream sessions that fetched it (``Upstream.users``, with
when each used it last): one, unless it is a shared stdio process. Its log lines and requests
go to the latest user; ``list_changed`` to every one; a resource update to those subscribed.
After a restart the upstream is told again what its users still want.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from director.mcp.channels import LIST_CHANGED
from director.mcp.jsonrpc import INTERNAL_ERROR, Message, ProtocolError
from director.mcp.upstream.base import UpstreamError
from director.mcp.upstreams import Upstream, UpstreamManager

if TYPE_CHECKING:
    from director.mcp.downstream import DownstreamSession

log = Logger(namespace="mcp.sessions")

#: RFC 5424 severities as MCP names them, least severe first.
LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")


def log_level_allows(threshold: str | None, level: Any) -> bool:
    """Whether a message at ``level`` passes a session's ``logging/setLevel`` threshold."""
    if threshold not in LOG_LEVELS or level not in LOG_LEVELS:
        return True
    return LOG_LEVELS.index(level) >= LOG_LEVELS.index(threshold)


def users_of(upstream: Upstream) -> list[DownstreamSession]:
    """The open downstream sessions using ``upstream`` (only they fetch upstreams)."""
    return [user for user in upstream.users if not user.closed]


def _latest(upstream: Upstream, users: list[DownstreamSession]) -> DownstreamSession:
    return max(users, key=lambda s: upstream.users.get(s, 0.0))


async def apply_log_level(manager: UpstreamManager, upstream: Upstream) -> None:
    """``logging/setLevel`` on ``upstream`` at the most verbose level of its sessions."""
    levels = [user.log_level for user in users_of(upstream) if user.log_level in LOG_LEVELS]
    if not levels or "logging" not in upstream.capabilities:
        return
    level = min(levels, key=LOG_LEVELS.index)
    try:
        session = await manager.ready(upstream)
        await session.request("logging/setLevel", {"level": level}, timeout=10.0)
    except UpstreamError as failure:
        log.info("logging/setLevel failed: {error}", error=str(failure))


async def restore(manager: UpstreamManager, upstream: Upstream) -> None:
    """After a restart or re-initialisation: the log level and the subscriptions the
    gateway's sessions still want, told again."""
    await apply_log_level(manager, upstream)
    users = users_of(upstream)
    wanted = sorted(uri for uri in upstream.subscribed
                    if any(uri in (user._subscriptions or ()) for user in users))
    upstream.subscribed.intersection_update(wanted)
    for uri in wanted:
        try:
            session = await manager.ready(upstream)
            await session.request("resources/subscribe", {"uri": uri}, timeout=10.0)
        except UpstreamError as failure:
            log.info("re-subscribing {uri} failed: {error}", uri=uri, error=str(failure))


def route_notification(upstream: Upstream, message: Message) -> None:
    """An upstream's notification, to the sessions it concerns."""
    method = message.get("method", "")
    params = message.get("params") or {}
    users = users_of(upstream)
    if method in ("notifications/message", "notifications/elicitation/complete"):
        # A log line belongs to one client: the session that used this upstream last
        # (the only one, unless it is a shared stdio process), on the stream of its
        # call in progress if it has one, and only at or above the level it asked for.
        # So does the end of a URL-mode elicitation: that session was asked.
        if users:
            latest = _latest(upstream, users)
            if method != "notifications/message" or \
                    log_level_allows(latest.log_level, params.get("level")):
                latest.send_related(message)
        return
    for session in users:
        if method == "notifications/resources/updated":
            if params.get("uri") in (session._subscriptions or ()):
                session.notify(message)
        elif method in LIST_CHANGED:
            session.notify(message)


async def relay_request(upstream: Upstream, method: str, params: dict[str, Any]
                        ) -> dict[str, Any]:
    """An upstream's request to the client (sampling, elicitation, roots): to the session that
    used the upstream last."""
    users = users_of(upstream)
    if method == "ping":
        return {}
    if not users:
        raise ProtocolError(INTERNAL_ERROR, "no client session to relay the request to")
    return await _latest(upstream, users).ask_client(method, params)
