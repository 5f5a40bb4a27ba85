"""Access tokens held in memory, kept fresh by NOTIFY: the MCP hot path's OAuth lookup.

Resolving a token is a SHA-256 and a dictionary lookup, like an API key (``accounts/cache``).
Unlike keys, tokens are many and short-lived, so they are not all loaded at start: a token
seen for the first time on this instance is read once from the database and kept until it
expires (at most ``MAX_TOKENS``, least recently used first out); an unknown one is remembered
briefly, so that a client hammering with a wrong token costs no query per request.
Expiries (epoch seconds from the database) are compared with the service's clock
(``director.clock``, a wall clock), which tests move.

Revocation reaches every instance through ``oauth_grant:<id>`` on ``director_changes``: the
grant's tokens are dropped at once and every ``CredentialHolder`` (the MCP engine) is told
``Revocation("oauth", grant id)``, which ends the sessions and streams the grant opened. A
read that started before the notification and ends after it is discarded (generations, as in
``accounts/cache``), so it cannot bring a revoked token back. When the LISTEN connection was
lost, everything cached is dropped and the grants the holders still hold are checked.
"""

from __future__ import annotations

from collections import OrderedDict
from uuid import UUID

from twisted.logger import Logger

from director.accounts.cache import CredentialHolder, Revocation
from director.accounts.credentials import hash_token
from director.clock import Clock
from director.db.database import Database
from director.db.interactions import CHANGES_CHANNEL
from director.oauth.server import grants
from director.oauth.server.grants import AccessGrant

log = Logger(namespace="oauth")

CREDENTIAL_KIND = "oauth"
MAX_TOKENS = 100_000
UNKNOWN_TOKEN_SECONDS = 5.0
UNKNOWN_TOKEN_CACHE_SIZE = 10_000
#: Revocations remembered for reads in flight (a read lasts milliseconds; this is plenty).
REVOKED_MEMORY = 10_000


class TokenCache:
    def __init__(self, database: Database, clock: Clock) -> None:
        self.database = database
        self.clock = clock
        self._tokens: OrderedDict[bytes, AccessGrant] = OrderedDict()
        self._of_grant: dict[UUID, set[bytes]] = {}
        self._unknown: OrderedDict[bytes, float] = OrderedDict()
        # Grant id -> the revocation's sequence number, newest last: a read that began before
        # it must not store what it read (it could bring a revoked token back).
        self._revoked: OrderedDict[UUID, int] = OrderedDict()
        self._sequence = 0  # bumped by every revocation and every reload
        self._reloaded_at = 0
        self._holders: list[CredentialHolder] = []

    async def start(self) -> None:
        await self.database.listen(CHANGES_CHANNEL, self._changed)
        self.database.on_reconnect(self.reload)

    def watch(self, holder: CredentialHolder) -> None:
        """Tell ``holder`` of every grant revoked from now on."""
        self._holders.append(holder)

    # --- the hot path ------------------------------------------------------------------------

    async def grant(self, token: str) -> AccessGrant | None:
        """What ``token`` grants, or None: unknown, expired, or revoked."""
        digest = hash_token(token)
        found = self._tokens.get(digest)
        now = self.clock.seconds()
        if found is not None:
            if found.expires_at > now:
                return found
            self._forget(digest)
            return None
        seen = self._unknown.get(digest)
        if seen is not None and now - seen < UNKNOWN_TOKEN_SECONDS:
            return None
        return await self._load(token, digest)

    async def _load(self, token: str, digest: bytes) -> AccessGrant | None:
        began = self._sequence
        found = await self.database.run(grants.access_grant(token))
        stale = self._reloaded_at > began or (
            found is not None and self._revoked.get(found.id, -1) > began)
        if found is None or stale:
            if not stale:
                self._remember_unknown(digest)
            return None
        self._remember(digest, found)
        return found

    def _remember(self, digest: bytes, found: AccessGrant) -> None:
        self._tokens[digest] = found
        self._of_grant.setdefault(found.id, set()).add(digest)
        self._unknown.pop(digest, None)
        while len(self._tokens) > MAX_TOKENS:
            self._forget(next(iter(self._tokens)))

    def _remember_unknown(self, digest: bytes) -> None:
        self._unknown[digest] = self.clock.seconds()
        self._unknown.move_to_end(digest)
        while len(self._unknown) > UNKNOWN_TOKEN_CACHE_SIZE:
            self._unknown.popitem(last=False)

    def _forget(self, digest: bytes) -> None:
        found = self._tokens.pop(digest, None)
        if found is not None:
            siblings = self._of_grant.get(found.id)
            if siblings is not None:
                siblings.discard(digest)
                if not siblings:
                    del self._of_grant[found.id]

    def __len__(self) -> int:
        return len(self._tokens)

    # --- revocation --------------------------------------------------------------------------

    def _changed(self, channel: str, payload: str) -> None:
        kind, _, key = payload.partition(":")
        if kind != grants.GRANT_NOTIFY_KIND:
            return
        try:
            grant_id = UUID(key)
        except ValueError:
            return
        self.grant_revoked(grant_id)

    def grant_revoked(self, grant_id: UUID) -> None:
        """Drop the grant's tokens, outdate reads in flight, end what it opened. Called for
        every notification, and at once by the instance that revoked it."""
        self._sequence += 1
        self._revoked.pop(grant_id, None)
        self._revoked[grant_id] = self._sequence
        while len(self._revoked) > REVOKED_MEMORY:
            self._revoked.popitem(last=False)
        for digest in list(self._of_grant.pop(grant_id, ())):
            self._tokens.pop(digest, None)
        for holder in list(self._holders):
            try:
                holder.revoked(Revocation(CREDENTIAL_KIND, grant_id))
            except Exception:
                log.failure("ending what a revoked OAuth grant opened failed")

    async def reload(self) -> None:
        """After the LISTEN connection came back: notifications may have been lost, so nothing
        cached is trusted, and the grants still holding sessions are checked."""
        self._sequence += 1
        self._reloaded_at = self._sequence
        self._tokens.clear()
        self._of_grant.clear()
        self._unknown.clear()
        held = {credential.id for holder in self._holders for _, credential in holder.held()
                if credential.kind == CREDENTIAL_KIND}
        if not held:
            return
        live = await self.database.run(grants.live_grants(held))
        for grant_id in held - live:
            self.grant_revoked(grant_id)
