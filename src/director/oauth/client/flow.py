"""The authorization code flow with PKCE, from the authorize URL to the stored tokens.

``begin`` (the daemon's API and Studio, and ``director playbooks authorize``) discovers the
server's authorization if it is not known yet (an unauthenticated ``initialize`` answered 401,
then ``discovery``), picks Director's client identity (``identity``), and stores the flow:
a PKCE S256 verifier (RFC 7636; the server's support was checked at discovery), the scope
(the challenge's or the resource's, plus what a step-up asks for), the ``resource`` (RFC
8707) and a random ``state`` of which only the SHA-256 is kept. The authorize URL it returns
is for the user's browser.

``complete`` is the callback's work, on whichever instance the browser reaches (the flow is in
the database): the state must name a flow of this very user, playbook and server, unused and
unexpired (and is used up, whatever happens next); the ``iss`` parameter, when present — and
it must be when the server's metadata says it sends it — must be the issuer the flow started
with (RFC 9207: an answer from another authorization server is refused); an ``error`` answer
is reported; otherwise the code is exchanged, with the verifier and the same redirect URI and
resource, and the tokens are stored as the user's credential for (issuer, resource). Its
outcome is recorded on the flow, where ``director playbooks authorize`` reads it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlencode
from uuid import UUID

import attrs

from director.crypto import SecretBox
from director.db.interactions import Interaction
from director.mcp.upstream.base import LATEST_LEGACY_VERSION, initialize_params
from director.mcp.upstream.http_plumbing import display_url
from director.oauth.client import challenge, identity, store, tokens
from director.oauth.client.discovery import Discovery, discover
from director.oauth.client.fetch import Fetcher, FetchError
from director.oauth.client.store import Credential, Flow, FlowRefused
from director.playbooks.model import Server

T = TypeVar("T")


class NotRequired(FetchError):
    """The server answered without asking for authorization."""


class AuthorizationFailed(FetchError):
    """The authorization server's answer is refused or reports an error (text for the user)."""


@attrs.frozen
class FlowContext:
    """What the flow needs: HTTP (``fetch``), the database (``run`` an interaction), the box
    that seals, and ``BASE_URL``."""

    fetcher: Fetcher
    run: Callable[[Interaction[Any]], Awaitable[Any]]
    box: SecretBox
    base_url: str


@attrs.frozen
class Started:
    authorize_url: str
    state_hash: bytes


def pkce_pair() -> tuple[str, str]:
    """A verifier (RFC 7636 §4.1: 43 to 128 unreserved characters) and its S256 challenge."""
    verifier = secrets.token_urlsafe(64)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def union_of_scopes(*scopes: str | None) -> str | None:
    words: dict[str, None] = {}
    for scope in scopes:
        for word in (scope or "").split():
            words.setdefault(word)
    return " ".join(words) or None


async def probe(ctx: FlowContext, server: Server) -> challenge.Challenge | None:
    """An ``initialize`` without credentials: the server's ``Bearer`` challenge (None if its
    401 carries none), or ``NotRequired`` when it answers without asking."""
    assert server.url is not None
    headers = {key: item.value for key, item in server.headers
               if key.lower() != "authorization"}
    headers.update({"Accept": "application/json, text/event-stream",
                    "Content-Type": "application/json",
                    "MCP-Protocol-Version": LATEST_LEGACY_VERSION})
    body = json.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize",
                       "params": initialize_params()}).encode()
    answer = await ctx.fetcher.request("POST", server.url, f"[{server.name}] asking the server "
                                       "how to authorize", headers, body, read_only={401})
    if answer.status == 401:
        return challenge.bearer(answer.header_values("www-authenticate"))
    if 200 <= answer.status < 300:
        raise NotRequired(f"[{server.name}] {display_url(server.url)} answered without asking "
                          "for authorization: there is nothing to authorize")
    raise FetchError(f"[{server.name}] {display_url(server.url)} answered HTTP {answer.status} "
                     "(expected 401 with a Bearer challenge)")


async def discovered(ctx: FlowContext, server: Server, known: Discovery | None) -> Discovery:
    """The server's authorization, as known or discovered now (and stored for everyone)."""
    if known is not None:
        return known
    assert server.url is not None
    found = await discover(ctx.fetcher, server.url, await probe(ctx, server))
    await ctx.run(store.save_discovery(found))
    return found


async def client_for(ctx: FlowContext, user_id: UUID, redirect: str, found: Discovery,
                     entered: tokens.Client | None) -> tokens.Client:
    """The identity to use (``identity``'s order); an entered one is remembered."""
    if entered is not None:
        await ctx.run(store.save_client(ctx.box, found.issuer, entered, user_id=user_id))
        return entered
    own = await ctx.run(store.find_client(ctx.box, found.issuer, user_id=user_id))
    if own is not None:
        return own
    if identity.metadata_document_usable(ctx.base_url, found):
        return identity.metadata_document_client(ctx.base_url)
    registered = await ctx.run(store.find_client(ctx.box, found.issuer, redirect_uri=redirect))
    if registered is not None:
        return registered
    client = await identity.register(ctx.fetcher, ctx.base_url, redirect, found)
    await ctx.run(store.save_client(ctx.box, found.issuer, client, redirect_uri=redirect))
    return client


async def begin(ctx: FlowContext, *, user_id: UUID, playbook_pk: UUID, playbook_id: str,
                server: Server, found: Discovery, entered: tokens.Client | None = None,
                current: Credential | None = None) -> Started:
    """Store a new flow; its authorize URL (module docstring)."""
    assert server.url is not None
    redirect = identity.redirect_uri(ctx.base_url, playbook_id, server.name)
    client = await client_for(ctx, user_id, redirect, found, entered)
    verifier, code_challenge = pkce_pair()
    state = secrets.token_urlsafe(32)
    hashed = store.state_hash(state)
    scope = union_of_scopes(current.scope, current.wanted_scope) \
        if current is not None and current.wanted_scope else found.scope()
    await ctx.run(store.create_flow(ctx.box, Flow(
        hashed, user_id, playbook_pk, server.name, server.url, found.resource, found.issuer,
        client, verifier, redirect, scope, found.token_endpoint, found.revocation_endpoint,
        found.requires_iss)))
    parameters = {"response_type": "code", "client_id": client.client_id,
                  "redirect_uri": redirect, "state": state, "code_challenge": code_challenge,
                  "code_challenge_method": "S256", "resource": found.resource}
    if scope:
        parameters["scope"] = scope
    endpoint = found.authorization_endpoint
    separator = "&" if "?" in endpoint else "?"
    return Started(endpoint + separator + urlencode(parameters), hashed)


async def complete(ctx: FlowContext, *, user_id: UUID, playbook_pk: UUID, server_name: str,
                   arguments: dict[str, str]) -> tuple[Flow, UUID]:
    """The callback (module docstring): the flow and the credential stored, or
    ``FlowRefused`` (nothing used up) / ``AuthorizationFailed`` / ``FetchError``."""
    state = arguments.get("state")
    if not state:
        raise FlowRefused("no-state")
    hashed = store.state_hash(state)
    flow: Flow = await ctx.run(store.consume_flow(ctx.box, hashed, user_id, playbook_pk,
                                                  server_name))
    try:
        _check_answer(flow, arguments)
        issued = await tokens.exchange_code(ctx.fetcher, flow.token_endpoint, flow.client,
                                            arguments["code"], flow.code_verifier,
                                            flow.redirect_uri, flow.resource)
        credential_id: UUID = await ctx.run(store.store_authorized(ctx.box, flow, issued))
    except FetchError as failure:
        await ctx.run(store.finish_flow(hashed, str(failure)))
        raise
    await ctx.run(store.finish_flow(hashed, "authorized"))
    return flow, credential_id


def _check_answer(flow: Flow, arguments: dict[str, str]) -> None:
    issuer = arguments.get("iss")
    if issuer is not None and issuer != flow.issuer:
        raise AuthorizationFailed(
            f"the answer came from another authorization server ({issuer[:200]!r}) than the "
            f"one the authorization started with ({flow.issuer}): refused (RFC 9207); nothing "
            "was stored")
    if issuer is None and flow.iss_required:
        raise AuthorizationFailed(
            f"authorization server {flow.issuer} promises to name itself (iss) in its answer, "
            "and this answer does not: refused (RFC 9207); nothing was stored")
    error = arguments.get("error")
    if error is not None:
        description = arguments.get("error_description")
        raise AuthorizationFailed(
            f"the authorization server answered {error[:80]}"
            + (f" ({description[:200]})" if description else "")
            + ("; you declined the access it asked for" if error == "access_denied" else ""))
    if not arguments.get("code"):
        raise AuthorizationFailed("the authorization server's answer has no code")
