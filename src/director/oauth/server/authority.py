"""``AuthorizationServer``: the authorization server's endpoints bound to what they need, the
token cache, and the hourly purge of what expired.

Built by the service tree next to the Studio, whose login and layout its pages use; mounted
by ``web/app.py`` at ``/.well-known/…``, ``/oauth/authorize|token|register|revoke`` and
``/connect``; ``web/auth.py`` resolves access tokens through ``tokens``.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, task
from twisted.logger import Logger

from director.config import Settings
from director.db.database import Database
from director.oauth.server import grants
from director.oauth.server.documents import DocumentFetcher
from director.oauth.server.grants import Lifetimes
from director.oauth.server.pages import ConsentPages
from director.oauth.server.routes import FromRoot, OAuthEndpoints, oauth
from director.oauth.server.tokens import TokenCache
from director.playbooks.cache import PlaybookCache
from director.web.auth import Authenticator

if TYPE_CHECKING:
    from director.studio.routes import Studio

log = Logger(namespace="oauth")

PURGE_SECONDS = 3600.0


class AuthorizationServer(ConsentPages, OAuthEndpoints):
    app = oauth

    def __init__(self, settings: Settings, database: Database, auth: Authenticator,
                 playbooks: PlaybookCache, studio: Studio, reactor: Any,
                 tokens: TokenCache) -> None:
        self.settings = settings
        self.database = database
        self.auth = auth
        self.playbooks = playbooks
        self.studio = studio
        self.reactor = reactor
        self.tokens = tokens
        self.documents = DocumentFetcher(reactor,
                                         allow_insecure=settings.allow_insecure_http_servers)
        self.lifetimes = Lifetimes(
            datetime.timedelta(seconds=settings.oauth_access_token_seconds),
            datetime.timedelta(days=settings.oauth_refresh_token_days))
        self._purge = task.LoopingCall(self.purge)
        self._purge.clock = reactor

    def resource(self) -> Any:
        return FromRoot(self.app.resource())

    async def start(self) -> None:
        await self.tokens.start()
        self._purge.start(PURGE_SECONDS, now=True)

    def stop(self) -> None:
        if self._purge.running:
            self._purge.stop()

    def purge(self) -> defer.Deferred[Any]:
        """Delete expired codes and tokens, dead grants, unused registrations (hourly)."""
        d = self.database.run(grants.purge_expired())
        d.addErrback(lambda failure: log.warn("purging expired OAuth codes and tokens failed: "
                                              "{reason}", reason=str(failure.value)))
        return d
