"""Finding servers in the registry and installing them: the search page, an entry's page, the
install form (one field per input the entry asks for), and a registry server's page
(provenance, "update available", update keeping the inputs). Plain forms: GET to search,
POST with the CSRF token to write; everything works without JavaScript."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

from klein import Klein
from twisted.web.server import Request
from twisted.web.template import Tag, tags

from director.accounts.validation import ValidationFailed
from director.playbooks.model import Server
from director.playbooks.store import Playbook
from director.registry import install
from director.registry.catalogue import Entry
from director.registry.install import Field
from director.studio.base import StudioBase, Viewer, studio
from director.studio.forms import Form, problems
from director.studio.pages.playbooks import _version
from director.studio.templates.components import (
    crumbs,
    definition_rows,
    error_box,
    field,
    field_id,
    notice,
    post_form,
)
from director.web.errors import ApiError
from director.web.registry_api import entry_details

app: Klein = studio
INPUT = "input."  # the form's prefix of an input field's id


def _arg(request: Request, name: str, default: str = "") -> str:
    return (request.args.get(name.encode()) or [default.encode()])[0].decode("utf-8", "replace")


def _entry_url(name: str, version: str | None = None, playbook: str = "") -> str:
    query = {"name": name} | ({"version": version} if version else {}) | \
        ({"playbook": playbook} if playbook else {})
    return "/studio/registry/entry?" + urllib.parse.urlencode(query)


def input_control(entry_field: Field, value: str, errors: dict[str, str]) -> Tag:
    """One input of an entry: a choice list, a password box for a secret, else text."""
    name = INPUT + entry_field.id
    hint = " · ".join(part for part in (
        entry_field.description,
        "stored encrypted, never shown again" if entry_field.secret else "",
        f"a {entry_field.format}" if entry_field.format != "string" else "") if part) or None
    error_key = f"inputs.{entry_field.id}"
    if entry_field.choices:
        identifier = field_id(name)
        select = tags.select(*[tags.option(choice, value=choice,
                                           **({"selected": "selected"} if choice == value
                                              else {}))
                               for choice in entry_field.choices], name=name, id=identifier)
        parts: list[Any] = [tags.label(entry_field.label, for_=identifier), select]
        if hint:
            parts.append(tags.p(hint, class_="hint"))
        if errors.get(error_key):
            parts.append(tags.p(errors[error_key], class_="field-error"))
        return tags.div(*parts, class_="field")
    return field(entry_field.label, name, "" if entry_field.secret else value,
                 kind="password" if entry_field.secret else "text", errors=errors,
                 error_key=error_key, hint=hint, required=entry_field.required,
                 placeholder=entry_field.placeholder or "", autocomplete="off")


def inputs_of(form: Form) -> dict[str, str]:
    """The form's inputs (``input.<id>``); an empty one is left out (its default, or kept)."""
    return {name[len(INPUT):]: values[0] for name, values in form.fields.items()
            if name.startswith(INPUT) and values and values[0] != ""}


class RegistryPages(StudioBase):
    def _registry_failure(self, request: Request, viewer: Viewer, title: str,
                          error: ApiError) -> bytes:
        return self.respond(request, title, tags.h1(title), error_box(error.message),
                            tags.p(tags.a("Back to the search", href="/studio/registry")),
                            viewer=viewer, status=error.status, section="registry")

    # --- search ---------------------------------------------------------------------------

    @app.route("/registry", methods=["GET"])
    async def registry_page(self, request: Request) -> bytes:
        viewer = await self.viewer(request)
        query, playbook = _arg(request, "q"), _arg(request, "playbook")
        try:
            found = await self.api.registry_search(request)
        except ApiError as error:
            return self._registry_failure(request, viewer, "Find a server", error)
        except ValidationFailed as error:
            return self.error_page(request, 400, "Cannot search", str(error), viewer)
        rows = [tags.li(tags.a(item["title"] or item["name"],
                               href=_entry_url(item["name"], None, playbook)),
                        " ", tags.span(item["version"], class_="badge"),
                        tags.div(item["name"], class_="small mono"),
                        tags.div(item["description"], class_="small muted"))
                for item in found["items"]]
        more: Any = ""
        if found["next_cursor"]:
            more = tags.a("More results", class_="button secondary", href="/studio/registry?"
                          + urllib.parse.urlencode({"q": query, "cursor": found["next_cursor"],
                                                    "playbook": playbook}))
        return self.respond(request, "Find a server",
            tags.h1("Find a server"),
            tags.p("Servers of the registry ", tags.code(found["registry"]), ".",
                   class_="lead"),
            tags.form(tags.input(type="hidden", name="playbook", value=playbook),
                      tags.div(field("Search", "q", query, kind="search",
                                     hint="A word of the server's name."),
                               tags.div(tags.button("Search", type="submit"),
                                        class_="actions"), class_="row"),
                      method="get", action="/studio/registry", role="search"),
            tags.section(tags.ul(*rows, class_="plain", id="results") if rows else
                         tags.p("No server matches.", class_="muted"), more,
                         **{"aria-label": "Results"}),
            viewer=viewer, section="registry")

    @app.route("/registry/entry", methods=["GET"])
    async def registry_entry_page(self, request: Request) -> bytes:
        viewer = await self.viewer(request)
        name, version = _arg(request, "name"), _arg(request, "version", "latest") or "latest"
        chosen = _arg(request, "playbook")
        try:
            entry, versions = await self.api.registry_entry(name, version)
        except ApiError as error:
            return self._registry_failure(request, viewer, "Registry entry", error)
        details = entry_details(entry, versions)
        mine = self.playbooks.of_user(viewer.user.id)
        sections = []
        for option in details["options"]:
            body: list[Any] = [tags.h3(option["label"])]
            if not option["installable"]:
                body.append(tags.p("Cannot be installed: ", option["problem"],
                                   class_="error-text"))
            elif not mine:
                body.append(tags.p(tags.a("Create a playbook", href="/studio/"),
                                   " to install it into."))
            else:
                picker = tags.select(*[tags.option(p.name, value=p.id, **(
                    {"selected": "selected"} if p.id == chosen else {})) for p in mine],
                    name="into", id=field_id(f"into-{option['choice']}"))
                body.append(tags.form(
                    tags.input(type="hidden", name="name", value=entry.name),
                    tags.input(type="hidden", name="version", value=entry.version),
                    tags.input(type="hidden", name="choice", value=option["choice"]),
                    tags.div(tags.div(tags.label("Into the playbook",
                                                 for_=field_id(f"into-{option['choice']}")),
                                      picker, class_="field"),
                             tags.div(tags.button("Install…", type="submit"),
                                      class_="actions"), class_="row"),
                    method="get", action="/studio/registry/install"))
            sections.append(tags.div(*body, class_="card"))
        facts = [("Name", tags.code(entry.name)), ("Version", entry.version),
                 ("Versions", ", ".join(details["versions"][:20]))]
        if entry.repository_url:
            facts.append(("Source", tags.a(entry.repository_url, href=entry.repository_url,
                                           rel="noopener noreferrer")))
        return self.respond(request, entry.title or entry.name,
            crumbs(("Find a server", "/studio/registry")),
            tags.h1(entry.title or entry.name),
            tags.p(entry.description, class_="lead") if entry.description else "",
            definition_rows(facts), tags.h2("Install"), *sections,
            viewer=viewer, section="registry")

    # --- install --------------------------------------------------------------------------

    @app.route("/registry/install", methods=["GET"])
    async def registry_install_redirect(self, request: Request) -> bytes:
        """The entry page's GET form: on to the playbook's install form."""
        viewer = await self.viewer(request)
        playbook = self.owned(viewer, _arg(request, "into"))
        query = {key: _arg(request, key) for key in ("name", "version", "choice")}
        return self.redirect(request, self.playbook_url(playbook, "servers", "from-registry")
                             + "?" + urllib.parse.urlencode(query))

    async def _install_form(self, request: Request, viewer: Viewer, playbook: Playbook,
                            name: str, version: str, choice: str, form: Form | None = None,
                            message: str | None = None, fields: dict[str, str] | None = None,
                            status: int = 200) -> bytes:
        try:
            entry, _ = await self.api.registry_entry(name, version or "latest")
            option = install.choose(entry, choice or None)
        except ApiError as error:
            return self._registry_failure(request, viewer, "Install a server", error)
        except install.InstallError as error:
            return self.error_page(request, 400, "Cannot install this entry", str(error),
                                   viewer)
        errors = fields or {}
        given = inputs_of(form) if form is not None else {}
        controls = [input_control(entry_field, given.get(entry_field.id,
                                                         entry_field.default or ""), errors)
                    for entry_field in option.fields]
        server_name = form.get("server_name") if form is not None else \
            install.suggested_name(entry.name)
        title = f"Install {entry.title or entry.name}"
        return self.respond(request, title,
            self.playbook_crumbs(playbook), tags.h1(title),
            tags.p(tags.code(entry.name), " ", entry.version, " · ", option.label,
                   class_="muted"),
            self._trust_note(option), error_box(message, errors),
            tags.div(post_form(
                self.playbook_url(playbook, "servers", "from-registry"), viewer.csrf,
                tags.input(type="hidden", name="version", value=str(playbook.version)),
                tags.input(type="hidden", name="name", value=entry.name),
                tags.input(type="hidden", name="entry_version", value=entry.version),
                tags.input(type="hidden", name="choice", value=option.choice),
                field("Server name", "server_name", server_name, errors=errors,
                      error_key="server_name", required=True, maxlength="64",
                      hint="Its name in the playbook."),
                *controls,
                tags.div(tags.button("Install", type="submit"),
                         tags.a("Cancel", href=self.playbook_url(playbook)), class_="actions")),
                class_="card"),
            viewer=viewer, status=status, section="registry")

    def _trust_note(self, option: install.Option) -> Any:
        if option.recipe is None or option.recipe["kind"] == "remote":
            return ""
        if self.settings.allow_arbitrary_stdio_servers or self.settings.registry_trust == "any":
            return tags.p("Runs ", tags.code(install.RUNTIMES[option.recipe["kind"]]),
                          " on the gateway host.", class_="hint")
        return tags.p("Packages run code on the gateway host: this daemon allows "
                      + ("those named in REGISTRY_ALLOW." if self.settings.registry_trust ==
                         "allowlist" else "none (REGISTRY_TRUST=none)."), class_="hint")

    @app.route("/playbooks/<playbook_id>/servers/from-registry", methods=["GET"])
    async def install_form(self, request: Request, playbook_id: str) -> bytes:
        viewer = await self.viewer(request)
        playbook = self.owned(viewer, playbook_id)
        return await self._install_form(request, viewer, playbook, _arg(request, "name"),
                                        _arg(request, "version"), _arg(request, "choice"))

    @app.route("/playbooks/<playbook_id>/servers/from-registry", methods=["POST"])
    async def install_submitted(self, request: Request, playbook_id: str) -> bytes:
        viewer, form = await self.form_of(request)
        playbook = self.owned(viewer, playbook_id)
        body = {"name": form.get("name"), "version": form.get("entry_version") or None,
                "choice": form.get("choice") or None,
                "server_name": form.get("server_name") or None, "inputs": inputs_of(form)}
        try:
            await self.api.install_from_registry(playbook, body, viewer.user.email,
                                                 _version(form))
        except (ApiError, ValidationFailed) as error:
            message, fields = problems(error)
            return await self._install_form(
                request, viewer, playbook, form.get("name"), form.get("entry_version"),
                form.get("choice"), form, message, fields, getattr(error, "status", 400))
        return self.redirect(request, self.playbook_url(playbook) + "?notice=server-added")

    # --- a registry server ------------------------------------------------------------------

    async def registry_server_page(self, request: Request, viewer: Viewer, playbook: Playbook,
                                   server: Server, form: Form | None = None,
                                   message: str | None = None,
                                   fields: dict[str, str] | None = None,
                                   status: int = 200) -> bytes:
        """The edit page of a server installed from the registry."""
        source = server.registry
        assert source is not None
        state = await self.api.registry_state(server)
        errors = fields or {}
        update: list[Any] = []
        if state["update_available"]:
            update.append(tags.p(tags.strong("Update available: "), state["latest_version"],
                                 id="update-available"))
        elif state["problem"]:
            update.append(tags.p("The registry cannot say whether an update exists: ",
                                 state["problem"], class_="error-text"))
        else:
            update.append(tags.p("Up to date.", class_="muted"))
        kept = dict(source.inputs)
        controls: list[Any] = []
        try:
            entry: Entry | None = await self.registry_latest(source.name)
        except ApiError:
            entry = None
        if entry is not None:
            choice = install.same_option(entry, json.loads(source.recipe))
            option = next((o for o in install.options(entry) if o.choice == choice), None)
            for entry_field in option.fields if option is not None else ():
                value = kept[entry_field.id].value if entry_field.id in kept else ""
                controls.append(input_control(entry_field, value, errors))
        facts = [("Registry", tags.code(source.registry)), ("Entry", tags.code(source.name)),
                 ("Version", source.version),
                 ("Runs", tags.code(" ".join([server.command or "", *server.args]))
                  if server.type == "stdio" else tags.code(server.url or ""))]
        return self.respond(request, server.name,
            self.playbook_crumbs(playbook), tags.h1(server.name),
            notice("Installed from the registry: its command and settings come from the "
                   "entry; change its inputs or version below."),
            error_box(message, errors), definition_rows(facts), *update,
            tags.div(post_form(
                self.playbook_url(playbook, "servers", server.name, "registry-update"),
                viewer.csrf, tags.input(type="hidden", name="version",
                                        value=str(playbook.version)),
                tags.h2("Update"),
                tags.p("Leave a secret empty to keep it.", class_="hint") if controls else "",
                *controls,
                tags.div(tags.button("Update to the latest version"
                                     if state["update_available"] else "Save inputs",
                                     type="submit"),
                         tags.a("Remove", href=self.playbook_url(playbook, "servers",
                                                                 server.name, "remove")),
                         class_="actions")), class_="card"),
            viewer=viewer, status=status, section="playbooks")

    async def registry_latest(self, name: str) -> Entry:
        entry, _ = await self.api.registry_entry(name, "latest")
        return entry

    @app.route("/playbooks/<playbook_id>/servers/<name>/registry-update", methods=["POST"])
    async def registry_update_submitted(self, request: Request, playbook_id: str,
                                        name: str) -> bytes:
        viewer, form = await self.form_of(request)
        playbook = self.owned(viewer, playbook_id)
        server = playbook.server(name)
        if server is None or server.registry is None:
            return self.error_page(request, 404, "Not found",
                                   f"no registry server {name!r} in this playbook", viewer)
        try:
            await self.api.update_from_registry(playbook, server, {"inputs": inputs_of(form)},
                                                viewer.user.email, _version(form))
        except (ApiError, ValidationFailed) as error:
            message, fields = problems(error)
            return await self.registry_server_page(request, viewer, playbook, server, form,
                                                   message, fields,
                                                   getattr(error, "status", 400))
        return self.redirect(request, self.playbook_url(playbook) + "?notice=server-updated")
