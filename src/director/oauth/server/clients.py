"""Who the client is: its metadata, checked the same way whether it registered (RFC 7591) or
published a Client ID Metadata Document (``documents``), its redirect URIs, and its storage.

Redirect URIs (MCP 2026-07-28, Communication Security; OAuth 2.1 sections 2.3 and 8.4): an
``https`` URL; an ``http`` URL only to this computer's loopback (``localhost``, ``127.0.0.1``,
``[::1]``), whose port may differ at authorization time, since native clients listen on a
port the system gives them (RFC 8252 section 7.3); or a native application's private-use
scheme (``cursor://…``, ``vscode://…``), which desktop clients use. Schemes a browser runs or
reads itself (``javascript:``, ``data:``, ``file:``, …) and plain ``http`` elsewhere are
refused. Everything else is compared exactly. The consent page shows the redirect's host, and
warns for loopback and native redirects: nothing proves which program listens there.

A registration that is never used to authorize anything is deleted after a day
(``grants.purge_expired``): registering costs nothing, so unused ones would pile up.
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import json
import re
import secrets
from typing import Any
from urllib.parse import SplitResult, urlsplit

import attrs

from director.accounts.credentials import hash_token
from director.db.interactions import Interaction, Query
from director.oauth.server.metadata import InvalidScope, parse_scope, scope_text

REGISTERED = "registered"
METADATA_DOCUMENT = "metadata_document"
PUBLIC = "none"
SECRET_METHODS = ("client_secret_basic", "client_secret_post")
AUTH_METHODS = (PUBLIC, *SECRET_METHODS)
GRANT_TYPES = ("authorization_code", "refresh_token")
MAX_REDIRECT_URIS = 20
MAX_URI_LENGTH = 2000
MAX_NAME_LENGTH = 200
#: Schemes a browser interprets itself: never a place to send a code to.
BROWSER_SCHEMES = frozenset(("javascript", "data", "vbscript", "file", "about", "blob",
                             "filesystem", "view-source", "ws", "wss", "ftp", "mailto",
                             "chrome", "chrome-extension", "resource", "intent"))
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
#: RFC 7591 metadata kept as registered (strings), besides the ones checked below.
_TEXT_FIELDS = ("client_uri", "logo_uri", "tos_uri", "policy_uri", "software_id",
                "software_version")


class ClientMetadataError(ValueError):
    """Metadata this server refuses; ``error`` is RFC 7591's code."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


@attrs.frozen
class Client:
    client_id: str
    kind: str  # REGISTERED or METADATA_DOCUMENT
    name: str  # "" when the client gave none
    redirect_uris: tuple[str, ...]
    grant_types: tuple[str, ...]
    auth_method: str
    metadata: dict[str, Any] = attrs.field(eq=False)
    secret_hash: bytes | None = attrs.field(default=None, repr=False)

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        if self.kind == METADATA_DOCUMENT:
            return urlsplit(self.client_id).hostname or self.client_id
        return "An unnamed application"

    @property
    def refreshes(self) -> bool:
        return "refresh_token" in self.grant_types


# --- redirect URIs -------------------------------------------------------------------------


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_uri(value: str) -> SplitResult | str:
    """``value`` parsed, or why it cannot be used: the rules redirect URIs and metadata
    documents' URLs share (a length, no space or control character, a valid port, no
    fragment, no user name or password)."""
    if len(value) > MAX_URI_LENGTH:
        return f"must be at most {MAX_URI_LENGTH} characters"
    if _CONTROL.search(value) or " " in value:
        return "must not contain spaces or control characters"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return "is not a valid URI"
    if "#" in value:
        return "must not have a fragment"
    if parts.username is not None or parts.password is not None:
        return "must not carry a user name or password"
    return parts


def redirect_refusal(uri: Any) -> str | None:
    """Why ``uri`` cannot be a redirect URI (module docstring), or None."""
    if not isinstance(uri, str) or not uri:
        return "must be a non-empty string"
    parts = split_uri(uri)
    if isinstance(parts, str):
        return parts
    scheme = parts.scheme.lower()
    if not scheme or not _SCHEME.fullmatch(scheme):
        return "must be an absolute URI"
    if scheme == "https":
        return None if parts.hostname else "must name a host"
    if scheme == "http":
        return None if _is_loopback(parts.hostname) else (
            "plain http is allowed only to this computer (localhost, 127.0.0.1, [::1]); "
            "use https")
    if scheme in BROWSER_SCHEMES:
        return f"the {scheme}: scheme cannot receive an authorization response"
    if not (parts.netloc or parts.path):
        return "must say where in the application to return"
    return None


def redirect_kind(uri: str) -> str:
    """``https``, ``loopback`` (this computer) or ``native`` (an application's own scheme)."""
    parts = urlsplit(uri)
    if parts.scheme.lower() == "https":
        return "https"
    return "loopback" if parts.scheme.lower() == "http" else "native"


def redirect_matches(registered: str, presented: str) -> bool:
    """Exact comparison, but a loopback ``http`` redirect's port may differ (RFC 8252 7.3)."""
    if registered == presented:
        return True
    if redirect_kind(registered) != "loopback" or redirect_kind(presented) != "loopback":
        return False
    try:
        ours, theirs = urlsplit(registered), urlsplit(presented)
        ours.port, theirs.port  # noqa: B018
    except ValueError:
        return False
    return (ours.scheme, ours.hostname, ours.path, ours.query) == \
        (theirs.scheme, theirs.hostname, theirs.path, theirs.query)


def allowed_redirect(client: Client, presented: str | None) -> str | None:
    """The redirect URI to use: the one presented if registered; when none is presented, the
    only one registered (RFC 6749 section 3.1.2.3). None: not allowed."""
    if presented is None:
        return client.redirect_uris[0] if len(client.redirect_uris) == 1 else None
    if any(redirect_matches(registered, presented) for registered in client.redirect_uris):
        return presented
    return None


# --- metadata ------------------------------------------------------------------------------


def _text(body: dict[str, Any], name: str, limit: int = MAX_URI_LENGTH) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit or _CONTROL.search(value):
        raise ClientMetadataError("invalid_client_metadata",
                                  f"{name} must be a string of at most {limit} characters "
                                  "without control characters")
    return value


def _strings(body: dict[str, Any], name: str, default: tuple[str, ...],
             allowed: tuple[str, ...]) -> tuple[str, ...]:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ClientMetadataError("invalid_client_metadata", f"{name} must be a list of strings")
    unknown = [item for item in value if item not in allowed]
    if unknown:
        raise ClientMetadataError("invalid_client_metadata",
                                  f"{name} has {', '.join(unknown)}; this server supports "
                                  f"{', '.join(allowed)}")
    return tuple(dict.fromkeys(value))


def _redirect_uris(body: dict[str, Any]) -> tuple[str, ...]:
    uris = body.get("redirect_uris")
    if not isinstance(uris, list) or not uris:
        raise ClientMetadataError("invalid_redirect_uri",
                                  "redirect_uris is required: a non-empty list of URIs")
    if len(uris) > MAX_REDIRECT_URIS:
        raise ClientMetadataError("invalid_redirect_uri",
                                  f"at most {MAX_REDIRECT_URIS} redirect_uris")
    for uri in uris:
        refusal = redirect_refusal(uri)
        if refusal is not None:
            raise ClientMetadataError("invalid_redirect_uri",
                                      f"redirect_uris: {str(uri)[:200]!r} {refusal}")
    return tuple(dict.fromkeys(uris))


def checked_metadata(body: dict[str, Any], default_auth_method: str) -> dict[str, Any]:
    """RFC 7591 client metadata, checked and normalised (unknown fields are dropped, as
    section 2 requires); ``ClientMetadataError`` says what is wrong."""
    metadata: dict[str, Any] = {"redirect_uris": list(_redirect_uris(body))}
    auth_method = body.get("token_endpoint_auth_method", default_auth_method)
    if auth_method not in AUTH_METHODS:
        raise ClientMetadataError("invalid_client_metadata",
                                  f"token_endpoint_auth_method {str(auth_method)[:60]!r} is not "
                                  f"supported; use one of {', '.join(AUTH_METHODS)}")
    metadata["token_endpoint_auth_method"] = auth_method
    grant_types = _strings(body, "grant_types", ("authorization_code",), GRANT_TYPES)
    if "authorization_code" not in grant_types:
        raise ClientMetadataError("invalid_client_metadata",
                                  "grant_types must include authorization_code, the only way "
                                  "this server issues tokens")
    metadata["grant_types"] = list(grant_types)
    metadata["response_types"] = list(_strings(body, "response_types", ("code",), ("code",)))
    name = _text(body, "client_name", MAX_NAME_LENGTH)
    if name is not None:
        metadata["client_name"] = name.strip()
    scope = _text(body, "scope")
    if scope is not None:
        try:
            metadata["scope"] = scope_text(parse_scope(scope))
        except InvalidScope as error:
            raise ClientMetadataError("invalid_client_metadata", str(error)) from None
    for field in _TEXT_FIELDS:
        value = _text(body, field)
        if value is not None:
            metadata[field] = value
    application_type = body.get("application_type")
    if application_type is not None:
        if application_type not in ("web", "native"):
            raise ClientMetadataError("invalid_client_metadata",
                                      "application_type must be web or native")
        metadata["application_type"] = application_type
    contacts = body.get("contacts")
    if contacts is not None:
        if not isinstance(contacts, list) or len(contacts) > 10 or not all(
                isinstance(c, str) and len(c) <= 320 and not _CONTROL.search(c)
                for c in contacts):
            raise ClientMetadataError("invalid_client_metadata",
                                      "contacts must be a list of at most 10 strings without "
                                      "control characters")
        metadata["contacts"] = contacts
    return metadata


def client_of(client_id: str, kind: str, metadata: dict[str, Any],
              secret_hash: bytes | None = None) -> Client:
    return Client(client_id, kind, metadata.get("client_name", ""),
                  tuple(metadata["redirect_uris"]), tuple(metadata["grant_types"]),
                  metadata["token_endpoint_auth_method"], metadata, secret_hash)


# --- dynamic registration (RFC 7591) ---------------------------------------------------------


@attrs.frozen
class Registration:
    client: Client
    secret: str | None
    issued_at: datetime.datetime

    def response(self) -> dict[str, Any]:
        """RFC 7591 section 3.2.1: the client's id, its secret if it has one, and the
        metadata as registered."""
        body: dict[str, Any] = {"client_id": self.client.client_id,
                                "client_id_issued_at": int(self.issued_at.timestamp()),
                                **self.client.metadata}
        if self.secret is not None:
            body["client_secret"] = self.secret
            body["client_secret_expires_at"] = 0  # never
        return body


def new_registration(body: dict[str, Any], now: datetime.datetime) -> Registration:
    """A client for a registration request; RFC 7591's default authentication method is
    ``client_secret_basic`` (a secret is then issued), MCP clients usually ask for ``none``.
    ``now`` (the service clock's) is its ``client_id_issued_at``."""
    metadata = checked_metadata(body, "client_secret_basic")
    secret = None
    if metadata["token_endpoint_auth_method"] in SECRET_METHODS:
        secret = secrets.token_urlsafe(32)
    client = client_of("dc_" + secrets.token_urlsafe(18), REGISTERED, metadata,
                       hash_token(secret) if secret is not None else None)
    return Registration(client, secret, now)


def secret_matches(client: Client, presented: str) -> bool:
    return client.secret_hash is not None and hmac.compare_digest(client.secret_hash,
                                                                  hash_token(presented))


# --- storage -------------------------------------------------------------------------------


def _row(row: tuple[Any, ...]) -> Client:
    return client_of(row[0], row[1], row[2], bytes(row[3]) if row[3] is not None else None)


def insert_registration(registration: Registration, address: str) -> Interaction[None]:
    client = registration.client
    yield Query(
        "INSERT INTO oauth_clients (client_id, kind, client_name, redirect_uris, metadata, "
        "secret_hash, registered_from) VALUES (%s, %s, %s, %s, %s::jsonb, %s, %s)",
        (client.client_id, client.kind, client.name, list(client.redirect_uris),
         json.dumps(client.metadata), client.secret_hash, address))


def registered_client(client_id: str) -> Interaction[Client | None]:
    rows = yield Query("SELECT client_id, kind, metadata, secret_hash FROM oauth_clients "
                       "WHERE client_id = %s AND kind = %s", (client_id, REGISTERED))
    return _row(rows[0]) if rows else None


def save_document_client(client: Client) -> Interaction[None]:
    """Keep the snapshot of a metadata document's client that grants refer to."""
    yield Query(
        "INSERT INTO oauth_clients (client_id, kind, client_name, redirect_uris, metadata) "
        "VALUES (%s, %s, %s, %s, %s::jsonb) ON CONFLICT (client_id) DO UPDATE SET "
        "client_name = EXCLUDED.client_name, redirect_uris = EXCLUDED.redirect_uris, "
        "metadata = EXCLUDED.metadata WHERE oauth_clients.kind = %s",
        (client.client_id, client.kind, client.name, list(client.redirect_uris),
         json.dumps(client.metadata), METADATA_DOCUMENT))


def known_client(client_id: str) -> Interaction[Client | None]:
    """A client this server has seen: registered, or a document's snapshot (the token and
    revocation endpoints use it, without fetching anything)."""
    rows = yield Query("SELECT client_id, kind, metadata, secret_hash FROM oauth_clients "
                       "WHERE client_id = %s", (client_id,))
    return _row(rows[0]) if rows else None
