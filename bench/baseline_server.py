"""The baseline: a minimal plain twisted.web server answering ``/api/health`` with a static 200.

No database, no Klein, no edge policy, no logging: the floor that Twisted's HTTP server sets on
this machine, run with the same interpreter and reactor as the daemon, and loaded the same way.
Run as ``python -m bench.baseline_server --port N`` (127.0.0.1 only).

For the stream figures it also holds raw server-sent-event streams: ``GET /sse`` opens one (a
comment is written at once and the response never finishes), and ``POST /fanout`` writes one
``notifications/prompts/list_changed`` event to every open stream before answering: what
holding and notifying streams costs Twisted itself, with no session behind them.
"""

from __future__ import annotations

import argparse
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.web import http, resource, server

reactor: Any = _reactor

BODY = b'{"status": "ok"}'
EVENT = (b'event: message\ndata: {"jsonrpc":"2.0",'
         b'"method":"notifications/prompts/list_changed"}\n\n')


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
        if request.path != b"/fanout":
            request.setResponseCode(404)
            return b""
        for stream in list(self.streams):
            stream.write(EVENT)
        return b"%d" % len(self.streams)

    def _stream(self, request: server.Request) -> int:
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.write(b": stream open\n\n")
        self.streams.add(request)
        request.notifyFinish().addBoth(lambda _: self.streams.discard(request))
        return server.NOT_DONE_YET


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
