"""One error shape for every non-MCP response: ``{"error": {"code", "message", "details"}}``.

Handlers raise ``ApiError`` (or a subclass); the app maps it once to a status and body.
"""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.exceptions import NotFound as RouteNotFound
from werkzeug.routing import RequestRedirect

from director import jsontext
from director.jsontext import JsonTextError

log = Logger(namespace="web")


class ApiError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None,
                 status: int | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}
        self.headers = headers or {}
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class UnsupportedMediaType(ApiError):
    status = 415
    code = "unsupported_media_type"


class TooManyRequests(ApiError):
    status = 429
    code = "rate_limited"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class Conflict(ApiError):
    status = 409
    code = "conflict"


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> bytes:
    return json.dumps(
        {"error": {"code": code, "message": message, "details": details or {}}}
    ).encode()


def write_json(request: Request, status: int, payload: Any) -> bytes:
    """Set status and content type; return the encoded body for a Klein route to return."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(payload).encode()


def write_error(request: Request, error: ApiError) -> bytes:
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    for name, value in error.headers.items():
        request.setHeader(name.encode(), value.encode())
    return error_body(error.code, error.message, error.details)


# --- handlers every Klein app of ours shares ------------------------------------------------


def _not_found(instance: Any, request: Any, failure: Failure) -> bytes:
    return write_error(request, NotFound(
        f"no route for {request.method.decode('latin-1')} {request.path.decode('latin-1')}"))


def _redirect(instance: Any, request: Any, failure: Failure) -> bytes:
    # werkzeug asks to redirect a path with ``//`` or a missing trailing slash; no route of
    # ours is reached that way, and an absolute Location would be built from the Host header.
    return _not_found(instance, request, failure)


def _method_not_allowed(instance: Any, request: Any, failure: Failure) -> bytes:
    allowed = sorted(getattr(failure.value, "valid_methods", None) or [])
    if allowed:
        request.setHeader(b"allow", ", ".join(allowed).encode())
    return write_error(request, ApiError(
        f"{request.method.decode('latin-1')} is not allowed on "
        f"{request.path.decode('latin-1')}",
        status=405, code="method_not_allowed", details={"allowed": allowed},
    ))


def _routing(instance: Any, request: Any, failure: Failure) -> bytes:
    """Any other HTTP error werkzeug raises while routing, with its own status rather than a
    500 (redirects are ``_redirect``'s: never followed, never a Location)."""
    error = failure.value
    assert isinstance(error, HTTPException)
    return write_error(request, ApiError(
        f"{error.name}: {request.method.decode('latin-1')} {request.path.decode('latin-1')}",
        status=error.code or 400, code=error.name.lower().replace(" ", "_")))


def _api_error(instance: Any, request: Any, failure: Failure) -> bytes:
    error = failure.value
    assert isinstance(error, ApiError)
    return write_error(request, error)


def _unexpected(instance: Any, request: Any, failure: Failure) -> bytes:
    trace_id = getattr(request, "trace_id", "")
    log.failure("unhandled error in {method} {path}", failure,
                method=request.method.decode("latin-1"), path=request.path.decode("latin-1"),
                trace_id=trace_id)
    request.setResponseCode(500)
    request.setHeader(b"content-type", b"application/json")
    return error_body("internal", "unexpected error; the trace id is in the logs",
                      {"trace_id": trace_id})


def install_error_handlers(app: Klein) -> None:
    """JSON for unrouted paths, wrong methods, ``ApiError`` and anything unexpected."""
    handlers: list[tuple[type[Exception], Any]] = [
        (RouteNotFound, _not_found), (RequestRedirect, _redirect),
        (MethodNotAllowed, _method_not_allowed), (HTTPException, _routing),
        (ApiError, _api_error), (Exception, _unexpected),
    ]
    for exception, handler in handlers:
        app.handle_errors(exception)(handler)


def read_json_object(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or 415 / 400 naming what is wrong."""
    content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if content_type != b"application/json":
        raise UnsupportedMediaType("send the body as application/json",
                                   details={"content_type": content_type.decode("latin-1")})
    raw = request.content.read() if request.content is not None else b""
    try:
        body = jsontext.loads(raw)  # strict: no lone surrogate, NaN or 1e999 gets stored
    except JsonTextError as error:
        raise ApiError(f"the body is not valid JSON: {error}", code="malformed_json") from None
    if not isinstance(body, dict):
        raise ApiError("the body must be a JSON object", code="malformed_json")
    return body
