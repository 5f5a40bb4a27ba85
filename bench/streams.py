"""Many idle MCP sessions with an open GET stream, held by one process; when a notification
reached each of them, by the kernel's clock.

``python -m bench.streams --port N --playbook ID --key K --sessions S`` opens ``S`` sessions
on 127.0.0.1, each on its own connection (``initialize``, ``notifications/initialized``, then
``GET`` with the session id: the stream stays open), at most ``--parallel`` being set up at a
time, and prints ``{"ready": …}``. With ``--plain-sse PATH`` it opens plain ``GET PATH``
streams instead (the twisted.web baseline's). A stream counts as open at its first body bytes.

Then it obeys one command per stdin line, answering one JSON line each:

* ``mark`` — start counting notifications afresh;
* ``wait SECONDS`` — wait until every open stream has received a ``…/list_changed`` since the
  mark (or the time is up) and report how many did, and when the first and the last did;
* ``ended SECONDS`` — wait until every stream open at the mark has been ended by the server
  (its last chunk, or the connection closed) and report how many were, and when the first and
  the last were;
* ``quit`` — close everything and exit (end of input does the same).

The times are ``CLOCK_REALTIME`` nanoseconds stamped by the kernel when the data reached the
socket (``SO_TIMESTAMPNS``), so that this process's own work on 10,000 sockets does not count
as the server's delay; the caller compares them with ``time.time_ns()`` taken just before it
triggered the change. When the kernel gives no stamp, the time of reading stands in.

With ``--listen-dsn URL`` it also LISTENs on Director's change channel and reports when the
first notification after the mark arrived (``notify_ns``): the moment the change committed, as
every instance's LISTEN connection sees it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import select
import selectors
import socket
import struct
import subprocess
import sys
import time
from typing import Any

import psycopg2

from bench.loadgen import HOST, ProtocolError, take_message
from bench.mcpload import INITIALIZED, initialize_message, post, session_id
from bench.reaper import Reaper, spawn, stop_process
from bench.servers import REPOSITORY, python_module

_SO_TIMESTAMPNS = 35  # Linux: SO_TIMESTAMPNS_OLD, also the SCM type of its control message
_STAMP_SPACE = socket.CMSG_SPACE(16)
_NEEDLE = b"list_changed"
_LAST_CHUNK = b"0\r\n\r\n"  # what ends a chunked response (the stream's end)
_READ_SIZE = 65536
_CHANGES_CHANNEL = "director_changes"
_NOTIFICATIONS = object()  # the selector's tag for the LISTEN connection


class Stream:
    """One connection: set-up stages, then an open stream counting notifications."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.stage = "connecting"
        self.buffer = bytearray()
        self.session: str | None = None
        self.tail = b""  # the end of the previous read: a needle split across two reads
        self.seen_epoch = -1
        self.received = 0


class Holder:
    def __init__(self, port: int, playbook: str, key: str, plain_path: str | None) -> None:
        self.port, self.key = port, key
        self.path = f"/playbooks/{playbook}/mcp"
        self.plain_path = plain_path
        self.selector = selectors.DefaultSelector()
        self.setting_up = 0
        self.open: list[Stream] = []
        self.failures = 0
        self.closed_while_open = 0
        self.first_error: str | None = None
        self.epoch = 0
        self.arrived = 0
        self.first_ns: int | None = None
        self.last_ns: int | None = None
        self.last_read_ns: int | None = None
        self.unstamped = 0
        self.opened_at: list[float] = []
        self.listener: Any = None
        self.notify_ns: int | None = None
        self.ended = 0
        self.first_end_ns: int | None = None
        self.last_end_ns: int | None = None

    def listen(self, dsn: str) -> None:
        self.listener = psycopg2.connect(dsn)
        self.listener.autocommit = True
        with self.listener.cursor() as cursor:
            cursor.execute(f'LISTEN "{_CHANGES_CHANNEL}"')
        self.selector.register(self.listener.fileno(), selectors.EVENT_READ, _NOTIFICATIONS)

    def _notified(self) -> None:
        now = time.time_ns()
        self.listener.poll()
        if self.listener.notifies and self.notify_ns is None:
            self.notify_ns = now
        self.listener.notifies.clear()

    # --- set-up -------------------------------------------------------------------------

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        stream = Stream(sock)
        with contextlib.suppress(BlockingIOError):
            sock.connect((HOST, self.port))
        self.selector.register(sock, selectors.EVENT_WRITE, stream)
        self.setting_up += 1

    def _fail(self, stream: Stream, why: str) -> None:
        self.failures += 1
        if self.first_error is None:
            self.first_error = why[:300]
        self._drop(stream)
        self.setting_up -= 1

    def _drop(self, stream: Stream) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(stream.sock)
        stream.sock.close()

    def _send(self, stream: Stream, data: bytes) -> None:
        stream.sock.sendall(data)  # small requests on loopback: the buffer is never full

    def _connected(self, stream: Stream) -> None:
        error = stream.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._fail(stream, f"connect: {os.strerror(error)}")
            return
        self.selector.modify(stream.sock, selectors.EVENT_READ, stream)
        if self.plain_path is not None:
            stream.stage = "get"
            self._send(stream, f"GET {self.plain_path} HTTP/1.1\r\nHost: {HOST}:{self.port}"
                               "\r\naccept: text/event-stream\r\n\r\n".encode())
        else:
            stream.stage = "initialize"
            self._send(stream, post(self.port, self.path, self.key, initialize_message()))

    def _setup_read(self, stream: Stream, data: bytes) -> None:
        stream.buffer += data
        if stream.stage == "get":
            head_end = stream.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            status = int(stream.buffer[9:12])
            if status != 200:
                self._fail(stream, f"GET stream: {bytes(stream.buffer[:300])!r}")
                return
            if len(stream.buffer) <= head_end + 4:
                return  # the headers alone; the stream counts as open at its first bytes
            stream.stage = "open"
            stream.buffer = bytearray()
            self.setting_up -= 1
            self.open.append(stream)
            self.opened_at.append(time.monotonic())
            return
        while (message := take_message(stream.buffer)) is not None:
            status, head, body = message
            if stream.stage == "initialize":
                stream.session = session_id(head)
                if status != 200 or stream.session is None:
                    self._fail(stream, f"initialize: {status} {body[:200]!r}")
                    return
                stream.stage = "initialized"
                self._send(stream, post(self.port, self.path, self.key, INITIALIZED,
                                        stream.session))
            elif stream.stage == "initialized":
                if status != 202:
                    self._fail(stream, f"initialized: {status} {body[:200]!r}")
                    return
                stream.stage = "get"
                self._send(stream, (
                    f"GET {self.path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
                    f"accept: text/event-stream\r\nx-api-key: {self.key}\r\n"
                    f"mcp-session-id: {stream.session}\r\n\r\n").encode())
                if stream.buffer:
                    self._setup_read(stream, b"")
                return

    def open_all(self, count: int, parallel: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        started = 0
        while len(self.open) + self.failures < count:
            while started < count and self.setting_up < parallel:
                self._connect()
                started += 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.open)} of {count} streams open after "
                                   f"{timeout:.0f} s")
            self._poll(0.5)

    # --- events -------------------------------------------------------------------------

    def _poll(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            stream = key.data
            if stream is None:
                continue
            if stream is _NOTIFICATIONS:
                self._notified()
                continue
            if stream.stage == "connecting":
                self._connected(stream)
                continue
            try:
                data, ancillary, _, _ = stream.sock.recvmsg(_READ_SIZE, _STAMP_SPACE)
            except (BlockingIOError, InterruptedError):
                continue
            except ConnectionError as error:
                data, ancillary = b"", []
                if self.first_error is None:
                    self.first_error = str(error)
            if not data:
                if stream.stage == "open":
                    self.closed_while_open += 1
                    self._ended(stream, time.time_ns())
                else:
                    self._fail(stream, f"closed during {stream.stage}")
                continue
            if stream.stage == "open":
                self._stream_read(stream, data, ancillary)
            else:
                self._setup_read(stream, data)

    def _stream_read(self, stream: Stream, data: bytes, ancillary: list[Any]) -> None:
        window = stream.tail + data
        stream.tail = window[-(len(_NEEDLE) - 1):]
        if _ends_chunked_body(window):
            self._ended(stream, self._stamp(ancillary, time.time_ns()))
            return
        found = window.count(_NEEDLE)
        if not found:
            return
        stream.received += found
        if stream.seen_epoch == self.epoch:
            return
        stream.seen_epoch = self.epoch
        now = time.time_ns()
        stamp = self._stamp(ancillary, now)
        self.arrived += 1
        self.first_ns = stamp if self.first_ns is None else min(self.first_ns, stamp)
        self.last_ns = stamp if self.last_ns is None else max(self.last_ns, stamp)
        self.last_read_ns = now

    def _stamp(self, ancillary: list[Any], now: int) -> int:
        """The kernel's receive time of the data read with ``ancillary`` (else ``now``)."""
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(value) >= 16:
                seconds, nanoseconds = struct.unpack("qq", value[:16])
                return int(seconds * 1_000_000_000 + nanoseconds)
        self.unstamped += 1
        return now

    def _ended(self, stream: Stream, stamp: int) -> None:
        """The server ended an open stream (at ``stamp``): it is open no more."""
        self.ended += 1
        self.first_end_ns = stamp if self.first_end_ns is None else min(self.first_end_ns, stamp)
        self.last_end_ns = stamp if self.last_end_ns is None else max(self.last_end_ns, stamp)
        self.open.remove(stream)
        self._drop(stream)

    # --- commands -----------------------------------------------------------------------

    def mark(self) -> dict[str, Any]:
        self.epoch += 1
        self.arrived = 0
        self.first_ns = self.last_ns = self.last_read_ns = self.notify_ns = None
        self.unstamped = 0
        self.ended = 0
        self.first_end_ns = self.last_end_ns = None
        return {"marked": self.epoch, "open": len(self.open)}

    def wait(self, seconds: float) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        while self.arrived < len(self.open) and time.monotonic() < deadline:
            self._poll(min(0.05, max(0.0, deadline - time.monotonic())))
        if self.listener is not None and self.notify_ns is None:
            self._poll(0.05)  # our LISTEN connection may simply be a little behind
        return {"received": self.arrived, "open": len(self.open), "first_ns": self.first_ns,
                "last_ns": self.last_ns, "last_read_ns": self.last_read_ns,
                "notify_ns": self.notify_ns,
                "unstamped": self.unstamped, "closed_while_open": self.closed_while_open}

    def wait_ended(self, seconds: float) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        while self.open and time.monotonic() < deadline:
            self._poll(min(0.05, max(0.0, deadline - time.monotonic())))
        if self.listener is not None and self.notify_ns is None:
            self._poll(0.05)
        return {"ended": self.ended, "open": len(self.open), "first_ns": self.first_end_ns,
                "last_ns": self.last_end_ns, "notify_ns": self.notify_ns,
                "unstamped": self.unstamped}

    def serve(self) -> None:
        """Commands from stdin, streams kept read meanwhile (heartbeats, notifications)."""
        commands = sys.stdin.fileno()  # read with os.read: no buffering to hide lines
        os.set_blocking(commands, False)
        self.selector.register(commands, selectors.EVENT_READ, None)
        pending = b""
        while True:
            self._poll(1.0)
            try:
                chunk = os.read(commands, 4096)
            except BlockingIOError:
                continue
            if not chunk:
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                words = line.decode().split()
                if not words:
                    continue
                if words[0] == "quit":
                    return
                if words[0] == "mark":
                    answer = self.mark()
                elif words[0] == "wait":
                    answer = self.wait(float(words[1]) if len(words) > 1 else 5.0)
                elif words[0] == "ended":
                    answer = self.wait_ended(float(words[1]) if len(words) > 1 else 5.0)
                else:
                    answer = {"error": f"unknown command {words[0]!r}"}
                print(json.dumps(answer), flush=True)

    def close(self) -> None:
        for stream in list(self.open):
            self._drop(stream)
        self.selector.close()


def _ends_chunked_body(window: bytes) -> bool:
    """Whether the latest bytes of a chunked body end with its last chunk: ``0`` then an empty
    line, at the start of a line (the previous chunk ended with CRLF, or there was none)."""
    if not window.endswith(_LAST_CHUNK):
        return False
    return len(window) == len(_LAST_CHUNK) or window[-len(_LAST_CHUNK) - 1:-len(_LAST_CHUNK)] == b"\n"


def open_rates(opened_at: list[float], started: float) -> dict[str, float] | None:
    """Streams opened per second over the first and the last tenth of the set-up."""
    if len(opened_at) < 20:
        return None
    tenth = len(opened_at) // 10
    first = tenth / max(opened_at[tenth - 1] - started, 1e-9)
    last = tenth / max(opened_at[-1] - opened_at[-tenth - 1], 1e-9)
    return {"first_tenth_per_s": first, "last_tenth_per_s": last}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--playbook", default="")
    parser.add_argument("--key", default="")
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=64, help="set-ups in progress at once")
    parser.add_argument("--timeout", type=float, default=120.0, help="to open them all")
    parser.add_argument("--plain-sse", metavar="PATH", help="plain GET streams on PATH")
    parser.add_argument("--listen-dsn", metavar="URL", help="LISTEN for Director's changes")
    arguments = parser.parse_args()
    if not (1 <= arguments.sessions <= 19_000 and 1 <= arguments.parallel <= 1024):
        parser.error("out of bounds: 1-19,000 sessions (the fd limit), 1-1024 in parallel")
    if arguments.plain_sse is None and not (arguments.playbook and arguments.key):
        parser.error("--playbook and --key are needed (or --plain-sse)")
    gc.disable()
    holder = Holder(arguments.port, arguments.playbook, arguments.key, arguments.plain_sse)
    started = time.monotonic()
    try:
        holder.open_all(arguments.sessions, arguments.parallel, arguments.timeout)
    except (OSError, ProtocolError, TimeoutError) as error:
        print(json.dumps({"error": str(error), "open": len(holder.open),
                          "failures": holder.failures, "first_error": holder.first_error}),
              flush=True)
        return 1
    print(json.dumps({"ready": len(holder.open), "failures": holder.failures,
                      "first_error": holder.first_error,
                      "open_seconds": time.monotonic() - started,
                      "open_rate": open_rates(holder.opened_at, started)}), flush=True)
    if arguments.listen_dsn:
        holder.listen(arguments.listen_dsn)
    try:
        holder.serve()
    finally:
        holder.close()
        if holder.listener is not None:
            holder.listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --- the caller's side -------------------------------------------------------------------------


class StreamHolder:
    """This module run as its own process, driven through its stdin by the bench."""

    def __init__(self, reaper: Reaper, arguments: list[str], timeout: float) -> None:
        self._pending = b""
        self.process = spawn(python_module("bench.streams", *arguments),
                             output=subprocess.PIPE, cwd=REPOSITORY, stdin=subprocess.PIPE)
        self._stop = reaper.push(f"stop the stream holder (pid {self.process.pid})",
                                 lambda: stop_process(self.process, grace=5.0))
        self.ready = self._read(timeout)
        if "ready" not in self.ready:
            self.stop()
            raise RuntimeError(f"the stream holder could not open its streams: {self.ready}")

    def _read(self, timeout: float) -> dict[str, Any]:
        """The next JSON line it prints (stray lines, e.g. a warning, are skipped)."""
        assert self.process.stdout is not None
        descriptor = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._pending:
                line, self._pending = self._pending.split(b"\n", 1)
                with contextlib.suppress(ValueError):
                    return dict(json.loads(line))
            ready, _, _ = select.select([descriptor], [], [],
                                        max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"the stream holder did not answer within {timeout:.0f} s")
            chunk = os.read(descriptor, 65536)
            if not chunk:
                raise RuntimeError(f"the stream holder exited with status {self.process.wait()}"
                                   f": {self._pending[-500:].decode(errors='replace')}")
            self._pending += chunk

    def command(self, line: str, timeout: float = 60.0) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()
        return self._read(timeout)

    def stop(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.write(b"quit\n")
                self.process.stdin.close()
        self._stop()


def start_holder(reaper: Reaper, arguments: list[str], timeout: float = 180.0) -> StreamHolder:
    """Start ``python -m bench.streams ARGUMENTS…``; returns once its streams are open."""
    return StreamHolder(reaper, arguments, timeout)
