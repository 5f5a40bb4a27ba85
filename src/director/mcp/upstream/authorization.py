"""The seam between HTTP upstream sessions and whoever authorizes their requests (OAuth).

An HTTP upstream session (``streamable.py``, ``legacy_sse.py``, and ``modern.py`` through
them) may be given an ``UpstreamAuthorization`` by the factory. The session then, for every
HTTP request it makes (each POST, the GET stream, a resumption, the DELETE of the session):

1. asks ``await authorization.headers(url)`` and adds what it answers (``Authorization:
   Bearer …``, or nothing) to the request's headers; the answer is usually a dictionary
   lookup, a token refresh only when the cached one is about to expire;
2. when the answer is ``401`` or ``403``, asks ``await authorization.refused(url, status,
   challenges, sent, retried=False)`` (``challenges``: the ``WWW-Authenticate`` values,
   ``sent``: the headers the request carried). ``True``: the request is sent again, once, with
   fresh ``headers(url)`` (a refreshed token, or one another instance or authorization just
   stored); ``False``: the answer is handled as it would be without an authorization (an
   ``HTTP 401`` error, …); or it raises an ``UpstreamError`` (``UpstreamUnauthorized``), which
   fails the request with that message;
3. if the resent request is refused again, ``refused(…, retried=True)`` is told (to say why,
   by raising, or to return ``False``); there is never a second retry.

Nothing else in the transports knows about OAuth; the provider (``director.oauth.client``)
never sees a message body, and the token never appears in an error message.
"""

from __future__ import annotations

from typing import Protocol

from director.mcp.upstream.base import UpstreamError


class UpstreamUnauthorized(UpstreamError):
    """The upstream needs an authorization the user has not given (or no longer valid)."""


class UpstreamAuthorization(Protocol):
    async def headers(self, url: str) -> dict[str, str]: ...

    async def refused(self, url: str, status: int, challenges: list[str],
                      sent: dict[str, str], retried: bool) -> bool: ...
