"""The Klein application: health, JSON errors for everything unrouted or failing.

Capability modules (accounts, playbooks, MCP) add their routes to the same ``Klein`` instance
through ``DirectorApp.app``; this module owns only what every response shares.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from werkzeug.exceptions import MethodNotAllowed
from werkzeug.exceptions import NotFound as RouteNotFound

from director.web.errors import ApiError, error_body, write_error, write_json

log = Logger(namespace="web")

#: Returns None when healthy, else the reason shown with 503.
HealthCheck = Callable[[], Awaitable[str | None]]


class DirectorApp:
    app = Klein()

    def __init__(self, health_check: HealthCheck) -> None:
        self.health_check = health_check

    @app.route("/api/health", methods=["GET", "HEAD"])
    async def health(self, request: Request) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        reason = await self.health_check()
        if reason is None:
            return write_json(request, 200, {"status": "ok"})
        return write_json(request, 503, {"status": "unavailable", "reason": reason})

    @app.handle_errors(RouteNotFound)
    def not_found(self, request: Request, failure: Failure) -> bytes:
        return write_error(request, ApiError(
            f"no route for {request.method.decode()} {request.path.decode('latin-1')}",
            status=404, code="not_found",
        ))

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request: Request, failure: Failure) -> bytes:
        allowed = sorted(getattr(failure.value, "valid_methods", None) or [])
        if allowed:
            request.setHeader(b"allow", ", ".join(allowed).encode())
        return write_error(request, ApiError(
            f"{request.method.decode()} is not allowed on {request.path.decode('latin-1')}",
            status=405, code="method_not_allowed", details={"allowed": allowed},
        ))

    @app.handle_errors(ApiError)
    def api_error(self, request: Request, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, ApiError)
        return write_error(request, error)

    @app.handle_errors(Exception)
    def unexpected(self, request: Request, failure: Failure) -> bytes:
        trace_id = getattr(request, "trace_id", "")
        log.failure("unhandled error in {method} {path}", failure,
                    method=request.method.decode(), path=request.path.decode("latin-1"),
                    trace_id=trace_id)
        request.setResponseCode(500)
        request.setHeader(b"content-type", b"application/json")
        return error_body("internal", "unexpected error; the trace id is in the logs",
                          {"trace_id": trace_id})

    def resource(self) -> Any:
        return self.app.resource()
