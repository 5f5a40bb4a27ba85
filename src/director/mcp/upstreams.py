"""Which upstream session serves which downstream session, and keeping them alive.

* stdio servers: one child process per (playbook, server, era of the clients), shared by all
  of the playbook's sessions of that era (ids and progress tokens are remapped by the
  transport) — unless the server is marked ``isolate_sessions``, then one process per
  downstream session. A stdio connection is locked to one protocol era by its first request,
  so a server that speaks both runs once per era in use; one known to speak only the handshake
  era (``upstream.eras``) serves both eras' clients from one process;
* HTTP and SSE servers: one upstream MCP session per downstream session (pooled TCP
  underneath), so that server→client requests, log levels and subscriptions reach exactly
  the client they belong to.

An upstream that fails to start contributes nothing (its error is remembered and shown in
logs) and is retried on a later use after a backoff; it never fails the whole playbook.

The whole start — connecting or spawning, the era probing (``server/discover`` and
``initialize``, whichever comes first) and, for ``http`` servers, the fallback to HTTP+SSE —
is bounded by one figure, the server's ``timeout_seconds``: past it the start is cancelled
(the transport kills its child or drops its connections) and fails with "did not start within
N s". Each step inside has its own timeout no longer than that (stdio: the same deadline for
its probe and handshake, which also bounds a restart; HTTP: connecting at most 10 s, each
probe the server's timeout).

Before anything starts, the security rails (``director.playbooks.rails.refusal``) are applied
with the daemon's current settings: a server stored while a DANGEROUSLY_* flag was on, and
refused now that it is off, is never spawned nor connected to. It contributes nothing, like a
failed one, and its refusal is logged once per (playbook, server) for the process's life (the
settings cannot change before a restart, so there is nothing to retry).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import UUID

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from director import tracing
from director.config import Settings
from director.mcp.jsonrpc import Message
from director.mcp.upstream.base import UpstreamError, UpstreamSession, UpstreamTimeout
from director.mcp.upstream.eras import EraMemory, stdio_key
from director.playbooks import rails
from director.playbooks.model import Server

log = Logger(namespace="mcp.upstreams")

RETRY_AFTER_FAILURE_SECONDS = 5.0
LIST_METHODS = {
    "tools/list": ("tools", "notifications/tools/list_changed"),
    "prompts/list": ("prompts", "notifications/prompts/list_changed"),
    "resources/list": ("resources", "notifications/resources/list_changed"),
    "resources/templates/list": ("resourceTemplates", "notifications/resources/list_changed"),
}

#: ``factory(server, era, playbook_pk, client_capabilities)``, era being that of the downstream
#: clients ("modern" or "legacy"); the playbook keys a stdio server's sandbox directory and
#: tells an HTTP server's authorization (its owner's OAuth tokens); the capabilities are those
#: the upstream is told its client has (None: all the gateway relays; ``director.mcp.capabilities``).
Factory = Callable[[Server, str, UUID | None, dict[str, Any] | None], UpstreamSession]


@attrs.define(eq=False)
class Upstream:
    """One upstream session and what the gateway knows about it."""

    server: Server
    #: The era of the downstream clients it was made for ("modern" or "legacy").
    era: str = "legacy"
    playbook_pk: UUID | None = None
    session: UpstreamSession | None = None
    error: str | None = None
    retry_at: float = 0.0
    starting: defer.Deferred[None] | None = None
    lists: dict[str, list[dict[str, Any]]] = attrs.field(factory=dict)
    # Downstream sessions that use this upstream (several when it is a shared stdio process),
    # with the time of each one's latest request: server→client requests go to the latest.
    users: dict[Any, float] = attrs.field(factory=dict)
    #: Resource URIs the gateway subscribed to on this upstream (re-applied after a restart).
    subscribed: set[str] = attrs.field(factory=set)
    #: What it is told its client can do: the owning session's declaration (None: shared).
    client_capabilities: dict[str, Any] | None = None
    closed: bool = False

    @property
    def capabilities(self) -> dict[str, Any]:
        if self.session is None:
            return {}
        return dict(self.session.initialize_result.get("capabilities") or {})


class UpstreamManager:
    def __init__(self, factory: Factory, settings: Settings, clock: Any = None,
                 eras: EraMemory | None = None) -> None:
        self.factory = factory
        self.settings = settings
        #: The factory's: which era the stdio command lines speak (``upstream.eras``).
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock: Any = clock
        self.eras = eras if eras is not None else EraMemory(clock)
        self._shared: dict[tuple[UUID, str, str], Upstream] = {}
        #: (playbook, server) refusals logged already: once each per process.
        self._refusals_logged: set[tuple[UUID | None, str]] = set()
        #: Set by the session layer: routes upstream notifications and requests downstream.
        self.on_notification: Callable[[Upstream, Message], object] = lambda u, m: None
        self.on_request: Callable[[Upstream, str, dict[str, Any]], Any] | None = None
        #: Set by the session layer: the upstream restarted (stdio) or re-initialised (HTTP)
        #: and has forgotten what the gateway told it (subscriptions, log level).
        self.on_restored: Callable[[Upstream], object] = lambda u: None
        #: Called with an upstream whenever its state may have changed (starting, started,
        #: failed, lost, restored, closed): the Studio's live status listens here.
        self.status_observers: list[Callable[[Upstream], object]] = []

    def shared_upstreams(self) -> list[Upstream]:
        """The shared (per playbook) upstreams, for metrics."""
        return list(self._shared.values())

    def upstream_for(self, playbook_pk: UUID, server: Server, owned: dict[str, Upstream],
                     user: Any, era: str = "legacy",
                     client_capabilities: dict[str, Any] | None = None) -> Upstream:
        """The upstream serving ``user`` (a downstream session of ``era``) for ``server``;
        one of the session's own is told ``client_capabilities`` (a shared one, all)."""
        if server.type == "stdio" and not server.isolate_sessions:
            if era == "modern":
                # A server known not to speak the stateless era serves both eras' clients from
                # its handshake-era process (a running probe's process stays in use).
                probed = self._shared.get((playbook_pk, server.name, era))
                if (probed is None or probed.closed or probed.server != server) and \
                        self.eras.verdict(stdio_key(server.command or "", server.args,
                                                  server.cwd)) is False:
                    era = "legacy"
            key = (playbook_pk, server.name, era)
            upstream = self._shared.get(key)
            if upstream is None or upstream.server != server or upstream.closed:
                if upstream is not None:
                    self._close(upstream)
                upstream = self._shared[key] = Upstream(server, era, playbook_pk)
        else:
            upstream = owned.get(server.name)
            if upstream is None or upstream.server != server or upstream.closed:
                if upstream is not None:
                    self._close(upstream)
                upstream = owned[server.name] = Upstream(
                    server, era, playbook_pk, client_capabilities=client_capabilities)
        upstream.users.setdefault(user, 0.0)
        return upstream

    async def ready(self, upstream: Upstream) -> UpstreamSession:
        """The started session, starting it if needed; ``UpstreamError`` when it cannot be."""
        if upstream.session is not None:
            return upstream.session
        refused = rails.refusal(self.settings, upstream.server)
        if refused is not None:
            raise UpstreamError(self._refused(upstream, refused))
        starting = upstream.starting
        if starting is None:
            if upstream.error is not None and self.clock.seconds() < upstream.retry_at:
                raise UpstreamError(upstream.error)
            starting = defer.ensureDeferred(self._start(upstream))
            # A start that ended at once has cleared ``starting`` already: keeping its fired
            # Deferred would make every later call wait on it, never starting again.
            if not starting.called:
                upstream.starting = starting
        await _shielded(starting)
        if upstream.session is None:
            raise UpstreamError(upstream.error or f"[{upstream.server.name}] not available")
        return upstream.session

    def _refused(self, upstream: Upstream, refused: rails.Refusal) -> str:
        """The refusal's message, logged the first time for this (playbook, server)."""
        message = f"[{upstream.server.name}] not started: {refused.reason}"
        key = (upstream.playbook_pk, upstream.server.name)
        if key not in self._refusals_logged:
            self._refusals_logged.add(key)
            log.warn("{message} (playbook {playbook}; its tools, prompts and resources are "
                     "left out)", message=message, server=upstream.server.name,
                     playbook=str(upstream.playbook_pk), flag=refused.flag)
        return message

    def _status_changed(self, upstream: Upstream) -> None:
        for observer in list(self.status_observers):
            try:
                observer(upstream)
            except Exception:
                log.failure("an upstream status observer failed")

    async def _start(self, upstream: Upstream) -> None:
        self._status_changed(upstream)
        session = self.factory(upstream.server, upstream.era, upstream.playbook_pk,
                               upstream.client_capabilities)
        session.on_notification = lambda message: self._notified(upstream, message)
        if self.on_request is not None:
            handler = self.on_request

            async def relay(method: str, params: dict[str, Any]) -> dict[str, Any]:
                return await handler(upstream, method, params)

            session.on_request = relay
        session.on_closed = lambda reason: self._lost(upstream, reason)
        session.on_restored = lambda result: self._restored(upstream)
        try:
            if not tracing.spans():
                await self._bounded_start(session, upstream.server)
            else:
                with tracing.span("upstream start", attributes={
                        "director.server.name": upstream.server.name,
                        "director.upstream.transport": tracing.upstream_transport(session),
                        "director.upstream.era": upstream.era}):
                    await self._bounded_start(session, upstream.server)
        except Exception as failure:
            message = str(failure) if isinstance(failure, UpstreamError) else \
                f"[{upstream.server.name}] {failure}"
            upstream.error = message
            upstream.retry_at = self.clock.seconds() + RETRY_AFTER_FAILURE_SECONDS
            log.warn("upstream unavailable: {error}", error=message,
                     server=upstream.server.name)
        else:
            if upstream.closed:
                await session.close()
                return
            upstream.session = session
            upstream.error = None
        finally:
            upstream.starting = None
            self._status_changed(upstream)

    async def _bounded_start(self, session: UpstreamSession, server: Server) -> None:
        """``session.start()`` within the server's ``timeout_seconds`` (module docstring);
        a session that did not start is closed, so that nothing of it lingers."""
        bound = server.timeout_seconds
        starting = defer.ensureDeferred(session.start())
        starting.addTimeout(bound, self.clock)
        try:
            await starting
        except BaseException as failure:
            closing = defer.ensureDeferred(session.close())
            closing.addErrback(lambda f: log.failure("closing an upstream failed", f))
            if isinstance(failure, defer.TimeoutError):
                raise UpstreamTimeout(f"[{server.name}] did not start within {bound:g} s "
                                      f"(its timeout_seconds)") from None
            raise

    def _notified(self, upstream: Upstream, message: Message) -> None:
        method = message.get("method", "")
        for list_method, (_, changed) in LIST_METHODS.items():
            if method == changed:
                upstream.lists.pop(list_method, None)
        self.on_notification(upstream, message)

    def _restored(self, upstream: Upstream) -> None:
        upstream.lists.clear()
        if not upstream.closed:
            self.on_restored(upstream)
        self._status_changed(upstream)

    def _lost(self, upstream: Upstream, reason: str) -> None:
        # The transport restarts stdio processes by itself; cached lists may be stale now.
        upstream.lists.clear()
        log.info("upstream session ended: {reason}", reason=reason,
                 server=upstream.server.name)
        self._status_changed(upstream)

    def release(self, user: Any, owned: dict[str, Upstream]) -> None:
        """A downstream session ended: close what was its own, leave shared ones running."""
        for upstream in owned.values():
            self._close(upstream)
        owned.clear()
        for upstream in self._shared.values():
            upstream.users.pop(user, None)

    def playbook_changed(self, playbook_pk: UUID, servers: dict[str, Server] | None) -> None:
        """Close shared upstreams whose server was removed or changed (None: all)."""
        for key, upstream in list(self._shared.items()):
            pk, name, _ = key
            if pk != playbook_pk:
                continue
            if servers is None or servers.get(name) != upstream.server:
                self._close(upstream)
                del self._shared[key]

    def _close(self, upstream: Upstream) -> None:
        upstream.closed = True
        session, upstream.session = upstream.session, None
        if session is not None:
            d = defer.ensureDeferred(session.close())
            d.addErrback(lambda failure: log.failure("closing an upstream failed", failure))
        self._status_changed(upstream)

    async def close_all(self) -> None:
        sessions = [u.session for u in self._shared.values() if u.session is not None]
        for upstream in self._shared.values():
            upstream.closed = True
            upstream.session = None
        self._shared.clear()
        await defer.DeferredList([defer.ensureDeferred(s.close()) for s in sessions],
                                 consumeErrors=True)


def _shielded(d: defer.Deferred[Any]) -> defer.Deferred[Any]:
    """Wait for ``d`` without letting one waiter's cancellation cancel it for the others."""
    waiter: defer.Deferred[Any] = defer.Deferred()

    def release(result: Any) -> Any:
        if not waiter.called:
            waiter.callback(None)
        return result

    d.addBoth(release)
    return waiter
