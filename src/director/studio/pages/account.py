"""The account page: API keys (create — shown once —, revoke, regenerate), the cookie
sessions (end one, end every other), and the password."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from klein import Klein
from twisted.web.server import Request
from twisted.web.template import tags

from director.accounts.validation import ValidationFailed
from director.studio import sessions
from director.studio.base import StudioBase, Viewer, studio
from director.studio.forms import call_api, problems
from director.studio.pages import notice_for
from director.studio.pages.connect import keys_of
from director.studio.pages.playbooks import when
from director.studio.templates.components import (
    button_form,
    error_box,
    field,
    notice,
    post_form,
    snippet,
)
from director.web.auth import parse_uuid
from director.web.errors import ApiError

app: Klein = studio


def _browser(user_agent: str) -> str:
    """A short, readable name for a session's user agent."""
    for needle, name in (("Edg/", "Edge"), ("Firefox/", "Firefox"), ("Chrome/", "Chrome"),
                         ("Safari/", "Safari"), ("curl/", "curl"), ("python", "Python")):
        if needle in user_agent:
            return name
    return user_agent[:40] or "unknown"


class AccountPages(StudioBase):
    async def _account(self, request: Request, viewer: Viewer,
                       new_key: dict[str, Any] | None = None, section: str = "",
                       message: str | None = None, fields: dict[str, str] | None = None,
                       status: int = 200) -> bytes:
        keys = keys_of(self.auth.cache.keys_by_id, viewer.user.id)
        last_used = await self.key_usage.last_used(viewer.user.id)
        key_rows = [tags.tr(
            tags.td(tags.strong(key.name)), tags.td(tags.code(key.prefix + "…")),
            tags.td(when(key.created_at), class_="optional"),
            tags.td(when(last_used[key.id]) if key.id in last_used else "never"),
            tags.td(tags.div(
                button_form(f"/studio/account/keys/{key.id}/regenerate", viewer.csrf,
                            "Regenerate", style="link",
                            confirm=f"Replace key {key.name}? Clients using it stop working."),
                button_form(f"/studio/account/keys/{key.id}/revoke", viewer.csrf, "Revoke",
                            style="link",
                            confirm=f"Revoke key {key.name}? Clients using it stop working."),
                class_="row"))) for key in keys]
        mine = await self.database.run(sessions.sessions_of(viewer.user.id))
        session_rows = []
        for info in mine:
            current = info.id == viewer.session.id
            session_rows.append(tags.tr(
                tags.td(_browser(info.user_agent), tags.strong(" (this one)") if current
                        else ""),
                tags.td(info.address or "—", class_="optional"),
                tags.td(when(info.created_at), class_="optional"),
                tags.td(when(info.renewed_at)),
                tags.td("" if current else button_form(
                    f"/studio/account/sessions/{info.id}/end", viewer.csrf, "Sign out",
                    style="link"))))
        once: Any = ""
        if new_key is not None:
            once = tags.div(tags.h2("Your new key"),
                            tags.p("Key ", tags.code(new_key["name"]), " is ready. Copy it "
                                   "now: it is shown only this once."),
                            snippet("new-key", new_key["key"], "the API key"),
                            class_="secret-once", id="new-key-box")
        return self.respond(request, "Account",
            tags.h1("Account"), tags.p(viewer.user.email, class_="lead"),
            notice(notice_for(request)), once,
            error_box(message, fields) if section == "" else "",
            tags.section(
                tags.h2("API keys", id="keys-title"),
                tags.div(tags.table(
                    tags.thead(tags.tr(tags.th("Name", scope="col"),
                                       tags.th("Starts with", scope="col"),
                                       tags.th("Created", scope="col", class_="optional"),
                                       tags.th("Last used", scope="col"),
                                       tags.th("Actions", scope="col"))),
                    tags.tbody(*key_rows)), class_="table-wrap") if key_rows else tags.p(
                    "No API key: clients need one to connect."),
                error_box(message, fields) if section == "keys" else "",
                post_form("/studio/account/keys", viewer.csrf,
                          field("Name of a new key", "name", errors=fields if section == "keys"
                                else None, required=True, maxlength="100",
                                hint="E.g. the machine or client that will use it."),
                          tags.div(tags.button("Create key", type="submit"),
                                   class_="actions")),
                class_="card", **{"aria-labelledby": "keys-title"}),
            tags.section(
                tags.h2("Connected apps", id="apps-title"),
                tags.p("Applications you allowed to use your playbooks by signing in with "
                       "OAuth: see what each may do, and revoke it. ",
                       tags.a("Connected apps", href="/studio/account/apps")),
                class_="card", **{"aria-labelledby": "apps-title"}),
            tags.section(
                tags.h2("Sessions", id="sessions-title"),
                tags.p("Browsers and tools signed in to this account.", class_="hint"),
                tags.div(tags.table(
                    tags.thead(tags.tr(tags.th("Client", scope="col"),
                                       tags.th("Address", scope="col", class_="optional"),
                                       tags.th("Signed in", scope="col", class_="optional"),
                                       tags.th("Last seen", scope="col"),
                                       tags.th("", scope="col"))),
                    tags.tbody(*session_rows)), class_="table-wrap"),
                tags.div(button_form("/studio/account/sessions/others", viewer.csrf,
                                     "Sign out every other session",
                                     confirm="Sign out every other session?"),
                         class_="actions") if len(mine) > 1 else "",
                class_="card", **{"aria-labelledby": "sessions-title"}),
            tags.section(
                tags.h2("Password", id="password-title"),
                error_box(message, fields) if section == "password" else "",
                post_form("/studio/account/password", viewer.csrf,
                          tags.input(type="text", name="username", value=viewer.user.email,
                                     autocomplete="username", hidden="hidden",
                                     **{"aria-hidden": "true"}),
                          field("Current password", "current_password", kind="password",
                                required=True, autocomplete="current-password",
                                errors=fields if section == "password" else None),
                          field("New password", "new_password", kind="password",
                                required=True, autocomplete="new-password",
                                hint="At least 8 characters. Every other session is signed "
                                     "out.", errors=fields if section == "password" else None),
                          field("New password again", "new_password_again", kind="password",
                                required=True, autocomplete="new-password",
                                errors=fields if section == "password" else None),
                          tags.div(tags.button("Change password", type="submit"),
                                   class_="actions")),
                class_="card", **{"aria-labelledby": "password-title"}),
            viewer=viewer, status=status, section="account")

    @app.route("/account", methods=["GET"])
    async def account(self, request: Request) -> bytes:
        return await self._account(request, await self.viewer(request))

    @app.route("/account/keys", methods=["POST"])
    async def create_key(self, request: Request) -> bytes:
        viewer, form = await self.form_of(request)
        try:
            _, created = await call_api(request, self.api.create_key,
                                        body={"name": form.get("name")})
        except (ApiError, ValidationFailed) as error:
            message, fields = problems(error)
            return await self._account(request, viewer, section="keys", message=message,
                                       fields=fields, status=getattr(error, "status", 400))
        return await self._account(request, viewer, new_key=created)

    @app.route("/account/keys/<key_id>/revoke", methods=["POST"])
    async def revoke_key(self, request: Request, key_id: str) -> bytes:
        await self.form_of(request)
        await call_api(request, self.api.revoke_key, key_id)
        return self.redirect(request, "/studio/account?notice=key-revoked")

    @app.route("/account/keys/<key_id>/regenerate", methods=["POST"])
    async def regenerate_key(self, request: Request, key_id: str) -> bytes:
        viewer, _ = await self.form_of(request)
        _, created = await call_api(request, self.api.regenerate_key, key_id)
        return await self._account(request, viewer, new_key=created)

    @app.route("/account/password", methods=["POST"])
    async def change_password(self, request: Request) -> bytes:
        viewer, form = await self.form_of(request)
        new = form.get("new_password")
        try:
            if new != form.get("new_password_again"):
                raise ValidationFailed({"new_password_again": "does not match the new password"})
            await call_api(request, self.api.change_password, body={
                "current_password": form.get("current_password"), "new_password": new})
        except (ApiError, ValidationFailed) as error:
            message, fields = problems(error)
            return await self._account(request, viewer, section="password", message=message,
                                       fields=fields, status=getattr(error, "status", 400))
        return self.redirect(request, "/studio/account?notice=password-changed")

    @app.route("/account/sessions/others", methods=["POST"])
    async def end_others(self, request: Request) -> bytes:
        viewer, _ = await self.form_of(request)
        await self.database.run(sessions.end_other_sessions(viewer.user.id, viewer.session.id))
        return self.redirect(request, "/studio/account?notice=others-signed-out")

    @app.route("/account/sessions/<session_id>/end", methods=["POST"])
    async def end_one(self, request: Request, session_id: str) -> bytes:
        viewer, _ = await self.form_of(request)
        target: UUID = parse_uuid(session_id)
        await self.database.run(sessions.end_session(viewer.user.id, target))
        return self.redirect(request, "/studio/account?notice=session-ended")
