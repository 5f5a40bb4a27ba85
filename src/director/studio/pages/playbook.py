"""The playbook page: its servers with their live status (add, edit, remove, restart) and its
tools as a client sees them (include/exclude, prefix, shadowed names)."""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.web.server import Request
from twisted.web.template import Tag, tags

from director.accounts.validation import ValidationFailed
from director.oauth.client.studio import server_actions
from director.playbooks.model import SecretValue, Server
from director.playbooks.rails import INSECURE_FLAG, STDIO_FLAG
from director.playbooks.store import Playbook
from director.studio.base import StudioBase, Viewer, studio
from director.studio.forms import (
    Form,
    call_api,
    problems,
    schema_properties,
    server_body,
    tools_body,
)
from director.studio.pages import notice_for
from director.studio.pages.playbooks import _version, when
from director.studio.status import ServerStatus, server_status
from director.studio.templates.components import (
    button_form,
    checkbox,
    error_box,
    field,
    field_id,
    notice,
    post_form,
    pretty_json,
)
from director.studio.workbench import ToolEntry, ToolsView
from director.web.errors import ApiError, NotFound

app: Klein = studio
BLANK_ROWS = 2


def status_badge(status: ServerStatus, server_name: str) -> Tag:
    parts: list[Any] = [tags.span(status.label, class_=f"badge status-{status.state}")]
    if status.transport:
        details = [status.transport]
        if status.era:
            details.append(f"{status.era} era")
        if status.protocol:
            details.append(status.protocol)
        parts.append(tags.span(" ", " · ".join(details), class_="small muted"))
    if status.detail:
        css = "error-text small" if status.state in ("error", "unauthorized", "refused") \
            else "small muted"
        parts.append(tags.div(status.detail, class_=css))
    if status.since is not None:
        parts.append(tags.div("since ", when(status.since), class_="small muted"))
    if status.stderr:
        parts.append(tags.details(
            tags.summary(f"Its last {len(status.stderr)} lines on stderr", class_="small"),
            tags.pre("\n".join(status.stderr), class_="small")))
    return tags.div(*parts, id=f"status-{field_id(server_name)}",
                    **{"data-status": status.state})


def signature(schema: Any) -> str:
    """A tool's arguments on one line: ``text: string (required) · mode: fast | careful``.
    One text node per tool: the playbook page of 500 tools stays cheap to render (the try page
    shows each argument in full, with the JSON schema)."""
    properties, required = schema_properties(schema)
    if not properties:
        return "no arguments"
    parts = []
    for name, spec in properties.items():
        enum = spec.get("enum")
        kind = spec.get("type", "any")
        if isinstance(enum, list) and enum:
            shown = " | ".join(str(value) for value in enum[:8]) + (" | …" if len(enum) > 8
                                                                  else "")
        else:
            shown = "/".join(str(k) for k in kind) if isinstance(kind, list) else str(kind)
        parts.append(f"{name}: {shown}" + (" (required)" if name in required else ""))
    return " · ".join(parts)


def schema_summary(schema: Any) -> Tag | str:
    """An input schema as a readable list of arguments, the JSON itself one click away."""
    properties, required = schema_properties(schema)
    if not properties:
        return tags.p("No arguments.", class_="small muted")
    items = []
    for name, spec in properties.items():
        kind = spec.get("type", "any")
        kind_text = "/".join(kind) if isinstance(kind, list) else str(kind)
        item: list[Any] = [tags.code(name), f" ({kind_text})"]
        if name in required:
            item.append(tags.strong(" required"))
        if isinstance(spec.get("enum"), list):
            item.append(" one of " + ", ".join(str(v) for v in spec["enum"][:20]))
        description = spec.get("description")
        if isinstance(description, str) and description:
            item.append(" — " + description)
        items.append(tags.li(*item))
    return tags.div(tags.ul(*items, class_="schema"),
                    tags.details(tags.summary("JSON schema", class_="small"),
                                 tags.pre(tags.code(pretty_json(schema)))))


class PlaybookPages(StudioBase):
    #: (``pages.registry.RegistryPages``: a registry server's page)
    registry_server_page: Any

    # --- the page -------------------------------------------------------------------------

    @app.route("/playbooks/<playbook_id>", methods=["GET"])
    async def playbook_page(self, request: Request, playbook_id: str) -> bytes:
        viewer = await self.viewer(request)
        playbook = self.owned(viewer, playbook_id)
        view = await self.workbench.tools(viewer.user.id, playbook)
        return self.respond(request, playbook.name, *self.playbook_content(
            request, viewer, playbook, view), viewer=viewer, section="playbooks",
            playbook=playbook.id, live=True)

    def playbook_content(self, request: Request, viewer: Viewer, playbook: Playbook,
                         view: ToolsView) -> list[Any]:
        urls = self.api.urls(playbook.id)
        return [
            tags.nav(tags.a("Playbooks", href="/studio/"), class_="crumbs",
                     **{"aria-label": "Breadcrumb"}),
            tags.div(tags.h1(playbook.name),
                     tags.div(tags.a("Connect a client", href=self.playbook_url(playbook,
                                                                                "connect"),
                                     class_="button"),
                              tags.a("Settings", href=self.playbook_url(playbook, "settings"),
                                     class_="button secondary"), class_="row"),
                     class_="spread"),
            tags.p(playbook.description, class_="lead") if playbook.description else "",
            notice(notice_for(request)),
            tags.p(tags.span("Endpoint ", class_="muted"), tags.code(urls["streamable_http"]),
                   " · ", tags.a("Prompts", href=self.playbook_url(playbook, "prompts")),
                   " (", str(len(playbook.prompts)), ") · ",
                   tags.a("History", href=self.playbook_url(playbook, "history")), " · ",
                   tags.a("Export YAML", href=self.playbook_url(playbook, "export"),
                          download=f"{playbook.id}.yaml")),
            self.servers_section(viewer, playbook),
            self.tools_section(viewer, playbook, view),
        ]

    def servers_section(self, viewer: Viewer, playbook: Playbook) -> Tag:
        session = self.workbench.peek(viewer.user.id, playbook)
        rows = []
        for server in playbook.servers:
            upstream = session.seen.get(server.name) if session is not None else None
            status = server_status(self.settings, server, upstream)
            target = server.command if server.type == "stdio" else server.url
            rows.append(tags.tr(
                tags.td(tags.strong(server.name), tags.div(
                    tags.code(_short(target or "")), class_="small")),
                tags.td("stdio" if server.type == "stdio" else
                        "HTTP" if server.type == "http" else "HTTP+SSE", class_="optional"),
                tags.td(status_badge(status, server.name)),
                tags.td(tags.div(
                    tags.a("Edit", href=self.playbook_url(playbook, "servers", server.name),
                           **{"aria-label": f"Edit {server.name}"}),
                    button_form(self.playbook_url(playbook, "servers", server.name, "restart"),
                                viewer.csrf, "Restart", style="link",
                                confirm=f"Restart {server.name}?"),
                    *server_actions(self.oauth, viewer, playbook, server, status.state,
                                    self.playbook_url(playbook, "servers", server.name)),
                    tags.a("Remove", href=self.playbook_url(playbook, "servers", server.name,
                                                            "remove"),
                           **{"aria-label": f"Remove {server.name}"}),
                    class_="row"))))
        table: Any = tags.div(tags.table(
            tags.thead(tags.tr(tags.th("Server", scope="col"),
                               tags.th("Type", scope="col", class_="optional"),
                               tags.th("Status", scope="col"),
                               tags.th("Actions", scope="col"))),
            tags.tbody(*rows)), class_="table-wrap") if rows else tags.p(
            "No server yet. Add a local command (stdio) or a remote MCP server (HTTP).")
        return tags.section(
            tags.div(tags.h2("Servers", id="servers-title"),
                     tags.div(tags.a("Find a server", href="/studio/registry?playbook="
                                     + playbook.id, class_="button"),
                              tags.a("Add a stdio server", href=self.playbook_url(
                         playbook, "servers", "new") + "?type=stdio", class_="button secondary"),
                              tags.a("Add an HTTP server", href=self.playbook_url(
                                  playbook, "servers", "new") + "?type=http",
                                     class_="button secondary"), class_="row"),
                     class_="spread"),
            tags.div(table, class_="card"),
            id="servers", **{"data-live": "1", "aria-labelledby": "servers-title"})

    def tools_section(self, viewer: Viewer, playbook: Playbook, view: ToolsView) -> Tag:
        parts: list[Any] = [tags.h2("Tools", id="tools-title")]
        count = len(view.exposed)
        parts.append(tags.p(f"Clients see {count} tool{'s' if count != 1 else ''}."
                            + ("" if view.complete else " Some servers are still starting; "
                               "this list updates by itself (or reload the page)."),
                            class_="muted", id="tools-summary",
                            **{"data-complete": "true" if view.complete else "false"}))
        for server in playbook.servers:
            if server.disabled:
                continue
            entries = view.by_server.get(server.name)
            parts.append(self._server_tools(viewer, playbook, server, entries))
        return tags.section(*parts, id="tools",
                            **{"data-live": "1", "aria-labelledby": "tools-title"})

    def _server_tools(self, viewer: Viewer, playbook: Playbook, server: Server,
                      entries: list[ToolEntry] | None) -> Tag:
        heading = tags.h3(server.name)
        if entries is None:
            return tags.div(heading, tags.p("Not listed yet.", class_="muted"), class_="card")
        if not entries:
            return tags.div(heading, tags.p("No tools (the server is not connected, or offers "
                                            "none).", class_="muted"), class_="card")
        rows = []
        for entry in entries:
            box = tags.input(type="checkbox", name="expose", value=entry.original,
                             id=field_id(f"expose-{server.name}-{entry.original}"),
                             **{"aria-label": f"Expose {entry.original}"})
            if entry.visible:
                box(checked="checked")
            flags: Any = ""
            if entry.shadowed_by:
                flags = tags.span(f"shadowed by {entry.shadowed_by}",
                                  class_="badge tag-shadowed",
                                  title="Another server earlier in the playbook exposes the "
                                        "same name; clients get that one.")
            elif not entry.visible:
                flags = tags.span("hidden", class_="badge tag-hidden")
            try_link: Any = tags.a("Try", href=self.playbook_url(playbook, "tools",
                                                                  entry.exposed),
                                   **{"aria-label": f"Try {entry.exposed}"}) \
                if entry.visible and entry.shadowed_by is None else ""
            rows.append(tags.tr(
                tags.td(tags.input(type="hidden", name="listed", value=entry.original), box),
                tags.td(tags.span(entry.exposed, class_="tool-name"), " ", flags,
                        tags.div(entry.description, class_="small muted")
                        if entry.description else "",
                        tags.div(signature(entry.input_schema), class_="small mono")),
                tags.td(try_link)))
        return tags.div(heading, post_form(
            self.playbook_url(playbook, "servers", server.name, "tools"), viewer.csrf,
            tags.input(type="hidden", name="version", value=str(playbook.version)),
            tags.div(tags.table(
                tags.caption(f"Tools of {server.name}", class_="skip"),
                tags.thead(tags.tr(tags.th("Exposed", scope="col"),
                                   tags.th("Name as clients see it", scope="col"),
                                   tags.th("", scope="col"))),
                tags.tbody(*rows)), class_="table-wrap"),
            tags.div(field("Prefix", "prefix", server.prefix,
                           hint="Put before each tool name (no separator is added), "
                                "e.g. gh_.", maxlength="64",
                           identifier=field_id(f"prefix-{server.name}")),
                     class_="row"),
            tags.div(tags.button("Save tool settings", type="submit"), class_="actions")),
            class_="card")

    # --- servers --------------------------------------------------------------------------

    def _server(self, playbook: Playbook, name: str) -> Server:
        server = playbook.server(name)
        if server is None:
            raise NotFound(f"playbook {playbook.id!r} has no server {name!r}")
        return server

    def _server_form(self, request: Request, viewer: Viewer, playbook: Playbook,
                     server_type: str, current: Server | None = None, form: Form | None = None,
                     message: str | None = None, fields: dict[str, str] | None = None,
                     status: int = 200) -> bytes:
        values = _server_values(current, form)
        stdio = server_type == "stdio"
        refused = stdio and not self.settings.allow_arbitrary_stdio_servers
        title = (f"Edit {current.name}" if current is not None else
                 "Add a stdio server" if stdio else "Add an HTTP server")
        rail: Any = ""
        if refused:
            rail = tags.div(
                tags.strong("stdio servers are disabled on this daemon."),
                " They run commands on the gateway host; an operator can allow them with ",
                tags.code(f"{STDIO_FLAG}=true"), " (never in production).",
                class_="error-box", role="note", id="rail")
        elif not stdio and not self.settings.allow_insecure_http_servers:
            rail = tags.p("The URL must use https and name a public host; an operator can "
                          "allow plain http and private addresses with ",
                          tags.code(f"{INSECURE_FLAG}=true"), ".", class_="hint", id="rail")
        action = self.playbook_url(playbook, "servers", current.name) if current is not None \
            else self.playbook_url(playbook, "servers")
        specific: list[Any]
        if stdio:
            specific = [
                field("Command", "command", values["command"], errors=fields, required=True,
                      hint="The program to run, e.g. npx or /usr/bin/python3."),
                field("Arguments", "args", values["args"], kind="textarea", errors=fields,
                      hint="One per line.", rows="4"),
                _secret_rows("Environment", "env", values["env"], fields,
                             "Variables for the process; a secret one is stored encrypted "
                             "and never shown again."),
                field("Working directory", "cwd", values["cwd"], errors=fields,
                      hint="Optional, an absolute path."),
                checkbox("One process per client session", "isolate_sessions",
                         values["isolate_sessions"],
                         hint="Otherwise one process is shared by the playbook's clients."),
            ]
        else:
            transport = tags.select(
                tags.option("Streamable HTTP (falls back to HTTP+SSE)", value="http",
                            **({"selected": "selected"} if values["type"] != "sse" else {})),
                tags.option("HTTP+SSE only (the 2024-11-05 transport)", value="sse",
                            **({"selected": "selected"} if values["type"] == "sse" else {})),
                name="type", id="f-type")
            if current is not None:
                transport(disabled="disabled")
            specific = [
                field("URL", "url", values["url"], kind="url", errors=fields, required=True,
                      hint="The server's MCP endpoint, e.g. https://mcp.example.com/mcp."),
                tags.div(tags.label("Transport", for_="f-type"), transport, class_="field"),
                _secret_rows("Headers", "header", values["headers"], fields,
                             "Sent with every request, e.g. Authorization. A secret value is "
                             "stored encrypted and never shown again."),
            ]
        hidden: list[Any] = [tags.input(type="hidden", name="version",
                                        value=str(playbook.version))]
        if stdio:
            hidden.append(tags.input(type="hidden", name="type", value="stdio"))
        submit = tags.button("Save server" if current is not None else "Add server",
                             type="submit")
        if refused:
            submit(disabled="disabled", **{"aria-describedby": "rail"})
        return self.respond(request, title,
            self.playbook_crumbs(playbook), tags.h1(title), rail, error_box(message, fields),
            tags.div(post_form(action, viewer.csrf, *hidden,
                field("Name", "name", values["name"], errors=fields, required=True,
                      hint="Letters, digits, '.', '_' or '-'; unique in the playbook.",
                      maxlength="64"),
                *specific,
                tags.details(
                    tags.summary("More settings"),
                    field("Tool name prefix", "prefix", values["prefix"], errors=fields,
                          maxlength="64"),
                    field("Timeout (seconds)", "timeout_seconds", values["timeout_seconds"],
                          kind="number", errors=fields, min="1", max="3600", step="any"),
                    checkbox("Offer this server's prompts to clients", "expose_prompts",
                             values["expose_prompts"]),
                    checkbox("Disabled (clients do not see it)", "disabled",
                             values["disabled"])),
                tags.div(submit, tags.a("Cancel", href=self.playbook_url(playbook)),
                         class_="actions")), class_="card"),
            viewer=viewer, status=status, section="playbooks")

    @app.route("/playbooks/<playbook_id>/servers/new", methods=["GET"])
    async def new_server(self, request: Request, playbook_id: str) -> bytes:
        viewer = await self.viewer(request)
        playbook = self.owned(viewer, playbook_id)
        kinds = request.args.get(b"type")
        if kinds is None and playbook.server("new") is not None:
            # A server may be called "new": without ?type= this is its edit page.
            return self._server_form(request, viewer, playbook, self._server(playbook, "new").type,
                                     self._server(playbook, "new"))
        kind = (kinds or [b"stdio"])[0].decode("latin-1")
        return self._server_form(request, viewer, playbook, "stdio" if kind == "stdio"
                                 else "http")

    @app.route("/playbooks/<playbook_id>/servers", methods=["POST"])
    async def add_server(self, request: Request, playbook_id: str) -> bytes:
        viewer, form = await self.form_of(request)
        playbook = self.owned(viewer, playbook_id)
        body = server_body(form)
        try:
            await call_api(request, self.api.add_server, playbook_id, body=body,
                           if_match=_version(form))
        except (ApiError, ValidationFailed) as error:
            message, fields = problems(error)
            return self._server_form(request, viewer, playbook, "stdio" if body["type"] ==
                                     "stdio" else "http", form=form, message=message,
                                     fields=fields, status=getattr(error, "status", 400))
        self._list_in_background(viewer, playbook_id)
        return self.redirect(request, self.playbook_url(playbook) + "?notice=server-added")

    def _list_in_background(self, viewer: Viewer, playbook_id: str) -> None:
        fresh = self.playbooks.get(viewer.user.id, playbook_id)
        if fresh is not None:
            session = self.workbench.session(viewer.user.id, fresh)
            self.workbench.start_listing(session, fresh)

    @app.route("/playbooks/<playbook_id>/servers/<name>", methods=["GET"])
    async def edit_server(self, request: Request, playbook_id: str, name: str) -> bytes:
        viewer = await self.viewer(request)
        playbook = self.owned(viewer, playbook_id)
        server = self._server(playbook, name)
        if server.registry is not None:  # (pages/registry.py: its fields are the entry's)
            return await self.registry_server_page(request, viewer, playbook, server)
        return self._server_form(request, viewer, playbook, server.type, server)

    @app.route("/playbooks/<playbook_id>/servers/<name>", methods=["POST"])
    async def save_server(self, request: Request, playbook_id: str, name: str) -> bytes:
        viewer, form = await self.form_of(request)
        playbook = self.owned(viewer, playbook_id)
        server = self._server(playbook, name)
        try:
            await call_api(request, self.api.update_server, playbook_id, name,
                           body=server_body(form, server), if_match=_version(form))
        except (ApiError, ValidationFailed) as error:
            message, fields = problems(error)
            return self._server_form(request, viewer, playbook, server.type, server, form,
                                     message, fields, getattr(error, "status", 400))
        self._list_in_background(viewer, playbook_id)
        return self.redirect(request, self.playbook_url(playbook) + "?notice=server-saved")

    @app.route("/playbooks/<playbook_id>/servers/<name>/remove", methods=["GET"])
    async def remove_server_page(self, request: Request, playbook_id: str, name: str) -> bytes:
        viewer = await self.viewer(request)
        playbook = self.owned(viewer, playbook_id)
        server = self._server(playbook, name)
        return self.respond(request, f"Remove {server.name}",
            self.playbook_crumbs(playbook), tags.h1(f"Remove {server.name}?"),
            tags.div(tags.p("Its tools disappear from the playbook's clients at once."),
                     post_form(self.playbook_url(playbook, "servers", server.name, "remove"),
                               viewer.csrf,
                               tags.input(type="hidden", name="version",
                                          value=str(playbook.version)),
                               tags.div(tags.button("Remove the server", type="submit",
                                                    class_="danger"),
                                        tags.a("Cancel", href=self.playbook_url(playbook)),
                                        class_="actions")), class_="card"),
            viewer=viewer, section="playbooks")

    @app.route("/playbooks/<playbook_id>/servers/<name>/remove", methods=["POST"])
    async def remove_server(self, request: Request, playbook_id: str, name: str) -> bytes:
        viewer, form = await self.form_of(request)
        playbook = self.owned(viewer, playbook_id)
        self._server(playbook, name)
        await call_api(request, self.api.remove_server, playbook_id, name,
                       if_match=_version(form))
        return self.redirect(request, self.playbook_url(playbook) + "?notice=server-removed")

    @app.route("/playbooks/<playbook_id>/servers/<name>/restart", methods=["POST"])
    async def restart_server(self, request: Request, playbook_id: str, name: str) -> bytes:
        viewer, _ = await self.form_of(request)
        playbook = self.owned(viewer, playbook_id)
        self.workbench.restart(viewer.user.id, playbook, self._server(playbook, name))
        return self.redirect(request, self.playbook_url(playbook) + "?notice=restarted")

    @app.route("/playbooks/<playbook_id>/servers/<name>/tools", methods=["POST"])
    async def save_tools(self, request: Request, playbook_id: str, name: str) -> bytes:
        viewer, form = await self.form_of(request)
        playbook = self.owned(viewer, playbook_id)
        server = self._server(playbook, name)
        body = tools_body(form, server, form.all("listed"))
        try:
            await call_api(request, self.api.update_server, playbook_id, name, body=body,
                           if_match=_version(form))
        except (ApiError, ValidationFailed) as error:
            message, fields = problems(error)
            return self.error_page(request, getattr(error, "status", 400),
                                   "Cannot save the tool settings",
                                   message + "".join(f" {k}: {v}." for k, v in fields.items()),
                                   viewer)
        self._list_in_background(viewer, playbook_id)
        return self.redirect(request, self.playbook_url(playbook) + "?notice=tools-saved")


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _server_values(current: Server | None, form: Form | None) -> dict[str, Any]:
    """What the server form shows: the submitted values after a refusal, else the stored
    server's (secret values never: their inputs stay empty), else defaults."""
    if form is not None:
        return {
            "name": form.get("name"), "type": form.get("type", current.type if current
                                                       else "http"),
            "command": form.get("command"), "args": form.get("args"),
            "env": _rows_from_form(form, "env"), "cwd": form.get("cwd"),
            "isolate_sessions": form.flag("isolate_sessions"), "url": form.get("url"),
            "headers": _rows_from_form(form, "header"), "prefix": form.get("prefix"),
            "timeout_seconds": form.get("timeout_seconds"),
            "expose_prompts": form.flag("expose_prompts"), "disabled": form.flag("disabled")}
    if current is None:
        return {"name": "", "type": "http", "command": "", "args": "", "env": [], "cwd": "",
                "isolate_sessions": False, "url": "", "headers": [], "prefix": "",
                "timeout_seconds": "60", "expose_prompts": False, "disabled": False}
    return {
        "name": current.name, "type": current.type, "command": current.command or "",
        "args": "\n".join(current.args), "env": _rows_from_stored(current.env),
        "cwd": current.cwd or "", "isolate_sessions": current.isolate_sessions,
        "url": current.url or "", "headers": _rows_from_stored(current.headers),
        "prefix": current.prefix, "timeout_seconds": f"{current.timeout_seconds:g}",
        "expose_prompts": current.expose_prompts, "disabled": current.disabled}


def _rows_from_stored(items: tuple[tuple[str, SecretValue], ...]) -> list[tuple[str, str, bool]]:
    return [(name, "" if item.secret else item.value, item.secret) for name, item in items]


def _rows_from_form(form: Form, prefix: str) -> list[tuple[str, str, bool]]:
    names, values, kinds = (form.all(f"{prefix}_{part}") for part in ("name", "value", "kind"))
    rows = []
    for index, name in enumerate(names):
        secret = index < len(kinds) and kinds[index] == "secret"
        value = values[index] if index < len(values) and not secret else ""
        if name or value:
            rows.append((name, value, secret))
    return rows


def _secret_rows(legend: str, prefix: str, rows: list[tuple[str, str, bool]],
                 errors: dict[str, str] | None, hint: str) -> Tag:
    """Name / value / plain-or-secret rows, plus blank ones to add more without JavaScript.
    A stored secret's value input is empty: leaving it empty keeps the stored value."""
    lines: list[Any] = [tags.legend(legend), tags.p(hint, class_="hint")]
    all_rows = rows + [("", "", False)] * BLANK_ROWS
    for index, (name, value, secret) in enumerate(all_rows):
        base = f"{prefix}-{index}"
        kind = tags.select(tags.option("plain", value="plain"),
                           tags.option("secret", value="secret", **({"selected": "selected"}
                                                                     if secret else {})),
                           name=f"{prefix}_kind", id=f"f-{base}-kind")
        value_input = tags.input(type="password" if secret else "text", name=f"{prefix}_value",
                                 id=f"f-{base}-value", value=value, autocomplete="off")
        if secret and name:
            value_input(placeholder="stored secret (leave empty to keep)")
        problem = (errors or {}).get(f"{'headers' if prefix == 'header' else 'env'}.{name}") \
            if name else None
        lines.append(tags.div(
            tags.div(tags.label("Name", for_=f"f-{base}-name"),
                     tags.input(type="text", name=f"{prefix}_name", id=f"f-{base}-name",
                                value=name, autocomplete="off")),
            tags.div(tags.label("Value", for_=f"f-{base}-value"), value_input),
            tags.div(tags.label("Kind", for_=f"f-{base}-kind"), kind),
            tags.p(problem, class_="field-error") if problem else "",
            class_="row secret-row"))
    return tags.fieldset(*lines)
