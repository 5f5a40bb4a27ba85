"""Users, API keys and cookie sessions held in memory, kept fresh by NOTIFY.

Resolving a credential on a request is a dictionary lookup. A committed change anywhere (this
instance, another one, or the admin command) arrives as ``user:<id>``, ``api_key:<id>``,
``session:<id>`` or ``sessions_of:<user id>`` on ``director_changes``; the affected entry is
evicted at once and re-read, so a revoked key stops working everywhere within milliseconds.
When the LISTEN connection was lost, everything is reloaded (notifications sent meanwhile are
gone).

A key missing from the cache (created a moment ago on another instance, racing its
notification) is looked up once in the database; unknown keys are remembered briefly so that
a client hammering with a wrong key costs no query per request.

What a credential already opened is ended too: a ``CredentialHolder`` (the MCP engine, whose
sessions and streams remember the ``Credential`` that opened them) is told of every
``Revocation`` — a key revoked, a cookie session signed out, every cookie session of a user
ended (a password change), a user disabled or gone — as soon as this instance knows it. After a
reload (notifications may have been lost) the credentials the holder still holds are checked
against what was reloaded, and those no longer valid are revoked.

Time is the injected clock's (``director.clock``): the wall clock, which a session's
``expires_at`` (PostgreSQL's) is compared with; how long an entry stays cached moves with a
clock step, by the step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Protocol
from uuid import UUID

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from director.accounts import store
from director.accounts.credentials import hash_token
from director.clock import Clock
from director.db.database import Database
from director.db.interactions import CHANGES_CHANNEL

log = Logger(namespace="accounts")

SESSION_CACHE_SECONDS = 60.0
UNKNOWN_KEY_CACHE_SECONDS = 5.0
UNKNOWN_KEY_CACHE_SIZE = 10_000
#: Presented keys whose hash was looked up and found; emptied when it grows past this.
KEY_DIGEST_MEMO_SIZE = 10_000


@attrs.frozen
class CachedSession:
    session: store.Session
    cached_at: float


@attrs.frozen
class Credential:
    """What authenticated a request: an API key, a cookie session or an OAuth grant, by id
    (never reused)."""

    #: "api_key", "session", "oauth" (a grant: ``director.oauth.server.tokens`` revokes it), or
    #: "studio" (the Studio's own sessions: id is the user's)
    kind: str
    id: UUID


@attrs.frozen
class Revocation:
    """Credentials that stopped being valid: an API key or a cookie session (``kind`` as in
    ``Credential``, ``id`` its id); every cookie session of a user (``sessions_of``, a password
    change); or everything of a user (``user``: disabled or deleted). ``id`` is the user's then.
    """

    kind: str
    id: UUID


class CredentialHolder(Protocol):
    """Something that keeps what credentials opened (MCP sessions and their streams)."""

    def revoked(self, revocation: Revocation) -> None: ...

    def held(self) -> Iterable[tuple[UUID, Credential]]:
        """Each (user id, credential) that something is open with now."""
        ...


class AccountCache:
    def __init__(self, database: Database, clock: Clock) -> None:
        self.database = database
        self.clock = clock
        self.users: dict[UUID, store.User] = {}
        self.keys_by_hash: dict[bytes, store.ApiKey] = {}
        self.keys_by_id: dict[UUID, store.ApiKey] = {}
        self._sessions: dict[bytes, CachedSession] = {}
        # Unknown key hash -> (when looked up, whether it is a revoked key's).
        self._unknown_keys: OrderedDict[bytes, tuple[float, bool]] = OrderedDict()
        # A presented key -> its hash, for keys that were found: a client sends the same key
        # with every request, and SHA-256 through OpenSSL was 2 % of a proxied call's CPU. Only
        # found keys are kept, so a stream of made-up keys cannot fill it; what is found is
        # still looked up by hash each time, so a revoked key is refused as before.
        self._digests: dict[str, bytes] = {}
        self._holders: list[CredentialHolder] = []
        # Bumped by every change notification of a key or user: a re-read that started before
        # a later change must not store what it read (it could resurrect a revoked key).
        self._generation: dict[UUID, int] = {}
        self.loaded = False

    # --- loading and change notifications ----------------------------------------------------

    async def start(self) -> None:
        await self.database.listen(CHANGES_CHANNEL, self._changed)
        self.database.on_reconnect(self.reload)
        await self.reload()

    async def reload(self) -> None:
        users = await self.database.run(store.all_users())
        keys = await self.database.run(store.live_keys())
        self.users = {user.id: attrs.evolve(user, password_hash="") for user in users}
        self.keys_by_hash = {key.key_hash: key for key in keys}
        self.keys_by_id = {key.id: key for key in keys}
        self._sessions.clear()
        self._unknown_keys.clear()
        self.loaded = True
        log.info("account cache loaded: {users} users, {keys} API keys",
                 users=len(self.users), keys=len(keys))
        await self._revoke_lost()

    # --- what credentials opened --------------------------------------------------------------

    def watch(self, holder: CredentialHolder) -> None:
        """Tell ``holder`` of every revocation from now on."""
        self._holders.append(holder)

    def _revoke(self, kind: str, identifier: UUID) -> None:
        for holder in list(self._holders):
            _tell(holder, Revocation(kind, identifier))

    async def _revoke_lost(self) -> None:
        """After a reload: revoke what the holders hold and is no longer valid (its
        notification may have been lost while the LISTEN connection was down)."""
        for holder in list(self._holders):
            held = list(holder.held())
            cookie_sessions = {credential.id for _, credential in held
                               if credential.kind == "session"}
            try:
                live = await self._live_sessions(cookie_sessions) if cookie_sessions else set()
            except Exception:
                log.failure("checking the cookie sessions of open MCP sessions failed")
                live = cookie_sessions  # the next reload checks again
            for user_id, credential in held:
                user = self.users.get(user_id)
                if user is None or user.status == "disabled":
                    _tell(holder, Revocation("user", user_id))
                elif credential.kind == "api_key" and credential.id not in self.keys_by_id:
                    _tell(holder, Revocation("api_key", credential.id))
                elif credential.kind == "session" and credential.id not in live:
                    _tell(holder, Revocation("session", credential.id))

    async def _live_sessions(self, ids: set[UUID]) -> set[UUID]:
        rows = await self.database.runQuery(
            "SELECT id FROM sessions WHERE id = ANY(%s::uuid[]) AND expires_at > now()",
            ([str(i) for i in ids],))
        return {UUID(str(row[0])) for row in rows}

    # --- change notifications -------------------------------------------------------------

    def _changed(self, channel: str, payload: str) -> None:
        kind, _, key = payload.partition(":")
        try:
            identifier = UUID(key)
        except ValueError:
            return
        if kind in ("api_key", "user"):
            self._generation[identifier] = self._generation.get(identifier, 0) + 1
        if kind == "api_key":
            self.forget_key(identifier)
            defer.ensureDeferred(self._refresh_key(identifier)).addErrback(self._refresh_failed)
        elif kind == "user":
            self._sessions = {h: s for h, s in self._sessions.items()
                              if s.session.user_id != identifier}
            defer.ensureDeferred(self._refresh_user(identifier)).addErrback(self._refresh_failed)
        elif kind == "session":
            self._sessions = {h: s for h, s in self._sessions.items()
                              if s.session.id != identifier}
            self._revoke("session", identifier)
        elif kind == "sessions_of":
            self._sessions = {h: s for h, s in self._sessions.items()
                              if s.session.user_id != identifier}
            self._revoke("sessions_of", identifier)

    def _refresh_failed(self, failure: Any) -> None:
        log.failure("refreshing the account cache failed; reloading everything", failure)
        defer.ensureDeferred(self.reload()).addErrback(lambda f: log.failure("reload failed", f))

    def forget_key(self, key_id: UUID) -> None:
        old = self.keys_by_id.pop(key_id, None)
        if old is not None:
            self.keys_by_hash.pop(old.key_hash, None)

    def key_revoked(self, key_id: UUID) -> None:
        """This instance revoked the key: forget it now, outdate reads in flight, and end
        what it opened here (other instances do when its notification arrives)."""
        self._generation[key_id] = self._generation.get(key_id, 0) + 1
        self.forget_key(key_id)
        self._revoke("api_key", key_id)

    def remember_key(self, key: store.ApiKey) -> None:
        self.forget_key(key.id)
        self.keys_by_id[key.id] = key
        self.keys_by_hash[key.key_hash] = key
        self._unknown_keys.pop(key.key_hash, None)

    async def _refresh_key(self, key_id: UUID) -> None:
        generation = self._generation.get(key_id, 0)
        key = await self.database.run(store.live_key(key_id))
        if self._generation.get(key_id, 0) != generation:
            return  # changed again while we read: the newer notification's read decides
        if key is not None:
            self.remember_key(key)
        else:
            self.forget_key(key_id)
            self._revoke("api_key", key_id)

    async def _refresh_user(self, user_id: UUID) -> None:
        generation = self._generation.get(user_id, 0)
        user = await self.database.run(store.user_by_id(user_id))
        if self._generation.get(user_id, 0) != generation:
            return
        if user is None:
            self.users.pop(user_id, None)
        else:
            self.users[user_id] = attrs.evolve(user, password_hash="")
        if user is None or user.status == "disabled":
            self._revoke("user", user_id)

    # --- lookups on the request path ---------------------------------------------------------

    async def key(self, value: str) -> store.ApiKey | None:
        digest = self._digests.get(value)
        remembered = digest is not None
        if digest is None:
            digest = hash_token(value)
        found = self.keys_by_hash.get(digest)
        if found is not None:
            if not remembered:
                if len(self._digests) >= KEY_DIGEST_MEMO_SIZE:
                    self._digests.clear()
                self._digests[value] = digest
            return found
        now = self.clock.seconds()
        seen = self._unknown_keys.get(digest)
        if seen is not None and now - seen[0] < UNKNOWN_KEY_CACHE_SECONDS:
            return None
        rows = await self.database.runQuery(
            "SELECT id, revoked_at IS NOT NULL FROM api_keys WHERE key_hash = %s", (digest,))
        if rows and not rows[0][1]:
            await self._refresh_key(UUID(str(rows[0][0])))
            return self.keys_by_hash.get(digest)
        self._unknown_keys[digest] = (now, bool(rows))
        self._unknown_keys.move_to_end(digest)
        while len(self._unknown_keys) > UNKNOWN_KEY_CACHE_SIZE:
            self._unknown_keys.popitem(last=False)
        return None

    def refusal(self, value: str) -> str:
        """Why ``key(value)`` found nothing, for metrics: ``revoked`` or ``invalid_key``."""
        seen = self._unknown_keys.get(hash_token(value))
        return "revoked" if seen is not None and seen[1] else "invalid_key"

    async def user(self, user_id: UUID) -> store.User | None:
        found = self.users.get(user_id)
        if found is None:
            await self._refresh_user(user_id)
            found = self.users.get(user_id)
        return found

    async def session(self, token: str) -> store.Session | None:
        digest = hash_token(token)
        cached = self._sessions.get(digest)
        now = self.clock.seconds()
        if (cached is not None and now - cached.cached_at < SESSION_CACHE_SECONDS
                and cached.session.expires_at.timestamp() > now):
            return cached.session
        found = await self.database.run(store.session_by_token(token))
        if found is None:
            self._sessions.pop(digest, None)
            return None
        self._sessions[digest] = CachedSession(found, now)
        return found

    def forget_session(self, token: str) -> None:
        self._sessions.pop(hash_token(token), None)

    def remember_session(self, token: str, session: store.Session) -> None:
        self._sessions[hash_token(token)] = CachedSession(session, self.clock.seconds())


def _tell(holder: CredentialHolder, revocation: Revocation) -> None:
    try:
        holder.revoked(revocation)
    except Exception:
        log.failure("ending what a revoked credential opened failed")
