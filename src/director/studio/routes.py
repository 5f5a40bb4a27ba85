"""``Studio``: the ``/studio`` Klein app bound to what its pages need, and its lifecycle.

Mounted by ``web/app.py`` under ``/studio/`` in the same daemon and port as the API and the
MCP endpoints (``GET /`` redirects here). At start, while no account exists, it issues a
setup token and logs the first-run link once (``setup.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from director.accounts.usage import KeyUsage
from director.config import Settings
from director.db.database import Database
from director.oauth.client.studio import ServerAuthorizationPages
from director.oauth.server.connected import ConnectedAppsPages
from director.oauth.server.organisation import OrganisationSignIn, ProviderClient, StateCookies
from director.playbooks.cache import PlaybookCache
from director.studio import setup
from director.studio.assets import StaticFiles
from director.studio.base import studio
from director.studio.csrf import CsrfTokens
from director.studio.live import LiveHub
from director.studio.pages.account import AccountPages
from director.studio.pages.auth import AuthPages
from director.studio.pages.connect import ConnectPages
from director.studio.pages.playbook import PlaybookPages
from director.studio.pages.playbooks import PlaybookListPages
from director.studio.pages.prompts import PromptPages
from director.studio.pages.registry import RegistryPages
from director.studio.pages.tools import ToolPages
from director.studio.workbench import Workbench
from director.web.auth import Authenticator

if TYPE_CHECKING:
    from director.mcp.engine import McpEngine
    from director.web.v1 import ApiV1

log = Logger(namespace="studio")


class Studio(OrganisationSignIn, AuthPages, PlaybookListPages, RegistryPages, PlaybookPages,
             ToolPages, PromptPages, ConnectPages, AccountPages, ConnectedAppsPages,
             ServerAuthorizationPages):
    app = studio

    def __init__(self, settings: Settings, database: Database, auth: Authenticator,
                 playbooks: PlaybookCache, engine: McpEngine, api: ApiV1, auth_secret: str,
                 reactor: Any, oauth: Any = None) -> None:
        self.settings = settings
        self.oauth = oauth
        self.database = database
        self.auth = auth
        self.playbooks = playbooks
        self.engine = engine
        self.api = api
        self.reactor = reactor
        self.tokens = CsrfTokens(auth_secret)
        self.oidc = ProviderClient(reactor, settings)  # signing in through an organisation's
        self.oidc_states = StateCookies(auth_secret, reactor)
        self.assets = StaticFiles()
        self.workbench = Workbench(engine, reactor)
        self.live = LiveHub(engine.streams, reactor, self._session_still_valid)
        self.workbench.listeners.append(self.live.publish)
        self.key_usage = KeyUsage(database, reactor)
        auth.key_observers.append(self.key_usage.used)
        playbooks.subscribe(self.live.playbook_changed)

    def resource(self) -> Any:
        return self.app.resource()

    async def _session_still_valid(self, token: str) -> bool:
        return await self.auth.cache.session(token) is not None

    async def start(self) -> None:
        """After the caches are loaded: live streams, and the first-run link if needed."""
        self.live.start()
        self.key_usage.start()
        if self.auth.cache.users:
            return
        token = await self.database.run(setup.issue_token(replace_older=False))
        if token is not None:
            log.info("no account exists yet: open {url} to create the first account "
                     "(or run `director setup-url` for a fresh link)",
                     url=setup.setup_url(self.settings.base_url, token))

    async def stop(self) -> None:
        self.live.stop()
        await self.key_usage.stop()
