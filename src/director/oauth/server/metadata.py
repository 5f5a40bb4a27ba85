"""Scopes, resources, and what clients discover: the metadata documents and the challenges.

The protected resources are the playbooks' MCP endpoints: ``<BASE_URL>/playbooks/{id}/mcp``
(Streamable HTTP) and ``<BASE_URL>/playbooks/{id}/sse`` (legacy HTTP+SSE) are one playbook
reached by two transports, so a token asked for either works on both, and on no other
playbook. Each has its protected-resource metadata (RFC 9728) at the path-aware URL
(``/.well-known/oauth-protected-resource/playbooks/{id}/mcp``), whose ``resource`` is exactly
that URL, as RFC 9728 section 3.3 requires; the root document describes ``BASE_URL`` itself
(a token cannot be asked for it: ``/oauth/authorize`` wants a playbook).

Scopes, and why two: ``mcp:read`` lets a client use the playbook (initialize, list and read
tools, prompts and resources; every request needs it), ``mcp:tools`` lets it call tools, the
part that acts. The consent page lets a person grant read-only access; a client with it gets
``403 insufficient_scope`` on ``tools/call`` and may step up. ``offline_access`` (refresh
tokens) is the authorization server's, never a resource requirement, so it is listed in the
server's metadata only (MCP 2026-07-28, Refresh Tokens).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote, urlsplit

import attrs

from director.config import Settings, origin_of

SCOPE_READ = "mcp:read"
SCOPE_TOOLS = "mcp:tools"
OFFLINE_ACCESS = "offline_access"
#: What the resource asks for (401 challenges, protected-resource metadata), in this order.
RESOURCE_SCOPES = (SCOPE_READ, SCOPE_TOOLS)
SUPPORTED_SCOPES = (*RESOURCE_SCOPES, OFFLINE_ACCESS)
#: What each scope allows, in words for the consent page and Connected apps.
SCOPE_DESCRIPTIONS = {
    SCOPE_READ: "See the playbook's tools, prompts and resources",
    SCOPE_TOOLS: "Call the playbook's tools (they act with the playbook's credentials)",
    OFFLINE_ACCESS: "Stay connected: refresh its access without asking you again, until you "
                    "revoke it",
}
TRANSPORTS = ("mcp", "sse")
PLAYBOOK_ID = re.compile(r"[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?")
_PARAMETER_UNSAFE = re.compile(r'["\\\x00-\x1f\x7f]')

PROTECTED_RESOURCE_PATH = "/.well-known/oauth-protected-resource"
AUTHORIZATION_SERVER_PATH = "/.well-known/oauth-authorization-server"
OPENID_CONFIGURATION_PATH = "/.well-known/openid-configuration"
AUTHORIZE_PATH = "/oauth/authorize"
TOKEN_PATH = "/oauth/token"  # noqa: S105 - a path
REGISTER_PATH = "/oauth/register"
REVOKE_PATH = "/oauth/revoke"


class InvalidScope(ValueError):
    """A scope parameter naming scopes this server does not have."""


class InvalidResource(ValueError):
    """A ``resource`` that is not a playbook MCP endpoint of this server."""


# --- scopes ------------------------------------------------------------------------------


def parse_scope(raw: str | None) -> tuple[str, ...]:
    """The scopes of a ``scope`` parameter, in the canonical order; none given: the resource's
    (``mcp:read mcp:tools``). ``InvalidScope`` names the unknown ones."""
    if raw is None or not raw.strip():
        return RESOURCE_SCOPES
    asked = raw.split()
    unknown = [scope for scope in asked if scope not in SUPPORTED_SCOPES]
    if unknown:
        raise InvalidScope(f"unknown scope {' '.join(unknown)!r}; this server has "
                           f"{' '.join(SUPPORTED_SCOPES)}")
    return tuple(scope for scope in SUPPORTED_SCOPES if scope in asked)


def with_required(scopes: tuple[str, ...]) -> tuple[str, ...]:
    """``mcp:read`` is what any use of a playbook needs: granting less would be a token that
    cannot do anything, so it is always part of a grant."""
    return tuple(scope for scope in SUPPORTED_SCOPES if scope in scopes or scope == SCOPE_READ)


def scope_text(scopes: tuple[str, ...] | frozenset[str]) -> str:
    return " ".join(scope for scope in SUPPORTED_SCOPES if scope in scopes)


def scopes_needed(method: object) -> tuple[str, ...]:
    """The scopes a JSON-RPC message with this ``method`` needs (responses have none)."""
    return RESOURCE_SCOPES if method == "tools/call" else (SCOPE_READ,)


# --- resources ---------------------------------------------------------------------------


@attrs.frozen
class Resource:
    """A playbook's MCP endpoint, as a resource indicator names it."""

    playbook_id: str
    transport: str  # "mcp" or "sse"
    url: str  # canonical: BASE_URL + /playbooks/{id}/{transport}


def _base_path(settings: Settings) -> str:
    return urlsplit(settings.base_url).path.rstrip("/")


def resource_url(settings: Settings, playbook_id: str, transport: str = "mcp") -> str:
    return f"{settings.base_url}/playbooks/{quote(playbook_id, safe='')}/{transport}"


def parse_resource(settings: Settings, value: str) -> Resource:
    """The playbook endpoint ``value`` names, compared as RFC 8707 and MCP say: scheme and host
    case-insensitively (and default ports dropped), the path exactly, one trailing slash
    tolerated; no query and no fragment."""
    parts = urlsplit(value.strip())
    if parts.fragment or "#" in value:
        raise InvalidResource("a resource indicator must not have a fragment (RFC 8707)")
    if parts.query:
        raise InvalidResource("a resource indicator of this server has no query")
    try:
        same_origin = parts.scheme != "" and origin_of(value.strip()) == settings.base_origin
    except ValueError:
        same_origin = False
    if not same_origin:
        raise InvalidResource(f"{value!r} is not a resource of this server "
                              f"({settings.base_origin})")
    prefix = _base_path(settings) + "/playbooks/"
    path = parts.path[:-1] if parts.path.endswith("/") else parts.path
    if not path.startswith(prefix):
        raise InvalidResource(f"name a playbook's MCP endpoint: "
                              f"{resource_url(settings, '{id}')}")
    playbook_id, _, transport = path[len(prefix):].partition("/")
    if transport not in TRANSPORTS or not PLAYBOOK_ID.fullmatch(playbook_id):
        raise InvalidResource(f"name a playbook's MCP endpoint: "
                              f"{resource_url(settings, '{id}')}")
    return Resource(playbook_id, transport, resource_url(settings, playbook_id, transport))


# --- discovery documents -----------------------------------------------------------------


def metadata_url(settings: Settings, playbook_id: str, transport: str = "mcp") -> str:
    """Where a playbook endpoint's protected-resource metadata is (RFC 9728 section 3.1: the
    well-known path goes between the host and the resource's path)."""
    parts = urlsplit(settings.base_url)
    return (f"{parts.scheme}://{parts.netloc}{PROTECTED_RESOURCE_PATH}{_base_path(settings)}"
            f"/playbooks/{quote(playbook_id, safe='')}/{transport}")


def protected_resource_document(settings: Settings, resource: Resource | None) -> dict[str, Any]:
    """RFC 9728 metadata of a playbook endpoint, or (``None``) of ``BASE_URL`` itself."""
    document: dict[str, Any] = {
        "resource": resource.url if resource is not None else settings.base_url,
        "authorization_servers": [settings.base_url],
        "scopes_supported": list(RESOURCE_SCOPES),
        "bearer_methods_supported": ["header"],
        "resource_name": (f"Director playbook {resource.playbook_id}" if resource is not None
                          else "Director"),
    }
    return document


def authorization_server_document(settings: Settings) -> dict[str, Any]:
    """RFC 8414 metadata (also served as the OpenID Connect discovery document, which MCP
    clients try too; no ID tokens are issued, so it has no ``jwks_uri``)."""
    base = settings.base_url
    return {
        "issuer": base,
        "authorization_endpoint": base + AUTHORIZE_PATH,
        "token_endpoint": base + TOKEN_PATH,
        "registration_endpoint": base + REGISTER_PATH,
        "revocation_endpoint": base + REVOKE_PATH,
        "scopes_supported": list(SUPPORTED_SCOPES),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["none", "client_secret_basic",
                                                  "client_secret_post"],
        "revocation_endpoint_auth_methods_supported": ["none", "client_secret_basic",
                                                       "client_secret_post"],
        "client_id_metadata_document_supported": True,
        "authorization_response_iss_parameter_supported": True,
    }


# --- challenges (RFC 6750 section 3, RFC 9728 section 5.1) ---------------------------------


def _parameter(value: str) -> str:
    """A quoted-string parameter value: no quote, backslash or control character in it."""
    return _PARAMETER_UNSAFE.sub("'", value)


def challenge(settings: Settings, playbook_id: str, transport: str, *, error: str | None = None,
              description: str | None = None,
              scope: tuple[str, ...] = RESOURCE_SCOPES) -> str:
    """The ``WWW-Authenticate`` value of a playbook endpoint's 401 or 403: where its metadata
    is, the scopes it needs, and the error when a token was presented."""
    parts = []
    if error is not None:
        parts.append(f'error="{error}"')
        if description:
            parts.append(f'error_description="{_parameter(description)}"')
    parts.append(f'resource_metadata="{metadata_url(settings, playbook_id, transport)}"')
    parts.append(f'scope="{" ".join(scope)}"')
    return "Bearer " + ", ".join(parts)
