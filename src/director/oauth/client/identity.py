"""Who Director is to an authorization server: which client identity a flow uses.

In this order:

1. a client id (and secret) the user entered for that authorization server — an explicit
   choice, and the MCP specification's first option (pre-registration);
2. Director's Client ID Metadata Document (draft-ietf-oauth-client-id-metadata-document), when
   the server advertises ``client_id_metadata_document_supported`` and ``BASE_URL`` is https
   (the client id must be an https URL the server can fetch). The document is served at
   ``<BASE_URL>/oauth/client-metadata.json``; Director is then a public client (PKCE, no
   secret: the draft forbids shared secrets for such clients);
3. Dynamic Client Registration (RFC 7591) at the server's ``registration_endpoint``: one
   registration per redirect URI, stored and reused;
4. otherwise the user is asked for a client id (``NeedClient``).

Redirect URIs are per (playbook, server): ``<BASE_URL>/oauth/<playbook>/<server>/callback``,
the deployment guide's path. The metadata document must list the redirect URI of every flow
that uses it, and authorization servers compare them exactly, so it lists those of the flows
under way (unconsumed, unexpired), and is served ``no-store`` so that a server fetching it
sees the current list. (Listing every playbook's server names publicly instead would tell
anyone the names of everyone's playbooks; the flows under way last minutes.)
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit

from director.mcp.upstream.http_plumbing import display_url
from director.oauth.client.discovery import Discovery
from director.oauth.client.fetch import Fetcher, FetchError
from director.oauth.client.tokens import Client

CLIENT_NAME = "Director"
METADATA_PATH = "/oauth/client-metadata.json"
GRANT_TYPES = ["authorization_code", "refresh_token"]
#: Client authentication methods Director can use, in order of preference.
SECRET_METHODS = ("client_secret_basic", "client_secret_post")


class NeedClient(FetchError):
    """No client identity can be made for this server: the user must enter one."""


def redirect_uri(base_url: str, playbook_id: str, server_name: str) -> str:
    return (f"{base_url.rstrip('/')}/oauth/{quote(playbook_id, safe='')}/"
            f"{quote(server_name, safe='')}/callback")


def client_metadata_url(base_url: str) -> str:
    return base_url.rstrip("/") + METADATA_PATH


def metadata_document_usable(base_url: str, discovery: Discovery) -> bool:
    return urlsplit(base_url).scheme == "https" and \
        discovery.supports_client_metadata_documents


def client_metadata_document(base_url: str, redirect_uris: list[str]) -> dict[str, Any]:
    return {"client_id": client_metadata_url(base_url), "client_name": CLIENT_NAME,
            "client_uri": base_url.rstrip("/") + "/", "redirect_uris": redirect_uris,
            "grant_types": GRANT_TYPES, "response_types": ["code"],
            "token_endpoint_auth_method": "none"}


def metadata_document_client(base_url: str) -> Client:
    return Client("cimd", client_metadata_url(base_url), None, "none")


def registration_request(base_url: str, redirect: str, discovery: Discovery
                         ) -> dict[str, Any]:
    method = next((m for m in SECRET_METHODS if m in discovery.auth_methods), "none")
    request: dict[str, Any] = {
        "client_name": CLIENT_NAME, "client_uri": base_url.rstrip("/") + "/",
        "redirect_uris": [redirect], "grant_types": GRANT_TYPES, "response_types": ["code"],
        "token_endpoint_auth_method": method,
        # A web application (its redirect URI is on its own server, not a device's): the
        # MCP specification (SEP-837) has clients say which, and RFC 7591 / OpenID
        # Connect Registration's default ("web") is not assumed by every server.
        "application_type": "web"}
    scope = discovery.scope()
    if scope:
        request["scope"] = scope
    return request


async def register(fetcher: Fetcher, base_url: str, redirect: str,
                   discovery: Discovery) -> Client:
    """A dynamic registration (RFC 7591) for ``redirect``."""
    endpoint = discovery.registration_endpoint
    if endpoint is None:
        raise NeedClient(f"authorization server {discovery.issuer} offers no dynamic client "
                         "registration: enter the client id (and secret) it gave you for "
                         "Director")
    what = "registering Director as a client"
    requested = registration_request(base_url, redirect, discovery)
    answer = await fetcher.post_json(endpoint, what, requested)
    if answer.status not in (200, 201):
        raise FetchError(f"{what} at {display_url(endpoint)}: HTTP {answer.status}"
                         + (f": {answer.quoted()}" if answer.quoted() else ""))
    document = answer.json_object("the registration answer")
    client_id = document.get("client_id")
    if not isinstance(client_id, str) or not client_id or len(client_id) > 2048:
        raise FetchError(f"{what}: the answer has no client_id")
    secret = document.get("client_secret")
    if secret is not None and (not isinstance(secret, str) or len(secret) > 2048):
        raise FetchError(f"{what}: the answer's client_secret is not a string")
    method = document.get("token_endpoint_auth_method", requested["token_endpoint_auth_method"])
    if method not in (*SECRET_METHODS, "none"):
        raise FetchError(f"{what}: the server registered Director for client authentication "
                         f"{str(method)[:60]!r}, which it cannot do")
    if method != "none" and not secret:
        method = "none"
    return Client("dcr", client_id, secret or None, method)


def manual_client(client_id: Any, client_secret: Any, discovery: Discovery) -> Client:
    """The client a user entered; ``ValueError`` (a field: message) when it is malformed."""
    if not isinstance(client_id, str) or not client_id.strip() or len(client_id) > 2048 \
            or "\x00" in client_id:
        raise ValueError("client_id: must be the client id the authorization server gave you")
    if client_secret is not None and (not isinstance(client_secret, str) or
                                      len(client_secret) > 2048 or "\x00" in client_secret):
        raise ValueError("client_secret: must be a string of at most 2048 characters")
    secret = client_secret or None
    method = "none" if secret is None else \
        next((m for m in SECRET_METHODS if m in discovery.auth_methods), SECRET_METHODS[0])
    return Client("manual", client_id.strip(), secret, method)
