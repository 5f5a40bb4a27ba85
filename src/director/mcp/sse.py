"""An incremental parser for ``text/event-stream`` (the WHATWG "server-sent events" framing).

Feed it the bytes of a response body as they arrive; it returns the complete events so far.
Lines may end in CRLF, LF or CR (also split across chunks), ``:`` lines are comments
(keep-alives), ``id`` persists across events (the ``Last-Event-ID`` to resume with) and
``retry`` sets the reconnection delay. Memory is bounded: an event (or a line) larger than
``max_event_size`` raises ``EventTooLarge`` instead of being buffered.
"""

from __future__ import annotations

import re

import attrs

DEFAULT_MAX_EVENT_SIZE = 16 * 1024 * 1024
_LINE_END = re.compile(rb"\r\n|\r|\n")


class EventTooLarge(ValueError):
    """An event exceeded the parser's size limit; the stream cannot be trusted any further."""


@attrs.frozen
class Event:
    event: str
    data: str
    #: The stream's last event id when this event was dispatched ("" if none was ever set).
    id: str


class SseParser:
    def __init__(self, max_event_size: int = DEFAULT_MAX_EVENT_SIZE) -> None:
        self.max_event_size = max_event_size
        self.last_event_id = ""
        #: Reconnection delay in milliseconds, if the server set one.
        self.retry: int | None = None
        self._buffer = bytearray()
        self._skip_lf = False
        self._first = True
        self._event_type = ""
        self._data: list[str] = []
        self._size = 0

    def feed(self, chunk: bytes) -> list[Event]:
        if self._skip_lf and chunk:
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
            self._skip_lf = False
        buffer = self._buffer
        # Only the new bytes can hold a line end: earlier ones were searched already.
        position, scan = 0, len(buffer)
        buffer += chunk
        events: list[Event] = []
        while True:
            match = _LINE_END.search(buffer, scan)
            if match is None:
                break
            line = bytes(buffer[position:match.start()])
            position = scan = match.end()
            if match.group() == b"\r" and position == len(buffer):
                self._skip_lf = True  # a CRLF split between two chunks
            self._line(line, events)
        del buffer[:position]
        if len(buffer) + self._size > self.max_event_size:
            raise EventTooLarge(f"event larger than {self.max_event_size} bytes")
        return events

    def _line(self, raw: bytes, events: list[Event]) -> None:
        if self._first:
            self._first = False
            if raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
        if not raw:
            self._dispatch(events)
            return
        if raw[:1] == b":":
            return
        line = raw.decode("utf-8", errors="replace")
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._size += len(raw) + 1
            if self._size > self.max_event_size:
                raise EventTooLarge(f"event larger than {self.max_event_size} bytes")
            self._data.append(value)
        elif field == "event":
            self._event_type = value
        elif field == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif field == "retry" and value.isascii() and value.isdigit() and len(value) <= 18:
            self.retry = int(value)

    def _dispatch(self, events: list[Event]) -> None:
        data, event_type = self._data, self._event_type
        self._data, self._event_type, self._size = [], "", 0
        if not data:
            return
        events.append(Event(event_type or "message", "\n".join(data), self.last_event_id))
