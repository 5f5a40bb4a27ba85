"""The bounded log of GET-stream events, for ``Last-Event-ID`` resumption on any instance.

What is kept: every event an instance writes to a handshake-era session's GET stream (at once:
a client that lost its connection is often noticed only at the next heartbeat, and what was
written meanwhile is what it will miss), and every event produced for a session whose stream is
held elsewhere or by nobody (a resource update, a log line outside a call, an upstream's
``list_changed``, a server→client request sent on the GET stream), with its event id. What is
not: the answers and notifications sent on a POST's own
response stream (the client asked on that request; it re-asks if that request is lost), the
legacy ``/sse`` transport's events (its session is its stream: it has no resumption), and a
``list_changed`` that a playbook change causes while the session has no open stream anywhere
(every instance sees the change; the one the client reconnects to replays it only if it
recorded it itself).

Bounds: ``MCP_EVENT_LOG_EVENTS`` events in total (the oldest go first) and none older than
``MCP_EVENT_LOG_SECONDS``; trimmed every ``TRIM_SECONDS`` by each instance, through the two
indexes (position, time), so a trim costs what it deletes. ``MCP_EVENT_LOG_EVENTS=0`` turns
the log off: resumption is then served from the instance's own memory only.

Writes are batched: the events of one reactor turn go in one INSERT (and the NOTIFYs of those
relayed in the same transaction), never awaited by the stream that sent them; a large batch (a
``list_changed`` fan-out) is written ``FANOUT_DELAY_SECONDS`` later, once the streams' own
writes have gone out.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from twisted.internet import defer, task
from twisted.logger import Logger

from director.clock import repeating, stop_repeating
from director.db.database import Database
from director.db.interactions import Interaction, Query
from director.mcp.relay import payload_or_row

log = Logger(namespace="mcp.events")

TRIM_SECONDS = 10.0
#: A batch never grows past this (a fan-out to many streams is written in several).
MAX_BATCH = 2000
#: A batch at least this large waits ``FANOUT_DELAY_SECONDS`` before it is written.
FANOUT_BATCH = 200
FANOUT_DELAY_SECONDS = 0.05


def _write(events: list[tuple[bytes, str, bytes, bool]], instance: UUID,
           logged: bool) -> Interaction[None]:
    if logged:
        yield Query(
            "INSERT INTO mcp_events (session_hash, event_id, body) "
            "SELECT * FROM unnest(%s::bytea[], %s::text[], %s::bytea[])",
            ([e[0] for e in events], [e[1] for e in events], [e[2] for e in events]))
    for session_hash, event_id, body, relayed in events:
        if relayed:
            yield from payload_or_row("e", session_hash, instance, event_id, body)


def _trim(max_events: int, max_seconds: float) -> Interaction[int]:
    rows = yield Query("DELETE FROM mcp_events WHERE at < now() - make_interval(secs => %s)",
                       (max_seconds,))
    del rows
    rows = yield Query("SELECT max(position) FROM mcp_events")
    newest = rows[0][0] if rows else None
    if newest is not None:
        yield Query("DELETE FROM mcp_events WHERE position <= %s", (newest - max_events,))
    yield Query("DELETE FROM mcp_relay WHERE at < now() - interval '1 minute'")
    return 0


class EventLog:
    def __init__(self, database: Database, reactor: Any, instance: UUID, max_events: int,
                 max_seconds: float) -> None:
        self.database = database
        self.reactor = reactor
        self.instance = instance
        self.enabled = max_events > 0
        self.max_events = max_events
        self.max_seconds = max_seconds
        self._batch: list[tuple[bytes, str, bytes, bool]] = []
        self._flushing: defer.Deferred[None] | None = None
        self._scheduled: Any = None
        self._trimmer: task.LoopingCall | None = None

    def start(self) -> None:
        if self.enabled:
            self._trimmer = repeating(self.reactor, TRIM_SECONDS, self._trim)

    def stop(self) -> None:
        stop_repeating(self._trimmer)

    def append(self, session_hash: bytes, event_id: str, body: bytes, relayed: bool) -> None:
        """Keep an event (and NOTIFY the others of it when ``relayed``: no stream here)."""
        if not self.enabled and not relayed:
            return
        self._batch.append((session_hash, event_id, body, relayed))
        if self._scheduled is None:
            self._scheduled = self.reactor.callLater(0, self._flush_now)

    def _flush_now(self, delayed: bool = False) -> None:
        if len(self._batch) >= FANOUT_BATCH and not delayed:
            self._scheduled = self.reactor.callLater(FANOUT_DELAY_SECONDS, self._flush_now,
                                                     True)
            return
        self._scheduled = None
        defer.ensureDeferred(self.flush()).addErrback(
            lambda failure: log.failure("writing stream events failed", failure))

    async def flush(self) -> None:
        """Write what is pending (and wait for a write in progress)."""
        while self._flushing is not None:
            await self._flushing
        while self._batch:
            events, self._batch = self._batch[:MAX_BATCH], self._batch[MAX_BATCH:]
            self._flushing = self.database.run(_write(events, self.instance, self.enabled))
            try:
                await self._flushing
            finally:
                self._flushing = None

    async def since(self, session_hash: bytes, last_event_id: str) -> list[tuple[str, bytes]]:
        """The session's events after ``last_event_id`` (all of those kept when that one is no
        longer, or never was, in the log)."""
        if not self.enabled:
            return []
        await self.flush()
        rows = await self.database.runQuery(
            "SELECT event_id, body FROM mcp_events WHERE session_hash = %s AND position > "
            "coalesce((SELECT position FROM mcp_events WHERE session_hash = %s AND event_id = %s"
            " ORDER BY position DESC LIMIT 1), 0) ORDER BY position",
            (session_hash, session_hash, last_event_id))
        return [(event_id, bytes(body)) for event_id, body in rows]

    def _trim(self) -> defer.Deferred[Any]:
        d = self.database.run(_trim(self.max_events, self.max_seconds))
        d.addErrback(lambda failure: log.info("trimming the event log failed: {error}",
                                              error=str(failure.value)))
        return d
