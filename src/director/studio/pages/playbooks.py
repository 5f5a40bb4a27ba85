"""The playbook list (search, create), a playbook's settings and deletion, YAML export and
import, and the history (audit trail)."""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from twisted.web.server import Request
from twisted.web.template import Tag, tags

from director.accounts.validation import ValidationFailed
from director.playbooks.documents import DocumentInvalid
from director.playbooks.store import Playbook
from director.studio.base import StudioBase, Viewer, studio
from director.studio.forms import Form, call_api, problems
from director.studio.pages import notice_for
from director.studio.templates.components import (
    csrf_input,
    error_box,
    field,
    notice,
    post_form,
)
from director.web.errors import ApiError

app: Klein = studio


def when(value: Any) -> Tag:
    """A time as a ``<time>``: UTC, to the minute (the exact value in ``datetime``)."""
    text = value.isoformat() if hasattr(value, "isoformat") else str(value)
    shown = text[:16].replace("T", " ") + " UTC"
    return tags.time(shown, datetime=text)


class PlaybookListPages(StudioBase):
    # --- the list -------------------------------------------------------------------------

    def _first_run(self, request: Request) -> bytes:
        return self.respond(request, "Set up Director", tags.div(
            tags.h1("Welcome to Director"),
            tags.p("No account exists yet. Open the one-time setup link that the daemon wrote "
                   "in its log when it started, or print a fresh one on the server:"),
            tags.pre(tags.code("director setup-url")),
            tags.p("(as root)"),
            class_="card narrow"))

    @app.route("/", methods=["GET"])
    async def home(self, request: Request) -> bytes:
        if not self.auth.cache.users:
            return self._first_run(request)
        viewer = await self.viewer(request)
        return self._list_page(request, viewer)

    def _list_page(self, request: Request, viewer: Viewer, form: Form | None = None,
                   message: str | None = None, fields: dict[str, str] | None = None,
                   status: int = 200) -> bytes:
        query = (request.args.get(b"q") or [b""])[0].decode("utf-8", "replace").strip()
        mine = self.playbooks.of_user(viewer.user.id)
        shown = [p for p in mine if _matches(p, query)] if query else mine
        rows = [tags.tr(
            tags.td(tags.a(p.name, href=self.playbook_url(p))),
            tags.td(tags.code(p.id), class_="optional"),
            tags.td(str(len(p.servers))), tags.td(str(len(p.prompts)), class_="optional"),
            tags.td(when(p.updated_at), class_="optional")) for p in shown]
        table: Any = tags.div(tags.table(
            tags.caption("Your playbooks", class_="skip"),
            tags.thead(tags.tr(tags.th("Name", scope="col"),
                               tags.th("Id", scope="col", class_="optional"),
                               tags.th("Servers", scope="col"),
                               tags.th("Prompts", scope="col", class_="optional"),
                               tags.th("Updated", scope="col", class_="optional"))),
            tags.tbody(*rows)), class_="table-wrap", id="playbook-list",
            **{"data-live": "1"}) if shown else tags.p(
            f"No playbook matches {query!r}." if query else
            "No playbook yet: create the first one below, or import a YAML document.",
            id="playbook-list", **{"data-live": "1"})
        values = form or Form({})
        return self.respond(request, "Playbooks",
            tags.h1("Playbooks"), notice(notice_for(request)),
            tags.form(
                tags.label("Search playbooks", for_="q", class_="skip"),
                tags.div(tags.input(type="search", name="q", id="q", value=query,
                                    placeholder="Search by name, id or description"),
                         tags.button("Search", type="submit", class_="secondary"),
                         class_="row"),
                method="get", action="/studio/", role="search"),
            tags.div(table, class_="card"),
            tags.div(
                tags.h2("New playbook", id="new"),
                error_box(message, fields),
                post_form("/studio/playbooks", viewer.csrf,
                    field("Name", "name", values.get("name"), errors=fields, required=True,
                          hint="Its URL id is derived from the name (my-tools for My Tools).",
                          maxlength="200"),
                    field("Description", "description", values.get("description"),
                          errors=fields, kind="textarea",
                          hint="Optional. Clients receive it as the server's instructions."),
                    tags.div(tags.button("Create playbook", type="submit"),
                             tags.a("Import a YAML document", href="/studio/import"),
                             class_="actions")),
                class_="card"),
            viewer=viewer, status=status, section="playbooks", playbook="", live=True)

    @app.route("/playbooks", methods=["POST"])
    async def create(self, request: Request) -> bytes:
        viewer, form = await self.form_of(request)
        body = {"name": form.get("name"), "description": form.get("description")}
        try:
            _, created = await call_api(request, self.api.create_playbook, body=body)
        except (ApiError, ValidationFailed) as error:
            message, fields = problems(error)
            return self._list_page(request, viewer, form, message, fields,
                                   getattr(error, "status", 400))
        return self.redirect(request, f"/studio/playbooks/{created['id']}?notice=created")

    # --- settings and deletion ------------------------------------------------------------

    @app.route("/playbooks/<playbook_id>/settings", methods=["GET"])
    async def settings_page(self, request: Request, playbook_id: str) -> bytes:
        viewer = await self.viewer(request)
        return self._settings(request, viewer, self.owned(viewer, playbook_id))

    def _settings(self, request: Request, viewer: Viewer, playbook: Playbook,
                  form: Form | None = None, message: str | None = None,
                  fields: dict[str, str] | None = None, status: int = 200) -> bytes:
        name = form.get("name") if form else playbook.name
        description = form.get("description") if form else playbook.description
        return self.respond(request, f"Settings of {playbook.name}",
            self.playbook_crumbs(playbook), tags.h1("Playbook settings"),
            error_box(message, fields),
            tags.div(post_form(self.playbook_url(playbook, "settings"), viewer.csrf,
                tags.input(type="hidden", name="version", value=str(playbook.version)),
                field("Name", "name", name, errors=fields, required=True, maxlength="200"),
                tags.p("The id ", tags.code(playbook.id), " stays: it is part of every "
                       "client's URL.", class_="hint"),
                field("Description", "description", description, kind="textarea",
                      errors=fields),
                tags.div(tags.button("Save", type="submit"),
                         tags.a("Cancel", href=self.playbook_url(playbook)), class_="actions")),
                class_="card"),
            tags.div(tags.h2("Delete this playbook"),
                     tags.p("Clients using it stop working at once."),
                     tags.a("Delete…", href=self.playbook_url(playbook, "delete"),
                            class_="button secondary"), class_="card"),
            viewer=viewer, status=status, section="playbooks")

    @app.route("/playbooks/<playbook_id>/settings", methods=["POST"])
    async def save_settings(self, request: Request, playbook_id: str) -> bytes:
        viewer, form = await self.form_of(request)
        playbook = self.owned(viewer, playbook_id)
        try:
            await call_api(request, self.api.update_playbook, playbook_id,
                           body={"name": form.get("name"),
                                 "description": form.get("description")},
                           if_match=_version(form))
        except (ApiError, ValidationFailed) as error:
            message, fields = problems(error)
            return self._settings(request, viewer, playbook, form, message, fields,
                                  getattr(error, "status", 400))
        return self.redirect(request, self.playbook_url(playbook) + "?notice=renamed")

    @app.route("/playbooks/<playbook_id>/delete", methods=["GET"])
    async def delete_page(self, request: Request, playbook_id: str) -> bytes:
        viewer = await self.viewer(request)
        playbook = self.owned(viewer, playbook_id)
        return self.respond(request, f"Delete {playbook.name}",
            self.playbook_crumbs(playbook), tags.h1(f"Delete {playbook.name}?"),
            tags.div(
                tags.p("The playbook, its ", str(len(playbook.servers)), " server(s) and ",
                       str(len(playbook.prompts)), " prompt(s) are deleted. Clients using ",
                       tags.code(self.api.urls(playbook.id)["streamable_http"]),
                       " stop working at once. Its history is kept."),
                post_form(self.playbook_url(playbook, "delete"), viewer.csrf,
                          tags.input(type="hidden", name="version",
                                     value=str(playbook.version)),
                          tags.div(tags.button("Delete the playbook", type="submit",
                                               class_="danger"),
                                   tags.a("Cancel", href=self.playbook_url(playbook)),
                                   class_="actions")),
                class_="card"), viewer=viewer, section="playbooks")

    @app.route("/playbooks/<playbook_id>/delete", methods=["POST"])
    async def delete(self, request: Request, playbook_id: str) -> bytes:
        viewer, form = await self.form_of(request)
        self.owned(viewer, playbook_id)
        await call_api(request, self.api.delete_playbook, playbook_id, if_match=_version(form))
        return self.redirect(request, "/studio/?notice=deleted")

    # --- YAML -----------------------------------------------------------------------------

    @app.route("/playbooks/<playbook_id>/export", methods=["GET"])
    async def export(self, request: Request, playbook_id: str) -> bytes:
        viewer = await self.viewer(request)
        self.owned(viewer, playbook_id)
        _, document = await call_api(request, self.api.export_playbook, playbook_id)
        return bytes(document)

    def _import_page(self, request: Request, viewer: Viewer, text: str = "",
                     message: str | None = None, lines: list[str] | None = None,
                     fields: dict[str, str] | None = None, status: int = 200) -> bytes:
        report: Any = ""
        if lines:
            report = tags.div(tags.strong(message or "The document is invalid."),
                              tags.pre(tags.code("\n".join(lines))),
                              class_="error-box", role="alert", id="errors")
        elif message:
            report = error_box(message, fields)
        return self.respond(request, "Import a playbook",
            tags.h1("Import a playbook"),
            tags.p("A YAML document as ", tags.code("director playbooks export"), " or the "
                   "Export link writes it. Its id names the playbook: a new id creates one, an "
                   "existing id makes that playbook exactly the document. Secrets written as ",
                   tags.code("{secret: true}"), " keep their stored values.", class_="lead"),
            report,
            tags.div(tags.form(
                csrf_input(viewer.csrf),
                field("YAML file", "document", kind="file", accept=".yaml,.yml,text/yaml,"
                      "application/yaml"),
                field("…or paste the document", "text", text, kind="textarea", rows="12"),
                tags.div(tags.button("Import", type="submit"), class_="actions"),
                method="post", action="/studio/import", enctype="multipart/form-data"),
                class_="card"),
            viewer=viewer, status=status, section="import")

    @app.route("/import", methods=["GET"])
    async def import_page(self, request: Request) -> bytes:
        viewer = await self.viewer(request)
        return self._import_page(request, viewer)

    @app.route("/import", methods=["POST"])
    async def import_submit(self, request: Request) -> bytes:
        viewer, form = await self.form_of(request)
        filename, raw = form.files.get("document", ("", b""))
        text = form.get("text")
        if not raw and not text.strip():
            return self._import_page(request, viewer, message="Choose a file or paste a "
                                     "document.", status=400)
        document = raw or text.encode("utf-8")
        source = filename or "pasted document"
        try:
            _, answer = await call_api(request, self.api.import_playbook, body=document,
                                       content_type=b"application/yaml")
        except ApiError as error:
            details = error.details if isinstance(error.details, dict) else {}
            if isinstance(details.get("fields"), dict):
                invalid = DocumentInvalid(details["fields"], {
                    path: (where["line"], where["column"])
                    for path, where in (details.get("locations") or {}).items()})
                return self._import_page(request, viewer, text if not raw else "",
                                         "The document is invalid.", invalid.lines(source),
                                         status=error.status)
            return self._import_page(request, viewer, text if not raw else "", error.message,
                                     status=error.status)
        code = "unchanged" if answer["result"] == "unchanged" else "imported"
        return self.redirect(request, f"/studio/playbooks/{answer['id']}?notice={code}")

    # --- history --------------------------------------------------------------------------

    @app.route("/playbooks/<playbook_id>/history", methods=["GET"])
    async def history(self, request: Request, playbook_id: str) -> bytes:
        viewer = await self.viewer(request)
        playbook = self.owned(viewer, playbook_id)
        cursor = (request.args.get(b"cursor") or [b""])[0].decode("latin-1")
        query = {"limit": "50"} | ({"cursor": cursor} if cursor else {})
        _, page = await call_api(request, self.api.history, playbook_id, query=query)
        rows = [tags.tr(tags.td(when_text(entry["at"])), tags.td(entry["actor"] or "",
                                                                 class_="optional"),
                        tags.td(entry["action"]), tags.td(_detail(entry.get("detail"))),
                        tags.td(str(entry.get("version") or ""), class_="optional"))
                for entry in page["items"]]
        more: Any = tags.p(tags.a("Older changes", href=self.playbook_url(playbook, "history")
                                  + "?cursor=" + page["next_cursor"])) \
            if page.get("next_cursor") else ""
        return self.respond(request, f"History of {playbook.name}",
            self.playbook_crumbs(playbook), tags.h1("History"),
            tags.p("Every change to this playbook, newest first.", class_="lead"),
            tags.div(tags.div(tags.table(
                tags.thead(tags.tr(tags.th("When", scope="col"),
                                   tags.th("Who", scope="col", class_="optional"),
                                   tags.th("Change", scope="col"),
                                   tags.th("Details", scope="col"),
                                   tags.th("Version", scope="col", class_="optional"))),
                tags.tbody(*rows)), class_="table-wrap"), more, class_="card"),
            viewer=viewer, section="playbooks")


def when_text(iso: str) -> Tag:
    return tags.time(iso[:16].replace("T", " ") + " UTC", datetime=iso)


def _detail(detail: Any) -> Any:
    if not detail:
        return ""
    return tags.code(json.dumps(detail, ensure_ascii=False, sort_keys=True))


def _matches(playbook: Playbook, query: str) -> bool:
    needle = query.lower()
    return needle in playbook.name.lower() or needle in playbook.id or \
        needle in playbook.description.lower()


def _version(form: Form) -> int | None:
    raw = form.get("version")
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 18 else None

