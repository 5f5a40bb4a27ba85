"""Messages for an MCP session held by another instance, carried by ``LISTEN/NOTIFY``.

Every instance listens on one channel, ``director_mcp``. A relayed message is one NOTIFY whose
payload is a line of header — ``<kind> <session hash, hex> <sending instance, hex> <extra>`` —
then, after a newline, the body when it fits (a NOTIFY carries at most 7,999 bytes), else
``#<id>`` of an ``mcp_relay`` row holding it. The kinds (``director.mcp.shared_sessions`` acts
on them):

* ``e`` — an event for the session's GET stream (extra: its event id), produced where the stream
  is not: the instance holding the stream writes it;
* ``m`` — a message POSTed to ``/message`` of a legacy ``/sse`` session: the instance holding
  the stream handles it as if posted there;
* ``a`` — a client's answer to a server→client request (sampling, elicitation, roots), or its
  ``notifications/cancelled``, for a request pending elsewhere;
* ``x`` — the session ended (extra: why): every instance drops its copy;
* ``g`` — the session's GET stream opened on the sending instance: any other finishes its own
  (the client gave up on it).

Each instance receives every message and ignores those for sessions it does not hold: with the
handful of instances a deployment runs, that is cheaper than tracking who holds what. A message
sent while the LISTEN connection of the holder is down is lost, like any NOTIFY; the client's
stream on that instance then ends soon anyway (the instance reloads, see ``director.db``).
"""

from __future__ import annotations

from collections.abc import Callable
from uuid import UUID

from twisted.internet import defer
from twisted.logger import Logger

from director.db.database import Database
from director.db.interactions import Interaction, Query

log = Logger(namespace="mcp.relay")

CHANNEL = "director_mcp"
#: PostgreSQL refuses payloads of 8,000 bytes or more; the header takes the rest.
MAX_INLINE = 7900

Handler = Callable[[bytes, str, bytes], object]


def payload_or_row(kind: str, session_hash: bytes, instance: UUID, extra: str,
                   body: bytes) -> Interaction[None]:
    """The NOTIFY of one message, its body in ``mcp_relay`` when too long (an interaction, so
    that it can share the transaction of what it announces: delivered at commit)."""
    header = f"{kind} {session_hash.hex()} {instance.hex} {extra}"
    if len(header) + 1 + len(body) <= MAX_INLINE and b"\0" not in body:
        text = header + "\n" + body.decode("utf-8", "replace")
    else:
        rows = yield Query("INSERT INTO mcp_relay (body) VALUES (%s) RETURNING id",
                           (body,))
        text = header + "\n#" + str(rows[0][0])
    yield Query("SELECT pg_notify(%s, %s)", (CHANNEL, text))


class Relay:
    """This instance's end of the channel: ``send`` to the others, ``on`` to act on theirs."""

    def __init__(self, database: Database, instance: UUID) -> None:
        self.database = database
        self.instance = instance
        self._handlers: dict[str, Handler] = {}

    def start(self) -> defer.Deferred[None]:
        return self.database.listen(CHANNEL, self._notified)

    def on(self, kind: str, handler: Handler) -> None:
        """``handler(session_hash, extra, body)`` for each message of ``kind`` from another
        instance."""
        self._handlers[kind] = handler

    def send(self, kind: str, session_hash: bytes, extra: str = "",
             body: bytes = b"") -> defer.Deferred[None]:
        return self.database.run(payload_or_row(kind, session_hash, self.instance, extra, body))

    def _notified(self, _channel: str, payload: str) -> None:
        header, _, body = payload.partition("\n")
        parts = header.split(" ", 3)
        if len(parts) < 3 or parts[2] == self.instance.hex:
            return
        handler = self._handlers.get(parts[0])
        if handler is None:
            return
        try:
            session_hash = bytes.fromhex(parts[1])
        except ValueError:
            return
        extra = parts[3] if len(parts) > 3 else ""
        if body.startswith("#") and body[1:].isdigit():
            fetching = self.database.runQuery("SELECT body FROM mcp_relay WHERE id = %s",
                                              (int(body[1:]),))
            fetching.addCallback(lambda rows: handler(session_hash, extra, bytes(rows[0][0]))
                                 if rows else None)
            fetching.addErrback(lambda failure: log.failure("a relayed message was lost",
                                                            failure))
            return
        handler(session_hash, extra, body.encode())

