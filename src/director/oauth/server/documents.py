"""Client ID Metadata Documents: a client whose id is an ``https`` URL is described by the JSON
document at that URL (draft-ietf-oauth-client-id-metadata-document, MCP 2025-11-25 and later).

Fetching a URL a stranger names is a server-side request forgery risk (the draft's section
8.6), so a fetch:

* goes through the upstream servers' SSRF rail (``mcp.upstream.connect.CheckedEndpoints`` and
  ``playbooks.rails``): no IP literal, no local name, no name resolving to a loopback, private
  or otherwise non-public address, and the connection goes to the addresses checked — unless
  ``DANGEROUSLY_ALLOW_INSECURE_HTTP_SERVERS`` lifts that rail, as it does for upstreams;
* follows no redirect (the draft's MUST NOT): a 3xx is an error;
* reads at most ``MAX_DOCUMENT_BYTES`` (the draft suggests 5 KB; real clients' documents are
  already bigger, so 32 KiB) and gives up after ``FETCH_SECONDS`` in all, connecting included;
* accepts only 200 with ``application/json`` (or ``application/*+json``) holding a JSON object
  whose ``client_id`` is the URL itself, compared exactly, with ``client_name`` and
  ``redirect_uris``, no shared secret, and ``token_endpoint_auth_method`` ``none``.

A document is kept as its ``Cache-Control`` says (``max-age``, between one minute and a day;
``no-store`` and ``no-cache``: fetched again each time), five minutes when it says nothing; a
failure is remembered for ``FAILURE_SECONDS``, so that a flood of authorization requests naming
one bad URL costs one fetch. Those times are the service's clock's
(``director.clock``).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from director import __version__, jsontext
from director.clock import Clock
from director.mcp.upstream.connect import CheckedEndpoints, Refused
from director.oauth.server.clients import (
    METADATA_DOCUMENT,
    PUBLIC,
    Client,
    ClientMetadataError,
    checked_metadata,
    client_of,
    split_uri,
)

MAX_DOCUMENT_BYTES = 32 * 1024
FETCH_SECONDS = 5.0
DEFAULT_CACHE_SECONDS = 300.0
MIN_CACHE_SECONDS = 60.0
MAX_CACHE_SECONDS = 86_400.0
FAILURE_SECONDS = 10.0
MAX_CACHED = 1000
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?", re.IGNORECASE)
_JSON_TYPE = re.compile(r"application/([a-z0-9.+-]+\+)?json", re.IGNORECASE)


class DocumentError(Exception):
    """The client id's document cannot identify a client; the text says why."""


@attrs.frozen
class _Cached:
    client: Client | None
    problem: str | None
    until: float


def is_document_url(client_id: str) -> bool:
    """A client id that names a metadata document (rather than a registered client)."""
    return client_id.startswith("https://")


def url_refusal(client_id: str) -> str | None:
    """Why ``client_id`` cannot be a metadata document's URL (the draft's section 3), or None."""
    parts = split_uri(client_id)
    if isinstance(parts, str):
        return parts
    if parts.scheme != "https" or not parts.hostname:
        return "must be an https URL"
    if parts.path in ("", "/"):
        return "must have a path"
    if any(segment in (".", "..") for segment in parts.path.split("/")):
        return "must not have . or .. path segments"
    return None


def cache_seconds(cache_control: str | None) -> float:
    """How long a document may be kept, from its ``Cache-Control`` (module docstring)."""
    if cache_control is None:
        return DEFAULT_CACHE_SECONDS
    directives = cache_control.lower()
    if "no-store" in directives or "no-cache" in directives:
        return 0.0
    found = _MAX_AGE.search(cache_control)
    if found is None:
        return DEFAULT_CACHE_SECONDS
    seconds = float(found[1])
    if seconds == 0:
        return 0.0
    return min(MAX_CACHE_SECONDS, max(MIN_CACHE_SECONDS, seconds))


def client_from_document(client_id: str, document: Any) -> Client:
    """The client a fetched document describes; ``DocumentError`` when it does not qualify."""
    if not isinstance(document, dict):
        raise DocumentError("the document is not a JSON object")
    if document.get("client_id") != client_id:
        raise DocumentError(f"the document's client_id {str(document.get('client_id'))[:200]!r} "
                            "is not its own URL (they must be identical)")
    for forbidden in ("client_secret", "client_secret_expires_at"):
        if forbidden in document:
            raise DocumentError(f"the document must not contain {forbidden}: a published "
                                "document cannot hold a secret")
    method = document.get("token_endpoint_auth_method", PUBLIC)
    if method != PUBLIC:
        raise DocumentError(f"token_endpoint_auth_method {str(method)[:60]!r} is not supported "
                            "for a metadata document; use none (a public client with PKCE)")
    name = document.get("client_name")
    if not isinstance(name, str) or not name.strip():
        raise DocumentError("the document has no client_name")
    try:
        metadata = checked_metadata(document, PUBLIC)
    except ClientMetadataError as problem:
        raise DocumentError(problem.description) from None
    return client_of(client_id, METADATA_DOCUMENT, metadata)


class LimitedBody(Protocol):
    """Collects a response body, aborting the connection past ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.chunks: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred(lambda _: self._abort())

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.done.errback(DocumentError(f"the document is larger than {self.limit} bytes"))
            self._abort()
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


class _Discarded(Protocol):
    """A body nobody reads: the connection is closed at once instead."""

    def connectionMade(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()


def _discard(response: Any) -> None:
    response.deliverBody(_Discarded())


class DocumentFetcher:
    """Fetches, checks and caches metadata documents (module docstring)."""

    def __init__(self, reactor: Any, *, allow_insecure: bool, tls: Any = None,
                 clock: Clock | None = None) -> None:
        self.reactor = reactor
        #: What the cache's times are read from: the reactor, unless a test moves its own.
        self.clock: Clock = reactor if clock is None else clock
        endpoints = CheckedEndpoints(reactor, allow_insecure=allow_insecure, tls=tls,
                                     timeout=FETCH_SECONDS)
        # Not persistent: documents are fetched rarely, from hosts seen once.
        self.agent = Agent.usingEndpointFactory(
            reactor, endpoints, pool=HTTPConnectionPool(reactor, persistent=False))
        self._cache: OrderedDict[str, _Cached] = OrderedDict()

    async def client(self, client_id: str) -> Client:
        """The client ``client_id``'s document describes; ``DocumentError`` says why not."""
        refusal = url_refusal(client_id)
        if refusal is not None:
            raise DocumentError(f"a client id that is a URL {refusal}")
        now = self.clock.seconds()
        cached = self._cache.get(client_id)
        if cached is not None and cached.until > now:
            if cached.client is None:
                raise DocumentError(cached.problem or "the document could not be fetched")
            return cached.client
        try:
            client, keep = await self._fetch(client_id)
        except DocumentError as problem:
            self._store(client_id, _Cached(None, str(problem), self.clock.seconds() + FAILURE_SECONDS))
            raise
        if keep > 0:
            self._store(client_id, _Cached(client, None, self.clock.seconds() + keep))
        else:
            self._cache.pop(client_id, None)
        return client

    def _store(self, client_id: str, entry: _Cached) -> None:
        self._cache[client_id] = entry
        self._cache.move_to_end(client_id)
        while len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)

    async def _fetch(self, client_id: str) -> tuple[Client, float]:
        fetching = defer.ensureDeferred(self._checked_fetch(client_id))
        # A cancelled request fails with whatever the step in progress makes of it
        # (ResponseNeverReceived, ResponseFailed, ...): whether time ran out is noted here.
        late: list[bool] = []

        def give_up() -> None:
            late.append(True)
            fetching.cancel()

        deadline = self.reactor.callLater(FETCH_SECONDS, give_up)
        try:
            return await fetching
        except Exception:
            if late:
                raise DocumentError(f"fetching {client_id} took longer than "
                                    f"{FETCH_SECONDS:g} s") from None
            raise
        finally:
            if deadline.active():
                deadline.cancel()

    async def _checked_fetch(self, client_id: str) -> tuple[Client, float]:
        try:
            return await self._get(client_id)
        except Refused as refused:
            raise DocumentError(f"{client_id} cannot be fetched: {refused}") from None
        except DocumentError:
            raise
        except Exception as failure:
            raise DocumentError(f"fetching {client_id} failed: {_reason(failure)[:300]}") \
                from None

    async def _get(self, client_id: str) -> tuple[Client, float]:
        headers = Headers({b"accept": [b"application/json"],
                           b"user-agent": [f"Director/{__version__}".encode()]})
        response = await self.agent.request(b"GET", client_id.encode("ascii"), headers)
        if 300 <= response.code < 400:
            _discard(response)
            raise DocumentError(f"{client_id} answered {response.code} with a redirect, which "
                                "is not followed: the document must be at its URL")
        if response.code != 200:
            _discard(response)
            raise DocumentError(f"{client_id} answered {response.code}, not 200")
        length = response.length
        if isinstance(length, int) and length > MAX_DOCUMENT_BYTES:
            _discard(response)
            raise DocumentError(f"the document is larger than {MAX_DOCUMENT_BYTES} bytes "
                                f"({length})")
        content_type = _header(response, b"content-type") or ""
        if not _JSON_TYPE.fullmatch(content_type.split(";")[0].strip()):
            _discard(response)
            raise DocumentError(f"{client_id} is {content_type or 'untyped'}, not "
                                "application/json")
        body = LimitedBody(MAX_DOCUMENT_BYTES)
        response.deliverBody(body)
        raw = await body.done
        try:
            document = jsontext.loads(raw)
        except ValueError as problem:
            raise DocumentError(f"the document is not valid JSON: {problem}") from None
        client = client_from_document(client_id, document)
        return client, cache_seconds(_header(response, b"cache-control"))


def _reason(failure: Exception) -> str:
    """What went wrong, in words: the Agent wraps connection errors in lists of Failures."""
    reasons = getattr(failure, "reasons", None)
    if reasons:
        return "; ".join(reason.getErrorMessage() for reason in reasons)
    return " ".join(str(failure).split()) or type(failure).__name__


def _header(response: Any, name: bytes) -> str | None:
    values = response.headers.getRawHeaders(name)
    return b", ".join(values).decode("latin-1") if values else None
