"""Handshake-era and legacy ``/sse`` sessions that every instance can serve.

A session's durable facts — user, playbook, the credential that opened it, transport, the
negotiated version, the client's info and capabilities, its log level and resource
subscriptions — are one row of ``mcp_sessions``, written when it starts (its ``initialize``)
and when the client changes one of them; never on its calls. An instance receiving a request
for a session it does not hold reads that row once (``adopt``: one SELECT, bounded in time),
checks that the request's credential opened it (another one gets the same 404 as an unknown id),
and rebuilds the session in place from it: its upstream sessions are created lazily, as always,
initialised with the stored client capabilities. From then on the instance holds a copy and
serves the session with no SQL, like one it created.

What must reach a particular instance travels through ``director.mcp.relay``: events for a GET
stream held elsewhere, ``POST /message`` of a legacy ``/sse`` session (whose one stream is the
session: only its instance can answer), a client's answer to a server→client request pending
elsewhere, and the end of a session. Ends hold everywhere: DELETE, the per-user cap (counted
here, across instances, at each start), a revoked credential (every instance ends its copies
and deletes their rows), and idleness (``last_seen`` is refreshed in batches by every instance
holding a copy in use; a row idle for ``MCP_SESSION_IDLE_SECONDS`` is deleted, and each
instance drops its own idle copies).

An instance that stops or dies keeps its streamable sessions' rows: their clients' next
requests land elsewhere and are adopted there. A legacy ``/sse`` session does not survive its
instance: its stream is the session, and the client opens a new one.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import defer, task
from twisted.logger import Logger

from director.accounts.cache import Credential
from director.db.database import Database
from director.mcp import jsonrpc
from director.mcp.engine import remember
from director.mcp.event_log import EventLog
from director.mcp.handshake import sse_message
from director.mcp.relay import CHANNEL, Relay
from director.mcp.streams import frame

if TYPE_CHECKING:
    from director.mcp.downstream import DownstreamSession
    from director.mcp.engine import McpEngine

log = Logger(namespace="mcp.shared")

#: How long adopting a session may wait for the database before the request gets a 503.
ADOPT_TIMEOUT_SECONDS = 5.0
#: Legacy ``/sse`` sessions held elsewhere that this instance remembers (for its POSTs).
FOREIGN_SSE_MEMORY = 10_000
#: How long a session ended everywhere is remembered here, so that a request racing its end
#: cannot adopt it again from a row not yet deleted.
ENDED_MEMORY_SECONDS = 60.0


def session_hash(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("latin-1")).digest()


@attrs.frozen
class StoredSession:
    """One ``mcp_sessions`` row."""

    user_id: uuid.UUID
    playbook_pk: uuid.UUID
    credential: Credential
    transport: str
    protocol_version: str
    client_info: dict[str, Any]
    client_capabilities: dict[str, Any]
    log_level: str | None
    subscriptions: tuple[str, ...]
    #: The instance that opened the session's stream last (None: never opened).
    holder: uuid.UUID | None = None


#: Tells every instance (an ``x`` message, director.mcp.relay) of each ``id_hash`` of a CTE
#: ``gone``, and returns them; parameters: the channel, this instance (hex), the reason.
_ENDED_NOTICE = ("SELECT id_hash, pg_notify(%s, 'x ' || encode(id_hash, 'hex') || ' ' || %s "
                 "|| ' ' || %s || E'\\n') FROM gone")


#: One statement (one round trip; connections are autocommit, so it is atomic): the new row,
#: and the per-user cap across instances — the least recently seen beyond it deleted, and
#: every instance told.
_RECORD = (
    "WITH added AS (INSERT INTO mcp_sessions (id_hash, user_id, playbook_pk, credential_kind, "
    "credential_id, transport, protocol_version, client_info, client_capabilities, holder) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)), "
    "gone AS (DELETE FROM mcp_sessions WHERE id_hash IN (SELECT id_hash FROM mcp_sessions "
    "WHERE user_id = %s AND id_hash <> %s ORDER BY last_seen DESC, created_at DESC "
    "OFFSET %s) RETURNING id_hash) ")
_FORGET = "WITH gone AS (DELETE FROM mcp_sessions WHERE id_hash = %s RETURNING id_hash) "


class SharedSessions:
    """This instance's side of the shared sessions (see the module docstring)."""

    def __init__(self, database: Database, reactor: Any, engine: McpEngine,
                 event_log_events: int, event_log_seconds: float) -> None:
        self.database = database
        self.engine = engine
        self.instance = uuid.uuid4()
        #: In this instance's event ids, so that they are unique across instances.
        self.tag = self.instance.hex[:6]
        self.relay = Relay(database, self.instance)
        self.events = EventLog(database, reactor, self.instance, event_log_events,
                               event_log_seconds)
        self.by_hash: dict[bytes, DownstreamSession] = {}
        self._foreign_sse: dict[bytes, StoredSession] = {}
        self._touched: set[bytes] = set()
        # Sessions ended everywhere lately (oldest first, with when), and the deletion of the
        # rows this instance is ending, for a DELETE to wait on.
        self._ended_lately: dict[bytes, float] = {}
        self._forgetting: dict[bytes, defer.Deferred[None]] = {}
        #: The engine's: ``_last_flush`` is compared with its sessions' ``last_active``.
        self.clock = engine.clock
        self._last_flush = self.clock.seconds()
        self._sweeper: task.LoopingCall | None = None
        self.relay.on("e", self._event)
        self.relay.on("m", self._posted)
        self.relay.on("a", self._answered)
        self.relay.on("x", self._ended)
        self.relay.on("g", self._stream_moved)

    async def start(self) -> None:
        await self.relay.start()
        self.events.start()
        self._sweeper = task.LoopingCall(self._sweep)
        self._sweeper.clock = self.clock
        self._sweeper.start(min(30.0, self.engine.idle_seconds / 4), now=False)

    async def stop(self) -> None:
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self.events.stop()
        try:
            await self.events.flush()
            await self._flush_touched()
        except Exception as failure:  # the database may be gone already
            log.info("could not save the sessions' last events: {error}", error=str(failure))

    # --- the engine's hooks ----------------------------------------------------------------

    def held(self, session: DownstreamSession) -> None:
        """``session`` is now served here (created or adopted)."""
        session.key = key = session_hash(session.id)
        self.by_hash[key] = session
        if session.transport == "streamable":
            session.channel.shared = self
            session.channel.key = key

    def released(self, session: DownstreamSession, reason: str, everywhere: bool) -> None:
        key = session.key
        if key is None:
            return
        if self.by_hash.get(key) is session:
            del self.by_hash[key]
        # A stopping instance keeps its streamable sessions for the others; an /sse session
        # ends with its stream wherever that was.
        if everywhere and (reason != "shutdown" or session.transport == "sse"):
            self._remember_ended(key)
            forgetting = self.database.runOperation(
                _FORGET + _ENDED_NOTICE, (key, CHANNEL, self.instance.hex, reason))
            forgetting.addErrback(lambda failure: log.info(
                "could not delete an ended session's row: {error}", error=str(failure.value)))
            self._forgetting[key] = forgetting
            forgetting.addBoth(self._forgot, key)

    def _forgot(self, result: Any, key: bytes) -> Any:
        self._forgetting.pop(key, None)
        return result

    async def forgotten(self, session: DownstreamSession) -> None:
        """Wait until the row of a session this instance ended is deleted (a DELETE answers
        once no instance can adopt the session any more)."""
        pending = self._forgetting.get(session.key) if session.key is not None else None
        if pending is not None:
            waiter: defer.Deferred[None] = defer.Deferred()
            pending.addBoth(_fire, waiter)
            await waiter

    def _remember_ended(self, key: bytes) -> None:
        remember(self._ended_lately, key, ENDED_MEMORY_SECONDS, self.clock.seconds())

    async def record(self, session: DownstreamSession) -> None:
        """Store a new session's facts (before its id is handed out: any instance may get the
        next request); sessions past the user's cap end everywhere."""
        assert session.key is not None
        user = str(session.user_id)
        ended = await self.database.runQuery(
            _RECORD + _ENDED_NOTICE,
            (session.key, user, str(session.playbook_pk), session.credential.kind,
             str(session.credential.id), session.transport, session.protocol_version,
             json.dumps(session.client_info), json.dumps(session.client_capabilities),
             str(self.instance) if session.transport == "sse" else None,
             user, session.key, max(self.engine.max_sessions_per_user - 1, 0),
             CHANNEL, self.instance.hex, "cap"))
        for (key, _) in ended:
            self._ended(bytes(key), "cap", b"")

    def facts_changed(self, session: DownstreamSession) -> None:
        """The version, client info, log level or subscriptions changed: stored for the
        instances that will adopt the session."""
        if session.key is None:
            return
        updating = self.database.runOperation(
            "UPDATE mcp_sessions SET protocol_version = %s, client_info = %s, "
            "client_capabilities = %s, log_level = %s, subscriptions = %s, last_seen = now() "
            "WHERE id_hash = %s",
            (session.protocol_version, json.dumps(session.client_info),
             json.dumps(session.client_capabilities), session.log_level,
             sorted(session._subscriptions or ()), session.key))
        updating.addErrback(lambda failure: log.info("could not store a session's facts: {error}",
                                                     error=str(failure.value)))

    # --- adoption ----------------------------------------------------------------------------

    async def stored(self, session_id: str) -> StoredSession | None:
        """The row of ``session_id``: one query, ``TimeoutError`` past
        ``ADOPT_TIMEOUT_SECONDS``."""
        query = self.database.runQuery(
            "SELECT user_id, playbook_pk, credential_kind, credential_id, transport, "
            "protocol_version, client_info, client_capabilities, log_level, subscriptions, "
            "holder FROM mcp_sessions WHERE id_hash = %s", (session_hash(session_id),))
        # The query itself must not be cancelled half-way (txpostgres raises from its
        # canceller): the deadline is on a copy, as in ``Database.ping``.
        waiter: defer.Deferred[Any] = defer.Deferred()
        query.addBoth(lambda result: waiter.callback(result) if not waiter.called else None)
        waiter.addTimeout(ADOPT_TIMEOUT_SECONDS, self.clock)
        rows = await waiter
        if not rows:
            return None
        (user_id, playbook_pk, kind, credential_id, transport, version, info, capabilities,
         level, subscriptions, holder) = rows[0]
        return StoredSession(
            _uuid(user_id), _uuid(playbook_pk), Credential(kind, _uuid(credential_id)),
            transport, version, info if isinstance(info, dict) else {},
            capabilities if isinstance(capabilities, dict) else {}, level,
            tuple(subscriptions or ()), _uuid(holder) if holder is not None else None)

    async def adopt(self, session_id: str, credential: Credential,
                    playbook_pk: uuid.UUID) -> DownstreamSession | None:
        """The streamable session ``session_id`` rebuilt here from its row, or None (no such
        session, or not this credential's on this playbook)."""
        if session_hash(session_id) in self._ended_lately:
            return None
        stored = await self.stored(session_id)
        if stored is None or stored.credential != credential or \
                stored.playbook_pk != playbook_pk or stored.transport != "streamable":
            return None
        existing = self.engine.sessions.get(session_id)
        if existing is not None:  # adopted meanwhile by a concurrent request
            return existing
        session = self.engine.adopted(session_id, stored)
        if stored.holder is not None and stored.holder != self.instance:
            session.channel.held_elsewhere = True  # its GET stream is (or was) there
        self._touched.add(session_hash(session_id))
        log.info("MCP session adopted", session=session_id[:8])
        return session

    async def foreign_sse(self, session_id: str) -> StoredSession | None:
        """The row of a legacy ``/sse`` session held by another instance (remembered)."""
        key = session_hash(session_id)
        if key in self._ended_lately:
            return None
        stored = self._foreign_sse.get(key)
        if stored is None:
            stored = await self.stored(session_id)
            if stored is None or stored.transport != "sse":
                return None
            if len(self._foreign_sse) >= FOREIGN_SSE_MEMORY:
                self._foreign_sse.pop(next(iter(self._foreign_sse)))
            self._foreign_sse[key] = stored
        return stored

    # --- relaying ---------------------------------------------------------------------------

    def post_elsewhere(self, session_id: str, body: bytes) -> defer.Deferred[None]:
        """A message POSTed to ``/message`` of an ``/sse`` session held by another instance."""
        return self.relay.send("m", session_hash(session_id), "", body)

    def answer_elsewhere(self, session: DownstreamSession, message: jsonrpc.Message) -> None:
        """A client's answer (or cancellation) for a request pending on another instance."""
        if session.key is None:
            return
        sending = self.relay.send("a", session.key, "", json.dumps(message).encode())
        sending.addErrback(lambda failure: log.info("relaying a client's answer failed: "
                                                    "{error}", error=str(failure.value)))

    def stream_opened(self, session: DownstreamSession) -> None:
        if session.key is not None:
            session.channel.last_holder = True
            session.channel.held_elsewhere = False
            # One statement: the holder stored (for instances adopting it later), and the
            # others told (they finish a stream of theirs).
            self.database.runOperation(
                "WITH held AS (UPDATE mcp_sessions SET holder = %s WHERE id_hash = %s) "
                "SELECT pg_notify(%s, %s)",
                (str(self.instance), session.key, CHANNEL,
                 f"g {session.key.hex()} {self.instance.hex} \n")).addErrback(lambda _: None)

    async def missed(self, session: DownstreamSession, last_event_id: str) -> list[bytes]:
        """What a client resuming from ``last_event_id`` missed, from the event log."""
        assert session.key is not None
        return [frame(body, event_id)
                for event_id, body in await self.events.since(session.key, last_event_id)]

    def _event(self, key: bytes, event_id: str, body: bytes) -> None:
        session = self.by_hash.get(key)
        if session is not None and session.channel.open:
            session.channel.write_relayed(event_id, body)

    def _posted(self, key: bytes, _extra: str, body: bytes) -> None:
        session = self.by_hash.get(key)
        if session is None or session.transport != "sse" or not session.channel.open:
            return
        try:
            message = jsonrpc.parse_message(body)
        except jsonrpc.ProtocolError:
            return
        try:
            sse_message(session, message)
        except jsonrpc.ProtocolError as failure:
            log.info("a relayed message was refused: {error}", error=failure.message)

    def _answered(self, key: bytes, _extra: str, body: bytes) -> None:
        session = self.by_hash.get(key)
        if session is None:
            return
        try:
            message = jsonrpc.parse_message(body)
        except jsonrpc.ProtocolError:
            return
        if jsonrpc.is_response(message):
            if str(message.get("id")) in session.client_requests:
                session.handle_response(message)
        elif message.get("method") == "notifications/cancelled":
            params = message.get("params") or {}
            pending = session.in_flight.get(params.get("requestId"))
            if pending is not None:
                pending.cancel()

    def _ended(self, key: bytes, reason: str, _body: bytes) -> None:
        self._foreign_sse.pop(key, None)
        self._remember_ended(key)
        session = self.by_hash.get(key)
        if session is not None:
            self.engine.end(session, reason or "client", everywhere=False)

    def _stream_moved(self, key: bytes, _extra: str, _body: bytes) -> None:
        session = self.by_hash.get(key)
        if session is not None:
            session.channel.last_holder = False
            session.channel.held_elsewhere = True
            if session.channel.stream is not None:
                session.channel.stream.finish()

    # --- upkeep -----------------------------------------------------------------------------

    def revoked(self, credential: Credential | None, user_id: uuid.UUID | None,
                cookie_sessions_only: bool = False) -> None:
        """Delete the rows of what a revocation ended (each instance does it: idempotent)."""
        args: tuple[Any, ...]
        if credential is not None:
            sql, args = ("DELETE FROM mcp_sessions WHERE credential_kind = %s AND "
                         "credential_id = %s", (credential.kind, str(credential.id)))
        elif cookie_sessions_only:
            sql, args = ("DELETE FROM mcp_sessions WHERE user_id = %s AND "
                         "credential_kind = 'session'", (str(user_id),))
        else:
            sql, args = "DELETE FROM mcp_sessions WHERE user_id = %s", (str(user_id),)
        self.database.runOperation(sql, args).addErrback(lambda failure: log.info(
            "could not delete a revoked credential's sessions: {error}",
            error=str(failure.value)))

    async def _flush_touched(self) -> None:
        """``last_seen`` of the copies used here since the last time (found by a scan every
        sweep, so that the calls themselves do nothing for it)."""
        since, self._last_flush = self._last_flush, self.clock.seconds()
        touched = self._touched
        self._touched = set()
        for key, session in self.by_hash.items():  # an open stream keeps its session alive
            if session.last_active >= since or session.channel.open:
                touched.add(key)
        if touched:
            await self.database.runOperation(
                "UPDATE mcp_sessions SET last_seen = now() WHERE id_hash = ANY(%s)",
                (list(touched),))

    async def _sweep_once(self) -> None:
        await self._flush_touched()
        await self.database.runOperation(
            "DELETE FROM mcp_sessions WHERE last_seen < now() - make_interval(secs => %s)",
            (self.engine.idle_seconds,))

    def _sweep(self) -> defer.Deferred[None]:
        d = defer.ensureDeferred(self._sweep_once())
        d.addErrback(lambda failure: log.info("the shared sessions' upkeep failed: {error}",
                                              error=str(failure.value)))
        return d


def _fire(result: Any, waiter: defer.Deferred[None]) -> Any:
    waiter.callback(None)
    return result


def _uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
