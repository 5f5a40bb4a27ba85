"""The baseline: a minimal plain twisted.web server answering ``/api/health`` with a static 200.

No database, no Klein, no edge policy, no logging: the floor that Twisted's HTTP server sets on
this machine, run with the same interpreter and reactor as the daemon, and loaded the same way.
Run as ``python -m bench.baseline_server --port N`` (127.0.0.1 only).

For the stream figures it also holds raw server-sent-event streams: ``GET /sse`` opens one (a
comment is written at once and the response never finishes), and ``POST /fanout`` writes one
``notifications/prompts/list_changed`` event to every open stream before answering: what
holding and notifying streams costs Twisted itself, with no session behind them.
``POST /fanout-raw`` writes the same bytes (chunk framing included) with one ``send(2)`` per
socket at once, bypassing Twisted's buffered write path: the floor of a fan-out on this machine.

For the call figures it answers MCP itself on any path ending in ``/mcp``: the JSON body is
parsed, ``initialize`` gets a result and an ``Mcp-Session-Id``, a notification 202, and any
other request the result ``bench.echo_server`` would give to ``echo``. Loaded by
``bench.mcpload gateway`` like the daemon, it is what twisted.web alone costs per call, with
no upstream behind it: the floor under "gateway CPU per proxied tools/call".
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.web import http, resource, server

reactor: Any = _reactor

BODY = b'{"status": "ok"}'
EVENT = (b'event: message\ndata: {"jsonrpc":"2.0",'
         b'"method":"notifications/prompts/list_changed"}\n\n')
#: ``EVENT`` as ``Request.write`` frames it in a chunked HTTP/1.1 response.
CHUNKED_EVENT = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)


class Health(resource.Resource):
    """The whole site: 200 with a static JSON body on /api/health, 404 elsewhere."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.streams: set[server.Request] = set()

    def render_GET(self, request: server.Request) -> bytes | int:
        if request.path == b"/sse":
            return self._stream(request)
        if request.path != b"/api/health":
            request.setResponseCode(404)
            return b""
        request.setHeader(b"content-type", b"application/json")
        return BODY

    def render_POST(self, request: server.Request) -> bytes:
        if request.path.endswith(b"/mcp"):
            return answer_mcp(request)
        if request.path == b"/fanout":
            for stream in list(self.streams):
                stream.write(EVENT)
        elif request.path == b"/fanout-raw":
            for stream in list(self.streams):
                send_now(stream, CHUNKED_EVENT)
        else:
            request.setResponseCode(404)
            return b""
        return b"%d" % len(self.streams)

    def _stream(self, request: server.Request) -> int:
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.write(b": stream open\n\n")
        self.streams.add(request)
        request.notifyFinish().addBoth(lambda _: self.streams.discard(request))
        return server.NOT_DONE_YET


def answer_mcp(request: server.Request) -> bytes:
    """The least an MCP server on twisted.web does for a POST (see the module docstring)."""
    assert request.content is not None
    message = json.loads(request.content.read())
    if "id" not in message:
        request.setResponseCode(202)
        return b""
    if message.get("method") == "initialize":
        request.setHeader(b"mcp-session-id", b"baseline")
        result: dict[str, Any] = {"protocolVersion": message["params"]["protocolVersion"],
                                  "capabilities": {"tools": {}},
                                  "serverInfo": {"name": "baseline", "version": "1"}}
    else:
        text = message.get("params", {}).get("arguments", {}).get("text", "")
        result = {"content": [{"type": "text", "text": text}], "isError": False}
    request.setHeader(b"content-type", b"application/json")
    return json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result},
                      separators=(",", ":")).encode()


def send_now(stream: server.Request, data: bytes) -> None:
    """``data`` on the stream's socket with one ``send(2)`` now; through Twisted's buffer only
    when something is queued already (order) or the kernel took part of it."""
    transport: Any = stream.channel.transport if stream.channel is not None else None
    if transport is None:
        return
    if transport.dataBuffer or transport._tempDataBuffer:
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except BlockingIOError:
        sent = 0
    except OSError:
        return
    if sent < len(data):
        transport.write(data[sent:])


class QuietSite(server.Site):
    """No access log: the daemon under ``LOG_LEVEL=warn`` writes none either."""

    noisy = False

    def log(self, request: http.Request) -> None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    arguments = parser.parse_args()
    reactor.listenTCP(arguments.port, QuietSite(Health()), backlog=1024, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
