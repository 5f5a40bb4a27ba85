"""The Klein application: health, JSON errors for everything unrouted or failing.

Capability modules (accounts, playbooks, MCP) add their routes to the same ``Klein`` instance
through ``DirectorApp.app``; this module owns only what every response shares.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from klein import Klein
from twisted.web.resource import Resource
from twisted.web.server import Request

from director.web.errors import ApiError, install_error_handlers, write_error, write_json

#: Returns None when healthy, else the reason shown with 503.
HealthCheck = Callable[[], Awaitable[str | None]]


class DirectorApp:
    app = Klein()
    install_error_handlers(app)

    def __init__(self, health_check: HealthCheck, api_v1: Any, mcp: Any) -> None:
        self.health_check = health_check
        self.api_v1 = api_v1
        self.mcp = mcp

    @app.route("/playbooks/", branch=True)
    def mcp_routes(self, request: Request) -> Any:
        return self.mcp.resource()

    @app.route("/api/v1/", branch=True)
    def api_v1_routes(self, request: Request) -> Any:
        return self.api_v1.resource()

    @app.route("/api/health", methods=["GET", "HEAD"])
    async def health(self, request: Request) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        reason = await self.health_check()
        if reason is None:
            return write_json(request, 200, {"status": "ok"})
        return write_json(request, 503, {"status": "unavailable", "reason": reason})

    def resource(self) -> Any:
        return _PlaybooksShortcut(self.app.resource(), self.mcp.resource())


class _PlaybooksShortcut(Resource):
    """Hands ``/playbooks/…`` to the MCP routes' resource exactly as the ``/playbooks/``
    branch route above would (one path segment moved to ``prepath``), without a first Klein
    dispatch: a URL map match, a Deferred chain and two ``notifyFinish`` Deferreds per request
    (which an open stream would hold for its whole life). Paths the branch route would not
    hand over as they are (``//``, which it redirects; non-UTF-8, which it refuses) still go
    through it."""

    isLeaf = True

    def __init__(self, application: Resource, mcp: Resource) -> None:
        super().__init__()
        self.application = application
        self.mcp = mcp

    def render(self, request: Request) -> Any:
        if not _routable_host(request):
            return write_error(request, ApiError(
                "the Host header is not a valid host name", code="bad_host"))
        return self._route(request)

    def _route(self, request: Request) -> Any:
        postpath = request.postpath
        if postpath is not None and len(postpath) > 1 and postpath[0] == b"playbooks" \
                and not request.prepath:
            joined = b"/".join(postpath)
            if b"//" not in joined:
                try:
                    joined.decode("utf-8")
                except UnicodeDecodeError:
                    return self.application.render(request)
                assert request.prepath is not None
                request.prepath.append(b"playbooks")
                request.postpath = postpath[1:]
                return self.mcp.render(request)
        return self.application.render(request)


def _routable_host(request: Request) -> bool:
    """Whether Klein can bind its URL map to the request's Host, which it does before any
    handler of ours runs: UTF-8 (else a traceback at level 60 and a 400 of its own) that IDNA
    encodes (else werkzeug's BadHost, raised outside every handler: a 500). The edge refuses
    other hosts, except on the paths it exempts (health checks by address)."""
    try:
        name = request.getRequestHostname().decode("utf-8")
        name.partition(":")[0].encode("idna")  # as werkzeug's Map.bind does
    except UnicodeError:
        return False
    return True
