"""The downstream sessions of this process: the session table, the per-user cap, idle expiry,
revocation, and what a playbook change or an upstream restart does to them.

A session belongs to the credential that opened it (an API key or a cookie session): only that
credential reaches it again, and when it is revoked — or its user disabled, or all its user's
cookie sessions ended by a password change — the engine ends the session: its stream is
finished, its calls in progress cancelled, its upstream sessions released (``McpEngine.revoked``,
told by the account cache, which every instance keeps fresh by NOTIFY).
With several instances, a handshake-era or ``/sse`` session is not this process's alone:
``director.mcp.shared_sessions`` stores its facts when it starts, and any instance that gets a
request for it adopts it (``McpEngine.adopted``) and serves it as its own; ``McpEngine.shared``
is then set, a session's end reaches every instance (``McpEngine.end``, ``everywhere``), and the
session channel writes its events to the shared log or relays them to the instance holding the
stream (``SessionChannel.send_encoded``).
Why bound to the credential and not to the user: revoking a key must end exactly what that key
opened, and a session another credential could continue would either outlive the revocation or
be cut under the other credential's feet; clients keep one credential per connection anyway.

Time (idleness, the memory of revocations) is the injected ``clock``'s (``director.mcp.clock``).
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any
from uuid import UUID

from twisted.internet import defer, task
from twisted.logger import Logger

from director.accounts.cache import Credential, Revocation
from director.config import Settings
from director.mcp.dispatch import resume
from director.mcp.downstream import DownstreamSession
from director.mcp.fanout import relay_request, restore, route_notification, users_of
from director.mcp.streams import StreamRegistry
from director.mcp.upstreams import Upstream, UpstreamManager
from director.playbooks.cache import PlaybookCache
from director.playbooks.store import Playbook

if TYPE_CHECKING:
    from director.mcp.shared_sessions import SharedSessions, StoredSession
    from director.metrics import Metrics

log = Logger(namespace="mcp.sessions")

#: How long a revoked credential is remembered, so that a request that authenticated just
#: before the revocation (then waited, e.g. for a rate-limit lease) cannot open a session.
REVOKED_MEMORY_SECONDS = 60.0


class CredentialRevoked(Exception):
    """A session was to be opened with a credential revoked a moment ago (answered 401)."""


class McpEngine:
    """All downstream sessions of this process, their upstreams and streams."""

    def __init__(self, settings: Settings, playbooks: PlaybookCache, upstreams: UpstreamManager,
                 reactor: Any, *, clock: Any, max_sessions_per_user: int = 100,
                 idle_seconds: float = 1800.0, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.playbooks = playbooks
        self.upstreams = upstreams
        #: For the timers of ``director.mcp.modern`` and ``director.oauth.client`` (which do not
        #: measure durations); the session layer's own are ``clock``'s.
        self.reactor = reactor
        #: Time and timers of the sessions, their streams and their upkeep (``director.mcp.clock``).
        self.clock = clock
        self.streams = StreamRegistry(clock)
        self.sessions: dict[str, DownstreamSession] = {}
        # Per user, for the cap: scanning every session at each open costs O(sessions).
        self._of_user: dict[UUID, dict[str, DownstreamSession]] = {}
        # Per credential, for revocations: one lookup instead of a scan of every session.
        self._of_credential: dict[Credential, dict[str, DownstreamSession]] = {}
        # Credentials revoked lately, oldest first, with when (``REVOKED_MEMORY_SECONDS``).
        self._revoked: dict[Credential, float] = {}
        self.max_sessions_per_user = max_sessions_per_user
        self.idle_seconds = idle_seconds
        #: Set when several instances share the sessions (``director.mcp.shared_sessions``).
        self.shared: SharedSessions | None = None
        self.instance_tag = ""
        self._expiry: task.LoopingCall | None = None
        upstreams.on_notification = route_notification
        upstreams.on_request = relay_request
        upstreams.on_restored = self._upstream_restored
        playbooks.subscribe(self._playbook_changed)

    def start(self) -> None:
        self.streams.start()
        self._expiry = task.LoopingCall(self.expire_idle)
        self._expiry.clock = self.clock
        self._expiry.start(min(60.0, self.idle_seconds / 2), now=False)

    async def stop(self) -> None:
        if self._expiry is not None and self._expiry.running:
            self._expiry.stop()
        for session in list(self.sessions.values()):
            self.end(session, "shutdown")
        self.streams.stop()
        self.streams.close_all()
        if self.shared is not None:
            await self.shared.stop()
        await self.upstreams.close_all()

    # --- sessions -------------------------------------------------------------------------

    def create(self, user_id: UUID, credential: Credential, playbook: Playbook, transport: str,
               session_type: type[DownstreamSession] = DownstreamSession) -> DownstreamSession:
        """A new session of ``user_id`` opened with ``credential``; ``CredentialRevoked`` when
        that credential was revoked since the request authenticated."""
        if credential in self._revoked:
            raise CredentialRevoked(credential.kind)
        mine = self._of_user.setdefault(user_id, {})
        if len(mine) >= self.max_sessions_per_user:
            oldest = min(mine.values(), key=lambda s: s.last_active)
            log.info("session cap reached for a user: ending their least recently used session",
                     user_id=str(user_id))
            # Shared sessions: only this copy; the cap across instances is counted when the
            # new one is recorded (``SharedSessions.record``).
            self.end(oldest, "cap", everywhere=self.shared is None)
            mine = self._of_user.setdefault(user_id, {})
        session_id = secrets.token_urlsafe(24)
        session = session_type(self, session_id, user_id, credential, playbook.pk, transport)
        self.sessions[session_id] = session
        mine[session_id] = session
        self._of_credential.setdefault(credential, {})[session_id] = session
        if self.metrics is not None:
            self.metrics.session_created(transport)
        if self.shared is not None and transport in ("streamable", "sse") and \
                credential.kind != "studio":  # the Studio's own stay in its instance
            self.shared.held(session)
        return session

    def adopted(self, session_id: str, stored: StoredSession) -> DownstreamSession:
        """A streamable session another instance created, rebuilt here from its stored facts
        (``SharedSessions.adopt``): its upstream sessions follow lazily, as for a new one,
        except those its log level and subscriptions must be told to now (``resume``: else
        ``notifications/resources/updated`` would stop with the instance that subscribed)."""
        session = DownstreamSession(self, session_id, stored.user_id, stored.credential,
                                    stored.playbook_pk, stored.transport)
        session.protocol_version = stored.protocol_version
        session.client_info = stored.client_info
        session.client_capabilities = stored.client_capabilities
        session.log_level = stored.log_level
        if stored.subscriptions:
            session.subscriptions.update(stored.subscriptions)
        session.initialized = True
        self.sessions[session_id] = session
        self._of_user.setdefault(stored.user_id, {})[session_id] = session
        self._of_credential.setdefault(stored.credential, {})[session_id] = session
        if self.shared is not None:
            self.shared.held(session)
        if session.log_level is not None or stored.subscriptions:
            resuming = defer.ensureDeferred(resume(session))
            resuming.addErrback(lambda failure: log.failure("resuming an adopted session",
                                                            failure))
        return session

    def find(self, session_id: str, credential: Credential,
             playbook: Playbook) -> DownstreamSession | None:
        """The session on this playbook opened with this credential, or None (unknown, ended,
        or opened with another credential: sessions are bound to theirs, module docstring)."""
        session = self.sessions.get(session_id)
        if session is None or session.credential != credential or \
                session.playbook_pk != playbook.pk:
            return None
        return session

    def end(self, session: DownstreamSession, reason: str, everywhere: bool = True) -> None:
        """End ``session`` (idempotent); ``reason`` as ``DownstreamSession.ended_because``.
        A shared session ends on every instance unless ``everywhere`` is false (only this
        copy is dropped: another instance may go on serving it)."""
        if self.sessions.pop(session.id, None) is not None:
            _unindex(self._of_user, session.user_id, session.id)
            _unindex(self._of_credential, session.credential, session.id)
            session.ended_because = reason
            if self.metrics is not None:
                self.metrics.session_ended(session.transport, reason)
            if self.shared is not None:
                self.shared.released(session, reason, everywhere)
        session.close()

    def expire_idle(self) -> None:
        cutoff = self.clock.seconds() - self.idle_seconds
        for session in list(self.sessions.values()):
            if session.last_active < cutoff and not session.channel.open and \
                    not session.in_flight:
                # A shared session may be in use elsewhere: its row ends by the shared
                # ``last_seen`` (``SharedSessions``), this copy here.
                self.end(session, "idle", everywhere=self.shared is None)

    # --- revocation (``director.accounts.cache.CredentialHolder``) ------------------------

    def revoked(self, revocation: Revocation) -> None:
        """End every session opened with what ``revocation`` names."""
        if revocation.kind in ("api_key", "session", "oauth"):
            credential = Credential(revocation.kind, revocation.id)
            self._remember_revoked(credential)
            ending = list(self._of_credential.get(credential, {}).values())
            if self.shared is not None:
                self.shared.revoked(credential, None)
        else:  # "user": all of them; "sessions_of": those opened by cookie sessions
            ending = [session for session in self._of_user.get(revocation.id, {}).values()
                      if revocation.kind == "user" or session.credential.kind == "session"]
            if self.shared is not None:
                self.shared.revoked(None, revocation.id, revocation.kind != "user")
        for session in ending:
            self.end(session, "revoked", everywhere=False)  # every instance is told
        if ending:
            log.info("ended {count} MCP session(s): their credential was revoked ({kind})",
                     count=len(ending), kind=revocation.kind)

    def held(self) -> list[tuple[UUID, Credential]]:
        return [(next(iter(sessions.values())).user_id, credential)
                for credential, sessions in self._of_credential.items()]

    def _remember_revoked(self, credential: Credential) -> None:
        remember(self._revoked, credential, REVOKED_MEMORY_SECONDS, self.clock.seconds())

    # --- upstreams and playbooks -----------------------------------------------------------

    def _upstream_restored(self, upstream: Upstream) -> None:
        if self.metrics is not None:
            users = users_of(upstream)  # an upstream serves one playbook's sessions
            self.metrics.upstream_restarted(users[0].playbook_pk if users else None,
                                            upstream.server.name)
        restoring = defer.ensureDeferred(restore(self.upstreams, upstream))
        restoring.addErrback(lambda failure: log.failure("restoring an upstream", failure))

    def _playbook_changed(self, old: Playbook | None, new: Playbook | None) -> None:
        playbook = new or old
        assert playbook is not None
        self.upstreams.playbook_changed(
            playbook.pk, {s.name: s for s in new.servers} if new is not None else None)
        affected = [s for s in self.sessions.values() if s.playbook_pk == playbook.pk]
        if new is None:
            for session in affected:
                self.end(session, "deleted")
            return
        servers_changed = old is None or old.servers != new.servers
        prompts_changed = old is None or old.prompts != new.prompts or servers_changed
        methods = (("notifications/tools/list_changed", "notifications/resources/list_changed")
                   if servers_changed else ()) + \
            (("notifications/prompts/list_changed",) if prompts_changed else ())
        if methods:
            self.streams.slicer.run(
                affected, lambda session: session.notify_list_changed(methods, derived=True))


def remember(memory: dict[Any, float], key: Any, seconds: float, now: float) -> None:
    """Note ``key`` in ``memory`` (oldest first, with when: ``now``), forgetting what is older
    than ``seconds``."""
    while memory:  # oldest first: stop at the first one still young (no copy of it all)
        old, when = next(iter(memory.items()))
        if now - when < seconds:
            break
        del memory[old]
    memory.pop(key, None)
    memory[key] = now


def _unindex(index: dict[Any, dict[str, DownstreamSession]], key: Any, session_id: str) -> None:
    sessions = index.get(key)
    if sessions is not None:
        sessions.pop(session_id, None)
        if not sessions:
            del index[key]
