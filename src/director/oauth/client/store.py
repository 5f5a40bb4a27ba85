"""The SQL of upstream OAuth (tables of migration 0007), written once as interactions.

Every token, client secret and PKCE verifier is sealed with the ``SecretBox`` under a context
naming what it belongs to (``context``), so a sealed value moved to another row or field does
not open. Changes end with a NOTIFY on ``CHANNEL`` whose payload names the change, never a
value: ``credential:<id>:<why>`` (why: ``authorized``, ``refreshed``, ``problem``,
``deleted``) or ``discovery``; every instance then reads the row again.
"""

from __future__ import annotations

import datetime
import hashlib
from typing import Any
from uuid import UUID

import attrs

from director.crypto import SecretBox, SecretUnreadable
from director.db.interactions import Interaction, Query
from director.oauth.client.discovery import Discovery
from director.oauth.client.tokens import Client, Tokens

CHANNEL = "director_upstream_oauth"
#: How long an authorize URL stays usable.
FLOW_SECONDS = 15 * 60
#: Finished flows are kept this long (``director playbooks authorize`` reads their outcome).
FLOW_KEPT_SECONDS = 24 * 3600


def state_hash(state: str) -> bytes:
    return hashlib.sha256(state.encode()).digest()


def _notify(payload: str) -> Query:
    return Query("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


def _epoch(moment: datetime.datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


# --- discoveries ------------------------------------------------------------------------------

def save_discovery(found: Discovery) -> Interaction[None]:
    import json

    yield Query(
        "INSERT INTO upstream_oauth_discoveries (server_url, resource, issuer, "
        "resource_metadata, issuer_metadata, challenge_scope) "
        "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (server_url) DO UPDATE SET "
        "resource = EXCLUDED.resource, issuer = EXCLUDED.issuer, "
        "resource_metadata = EXCLUDED.resource_metadata, "
        "issuer_metadata = EXCLUDED.issuer_metadata, challenge_scope = EXCLUDED.challenge_scope, "
        "discovered_at = now()",
        (found.server_url, found.resource, found.issuer, json.dumps(found.resource_metadata),
         json.dumps(found.issuer_metadata), found.challenge_scope))
    yield _notify("discovery")


def load_discoveries() -> Interaction[list[Discovery]]:
    rows = yield Query("SELECT server_url, resource, issuer, resource_metadata, issuer_metadata, "
                       "challenge_scope FROM upstream_oauth_discoveries")
    return [Discovery(*row) for row in rows]


# --- clients ----------------------------------------------------------------------------------


def client_context(issuer: str, client_id: str) -> str:
    return f"upstream-oauth-client {issuer} {client_id}"


def find_client(box: SecretBox, issuer: str, *, user_id: UUID | None = None,
                redirect_uri: str | None = None) -> Interaction[Client | None]:
    """The user's own client for ``issuer`` (``user_id``), or the dynamic registration for
    ``redirect_uri``; None also when its secret no longer opens (sealed with a lost secret:
    a new registration replaces it, or the user enters the client again)."""
    if user_id is not None:
        rows = yield Query("SELECT kind, client_id, client_secret, auth_method FROM "
                           "upstream_oauth_clients WHERE kind = 'manual' AND issuer = %s "
                           "AND user_id = %s", (issuer, str(user_id)))
    else:
        rows = yield Query("SELECT kind, client_id, client_secret, auth_method FROM "
                           "upstream_oauth_clients WHERE kind = 'dcr' AND issuer = %s "
                           "AND redirect_uri = %s", (issuer, redirect_uri))
    if not rows:
        return None
    kind, client_id, sealed, method = rows[0]
    secret = None
    if sealed:
        try:
            secret, stale = box.opened(sealed, client_context(issuer, client_id))
        except SecretUnreadable:
            return None
        if stale:  # sealed with BETTER_AUTH_SECRET_PREVIOUS: sealed again on use
            yield Query("UPDATE upstream_oauth_clients SET client_secret = %s WHERE "
                        "client_secret = %s", (box.seal(secret, client_context(
                            issuer, client_id)), sealed))
    return Client(kind, client_id, secret, method)


def save_client(box: SecretBox, issuer: str, client: Client, *, user_id: UUID | None = None,
                redirect_uri: str | None = None) -> Interaction[None]:
    sealed = box.seal(client.secret, client_context(issuer, client.client_id)) \
        if client.secret else None
    if client.kind == "manual":
        yield Query("DELETE FROM upstream_oauth_clients WHERE kind = 'manual' AND issuer = %s "
                    "AND user_id = %s", (issuer, str(user_id)))
    else:
        yield Query("DELETE FROM upstream_oauth_clients WHERE kind = 'dcr' AND issuer = %s "
                    "AND redirect_uri = %s", (issuer, redirect_uri))
    yield Query("INSERT INTO upstream_oauth_clients (issuer, kind, user_id, redirect_uri, "
                "client_id, client_secret, auth_method) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (issuer, client.kind, None if user_id is None else str(user_id), redirect_uri,
                 client.client_id, sealed,
                 client.auth_method))


# --- flows ------------------------------------------------------------------------------------


@attrs.frozen
class Flow:
    """An authorization under way, as stored (secrets opened)."""

    state_hash: bytes
    user_id: UUID
    playbook_pk: UUID
    server_name: str
    server_url: str
    resource: str
    issuer: str
    client: Client
    code_verifier: str = attrs.field(repr=False)
    redirect_uri: str
    scope: str | None
    token_endpoint: str
    revocation_endpoint: str | None
    iss_required: bool


def _flow_context(hashed: bytes, what: str) -> str:
    return f"upstream-oauth-flow {hashed.hex()} {what}"


def create_flow(box: SecretBox, flow: Flow) -> Interaction[None]:
    client = flow.client
    yield Query("DELETE FROM upstream_oauth_flows WHERE expires_at < now() - %s * interval "
                "'1 second'", (FLOW_KEPT_SECONDS,))
    yield Query(
        "INSERT INTO upstream_oauth_flows (state_hash, user_id, playbook_pk, server_name, "
        "server_url, resource, issuer, client_kind, client_id, client_secret, auth_method, "
        "code_verifier, redirect_uri, scope, token_endpoint, revocation_endpoint, "
        "iss_required, expires_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "
        "%s, %s, %s, %s, %s, now() + %s * interval '1 second')",
        (flow.state_hash, str(flow.user_id), str(flow.playbook_pk), flow.server_name,
         flow.server_url,
         flow.resource, flow.issuer, client.kind, client.client_id,
         box.seal(client.secret, _flow_context(flow.state_hash, "client-secret"))
         if client.secret else None, client.auth_method,
         box.seal(flow.code_verifier, _flow_context(flow.state_hash, "verifier")),
         flow.redirect_uri, flow.scope, flow.token_endpoint, flow.revocation_endpoint,
         flow.iss_required, FLOW_SECONDS))


#: Why a callback's state was refused: ``FlowRefused.code`` -> the text for the user.
FLOW_REFUSALS = {
    "no-state": "the authorization server's answer has no state; start the authorization "
                "again",
    "unknown": "this authorization is unknown to Director (its state matches no authorization "
               "that was started); start it again",
    "other": "this authorization was started by another user or for another server; start it "
             "again from your own playbook",
    "used": "this authorization was already completed (its state was used once); start it "
            "again",
    "expired": f"this authorization expired (it must be completed within {FLOW_SECONDS // 60} "
               "minutes); start it again",
}


class FlowRefused(Exception):
    """The state names no flow this callback may complete (``code``: a key of
    ``FLOW_REFUSALS``, whose text the message is)."""

    def __init__(self, code: str) -> None:
        super().__init__(FLOW_REFUSALS[code])
        self.code = code


def consume_flow(box: SecretBox, hashed: bytes, user_id: UUID, playbook_pk: UUID,
                 server_name: str) -> Interaction[Flow]:
    """The flow of ``hashed``, marked used (once: a second callback with the same state is
    refused), or ``FlowRefused``. A flow of another user, playbook or server is left alone."""
    rows = yield Query(
        "SELECT user_id, playbook_pk, server_name, server_url, resource, issuer, client_kind, "
        "client_id, client_secret, auth_method, code_verifier, redirect_uri, scope, "
        "token_endpoint, revocation_endpoint, iss_required, consumed_at IS NOT NULL, "
        "expires_at < now() FROM upstream_oauth_flows WHERE state_hash = %s FOR UPDATE",
        (hashed,))
    if not rows:
        raise FlowRefused("unknown")
    (owner, pk, name, url, resource, issuer, kind, client_id, sealed_secret, method,
     sealed_verifier, redirect_uri, scope, token_endpoint, revocation_endpoint, iss_required,
     consumed, expired) = rows[0]
    owner, pk = UUID(str(owner)), UUID(str(pk))
    if (owner, pk, name) != (user_id, playbook_pk, server_name):
        raise FlowRefused("other")
    if consumed:
        raise FlowRefused("used")
    if expired:
        raise FlowRefused("expired")
    yield Query("UPDATE upstream_oauth_flows SET consumed_at = now() WHERE state_hash = %s",
                (hashed,))
    secret = box.open(sealed_secret, _flow_context(hashed, "client-secret")) \
        if sealed_secret else None
    return Flow(hashed, owner, pk, name, url, resource, issuer,
                Client(kind, client_id, secret, method),
                box.open(sealed_verifier, _flow_context(hashed, "verifier")), redirect_uri,
                scope, token_endpoint, revocation_endpoint, iss_required)


def finish_flow(hashed: bytes, outcome: str) -> Interaction[None]:
    yield Query("UPDATE upstream_oauth_flows SET finished_at = now(), outcome = %s, "
                "consumed_at = coalesce(consumed_at, now()) WHERE state_hash = %s",
                (outcome[:1000], hashed))
    yield _notify("flow")


def flow_outcome(hashed: bytes, user_id: UUID) -> Interaction[tuple[str | None, bool] | None]:
    """``(outcome, expired)`` of the user's flow (outcome None while it is under way), None if
    there is no such flow of theirs."""
    rows = yield Query("SELECT outcome, expires_at < now() FROM upstream_oauth_flows "
                       "WHERE state_hash = %s AND user_id = %s", (hashed, str(user_id)))
    return (rows[0][0], rows[0][1]) if rows else None


def pending_redirect_uris() -> Interaction[list[str]]:
    """The redirect URIs of the flows under way that identify Director by its Client ID
    Metadata Document (``identity.client_metadata_document``)."""
    rows = yield Query("SELECT DISTINCT redirect_uri FROM upstream_oauth_flows WHERE "
                       "client_kind = 'cimd' AND consumed_at IS NULL AND expires_at > now() "
                       "ORDER BY redirect_uri LIMIT 1000")
    return [row[0] for row in rows]


# --- credentials ------------------------------------------------------------------------------


@attrs.define(eq=False)
class Credential:
    """One user's tokens for one (authorization server, resource), opened."""

    id: UUID
    user_id: UUID
    issuer: str
    resource: str
    client: Client
    token_endpoint: str
    revocation_endpoint: str | None
    access_token: str | None = attrs.field(repr=False)
    refresh_token: str | None = attrs.field(repr=False)
    scope: str | None
    expires_at: float | None
    issued_at: float
    generation: int
    problem: str | None = None
    wanted_scope: str | None = None
    #: The ``Authorization`` header, made once per token.
    header: dict[str, str] = attrs.field(factory=dict, repr=False)

    @property
    def usable(self) -> bool:
        return self.access_token is not None and self.problem is None

    def refresh_due(self, now: float) -> bool:
        """Shortly before expiry: a tenth of its life, at most a minute, ahead."""
        if self.expires_at is None:
            return False
        ahead = min(60.0, max(0.0, self.expires_at - self.issued_at) / 10)
        return now >= self.expires_at - ahead


def credential_context(user_id: UUID, issuer: str, resource: str, what: str) -> str:
    return f"upstream-oauth {user_id} {issuer} {resource} {what}"


_SELECT_CREDENTIALS = (
    "SELECT id, user_id, issuer, resource, client_kind, client_id, client_secret, auth_method, "
    "token_endpoint, revocation_endpoint, access_token, refresh_token, scope, expires_at, "
    "updated_at, generation, problem, wanted_scope FROM upstream_oauth_credentials")


@attrs.frozen
class Opened:
    credential: Credential
    #: Sealed with BETTER_AUTH_SECRET_PREVIOUS: to be sealed again (``reseal``).
    stale: bool


def open_credential(box: SecretBox, row: tuple[Any, ...]) -> Opened:
    """A credential row, opened. One that does not open (sealed with a lost secret) comes
    back without tokens and with its ``problem`` saying so: its user must authorize again."""
    (cid, user_id, issuer, resource, kind, client_id, sealed_secret, method, token_endpoint,
     revocation_endpoint, sealed_access, sealed_refresh, scope, expires_at, updated_at,
     generation, problem, wanted_scope) = row
    stale = False

    def opened(sealed: str | None, what: str) -> str | None:
        nonlocal stale
        if sealed is None:
            return None
        text, was_stale = box.opened(sealed, credential_context(user_id, issuer, resource, what))
        stale = stale or was_stale
        return text

    try:
        secret = opened(sealed_secret, "client-secret")
        access, refresh = opened(sealed_access, "access"), opened(sealed_refresh, "refresh")
    except SecretUnreadable:
        secret = access = refresh = None
        problem = ("its tokens were sealed with another BETTER_AUTH_SECRET and cannot be "
                   "read: authorize again")
    credential = Credential(UUID(str(cid)), UUID(str(user_id)), issuer, resource,
                            Client(kind, client_id, secret, method), token_endpoint,
                            revocation_endpoint, access, refresh, scope, _epoch(expires_at),
                            _epoch(updated_at) or 0.0, generation, problem, wanted_scope)
    if access is not None:
        credential.header = {"Authorization": f"Bearer {access}"}
    return Opened(credential, stale)


def load_credentials(box: SecretBox, credential_id: UUID | None = None
                     ) -> Interaction[list[Opened]]:
    if credential_id is None:
        rows = yield Query(_SELECT_CREDENTIALS)
    else:
        rows = yield Query(_SELECT_CREDENTIALS + " WHERE id = %s", (str(credential_id),))
    return [open_credential(box, row) for row in rows]


def _sealed_tokens(box: SecretBox, user_id: UUID, issuer: str, resource: str,
                   tokens: Tokens) -> tuple[str, str | None]:
    return (box.seal(tokens.access_token, credential_context(user_id, issuer, resource, "access")),
            box.seal(tokens.refresh_token, credential_context(user_id, issuer, resource, "refresh"))
            if tokens.refresh_token else None)


def store_authorized(box: SecretBox, flow: Flow, tokens: Tokens) -> Interaction[UUID]:
    """The tokens of a completed authorization: a new credential, or the user's one for the
    same (issuer, resource) replaced (its problem cleared: step-up done)."""
    access, refresh = _sealed_tokens(box, flow.user_id, flow.issuer, flow.resource, tokens)
    client = flow.client
    secret = box.seal(client.secret, credential_context(flow.user_id, flow.issuer, flow.resource,
                                              "client-secret")) if client.secret else None
    rows = yield Query(
        "INSERT INTO upstream_oauth_credentials (user_id, issuer, resource, client_kind, "
        "client_id, client_secret, auth_method, token_endpoint, revocation_endpoint, "
        "access_token, token_type, refresh_token, scope, expires_at) VALUES (%s, %s, %s, %s, "
        "%s, %s, %s, %s, %s, %s, %s, %s, %s, now() + %s * interval '1 second') "
        "ON CONFLICT (user_id, issuer, resource) DO UPDATE SET "
        "client_kind = EXCLUDED.client_kind, client_id = EXCLUDED.client_id, "
        "client_secret = EXCLUDED.client_secret, auth_method = EXCLUDED.auth_method, "
        "token_endpoint = EXCLUDED.token_endpoint, "
        "revocation_endpoint = EXCLUDED.revocation_endpoint, "
        "access_token = EXCLUDED.access_token, token_type = EXCLUDED.token_type, "
        "refresh_token = EXCLUDED.refresh_token, scope = EXCLUDED.scope, "
        "expires_at = EXCLUDED.expires_at, generation = upstream_oauth_credentials.generation "
        "+ 1, refresh_lease_until = NULL, problem = NULL, wanted_scope = NULL, "
        "updated_at = now() RETURNING id",
        (str(flow.user_id), flow.issuer, flow.resource, client.kind, client.client_id, secret,
         client.auth_method, flow.token_endpoint, flow.revocation_endpoint, access,
         tokens.token_type, refresh, tokens.scope or flow.scope, tokens.expires_in))
    credential_id = UUID(str(rows[0][0]))
    yield _notify(f"credential:{credential_id}:authorized")
    return credential_id


def take_refresh_lease(credential_id: UUID, generation: int, seconds: float
                       ) -> Interaction[str]:
    """``taken``: this instance refreshes generation ``generation``; ``busy``: another one
    is refreshing it; ``moved``: the credential is past that generation (or gone)."""
    rows = yield Query(
        "UPDATE upstream_oauth_credentials SET refresh_lease_until = now() + %s * interval "
        "'1 second' WHERE id = %s AND generation = %s AND (refresh_lease_until IS NULL OR "
        "refresh_lease_until < now()) RETURNING id", (seconds, str(credential_id), generation))
    if rows:
        return "taken"
    rows = yield Query("SELECT generation FROM upstream_oauth_credentials WHERE id = %s",
                       (str(credential_id),))
    return "busy" if rows and rows[0][0] == generation else "moved"


def release_refresh_lease(credential_id: UUID) -> Interaction[None]:
    yield Query("UPDATE upstream_oauth_credentials SET refresh_lease_until = NULL WHERE id = %s",
                (str(credential_id),))


def store_refreshed(box: SecretBox, credential: Credential, tokens: Tokens
                    ) -> Interaction[bool]:
    """New tokens for ``credential`` (of its generation): a refresh token the server did not
    rotate is kept. False if the generation moved meanwhile (nothing stored)."""
    access, refresh = _sealed_tokens(box, credential.user_id, credential.issuer,
                                     credential.resource, tokens)
    rows = yield Query(
        "UPDATE upstream_oauth_credentials SET access_token = %s, "
        "refresh_token = coalesce(%s, refresh_token), token_type = %s, "
        "scope = coalesce(%s, scope), expires_at = now() + %s * interval '1 second', "
        "generation = generation + 1, refresh_lease_until = NULL, updated_at = now() "
        "WHERE id = %s AND generation = %s RETURNING generation",
        (access, refresh, tokens.token_type, tokens.scope, tokens.expires_in,
         str(credential.id), credential.generation))
    if not rows:
        return False
    yield _notify(f"credential:{credential.id}:refreshed")
    return True


def set_problem(credential_id: UUID, problem: str, wanted_scope: str | None
                ) -> Interaction[None]:
    yield Query("UPDATE upstream_oauth_credentials SET problem = %s, "
                "wanted_scope = coalesce(%s, wanted_scope) WHERE id = %s",
                (problem[:500], wanted_scope, str(credential_id)))
    yield _notify(f"credential:{credential_id}:problem")


def delete_credential(credential_id: UUID) -> Interaction[bool]:
    rows = yield Query("DELETE FROM upstream_oauth_credentials WHERE id = %s RETURNING id",
                       (str(credential_id),))
    yield _notify(f"credential:{credential_id}:deleted")
    return bool(rows)


def reseal_credential(box: SecretBox, credential: Credential) -> Interaction[None]:
    """Seal the credential's secrets again with the current secret (same generation)."""
    context = (credential.user_id, credential.issuer, credential.resource)
    sealed = [box.seal(value, credential_context(*context, what)) if value else None
              for value, what in ((credential.access_token, "access"),
                                  (credential.refresh_token, "refresh"),
                                  (credential.client.secret, "client-secret"))]
    yield Query(
        "UPDATE upstream_oauth_credentials SET access_token = coalesce(%s, access_token), "
        "refresh_token = coalesce(%s, refresh_token), "
        "client_secret = coalesce(%s, client_secret) WHERE id = %s AND generation = %s",
        (*sealed, str(credential.id), credential.generation))
