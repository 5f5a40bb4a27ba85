"""Connect a client: the endpoint URLs, an API-key picker, copyable configuration for Claude
Desktop, Claude Code, Cursor and VS Code, and one-click install links.

The snippets come from the API's own builder (``GET /api/v1/playbooks/{id}/connection``:
``connection_snippets``), so the page and the API always agree. Keys are stored hashed: a
key's value exists only in the answer that created it. So the picker chooses which key's
*name* the snippets refer to (with a placeholder where its value goes), and "create a key for
this connection" makes a new one and shows the snippets with its value filled in, once. The
install links carry the key, so they are offered only then: a link with a placeholder would
install a server that cannot authenticate.
"""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import quote, urlencode

from klein import Klein
from twisted.web.server import Request
from twisted.web.template import tags

from director.accounts.store import ApiKey
from director.accounts.validation import ValidationFailed
from director.playbooks.store import Playbook
from director.studio.base import StudioBase, Viewer, studio
from director.studio.forms import call_api, problems
from director.studio.templates.components import (
    error_box,
    field,
    post_form,
    pretty_json,
    snippet,
)
from director.web.errors import ApiError
from director.web.playbooks_api import connection_snippets

app: Klein = studio


def vscode_link(name: str, url: str, key: str) -> str:
    """``vscode:mcp/install?<URL-encoded JSON of the server>`` (VS Code's documented form)."""
    server = {"name": name, "type": "http", "url": url, "headers": {"x-api-key": key}}
    return "vscode:mcp/install?" + quote(json.dumps(server, separators=(",", ":")), safe="")


def cursor_link(name: str, url: str, key: str) -> str:
    """``cursor://anysphere.cursor-deeplink/mcp/install?name=…&config=<base64 JSON>``."""
    config = {"url": url, "headers": {"x-api-key": key}}
    encoded = base64.b64encode(json.dumps(config, separators=(",", ":")).encode()).decode()
    return "cursor://anysphere.cursor-deeplink/mcp/install?" + urlencode(
        {"name": name, "config": encoded})


def keys_of(cache_keys: Any, user_id: Any) -> list[ApiKey]:
    return sorted((key for key in cache_keys.values() if key.user_id == user_id),
                  key=lambda key: (key.created_at, str(key.id)))


class ConnectPages(StudioBase):
    def _connect_page(self, request: Request, viewer: Viewer, playbook: Playbook,
                      new_key: dict[str, Any] | None = None, message: str | None = None,
                      fields: dict[str, str] | None = None, status: int = 200) -> bytes:
        urls = self.api.urls(playbook.id)
        keys = keys_of(self.auth.cache.keys_by_id, viewer.user.id)
        chosen_id = (request.args.get(b"key") or [b""])[0].decode("latin-1")
        chosen = next((k for k in keys if str(k.id) == chosen_id), keys[0] if keys else None)
        if new_key is not None:
            key_text = new_key["key"]
        elif chosen is not None:
            key_text = f"<value of your key {chosen.name!r} ({chosen.prefix}...)>"
        else:
            key_text = "<YOUR_DIRECTOR_API_KEY>"
        snippets = connection_snippets(playbook.id, urls, key_text)
        clients = snippets["clients"]
        options = []
        for key in keys:
            option = tags.option(f"{key.name} ({key.prefix}…)", value=str(key.id))
            if chosen is not None and key.id == chosen.id and new_key is None:
                option(selected="selected")
            options.append(option)
        picker: Any = tags.form(
            tags.label("API key used in the configuration below", for_="key-picker"),
            tags.div(tags.select(*options, name="key", id="key-picker"),
                     tags.button("Use this key", type="submit", class_="secondary"),
                     class_="row"),
            tags.p("Its value is not shown (keys are stored hashed): paste it where the "
                   "placeholder is, or create a key for this connection.", class_="hint"),
            method="get", action=self.playbook_url(playbook, "connect")) if keys else tags.p(
            "You have no API key yet: create one for this connection.")
        once: Any = ""
        if new_key is not None:
            once = tags.div(
                tags.h2("Your new key", id="new-key-title"),
                tags.p("Key ", tags.code(new_key["name"]), " was created. Copy it now: it is "
                       "shown only this once. The configuration below already contains it."),
                snippet("new-key", new_key["key"], "the API key"),
                tags.h3("One-click install"),
                tags.p(tags.a("Install in VS Code", href=vscode_link(playbook.id,
                                                                     urls["streamable_http"],
                                                                     new_key["key"]),
                              class_="button secondary", id="install-vscode"), " ",
                       tags.a("Install in Cursor", href=cursor_link(playbook.id,
                                                                    urls["streamable_http"],
                                                                    new_key["key"]),
                              class_="button secondary", id="install-cursor")),
                tags.p("Claude Code and Claude Desktop have no install links: use the command "
                       "or the configuration below.", class_="hint"),
                class_="secret-once", id="new-key-box")
        return self.respond(request, f"Connect {playbook.name}",
            self.playbook_crumbs(playbook), tags.h1("Connect a client"),
            tags.p("Any MCP client can use this playbook as one server.", class_="lead"),
            once, error_box(message, fields),
            tags.div(
                tags.h2("Endpoints"),
                tags.p(tags.strong("Streamable HTTP"), " (current clients)"),
                snippet("url-streamable", urls["streamable_http"], "the Streamable HTTP URL"),
                tags.p(tags.strong("HTTP+SSE"), " (older clients)"),
                snippet("url-sse", urls["sse"], "the SSE URL"),
                tags.p("Authenticate with the header ", tags.code("x-api-key: <key>"),
                       " (or ", tags.code("Authorization: Bearer <key>"), ").", class_="hint"),
                class_="card"),
            tags.div(tags.h2("API key"), picker,
                     post_form(self.playbook_url(playbook, "connect", "key"), viewer.csrf,
                               field("Name of the new key", "name",
                                     f"{playbook.id} client", errors=fields, maxlength="100"),
                               tags.div(tags.button("Create a key for this connection",
                                                    type="submit"), class_="actions")),
                     class_="card"),
            tags.div(
                tags.h2("Claude Code"),
                snippet("claude-code", clients["claude_code"]["command"],
                        "the Claude Code command"),
                tags.h2("Claude Desktop"),
                tags.p("In claude_desktop_config.json (it starts local commands only, so "
                       "mcp-remote bridges to the URL):", class_="hint"),
                snippet("claude-desktop", pretty_json(clients["claude_desktop"]),
                        "the Claude Desktop configuration"),
                tags.h2("Cursor"),
                tags.p("In ~/.cursor/mcp.json or the project's .cursor/mcp.json:", class_="hint"),
                snippet("cursor", pretty_json(clients["cursor"]), "the Cursor configuration"),
                tags.h2("VS Code"),
                tags.p("In .vscode/mcp.json:", class_="hint"),
                snippet("vscode", pretty_json(clients["vscode"]), "the VS Code configuration"),
                class_="card"),
            viewer=viewer, status=status, section="playbooks")

    @app.route("/playbooks/<playbook_id>/connect", methods=["GET"])
    async def connect(self, request: Request, playbook_id: str) -> bytes:
        viewer = await self.viewer(request)
        return self._connect_page(request, viewer, self.owned(viewer, playbook_id))

    @app.route("/playbooks/<playbook_id>/connect/key", methods=["POST"])
    async def connect_key(self, request: Request, playbook_id: str) -> bytes:
        viewer, form = await self.form_of(request)
        playbook = self.owned(viewer, playbook_id)
        try:
            _, created = await call_api(request, self.api.create_key,
                                        body={"name": form.get("name")})
        except (ApiError, ValidationFailed) as error:
            message, fields = problems(error)
            return self._connect_page(request, viewer, playbook, message=message,
                                      fields=fields, status=getattr(error, "status", 400))
        return self._connect_page(request, viewer, playbook, new_key=created)
