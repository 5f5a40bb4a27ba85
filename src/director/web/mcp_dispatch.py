"""The MCP endpoints' resource: five fixed routes under ``/playbooks/{id}/``, dispatched by
hand rather than by Klein.

Why not Klein, which serves every other route: this is the daemon's hot path (every proxied
``tools/call`` goes through it), and Klein's per-request work there — binding werkzeug's URL
map to the Host (IDNA-encoding it), matching the path, two ``maybeDeferred`` chains and two
``notifyFinish`` Deferreds — was a fifth of the gateway's CPU per call (py-spy, bench ``mcp``).
Five routes with one variable segment need a dictionary, not a router. What Klein did that
clients see is kept: 404 for a path that is no MCP endpoint, 405 with ``Allow`` for a method
the endpoint does not take (``HEAD`` wherever ``GET`` is taken, as werkzeug adds it), a handler
cancelled when its client goes away, nothing written to a request that is already finished.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from director.mcp.protocol import SERVER_ERROR
from director.request_end import when_done
from director.web.mcp_errors import McpHttpError, as_mcp_error, error_response

#: A route's handler: called with the request and the playbook id of its path; returns the
#: body (None: none), or a ``Resource`` that owns the response from then on (a stream).
Handler = Callable[[Request, str], Coroutine[Any, Any, bytes | Resource | None]]


class McpResource(Resource):
    """Serves ``{playbook_id}/{endpoint}`` (the request's ``postpath``) with
    ``routes[endpoint][method]``; ``prefix`` is the path above, for the route's template."""

    isLeaf = True

    def __init__(self, routes: Mapping[bytes, Mapping[bytes, Handler]],
                 prefix: str = "/playbooks") -> None:
        super().__init__()
        self.templates = {endpoint: f"{prefix}/{{playbook_id}}/{endpoint.decode()}"
                          for endpoint in routes}
        self.routes = {endpoint: {**methods, **({b"HEAD": methods[b"GET"]}
                                                if b"GET" in methods else {})}
                       for endpoint, methods in routes.items()}

    def render(self, request: Request) -> Any:
        postpath = request.postpath or []
        methods = self.routes.get(postpath[1]) if len(postpath) == 2 and postpath[0] \
            and b"/" not in postpath[0] else None
        if methods is None:
            return self._refuse(request, 404, "no such MCP endpoint")
        handler = methods.get(request.method)
        if handler is None:
            return self._refuse(request, 405, "method not allowed here",
                                {"Allow": ", ".join(sorted(m.decode() for m in methods))})
        request.route = self.templates[postpath[1]]  # type: ignore[attr-defined]
        assert request.prepath is not None
        request.prepath.extend(postpath)
        request.postpath = []
        handling: defer.Deferred[Any] = defer.ensureDeferred(handler(request, postpath[0].decode("utf-8")))
        if handling.called:  # answered without waiting: nothing to cancel
            return self._answered(handling, request)
        gone: list[bool] = []

        def done(lost: bool) -> None:
            if lost:  # the client went away
                gone.append(True)
                handling.cancel()

        when_done(request, done)
        handling.addBoth(self._write, request, gone)
        return NOT_DONE_YET

    def _answered(self, handling: defer.Deferred[Any], request: Request) -> Any:
        """The body of a handler that has already finished (``Request.render`` writes it)."""
        outcome: list[Any] = []
        handling.addBoth(outcome.append)
        result = outcome[0]
        if isinstance(result, Failure):
            error = as_mcp_error(result)
            return error_response(request, error) if error is not None else b""
        if isinstance(result, Resource):
            return result.render(request)
        if request.finished:
            return NOT_DONE_YET
        return result or b""

    @staticmethod
    def _write(result: Any, request: Request, gone: list[bool]) -> None:
        if isinstance(result, Resource):
            result.render(request)
            return
        if isinstance(result, Failure):
            error = as_mcp_error(result)  # logs what nobody expected, even if nobody hears
            result = error_response(request, error) \
                if error is not None and not (gone or request.finished) else None
        if gone or request.finished:
            return
        if result:
            request.write(result)
        request.finish()

    @staticmethod
    def _refuse(request: Request, status: int, reason: str,
                headers: dict[str, str] | None = None) -> bytes:
        return error_response(request, McpHttpError(
            status, SERVER_ERROR, f"{reason}: {request.method.decode('latin-1')} "
                                  f"{request.path.decode('latin-1')}", headers=headers))
