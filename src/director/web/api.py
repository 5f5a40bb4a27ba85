"""The management REST API under ``/api/v1``: one Klein app that capabilities add routes to.

Each capability defines a mixin class whose methods are routed on ``api`` (paths relative to
``/api/v1``); ``ApiV1`` combines them. Shared here: the JSON error handlers, ``503`` while the
database is away, and helpers for JSON bodies and pagination.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from klein import Klein
from twisted.python.failure import Failure

from director import jsontext
from director.accounts.validation import ValidationFailed
from director.db.database import DatabaseUnavailable
from director.web.errors import ApiError, install_error_handlers, write_error

api = Klein()
install_error_handlers(api)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200


def _validation_failed(instance: Any, request: Any, failure: Failure) -> bytes:
    error = failure.value
    assert isinstance(error, ValidationFailed)
    return write_error(request, ApiError(
        "the request is invalid: " + str(error), code="validation_failed",
        details={"fields": error.fields}))


def _database_unavailable(instance: Any, request: Any, failure: Failure) -> bytes:
    return write_error(request, ApiError(
        f"the database is unavailable ({failure.value}); retry shortly",
        status=503, code="unavailable", headers={"Retry-After": "2"}))


# Handlers are tried in order of registration, so these go before the catch-all ones.
_first: list[Any] = [([ValidationFailed], _validation_failed),
                     ([DatabaseUnavailable], _database_unavailable)]
api._error_handlers[0:0] = _first


def is_number(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts ``²``, which ``int`` then refuses."""
    return text.isascii() and text.isdigit() and len(text) <= 18


def numeric_cursor(request: Any) -> int | None:
    """A cursor this API made from a number (an offset or a sequence), else a 400."""
    cursor = decode_cursor(request, 1)
    if cursor is None:
        return None
    if not is_number(cursor[0]):
        raise ValidationFailed({"cursor": "is not a cursor this API returned"})
    return int(cursor[0])


def page_size(request: Any) -> int:
    raw = request.args.get(b"limit", [b""])[0].decode("latin-1")
    if not raw:
        return DEFAULT_PAGE_SIZE
    if not is_number(raw) or not 1 <= int(raw) <= MAX_PAGE_SIZE:
        raise ValidationFailed({"limit": f"must be a whole number from 1 to {MAX_PAGE_SIZE}"})
    return int(raw)


def encode_cursor(*parts: str) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts).encode()).decode().rstrip("=")


def decode_cursor(request: Any, arity: int) -> tuple[str, ...] | None:
    raw = request.args.get(b"cursor", [b""])[0].decode("latin-1")
    if not raw:
        return None
    try:
        parts = jsontext.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        if isinstance(parts, list) and len(parts) == arity and all(
                isinstance(p, str) for p in parts):
            return tuple(parts)
    except ValueError:
        pass
    raise ValidationFailed({"cursor": "is not a cursor this API returned"})


def require_field(body: dict[str, Any], name: str) -> Any:
    if name not in body:
        raise ValidationFailed({name: "is required"})
    return body[name]


def reject_unknown_fields(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ValidationFailed({name: "is not a known field" for name in unknown})
