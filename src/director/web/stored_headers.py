"""Headers read and written straight in Twisted's ``Headers`` dictionary.

``Request.setHeader`` encodes the name and value and scrubs line breaks from them on every
call. For a value Director made itself (a constant, a number, a hex id) that checks nothing,
and on a proxied call it was several per cent of the CPU. The dictionary's keys are found
from this Twisted's own ``Headers`` at import, so a version that keys them differently still
works; ``tests/test_response_writes.py`` fails if a header is ever sent twice.
"""

from __future__ import annotations

from twisted.web.http_headers import Headers


def stored_name(name: bytes) -> bytes:
    """``name`` as this Twisted's ``Headers`` keys it in its dictionary."""
    headers = Headers()
    headers.setRawHeaders(name, [b""])
    return next(iter(headers._rawHeaders))


def put(headers: Headers, name: bytes, value: bytes) -> None:
    """Set ``name`` (from ``stored_name``) to ``value``, which must hold no line break."""
    headers._rawHeaders[name] = [value]


def get(headers: Headers, name: bytes) -> bytes | None:
    """The last value of ``name`` (from ``stored_name``), as ``Request.getHeader`` gives it."""
    values = headers._rawHeaders.get(name)
    return values[-1] if values else None
