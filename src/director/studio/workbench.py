"""The Studio's own MCP sessions: one internal downstream session per (user, playbook).

The playbook page shows what a client of the playbook sees, and "try a tool" runs a call,
through the real gateway path: a ``DownstreamSession`` of the engine (the same object an MCP
client gets after ``initialize``), its aggregator and its upstream sessions. So the tools
listed are exactly those of ``tools/list`` (prefixes, include/exclude, shadowing), and a call
goes through the same routing, id remapping and timeouts as a client's. The sessions count
towards the user's ``MCP_MAX_SESSIONS_PER_USER`` and expire when idle like any other; a closed
one is simply made again.

Listing starts in the background when a page needs it; pages wait for it only briefly
(``LIST_WAIT_SECONDS``), then render what is known and let the live stream (``live.py``)
refresh them when the listing completes. Servers that time out or fail contribute nothing
and show their error instead.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any
from uuid import UUID

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from director.accounts.cache import Credential
from director.mcp import jsonrpc
from director.mcp.downstream import DownstreamSession
from director.mcp.engine import McpEngine
from director.mcp.jsonrpc import Message, ProtocolError
from director.mcp.router import SHADOWED_META, tool_visible
from director.mcp.upstream.base import UpstreamError
from director.mcp.upstreams import Upstream
from director.playbooks.model import Server
from director.playbooks.store import Playbook

log = Logger(namespace="studio")

LIST_WAIT_SECONDS = 3.0


@attrs.frozen
class ToolEntry:
    """One tool of one server, as the Studio shows it."""

    server: str
    original: str
    exposed: str
    visible: bool
    description: str
    input_schema: Any
    shadowed_by: str | None = None
    raw: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)


@attrs.frozen
class ToolsView:
    """The playbook's tools: per server (all of them, hidden ones too) and as a client sees
    them (``exposed``); ``complete`` is False while some server is still being listed."""

    by_server: dict[str, list[ToolEntry]]
    exposed: dict[str, ToolEntry]
    complete: bool


class CollectingChannel:
    """Where a Studio call's progress and log notifications go: kept to show with the result."""

    def __init__(self) -> None:
        self.open = True
        self.messages: list[Message] = []

    def send(self, message: Message) -> None:
        self.messages.append(message)


class StudioSession(DownstreamSession):
    """A downstream session driven by the Studio instead of an HTTP client."""

    on_change: Callable[[StudioSession], object] = staticmethod(lambda session: None)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.initialized = True
        self.client_info = {"name": "director-studio", "version": "1"}
        #: The upstream each server was last fetched from (for status, without touching it).
        self.seen: dict[str, Upstream] = {}
        self.listing: defer.Deferred[None] | None = None
        self.listed_version: int | None = None
        self.tools_view: ToolsView | None = None

    async def _fetch(self, server: Server) -> Upstream | None:
        upstream = self.upstream(server)
        self.seen[server.name] = upstream
        try:
            await self.engine.upstreams.ready(upstream)
        except UpstreamError:
            return None
        return upstream

    def upstream_capabilities(self) -> dict[str, Any] | None:
        """Its upstreams are told every capability the gateway relays, so that the Studio
        lists the tools a capable client sees (those asking the client fail readably here)."""
        return None

    async def ask_client(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """No one can answer a server's sampling, elicitation or roots request in the Studio:
        refused at once, so that the call fails with a readable error instead of waiting for
        the client-request timeout."""
        raise ProtocolError(jsonrpc.METHOD_NOT_FOUND,
                            f"the Studio cannot answer the server's {method} request; try this "
                            "tool from an MCP client that supports it")

    def notify(self, message: Message) -> None:
        """An upstream's ``list_changed``: the lists are stale, list again."""
        if message.get("method") in ("notifications/tools/list_changed",
                                     "notifications/resources/list_changed",
                                     "notifications/prompts/list_changed"):
            self.listed_version = None
            self.on_change(self)


class Workbench:
    def __init__(self, engine: McpEngine, reactor: Any) -> None:
        self.engine = engine
        self.reactor = reactor
        self._sessions: dict[tuple[UUID, UUID], StudioSession] = {}
        self._ids = itertools.count(1)
        #: ``listener(user_id, playbook_id)``: a Studio session's view changed.
        self.listeners: list[Callable[[UUID, str], object]] = []
        engine.upstreams.status_observers.append(self._upstream_changed)

    # --- sessions -------------------------------------------------------------------------

    def session(self, user_id: UUID, playbook: Playbook) -> StudioSession:
        key = (user_id, playbook.pk)
        session = self._sessions.get(key)
        if session is None or session.closed:
            # The Studio's own session stands for the signed-in user rather than one cookie
            # session (a user's browsers share it): a credential of its own kind, which a
            # disabled user's revocation still ends (``McpEngine.revoked``).
            created = self.engine.create(user_id, Credential("studio", user_id), playbook,
                                         "streamable", session_type=StudioSession)
            assert isinstance(created, StudioSession)
            created.on_change = self._session_changed
            self._sessions[key] = session = created
        session.touch()
        return session

    def peek(self, user_id: UUID, playbook: Playbook) -> StudioSession | None:
        session = self._sessions.get((user_id, playbook.pk))
        return None if session is None or session.closed else session

    def _tell(self, user_id: UUID, playbook_id: str) -> None:
        for listener in list(self.listeners):
            try:
                listener(user_id, playbook_id)
            except Exception:
                log.failure("a Studio listener failed")

    def _session_changed(self, session: StudioSession) -> None:
        playbook = self.engine.playbooks.by_pk(session.playbook_pk)
        if playbook is not None:
            self._tell(session.user_id, playbook.id)
            self.start_listing(session, playbook)

    def _upstream_changed(self, upstream: Upstream) -> None:
        for user in list(upstream.users):
            if isinstance(user, StudioSession) and not user.closed:
                playbook = self.engine.playbooks.by_pk(user.playbook_pk)
                if playbook is not None:
                    self._tell(user.user_id, playbook.id)

    # --- tools ----------------------------------------------------------------------------

    def start_listing(self, session: StudioSession, playbook: Playbook) -> defer.Deferred[None]:
        """List the playbook's tools in the background (once per playbook version)."""
        if session.listing is not None:
            return session.listing
        if session.listed_version == playbook.version and session.tools_view is not None:
            return defer.succeed(None)
        listing = defer.ensureDeferred(self._list(session, playbook))
        session.listing = listing

        def done(result: object) -> object:
            session.listing = None
            self._tell(session.user_id, playbook.id)
            return result

        listing.addBoth(done)
        listing.addErrback(lambda failure: log.failure("listing a playbook's tools", failure))
        return listing

    async def _list(self, session: StudioSession, playbook: Playbook) -> None:
        async def one(server: Server) -> tuple[Server, list[dict[str, Any]]]:
            upstream = await session._fetch(server)
            if upstream is None or "tools" not in upstream.capabilities:
                return server, []
            try:
                return server, await session._list(upstream, "tools/list")
            except UpstreamError:
                return server, []

        servers = [s for s in playbook.servers if not s.disabled]
        results = await defer.gatherResults([defer.ensureDeferred(one(s)) for s in servers],
                                            consumeErrors=True)
        aggregated = await session.aggregator.tools(playbook)
        session.tools_view = build_view(dict((s.name, tools) for s, tools in results),
                                        servers, aggregated)
        session.listed_version = playbook.version

    async def tools(self, user_id: UUID, playbook: Playbook,
                    wait: float = LIST_WAIT_SECONDS) -> ToolsView:
        """The tools as known now, after waiting at most ``wait`` seconds for a listing."""
        session = self.session(user_id, playbook)
        listing = self.start_listing(session, playbook)
        if not listing.called and wait > 0:
            await _within(listing, wait, self.reactor)
        view = session.tools_view
        fresh = session.listed_version == playbook.version and session.listing is None
        if view is None:
            return ToolsView({}, {}, False)
        return attrs.evolve(view, complete=fresh)

    # --- actions --------------------------------------------------------------------------

    async def call_tool(self, user_id: UUID, playbook: Playbook, name: str,
                        arguments: dict[str, Any]) -> tuple[Message, list[Message], float]:
        """``tools/call`` through the session: (the JSON-RPC answer, the notifications that
        came with it, seconds taken)."""
        session = self.session(user_id, playbook)
        channel = CollectingChannel()
        request_id = f"studio-{next(self._ids)}"
        message = jsonrpc.request(request_id, "tools/call", {
            "name": name, "arguments": arguments,
            "_meta": {"progressToken": request_id}})
        started = self.reactor.seconds()
        handling = defer.ensureDeferred(session.handle(message, channel))
        session.in_flight[request_id] = handling
        try:
            response = await handling
        finally:
            session.in_flight.pop(request_id, None)
            channel.open = False
        return response, channel.messages, self.reactor.seconds() - started

    def restart(self, user_id: UUID, playbook: Playbook, server: Server) -> None:
        """Close the server's upstream as this Studio session uses it and list again, which
        starts it afresh. A shared stdio process is restarted for every client of the
        playbook (it is one process); an HTTP server's session is this page's own."""
        session = self.session(user_id, playbook)
        owned = session.upstreams.pop(server.name, None)
        if owned is not None:
            self.engine.upstreams.release(session, {server.name: owned})
        else:
            others = {s.name: s for s in playbook.servers if s.name != server.name}
            self.engine.upstreams.playbook_changed(playbook.pk, others)
        session.seen.pop(server.name, None)
        session.listed_version = None
        self.start_listing(session, playbook)


def build_view(raw: dict[str, list[dict[str, Any]]], servers: list[Server],
               aggregated: dict[str, Any]) -> ToolsView:
    """Every server's tools (hidden ones too), marked with what a client sees."""
    shadowed = {(entry.get("server"), entry.get("name")): entry.get("shadowed_by")
                for entry in (aggregated.get("_meta") or {}).get(SHADOWED_META, [])
                if isinstance(entry, dict)}
    by_server: dict[str, list[ToolEntry]] = {}
    exposed: dict[str, ToolEntry] = {}
    for server in servers:
        entries = []
        for tool in raw.get(server.name, []):
            original = tool.get("name")
            if not isinstance(original, str):
                continue
            visible = tool_visible(server, original)
            name = server.prefix + original
            description = tool.get("description")
            entry = ToolEntry(server.name, original, name, visible,
                              description if isinstance(description, str) else "",
                              tool.get("inputSchema"),
                              shadowed.get((server.name, name)) if visible else None, tool)
            entries.append(entry)
            if visible and entry.shadowed_by is None and name not in exposed:
                exposed[name] = entry
        by_server[server.name] = entries
    return ToolsView(by_server, exposed, True)


async def _within(d: defer.Deferred[Any], seconds: float, reactor: Any) -> bool:
    """Wait for ``d`` at most ``seconds`` (without cancelling it); True if it fired."""
    waiter: defer.Deferred[bool] = defer.Deferred()

    def fired(result: object) -> object:
        if not waiter.called:
            waiter.callback(True)
        return result

    d.addBoth(fired)
    def expired() -> None:
        if not waiter.called:
            waiter.callback(False)

    timer = reactor.callLater(seconds, expired)
    outcome = await waiter
    if timer.active():
        timer.cancel()
    return outcome
