"""``/studio/events``: one server-sent-event stream per open Studio page, per user.

It says *that* something changed, never what: ``event: changed`` with ``{"playbook": id}``
when one of the user's playbooks changed (the playbook cache's change events, from any
instance), when an upstream of the user's Studio session changed state (the engine's
``status_observers``), or when a tools listing finished. The page then fetches itself again
and swaps its live regions, so what is shown always comes from the same rendering as a
reload, and no data ever travels on the stream.

Events for one playbook are coalesced (``COALESCE_SECONDS``): a burst of changes (a server
starting, its tools listed, the playbook saved) costs the page one refresh. Streams share the
engine's registry (heartbeats, back-pressure, closing at shutdown). Every
``RECHECK_SECONDS`` each stream's cookie session is checked again: a stream whose session
was signed out, expired or revoked is ended.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

from twisted.internet import defer, task
from twisted.logger import Logger

from director.clock import repeating, stop_repeating
from director.mcp.streams import EventStream, StreamRegistry, frame
from director.playbooks.store import Playbook

log = Logger(namespace="studio")

COALESCE_SECONDS = 0.1
RECHECK_SECONDS = 30.0

#: ``still_valid(token) -> bool``: whether the stream's cookie session still stands.
SessionCheck = Callable[[str], Awaitable[bool]]


class LiveHub:
    def __init__(self, registry: StreamRegistry, reactor: Any, still_valid: SessionCheck) -> None:
        self.registry = registry
        self.reactor = reactor
        self.still_valid = still_valid
        self._streams: dict[UUID, dict[EventStream, str]] = {}
        self._pending: dict[UUID, set[str]] = {}
        self._flush_call: Any = None
        self._recheck: task.LoopingCall | None = None

    def start(self) -> None:
        self._recheck = repeating(self.reactor, RECHECK_SECONDS, self._check_sessions)

    def stop(self) -> None:
        stop_repeating(self._recheck)
        for streams in list(self._streams.values()):
            for stream in list(streams):
                stream.finish()

    def open(self, request: Any, user_id: UUID, session_token: str) -> EventStream:
        stream = EventStream(request, self.registry, on_close=lambda s: self._closed(user_id, s))
        self._streams.setdefault(user_id, {})[stream] = session_token
        stream.send(b"retry: 3000\n\n")
        stream.comment(b"stream open")
        return stream

    def _closed(self, user_id: UUID, stream: EventStream) -> None:
        streams = self._streams.get(user_id)
        if streams is not None:
            streams.pop(stream, None)
            if not streams:
                del self._streams[user_id]

    def listeners(self) -> int:
        return sum(len(streams) for streams in self._streams.values())

    # --- events ---------------------------------------------------------------------------

    def publish(self, user_id: UUID, playbook_id: str) -> None:
        if user_id not in self._streams:
            return
        self._pending.setdefault(user_id, set()).add(playbook_id)
        if self._flush_call is None or not self._flush_call.active():
            self._flush_call = self.reactor.callLater(COALESCE_SECONDS, self._flush)

    def playbook_changed(self, old: Playbook | None, new: Playbook | None) -> None:
        """The playbook cache's listener: any change, from any instance."""
        playbook = new or old
        if playbook is not None:
            self.publish(playbook.user_id, playbook.id)

    def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        for user_id, playbook_ids in pending.items():
            for stream in list(self._streams.get(user_id, ())):
                for playbook_id in sorted(playbook_ids):
                    data = json.dumps({"playbook": playbook_id}).encode()
                    stream.send(frame(data, event="changed"))

    def _check_sessions(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._check_all())

    async def _check_all(self) -> None:
        for streams in list(self._streams.values()):
            for stream, token in list(streams.items()):
                try:
                    valid = await self.still_valid(token)
                except Exception:
                    log.failure("checking a Studio stream's session")
                    continue
                if not valid:
                    stream.finish()
