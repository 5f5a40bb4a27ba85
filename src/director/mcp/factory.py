"""Builds the upstream session for a server of a playbook, by transport."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from director.mcp.jsonrpc import Message
from director.mcp.upstream.base import (
    RequestHandler,
    UpstreamError,
    UpstreamSession,
    default_request_handler,
)
from director.playbooks.model import Server


class AutoHttpUpstream:
    """An ``http`` server: Streamable HTTP, falling back to legacy HTTP+SSE when the server
    does not speak it (the specification's backwards-compatibility procedure)."""

    def __init__(self, server: Server, headers: dict[str, str], reactor: Any, pool: Any) -> None:
        self.name = server.name
        self.server = server
        self.headers = headers
        self.reactor = reactor
        self.pool = pool
        self.initialize_result: dict[str, Any] = {}
        self.on_notification: Callable[[Message], object] = lambda message: None
        self.on_request: RequestHandler = default_request_handler
        self.on_closed: Callable[[str], object] = lambda reason: None
        self._inner: UpstreamSession | None = None

    async def start(self) -> None:
        from director.mcp.upstream.http import connect_http
        from director.mcp.upstream.modern import ModernHttpUpstream

        assert self.server.url is not None
        inner = await connect_http(
            self.name, self.server.url, self.headers, self.reactor, self.pool,
            timeout_default=self.server.timeout_seconds,
            streamable_class=ModernHttpUpstream,
            on_notification=lambda message: self.on_notification(message),
            on_request=lambda method, params: self.on_request(method, params),
            on_closed=lambda reason: self.on_closed(reason))
        self._inner = inner
        self.initialize_result = inner.initialize_result

    def _session(self) -> UpstreamSession:
        if self._inner is None:
            raise UpstreamError(f"[{self.name}] not connected")
        return self._inner

    async def request(self, method: str, params: dict[str, Any] | None = None, *,
                      timeout: float = 60.0,
                      on_progress: Callable[[dict[str, Any]], object] | None = None
                      ) -> dict[str, Any]:
        return await self._session().request(method, params, timeout=timeout,
                                             on_progress=on_progress)

    def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        self._session().notify(method, params)

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()


def upstream_factory(reactor: Any, pool: Any) -> Callable[[Server], UpstreamSession]:
    def make(server: Server) -> UpstreamSession:
        if server.type == "stdio":
            from director.mcp.upstream.stdio import StdioUpstream

            assert server.command is not None
            return StdioUpstream(server.name, server.command, list(server.args),
                                 {key: item.value for key, item in server.env}, server.cwd,
                                 reactor, timeout_default=server.timeout_seconds)
        headers = {key: item.value for key, item in server.headers}
        if server.type == "sse":
            from director.mcp.upstream.http import LegacySseUpstream

            assert server.url is not None
            return LegacySseUpstream(server.name, server.url, headers, reactor, pool,
                                     timeout_default=server.timeout_seconds)
        return AutoHttpUpstream(server, headers, reactor, pool)

    return make
