"""A response held open on a raw socket and read in the background: what the tests use to
watch server-sent-event streams (a GET stream, ``/sse``, ``subscriptions/listen``) as they come,
and to see the server end them."""

from __future__ import annotations

import json
import socket
import threading
from typing import Any


class RawStream:
    """``request`` sent on a fresh connection to 127.0.0.1:``port``; ``data`` grows as bytes
    arrive. It has ``ended`` when the server sent the last chunk or closed the connection."""

    def __init__(self, port: int, request: bytes, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.sendall(request)
        self.data = b""
        self.closed = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while chunk := self.sock.recv(65536):
                self.data += chunk
        except OSError:
            pass
        self.closed = True

    @property
    def body(self) -> bytes:
        return self.data.partition(b"\r\n\r\n")[2]

    @property
    def ended(self) -> bool:
        return self.closed or self.body.endswith(b"0\r\n\r\n")

    def messages(self) -> list[dict[str, Any]]:
        """The JSON-RPC messages received so far (each SSE ``data:`` line)."""
        return [json.loads(line[len(b"data: "):]) for line in self.body.splitlines()
                if line.startswith(b"data: ")]

    def close(self) -> None:
        self.sock.close()
