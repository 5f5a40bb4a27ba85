"""Try a tool: a form generated from the tool's JSON schema, run through the real gateway path
(the Studio's own downstream session: ``workbench.py``), and the result shown as a client
would get it — text escaped, JSON pretty, images inline from their base64, resources as
links or text, errors readable."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any
from urllib.parse import urlsplit

from klein import Klein
from twisted.web.server import Request
from twisted.web.template import Tag, tags

from director.accounts.validation import ValidationFailed
from director.mcp.jsonrpc import Message
from director.playbooks.store import Playbook
from director.studio.base import StudioBase, Viewer, studio
from director.studio.forms import Form, field_kind, schema_properties, tool_arguments
from director.studio.pages.playbook import schema_summary
from director.studio.templates.components import (
    described_by,
    error_box,
    field_id,
    post_form,
    pretty_json,
)
from director.studio.workbench import ToolEntry
from director.web.errors import NotFound

app: Klein = studio
MAX_SHOWN_TEXT = 200_000


def argument_field(name: str, spec: dict[str, Any], required: bool, form: Form | None,
                   errors: dict[str, str] | None) -> Tag:
    """One input for one property of the schema, typed by it."""
    kind = field_kind(spec)
    identifier = field_id("arg-" + name)
    submitted = form.get("arg." + name) if form is not None else None
    default = spec.get("default")
    description = spec.get("description") if isinstance(spec.get("description"), str) else ""
    label: list[Any] = [tags.code(name)]
    if required:
        label.append(tags.span(" (required)", class_="muted small"))
    type_names = {"string": "text", "number": "number", "integer": "whole number",
                  "boolean": "true or false", "enum": "choice", "json": "JSON"}
    label.append(tags.span(f" {type_names[kind]}", class_="muted small"))
    hint_parts = [description] if description else []
    control: Tag
    if kind == "enum":
        options = [] if required else [tags.option("—", value="")]
        chosen = submitted if submitted is not None else (
            json.dumps(default) if default is not None else None)
        for option in spec["enum"]:
            encoded = json.dumps(option)
            item = tags.option(str(option), value=encoded)
            if chosen == encoded:
                item(selected="selected")
            options.append(item)
        control = tags.select(*options, name="arg." + name, id=identifier)
    elif kind == "boolean":
        chosen = submitted if submitted is not None else (
            "true" if default is True else "false" if default is False else "")
        options = []
        for value, text in (("", "—"), ("true", "true"), ("false", "false")):
            item = tags.option(text, value=value)
            if chosen == value:
                item(selected="selected")
            options.append(item)
        control = tags.select(*options, name="arg." + name, id=identifier)
    elif kind == "json":
        text = submitted if submitted is not None else (
            pretty_json(default) if default is not None else "")
        control = tags.textarea(text, name="arg." + name, id=identifier, rows="5",
                                **{"data-json": "1", "spellcheck": "false"})
        hint_parts.append("Write JSON" + (f" ({spec['type']})" if isinstance(
            spec.get("type"), str) else "") + ".")
    else:
        value = submitted if submitted is not None else (
            str(default) if default is not None and not isinstance(default, bool) else "")
        attributes: dict[str, str] = {}
        if kind in ("number", "integer"):
            attributes = {"inputmode": "decimal" if kind == "number" else "numeric"}
        control = tags.input(type="text", name="arg." + name, id=identifier, value=value,
                             **attributes)
    if required:
        control(**{"aria-required": "true"})
    notes: tuple[Tag, ...] = ()
    if kind == "json":
        notes = (tags.p("", class_="field-error", id=identifier + "-json",
                        **{"aria-live": "polite"}),)
    parts: list[Any] = [tags.label(*label, for_=identifier), control]
    parts.extend(described_by(control, identifier, " ".join(hint_parts) or None,
                              (errors or {}).get(name), notes))
    return tags.div(*parts, class_="field")


def render_content(item: Any, index: int) -> Tag:
    """One content block of a tool result."""
    if not isinstance(item, dict):
        return tags.pre(tags.code(pretty_json(item)))
    kind = item.get("type")
    if kind == "text" and isinstance(item.get("text"), str):
        text = item["text"]
        if len(text) > MAX_SHOWN_TEXT:
            text = text[:MAX_SHOWN_TEXT] + f"\n… ({len(item['text']) - MAX_SHOWN_TEXT} more " \
                                           "characters)"
        return tags.pre(tags.code(text), class_="result-text")
    if kind == "image":
        source = _data_url(item.get("mimeType"), item.get("data"), "image/")
        if source is not None:
            return tags.figure(tags.img(src=source, alt=f"Image {index + 1} returned by the "
                                                        f"tool ({item.get('mimeType')})"))
    if kind == "audio":
        size = len(str(item.get("data", ""))) * 3 // 4
        return tags.p(f"Audio ({item.get('mimeType')}, about {size} bytes).", class_="muted")
    if kind == "resource_link" and isinstance(item.get("uri"), str):
        return tags.p("Resource link: ", _uri(item["uri"]),
                      f" — {item['name']}" if isinstance(item.get("name"), str) else "")
    if kind == "resource" and isinstance(item.get("resource"), dict):
        resource = item["resource"]
        parts: list[Any] = [tags.p("Resource ", _uri(str(resource.get("uri", ""))),
                                   f" ({resource['mimeType']})"
                                   if isinstance(resource.get("mimeType"), str) else "")]
        if isinstance(resource.get("text"), str):
            parts.append(tags.pre(tags.code(resource["text"][:MAX_SHOWN_TEXT])))
        elif isinstance(resource.get("blob"), str):
            parts.append(tags.p(f"Binary, about {len(resource['blob']) * 3 // 4} bytes.",
                                class_="muted"))
        return tags.div(*parts)
    return tags.pre(tags.code(pretty_json(item)))


def _data_url(mime: Any, data: Any, family: str) -> str | None:
    if not isinstance(mime, str) or not mime.startswith(family) or not isinstance(data, str):
        return None
    if any(c in mime for c in ";,\"' <>"):
        return None
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None
    return f"data:{mime};base64,{data}"


def _uri(uri: str) -> Tag:
    """A link only for web addresses: any other scheme (``javascript:``…) is shown as text."""
    if urlsplit(uri).scheme in ("http", "https"):
        return tags.a(uri, href=uri, rel="noopener noreferrer")
    return tags.code(uri)


def render_result(response: Message, notes: list[Message], seconds: float) -> Tag:
    parts: list[Any] = [tags.h2("Result", id="result-title")]
    timing = tags.p(f"Answered in {seconds * 1000:.0f} ms.", class_="small muted")
    if "error" in response:
        error = response["error"] if isinstance(response["error"], dict) else {}
        parts.append(tags.div(
            tags.strong("The call failed"),
            tags.p(f"{error.get('message', 'error')} (JSON-RPC error {error.get('code')})"),
            tags.pre(tags.code(pretty_json(error["data"]))) if "data" in error else "",
            class_="error-box", role="alert", id="call-error"))
    else:
        result = response.get("result") or {}
        if result.get("isError"):
            parts.append(tags.div(tags.strong("The tool reported an error."),
                                  class_="error-box", role="alert", id="tool-error"))
        content = result.get("content")
        for index, item in enumerate(content if isinstance(content, list) else []):
            parts.append(render_content(item, index))
        if "structuredContent" in result:
            parts.append(tags.h3("Structured content"))
            parts.append(tags.pre(tags.code(pretty_json(result["structuredContent"]))))
    parts.append(timing)
    if notes:
        parts.append(tags.details(tags.summary(f"Notifications during the call ({len(notes)})"),
                                  tags.pre(tags.code("\n".join(json.dumps(n, ensure_ascii=False)
                                                               for n in notes)))))
    parts.append(tags.details(tags.summary("Raw JSON-RPC answer"),
                              tags.pre(tags.code(pretty_json(response)))))
    return tags.section(*parts, class_="card result", id="result",
                        **{"aria-labelledby": "result-title", "tabindex": "-1"})


class ToolPages(StudioBase):
    async def _tool(self, viewer: Viewer, playbook: Playbook, name: str) -> ToolEntry:
        view = await self.workbench.tools(viewer.user.id, playbook)
        entry = view.exposed.get(name)
        if entry is None:
            suffix = "" if view.complete else " (some servers are still starting: retry soon)"
            raise NotFound(f"playbook {playbook.id!r} has no tool {name!r} that clients see"
                           + suffix)
        return entry

    def _try_page(self, request: Request, viewer: Viewer, playbook: Playbook,
                  entry: ToolEntry, form: Form | None = None,
                  fields: dict[str, str] | None = None, result: Tag | str = "",
                  status: int = 200) -> bytes:
        properties, required = schema_properties(entry.input_schema)
        inputs = [argument_field(name, spec, name in required, form, fields)
                  for name, spec in properties.items()]
        return self.respond(request, f"Try {entry.exposed}",
            self.playbook_crumbs(playbook, ("Tools", self.playbook_url(playbook) + "#tools")),
            tags.h1("Try ", tags.span(entry.exposed, class_="tool-name")),
            tags.p(entry.description or "No description.", class_="lead"),
            tags.p(f"From server {entry.server}" + (f" (its name there: {entry.original})"
                                                    if entry.original != entry.exposed else "")
                   + ". The call runs through the gateway exactly as a client's would.",
                   class_="small muted"),
            error_box("Please correct the arguments." if fields else None, fields),
            tags.div(post_form(self.playbook_url(playbook, "tools", entry.exposed),
                               viewer.csrf,
                               *(inputs or [tags.p("This tool takes no arguments.",
                                                   class_="muted")]),
                               tags.div(tags.button("Run the tool", type="submit"),
                                        class_="actions")),
                     tags.details(tags.summary("Input schema"),
                                  schema_summary(entry.input_schema)),
                     class_="card"),
            result, viewer=viewer, status=status, section="playbooks")

    # <path:…>: a tool name may hold a "/" (MCP does not forbid it), which would not match.
    @app.route("/playbooks/<playbook_id>/tools/<path:name>", methods=["GET"])
    async def try_page(self, request: Request, playbook_id: str, name: str) -> bytes:
        viewer = await self.viewer(request)
        playbook = self.owned(viewer, playbook_id)
        return self._try_page(request, viewer, playbook,
                              await self._tool(viewer, playbook, name))

    @app.route("/playbooks/<playbook_id>/tools/<path:name>", methods=["POST"])
    async def try_run(self, request: Request, playbook_id: str, name: str) -> bytes:
        viewer, form = await self.form_of(request)
        playbook = self.owned(viewer, playbook_id)
        entry = await self._tool(viewer, playbook, name)
        try:
            arguments = tool_arguments(entry.input_schema, form)
        except ValidationFailed as error:
            return self._try_page(request, viewer, playbook, entry, form, error.fields,
                                  status=400)
        response, notes, seconds = await self.workbench.call_tool(
            viewer.user.id, playbook, entry.exposed, arguments)
        return self._try_page(request, viewer, playbook, entry, form,
                              result=render_result(response, notes, seconds))
