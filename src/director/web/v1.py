"""``ApiV1``: the ``/api/v1`` Klein app bound to what its routes need.

Each capability's routes live in a mixin of their own (``accounts_api.AccountRoutes``, …);
importing them here registers them on the shared ``api`` app.
"""

from __future__ import annotations

from typing import Any

from director.accounts.throttle import LoginThrottle
from director.clock import Clock
from director.config import Settings
from director.crypto import SecretBox
from director.db.database import Database
from director.oauth.client.routes import UpstreamOAuthRoutes
from director.oauth.server.connected import ConnectedAppsApi
from director.playbooks.cache import PlaybookCache
from director.registry.client import RegistryClient
from director.web.accounts_api import AccountRoutes
from director.web.api import api
from director.web.auth import Authenticator
from director.web.openapi import OpenApiRoutes
from director.web.playbooks_api import PlaybookRoutes
from director.web.playbooks_yaml_api import PlaybookYamlRoutes
from director.web.registry_api import RegistryRoutes


class ApiV1(AccountRoutes, PlaybookYamlRoutes, RegistryRoutes, PlaybookRoutes, ConnectedAppsApi,
            UpstreamOAuthRoutes,
            OpenApiRoutes):
    app = api

    def __init__(self, settings: Settings, database: Database, auth: Authenticator,
                 playbooks: PlaybookCache, box: SecretBox,
                 registry: RegistryClient, clock: Clock, oauth: Any = None) -> None:
        self.settings = settings
        self.oauth = oauth
        self.database = database
        self.auth = auth
        self.playbooks = playbooks
        self.box = box
        self.throttle = LoginThrottle(clock)
        self.registry = registry  # REGISTRY_URL's client

    def resource(self) -> Any:
        return self.app.resource()
