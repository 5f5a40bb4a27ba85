"""Open MCP sessions follow their user's authorizations, on every instance.

When a user's credential for (issuer, resource) is stored by an authorization (on any
instance: the NOTIFY reaches all of them), each of that user's sessions whose upstream for a
server of that identity failed (``unauthorized``) may start it again at once — the failure's
backoff is lifted — and is told ``notifications/{tools,prompts,resources}/list_changed``: the
client lists again and the server's tools appear. When the credential is deleted (disconnect,
or a refresh token refused), those upstream sessions are closed and the clients told the same:
the tools disappear, and the next use finds the server ``unauthorized``.

Both eras: a stateless context is one of the engine's sessions too, and passes the change to
its ``subscriptions/listen`` streams.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from uuid import UUID

from director.mcp.channels import LIST_CHANGED
from director.mcp.engine import McpEngine
from director.oauth.client.store import Credential

if TYPE_CHECKING:
    from director.oauth.client.service import UpstreamAuthorizations


def follow(engine: McpEngine, oauth: UpstreamAuthorizations) -> None:
    def changed(user_id: UUID, credential: Credential, why: str) -> None:
        # At the next turn: a deletion comes in the middle of a request whose refresh was
        # refused, which must fail with that reason, not with its session being closed.
        engine.reactor.callLater(0, sessions_follow, engine, oauth, user_id, credential, why)

    oauth.observers.append(changed)


def sessions_follow(engine: McpEngine, oauth: UpstreamAuthorizations, user_id: UUID,
                    credential: Credential, why: str) -> None:
    identity = (credential.issuer, credential.resource)
    for session in list(engine.sessions.values()):
        if session.user_id != user_id or session.closed:
            continue
        touched = False
        for name, upstream in list(session.upstreams.items()):
            found = oauth.discovery(upstream.server.url or "")
            if found is None or (found.issuer, found.resource) != identity:
                continue
            if why == "authorized" and upstream.session is None and upstream.error is not None:
                upstream.retry_at = 0.0
                touched = True
            elif why == "deleted":
                del session.upstreams[name]
                engine.upstreams.release(None, {name: upstream})
                touched = True
        if touched:
            session.notify_list_changed(LIST_CHANGED)
