"""Bytes for a connection or a pipe written at once, when nothing can be overtaken.

Twisted's ``transport.write`` only buffers: it registers the socket with epoll for writing
and sends on the reactor's next turn, then unregisters it. For a small response to a socket
that has room, that is two ``epoll_ctl(2)`` calls and a reactor dispatch around the one
``send(2)`` that does the work (about 6 % of a proxied ``tools/call``'s CPU, bench ``mcp``;
a fan-out pays it on every stream). Sending at once is safe only on a plain TCP or unix socket
(TLS frames its own records) whose transport holds nothing unsent (what we send would
overtake it) and is not closing; what the socket does not take goes to Twisted's buffer,
behind which everything later queues as before.

A stdio server's stdin pipe is the same case, and dearer: Twisted's writer of a pipe also stops
and restarts watching it for the child's end, four ``epoll_ctl(2)`` calls around each
request's ``write(2)`` when calls come one at a time.
"""

from __future__ import annotations

import os
from typing import Any


def plain_socket(transport: Any) -> bool:
    """Whether ``transport`` is a TCP or unix transport that TLS does not wrap. The socket
    must be the transport's own attribute: a TLS listener's transport is a protocol wrapper
    (``TLSMemoryBIOProtocol``) that lends its socket, ``TLS`` flag and buffers from the TCP
    transport under it, and bytes sent on that socket would bypass the encryption. That
    cannot change later: ``startTLS`` is never called on a connection we serve."""
    return "socket" in vars(transport) and getattr(transport, "TLS", True) is False


def idle(transport: Any) -> bool:
    """Whether a plain ``transport`` has nothing waiting to be sent and is open."""
    return bool(transport.connected and not transport.disconnecting
                and not transport.dataBuffer and not transport._tempDataBuffer)


def send(transport: Any, data: bytes) -> None:
    """``data`` on a plain, idle ``transport``: what the socket takes now, the rest (or all,
    if the socket is full or broken, which Twisted then finds out) through its buffer."""
    try:
        sent = transport.socket.send(data)
    except OSError:
        sent = 0
    _rest_through_buffer(transport, data, sent)


def write(transport: Any, data: bytes) -> None:
    """``data`` on ``transport``: sent at once when that is safe, else as Twisted does."""
    if plain_socket(transport) and idle(transport):
        send(transport, data)
    else:
        transport.write(data)


def write_pipe(writer: Any, data: bytes) -> None:
    """``data`` on a pipe's Twisted writer (``process.ProcessWriter``): written at once when it
    is idle, the rest (all, if the pipe is full or the child gone) through its buffer."""
    if not idle(writer):
        writer.write(data)
        return
    try:
        written = os.write(writer.fd, data)
    except OSError:
        written = 0
    _rest_through_buffer(writer, data, written)


def _rest_through_buffer(writer: Any, data: bytes, done: int) -> None:
    """What the kernel did not take of ``data`` (``done`` bytes of it), to Twisted's buffer,
    which sends it when there is room or finds out that the other end is gone."""
    if done < len(data):
        writer.write(data[done:] if done else data)
