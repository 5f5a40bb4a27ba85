"""Authorization codes, tokens and grants (refresh-token families): every read and write.

A *grant* is one authorization a user gave one client for one playbook. The code that
created it can be exchanged once; the grant then holds one refresh token and access tokens,
and each refresh rotates the refresh token. Presenting a refresh token a second time (a
stolen copy, or a client that lost the answer) revokes the whole grant, as does presenting a
code twice: from then on nothing issued under it works (OAuth 2.1 section 4.3.1, RFC 6749
section 4.1.2). Revoking a grant deletes it, and its tokens with it, and notifies
``oauth_grant:<id>`` so that every instance drops its tokens and ends the MCP sessions they
opened (``tokens.TokenCache``).

Codes and tokens are 256-bit random values stored as SHA-256, like API keys; access and
refresh tokens carry a prefix of their own (``dat_``, ``drt_``) so that a presented token is
never mistaken for an API key (``dk_``) or for each other.

The interactions that refuse after writing (a reused code or refresh token revokes the grant
and is refused) return a ``Refusal`` rather than raise, so that the revocation commits.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import re
import secrets
from typing import Any
from uuid import UUID

import attrs

from director.accounts.credentials import hash_token
from director.db.interactions import Interaction, Query, notify_change
from director.oauth.server.metadata import OFFLINE_ACCESS

ACCESS_PREFIX = "dat_"
REFRESH_PREFIX = "drt_"
#: How long a code may wait for its exchange (OAuth 2.1: short; clients exchange at once).
CODE_LIFETIME = datetime.timedelta(seconds=120)
#: The change notification of a revoked grant: ``oauth_grant:<id>``.
GRANT_NOTIFY_KIND = "oauth_grant"
_TOKEN_BODY = r"[A-Za-z0-9_-]{43}"  # noqa: S105 - a pattern, not a secret
_ACCESS_TOKEN = re.compile(ACCESS_PREFIX + _TOKEN_BODY)
#: RFC 7636 section 4.1: 43 to 128 unreserved characters.
_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")


def new_secret(prefix: str = "") -> str:
    return prefix + secrets.token_urlsafe(32)


def looks_like_access_token(value: str) -> bool:
    return _ACCESS_TOKEN.fullmatch(value) is not None


def verifier_valid(verifier: str) -> bool:
    return _VERIFIER.fullmatch(verifier) is not None


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def pkce_matches(verifier: str, challenge: str) -> bool:
    return verifier_valid(verifier) and hmac.compare_digest(s256(verifier), challenge)


@attrs.frozen
class Lifetimes:
    access: datetime.timedelta
    refresh: datetime.timedelta


@attrs.frozen(slots=True)
class AccessGrant:
    """What a valid access token grants: the caller's identity on the MCP hot path."""

    id: UUID  # the grant's (the credential its MCP sessions are bound to)
    user_id: UUID
    client_id: str
    playbook_pk: UUID
    scopes: frozenset[str]
    expires_at: float  # epoch seconds


@attrs.frozen
class CodeRequest:
    """What the user approved, bound into the code."""

    client_id: str
    user_id: UUID
    playbook_pk: UUID
    resource: str
    scope: str
    redirect_uri: str
    code_challenge: str


@attrs.frozen
class IssuedTokens:
    grant_id: UUID
    access_token: str
    expires_in: int
    scope: str
    refresh_token: str | None

    def response(self) -> dict[str, Any]:
        """The token endpoint's answer (RFC 6749 section 5.1)."""
        body: dict[str, Any] = {"access_token": self.access_token, "token_type": "Bearer",
                                "expires_in": self.expires_in, "scope": self.scope}
        if self.refresh_token is not None:
            body["refresh_token"] = self.refresh_token
        return body


@attrs.frozen
class Refusal:
    """An OAuth error (RFC 6749 section 5.2) decided inside a transaction that must commit."""

    error: str
    description: str
    revoked: UUID | None = None  # the grant revoked on the way (a reuse)


@attrs.frozen
class GrantInfo:
    """A grant as Connected apps shows it."""

    id: UUID
    client_id: str
    client_name: str
    client_kind: str
    redirect_uris: tuple[str, ...]
    playbook_pk: UUID
    playbook_id: str
    playbook_name: str
    resource: str
    scope: str
    created_at: datetime.datetime
    refreshed_at: datetime.datetime

    def public(self) -> dict[str, Any]:
        return {"id": str(self.id),
                "client": {"client_id": self.client_id, "name": self.client_name,
                           "kind": self.client_kind, "redirect_uris": list(self.redirect_uris)},
                "playbook": {"id": self.playbook_id, "name": self.playbook_name},
                "resource": self.resource, "scope": self.scope,
                "created_at": self.created_at.isoformat(),
                "last_refreshed_at": self.refreshed_at.isoformat()}


class NoSuchGrant(Exception):
    """Not a live grant of this user (another user's is reported the same way)."""


# --- codes ---------------------------------------------------------------------------------


def create_code(request: CodeRequest) -> Interaction[str]:
    """A new single-use code for what the user approved; the client counts as used."""
    code = new_secret()
    yield Query(
        "INSERT INTO oauth_codes (code_hash, client_id, user_id, playbook_pk, resource, scope, "
        "redirect_uri, code_challenge, expires_at) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, now() + %s)",
        (hash_token(code), request.client_id, str(request.user_id), str(request.playbook_pk),
         request.resource, request.scope, request.redirect_uri, request.code_challenge,
         CODE_LIFETIME))
    yield Query("UPDATE oauth_clients SET last_used_at = now() WHERE client_id = %s",
                (request.client_id,))
    return code


def exchange_code(code: str, client_id: str, redirect_uri: str | None, verifier: str | None,
                  resource: str | None, lifetimes: Lifetimes) -> Interaction[IssuedTokens | Refusal]:
    """The tokens of a new grant for a valid code, checked against everything it is bound to.
    A refresh token comes with them when the user granted ``offline_access``."""
    rows = yield Query(
        "SELECT client_id, user_id, playbook_pk, resource, scope, redirect_uri, code_challenge, "
        "expires_at <= now(), exchanged_at IS NOT NULL, grant_id FROM oauth_codes "
        "WHERE code_hash = %s FOR UPDATE", (hash_token(code),))
    if not rows:
        return Refusal("invalid_grant", "unknown authorization code")
    (owner, user_id, playbook_pk, bound_resource, scope, bound_redirect, challenge, expired,
     exchanged, grant_id) = rows[0]
    if exchanged:
        if grant_id is not None:
            yield from _delete_grant(UUID(str(grant_id)))
            return Refusal("invalid_grant", "this authorization code was used already; the "
                                            "tokens issued for it are revoked",
                           UUID(str(grant_id)))
        return Refusal("invalid_grant", "this authorization code was used already")
    if expired:
        return Refusal("invalid_grant", "the authorization code expired; authorize again")
    if owner != client_id:
        return Refusal("invalid_grant", "the authorization code was issued to another client")
    if redirect_uri != bound_redirect:
        return Refusal("invalid_grant", "redirect_uri is not the one the code was issued for")
    if verifier is None or not verifier_valid(verifier):
        return Refusal("invalid_request" if verifier is None else "invalid_grant",
                       "code_verifier is required (PKCE)" if verifier is None else
                       "code_verifier must be 43 to 128 characters of A-Z a-z 0-9 - . _ ~")
    if not pkce_matches(verifier, challenge):
        return Refusal("invalid_grant", "code_verifier does not match the code_challenge")
    if resource is not None and resource != bound_resource:
        return Refusal("invalid_target", f"resource must be {bound_resource}, for which the "
                                         "code was issued")
    rows = yield Query(
        "INSERT INTO oauth_grants (user_id, client_id, playbook_pk, resource, scope) "
        "VALUES (%s, %s, %s, %s, %s) RETURNING id",
        (str(user_id), client_id, str(playbook_pk), bound_resource, scope))
    new_grant = UUID(str(rows[0][0]))
    yield Query("UPDATE oauth_codes SET exchanged_at = now(), grant_id = %s WHERE code_hash = %s",
                (str(new_grant), hash_token(code)))
    return (yield from _issue(new_grant, scope, scope, lifetimes,
                              OFFLINE_ACCESS in scope.split()))


def _issue(grant_id: UUID, grant_scope: str, access_scope: str, lifetimes: Lifetimes,
           with_refresh: bool) -> Interaction[IssuedTokens]:
    access = new_secret(ACCESS_PREFIX)
    yield Query("INSERT INTO oauth_tokens (token_hash, grant_id, kind, scope, expires_at) "
                "VALUES (%s, %s, 'access', %s, now() + %s)",
                (hash_token(access), str(grant_id), access_scope, lifetimes.access))
    refresh = None
    if with_refresh:
        refresh = new_secret(REFRESH_PREFIX)
        yield Query("INSERT INTO oauth_tokens (token_hash, grant_id, kind, scope, expires_at) "
                    "VALUES (%s, %s, 'refresh', %s, now() + %s)",
                    (hash_token(refresh), str(grant_id), grant_scope, lifetimes.refresh))
    return IssuedTokens(grant_id, access, int(lifetimes.access.total_seconds()), access_scope,
                        refresh)


# --- refresh -------------------------------------------------------------------------------


def refresh(token: str, client_id: str, scope: tuple[str, ...] | None, resource: str | None,
            lifetimes: Lifetimes) -> Interaction[IssuedTokens | Refusal]:
    """New tokens for a refresh token, which is used up (rotation); a used one revokes its
    grant. ``scope``: what the new access token asks for, within the grant's."""
    rows = yield Query(
        "SELECT t.grant_id, t.expires_at <= now(), t.rotated_at IS NOT NULL, g.client_id, "
        "g.scope, g.resource FROM oauth_tokens t JOIN oauth_grants g ON g.id = t.grant_id "
        "WHERE t.token_hash = %s AND t.kind = 'refresh' FOR UPDATE OF t",
        (hash_token(token),))
    if not rows:
        return Refusal("invalid_grant", "unknown or revoked refresh token")
    grant_value, expired, rotated, owner, grant_scope, bound_resource = rows[0]
    grant_id = UUID(str(grant_value))
    if owner != client_id:
        return Refusal("invalid_grant", "the refresh token was issued to another client")
    if rotated:
        yield from _delete_grant(grant_id)
        return Refusal("invalid_grant", "this refresh token was used already: it may have been "
                                        "stolen, so every token of its grant is revoked; "
                                        "authorize again", grant_id)
    if expired:
        return Refusal("invalid_grant", "the refresh token expired; authorize again")
    if resource is not None and resource != bound_resource:
        return Refusal("invalid_target", f"resource must be {bound_resource}, for which the "
                                         "grant was given")
    granted = grant_scope.split()
    if scope is not None and not set(scope) <= set(granted):
        extra = " ".join(s for s in scope if s not in granted)
        return Refusal("invalid_scope", f"{extra!r} was not granted; authorize again to ask "
                                        "for more")
    access_scope = " ".join(scope) if scope is not None else grant_scope
    yield Query("UPDATE oauth_tokens SET rotated_at = now() WHERE token_hash = %s",
                (hash_token(token),))
    yield Query("UPDATE oauth_grants SET refreshed_at = now() WHERE id = %s", (str(grant_id),))
    return (yield from _issue(grant_id, grant_scope, access_scope, lifetimes, True))


# --- revocation ----------------------------------------------------------------------------


def _delete_grant(grant_id: UUID) -> Interaction[bool]:
    rows = yield Query("DELETE FROM oauth_grants WHERE id = %s RETURNING id", (str(grant_id),))
    if rows:
        yield notify_change(GRANT_NOTIFY_KIND, grant_id)
    return bool(rows)


def revoke_token(token: str, client_id: str) -> Interaction[UUID | None]:
    """RFC 7009: revoke the grant of an access or refresh token issued to ``client_id``. The
    grant goes as a whole: a refresh token's access tokens with it (section 2.1's SHOULD), and
    an access token's refresh token too (its MAY), so that "disconnect" means disconnected.
    A token unknown, expired or issued to another client changes nothing (None)."""
    rows = yield Query(
        "SELECT t.grant_id FROM oauth_tokens t JOIN oauth_grants g ON g.id = t.grant_id "
        "WHERE t.token_hash = %s AND g.client_id = %s", (hash_token(token), client_id))
    if not rows:
        return None
    grant_id = UUID(str(rows[0][0]))
    yield from _delete_grant(grant_id)
    return grant_id


def revoke_grant(user_id: UUID, grant_id: UUID) -> Interaction[None]:
    """Connected apps: revoke one of *this user's* grants."""
    rows = yield Query("SELECT 1 FROM oauth_grants WHERE id = %s AND user_id = %s",
                       (str(grant_id), str(user_id)))
    if not rows:
        raise NoSuchGrant(str(grant_id))
    yield from _delete_grant(grant_id)


def revoke_client(user_id: UUID, client_id: str) -> Interaction[list[UUID]]:
    """Connected apps: revoke every grant this user gave one client."""
    rows = yield Query("SELECT id FROM oauth_grants WHERE user_id = %s AND client_id = %s",
                       (str(user_id), client_id))
    revoked = [UUID(str(row[0])) for row in rows]
    for grant_id in revoked:
        yield from _delete_grant(grant_id)
    return revoked


# --- reads ---------------------------------------------------------------------------------


def access_grant(token: str) -> Interaction[AccessGrant | None]:
    """What a live access token grants, or None (unknown, expired, or its grant revoked)."""
    rows = yield Query(
        "SELECT t.grant_id, g.user_id, g.client_id, g.playbook_pk, t.scope, "
        "extract(epoch FROM t.expires_at) FROM oauth_tokens t "
        "JOIN oauth_grants g ON g.id = t.grant_id "
        "WHERE t.token_hash = %s AND t.kind = 'access' AND t.expires_at > now()",
        (hash_token(token),))
    if not rows:
        return None
    grant_id, user_id, client_id, playbook_pk, scope, expires_at = rows[0]
    return AccessGrant(UUID(str(grant_id)), UUID(str(user_id)), client_id,
                       UUID(str(playbook_pk)), frozenset(scope.split()), float(expires_at))


def live_grants(ids: set[UUID]) -> Interaction[set[UUID]]:
    rows = yield Query("SELECT id FROM oauth_grants WHERE id = ANY(%s::uuid[])",
                       ([str(i) for i in ids],))
    return {UUID(str(row[0])) for row in rows}


def grants_of(user_id: UUID, limit: int = 500, after: tuple[str, str] | None = None
              ) -> Interaction[list[GrantInfo]]:
    """The user's grants, oldest first, by creation time then id (a stable cursor)."""
    after_time, after_id = after if after else (None, None)
    rows = yield Query(
        "SELECT g.id, g.client_id, c.client_name, c.kind, c.redirect_uris, g.playbook_pk, p.id, "
        "p.name, g.resource, g.scope, g.created_at, g.refreshed_at FROM oauth_grants g "
        "JOIN oauth_clients c ON c.client_id = g.client_id "
        "JOIN playbooks p ON p.pk = g.playbook_pk WHERE g.user_id = %s "
        "AND (%s::timestamptz IS NULL OR (g.created_at, g.id) > (%s::timestamptz, %s::uuid)) "
        "ORDER BY g.created_at, g.id LIMIT %s",
        (str(user_id), after_time, after_time, after_id, limit))
    return [GrantInfo(UUID(str(row[0])), row[1], row[2], row[3], tuple(row[4]),
                      UUID(str(row[5])), *row[6:]) for row in rows]


def purge_expired() -> Interaction[int]:
    """Delete what can never be used again: expired codes and tokens, grants left without a
    live token (their refresh token expired), unused registrations older than a day. Grants
    go with a notification, like a revocation (their access tokens expired already)."""
    yield Query("DELETE FROM oauth_codes WHERE expires_at < now() - interval '1 day'")
    yield Query("DELETE FROM oauth_tokens WHERE expires_at < now()")
    rows = yield Query(
        "DELETE FROM oauth_grants g WHERE created_at < now() - %s AND NOT EXISTS "
        "(SELECT 1 FROM oauth_tokens t WHERE t.grant_id = g.id) RETURNING id", (CODE_LIFETIME,))
    for row in rows:
        yield notify_change(GRANT_NOTIFY_KIND, row[0])
    clients = yield Query(
        "DELETE FROM oauth_clients c WHERE last_used_at IS NULL "
        "AND created_at < now() - interval '1 day' AND NOT EXISTS "
        "(SELECT 1 FROM oauth_grants g WHERE g.client_id = c.client_id) RETURNING client_id")
    return len(rows) + len(clients)
