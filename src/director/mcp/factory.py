"""Builds the upstream session for a server of a playbook, by transport."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any
from uuid import UUID

from director.mcp.upstream.account import StdioAccount
from director.mcp.upstream.authorization import UpstreamAuthorization
from director.mcp.upstream.base import UpstreamSession
from director.mcp.upstream.eras import EraMemory
from director.mcp.upstream.http import HttpUpstream
from director.mcp.upstream.legacy_sse import LegacySseUpstream
from director.mcp.upstream.modern import ModernFirstHttpUpstream, ModernHttpUpstream
from director.mcp.upstream.stdio import StdioUpstream
from director.playbooks.model import Server
from director.sandbox.launcher import Launcher

#: ``authorizations(playbook pk, server)``: what authorizes an HTTP server's requests (upstream
#: OAuth, ``director.oauth.client``), or None.
Authorizations = Callable[[UUID | None, Server], UpstreamAuthorization | None]


def upstream_factory(reactor: Any, pool: Any, account: StdioAccount | None = None,
                     launcher: Launcher | None = None,
                     authorizations: Authorizations | None = None,
                     eras: EraMemory | None = None,
                     ) -> Callable[[Server, str, UUID | None, dict[str, Any] | None],
                                   UpstreamSession]:
    """``make(server, era, playbook_pk=None, client_capabilities=None)``: ``era`` is that of the
    downstream clients the session will serve ("modern" or "legacy"); a server that speaks both
    is used in it; the playbook keys a stdio server's sandbox directory and tells an HTTP
    server's authorization; the capabilities are those the upstream is told its client has
    (None: all the gateway relays, see ``director.mcp.capabilities``). Stdio children are
    started by ``launcher`` (``director.sandbox``; None: as ``account``, or as the daemon, which
    is then not root). HTTP sessions get ``authorizations(playbook_pk, server)`` (the OAuth seam,
    ``upstream.authorization``). Every session learns and reads which era each server speaks
    in ``eras`` (the service's; ``upstream.eras``). ``UpstreamManager`` applies the security
    rails before it calls ``make``."""
    eras = eras if eras is not None else EraMemory(reactor)

    def make(server: Server, era: str, playbook_pk: UUID | None = None,
             client_capabilities: dict[str, Any] | None = None) -> UpstreamSession:
        if server.type == "stdio":
            assert server.command is not None
            return StdioUpstream(server.name, server.command, list(server.args),
                                 {key: item.value for key, item in server.env}, server.cwd,
                                 reactor, timeout_default=server.timeout_seconds,
                                 prefer_modern=era == "modern", account=account,
                                 launcher=launcher, owner=str(playbook_pk or ""),
                                 client_capabilities=client_capabilities, eras=eras)
        headers = {key: item.value for key, item in server.headers}
        authorization = authorizations(playbook_pk, server) if authorizations else None
        if server.type == "sse":
            assert server.url is not None
            return LegacySseUpstream(server.name, server.url, headers, reactor, pool,
                                     timeout_default=server.timeout_seconds,
                                     authorization=authorization,
                                     client_capabilities=client_capabilities)
        # Streamable HTTP, falling back to legacy HTTP+SSE when the server does not speak it.
        assert server.url is not None
        # In the clients' era when the server speaks it, in the other one otherwise.
        return HttpUpstream(server.name, server.url, headers, reactor, pool,
                            timeout_default=server.timeout_seconds,
                            authorization=authorization,
                            client_capabilities=client_capabilities,
                            streamable_class=partial(
                                ModernFirstHttpUpstream if era == "modern"
                                else ModernHttpUpstream, eras=eras))

    return make
