"""Who is calling: API keys and cookie sessions resolved to a user, rate limits applied.

Credentials, in order: ``x-api-key``; ``Authorization: Bearer dk_…``; on MCP routes only, an
OAuth access token (``Authorization: Bearer dat_…``, ``director.oauth.server``: the route then
checks that it was issued for its playbook) and ``?key=dk_…`` (the parameter's name in any
case or encoding, see ``web/querykey.py``, which also redacts it from logs; two different
values are a 400); then the session cookie. A
credential that is present but wrong is a 401 — never a fall-through to the next source, and
never a 500.

Every authenticated request counts against its user's rate limit (all keys and cookie sessions
together: a person, or a script holding a session cookie, can do as much harm as a key), and a
key's requests against the key's own limit too; a 429 names the limit that refused it and
carries ``Retry-After``, and every answer carries ``RateLimit-*`` of the limit closest to
refusing (``accounts/ratelimit.py`` has the window's arithmetic).

Cookie-authenticated requests that change state must carry an ``Origin`` header (which the
edge has already checked against BASE_URL and ALLOWED_ORIGINS) or ``Content-Type:
application/json`` — which a cross-site HTML form cannot send and a cross-site script cannot
send without a CORS preflight that the edge refuses. That plus ``SameSite=Lax`` is the CSRF
defence; API keys need none (browsers never attach them by themselves).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit
from uuid import UUID

import attrs
from twisted.web.server import Request

from director import tracing
from director.accounts import store
from director.accounts.cache import AccountCache
from director.accounts.credentials import looks_like_api_key
from director.accounts.ratelimit import Decision, Limit, RateLimiter
from director.clock import Clock, utc_now
from director.config import Settings
from director.db.database import Database
from director.oauth.server.grants import AccessGrant, looks_like_access_token
from director.web.errors import ApiError, Forbidden, TooManyRequests, Unauthorized
from director.web.querykey import query_keys
from director.web.stored_headers import put, stored_name

if TYPE_CHECKING:
    from collections.abc import Callable

    from director.metrics import Metrics
    from director.oauth.server.tokens import TokenCache

SAFE_METHODS = (b"GET", b"HEAD", b"OPTIONS")
#: Every authenticated response says where its caller stands (``Decision.headers``' names).
_RATELIMIT_LIMIT = stored_name(b"RateLimit-Limit")
_RATELIMIT_REMAINING = stored_name(b"RateLimit-Remaining")
_RATELIMIT_RESET = stored_name(b"RateLimit-Reset")


@attrs.frozen
class Principal:
    user: store.User
    key: store.ApiKey | None = None
    session: store.Session | None = None
    session_token: str | None = None
    grant: AccessGrant | None = None  # an OAuth access token's

    @property
    def via(self) -> str:
        if self.grant is not None:
            return "oauth"
        return "api_key" if self.key is not None else "session"


def cookie_name(settings: Settings) -> str:
    # The __Secure- prefix makes browsers refuse the cookie over plain http.
    secure = urlsplit(settings.base_url).scheme == "https"
    return "__Secure-director_session" if secure else "director_session"


def read_cookie(header: bytes | None, name: str) -> str | None:
    """Tolerant ``Cookie`` parsing: clients that echo a raw ``Set-Cookie`` value (with
    ``Path=/; HttpOnly; Max-Age=…``) work, as do several cookies and odd spacing."""
    if not header:
        return None
    for part in header.decode("latin-1").split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key.strip() == name:
            value = value.strip().strip('"')
            return value or None
    return None


def _unauthorized(message: str) -> Unauthorized:
    return Unauthorized(message, headers={"WWW-Authenticate": 'Bearer realm="director"'})


class Authenticator:
    def __init__(self, settings: Settings, database: Database, cache: AccountCache,
                 limiter: RateLimiter, clock: Clock, metrics: Metrics | None = None,
                 oauth_tokens: TokenCache | None = None) -> None:
        self.settings = settings
        #: The service's clock: a session's age and a cookie's lifetime are read from it.
        self.clock = clock
        self.oauth_tokens = oauth_tokens
        self.metrics = metrics
        self.database = database
        self.cache = cache
        self.limiter = limiter
        self.cookie = cookie_name(settings)
        self.secure_cookie = urlsplit(settings.base_url).scheme == "https"
        #: Told of each request authenticated by an API key (accounts/usage.py: "last used").
        self.key_observers: list[Callable[[store.ApiKey], object]] = []

    # --- cookies ------------------------------------------------------------------------

    def set_session_cookie(self, request: Request, token: str,
                           expires_at: datetime.datetime) -> None:
        max_age = max(0, int((expires_at - utc_now(self.clock)).total_seconds()))
        attributes = [f"{self.cookie}={token}", "Path=/", f"Max-Age={max_age}", "HttpOnly",
                      "SameSite=Lax"]
        if self.secure_cookie:
            attributes.append("Secure")
        request.responseHeaders.addRawHeader(b"set-cookie", "; ".join(attributes).encode())

    def clear_session_cookie(self, request: Request) -> None:
        attributes = [f"{self.cookie}=", "Path=/", "Max-Age=0", "HttpOnly", "SameSite=Lax"]
        if self.secure_cookie:
            attributes.append("Secure")
        request.responseHeaders.addRawHeader(b"set-cookie", "; ".join(attributes).encode())

    # --- resolution ---------------------------------------------------------------------

    def _presented_key(self, request: Request, allow_query_key: bool) -> str | None:
        header = request.getHeader(b"x-api-key")
        if header is not None:
            return header.decode("latin-1").strip()
        authorization = request.getHeader(b"authorization")
        if authorization is not None:
            scheme, _, value = authorization.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and value.strip().startswith("dk_"):
                return value.strip()
        if allow_query_key:
            keys = query_keys(request.args)
            if len(keys) > 1:
                raise ApiError(f"the query string gives the key parameter {len(keys)} different "
                               "values; send one API key", code="ambiguous_api_key")
            if keys:
                return keys[0]
        return None

    async def authenticate(self, request: Request, *, allow_query_key: bool = False,
                           allow_pending: bool = False, allow_oauth: bool = False) -> Principal:
        """The caller, or an ``ApiError`` (401, 403, 429) saying why not. ``allow_oauth``:
        an OAuth access token is accepted (MCP routes, which check its playbook)."""
        if not tracing.spans():
            return await self._authenticate(request, allow_query_key, allow_pending,
                                             allow_oauth)
        with tracing.span("authenticate") as span:
            principal = await self._authenticate(request, allow_query_key, allow_pending,
                                                 allow_oauth)
            assert span is not None
            span.set_attribute("director.auth.via", principal.via)
            return principal

    async def _authenticate(self, request: Request, allow_query_key: bool,
                            allow_pending: bool, allow_oauth: bool) -> Principal:
        principal = await self._oauth(request, allow_oauth)
        if principal is None:
            principal = await self._resolve(request, allow_query_key)
        if principal is None:
            raise self._refused(
                "authentication required: send an API key (x-api-key or Authorization: Bearer) "
                "or sign in", "missing")
        if principal.user.status == "disabled":
            raise self._refused("this account is disabled", "disabled")
        if (principal.user.status == "pending" and self.settings.waitlist_enabled
                and not allow_pending):
            self._count_failure("pending")
            raise Forbidden("this account is waiting for an administrator to activate it",
                            code="user_pending")
        await self._apply_rate_limits(request, principal)
        if principal.session is not None and request.method not in SAFE_METHODS:
            self._check_csrf(request)

        if principal.key is not None:
            for observer in self.key_observers:
                observer(principal.key)
        return principal

    def _refused(self, message: str, reason: str) -> Unauthorized:
        """A 401, counted by ``reason`` (``director_auth_failures_total``)."""
        self._count_failure(reason)
        return _unauthorized(message)

    def _count_failure(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.auth_failure(reason)

    async def _oauth(self, request: Request, allowed: bool) -> Principal | None:
        """The caller of an OAuth access token (``Authorization: Bearer dat_…``), or None when
        the request carries none. An API key sent as well wins, as it did before."""
        authorization = request.getHeader(b"authorization")
        if authorization is None or request.getHeader(b"x-api-key") is not None:
            return None
        scheme, _, value = authorization.decode("latin-1").strip().partition(" ")
        token = value.strip()
        if scheme.lower() != "bearer" or not looks_like_access_token(token):
            return None
        if not allowed or self.oauth_tokens is None:
            raise self._token_refused("an OAuth access token is accepted only by the MCP "
                                      "endpoint of the playbook it was issued for; use an API "
                                      "key here")
        grant = await self.oauth_tokens.grant(token)
        user = await self.cache.user(grant.user_id) if grant is not None else None
        if grant is None or user is None:
            raise self._token_refused("the access token is invalid, expired or revoked; "
                                      "refresh it or authorize again")
        return Principal(user, grant=grant)

    def _token_refused(self, message: str) -> Unauthorized:
        """A 401 for an OAuth token (RFC 6750's ``invalid_token``)."""
        self._count_failure("invalid_token")
        return Unauthorized(message, code="invalid_token",
                            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

    async def _resolve(self, request: Request, allow_query_key: bool) -> Principal | None:
        presented = self._presented_key(request, allow_query_key)
        if presented is not None:
            if not looks_like_api_key(presented):
                raise self._refused("invalid API key", "invalid_key")
            key = await self.cache.key(presented)
            if key is None:
                raise self._refused("invalid API key", self.cache.refusal(presented))
            user = await self.cache.user(key.user_id)
            if user is None:
                raise self._refused("invalid API key", "invalid_key")
            return Principal(user, key=key)
        token = read_cookie(request.getHeader(b"cookie"), self.cookie)
        if token is None:
            return None
        session = await self.cache.session(token)
        if session is None:
            raise self._refused("the session has expired or was signed out; sign in again",
                                "expired_session")
        user = await self.cache.user(session.user_id)
        if user is None:
            raise self._refused("the session has expired or was signed out; sign in again",
                                "expired_session")
        await self._renew_if_due(request, token, session)
        return Principal(user, session=session, session_token=token)

    async def _renew_if_due(self, request: Request, token: str, session: store.Session) -> None:
        """Sliding expiry: at most one write per session per day."""
        now = utc_now(self.clock)
        if now - session.renewed_at < store.SESSION_RENEW_AFTER:
            return
        renewed = await self.database.run(store.renew_session(session.id))
        # A session deleted meanwhile (signed out elsewhere): its cookie expires at once.
        expires_at = renewed if renewed is not None else now
        self.cache.remember_session(token, attrs.evolve(
            session, expires_at=expires_at, renewed_at=now))
        self.set_session_cookie(request, token, expires_at)

    def _check_csrf(self, request: Request) -> None:
        if request.getHeader(b"origin") is not None:
            return  # the edge allowed this origin already
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip()
        if content_type.lower() == b"application/json":
            return
        raise Forbidden(
            "a cookie-authenticated request that changes state needs an Origin header or a JSON "
            "body (cross-site request forgery protection)", code="csrf_rejected")

    def _limits(self, principal: Principal) -> list[Limit]:
        settings = self.settings
        user = Limit("user", principal.user.id, settings.user_rate_limit_max_requests,
                     settings.user_rate_limit_window_seconds, "this user")
        key = principal.key
        if principal.grant is not None:  # a connected app: limited like a key of its own
            return [Limit("oauth", principal.grant.id, settings.rate_limit_max_requests,
                          settings.rate_limit_window_seconds, "this connected app"), user]
        if key is None:
            return [user]
        return [Limit("key", key.id, key.rate_limit_max_requests or settings.rate_limit_max_requests,
                      key.rate_limit_window_seconds or settings.rate_limit_window_seconds,
                      "this API key"), user]

    async def _apply_rate_limits(self, request: Request, principal: Principal) -> None:
        if not tracing.spans():
            return await self._rate_limit(request, principal)
        with tracing.span("rate limit"):
            return await self._rate_limit(request, principal)

    async def _rate_limit(self, request: Request, principal: Principal) -> None:
        decision = await self.limiter.check(*self._limits(principal))
        headers = request.responseHeaders
        put(headers, _RATELIMIT_LIMIT, b"%d" % decision.limit.max_requests)
        put(headers, _RATELIMIT_REMAINING, b"%d" % decision.remaining)
        put(headers, _RATELIMIT_RESET, b"%d" % decision.reset_seconds)
        if not decision.allowed:
            if self.metrics is not None:
                self.metrics.rate_limited.inc()
            raise too_many_requests(decision)

    def client_address(self, request: Request) -> str:
        return client_address(request, self.settings.trusted_proxies)


def too_many_requests(decision: Decision) -> TooManyRequests:
    """The 429 of a refusing limit, naming it."""
    limit = decision.limit
    return TooManyRequests(
        f"rate limit of {limit.max_requests} requests per {limit.window_seconds} s exceeded "
        f"for {limit.name}; retry in {decision.reset_seconds} s",
        details={"retry_after": decision.reset_seconds, "limit": limit.name,
                 "max_requests": limit.max_requests, "window_seconds": limit.window_seconds},
        headers=decision.headers())


def parse_uuid(value: str) -> UUID:
    """A path id; anything that is not a UUID is simply not found (never a 500)."""
    try:
        return UUID(value)
    except ValueError:
        raise ApiError(f"no such object: {value!r}", status=404, code="not_found") from None


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:1.2.3.4 on a dual-stack socket
    return mapped or address


def client_address(request: Request, trusted_proxies: Sequence[Network] = ()) -> str:
    """The client's address: the peer's, or, when the peer is a trusted proxy, the address
    that proxy saw, from ``X-Forwarded-For``.

    The header is read from its right end, where each trusted proxy appended the address of
    whoever connected to it, and the first address that is not a trusted proxy is the client.
    Everything left of that was written by the client itself and is never believed; an entry
    that is not an address stops the walk at the last one that was.
    """
    peer: Any = request.getClientAddress()
    host = str(getattr(peer, "host", "unknown"))
    current = _address(host)
    if current is None or not trusted_proxies:
        return host
    forwarded = b",".join(request.requestHeaders.getRawHeaders(b"x-forwarded-for") or [])
    hops = forwarded.decode("latin-1").split(",") if forwarded else []
    while any(current in network for network in trusted_proxies) and hops:
        previous = _address(hops.pop())
        if previous is None:
            break
        current = previous
    return str(current)
