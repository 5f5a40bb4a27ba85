"""Builds the upstream session for a server of a playbook, by transport."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from director.mcp.upstream.account import StdioAccount
from director.mcp.upstream.base import UpstreamSession
from director.mcp.upstream.http import HttpUpstream, LegacySseUpstream
from director.mcp.upstream.modern import ModernFirstHttpUpstream, ModernHttpUpstream
from director.mcp.upstream.stdio import StdioUpstream
from director.playbooks.model import Server


def upstream_factory(reactor: Any, pool: Any, account: StdioAccount | None = None,
                     ) -> Callable[[Server, str, dict[str, Any] | None], UpstreamSession]:
    """``make(server, era, client_capabilities)``: ``era`` is that of the downstream clients the
    session will serve ("modern" or "legacy"); a server that speaks both is used in it; the
    capabilities are those it is told its client has (None: all the gateway relays, see
    ``director.mcp.capabilities``). Stdio children run as
    ``account`` (None: as the daemon, which is then not root). ``UpstreamManager`` applies the
    security rails before it calls ``make``."""

    def make(server: Server, era: str,
             client_capabilities: dict[str, Any] | None = None) -> UpstreamSession:
        if server.type == "stdio":
            assert server.command is not None
            return StdioUpstream(server.name, server.command, list(server.args),
                                 {key: item.value for key, item in server.env}, server.cwd,
                                 reactor, timeout_default=server.timeout_seconds,
                                 prefer_modern=era == "modern", account=account,
                                 client_capabilities=client_capabilities)
        headers = {key: item.value for key, item in server.headers}
        if server.type == "sse":
            assert server.url is not None
            return LegacySseUpstream(server.name, server.url, headers, reactor, pool,
                                     timeout_default=server.timeout_seconds,
                                     client_capabilities=client_capabilities)
        # Streamable HTTP, falling back to legacy HTTP+SSE when the server does not speak it.
        assert server.url is not None
        # In the clients' era when the server speaks it, in the other one otherwise.
        return HttpUpstream(server.name, server.url, headers, reactor, pool,
                            timeout_default=server.timeout_seconds,
                            client_capabilities=client_capabilities,
                            streamable_class=ModernFirstHttpUpstream if era == "modern"
                            else ModernHttpUpstream)

    return make
