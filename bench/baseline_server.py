"""The baseline: a minimal plain twisted.web server answering ``/api/health`` with a static 200.

No database, no Klein, no edge policy, no logging: the floor that Twisted's HTTP server sets on
this machine, run with the same interpreter and reactor as the daemon, and loaded the same way.
Run as ``python -m bench.baseline_server --port N`` (127.0.0.1 only).
"""

from __future__ import annotations

import argparse
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.web import http, resource, server

reactor: Any = _reactor

BODY = b'{"status": "ok"}'


class Health(resource.Resource):
    """The whole site: 200 with a static JSON body on /api/health, 404 elsewhere."""

    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        if request.path != b"/api/health":
            request.setResponseCode(404)
            return b""
        request.setHeader(b"content-type", b"application/json")
        return BODY


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
