"""Upstream OAuth in the Studio: Connect and Disconnect on the playbook page, and the
server's Connect page.

The playbook page's server row links to the Connect page when the server is unauthorized (its
upstream answered 401/403, or its authorization server is known and the user holds no usable
token) and offers Disconnect when the user holds one. The Connect page discovers the server's
authorization first, so that it can say where the browser is about to go, and so that its
Content-Security-Policy can allow the form to lead there (``form-action`` also governs the
redirect that answers a form; without the authorization server's origin in it a browser
would stop at the redirect). It takes an optional client id and secret for servers that
offer no other way to identify Director, and shows why the last attempt failed when the
callback sent the browser back (``?failed=`` names the flow, which must be the viewer's;
``?refused=`` one of ``store.FLOW_REFUSALS``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from klein import Klein
from twisted.web.server import Request
from twisted.web.template import Tag, tags

from director.accounts.validation import ValidationFailed
from director.oauth.client import flow, store
from director.oauth.client.fetch import FetchError
from director.oauth.client.routes import authorize_url, check_authorizable, connect_url
from director.playbooks.model import Server
from director.playbooks.store import Playbook
from director.studio.base import CONTENT_SECURITY_POLICY, StudioBase, Viewer, studio
from director.studio.templates.components import (
    button_form,
    definition_rows,
    error_box,
    field,
    post_form,
)
from director.web.errors import ApiError, NotFound

if TYPE_CHECKING:
    from director.oauth.client.discovery import Discovery
    from director.oauth.client.service import UpstreamAuthorizations

app: Klein = studio


def server_actions(oauth: UpstreamAuthorizations | None, viewer: Viewer, playbook: Playbook,
                   server: Server, state: str, base: str) -> list[Any]:
    """Connect / Disconnect for the server's row on the playbook page (may be empty)."""
    if oauth is None or server.type not in ("http", "sse") or server.disabled:
        return []
    status = oauth.status(viewer.user.id, server, connect_url("", playbook.id, server.name))
    if status is not None and status["state"] == "authorized":
        return [button_form(f"{base}/disconnect", viewer.csrf, "Disconnect", style="link",
                            confirm=f"Disconnect {server.name}? Its tokens are revoked and "
                                    "deleted, for every playbook of yours that uses it.")]
    if state == "unauthorized" or status is not None:
        return [tags.a("Connect", href=f"{base}/connect", class_="button",
                       **{"aria-label": f"Connect {server.name}"})]
    return []


class ServerAuthorizationPages(StudioBase):
    oauth: UpstreamAuthorizations

    def _authorizable(self, viewer: Viewer, playbook_id: str, name: str
                      ) -> tuple[Playbook, Server]:
        playbook = self.owned(viewer, playbook_id)
        server = playbook.server(name)
        if server is None:
            raise NotFound(f"playbook {playbook.id!r} has no server {name!r}")
        check_authorizable(server)
        return playbook, server

    @app.route("/playbooks/<playbook_id>/servers/<name>/connect", methods=["GET"])
    async def server_authorization_page(self, request: Request, playbook_id: str, name: str) -> bytes:
        viewer = await self.viewer(request)
        playbook, server = self._authorizable(viewer, playbook_id, name)
        return await self._authorization_page(request, viewer, playbook, server,
                                        await self._last_failure(request, viewer))

    @app.route("/playbooks/<playbook_id>/servers/<name>/connect", methods=["POST"])
    async def server_authorization_start(self, request: Request, playbook_id: str, name: str) -> bytes:
        viewer, form = await self.form_of(request)
        playbook, server = self._authorizable(viewer, playbook_id, name)
        client_id = (form.get("client_id") or "").strip()
        entered = {"client_id": client_id, "client_secret": form.get("client_secret") or None} \
            if client_id else None
        try:
            url = await authorize_url(self.oauth, viewer.user.id, playbook, server, entered)
        except ValidationFailed as invalid:
            return await self._authorization_page(request, viewer, playbook, server,
                                            str(invalid), status=400)
        except ApiError as refused:
            return await self._authorization_page(request, viewer, playbook, server,
                                            refused.message, status=refused.status)
        return self.redirect(request, url)

    @app.route("/playbooks/<playbook_id>/servers/<name>/disconnect", methods=["POST"])
    async def server_disconnect(self, request: Request, playbook_id: str, name: str) -> bytes:
        viewer, _ = await self.form_of(request)
        playbook, server = self._authorizable(viewer, playbook_id, name)
        await self.oauth.disconnect(viewer.user.id, server)
        return self.redirect(request, self.playbook_url(playbook) + "?notice=server-disconnected")

    async def _last_failure(self, request: Request, viewer: Viewer) -> str | None:
        arguments = request.args or {}
        refused = (arguments.get(b"refused") or [b""])[0].decode("latin-1")
        if refused in store.FLOW_REFUSALS:
            return "The authorization did not complete: " + store.FLOW_REFUSALS[refused] + "."
        failed = (arguments.get(b"failed") or [b""])[0].decode("latin-1")
        try:
            hashed = bytes.fromhex(failed)
        except ValueError:
            return None
        if len(hashed) != 32:
            return None
        found = await self.database.run(store.flow_outcome(hashed, viewer.user.id))
        if found is None or found[0] in (None, "authorized"):
            return None
        return f"The authorization did not complete: {found[0]}."

    async def _authorization_page(self, request: Request, viewer: Viewer, playbook: Playbook,
                            server: Server, message: str | None, status: int = 200) -> bytes:
        title = f"Connect {server.name}"
        discovery: Discovery | None = None
        problem: str | None = None
        try:
            discovery = await self.oauth.discovery_of(server)
        except flow.NotRequired as failure:
            problem = str(failure)
        except FetchError as failure:
            problem = f"Director cannot authorize this server: {failure}"
        content: list[Any] = [self.playbook_crumbs(playbook, (title, "")), tags.h1(title),
                              error_box(message or problem)]
        if discovery is not None:
            content.append(self._authorization_form(viewer, playbook, server, discovery))
        page = self.respond(request, title, *content, viewer=viewer, status=status,
                            section="playbooks", playbook=playbook.id)
        if discovery is not None:
            request.setHeader(b"content-security-policy", _allowing_form_to(
                discovery.authorization_endpoint))
        return page

    def _authorization_form(self, viewer: Viewer, playbook: Playbook, server: Server,
                      discovery: Discovery) -> Tag:
        where = urlsplit(discovery.authorization_endpoint)
        credential = self.oauth.credential_for(viewer.user.id, server.url or "")
        rows: list[tuple[str, Any]] = [
            ("Server", tags.code(server.url or "")),
            ("Authorization server", tags.code(discovery.issuer)),
            ("Access asked for", discovery.scope() or "what the server grants by default")]
        if credential is not None and credential.problem:
            rows.append(("Why again", credential.problem))
        base = self.playbook_url(playbook, "servers", server.name)
        return tags.div(
            definition_rows(rows),
            tags.p("Your browser goes to ", tags.strong(f"{where.scheme}://{where.netloc}"),
                   " to sign in and grant Director access, then comes back here. The tokens "
                   "are yours: every playbook of yours that uses this server shares them, "
                   "stored encrypted."),
            post_form(f"{base}/connect", viewer.csrf,
                      tags.details(
                          tags.summary("Use a client id you registered yourself"),
                          tags.p("Only for authorization servers that offer Director no other "
                                 "way to identify itself. Register the redirect URI ",
                                 tags.code(_redirect(self.settings.base_url, playbook, server)),
                                 ".", class_="hint"),
                          field("Client id", "client_id", maxlength="2048"),
                          field("Client secret", "client_secret", kind="password",
                                maxlength="2048", autocomplete="off")),
                      tags.div(tags.button(f"Connect {server.name}", type="submit"),
                               class_="actions")),
            class_="card")


def _redirect(base_url: str, playbook: Playbook, server: Server) -> str:
    from director.oauth.client.identity import redirect_uri

    return redirect_uri(base_url, playbook.id, server.name)


def _allowing_form_to(endpoint: str) -> bytes:
    """The Studio's policy, its ``form-action`` also allowing the authorization endpoint's
    origin (module docstring)."""
    parts = urlsplit(endpoint)
    origin = f"{parts.scheme}://{parts.netloc}".encode()
    return CONTENT_SECURITY_POLICY.replace(b"form-action 'self'",
                                           b"form-action 'self' " + origin)
