"""Organisations: people sign in to the Studio through the organisation's OpenID Connect
provider (``OIDC_ISSUER``, ``OIDC_CLIENT_ID``, ``OIDC_CLIENT_SECRET``), and are matched to
accounts by verified email, so that Director can sit behind the company's identity provider.
Whatever then asks to sign in — the Studio, an MCP client's authorization — goes through it.

The flow is the authorization code flow of OpenID Connect Core with PKCE:
``/studio/login/oidc`` redirects to the provider with ``state``, ``nonce`` and a code
challenge, kept (with where to go next) in a short-lived cookie signed with a key derived from
the auth secret, so that any instance can finish what another started; the provider sends the
person back to ``/studio/login/oidc/callback``, where the code is exchanged for the ID token
at the provider's token endpoint. That exchange is a direct TLS request to the issuer's own
endpoint, so the ID token's origin is established by TLS, which OpenID Connect Core section
3.1.3.7 (step 6) allows in place of checking its signature; its claims are then checked as
it requires: ``iss`` is the issuer, ``aud`` holds the client id (``azp`` too when there are
several), it has not expired, and ``nonce`` is the one sent. The email must be verified
(``email_verified`` true, in the ID token or from the userinfo endpoint); an account with that
email is signed in (a disabled one is refused), and a new person gets an account (pending under
``WAITLIST_ENABLED``) with no password: they sign in through the provider.

The provider is the operator's, configured by them, so it is reached without the upstream
servers' SSRF rail (company providers often live on private addresses); TLS is verified.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import urllib.parse
from typing import Any

import attrs
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from twisted.web.server import Request
from twisted.web.template import Tag, tags
from zope.interface import implementer

from director import __version__, jsontext
from director.accounts import store
from director.accounts.validation import ValidationFailed, normalise_email
from director.clock import Clock
from director.config import Settings
from director.oauth.server.documents import LimitedBody
from director.oauth.server.grants import s256
from director.studio.base import StudioBase, safe_next, studio
from director.web.auth import read_cookie

log = Logger(namespace="oauth")

COOKIE = "director_oidc"
COOKIE_PATH = "/studio/login/oidc"
START_PATH = "/studio/login/oidc"
CALLBACK_PATH = "/studio/login/oidc/callback"
#: How long a person may take at the provider.
FLOW_SECONDS = 600
REQUEST_SECONDS = 10.0
MAX_BODY_BYTES = 256 * 1024
#: Clock difference tolerated between this host and the provider.
LEEWAY_SECONDS = 60
#: A password hash that never matches: accounts made by the provider sign in through it.
NO_PASSWORD = "oidc:no-password"  # noqa: S105 - a marker, not a secret
_INFO = b"director oidc state v1"


class SignInFailed(Exception):
    """The provider's answer cannot sign anyone in; the text says why, for the person."""


@attrs.frozen
class Provider:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    userinfo_endpoint: str | None
    basic_auth: bool  # client_secret_basic (else client_secret_post)


# --- the signed state cookie -----------------------------------------------------------------


class StateCookies:
    """``state``, ``nonce``, the PKCE verifier and where to go next, signed (HMAC-SHA256 with
    a key of its own derived from the auth secret) and valid ``FLOW_SECONDS``."""

    def __init__(self, auth_secret: str, clock: Clock) -> None:
        self.clock = clock  # the reactor: a cookie's expiry is a wall-clock time
        self._key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                         info=_INFO).derive(auth_secret.encode())

    def seal(self, values: dict[str, str]) -> str:
        payload = base64.urlsafe_b64encode(json.dumps(
            {**values, "expires": int(self.clock.seconds()) + FLOW_SECONDS}).encode()).decode()
        return payload + "." + self._sign(payload)

    def open(self, value: str | None) -> dict[str, Any] | None:
        if not value or "." not in value:
            return None
        payload, _, signature = value.rpartition(".")
        if not hmac.compare_digest(self._sign(payload), signature):
            return None
        try:
            values = json.loads(base64.urlsafe_b64decode(payload))
        except ValueError:
            return None
        if not isinstance(values, dict) or values.get("expires", 0) < self.clock.seconds():
            return None
        return values

    def _sign(self, payload: str) -> str:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()


# --- talking to the provider -----------------------------------------------------------------


@implementer(IBodyProducer)
class _Form:
    def __init__(self, fields: dict[str, str]) -> None:
        self.body = urllib.parse.urlencode(fields).encode()
        self.length = len(self.body)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class ProviderClient:
    """Discovery, the token exchange and userinfo: JSON over verified TLS, bounded in size and
    time."""

    def __init__(self, reactor: Any, settings: Settings) -> None:
        self.reactor = reactor
        self.settings = settings
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        self._provider: Provider | None = None

    async def _json(self, method: bytes, url: str, headers: dict[bytes, bytes],
                    fields: dict[str, str] | None = None) -> tuple[int, Any]:
        sent = Headers({b"accept": [b"application/json"],
                        b"user-agent": [f"Director/{__version__}".encode()]})
        for name, value in headers.items():
            sent.setRawHeaders(name, [value])
        body = None
        if fields is not None:
            sent.setRawHeaders(b"content-type", [b"application/x-www-form-urlencoded"])
            body = _Form(fields)
        request = defer.ensureDeferred(self._exchange(method, url, sent, body))
        request.addTimeout(REQUEST_SECONDS, self.reactor)
        try:
            return await request
        except SignInFailed:
            raise
        except Exception as failure:
            reasons = getattr(failure, "reasons", None)
            reason = ("; ".join(r.getErrorMessage() for r in reasons) if reasons
                      else " ".join(str(failure).split()) or type(failure).__name__)
            raise SignInFailed(f"the sign-in provider could not be reached ({url}: "
                               f"{reason[:200]})") from None

    async def _exchange(self, method: bytes, url: str, headers: Headers,
                        body: Any) -> tuple[int, Any]:
        response: Any = await self.agent.request(method, url.encode("ascii"), headers, body)
        reader = LimitedBody(MAX_BODY_BYTES)
        response.deliverBody(reader)
        raw = await reader.done
        try:
            return response.code, jsontext.loads(raw, repair=True)
        except ValueError:
            raise SignInFailed(f"the sign-in provider answered {response.code} with something "
                               f"that is not JSON ({url})") from None

    async def provider(self) -> Provider:
        """The provider's metadata (OpenID Connect Discovery), fetched once."""
        if self._provider is not None:
            return self._provider
        issuer = self.settings.oidc_issuer
        assert issuer is not None
        url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        status, document = await self._json(b"GET", url, {})
        if status != 200 or not isinstance(document, dict):
            raise SignInFailed(f"{url} answered {status}, not the provider's metadata")
        if document.get("issuer") != issuer:
            raise SignInFailed(f"the provider calls itself {str(document.get('issuer'))[:200]!r}, "
                               f"not OIDC_ISSUER={issuer}")
        endpoints = {}
        for name in ("authorization_endpoint", "token_endpoint"):
            value = document.get(name)
            if not isinstance(value, str) or not value.startswith("https://"):
                raise SignInFailed(f"the provider's {name} is not an https URL")
            endpoints[name] = value
        userinfo = document.get("userinfo_endpoint")
        methods = document.get("token_endpoint_auth_methods_supported") or \
            ["client_secret_basic"]
        self._provider = Provider(
            issuer, endpoints["authorization_endpoint"], endpoints["token_endpoint"],
            userinfo if isinstance(userinfo, str) and userinfo.startswith("https://") else None,
            "client_secret_basic" in methods or "client_secret_post" not in methods)
        return self._provider

    async def tokens(self, provider: Provider, code: str, verifier: str) -> dict[str, Any]:
        settings = self.settings
        assert settings.oidc_client_id is not None and settings.oidc_client_secret is not None
        fields = {"grant_type": "authorization_code", "code": code, "code_verifier": verifier,
                  "redirect_uri": settings.base_url + CALLBACK_PATH}
        headers: dict[bytes, bytes] = {}
        if provider.basic_auth:
            pair = (urllib.parse.quote(settings.oidc_client_id, safe="") + ":"
                    + urllib.parse.quote(settings.oidc_client_secret, safe=""))
            headers[b"authorization"] = b"Basic " + base64.b64encode(pair.encode())
        else:
            fields.update(client_id=settings.oidc_client_id,
                          client_secret=settings.oidc_client_secret)
        status, answer = await self._json(b"POST", provider.token_endpoint, headers, fields)
        if status != 200 or not isinstance(answer, dict) or \
                not isinstance(answer.get("id_token"), str):
            error = answer.get("error_description") or answer.get("error") \
                if isinstance(answer, dict) else None
            raise SignInFailed(f"the provider refused the sign-in code ({status}"
                               f"{': ' + str(error)[:200] if error else ''})")
        return answer

    async def userinfo(self, provider: Provider, access_token: str) -> dict[str, Any]:
        if provider.userinfo_endpoint is None:
            return {}
        status, answer = await self._json(b"GET", provider.userinfo_endpoint, {
            b"authorization": b"Bearer " + access_token.encode("ascii", "replace")})
        return answer if status == 200 and isinstance(answer, dict) else {}


# --- the ID token's claims -------------------------------------------------------------------


def id_token_claims(id_token: str) -> dict[str, Any]:
    """The payload of a JWT (its signature is not what proves it here: module docstring)."""
    parts = id_token.split(".")
    if len(parts) != 3:
        raise SignInFailed("the provider's ID token is not a JWT")
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = jsontext.loads(payload, repair=True)
    except ValueError:
        raise SignInFailed("the provider's ID token cannot be read") from None
    if not isinstance(claims, dict):
        raise SignInFailed("the provider's ID token cannot be read")
    return claims


def check_claims(claims: dict[str, Any], settings: Settings, nonce: str, now: float) -> None:
    """OpenID Connect Core 3.1.3.7: issuer, audience, expiry, nonce; ``now``: the wall clock
    (the reactor's ``seconds()``), which the token's ``exp`` and ``iat`` are in."""
    if claims.get("iss") != settings.oidc_issuer:
        raise SignInFailed(f"the ID token was issued by {str(claims.get('iss'))[:200]!r}, not "
                           f"{settings.oidc_issuer}")
    audience = claims.get("aud")
    audiences = audience if isinstance(audience, list) else [audience]
    if settings.oidc_client_id not in audiences or (
            len(audiences) > 1 and claims.get("azp") != settings.oidc_client_id):
        raise SignInFailed("the ID token is not for this Director (its audience is another "
                           "client)")
    expires = claims.get("exp")
    if not isinstance(expires, int | float) or expires + LEEWAY_SECONDS < now:
        raise SignInFailed("the ID token has expired; sign in again")
    if not isinstance(claims.get("nonce"), str) or \
            not hmac.compare_digest(claims["nonce"], nonce):
        raise SignInFailed("the ID token does not answer this sign-in (nonce); sign in again")


def verified_email(claims: dict[str, Any]) -> str | None:
    email = claims.get("email")
    verified = claims.get("email_verified")
    if isinstance(email, str) and (verified is True or verified == "true"):
        return email
    return None


# --- the pages ---------------------------------------------------------------------------------


class OrganisationSignIn(StudioBase):
    oidc: ProviderClient
    oidc_states: StateCookies

    def organisation_link(self, next_path: str) -> Tag | str:
        """The login page's "Sign in with …" link, when a provider is configured."""
        if self.settings.oidc_issuer is None:
            return ""
        href = START_PATH + "?" + urllib.parse.urlencode({"next": next_path})
        return tags.p(tags.a(f"Sign in with {self.settings.oidc_name}", href=href,
                             class_="button secondary"), class_="actions")

    def _oidc_cookie(self, request: Request, value: str, max_age: int) -> None:
        secure = "; Secure" if self.auth.secure_cookie else ""
        request.responseHeaders.addRawHeader(
            b"set-cookie", f"{COOKIE}={value}; Path={COOKIE_PATH}; Max-Age={max_age}; "
                           f"HttpOnly; SameSite=Lax{secure}".encode())

    @studio.route("/login/oidc", methods=["GET"])
    async def oidc_start(self, request: Request) -> bytes:
        if self.settings.oidc_issuer is None:
            return self.error_page(request, 404, "Not found", "There is no such page.")
        next_path = safe_next((request.args.get(b"next") or [b""])[0].decode("latin-1"))
        try:
            provider = await self.oidc.provider()
        except SignInFailed as failure:
            log.warn("OpenID Connect sign-in unavailable: {reason}", reason=str(failure))
            return self.error_page(request, 502, "Cannot sign in", str(failure) + ".")
        state, nonce, verifier = (secrets.token_urlsafe(24), secrets.token_urlsafe(24),
                                  secrets.token_urlsafe(48))
        self._oidc_cookie(request, self.oidc_states.seal(
            {"state": state, "nonce": nonce, "verifier": verifier, "next": next_path}),
            FLOW_SECONDS)
        assert self.settings.oidc_client_id is not None
        query = urllib.parse.urlencode({
            "response_type": "code", "client_id": self.settings.oidc_client_id,
            "redirect_uri": self.settings.base_url + CALLBACK_PATH,
            "scope": "openid email profile", "state": state, "nonce": nonce,
            "code_challenge": s256(verifier), "code_challenge_method": "S256"})
        separator = "&" if "?" in provider.authorization_endpoint else "?"
        return self.redirect(request, provider.authorization_endpoint + separator + query, 302)

    @studio.route("/login/oidc/callback", methods=["GET"])
    async def oidc_callback(self, request: Request) -> bytes:
        if self.settings.oidc_issuer is None:
            return self.error_page(request, 404, "Not found", "There is no such page.")
        flow = self.oidc_states.open(read_cookie(request.getHeader(b"cookie"), COOKIE))
        self._oidc_cookie(request, "", 0)
        arguments = {name.decode("latin-1"): values[0].decode("utf-8", "replace")
                     for name, values in request.args.items() if values}
        try:
            user = await self._signed_in_user(flow, arguments)
        except SignInFailed as failure:
            log.info("OpenID Connect sign-in refused: {reason}", reason=str(failure))
            return self.error_page(request, 403, "Cannot sign in", str(failure) + ".")
        await self.api._start_session(request, user)
        log.info("signed in through the OpenID Connect provider", user_id=str(user.id))
        assert flow is not None
        return self.redirect(request, safe_next(flow.get("next")))

    async def _signed_in_user(self, flow: dict[str, Any] | None,
                              arguments: dict[str, str]) -> store.User:
        if flow is None or not hmac.compare_digest(str(flow.get("state")),
                                                   arguments.get("state", "")):
            raise SignInFailed("this sign-in expired or was not started here; sign in again")
        if "error" in arguments:
            raise SignInFailed(f"the provider did not sign you in: "
                               f"{arguments.get('error_description') or arguments['error']}"[:300])
        if not arguments.get("code"):
            raise SignInFailed("the provider sent no code")
        provider = await self.oidc.provider()
        answer = await self.oidc.tokens(provider, arguments["code"], str(flow["verifier"]))
        claims = id_token_claims(answer["id_token"])
        check_claims(claims, self.settings, str(flow["nonce"]), self.reactor.seconds())
        email = verified_email(claims)
        if email is None and isinstance(answer.get("access_token"), str):
            info = await self.oidc.userinfo(provider, answer["access_token"])
            if info.get("sub") == claims.get("sub"):
                email = verified_email(info)
        if email is None:
            raise SignInFailed("the provider did not give a verified email address, which is "
                               "how accounts are matched")
        return await self._account_for(email)

    async def _account_for(self, email: str) -> store.User:
        try:
            address = normalise_email(email)
        except ValidationFailed:
            raise SignInFailed(f"{email[:200]!r} is not an email address Director "
                               "accepts") from None
        found = await self.database.run(store.user_by_email(address))
        user = found if found is not None else await self._new_account(address)
        if user.status == "disabled":
            raise SignInFailed("this account is disabled")
        return user

    async def _new_account(self, address: str) -> store.User:
        status = "pending" if self.settings.waitlist_enabled else "active"
        try:
            user, key = await self.database.run(store.create_user(address, NO_PASSWORD, status))
        except store.EmailTaken:  # created a moment ago by another sign-in
            raced = await self.database.run(store.user_by_email(address))
            if raced is None:
                raise SignInFailed("the account could not be created; sign in again") from None
            return raced
        self.auth.cache.users[user.id] = user
        if key is not None:
            self.auth.cache.remember_key(key.record)
        log.info("account created by the OpenID Connect provider", user_id=str(user.id),
                 status=status)
        return user
