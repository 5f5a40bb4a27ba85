"""Builds the upstream session for a server of a playbook, by transport."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from director.mcp.upstream.base import UpstreamSession
from director.mcp.upstream.http import HttpUpstream, LegacySseUpstream
from director.mcp.upstream.modern import ModernHttpUpstream
from director.mcp.upstream.stdio import StdioUpstream
from director.playbooks.model import Server


def upstream_factory(reactor: Any, pool: Any) -> Callable[[Server], UpstreamSession]:
    def make(server: Server) -> UpstreamSession:
        if server.type == "stdio":
            assert server.command is not None
            return StdioUpstream(server.name, server.command, list(server.args),
                                 {key: item.value for key, item in server.env}, server.cwd,
                                 reactor, timeout_default=server.timeout_seconds)
        headers = {key: item.value for key, item in server.headers}
        if server.type == "sse":
            assert server.url is not None
            return LegacySseUpstream(server.name, server.url, headers, reactor, pool,
                                     timeout_default=server.timeout_seconds)
        # Streamable HTTP, falling back to legacy HTTP+SSE when the server does not speak it.
        assert server.url is not None
        # The handshake first, the stateless era (server/discover) when it is refused.
        return HttpUpstream(server.name, server.url, headers, reactor, pool,
                            timeout_default=server.timeout_seconds,
                            streamable_class=ModernHttpUpstream)

    return make
