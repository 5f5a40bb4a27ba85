"""``UpstreamAuthorizations``: each instance's view of its users' upstream OAuth credentials,
the providers that put them on upstream requests, and refreshing them once for everyone.

Cache. Every discovery and every credential (opened) is kept in memory, loaded at start and
kept fresh by NOTIFY on ``store.CHANNEL`` (each payload names a row, which is read again;
after a lost LISTEN connection, everything is read again). So the hot path — the
``Authorization`` header of an upstream request — is two dictionary lookups, no SQL
(``OAuthProvider.headers``). A value still sealed with ``BETTER_AUTH_SECRET_PREVIOUS`` is
sealed again with the current secret when it is loaded; one that no secret opens leaves its
credential without tokens (its user must authorize again; ``director doctor`` counts them).

Refresh. A token is refreshed a little before it expires (``Credential.refresh_due``), or when
the server answers 401 to the token the credential holds now. Once per credential however many
requests and instances need it:

* on one instance, concurrent callers share one refresh (``_refreshing``);
* across instances, the refresh of generation N is leased in the credential's row
  (``store.take_refresh_lease``: a conditional UPDATE, so one instance wins); the others wait
  for the NOTIFY of generation N+1 (polling the row meanwhile, in case a notification is lost)
  and use the new token. The lease is a column rather than a ``SELECT … FOR UPDATE`` held
  across the token request: that would keep a pooled connection (of ``DATABASE_POOL_SIZE``)
  busy for a network round trip per refreshing credential; a lease costs two short
  statements, and if the instance holding it dies the lease expires (``LEASE_SECONDS``);
* a rotated refresh token replaces the old one (a server that does not rotate keeps it);
  ``invalid_grant`` (revoked, expired, already used) deletes the credential: the server is
  ``unauthorized`` until the user authorizes again. Other failures (the authorization server
  unreachable) keep it for the next attempt.

An upstream's 401: to the token the credential holds now, one refresh and one retry (a second
401 marks the credential's ``problem``: authorize again; before either verdict the server's
authorization is discovered again, and if its metadata now names another authorization server
(SEP-2352) that discovery replaces the old one: the server shows ``unauthorized`` there, and
the next authorization registers with it); to an older token (someone refreshed
meanwhile), a retry with the new one; without any token, the server's authorization is
discovered (and stored for every instance), then a retry if the user has a credential for it
(authorized through another playbook), else ``unauthorized`` with the way to authorize. A 403
``insufficient_scope`` records the scope it asks for (step-up): the server shows
``unauthorized`` and the next authorization asks for the scopes held plus those.

A token is only ever sent to URLs under the resource it was issued for
(``discovery.resource_covers``), never logged, and never part of an error message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import UUID

from twisted.internet import defer
from twisted.logger import Logger

from director import tracing
from director.config import Settings
from director.crypto import SecretBox
from director.db.database import Database, DatabaseUnavailable
from director.mcp.upstream.authorization import UpstreamUnauthorized
from director.mcp.upstream.base import UpstreamError
from director.mcp.upstream.http_plumbing import _Once, display_url, upstream_agent
from director.oauth.client import challenge, flow, store, tokens
from director.oauth.client.discovery import Discovery, discover, resource_covers, same_origin
from director.oauth.client.fetch import Fetcher, FetchError
from director.oauth.client.store import Credential
from director.playbooks.model import Server

log = Logger(namespace="oauth.client")

#: How long the instance refreshing a credential holds it (the token request's timeout, plus).
LEASE_SECONDS = 20.0
#: How often a waiting instance reads the credential again, in case a NOTIFY is lost.
POLL_SECONDS = 1.0

#: ``observer(user_id, credential, why)``: why is "authorized" or "deleted".
Observer = Callable[[UUID, Credential, str], object]


def _key(user_id: UUID, issuer: str, resource: str) -> tuple[UUID, str, str]:
    return user_id, issuer, resource


class UpstreamAuthorizations:
    def __init__(self, settings: Settings, database: Database, box: SecretBox, reactor: Any,
                 pool: Any) -> None:
        self.settings = settings
        self.database = database
        self.box = box
        self.reactor = reactor
        self.fetcher = Fetcher(reactor, upstream_agent(reactor, pool),
                               allow_insecure=settings.allow_insecure_http_servers)
        self.context = flow.FlowContext(self.fetcher, database.run, box, settings.base_url)
        self._discoveries: dict[str, Discovery] = {}
        self._credentials: dict[UUID, Credential] = {}
        self._by_key: dict[tuple[UUID, str, str], Credential] = {}
        #: One discovery per server URL, one refresh per credential, at a time (concurrent
        #: callers share it; one's cancellation does not cancel it for the others).
        self._discovering: dict[str, _Once] = {}
        self._refreshing: dict[UUID, _Once] = {}
        self._changes: dict[UUID, list[defer.Deferred[None]]] = {}
        #: Told when a user's credential is stored by an authorization or deleted.
        self.observers: list[Observer] = []
        self.loaded = False

    # --- lifecycle and cache ----------------------------------------------------------------

    async def start(self) -> None:
        await self.database.listen(store.CHANNEL, self._notified)
        self.database.on_reconnect(self.reload)
        await self.reload()

    async def reload(self) -> None:
        discoveries = await self.database.run(store.load_discoveries())
        opened = await self.database.run(store.load_credentials(self.box))
        self._discoveries = {found.server_url: found for found in discoveries}
        self._credentials.clear()
        self._by_key.clear()
        for one in opened:
            self._install(one.credential)
            if one.stale:
                await self._reseal(one.credential)
        self.loaded = True

    def _install(self, credential: Credential) -> None:
        current = self._credentials.get(credential.id)
        if current is not None and current.generation > credential.generation:
            return  # a late read of an older generation
        self._credentials[credential.id] = credential
        self._by_key[_key(credential.user_id, credential.issuer, credential.resource)] = \
            credential
        for waiter in self._changes.pop(credential.id, []):
            if not waiter.called:
                waiter.callback(None)

    def _forget(self, credential_id: UUID) -> Credential | None:
        credential = self._credentials.pop(credential_id, None)
        if credential is not None:
            key = _key(credential.user_id, credential.issuer, credential.resource)
            if self._by_key.get(key) is credential:
                del self._by_key[key]
        for waiter in self._changes.pop(credential_id, []):
            if not waiter.called:
                waiter.callback(None)
        return credential

    async def _reseal(self, credential: Credential) -> None:
        try:
            await self.database.run(store.reseal_credential(self.box, credential))
        except Exception:
            log.failure("sealing an upstream OAuth credential again with the current secret")

    def _notified(self, channel: str, payload: str) -> None:
        kind, _, rest = payload.partition(":")
        if kind == "discovery":
            done = defer.ensureDeferred(self._reload_discoveries())
        elif kind == "credential":
            identifier, _, why = rest.partition(":")
            try:
                credential_id = UUID(identifier)
            except ValueError:
                return
            done = defer.ensureDeferred(self._reload_credential(credential_id, why))
        else:
            return
        done.addErrback(lambda failure: log.failure("reloading upstream OAuth state", failure))

    async def _reload_discoveries(self) -> None:
        discoveries = await self.database.run(store.load_discoveries())
        self._discoveries = {found.server_url: found for found in discoveries}

    async def _reload_credential(self, credential_id: UUID, why: str = "") -> None:
        opened = await self.database.run(store.load_credentials(self.box, credential_id))
        if not opened:
            gone = self._forget(credential_id)
            if gone is not None and why == "deleted":
                self._tell(gone, "deleted")
            return
        credential = opened[0].credential
        self._install(credential)
        if opened[0].stale:
            await self._reseal(credential)
        if why == "authorized":
            self._tell(credential, "authorized")

    def _tell(self, credential: Credential, why: str) -> None:
        for observer in list(self.observers):
            try:
                observer(credential.user_id, credential, why)
            except Exception:
                log.failure("an upstream OAuth observer failed")

    # --- lookups ----------------------------------------------------------------------------

    def discovery(self, server_url: str) -> Discovery | None:
        return self._discoveries.get(server_url)

    def credential_for(self, user_id: UUID, server_url: str) -> Credential | None:
        found = self._discoveries.get(server_url)
        if found is None:
            return None
        return self._by_key.get(_key(user_id, found.issuer, found.resource))

    def credentials(self) -> list[Credential]:
        return list(self._credentials.values())

    def provider(self, user_id: UUID, server: Server) -> OAuthProvider | None:
        if server.type not in ("http", "sse") or server.url is None:
            return None
        return OAuthProvider(self, user_id, server.name, server.url)

    # --- discovery --------------------------------------------------------------------------

    async def discovered(self, server_url: str, found: challenge.Challenge | None
                         ) -> Discovery:
        """The server's authorization: known, or discovered now (once for concurrent callers)
        and stored for every instance."""
        known = self._discoveries.get(server_url)
        if known is not None:
            return known
        await self._discovering.setdefault(server_url, _Once()).run(
            lambda: self._discover(server_url, found))
        return self._discoveries[server_url]

    async def _discover(self, server_url: str, found: challenge.Challenge | None) -> None:
        if server_url in self._discoveries:
            return
        discovery = await discover(self.fetcher, server_url, found)
        await self.database.run(store.save_discovery(discovery))
        self._discoveries[server_url] = discovery

    async def discovery_of(self, server: Server) -> Discovery:
        """The server's authorization, known or discovered by asking the server (``flow``)."""
        assert server.url is not None
        found = await flow.discovered(self.context, server, self._discoveries.get(server.url))
        self._discoveries[server.url] = found
        return found

    # --- refresh ----------------------------------------------------------------------------

    async def refreshed(self, credential: Credential) -> Credential | None:
        """The credential after a refresh of its current generation (shared by everyone who
        asks meanwhile, module docstring); None when it is gone or unusable."""
        try:
            with tracing.child("oauth refresh", attributes={
                    "director.oauth.generation": credential.generation}):
                await self._refreshing.setdefault(credential.id, _Once()).run(
                    lambda: self._refresh(credential.id, credential.generation))
        except (FetchError, UpstreamError) as failure:
            log.warn("upstream OAuth: refreshing the token failed: {error}", error=str(failure))
        except DatabaseUnavailable as failure:
            log.warn("upstream OAuth: refreshing the token failed: the database is "
                     "unavailable ({error})", error=str(failure))
        current = self._credentials.get(credential.id)
        return current if current is not None and current.usable else None

    async def _refresh(self, credential_id: UUID, generation: int) -> None:
        # The reactor's clock, as the lease (a database time) and the polls' timers are.
        deadline = self.reactor.seconds() + LEASE_SECONDS + 10 * POLL_SECONDS
        while True:
            current = self._credentials.get(credential_id)
            if current is None or current.generation != generation or \
                    current.refresh_token is None:
                return
            outcome = await self.database.run(
                store.take_refresh_lease(credential_id, generation, LEASE_SECONDS))
            if outcome == "taken":
                await self._refresh_now(current)
                return
            if outcome == "moved" or self.reactor.seconds() > deadline:
                await self._reload_credential(credential_id)
                return
            await self._changed(credential_id, POLL_SECONDS)
            current = self._credentials.get(credential_id)
            if current is not None and current.generation == generation:
                await self._reload_credential(credential_id)  # a lost NOTIFY, or still busy

    async def _changed(self, credential_id: UUID, seconds: float) -> None:
        """Until the credential changes in this cache, or ``seconds``."""
        waiter: defer.Deferred[None] = defer.Deferred()
        self._changes.setdefault(credential_id, []).append(waiter)
        timer = self.reactor.callLater(seconds, lambda: None if waiter.called
                                       else waiter.callback(None))
        await waiter
        if timer.active():
            timer.cancel()
        waiters = self._changes.get(credential_id)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)

    async def _refresh_now(self, credential: Credential) -> None:
        assert credential.refresh_token is not None
        try:
            issued = await tokens.refresh(self.fetcher, credential.token_endpoint,
                                          credential.client, credential.refresh_token,
                                          credential.resource)
        except tokens.TokenError as failure:
            if failure.code == "invalid_grant":
                log.info("upstream OAuth: {issuer} refused the refresh token (invalid_grant): "
                         "the user must authorize {resource} again", issuer=credential.issuer,
                         resource=credential.resource, user_id=str(credential.user_id))
                await self.database.run(store.delete_credential(credential.id))
                gone = self._forget(credential.id)
                if gone is not None:
                    self._tell(gone, "deleted")
                return
            log.warn("upstream OAuth: refreshing the token failed: {error}", error=str(failure))
            await self.database.run(store.release_refresh_lease(credential.id))
            return
        except FetchError as failure:
            log.warn("upstream OAuth: refreshing the token failed: {error}", error=str(failure))
            await self.database.run(store.release_refresh_lease(credential.id))
            return
        stored = await self.database.run(store.store_refreshed(self.box, credential, issued))
        if not stored:
            log.warn("upstream OAuth: the credential changed while it was refreshed; the new "
                     "tokens were not stored", resource=credential.resource)
        await self._reload_credential(credential.id)

    # --- an upstream's refusal ----------------------------------------------------------------

    async def refused(self, provider: OAuthProvider, url: str, status: int,
                      challenges: list[str], sent: dict[str, str], retried: bool) -> bool:
        """``UpstreamAuthorization.refused`` for ``provider`` (module docstring)."""
        found = challenge.bearer(challenges)
        credential = self.credential_for(provider.user_id, provider.server_url)
        if status == 403:
            if found is None or found.error != "insufficient_scope" or credential is None:
                return False
            wanted = flow.union_of_scopes(credential.scope, found.scope)
            await self._set_problem(credential, f"the server asks for more access (scope "
                                    f"{found.scope or 'unstated'})", wanted)
            raise provider.unauthorized(url, status, "the server needs more access than was "
                                        f"granted (scope {found.scope or 'unstated'}): "
                                        "authorize it again")
        if retried:
            if credential is not None and sent.get("Authorization") == \
                    credential.header.get("Authorization"):
                await self._moved(provider, url, status, found)
                await self._set_problem(credential, "the server refused a freshly refreshed "
                                        "token", None)
            raise provider.unauthorized(url, status, "the server refused the token even after "
                                        "a refresh: authorize it again")
        if credential is not None and credential.access_token is not None:
            if sent.get("Authorization") != credential.header.get("Authorization"):
                return True  # a newer token than the one sent
            if credential.refresh_token is not None:
                fresh = await self.refreshed(credential)
                if fresh is not None and fresh.generation != credential.generation:
                    return True
            if credential.id in self._credentials:  # not deleted by a refused refresh
                await self._moved(provider, url, status, found)
            raise provider.unauthorized(url, status, "the server refused the token and it "
                                        "could not be refreshed: authorize it again")
        try:
            await self.discovered(provider.server_url, found)
        except FetchError as failure:
            raise provider.unauthorized(url, status, f"the server requires authorization, "
                                        f"but {failure}") from None
        credential = self.credential_for(provider.user_id, provider.server_url)
        if credential is not None and credential.usable:
            return True
        raise provider.unauthorized(url, status, "authorization required")

    async def _moved(self, provider: OAuthProvider, url: str, status: int,
                     found: challenge.Challenge | None) -> None:
        """After the server refused the current token for good: its authorization discovered
        again (once for concurrent callers). If it now names another authorization server or
        resource (SEP-2352: a server that moved to a new authorization server), the new
        discovery replaces the old for every instance and ``unauthorized`` says so: the
        credential of the old one no longer applies, and the next authorization registers
        with the new server (a client of one authorization server is never shown to
        another: clients are kept per issuer)."""
        known = self._discoveries.get(provider.server_url)
        if known is None:
            return
        try:
            await self._discovering.setdefault(provider.server_url, _Once()).run(
                lambda: self._rediscover(provider.server_url, found))
        except FetchError as failure:
            log.warn("upstream OAuth: discovering {server}'s authorization again failed: "
                     "{error}", server=display_url(provider.server_url), error=str(failure))
            return
        current = self._discoveries.get(provider.server_url)
        if current is not None and (current.issuer, current.resource) != \
                (known.issuer, known.resource):
            raise provider.unauthorized(url, status, "the server now names another "
                                        f"authorization server ({current.issuer}) or resource: "
                                        "authorize it again")

    async def _rediscover(self, server_url: str, found: challenge.Challenge | None) -> None:
        discovery = await discover(self.fetcher, server_url, found)
        known = self._discoveries.get(server_url)
        if known is None or (discovery.issuer, discovery.resource) != \
                (known.issuer, known.resource):
            log.info("upstream OAuth: {server} now names authorization server {issuer} "
                     "(was {before})", server=display_url(server_url), issuer=discovery.issuer,
                     before=known.issuer if known is not None else None)
            await self.database.run(store.save_discovery(discovery))
            self._discoveries[server_url] = discovery

    async def _set_problem(self, credential: Credential, problem: str,
                           wanted_scope: str | None) -> None:
        await self.database.run(store.set_problem(credential.id, problem, wanted_scope))
        credential.problem = problem
        if wanted_scope is not None:
            credential.wanted_scope = wanted_scope

    # --- authorizing and disconnecting --------------------------------------------------------

    async def begin(self, user_id: UUID, playbook_pk: UUID, playbook_id: str, server: Server,
                    entered: dict[str, Any] | None = None) -> flow.Started:
        """A new flow for ``server`` of the user's playbook: its authorize URL."""
        from director.oauth.client.identity import manual_client

        found = await self.discovery_of(server)
        client = manual_client(entered.get("client_id"), entered.get("client_secret"), found) \
            if entered else None
        return await flow.begin(self.context, user_id=user_id, playbook_pk=playbook_pk,
                                playbook_id=playbook_id, server=server, found=found,
                                entered=client,
                                current=self._by_key.get(_key(user_id, found.issuer,
                                                              found.resource)))

    async def complete(self, user_id: UUID, playbook_pk: UUID, server_name: str,
                       arguments: dict[str, str]) -> store.Flow:
        completed, credential_id = await flow.complete(
            self.context, user_id=user_id, playbook_pk=playbook_pk, server_name=server_name,
            arguments=arguments)
        await self._reload_credential(credential_id, "authorized")
        log.info("upstream OAuth: {server} authorized ({issuer})", server=server_name,
                 issuer=completed.issuer, user_id=str(user_id))
        return completed

    async def disconnect(self, user_id: UUID, server: Server) -> bool:
        """Revoke the user's tokens for ``server`` where the authorization server offers it
        (RFC 7009) and delete them; False if there were none."""
        assert server.url is not None
        credential = self.credential_for(user_id, server.url)
        if credential is None:
            return False
        if credential.revocation_endpoint is not None:
            for token, hint in ((credential.refresh_token, "refresh_token"),
                                (credential.access_token, "access_token")):
                if token is None:
                    continue
                try:
                    await tokens.revoke(self.fetcher, credential.revocation_endpoint,
                                        credential.client, token, hint)
                except FetchError as failure:
                    log.warn("upstream OAuth: revoking a token failed ({error}); it is "
                             "deleted anyway", error=str(failure))
        await self.database.run(store.delete_credential(credential.id))
        gone = self._forget(credential.id)
        if gone is not None:
            self._tell(gone, "deleted")
        return True

    # --- status -----------------------------------------------------------------------------

    def status(self, user_id: UUID, server: Server, authorize_url: str) -> dict[str, Any] | None:
        """The ``authorization`` part of the server's status, for its owner: None while the
        server never asked for one."""
        if server.type not in ("http", "sse") or server.url is None:
            return None
        found = self._discoveries.get(server.url)
        if found is None:
            return None
        credential = self._by_key.get(_key(user_id, found.issuer, found.resource))
        if credential is not None and credential.usable:
            shown: dict[str, Any] = {"state": "authorized", "issuer": found.issuer}
            if credential.scope:
                shown["scope"] = credential.scope
            if credential.expires_at is not None:
                shown["expires_at"] = _iso(credential.expires_at)
            return shown
        reason = credential.problem if credential is not None and credential.problem else \
            "the server requires authorization, and none is stored for you"
        return {"state": "unauthorized", "issuer": found.issuer, "reason": reason,
                "authorize_url": authorize_url}


class OAuthProvider:
    """The ``UpstreamAuthorization`` of one user's upstream session with one server."""

    def __init__(self, service: UpstreamAuthorizations, user_id: UUID, server_name: str,
                 server_url: str) -> None:
        self.service = service
        self.user_id = user_id
        self.server_name = server_name
        self.server_url = server_url
        self._covered: dict[tuple[str, str], bool] = {}

    def _covers(self, resource: str, url: str) -> bool:
        """Whether the token for ``resource`` may go to ``url``: a URL under the resource, or
        (the HTTP+SSE transport's message endpoint, which ``legacy_sse.py`` keeps on the server's
        origin) any URL of the origin of this server, itself under the resource."""
        key = (resource, url)
        covered = self._covered.get(key)
        if covered is None:
            covered = self._covered[key] = resource_covers(resource, url) or (
                resource_covers(resource, self.server_url)
                and same_origin(self.server_url, url))
        return covered

    async def headers(self, url: str) -> dict[str, str]:
        credential = self.service.credential_for(self.user_id, self.server_url)
        if credential is None or credential.access_token is None or \
                not self._covers(credential.resource, url):
            return {}
        if credential.refresh_token is not None and credential.refresh_due(self.service.reactor.seconds()):
            refreshed = await self.service.refreshed(credential)
            if refreshed is None:
                return {}
            credential = refreshed
        return credential.header

    async def refused(self, url: str, status: int, challenges: list[str],
                      sent: dict[str, str], retried: bool) -> bool:
        return await self.service.refused(self, url, status, challenges, sent, retried)

    def unauthorized(self, url: str, status: int, reason: str) -> UpstreamError:
        return UpstreamUnauthorized(
            f"[{self.server_name}] {display_url(url)}: HTTP {status}: {reason} (the Studio's "
            "Connect button on the playbook page, POST /api/v1/playbooks/…/servers/"
            f"{self.server_name}/authorize, or director playbooks authorize)")


def _iso(epoch: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat()
