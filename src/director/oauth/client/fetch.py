"""Every HTTP request of the upstream OAuth flow: bounded in size and time, never redirected,
each connection made through the SSRF rail.

The documents and endpoints come from the upstream server (its challenge names its metadata,
which names the authorization server, which names its endpoints), so each is as untrusted as
a URL a user typed: the ``Agent`` is the upstream pool's (``connect.CheckedEndpoints``, the
addresses checked at each connection, TLS verified); a URL must be ``https`` unless
``DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS`` allows plain ``http`` too; a redirect is an error
(RFC 8414 and 9728 forbid following them for metadata, and a token endpoint that redirects is
broken); a body larger than ``limit`` is cut off and refused before it is buffered whole; the
whole exchange, body included, has ``timeout`` seconds.

Errors (``FetchError``) name the request and what went wrong, never a query string, a
request body (which may carry a code, a secret or a token) or more than the start of an
answer's body.
"""

from __future__ import annotations

import io
import json
from typing import Any
from urllib.parse import urlencode, urlsplit

import attrs
from twisted.internet import defer, protocol
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from director import __version__
from director.mcp.upstream.connect import Refused
from director.mcp.upstream.http_plumbing import _describe, display_url

#: Metadata documents, registration and token answers: a few KB in practice.
MAX_BODY_BYTES = 64 * 1024
TIMEOUT_SECONDS = 10.0
#: Characters of an error answer's body quoted in a message.
QUOTED_CHARS = 200


class FetchError(Exception):
    """A request of the flow failed; the text is safe to show to the user."""


class TooLarge(Exception):
    pass


@attrs.frozen
class Answer:
    url: str
    status: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode())
        return values[0].decode("latin-1") if values else None

    def header_values(self, name: str) -> list[str]:
        return [v.decode("latin-1") for v in self.headers.getRawHeaders(name.encode()) or []]

    @property
    def content_type(self) -> str:
        return (self.header("content-type") or "").split(";")[0].strip().lower()

    def quoted(self) -> str:
        """The start of the body, for an error message."""
        return self.body[:QUOTED_CHARS * 4].decode("utf-8", "replace").strip()[:QUOTED_CHARS]

    def json_object(self, what: str) -> dict[str, Any]:
        """The body as a JSON object, or ``FetchError`` naming ``what`` it should have been."""
        try:
            document = json.loads(self.body)
        except ValueError:
            raise FetchError(f"{what} at {display_url(self.url)} is not JSON") from None
        if not isinstance(document, dict):
            raise FetchError(f"{what} at {display_url(self.url)} is not a JSON object")
        return document


def url_refusal(url: str, allow_insecure: bool) -> str | None:
    """Why the flow must not request ``url`` (None: it may)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return f"{url[:200]!r} is not a valid URL"
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return f"{display_url(url)} is not an http(s) URL"
    if parts.scheme != "https" and not allow_insecure:
        return (f"{display_url(url)} is not https (DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS=true "
                "allows plain http)")
    if parts.fragment or parts.username is not None or parts.password is not None:
        return f"{display_url(url)} has a fragment or credentials"
    return None


class _Limited(protocol.Protocol):
    """Collects a body of at most ``limit`` bytes; more stops the transfer (``TooLarge``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.too_large = False
        self.done: defer.Deferred[bytes] = defer.Deferred(self._cancel)

    def _cancel(self, _: object) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.too_large:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.too_large = True
            self.parts.clear()
            self._cancel(None)
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.done.called:
            return
        if self.too_large:
            self.done.errback(TooLarge())
        elif reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


class Fetcher:
    """HTTP for the flow (module docstring); ``agent`` makes every connection through the
    SSRF rail (``http.upstream_agent``)."""

    def __init__(self, reactor: Any, agent: Any, *, allow_insecure: bool,
                 timeout: float = TIMEOUT_SECONDS, limit: int = MAX_BODY_BYTES) -> None:
        self.reactor = reactor
        self.agent = agent
        self.allow_insecure = allow_insecure
        self.timeout = timeout
        self.limit = limit

    async def get(self, url: str, what: str, headers: dict[str, str] | None = None) -> Answer:
        return await self.request("GET", url, what, headers)

    async def post_form(self, url: str, what: str, fields: dict[str, str],
                        headers: dict[str, str] | None = None) -> Answer:
        return await self.request("POST", url, what, {
            **(headers or {}), "Content-Type": "application/x-www-form-urlencoded"},
            urlencode(fields).encode())

    async def post_json(self, url: str, what: str, document: Any,
                        headers: dict[str, str] | None = None) -> Answer:
        return await self.request("POST", url, what, {
            **(headers or {}), "Content-Type": "application/json"},
            json.dumps(document).encode())

    async def request(self, method: str, url: str, what: str,
                      headers: dict[str, str] | None = None, body: bytes | None = None,
                      read_only: set[int] | None = None) -> Answer:
        """One exchange; ``what`` names it in errors ("the authorization server's metadata").
        ``read_only``: the statuses whose body is read (others are dropped unread: an MCP
        server's 200 may be an endless event stream)."""
        refusal = url_refusal(url, self.allow_insecure)
        if refusal is not None:
            raise FetchError(f"{what}: {refusal}")
        exchange = defer.ensureDeferred(self._exchange(method, url, headers or {}, body,
                                                       read_only))
        exchange.addTimeout(self.timeout, self.reactor)
        try:
            return await exchange
        except defer.TimeoutError:
            raise FetchError(f"{what}: {method} {display_url(url)}: no complete answer within "
                             f"{self.timeout:g} s") from None
        except TooLarge:
            raise FetchError(f"{what}: {method} {display_url(url)}: the answer is larger than "
                             f"{self.limit} bytes") from None
        except FetchError:
            raise
        except Exception as failure:
            raise FetchError(f"{what}: {method} {display_url(url)}: {describe(failure)}") \
                from None

    async def _exchange(self, method: str, url: str, headers: dict[str, str],
                        body: bytes | None, read_only: set[int] | None) -> Answer:
        sent = {"User-Agent": f"director/{__version__}", "Accept": "application/json",
                **headers}
        response = await self.agent.request(
            method.encode(), url.encode(),
            Headers({key: [value] for key, value in sent.items()}),
            FileBodyProducer(io.BytesIO(body)) if body is not None else None)
        reader = _Limited(self.limit)
        response.deliverBody(reader)
        if read_only is not None and response.code not in read_only:
            reader.done.addErrback(lambda failure: None)
            reader._cancel(None)
            return Answer(url, response.code, response.headers, b"")
        if response.length is not UNKNOWN_LENGTH and response.length > self.limit:
            reader.too_large = True
            reader._cancel(None)
        content = await reader.done
        answer = Answer(url, response.code, response.headers, content)
        if 300 <= response.code < 400:
            raise FetchError(f"{method} {display_url(url)}: HTTP {response.code}, a redirect "
                             "(not followed)")
        return answer


def describe(failure: BaseException) -> str:
    """A connection failure in a few words (as the HTTP transport words them)."""
    if isinstance(failure, Refused):
        return str(failure)
    reasons = getattr(failure, "reasons", None)
    if reasons:
        return describe(reasons[0].value)
    return _describe(failure)
