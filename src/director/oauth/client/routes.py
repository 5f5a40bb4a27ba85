"""Upstream OAuth on the web: the REST API's authorize and disconnect, the callback, and
Director's Client ID Metadata Document.

* ``POST /api/v1/playbooks/{id}/servers/{name}/authorize`` (optional body: ``client_id``,
  ``client_secret`` the user got from the authorization server) answers the authorize URL to
  open in the owner's browser;
* ``DELETE /api/v1/playbooks/{id}/servers/{name}/authorization`` revokes (RFC 7009, where the
  server offers it) and deletes the owner's tokens for that server (for every playbook that
  uses it: they are the user's, per authorization server and resource);
* ``GET /oauth/{playbookId}/{serverName}/callback``: where the authorization server sends the
  browser back. It needs the owner signed in (a browser that is not goes through the Studio's
  sign-in page and comes back), completes the flow on whichever instance it reaches, and lands
  on the Studio: the playbook page on success, the server's Connect page with the reason
  otherwise;
* ``GET /oauth/client-metadata.json``: the document whose URL is Director's client id where
  authorization servers accept one (``identity``); 404 unless ``BASE_URL`` is https.

The paths ``/oauth/authorize``, ``/oauth/token``, ``/oauth/register``, ``/oauth/revoke`` and
``/.well-known/*`` belong to Director's own authorization server (issue 13), not to this.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from uuid import UUID

from twisted.web.server import Request

from director.accounts.validation import ValidationFailed
from director.oauth.client import identity, store
from director.oauth.client.fetch import FetchError
from director.oauth.client.flow import NotRequired
from director.oauth.client.identity import NeedClient
from director.playbooks.model import Server
from director.web.api import api, reject_unknown_fields
from director.web.auth import read_cookie
from director.web.errors import (
    ApiError,
    Conflict,
    NotFound,
    Unauthorized,
    read_json_object,
    write_json,
)
from director.web.openapi_parts import COMMON_ERRORS, NON_BLANK, SECURITY, error_answer

if TYPE_CHECKING:
    from director.config import Settings
    from director.oauth.client.service import UpstreamAuthorizations
    from director.playbooks.cache import PlaybookCache
    from director.playbooks.store import Playbook
    from director.web.auth import Authenticator, Principal


#: The parameters of an authorization server's answer that the callback reads.
ANSWER_PARAMETERS = ("code", "state", "iss", "error", "error_description")
#: Holds that answer while a signed-out browser signs in (``UpstreamOAuthPages._sign_in_first``).
RETURN_COOKIE = "director_oauth_answer"


def connect_url(base_url: str, playbook_id: str, server_name: str) -> str:
    """The Studio page where the owner authorizes the server (the status's authorize URL)."""
    return (f"{base_url.rstrip('/')}/studio/playbooks/{urllib.parse.quote(playbook_id, safe='')}"
            f"/servers/{urllib.parse.quote(server_name, safe='')}/connect")


def check_authorizable(server: Server) -> None:
    if server.type not in ("http", "sse"):
        raise ApiError(f"{server.name} is a stdio server: only HTTP servers are authorized "
                       "with OAuth", code="not_http")
    if server.disabled:
        raise Conflict(f"{server.name} is disabled in this playbook; enable it first",
                       code="server_disabled")


def refusal_of(failure: Exception) -> ApiError | ValidationFailed:
    """The API error for a flow that cannot start."""
    if isinstance(failure, NotRequired):
        return Conflict(str(failure), code="not_required")
    if isinstance(failure, NeedClient):
        return Conflict(str(failure), code="client_required",
                        details={"fields": {"client_id": "is required by this server"}})
    if isinstance(failure, ValueError):
        field, _, message = str(failure).partition(": ")
        return ValidationFailed({field: message})
    return ApiError(str(failure), status=502, code="upstream_authorization_failed")


async def authorize_url(oauth: UpstreamAuthorizations, user_id: UUID, playbook: Playbook,
                        server: Server, entered: dict[str, Any] | None) -> str:
    """Start a flow; its URL, or the ``ApiError`` saying why not."""
    check_authorizable(server)
    try:
        started = await oauth.begin(user_id, playbook.pk, playbook.id, server, entered)
    except (FetchError, ValueError) as failure:
        raise refusal_of(failure) from None
    return started.authorize_url


class UpstreamOAuthRoutes:
    """Mixin of ``web.v1.ApiV1`` (with ``PlaybookRoutes``, whose lookups it uses)."""

    oauth: UpstreamAuthorizations
    auth: Authenticator

    # (PlaybookRoutes', declared only: a definition here would hide theirs)
    _owned: Callable[[Principal, str], Playbook]
    _server_of: Callable[[Playbook, str], Server]

    @api.route("/playbooks/<playbook_id>/servers/<name>/authorize", methods=["POST"])
    async def authorize_server(self, request: Request, playbook_id: str, name: str) -> bytes:
        principal = await self.auth.authenticate(request)
        playbook = self._owned(principal, playbook_id)
        server = self._server_of(playbook, name)
        body: dict[str, Any] = {}
        if (request.getHeader(b"content-length") or b"0") != b"0" or \
                request.getHeader(b"content-type"):
            body = read_json_object(request)
        reject_unknown_fields(body, {"client_id", "client_secret"})
        url = await authorize_url(self.oauth, principal.user.id, playbook, server,
                                  body or None)
        request.setHeader(b"cache-control", b"no-store")
        return write_json(request, 200, {"authorize_url": url,
                                         "expires_in": store.FLOW_SECONDS})

    @api.route("/playbooks/<playbook_id>/servers/<name>/authorization", methods=["DELETE"])
    async def disconnect_server(self, request: Request, playbook_id: str, name: str) -> bytes:
        principal = await self.auth.authenticate(request)
        playbook = self._owned(principal, playbook_id)
        server = self._server_of(playbook, name)
        check_authorizable(server)
        if not await self.oauth.disconnect(principal.user.id, server):
            raise NotFound(f"no authorization of yours is stored for {name}")
        request.setResponseCode(204)
        return b""


class UpstreamOAuthPages:
    """The callback and the metadata document (routed by ``web.app.DirectorApp``)."""

    def __init__(self, settings: Settings, oauth: UpstreamAuthorizations, auth: Authenticator,
                 playbooks: PlaybookCache) -> None:
        self.settings = settings
        self.oauth = oauth
        self.auth = auth
        self.playbooks = playbooks

    async def callback(self, request: Request, playbook_id: str, server_name: str) -> bytes:
        arguments = {key.decode("latin-1"): values[0].decode("utf-8", "replace")
                     for key, values in (request.args or {}).items()
                     if values and key.decode("latin-1") in ANSWER_PARAMETERS}
        try:
            principal = await self.auth.authenticate(request)
        except Unauthorized:
            return self._sign_in_first(request, arguments)
        kept = read_cookie(request.getHeader(b"cookie"), RETURN_COOKIE)
        if kept is not None:
            self._set_return_cookie(request, "", 0)
            if "state" not in arguments:
                arguments = dict(urllib.parse.parse_qsl(kept))
        studio = f"/studio/playbooks/{urllib.parse.quote(playbook_id, safe='')}"
        playbook = self.playbooks.get(principal.user.id, playbook_id)
        if playbook is None or playbook.server(server_name) is None:
            return _redirect(request, "/studio/?" + urllib.parse.urlencode(
                {"notice": "authorization-lost"}))
        connect = f"{studio}/servers/{urllib.parse.quote(server_name, safe='')}/connect"
        try:
            await self.oauth.complete(principal.user.id, playbook.pk, server_name, arguments)
        except store.FlowRefused as refused:
            return _redirect(request, connect + "?" + urllib.parse.urlencode(
                {"refused": refused.code}))
        except FetchError:
            state = arguments.get("state", "")
            return _redirect(request, connect + "?" + urllib.parse.urlencode(
                {"failed": store.state_hash(state).hex()}))
        return _redirect(request, studio + "?notice=server-authorized")

    def _sign_in_first(self, request: Request, arguments: dict[str, str]) -> bytes:
        """A browser signed out: the authorization server's answer waits in a cookie (never
        in a URL, which would put the code in access logs) while it signs in and comes back
        here (``studio.base.safe_next`` lets it)."""
        if arguments:
            self._set_return_cookie(request, urllib.parse.urlencode(arguments),
                                    store.FLOW_SECONDS)
        back = request.path.decode("latin-1")
        return _redirect(request, "/studio/login?" + urllib.parse.urlencode({"next": back}))

    def _set_return_cookie(self, request: Request, value: str, max_age: int) -> None:
        secure = "; Secure" if self.auth.secure_cookie else ""
        request.responseHeaders.addRawHeader(
            b"set-cookie", f"{RETURN_COOKIE}={value}; Path=/oauth/; Max-Age={max_age}; "
                           f"HttpOnly; SameSite=Lax{secure}".encode())

    def metadata_document(self, request: Request) -> Any:
        request.setHeader(b"cache-control", b"no-store")
        if not self.settings.base_url.startswith("https://"):
            return write_json(request, 404, {"error": {
                "code": "not_found", "message": "Director publishes a client metadata "
                "document only when BASE_URL is https", "details": {}}})
        return self._document(request)

    async def _document(self, request: Request) -> bytes:
        uris = await self.oauth.database.run(store.pending_redirect_uris())
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(identity.client_metadata_document(self.settings.base_url, uris)
                          ).encode()


def _json_answer(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _redirect(request: Request, location: str) -> bytes:
    request.setResponseCode(303)
    request.setHeader(b"location", location.encode())
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"referrer-policy", b"no-referrer")
    return b""


# --- OpenAPI 3.1 (merged into web.openapi's document) ----------------------------------------

_AUTHORIZED = {
    "type": "object", "additionalProperties": False, "required": ["state", "issuer"],
    "properties": {
        "state": {"const": "authorized"},
        "issuer": {"type": "string", "description": "The authorization server"},
        "scope": {"type": "string", "description": "The scope granted"},
        "expires_at": {"type": "string", "format": "date-time",
                       "description": "When the access token expires (it is refreshed "
                                      "before)"}}}
_UNAUTHORIZED = {
    "type": "object", "additionalProperties": False,
    "required": ["state", "issuer", "reason", "authorize_url"],
    "properties": {
        "state": {"const": "unauthorized"},
        "issuer": {"type": "string"},
        "reason": {"type": "string", "description": "Why the owner must authorize (again)"},
        "authorize_url": {"type": "string", "description": "The Studio page where the owner "
                          "authorizes it (POST …/authorize answers the authorization server's "
                          "URL directly)"}}}
OPENAPI_SCHEMAS: dict[str, Any] = {
    "ServerAuthorization": {
        "readOnly": True,
        "description": "Present for an HTTP server that asked Director for OAuth authorization "
                       "(its owner's view: the tokens are the owner's, per authorization server "
                       "and resource, shared by all their playbooks using that server). Its "
                       "tools are absent while unauthorized.",
        "oneOf": [_AUTHORIZED, _UNAUTHORIZED]},
    "Authorize": {
        "type": "object", "additionalProperties": False,
        "description": "Only for authorization servers that offer Director no other way to "
                       "identify itself (no client metadata documents, no dynamic registration): "
                       "the client it gave you, with the redirect URI "
                       "<BASE_URL>/oauth/{playbook_id}/{name}/callback",
        "properties": {"client_id": {"type": "string", "minLength": 1, "maxLength": 2048,
                                     "pattern": NON_BLANK},
                       "client_secret": {"type": ["string", "null"], "maxLength": 2048}},
        "dependentRequired": {"client_secret": ["client_id"]}},
    "AuthorizeUrl": {
        "type": "object", "required": ["authorize_url", "expires_in"],
        "properties": {
            "authorize_url": {"type": "string", "description": "Open it in a browser signed in "
                              "to Director as the playbook's owner"},
            "expires_in": {"type": "integer", "description": "Seconds it stays usable"}}},
}
_PATH_PARAMETERS = [
    {"name": "playbook_id", "in": "path", "required": True, "schema": {"type": "string"}},
    {"name": "name", "in": "path", "required": True, "description": "Server name",
     "schema": {"type": "string"}}]
UPSTREAM_OAUTH_PATHS: dict[str, Any] = {
    "/playbooks/{playbook_id}/servers/{name}/authorize": {"post": {
        "operationId": "authorizeServer",
        "summary": "Start the OAuth authorization of an HTTP server: the URL to open",
        "description": "Discovers the server's authorization server (RFC 9728, RFC 8414) if "
                       "needed, and how Director identifies itself there (its client metadata "
                       "document, dynamic registration, or the client given here). The body is "
                       "optional.",
        "security": SECURITY,
        "parameters": _PATH_PARAMETERS,
        "requestBody": {"required": False, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Authorize"}}}},
        "responses": {
            "200": _json_answer("AuthorizeUrl", "The authorize URL"),
            "400": error_answer("A stdio server (code not_http), malformed JSON or invalid fields"),
            "404": error_answer("No such playbook of yours, or no such server in it"),
            "409": error_answer("The server is disabled (server_disabled), answers without "
                          "authorization (not_required), or needs a client id "
                          "(client_required)"),
            "413": error_answer("Body too large"),
            "415": error_answer("Body is not application/json"),
            "502": error_answer("The server's authorization cannot be discovered or is refused "
                          "(upstream_authorization_failed: the message says why)"),
            **COMMON_ERRORS}}},
    "/playbooks/{playbook_id}/servers/{name}/authorization": {"delete": {
        "operationId": "disconnectServer",
        "summary": "Revoke and delete the caller's OAuth tokens for an HTTP server",
        "description": "Revoked at the authorization server where it offers revocation "
                       "(RFC 7009), deleted in any case; for every playbook of the caller that "
                       "uses that server.",
        "security": SECURITY,
        "parameters": _PATH_PARAMETERS,
        "responses": {
            "204": {"description": "Revoked and deleted"},
            "400": error_answer("A stdio server (code not_http)"),
            "404": error_answer("No such playbook, server, or authorization of yours"),
            "409": error_answer("The server is disabled (server_disabled)"),
            **COMMON_ERRORS}}},
}
