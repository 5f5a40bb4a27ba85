"""The token endpoint (RFC 6749 §4.1.3, §6; RFC 8707) and revocation (RFC 7009).

A client authenticates as it was registered: ``none`` (its ``client_id`` in the body: a
Client ID Metadata Document, or a public client), ``client_secret_post`` or
``client_secret_basic`` (RFC 6749 §2.3.1: both halves form-encoded before base64). Every
request names the ``resource`` the token is for (RFC 8707), so that a token is only ever good
at the server it was asked for.

Answers are checked before anything is stored: a JSON object, ``token_type`` Bearer (the only
kind Director can present), an ``access_token`` of sane size. An error answer becomes a
``TokenError`` carrying the server's ``error`` code (``invalid_grant`` matters: the refresh
token is dead) and the start of its description; never a token, a code or a secret.
"""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import quote_plus

import attrs

from director.mcp.upstream.http_plumbing import display_url
from director.oauth.client.fetch import Answer, Fetcher, FetchError

MAX_TOKEN_CHARS = 16 * 1024


class TokenError(FetchError):
    """The token endpoint refused (``code``: its ``error``, e.g. ``invalid_grant``)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


@attrs.frozen
class Client:
    """How Director identifies itself to an authorization server."""

    kind: str  # "cimd", "dcr" or "manual"
    client_id: str
    secret: str | None
    auth_method: str  # "none", "client_secret_post" or "client_secret_basic"


@attrs.frozen
class Tokens:
    access_token: str = attrs.field(repr=False)
    token_type: str
    refresh_token: str | None = attrs.field(repr=False)
    expires_in: int | None
    scope: str | None


def authenticated(client: Client, fields: dict[str, str]) -> tuple[dict[str, str],
                                                                   dict[str, str]]:
    """The request's form fields and headers with the client's authentication."""
    if client.auth_method == "client_secret_basic" and client.secret is not None:
        pair = f"{quote_plus(client.client_id)}:{quote_plus(client.secret)}"
        return fields, {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}
    if client.auth_method == "client_secret_post" and client.secret is not None:
        return {**fields, "client_id": client.client_id, "client_secret": client.secret}, {}
    return {**fields, "client_id": client.client_id}, {}


async def exchange_code(fetcher: Fetcher, endpoint: str, client: Client, code: str,
                        verifier: str, redirect_uri: str, resource: str) -> Tokens:
    return await _token_request(fetcher, endpoint, client, {
        "grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
        "code_verifier": verifier, "resource": resource}, "exchanging the authorization code")


async def refresh(fetcher: Fetcher, endpoint: str, client: Client, refresh_token: str,
                  resource: str) -> Tokens:
    return await _token_request(fetcher, endpoint, client, {
        "grant_type": "refresh_token", "refresh_token": refresh_token, "resource": resource},
        "refreshing the token")


async def revoke(fetcher: Fetcher, endpoint: str, client: Client, token: str, hint: str) -> None:
    """RFC 7009: 200 whether or not the token was valid; anything else is an error."""
    fields, headers = authenticated(client, {"token": token, "token_type_hint": hint})
    answer = await fetcher.post_form(endpoint, "revoking the token", fields, headers)
    if answer.status != 200:
        raise _refusal("revoking the token", answer)


async def _token_request(fetcher: Fetcher, endpoint: str, client: Client,
                         fields: dict[str, str], what: str) -> Tokens:
    fields, headers = authenticated(client, fields)
    answer = await fetcher.post_form(endpoint, what, fields, headers)
    if answer.status != 200:
        raise _refusal(what, answer)
    return parse_tokens(answer.json_object("the token endpoint's answer"), what)


def parse_tokens(document: dict[str, Any], what: str) -> Tokens:
    access = document.get("access_token")
    if not isinstance(access, str) or not access or len(access) > MAX_TOKEN_CHARS or \
            not access.isascii() or not access.isprintable():
        raise TokenError(f"{what}: the token endpoint's answer has no usable access_token")
    token_type = document.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise TokenError(f"{what}: the token endpoint issued a token of type "
                         f"{str(token_type)[:40]!r}; Director presents Bearer tokens only")
    refresh_token = document.get("refresh_token")
    if refresh_token is not None and (not isinstance(refresh_token, str) or not refresh_token
                                      or len(refresh_token) > MAX_TOKEN_CHARS):
        raise TokenError(f"{what}: the token endpoint's refresh_token is not a string")
    expires_in = document.get("expires_in")
    if expires_in is not None:
        if isinstance(expires_in, str) and expires_in.isdigit():
            expires_in = int(expires_in)  # (some servers send it as a string)
        if not isinstance(expires_in, int) or isinstance(expires_in, bool) or expires_in < 0:
            raise TokenError(f"{what}: the token endpoint's expires_in is not a number of "
                             "seconds")
    scope = document.get("scope")
    if scope is not None and not isinstance(scope, str):
        raise TokenError(f"{what}: the token endpoint's scope is not a string")
    return Tokens(access, "Bearer", refresh_token, expires_in, scope or None)


def _refusal(what: str, answer: Answer) -> TokenError:
    code = description = None
    try:
        document = answer.json_object("the answer")
    except FetchError:
        document = {}
    if isinstance(document.get("error"), str):
        code = document["error"][:80]
    if isinstance(document.get("error_description"), str):
        description = document["error_description"][:200]
    detail = f"{code}" + (f" ({description})" if description else "") if code else \
        f"HTTP {answer.status}"
    return TokenError(f"{what}: {display_url(answer.url)} answered {detail}", code)
