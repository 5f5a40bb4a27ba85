"""The client of ``REGISTRY_URL``: search, a server's versions, one version — over the MCP
Registry API v0.1, or from a ``file://`` catalogue in the same format.

HTTP (``https://registry.modelcontextprotocol.io`` by default):

* ``GET /v0.1/servers?search=…&cursor=…&limit=…&version=latest`` — a page of servers;
* ``GET /v0.1/servers/{name}/versions`` — every version of one server;
* ``GET /v0.1/servers/{name}/versions/{version}`` — one version (``latest`` allowed).

Every request is bounded: ``TIMEOUT`` seconds for the whole exchange, ``MAX_BYTES`` of body
(a longer answer is cut off and refused), no redirect followed. A registry that is down, slow,
answers an error or something that is not the API's JSON raises ``RegistryError`` whose text
names the registry and what went wrong; nothing is written anywhere before an answer was read
and checked, so a failure changes nothing.

Answers are cached in memory per URL as their ``Cache-Control`` (``max-age``, ``s-maxage``
less ``Age``; ``no-store``, ``no-cache`` and ``private`` are not cached) or ``Expires`` says,
for at most ``MAX_CACHE_SECONDS``, at most ``CACHE_ENTRIES`` answers (least recently used
out first). No validators: an expired answer is fetched again. Ages are read from the
service's clock (``director.clock``), a wall clock like the ``Expires`` dates it is compared with.

Who may be reached: the registry is the operator's choice (``REGISTRY_URL``, like
``DATABASE_URL``), not a user's, so its host is reached whatever it resolves to — a mirror on a
private network or on this host is a legitimate deployment — through the upstream code's
``CheckedEndpoints`` with the address rails off, *for that scheme, host and port only*
(``_RegistryEndpoints``): no other URL can be fetched through this client, whatever a
registry answer contains (no redirect is followed, no URL from an answer is ever fetched).

``file:///path`` reads a catalogue instead, for hosts without internet access or an
operator's curated list: a JSON file shaped like a ``/v0.1/servers`` answer
(``{"servers": [{"server": {…server.json…}}, …]}``) or a directory of ``*.json`` files, each
one ``server.json`` (or ``{"server": …}``). It is read again when it changes (size or
modification time). Search matches the query in a name, title or description, case-insensitive,
and lists each server's latest version.
"""

from __future__ import annotations

import collections
import email.utils
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import attrs
from twisted.internet import defer, protocol
from twisted.web.client import URI, Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from director import jsontext
from director.clock import Clock
from director.mcp.upstream.connect import CheckedEndpoints
from director.registry import catalogue
from director.registry.catalogue import CatalogueError, Entry, Page

TIMEOUT = 10.0
MAX_BYTES = 4 * 1024 * 1024
MAX_CACHE_SECONDS = 3600.0
CACHE_ENTRIES = 256
MAX_CATALOGUE_FILES = 10_000
DEFAULT_LIMIT = 30
MAX_LIMIT = 100


class RegistryError(Exception):
    """The registry could not answer (down, slow, an error, nonsense); the text says which."""


class NotInRegistry(RegistryError):
    """The registry has no such server or version."""


@implementer(IAgentEndpointFactory)
class _RegistryEndpoints:
    """Connections to the configured registry's scheme, host and port, and nowhere else."""

    def __init__(self, reactor: Any, url: str) -> None:
        parts = URI.fromBytes(url.encode("ascii"))
        self.allowed = (parts.scheme, parts.host, parts.port)
        self.checked = CheckedEndpoints(reactor, allow_insecure=True)

    def endpointForURI(self, uri: URI) -> Any:
        if (uri.scheme, uri.host, uri.port) != self.allowed:
            raise RegistryError(f"refused to connect to {uri.toBytes().decode('ascii')}: only "
                                "REGISTRY_URL's host is reached")
        return self.checked.endpointForURI(uri)


class _Discard(protocol.Protocol):
    """A body not read: the connection is cut at once."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.stopProducing()


class _Body(protocol.Protocol):
    """A response body, refused past ``limit`` bytes (the connection is cut)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            if not self.done.called:
                self.done.errback(RegistryError(f"the answer is larger than {self.limit} bytes"))
            assert self.transport is not None
            self.transport.stopProducing()
            return
        self.parts.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.done.called:
            return
        if reason is not None and not reason.check(ResponseDone):
            self.done.errback(RegistryError(f"the answer was cut off ({reason.value})"))
        else:
            self.done.callback(b"".join(self.parts))


def cache_seconds(headers: Headers, now: float) -> float:
    """How long an answer may be reused, from its caching headers (0: not at all)."""
    control = ",".join(value.decode("latin-1") for value in
                       headers.getRawHeaders(b"cache-control", [])).lower()
    directives = {}
    for item in control.split(","):
        key, _, value = item.strip().partition("=")
        directives[key] = value.strip('"')
    if {"no-store", "no-cache", "private"} & set(directives):
        return 0.0
    age = _number((headers.getRawHeaders(b"age") or [b"0"])[0].decode("latin-1")) or 0.0
    for key in ("s-maxage", "max-age"):
        if key in directives:
            seconds = _number(directives[key])
            return max(0.0, min(MAX_CACHE_SECONDS, (seconds or 0.0) - age))
    expires = headers.getRawHeaders(b"expires")
    if expires:
        try:
            when = email.utils.parsedate_to_datetime(expires[0].decode("latin-1")).timestamp()
        except (TypeError, ValueError, IndexError):
            return 0.0
        return max(0.0, min(MAX_CACHE_SECONDS, when - now))
    return 0.0


def _number(text: str) -> float | None:
    return float(text) if text.isascii() and text.isdigit() else None


@attrs.define
class _Cached:
    expires: float
    data: Any


class RegistryClient:
    """Reads one registry (``url``: ``REGISTRY_URL``)."""

    def __init__(self, url: str, reactor: Any, *, timeout: float = TIMEOUT,
                 max_bytes: int = MAX_BYTES, clock: Clock | None = None) -> None:
        self.url = url.rstrip("/")
        self.reactor = reactor
        #: What ages are read from: the reactor, unless a test moves a clock of its own.
        self.clock: Clock = reactor if clock is None else clock
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._cache: collections.OrderedDict[str, _Cached] = collections.OrderedDict()
        self._catalogue: tuple[tuple[Any, ...], list[Entry], int] | None = None
        self.pool: HTTPConnectionPool | None = None
        self._agent: Agent | None = None
        if not self.is_file:
            self.pool = HTTPConnectionPool(reactor, persistent=True)
            self.pool.maxPersistentPerHost = 2
            self.pool.cachedConnectionTimeout = 60
            self._agent = Agent.usingEndpointFactory(
                reactor, _RegistryEndpoints(reactor, self.url), pool=self.pool)

    @property
    def is_file(self) -> bool:
        return self.url.startswith("file:")

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.closeCachedConnections()

    # --- the three questions ------------------------------------------------------------

    async def search(self, query: str = "", cursor: str | None = None,
                     limit: int = DEFAULT_LIMIT) -> Page:
        """Servers (their latest versions) whose name matches ``query``, one page."""
        if self.is_file:
            return self._search_file(query, cursor, limit)
        params = {"limit": str(limit), "version": "latest"}
        if query:
            params["search"] = query
        if cursor:
            params["cursor"] = cursor
        return self._page(await self._get(f"/v0.1/servers?{urlencode(params)}"))

    async def versions(self, name: str) -> list[Entry]:
        """Every version of ``name``, oldest first."""
        if self.is_file:
            found = [entry for entry in self._read_catalogue()[0] if entry.name == name]
        else:
            found = list(self._page(await self._get(
                f"/v0.1/servers/{quote(name, safe='')}/versions")).entries)
            found = [entry for entry in found if entry.name == name]
        if not found:
            raise NotInRegistry(f"{self._where()} has no server {name!r}")
        return sorted(found, key=lambda entry: catalogue.version_key(entry.version))

    async def version(self, name: str, version: str = "latest") -> Entry:
        """One version of ``name`` (``latest``: the newest)."""
        if self.is_file or version == "latest":
            entries = await self.versions(name)
            chosen = catalogue.latest_of(entries) if version == "latest" else next(
                (entry for entry in entries if entry.version == version), None)
        else:
            data = await self._get(f"/v0.1/servers/{quote(name, safe='')}/versions/"
                                   f"{quote(version, safe='')}")
            try:
                chosen = catalogue.parse_entry(data)
            except CatalogueError as error:
                raise RegistryError(f"{self._where()} answered nonsense: {error}") from None
        if chosen is None or chosen.name != name or (version != "latest"
                                                     and chosen.version != version):
            raise NotInRegistry(f"{self._where()} has no version {version!r} of {name!r}")
        return chosen

    # --- HTTP ------------------------------------------------------------------------------

    def _where(self) -> str:
        return f"the registry {self.url}"

    def _page(self, data: Any) -> Page:
        try:
            return catalogue.parse_page(data)
        except CatalogueError as error:
            raise RegistryError(f"{self._where()} answered nonsense: {error}") from None

    async def _get(self, path: str) -> Any:
        url = self.url + path
        now = self.clock.seconds()
        cached = self._cache.get(url)
        if cached is not None and cached.expires > now:
            self._cache.move_to_end(url)
            return cached.data
        def timed_out(result: object, timeout: float) -> None:
            raise RegistryError(f"{self._where()} did not answer within {timeout:g} s")

        request = defer.ensureDeferred(self._fetch(url))
        request.addTimeout(self.timeout, self.reactor, onTimeoutCancel=timed_out)
        data, seconds = await request
        if seconds > 0:
            self._cache[url] = _Cached(now + seconds, data)
            self._cache.move_to_end(url)
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return data

    async def _fetch(self, url: str) -> tuple[Any, float]:
        assert self._agent is not None
        try:
            response: Any = await self._agent.request(
                b"GET", url.encode("ascii"), Headers({b"accept": [b"application/json"],
                                                      b"user-agent": [b"director"]}))
        except RegistryError:
            raise
        except defer.CancelledError:
            raise
        except Exception as error:
            reasons = getattr(error, "reasons", None)  # ResponseNeverReceived, ...: Failures
            cause = reasons[0].value if reasons else error
            reason = " ".join(str(cause).split()) or type(cause).__name__
            raise RegistryError(f"{self._where()} cannot be reached: {reason}") from None
        if response.code == 404:
            response.deliverBody(_Discard())
            raise NotInRegistry(f"{self._where()} has no {urlsplit(url).path}")
        body = _Body(self.max_bytes)
        if response.length is not None and isinstance(response.length, int) and \
                response.length > self.max_bytes:
            response.deliverBody(_Discard())
            raise RegistryError(f"{self._where()}: the answer is larger than {self.max_bytes} bytes")
        response.deliverBody(body)
        try:
            raw = await body.done
        except RegistryError as error:
            raise RegistryError(f"{self._where()}: {error}") from None
        if response.code != 200:
            raise RegistryError(f"{self._where()} answered HTTP {response.code} to "
                                f"{urlsplit(url).path}")
        try:
            data = jsontext.loads(raw)
        except ValueError:
            raise RegistryError(f"{self._where()} answered something that is not JSON") \
                from None
        return data, cache_seconds(response.headers, self.clock.seconds())

    # --- a file catalogue ---------------------------------------------------------------

    def _read_catalogue(self) -> tuple[list[Entry], int]:
        path = Path(urlsplit(self.url).path)
        try:
            files = sorted(path.glob("*.json"))[:MAX_CATALOGUE_FILES] if path.is_dir() \
                else [path]
            stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
        except OSError as error:
            raise RegistryError(f"the catalogue {path} cannot be read: {error.strerror}") \
                from None
        if self._catalogue is not None and self._catalogue[0] == stamp:
            return self._catalogue[1], self._catalogue[2]
        entries, skipped = [], 0
        for file in files:
            try:
                if os.path.getsize(file) > self.max_bytes:
                    raise RegistryError(f"it is larger than {self.max_bytes} bytes")
                data = jsontext.loads(file.read_bytes())
                if path.is_dir():
                    entries.append(catalogue.parse_entry(data))
                else:
                    page = catalogue.parse_page(data)
                    entries += page.entries
                    skipped += page.skipped
            except (OSError, ValueError, CatalogueError, RegistryError) as error:
                if not path.is_dir():
                    raise RegistryError(f"the catalogue {file} cannot be read: {error}") \
                        from None
                skipped += 1
        self._catalogue = (stamp, entries, skipped)
        return entries, skipped

    def _search_file(self, query: str, cursor: str | None, limit: int) -> Page:
        entries, skipped = self._read_catalogue()
        latest: dict[str, list[Entry]] = {}
        for entry in entries:
            latest.setdefault(entry.name, []).append(entry)
        needle = query.lower()
        newest = [catalogue.latest_of(versions) for versions in latest.values()]
        found = [entry for entry in newest if entry is not None
                 and (needle in entry.name.lower() or needle in entry.title.lower()
                      or needle in entry.description.lower())]
        found.sort(key=lambda entry: entry.name)
        offset = int(cursor) if cursor and cursor.isascii() and cursor.isdigit() else 0
        more = offset + limit < len(found)
        return Page(tuple(found[offset:offset + limit]),
                    str(offset + limit) if more else None, skipped)


def parse_limit(raw: str | None) -> int:
    """A page size from a query string (``DEFAULT_LIMIT`` when absent); ValueError if bad."""
    if not raw:
        return DEFAULT_LIMIT
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:
        raise ValueError(f"must be a whole number from 1 to {MAX_LIMIT}")
    return int(raw)

