"""Server-sent-event streams to MCP clients: framing, heartbeats, back-pressure, replay.

One ``EventStream`` wraps one open HTTP response. It writes ``id:``/``event:``/``data:``
frames, remembers the last events (for a client that reconnects with ``Last-Event-ID``),
and registers as the transport's push producer: when the client stops reading and the kernel
buffer fills, Twisted pauses us; events queue up to a bound, and a stream that stays paused
past ``STUCK_SECONDS`` (or overflows) is disconnected rather than eating memory.

All streams of a process share one heartbeat loop (a ``: ping`` comment every
``HEARTBEAT_SECONDS``) instead of one timer each; that is what lets one process hold
tens of thousands of idle streams and notice dead peers behind proxies.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import task
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from director import direct_send, jsontext
from director.clock import repeating, stop_repeating
from director.jsontext import JsonTextError
from director.mcp.protocol import INTERNAL_ERROR
from director.mcp.slices import Slicer

log = Logger(namespace="mcp.streams")

HEARTBEAT_SECONDS = 15.0
STUCK_SECONDS = 30.0
MAX_QUEUED_EVENTS = 1000
REPLAY_EVENTS = 100


def frame(data: bytes, event_id: str | None = None, event: str | None = "message") -> bytes:
    if event_id is not None and event == "message" and b"\n" not in data:
        # The common case (every message on a session stream), in one formatting operation:
        # a fan-out frames one event per stream.
        return b"id: %b\nevent: message\ndata: %b\n\n" % (event_id.encode(), data)
    head = b""
    if event_id is not None:
        head += b"id: " + event_id.encode() + b"\n"
    if event is not None:
        head += b"event: " + event.encode() + b"\n"
    if b"\n" not in data:  # JSON as json_bytes writes it: one line
        return head + b"data: " + data + b"\n\n"
    body = b"".join(b"data: " + line + b"\n" for line in data.split(b"\n"))
    return head + body + b"\n"


def json_bytes(message: dict[str, Any]) -> bytes:
    """One message as compact UTF-8 JSON (``jsontext.dumps``: ``JsonTextError`` if it has no
    JSON form, which only a gateway bug can cause: what it relays was read by ``jsontext``)."""
    return jsontext.dumps(message)


def response_bytes(response: dict[str, Any]) -> bytes:
    """``json_bytes`` of a response to a client's request, which that request must get: if the
    answer cannot be encoded, an error response with the same id says so instead."""
    try:
        return jsontext.dumps(response)
    except JsonTextError as failure:
        log.warn("an answer could not be encoded as JSON: {error}", error=str(failure))
        request_id = response.get("id")
        return jsontext.dumps({"jsonrpc": "2.0",
                               "id": request_id if isinstance(request_id, str | int) else None,
                               "error": {"code": INTERNAL_ERROR, "message": (
                                   f"the answer could not be encoded as JSON: {failure}")}})


@implementer(IPushProducer)
class EventStream:
    """One open ``text/event-stream`` response."""

    def __init__(self, request: Any, registry: StreamRegistry,
                 on_close: Callable[[EventStream], object] | None = None) -> None:
        self.request = request
        self.registry = registry
        self.on_close = on_close
        self.open = True
        self.paused_since: float | None = None
        # Created when first needed: an empty deque is ~600 bytes, and most streams never
        # fall behind.
        self._queue: deque[bytes] | None = None
        #: The plain TCP transport under a chunked response, once seen (``_raw_transport``).
        self._socket_transport: Any = None
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache, no-transform")
        request.setHeader(b"x-accel-buffering", b"no")  # nginx: do not buffer this response
        request.registerProducer(self, True)
        request.notifyFinish().addBoth(self._finished)
        registry.add(self)

    # --- writing ------------------------------------------------------------------------

    def send(self, chunk: bytes) -> None:
        if not self.open:
            return
        if self.paused_since is not None:
            if self._queue is None:
                self._queue = deque()
            elif len(self._queue) >= MAX_QUEUED_EVENTS:
                log.warn("closing a stream whose reader fell {count} events behind",
                         count=len(self._queue))
                self.abort()
                return
            self._queue.append(chunk)
            return
        self._write(chunk)

    def _write(self, chunk: bytes) -> None:
        """``chunk`` on the response: straight to the socket when that is safe
        (``director.direct_send``), else through ``Request.write``. A fan-out writes one
        event to thousands of idle streams at once; Twisted's path costs three system calls
        and ~15 µs a stream here, one ``send(2)`` a third of that (bench ``mcp``: the raw
        floor). Besides the socket's own conditions: headers already sent and chunked
        HTTP/1.1, so that we frame the chunk as Twisted would."""
        transport = self._socket_transport
        if transport is None or not direct_send.idle(transport):
            transport = self._raw_transport()
            if transport is None:
                self.request.write(chunk)
                return
        self.request.sentLength += len(chunk)
        direct_send.send(transport, b"%x\r\n%b\r\n" % (len(chunk), chunk))

    def _raw_transport(self) -> Any:
        """The TCP transport this stream may write to directly now, or None (``_write``)."""
        transport = self._socket_transport
        if transport is None:
            request = self.request
            if not (request.startedWriting and request.chunked) or request.finished:
                return None
            transport = getattr(request.channel, "transport", None)
            if not direct_send.plain_socket(transport):
                return None
            self._socket_transport = transport  # what was checked above cannot change
        return transport if direct_send.idle(transport) else None

    def comment(self, text: bytes = b"ping") -> None:
        self.send(b": " + text + b"\n\n")

    def finish(self) -> None:
        if not self.open:
            return
        self.open = False
        self.registry.discard(self)
        self.request.unregisterProducer()
        self.request.finish()
        self._closed()

    def abort(self) -> None:
        if not self.open:
            return
        transport = getattr(self.request.channel, "transport", None)
        if transport is not None:
            transport.abortConnection()

    # --- IPushProducer ------------------------------------------------------------------

    def pauseProducing(self) -> None:
        if self.paused_since is None:
            self.paused_since = self.registry.clock.seconds()

    def resumeProducing(self) -> None:
        self.paused_since = None
        queue = self._queue
        while queue and self.paused_since is None and self.open:
            self._write(queue.popleft())

    def stopProducing(self) -> None:
        # The connection is gone. Twisted says so here first, before the request's
        # notifyFinish fires: this is the stream's end (its on_close must run: it ends a legacy
        # SSE session, releases a modern listener), not a pause.
        self._finished(None)

    # --- lifecycle ----------------------------------------------------------------------

    def _finished(self, _: object) -> None:
        was_open = self.open
        self.open = False
        self.registry.discard(self)
        self._queue = None
        if was_open:
            self._closed()

    def _closed(self) -> None:
        if self.on_close is not None:
            callback, self.on_close = self.on_close, None
            try:
                callback(self)
            except Exception:
                log.failure("stream close handler failed")


class StreamRegistry:
    """Every open stream of this process, for heartbeats, stuck-reader checks and shutdown."""

    def __init__(self, clock: Any) -> None:
        self._streams: set[EventStream] = set()
        self._loop: task.LoopingCall | None = None
        #: Of the heartbeats and of how long a reader is stuck (``director.mcp.clock``).
        self.clock = clock
        #: What writes to every stream (heartbeats, a playbook change's notifications).
        self.slicer = Slicer(clock)

    def __len__(self) -> int:
        return len(self._streams)

    def add(self, stream: EventStream) -> None:
        self._streams.add(stream)

    def discard(self, stream: EventStream) -> None:
        self._streams.discard(stream)

    def start(self) -> None:
        self._loop = repeating(self.clock, HEARTBEAT_SECONDS, self.beat)

    def stop(self) -> None:
        stop_repeating(self._loop)

    def beat(self) -> None:
        self.slicer.run(list(self._streams), self._beat_one)

    def _beat_one(self, stream: EventStream) -> None:
        if not stream.open:  # ended while the beat went through the others
            return
        now = self.clock.seconds()
        if stream.paused_since is not None and now - stream.paused_since > STUCK_SECONDS:
            log.info("disconnecting a stream whose reader has not read for {seconds:.0f} s",
                     seconds=now - stream.paused_since)
            stream.abort()
        else:
            stream.comment()

    def close_all(self) -> None:
        for stream in list(self._streams):
            stream.finish()


class ReplayBuffer:
    """The last events of a session's GET stream, for ``Last-Event-ID`` resumption (on this
    instance; ``director.mcp.event_log`` serves it on the others)."""

    def __init__(self, prefix: str, size: int = REPLAY_EVENTS) -> None:
        self.prefix = prefix
        self._counter = 0
        self._kept = 0
        self._size = size
        # Created at the first event: most sessions never get one (an empty deque is ~600 B).
        self._events: deque[tuple[str, bytes]] | None = None
        #: The id of the last event ``record`` framed.
        self.last_id = ""

    def record(self, data: bytes) -> bytes:
        """The framed event (with a fresh id, ``last_id``), remembered for replay."""
        self._counter += 1
        self.last_id = f"{self.prefix}-{self._counter}"
        chunk = frame(data, self.last_id)
        self.keep(self.last_id, chunk)
        return chunk

    def keep(self, event_id: str, chunk: bytes) -> None:
        """Remember an event framed elsewhere (another instance's, relayed here)."""
        if self._events is None:
            self._events = deque(maxlen=self._size)
        self._events.append((event_id, chunk))
        self._kept += 1

    def after(self, last_event_id: str) -> list[bytes] | None:
        """Events after ``last_event_id``; None if that id is not here (another instance's,
        already forgotten, or never one)."""
        events = self._events or ()
        for position, (event_id, _) in enumerate(events):
            if event_id == last_event_id:
                return [chunk for _, chunk in list(events)[position + 1:]]
        if last_event_id == f"{self.prefix}-0" and self._kept <= self._size:
            return [chunk for _, chunk in events]  # before the first: all, none dropped yet
        return None
