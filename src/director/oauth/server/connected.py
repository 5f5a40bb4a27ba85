"""Connected apps: the grants a user gave MCP clients, listed and revoked, in the API
(``/api/v1/oauth/grants``) and the Studio (Account → Connected apps, ``/studio/account/apps``).

Revoking a grant ends it everywhere within a second: its tokens stop working on every
instance and the MCP sessions and streams it opened end (``tokens.TokenCache``); this instance
acts at once, the others on the notification. The Studio page calls the API's own route
functions, so both answer the same.
"""

from __future__ import annotations

import datetime
import urllib.parse
from itertools import groupby
from typing import Any

from twisted.web.server import Request
from twisted.web.template import Tag, tags

from director.config import Settings
from director.db.database import Database
from director.oauth.server import grants
from director.oauth.server.clients import REGISTERED
from director.oauth.server.metadata import SCOPE_DESCRIPTIONS
from director.studio.base import StudioBase, studio
from director.studio.forms import call_api
from director.studio.pages.playbooks import when
from director.studio.templates.components import button_form, crumbs, notice
from director.web.api import api, decode_cursor, encode_cursor, page_size
from director.web.auth import Authenticator, parse_uuid
from director.web.errors import NotFound, write_json
from director.web.openapi_parts import COMMON_ERRORS, SECURITY, error_answer


class ConnectedAppsApi:
    settings: Settings
    database: Database
    auth: Authenticator

    @api.route("/oauth/grants", methods=["GET"])
    async def list_oauth_grants(self, request: Request) -> bytes:
        principal = await self.auth.authenticate(request)
        limit = page_size(request)
        after = decode_cursor(request, 2)
        found = await self.database.run(grants.grants_of(
            principal.user.id, limit + 1, (after[0], after[1]) if after else None))
        body: dict[str, Any] = {"items": [grant.public() for grant in found[:limit]],
                                "next_cursor": None}
        if len(found) > limit:
            last = found[limit - 1]
            body["next_cursor"] = encode_cursor(last.created_at.isoformat(), str(last.id))
        return write_json(request, 200, body)

    @api.route("/oauth/grants/<grant_id>", methods=["DELETE"])
    async def revoke_oauth_grant(self, request: Request, grant_id: str) -> bytes:
        principal = await self.auth.authenticate(request)
        identifier = parse_uuid(grant_id)
        try:
            await self.database.run(grants.revoke_grant(principal.user.id, identifier))
        except grants.NoSuchGrant:
            raise NotFound(f"no connected app grant {grant_id!r}") from None
        if self.auth.oauth_tokens is not None:
            self.auth.oauth_tokens.grant_revoked(identifier)
        request.setResponseCode(204)
        return b""


APPS_PATH = "/studio/account/apps"


class ConnectedAppsPages(StudioBase):
    @studio.route("/account/apps", methods=["GET"])
    async def connected_apps(self, request: Request) -> bytes:
        viewer = await self.viewer(request)
        _, answer = await call_api(request, self.api.list_oauth_grants,
                                   query={"limit": "200"})
        items = answer["items"]
        sections: list[Any] = []
        for client_id, found in groupby(sorted(items, key=_by_client), key=_client_id):
            mine = list(found)
            sections.append(_client_card(client_id, mine, viewer.csrf))
        revoked = (request.args.get(b"notice") or [b""])[0] == b"revoked"
        message = "Access revoked: the application is signed out everywhere." if revoked else None
        return self.respond(
            request, "Connected apps",
            crumbs(("Account", "/studio/account"), ("Connected apps", APPS_PATH)),
            tags.h1("Connected apps"),
            tags.p("Applications you allowed to use your playbooks by signing in with OAuth. "
                   "Revoking one signs it out at once, everywhere.", class_="lead"),
            notice(message),
            *(sections or [tags.div(tags.p("No application is connected."), class_="card")]),
            viewer=viewer, section="account")

    @studio.route("/account/apps/grants/<grant_id>/revoke", methods=["POST"])
    async def revoke_app_grant(self, request: Request, grant_id: str) -> bytes:
        await self.form_of(request)
        await call_api(request, self.api.revoke_oauth_grant, grant_id)
        return self.redirect(request, APPS_PATH + "?notice=revoked")

    @studio.route("/account/apps/disconnect", methods=["POST"])
    async def disconnect_app(self, request: Request) -> bytes:
        viewer, form = await self.form_of(request)
        revoked = await self.database.run(grants.revoke_client(viewer.user.id,
                                                               form.get("client_id")))
        if not revoked:
            raise NotFound("this application has no access to revoke")
        for grant_id in revoked:
            if self.auth.oauth_tokens is not None:
                self.auth.oauth_tokens.grant_revoked(grant_id)
        return self.redirect(request, APPS_PATH + "?notice=revoked")


def _client_id(item: dict[str, Any]) -> str:
    return str(item["client"]["client_id"])


def _by_client(item: dict[str, Any]) -> tuple[str, str]:
    return (str(item["client"]["name"]).lower(), _client_id(item))


def _client_card(client_id: str, items: list[dict[str, Any]], csrf: str) -> Tag:
    client = items[0]["client"]
    host = urllib.parse.urlsplit(client_id).hostname if client_id.startswith("https://") else None
    name = str(client["name"] or host or "An unnamed application")
    badge = (tags.span("unverified", class_="badge tag-shadowed")
             if client["kind"] == REGISTERED else
             tags.span(f"published by {urllib.parse.urlsplit(client_id).hostname}",
                       class_="badge status-connected"))
    redirects = ", ".join(urllib.parse.urlsplit(uri).hostname or uri
                          for uri in client["redirect_uris"])
    rows = [tags.tr(
        tags.td(tags.strong(item["playbook"]["name"]), " ", tags.code(item["playbook"]["id"])),
        tags.td(tags.ul(*[tags.li(SCOPE_DESCRIPTIONS.get(scope, scope))
                          for scope in item["scope"].split()], class_="plain")),
        tags.td(when(_date(item["created_at"])), class_="optional"),
        tags.td(when(_date(item["last_refreshed_at"]))),
        tags.td(button_form(f"{APPS_PATH}/grants/{item['id']}/revoke", csrf, "Revoke",
                            style="link",
                            confirm=f"Revoke {name}'s access to {item['playbook']['name']}?")))
        for item in items]
    return tags.section(
        tags.h2(name, " ", badge),
        tags.p("Identified as ", tags.code(client_id), "; returns to ", redirects or "—", ".",
               class_="hint"),
        tags.div(tags.table(
            tags.thead(tags.tr(tags.th("Playbook", scope="col"), tags.th("May", scope="col"),
                               tags.th("Connected", scope="col", class_="optional"),
                               tags.th("Last refreshed", scope="col"),
                               tags.th("", scope="col"))),
            tags.tbody(*rows)), class_="table-wrap"),
        tags.div(button_form(f"{APPS_PATH}/disconnect", csrf, f"Disconnect {name}",
                             hidden={"client_id": client_id},
                             confirm=f"Revoke every access of {name}?"),
                 class_="actions"),
        class_="card")


def _date(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


# --- the OpenAPI description of the two operations (paths relative to /api/v1) ----------------

_TIME = {"type": "string", "format": "date-time"}
GRANT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "client", "playbook", "resource", "scope", "created_at",
                 "last_refreshed_at"],
    "properties": {
        "id": {"type": "string", "format": "uuid"},
        "client": {"type": "object", "required": ["client_id", "name", "kind", "redirect_uris"],
                   "properties": {
                       "client_id": {"type": "string",
                                     "description": "A registered id, or the URL of the "
                                                    "client's metadata document"},
                       "name": {"type": "string", "description": "What the client calls itself "
                                                                 "(\"\" when it gave none)"},
                       "kind": {"enum": ["registered", "metadata_document"],
                                "description": "registered: unverified (RFC 7591); "
                                               "metadata_document: published at its URL"},
                       "redirect_uris": {"type": "array", "items": {"type": "string"}}}},
        "playbook": {"type": "object", "required": ["id", "name"],
                     "properties": {"id": {"type": "string"}, "name": {"type": "string"}}},
        "resource": {"type": "string", "description": "The endpoint the token was asked for"},
        "scope": {"type": "string", "description": "Space-separated: mcp:read, mcp:tools, "
                                                   "offline_access"},
        "created_at": _TIME,
        "last_refreshed_at": _TIME,
    },
}
OPENAPI_PATHS: dict[str, Any] = {
    "/oauth/grants": {"get": {
        "operationId": "listOAuthGrants",
        "summary": "Connected apps: the caller's OAuth grants, oldest first",
        "security": SECURITY,
        "parameters": [
            {"name": "limit", "in": "query",
             "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
            {"name": "cursor", "in": "query", "description": "next_cursor of the previous page",
             "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]+$"}},
        ],
        "responses": {
            "200": {"description": "A page of grants", "content": {"application/json": {
                "schema": {"type": "object", "required": ["items", "next_cursor"],
                           "properties": {"items": {"type": "array", "items": GRANT_SCHEMA},
                                          "next_cursor": {"type": ["string", "null"]}}}}}},
            "400": error_answer("Invalid limit or cursor"), **COMMON_ERRORS},
    }},
    "/oauth/grants/{grant_id}": {"delete": {
        "operationId": "revokeOAuthGrant",
        "summary": "Revoke a grant: its tokens stop working and the MCP sessions it opened "
                   "end, on every instance within a second",
        "security": SECURITY,
        "parameters": [{"name": "grant_id", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "responses": {"204": {"description": "Revoked"},
                      "404": error_answer("No such grant of yours"), **COMMON_ERRORS},
    }},
}
