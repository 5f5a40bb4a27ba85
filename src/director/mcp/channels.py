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

if TYPE_CHECKING:
    from director.mcp.shared_sessions import SharedSessions

LIST_CHANGED = ("notifications/tools/list_changed", "notifications/prompts/list_changed",
                "notifications/resources/list_changed")
#: Each as ``SessionChannel`` writes it, encoded once for a fan-out to every session.
LIST_CHANGED_ENCODED = {method: json_bytes(jsonrpc.notification(method))
                        for method in LIST_CHANGED}


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
        request.notifyFinish().addBoth(self._gone)

    def _gone(self, _: object) -> None:
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
        self.request.setResponseCode(200)
        self.request.setHeader(b"content-type", b"application/json")
        self.request.write(response_bytes(response))
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
        self.send_encoded(response_bytes(message) if jsonrpc.is_response(message)
                          else json_bytes(message))

    def send_encoded(self, data: bytes, derived: bool = False) -> None:
        """``send`` of a message already encoded (``json_bytes``). ``derived``: every instance
        produces it by itself (a playbook change), so only one with the stream sends it."""
        chunk = self.replay.record(data)
        shared = self.shared
        if self.stream is not None and self.stream.open:
            self.stream.send(chunk)
            if shared is not None:  # logged at once: the stream may be dead already, unseen
                shared.events.append(self.key, self.replay.last_id, data, False)
        elif shared is not None and not derived:  # the stream is elsewhere, or nowhere yet
            shared.events.append(self.key, self.replay.last_id, data, True)
        elif shared is not None and self.last_holder:  # every instance has it: one keeps it
            shared.events.append(self.key, self.replay.last_id, data, False)

    def write_relayed(self, event_id: str, data: bytes) -> None:
        """An event another instance produced for this stream (already in the event log)."""
        chunk = frame(data, event_id)
        self.replay.keep(event_id, chunk)
        if self.stream is not None:
            self.stream.send(chunk)
