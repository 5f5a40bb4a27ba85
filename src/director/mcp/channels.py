"""The two ways a downstream session's messages travel to its client.

* ``CallChannel`` — the answer to one POST. It stays plain ``application/json`` unless
  something must be sent before the result (progress, a log line, a sampling request), in
  which case it turns into an SSE stream on the fly (headers are not sent until then).
* ``SessionChannel`` — the GET stream (Streamable HTTP) or the one stream of the legacy
  HTTP+SSE transport — for notifications outside any request. With several instances it writes
  its events to the shared log or relays them to the instance holding the stream
  (``director.mcp.shared_sessions``).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Protocol

from director.mcp import jsonrpc
from director.mcp.jsonrpc import Message
from director.mcp.streams import (
    EventStream,
    ReplayBuffer,
    StreamRegistry,
    frame,
    json_bytes,
    response_bytes,
)
from director.request_end import when_done

if TYPE_CHECKING:
    from director.mcp.shared_sessions import SharedSessions

LIST_CHANGED = ("notifications/tools/list_changed", "notifications/prompts/list_changed",
                "notifications/resources/list_changed")


@functools.cache
def list_changed_encoded(methods: tuple[str, ...]) -> tuple[bytes, ...]:
    """``list_changed`` notifications as ``SessionChannel`` writes them: encoded once for a
    fan-out to every session (and for every later one: there are a handful of combinations)."""
    return tuple(json_bytes(jsonrpc.notification(method)) for method in methods)


class Channel(Protocol):
    @property
    def open(self) -> bool: ...

    def send(self, message: Message) -> None: ...


class CallChannel:
    """The answer to one POSTed request: JSON, or SSE once something precedes the result."""

    #: With tracing on, the span of the request this channel answers (the parent of what the
    #: upstream asks the client meanwhile, which arrives in no request's context).
    trace_span: Any = None

    def __init__(self, request: Any, streams: StreamRegistry) -> None:
        self.request = request
        self.streams = streams
        self.stream: EventStream | None = None
        self.open = True
        when_done(request, self._gone)

    def _gone(self, _lost: bool) -> None:
        self.open = False

    def send(self, message: Message) -> None:
        if not self.open:
            return
        if self.stream is None:
            self.request.setResponseCode(200)
            self.stream = EventStream(self.request, self.streams)
        self.stream.send(frame(json_bytes(message)))

    def finish(self, response: Message) -> None:
        if not self.open:
            return
        self.open = False
        if self.stream is not None:
            self.stream.send(frame(response_bytes(response)))
            self.stream.finish()
            return
        body = response_bytes(response)
        self.request.setResponseCode(200)
        self.request.setHeader(b"content-type", b"application/json")
        # A known length: the response is whole with this write, which sends it at once
        # (``DirectorRequest.write``), with no chunk framing to end.
        self.request.setHeader(b"content-length", b"%d" % len(body))
        self.request.write(body)
        self.request.finish()


class SessionChannel:
    """The session's notifications: its GET stream, remembered for ``Last-Event-ID`` (here,
    and in the shared event log when several instances serve the session: ``shared``)."""

    #: Set (with ``key``, the session's hash) for a streamable session shared by instances.
    shared: SharedSessions | None = None
    key = b""
    #: This instance held the session's GET stream last (it keeps what the client misses).
    last_holder = False
    #: Another instance opened the session's GET stream since (what is sent here is relayed).
    held_elsewhere = False

    def __init__(self, session_id: str, tag: str = "") -> None:
        self.replay = ReplayBuffer(session_id[:8] + tag)
        self.stream: EventStream | None = None

    @property
    def open(self) -> bool:
        return self.stream is not None and self.stream.open

    def send(self, message: Message) -> None:
        self.send_encoded((response_bytes(message) if jsonrpc.is_response(message)
                           else json_bytes(message),))

    def send_encoded(self, encoded: tuple[bytes, ...], derived: bool = False) -> None:
        """``send`` of messages already encoded (``json_bytes``), in one write to the stream
        (a playbook change's notifications: one system call a stream, not one an event).
        ``derived``: every instance produces them by itself (a playbook change), so only one
        with the stream sends them."""
        replay, shared, stream = self.replay, self.shared, self.stream
        streaming = stream is not None and stream.open
        chunks = []
        for data in encoded:
            chunks.append(replay.record(data))
            if shared is not None:
                self._log(shared, replay.last_id, data, streaming, derived)
        if streaming:
            assert stream is not None
            stream.send(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _log(self, shared: SharedSessions, event_id: str, data: bytes, streaming: bool,
             derived: bool) -> None:
        if streaming:  # logged at once: the stream may be dead already, unseen
            shared.events.append(self.key, event_id, data, False)
        elif not derived:  # the stream is elsewhere, or nowhere yet
            shared.events.append(self.key, event_id, data, True)
        elif self.last_holder:  # every instance has it: one keeps it
            shared.events.append(self.key, event_id, data, False)

    def write_relayed(self, event_id: str, data: bytes) -> None:
        """An event another instance produced for this stream (already in the event log)."""
        chunk = frame(data, event_id)
        self.replay.keep(event_id, chunk)
        if self.stream is not None:
            self.stream.send(chunk)
