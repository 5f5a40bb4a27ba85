"""The authorization server's HTTP endpoints, except the authorization page (``pages``).

* ``/.well-known/oauth-protected-resource[/playbooks/{id}/mcp|sse]``: RFC 9728 metadata;
* ``/.well-known/oauth-authorization-server`` and ``/.well-known/openid-configuration``:
  RFC 8414 metadata (the same document);
* ``POST /oauth/token``: ``authorization_code`` (PKCE) and ``refresh_token`` (rotation);
* ``POST /oauth/register``: Dynamic Client Registration (RFC 7591), limited per address;
* ``POST /oauth/revoke``: RFC 7009;
* ``GET /connect``: the original's consent path, sent on to ``/oauth/authorize``.

Errors are RFC 6749 section 5.2's ``{"error", "error_description"}`` with the status it gives
(400; 401 ``invalid_client``), never the REST API's shape: OAuth clients read these. Token
answers carry ``Cache-Control: no-store``.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from director import jsontext
from director.accounts.ratelimit import Limit
from director.clock import Clock, utc_now
from director.db.database import DatabaseUnavailable
from director.oauth.server import clients as client_store
from director.oauth.server import grants
from director.oauth.server.clients import PUBLIC, Client, ClientMetadataError
from director.oauth.server.metadata import (
    AUTHORIZATION_SERVER_PATH,
    OPENID_CONFIGURATION_PATH,
    PROTECTED_RESOURCE_PATH,
    REGISTER_PATH,
    REVOKE_PATH,
    TOKEN_PATH,
    InvalidResource,
    InvalidScope,
    authorization_server_document,
    parse_resource,
    parse_scope,
    protected_resource_document,
)
from director.studio.forms import FormError, read_form
from director.web.errors import install_error_handlers

if TYPE_CHECKING:
    from director.config import Settings
    from director.db.database import Database
    from director.oauth.server.documents import DocumentFetcher
    from director.oauth.server.tokens import TokenCache
    from director.playbooks.cache import PlaybookCache
    from director.studio.routes import Studio
    from director.web.auth import Authenticator

log = Logger(namespace="oauth")

oauth = Klein()
install_error_handlers(oauth)
METADATA_CACHE = b"public, max-age=300"


class OAuthError(Exception):
    """An RFC 6749 error answer: ``error`` code, a description for the developer."""

    def __init__(self, error: str, description: str, status: int = 400,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status
        self.headers = headers or {}


def json_answer(request: Request, status: int, body: Any, *, cache: bytes = b"no-store") -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", cache)
    if cache == b"no-store":
        request.setHeader(b"pragma", b"no-cache")
    return json.dumps(body).encode()


def _oauth_error(instance: Any, request: Request, failure: Failure) -> bytes:
    error = failure.value
    assert isinstance(error, OAuthError)
    for name, value in error.headers.items():
        request.setHeader(name.encode(), value.encode())
    return json_answer(request, error.status, {"error": error.error,
                                               "error_description": error.description})


def _unavailable(instance: Any, request: Request, failure: Failure) -> bytes:
    request.setHeader(b"retry-after", b"2")
    return json_answer(request, 503, {"error": "temporarily_unavailable",
                                      "error_description": "the database is unavailable; "
                                                           "retry shortly"})


# Tried in order of registration: these before the shared catch-all ones.
_first: list[Any] = [([OAuthError], _oauth_error), ([DatabaseUnavailable], _unavailable)]
oauth._error_handlers[0:0] = _first


class ServerBase:
    """What the endpoint families (this module's and ``pages``) share; ``authority`` binds it."""

    settings: Settings
    database: Database
    auth: Authenticator
    playbooks: PlaybookCache
    studio: Studio
    reactor: Clock
    tokens: TokenCache
    documents: DocumentFetcher
    lifetimes: grants.Lifetimes


class FromRoot(Resource):
    """Hands a request to ``application`` with its whole path, whatever route of the outer
    application matched it: this app's routes are written as absolute paths."""

    isLeaf = True

    def __init__(self, application: Resource) -> None:
        super().__init__()
        self.application = application

    def render(self, request: Request) -> Any:
        request.postpath = [*(request.prepath or []), *(request.postpath or [])]
        request.prepath = []
        return self.application.render(request)


# --- request parameters --------------------------------------------------------------------


def form_parameters(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (RFC 6749 section 3.2), each parameter at
    most once (section 3.1), empty values meaning absent; no NUL anywhere (no identifier or
    token has one, and PostgreSQL refuses it in text)."""
    try:
        form = read_form(request)
    except FormError as error:
        raise OAuthError("invalid_request", error.message) from None
    if form.files:
        raise OAuthError("invalid_request", "send application/x-www-form-urlencoded")
    parameters: dict[str, str] = {}
    for name, values in form.fields.items():
        if len(values) > 1:
            raise OAuthError("invalid_request", f"{name} is given {len(values)} times")
        if "\x00" in name or "\x00" in values[0]:
            raise OAuthError("invalid_request", f"{name[:60]!r} holds a NUL character")
        if values[0] != "":
            parameters[name] = values[0]
    return parameters


def required(parameters: dict[str, str], name: str) -> str:
    value = parameters.get(name)
    if value is None:
        raise OAuthError("invalid_request", f"{name} is required")
    return value


def _basic_credentials(request: Request) -> tuple[str, str] | None:
    """``Authorization: Basic`` (RFC 6749 section 2.3.1: each part form-urlencoded)."""
    header = request.getHeader(b"authorization")
    if header is None:
        return None
    scheme, _, value = header.decode("latin-1").strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise _invalid_client("the Basic credentials are not base64 of id:secret", True) from None
    client_id, separator, secret = decoded.partition(":")
    if not separator:
        raise _invalid_client("the Basic credentials are not id:secret", True)
    return unquote(client_id.replace("+", " ")), unquote(secret.replace("+", " "))


def _invalid_client(description: str, basic: bool = False) -> OAuthError:
    headers = {"WWW-Authenticate": 'Basic realm="director"'} if basic else {}
    return OAuthError("invalid_client", description, 401, headers)


def canonical_resource(server: ServerBase, parameters: dict[str, str]) -> str | None:
    raw = parameters.get("resource")
    if raw is None:
        return None
    try:
        return parse_resource(server.settings, raw).url
    except InvalidResource as problem:
        raise OAuthError("invalid_target", str(problem)) from None


# --- the endpoints -------------------------------------------------------------------------


class OAuthEndpoints(ServerBase):
    app = oauth

    # --- discovery -------------------------------------------------------------------------

    @app.route(PROTECTED_RESOURCE_PATH, methods=["GET", "HEAD"])
    def resource_metadata(self, request: Request) -> bytes:
        return json_answer(request, 200, protected_resource_document(self.settings, None),
                           cache=METADATA_CACHE)

    @app.route(PROTECTED_RESOURCE_PATH + "/<path:path>", methods=["GET", "HEAD"])
    def playbook_metadata(self, request: Request, path: str) -> bytes:
        base = self.settings.base_url
        origin = base[: len(base) - len(urlsplit(base).path)] if urlsplit(base).path else base
        try:
            resource = parse_resource(self.settings, origin + "/" + path)
        except InvalidResource:
            return json_answer(request, 404, {
                "error": "not_found",
                "error_description": "no protected resource here: the resources are the "
                                     f"playbooks' endpoints, {PROTECTED_RESOURCE_PATH}"
                                     "/playbooks/{id}/mcp"})
        return json_answer(request, 200, protected_resource_document(self.settings, resource),
                           cache=METADATA_CACHE)

    @app.route(AUTHORIZATION_SERVER_PATH, methods=["GET", "HEAD"])
    @app.route(OPENID_CONFIGURATION_PATH, methods=["GET", "HEAD"],
               endpoint="openid_configuration")
    def server_metadata(self, request: Request) -> bytes:
        return json_answer(request, 200, authorization_server_document(self.settings),
                           cache=METADATA_CACHE)

    @app.route("/connect", methods=["GET", "HEAD"])
    def connect(self, request: Request) -> bytes:
        """The original's consent page: its query goes on to the authorization endpoint."""
        query = request.uri.partition(b"?")[2]
        request.setResponseCode(302)
        request.setHeader(b"location", b"/oauth/authorize" + (b"?" + query if query else b""))
        request.setHeader(b"cache-control", b"no-store")
        return b""

    # --- clients at the token and revocation endpoints -------------------------------------

    async def authenticated_client(self, request: Request,
                                   parameters: dict[str, str]) -> Client:
        """The client a request comes from: public clients name themselves (``client_id``),
        confidential ones authenticate with Basic or ``client_secret`` in the body."""
        basic = _basic_credentials(request)
        if basic is not None and "client_secret" in parameters:
            raise OAuthError("invalid_request", "use one client authentication method, not "
                                                "Basic and client_secret together")
        client_id = basic[0] if basic is not None else parameters.get("client_id")
        if basic is not None and parameters.get("client_id", client_id) != client_id:
            raise OAuthError("invalid_request", "client_id differs from the Basic credentials")
        if client_id is None:
            raise _invalid_client("client_id is required (or Basic client credentials)")
        client = await self.database.run(client_store.known_client(client_id))
        if client is None:
            raise _invalid_client(f"unknown client {client_id[:200]!r}", basic is not None)
        secret = basic[1] if basic is not None else parameters.get("client_secret")
        if client.auth_method == PUBLIC:
            if secret is not None:
                raise _invalid_client("this client is public: it has no secret to send",
                                      basic is not None)
        elif secret is None or not client_store.secret_matches(client, secret):
            raise _invalid_client("the client secret is missing or wrong", basic is not None)
        return client

    # --- token -----------------------------------------------------------------------------

    @app.route(TOKEN_PATH, methods=["POST"])
    async def token(self, request: Request) -> bytes:
        parameters = form_parameters(request)
        client = await self.authenticated_client(request, parameters)
        grant_type = required(parameters, "grant_type")
        resource = canonical_resource(self, parameters)
        if grant_type == "authorization_code":
            outcome = await self.database.run(grants.exchange_code(
                required(parameters, "code"), client.client_id, parameters.get("redirect_uri"),
                parameters.get("code_verifier"), resource, self.lifetimes))
        elif grant_type == "refresh_token":
            scope = None
            if "scope" in parameters:
                try:
                    scope = parse_scope(parameters["scope"])
                except InvalidScope as problem:
                    raise OAuthError("invalid_scope", str(problem)) from None
            outcome = await self.database.run(grants.refresh(
                required(parameters, "refresh_token"), client.client_id, scope, resource,
                self.lifetimes))
        else:
            raise OAuthError("unsupported_grant_type",
                             f"grant_type {grant_type[:60]!r} is not supported; use "
                             "authorization_code or refresh_token")
        if isinstance(outcome, grants.Refusal):
            if outcome.revoked is not None:
                self.tokens.grant_revoked(outcome.revoked)
                log.warn("OAuth grant revoked: {reason}", reason=outcome.description,
                         client_id=client.client_id, grant_id=str(outcome.revoked))
            raise OAuthError(outcome.error, outcome.description)
        return json_answer(request, 200, outcome.response())

    # --- registration ----------------------------------------------------------------------

    @app.route(REGISTER_PATH, methods=["POST"])
    async def register(self, request: Request) -> bytes:
        body = _registration_body(request)
        try:
            registration = client_store.new_registration(body, utc_now(self.reactor))
        except ClientMetadataError as problem:
            raise OAuthError(problem.error, problem.description) from None
        address = self.auth.client_address(request)
        decision = await self.auth.limiter.check(Limit(
            "oauth_register", address, self.settings.oauth_registrations_per_hour, 3600,
            "client registrations from this address"))
        for name, value in decision.headers().items():
            request.setHeader(name.encode(), value.encode())
        if not decision.allowed:
            raise OAuthError("temporarily_unavailable",
                             f"too many client registrations from this address; retry in "
                             f"{decision.reset_seconds} s", 429,
                             {"Retry-After": str(decision.reset_seconds)})
        await self.database.run(client_store.insert_registration(registration, address))
        log.info("OAuth client registered: {name}", name=registration.client.display_name,
                 client_id=registration.client.client_id, address=address)
        return json_answer(request, 201, registration.response())

    # --- revocation ------------------------------------------------------------------------

    @app.route(REVOKE_PATH, methods=["POST"])
    async def revoke(self, request: Request) -> bytes:
        parameters = form_parameters(request)
        client = await self.authenticated_client(request, parameters)
        token = required(parameters, "token")
        revoked = await self.database.run(grants.revoke_token(token, client.client_id))
        if revoked is not None:
            self.tokens.grant_revoked(revoked)
            log.info("OAuth grant revoked by its client", client_id=client.client_id,
                     grant_id=str(revoked))
        request.setResponseCode(200)
        request.setHeader(b"cache-control", b"no-store")
        return b""


def _registration_body(request: Request) -> dict[str, Any]:
    content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if content_type != b"application/json":
        raise OAuthError("invalid_client_metadata", "send the client metadata as "
                                                    "application/json (RFC 7591)")
    raw = request.content.read() if request.content is not None else b""
    try:
        body = jsontext.loads(raw)
    except ValueError as problem:
        raise OAuthError("invalid_client_metadata", f"the body is not valid JSON: {problem}") \
            from None
    if not isinstance(body, dict):
        raise OAuthError("invalid_client_metadata", "the body must be a JSON object")
    return body
