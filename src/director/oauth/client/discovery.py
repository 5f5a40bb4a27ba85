"""Where to authorize for a protected MCP server: RFC 9728 then RFC 8414 / OpenID discovery.

From the server's 401 (MCP authorization, 2025-11-25, "Authorization Server Discovery"):

1. the protected-resource metadata (RFC 9728): at the ``resource_metadata`` URL of the
   ``WWW-Authenticate`` challenge if it names one, else at the path-aware well-known URL
   (``/.well-known/oauth-protected-resource/<path>``), then at the root one. A document that
   is missing (4xx) lets the next candidate be tried; one that is malformed does not. Its
   ``resource`` must be the server's URL, or a parent of it on the same origin (the SDK's
   hierarchical rule): otherwise the document speaks for another server and is refused;
2. the authorization server's metadata (its first ``authorization_servers`` entry): RFC 8414
   at ``/.well-known/oauth-authorization-server`` (path inserted), then OpenID discovery
   (``/.well-known/openid-configuration`` path inserted, then appended). Its ``issuer`` must be
   the identifier exactly (RFC 8414 §3.3), it must have authorization and token endpoints, and
   it must offer PKCE with S256 (``code_challenge_methods_supported``): a server that does not
   (or does not say so) is refused, as the MCP specification requires.

Every document goes through ``fetch.Fetcher`` (SSRF rail, https, size and time limits).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs

from director.mcp.upstream.http_plumbing import display_url
from director.oauth.client.challenge import Challenge
from director.oauth.client.fetch import Answer, Fetcher, FetchError, url_refusal

RESOURCE_WELL_KNOWN = "/.well-known/oauth-protected-resource"
OAUTH_WELL_KNOWN = "/.well-known/oauth-authorization-server"
OPENID_WELL_KNOWN = "/.well-known/openid-configuration"
#: Strings in metadata longer than this are refused (a document of hostile size in pieces).
MAX_VALUE_CHARS = 2048


class DiscoveryError(FetchError):
    """The server's authorization cannot be discovered, or is refused (the text says why)."""


@attrs.frozen
class Discovery:
    """What a protected server's challenge led to (both documents, validated)."""

    server_url: str
    #: The resource its metadata names, ``canonical``: the key of credentials, and the
    #: ``resource`` parameter of every request (RFC 8707).
    resource: str
    issuer: str
    resource_metadata: dict[str, Any]
    issuer_metadata: dict[str, Any]
    challenge_scope: str | None = None

    @property
    def authorization_endpoint(self) -> str:
        return str(self.issuer_metadata["authorization_endpoint"])

    @property
    def token_endpoint(self) -> str:
        return str(self.issuer_metadata["token_endpoint"])

    @property
    def registration_endpoint(self) -> str | None:
        return _optional_url(self.issuer_metadata, "registration_endpoint")

    @property
    def revocation_endpoint(self) -> str | None:
        return _optional_url(self.issuer_metadata, "revocation_endpoint")

    @property
    def supports_client_metadata_documents(self) -> bool:
        return self.issuer_metadata.get("client_id_metadata_document_supported") is True

    @property
    def requires_iss(self) -> bool:
        """RFC 9207: the server says it sends ``iss`` with every authorization response."""
        return self.issuer_metadata.get("authorization_response_iss_parameter_supported") is True

    @property
    def auth_methods(self) -> list[str]:
        """``token_endpoint_auth_methods_supported`` (RFC 8414's default when absent)."""
        methods = self.issuer_metadata.get("token_endpoint_auth_methods_supported")
        if isinstance(methods, list) and all(isinstance(m, str) for m in methods):
            return list(methods)
        return ["client_secret_basic"]

    def scope(self) -> str | None:
        """What to ask for: the challenge's scope, else every scope the resource supports
        (MCP authorization, "Scope Selection Strategy"); None: let the server decide."""
        if self.challenge_scope:
            return self.challenge_scope
        supported = self.resource_metadata.get("scopes_supported")
        if isinstance(supported, list) and supported and \
                all(isinstance(s, str) and s for s in supported):
            return " ".join(supported)
        return None


def canonical(url: str) -> str:
    """``url`` as resources are compared: scheme and host lower case, no default port, no
    fragment, no trailing slash on the path."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is not None and (parts.scheme.lower(), port) not in (("https", 443), ("http", 80)):
        host = f"{host}:{port}"
    return urlunsplit((parts.scheme.lower(), host, parts.path.rstrip("/"), parts.query, ""))


def resource_covers(resource: str, url: str) -> bool:
    """Whether ``url`` is ``resource`` or below it (same origin, path segment boundary):
    where a token issued for ``resource`` may be sent."""
    mine, theirs = urlsplit(canonical(resource)), urlsplit(canonical(url))
    if (mine.scheme, mine.netloc) != (theirs.scheme, theirs.netloc):
        return False
    if mine.query and mine.query != theirs.query:
        return False
    return theirs.path == mine.path or theirs.path.startswith(mine.path + "/")


def same_origin(first: str, second: str) -> bool:
    one, other = urlsplit(canonical(first)), urlsplit(canonical(second))
    return (one.scheme, one.netloc) == (other.scheme, other.netloc)


def resource_metadata_urls(server_url: str, challenge: Challenge | None) -> list[str]:
    """Where to look for the protected-resource metadata, in order."""
    parts = urlsplit(server_url)
    origin = f"{parts.scheme}://{parts.netloc}"
    path = parts.path.rstrip("/")
    candidates = []
    if challenge is not None and challenge.resource_metadata:
        candidates.append(challenge.resource_metadata)
    if path:
        candidates.append(origin + RESOURCE_WELL_KNOWN + path)
    candidates.append(origin + RESOURCE_WELL_KNOWN)
    return list(dict.fromkeys(candidates))


def issuer_metadata_urls(issuer: str) -> list[str]:
    """Where to look for an authorization server's metadata, in order (MCP authorization,
    "Authorization Server Metadata Discovery")."""
    parts = urlsplit(issuer)
    origin = f"{parts.scheme}://{parts.netloc}"
    path = parts.path.rstrip("/")
    if not path:
        return [origin + OAUTH_WELL_KNOWN, origin + OPENID_WELL_KNOWN]
    return [origin + OAUTH_WELL_KNOWN + path, origin + OPENID_WELL_KNOWN + path,
            origin + path + OPENID_WELL_KNOWN]


async def discover(fetcher: Fetcher, server_url: str, challenge: Challenge | None
                   ) -> Discovery:
    """Both documents for ``server_url`` (module docstring), or ``DiscoveryError``."""
    resource_metadata = await _first_document(
        fetcher, resource_metadata_urls(server_url, challenge),
        "the server's protected-resource metadata",
        lambda answer: _resource_metadata(answer, server_url, fetcher.allow_insecure))
    issuer = resource_metadata["authorization_servers"][0]
    issuer_metadata = await _first_document(
        fetcher, issuer_metadata_urls(issuer), f"the metadata of authorization server {issuer}",
        lambda answer: _issuer_metadata(answer, issuer, fetcher.allow_insecure))
    return Discovery(server_url, canonical(resource_metadata["resource"]), issuer,
                     resource_metadata, issuer_metadata,
                     challenge.scope if challenge is not None else None)


async def _first_document(fetcher: Fetcher, urls: list[str], what: str,
                          validate: Any) -> dict[str, Any]:
    tried = []
    for url in urls:
        answer = await fetcher.get(url, what)
        if 400 <= answer.status < 500:
            tried.append(f"{display_url(url)} (HTTP {answer.status})")
            continue
        if answer.status != 200:
            raise DiscoveryError(f"{what}: GET {display_url(url)}: HTTP {answer.status}")
        document: dict[str, Any] = validate(answer)
        return document
    raise DiscoveryError(f"{what} was not found: tried {', '.join(tried)}")


def _resource_metadata(answer: Answer, server_url: str, allow_insecure: bool
                       ) -> dict[str, Any]:
    what = "the server's protected-resource metadata"
    document = _checked_strings(answer.json_object(what), what)
    resource = document.get("resource")
    if not isinstance(resource, str) or not resource:
        raise DiscoveryError(f"{what} at {display_url(answer.url)} has no resource")
    if not resource_covers(resource, server_url):
        raise DiscoveryError(
            f"{what} at {display_url(answer.url)} is for the resource {display_url(resource)}, "
            f"not for {display_url(server_url)}: refusing to authorize with it")
    servers = document.get("authorization_servers")
    if not isinstance(servers, list) or not servers or not isinstance(servers[0], str):
        raise DiscoveryError(f"{what} at {display_url(answer.url)} names no authorization "
                             "server (authorization_servers)")
    refusal = url_refusal(servers[0], allow_insecure)
    if refusal is not None:
        raise DiscoveryError(f"{what}: its authorization server {refusal}")
    return document


def _issuer_metadata(answer: Answer, issuer: str, allow_insecure: bool) -> dict[str, Any]:
    what = f"the metadata of authorization server {issuer}"
    document = _checked_strings(answer.json_object(what), what)
    if document.get("issuer") != issuer:
        raise DiscoveryError(f"{what} names another issuer ({str(document.get('issuer'))[:200]!r}"
                             "); refusing it (RFC 8414 §3.3)")
    for field in ("authorization_endpoint", "token_endpoint"):
        value = document.get(field)
        if not isinstance(value, str):
            raise DiscoveryError(f"{what} has no {field}")
        refusal = url_refusal(value, allow_insecure)
        if refusal is not None:
            raise DiscoveryError(f"{what}: its {field} {refusal}")
    for field in ("registration_endpoint", "revocation_endpoint"):
        if field in document and _optional_url(document, field) is not None:
            refusal = url_refusal(document[field], allow_insecure)
            if refusal is not None:
                raise DiscoveryError(f"{what}: its {field} {refusal}")
    methods = document.get("code_challenge_methods_supported")
    if not isinstance(methods, list) or "S256" not in methods:
        raise DiscoveryError(f"authorization server {issuer} does not offer PKCE with S256 "
                             "(code_challenge_methods_supported); the MCP authorization flow "
                             "requires it, so Director refuses to use this server")
    responses = document.get("response_types_supported")
    if isinstance(responses, list) and "code" not in responses:
        raise DiscoveryError(f"authorization server {issuer} does not offer the authorization "
                             "code flow (response_types_supported)")
    return document


def _checked_strings(document: dict[str, Any], what: str) -> dict[str, Any]:
    """Refuse a document with absurdly long values (a hostile size spread over fields)."""
    def check(value: Any, depth: int = 0) -> None:
        if depth > 4:
            raise DiscoveryError(f"{what} is nested too deeply")
        if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
            raise DiscoveryError(f"{what} has a value longer than {MAX_VALUE_CHARS} characters")
        if isinstance(value, list):
            for item in value:
                check(item, depth + 1)
        elif isinstance(value, dict):
            for item in value.values():
                check(item, depth + 1)

    check(document)
    return document


def _optional_url(document: dict[str, Any], field: str) -> str | None:
    value = document.get(field)
    return value if isinstance(value, str) and value else None
