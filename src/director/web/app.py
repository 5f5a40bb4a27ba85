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

    def __init__(self, health_check: HealthCheck, api_v1: Any, mcp: Any,
                 studio: Any = None, oauth: Any = None, upstream_oauth: Any = None) -> None:
        self.health_check = health_check
        self.api_v1 = api_v1
        self.mcp = mcp
        self.studio = studio
        self.oauth = oauth
        self.upstream_oauth = upstream_oauth

    @app.route("/playbooks/", branch=True)
    def mcp_routes(self, request: Request) -> Any:
        return self.mcp.resource()

    @app.route("/api/v1/", branch=True)
    def api_v1_routes(self, request: Request) -> Any:
        return self.api_v1.resource()

    # The Studio (director.studio): the web interface, under /studio/ on the same port.
    @app.route("/", methods=["GET", "HEAD"])
    def root(self, request: Request) -> bytes:
        request.setResponseCode(302)
        request.setHeader(b"location", b"/studio/")
        return b""

    @app.route("/studio", methods=["GET", "HEAD"])
    def studio_root(self, request: Request) -> bytes:
        return self.root(request)

    @app.route("/studio/", branch=True)
    def studio_routes(self, request: Request) -> Any:
        return self.studio.resource()

    # The OAuth authorization server (director.oauth.server), its routes written whole.
    @app.route("/.well-known/<path:document>", endpoint="oauth_discovery")
    @app.route("/oauth/<any(authorize, token, register, revoke):name>",
               endpoint="oauth_endpoints")
    @app.route("/connect", endpoint="oauth_connect")
    def oauth_routes(self, request: Request, **_: str) -> Any:
        return self.oauth.resource()

    # Upstream OAuth (director.oauth.client.routes): the callback and Director's client
    # metadata document. (/oauth/authorize, /token, … are the authorization server's.)
    @app.route("/oauth/<playbook_id>/<server_name>/callback", methods=["GET"])
    async def upstream_oauth_callback(self, request: Request, playbook_id: str,
                                      server_name: str) -> bytes:
        result: bytes = await self.upstream_oauth.callback(request, playbook_id, server_name)
        return result

    @app.route("/oauth/client-metadata.json", methods=["GET", "HEAD"])
    def upstream_oauth_metadata(self, request: Request) -> Any:
        return self.upstream_oauth.metadata_document(request)

    @app.route("/api/health", methods=["GET", "HEAD"])
    async def health(self, request: Request) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        reason = await self.health_check()
        if reason is None:
            return write_json(request, 200, {"status": "ok"})
        return write_json(request, 503, {"status": "unavailable", "reason": reason})

    def resource(self) -> Any:
        return _PlaybooksShortcut(self.app.resource(), self.mcp.resource())


def unroutable(request: Request) -> ApiError | None:
    """Why a request's URL cannot be routed (a 400 saying so), or None.

    Routing (Klein, werkzeug) works on text, and binds its URL map to the Host before any
    handler of ours runs: a path that is not UTF-8 once percent-decoded (``/playbooks/%ff/mcp``,
    a lone surrogate ``%ed%a0%80``) or a Host that is not UTF-8 is refused by Klein with a
    critical-level traceback per request (a free log flood), and a Host that IDNA cannot encode
    raises werkzeug's BadHost outside every handler (a 500). The edge refuses foreign hosts,
    but not on the paths it exempts (health checks by address). Either is the client's
    mistake, answered here with a precise 400 and only the access-log line."""
    return undecodable_path(_path(request)) or _unroutable_host(request)


def _path(request: Request) -> bytes:
    return b"/".join([*(request.prepath or []), *(request.postpath or [])])


def undecodable_path(path: bytes) -> ApiError | None:
    try:
        path.decode("utf-8")
    except UnicodeDecodeError:
        return ApiError("the path is not UTF-8 (after percent-decoding)", code="bad_request")
    return None


def _unroutable_host(request: Request) -> ApiError | None:
    try:
        name = request.getRequestHostname().decode("utf-8")
        name.partition(":")[0].encode("idna")  # as werkzeug's Map.bind does
    except UnicodeError:
        return ApiError("the Host header is not a valid host name", code="bad_host")
    return None


class _PlaybooksShortcut(Resource):
    """Refuses URLs that cannot be routed (``unroutable``; for ``/playbooks/…`` only a path
    that is not UTF-8, as the MCP routes bind nothing to the Host), and hands those to
    the MCP routes' resource exactly as the ``/playbooks/`` branch route above would (one path
    segment moved to ``prepath``), without a first Klein dispatch: a URL map match, a Deferred
    chain and two ``notifyFinish`` Deferreds per request (which an open stream would hold for
    its whole life). Paths the branch route would not hand over as they are (``//``) still go
    through it."""

    isLeaf = True

    def __init__(self, application: Resource, mcp: Resource) -> None:
        super().__init__()
        self.application = application
        self.mcp = mcp

    def render(self, request: Request) -> Any:
        postpath = request.postpath
        if postpath is not None and len(postpath) > 1 and postpath[0] == b"playbooks" \
                and not request.prepath:
            path = b"/".join(postpath)
            if b"//" not in path:
                # The MCP routes bind nothing to the Host (director.web.mcp_dispatch).
                refusal = undecodable_path(path)
                if refusal is not None:
                    return write_error(request, refusal)
                assert request.prepath is not None
                request.prepath.append(b"playbooks")
                request.postpath = postpath[1:]
                return self.mcp.render(request)
        refusal = unroutable(request)
        if refusal is not None:
            return write_error(request, refusal)
        return self.application.render(request)
