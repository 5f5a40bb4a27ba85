"""A playbook's own prompts: list, create, edit (with a preview of the rendered prompt for
given argument values), remove."""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.web.server import Request
from twisted.web.template import Tag, tags

from director.accounts.validation import ValidationFailed
from director.mcp.jsonrpc import ProtocolError
from director.mcp.router import render_prompt
from director.playbooks.model import Prompt
from director.playbooks.store import Playbook
from director.studio.base import StudioBase, Viewer, studio
from director.studio.forms import Form, call_api, problems, prompt_body, prompt_values
from director.studio.pages import notice_for
from director.studio.pages.playbooks import _version
from director.studio.templates.components import (
    button_form,
    error_box,
    field,
    notice,
    post_form,
)
from director.web.errors import ApiError, NotFound

app: Klein = studio
BLANK_ARGUMENTS = 2


class PromptPages(StudioBase):
    def _prompt(self, playbook: Playbook, name: str) -> Prompt:
        prompt = playbook.prompt(name)
        if prompt is None:
            raise NotFound(f"playbook {playbook.id!r} has no prompt {name!r}")
        return prompt

    @app.route("/playbooks/<playbook_id>/prompts", methods=["GET"])
    async def prompts(self, request: Request, playbook_id: str) -> bytes:
        viewer = await self.viewer(request)
        playbook = self.owned(viewer, playbook_id)
        rows = [tags.tr(
            tags.td(tags.a(p.name, href=self.playbook_url(playbook, "prompts", p.name))),
            tags.td(p.title or p.description or "", class_="optional"),
            tags.td(", ".join(a.name + ("*" if a.required else "") for a in p.arguments)
                    or "—")) for p in playbook.prompts]
        listing: Any = tags.div(tags.table(
            tags.thead(tags.tr(tags.th("Name", scope="col"),
                               tags.th("Title", scope="col", class_="optional"),
                               tags.th("Arguments (* required)", scope="col"))),
            tags.tbody(*rows)), class_="table-wrap") if rows else tags.p(
            "No prompt yet. Prompts are templates clients offer their users; write "
            "{{argument}} where an argument's value goes.")
        return self.respond(request, f"Prompts of {playbook.name}",
            self.playbook_crumbs(playbook), tags.h1("Prompts"), notice(notice_for(request)),
            tags.div(listing, tags.div(tags.a("New prompt", href=self.playbook_url(
                playbook, "prompts", "new") + "?new=1", class_="button"), class_="actions"),
                class_="card"),
            viewer=viewer, section="playbooks", playbook=playbook.id, live=True)

    def _prompt_form(self, request: Request, viewer: Viewer, playbook: Playbook,
                     current: Prompt | None, form: Form | None = None,
                     message: str | None = None, fields: dict[str, str] | None = None,
                     status: int = 200) -> bytes:
        values = prompt_values(current) if form is None else {
            **prompt_body(form), "arguments": prompt_body(form)["arguments"]}
        arguments = list(values["arguments"]) + [
            {"name": "", "description": "", "required": False}] * BLANK_ARGUMENTS
        rows = []
        for index, argument in enumerate(arguments):
            base = f"f-arg-{index}"
            required = tags.select(
                tags.option("optional", value="no"),
                tags.option("required", value="yes",
                            **({"selected": "selected"} if argument["required"] else {})),
                name="arg_required", id=base + "-required")
            rows.append(tags.div(
                tags.div(tags.label("Argument", for_=base + "-name"),
                         tags.input(type="text", name="arg_name", id=base + "-name",
                                    value=argument["name"])),
                tags.div(tags.label("Description", for_=base + "-description"),
                         tags.input(type="text", name="arg_description",
                                    id=base + "-description", value=argument["description"])),
                tags.div(tags.label("Needed", for_=base + "-required"), required),
                class_="row"))
        action = self.playbook_url(playbook, "prompts", current.name) if current is not None \
            else self.playbook_url(playbook, "prompts")
        title = f"Prompt {current.name}" if current is not None else "New prompt"
        parts: list[Any] = [
            self.playbook_crumbs(playbook, ("Prompts", self.playbook_url(playbook, "prompts"))),
            tags.h1(title), notice(notice_for(request)), error_box(message, fields),
            tags.div(post_form(action, viewer.csrf,
                tags.input(type="hidden", name="version", value=str(playbook.version)),
                field("Name", "name", values["name"], errors=fields, required=True,
                      maxlength="64", hint="How clients ask for it: letters, digits, '.', "
                                           "'_' or '-'."),
                field("Title", "title", values["title"], errors=fields),
                field("Description", "description", values["description"], errors=fields),
                field("Text", "body", values["body"], kind="textarea", errors=fields,
                      required=True, rows="8",
                      hint="Write {{name}} where the argument called name goes."),
                tags.fieldset(tags.legend("Arguments"), *rows),
                tags.div(tags.button("Save prompt", type="submit"),
                         tags.a("Cancel", href=self.playbook_url(playbook, "prompts")),
                         class_="actions")), class_="card")]
        if current is not None:
            parts.append(self._preview(request, playbook, current))
            parts.append(tags.div(button_form(
                self.playbook_url(playbook, "prompts", current.name, "remove"), viewer.csrf,
                "Remove this prompt", style="danger", confirm=f"Remove {current.name}?",
                hidden={"version": str(playbook.version)}), class_="card"))
        return self.respond(request, title, *parts, viewer=viewer, status=status,
                            section="playbooks")

    def _preview(self, request: Request, playbook: Playbook, prompt: Prompt) -> Tag:
        """The prompt as ``prompts/get`` renders it for the values in the query string."""
        values = {name.decode("utf-8", "replace")[len("preview."):]:
                  raw[0].decode("utf-8", "replace")
                  for name, raw in request.args.items() if name.startswith(b"preview.")}
        given = {name: value for name, value in values.items() if value != ""}
        inputs = [field(argument.name, "preview." + argument.name, values.get(argument.name, ""),
                        required=argument.required, hint=argument.description or None)
                  for argument in prompt.arguments]
        shown: Any = ""
        if "preview" in {n.decode("latin-1") for n in request.args}:
            try:
                rendered = render_prompt(prompt, given)
                text = rendered["messages"][0]["content"]["text"]
                shown = tags.div(tags.h3("What the client receives"),
                                 tags.pre(tags.code(text), id="preview-text"))
            except ProtocolError as error:
                shown = error_box(error.message)
        return tags.section(
            tags.h2("Preview", id="preview-title"),
            tags.form(tags.input(type="hidden", name="preview", value="1"), *inputs,
                      tags.div(tags.button("Preview", type="submit", class_="secondary"),
                               class_="actions"),
                      method="get", action=self.playbook_url(playbook, "prompts", prompt.name)
                      + "#preview-title"),
            shown, class_="card", **{"aria-labelledby": "preview-title"})

    @app.route("/playbooks/<playbook_id>/prompts/<name>", methods=["GET"])
    async def prompt_page(self, request: Request, playbook_id: str, name: str) -> bytes:
        viewer = await self.viewer(request)
        playbook = self.owned(viewer, playbook_id)
        if name == "new" and request.args.get(b"new"):
            return self._prompt_form(request, viewer, playbook, None)
        return self._prompt_form(request, viewer, playbook, self._prompt(playbook, name))

    @app.route("/playbooks/<playbook_id>/prompts", methods=["POST"])
    async def add_prompt(self, request: Request, playbook_id: str) -> bytes:
        viewer, form = await self.form_of(request)
        playbook = self.owned(viewer, playbook_id)
        try:
            _, created = await call_api(request, self.api.add_prompt, playbook_id,
                                        body=prompt_body(form), if_match=_version(form))
        except (ApiError, ValidationFailed) as error:
            message, fields = problems(error)
            return self._prompt_form(request, viewer, playbook, None, form, message, fields,
                                     getattr(error, "status", 400))
        return self.redirect(request, self.playbook_url(playbook, "prompts", created["name"])
                             + "?notice=prompt-saved")

    @app.route("/playbooks/<playbook_id>/prompts/<name>", methods=["POST"])
    async def save_prompt(self, request: Request, playbook_id: str, name: str) -> bytes:
        viewer, form = await self.form_of(request)
        playbook = self.owned(viewer, playbook_id)
        current = self._prompt(playbook, name)
        try:
            _, saved = await call_api(request, self.api.update_prompt, playbook_id, name,
                                      body=prompt_body(form), if_match=_version(form))
        except (ApiError, ValidationFailed) as error:
            message, fields = problems(error)
            return self._prompt_form(request, viewer, playbook, current, form, message, fields,
                                     getattr(error, "status", 400))
        return self.redirect(request, self.playbook_url(playbook, "prompts", saved["name"])
                             + "?notice=prompt-saved")

    @app.route("/playbooks/<playbook_id>/prompts/<name>/remove", methods=["POST"])
    async def remove_prompt(self, request: Request, playbook_id: str, name: str) -> bytes:
        viewer, form = await self.form_of(request)
        playbook = self.owned(viewer, playbook_id)
        self._prompt(playbook, name)
        await call_api(request, self.api.remove_prompt, playbook_id, name,
                       if_match=_version(form))
        return self.redirect(request, self.playbook_url(playbook, "prompts")
                             + "?notice=prompt-removed")
