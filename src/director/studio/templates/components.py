"""Small pieces every page uses: form fields with their errors, notices, badges, snippets."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from twisted.web.template import Tag, tags

from director.studio.csrf import FIELD


def csrf_input(token: str) -> Tag:
    return tags.input(type="hidden", name=FIELD, value=token)


def post_form(action: str, csrf: str, *children: Any, confirm: str | None = None,
              **attributes: Any) -> Tag:
    form = tags.form(csrf_input(csrf), *children, method="post", action=action, **attributes)
    if confirm:
        form(**{"data-confirm": confirm})
    return form


def button_form(action: str, csrf: str, label: str, *, style: str = "secondary",
                confirm: str | None = None, hidden: Mapping[str, str] | None = None) -> Tag:
    """A one-button form (restart, revoke, …): a POST without JavaScript."""
    fields = [tags.input(type="hidden", name=name, value=value)
              for name, value in (hidden or {}).items()]
    return post_form(action, csrf, *fields, tags.button(label, type="submit", class_=style),
                     confirm=confirm)


def field_id(name: str) -> str:
    return "f-" + "".join(c if c.isalnum() else "-" for c in name)


def field(label: str, name: str, value: str = "", *, kind: str = "text",
          errors: Mapping[str, str] | None = None, hint: str | None = None,
          required: bool = False, error_key: str | None = None, identifier: str | None = None,
          **attributes: Any) -> Tag:
    """A labelled input; its error (``errors[error_key or name]``) is tied to it for screen
    readers with ``aria-describedby``."""
    identifier = identifier or field_id(name)
    problem = (errors or {}).get(error_key or name)
    parts: list[Any] = [tags.label(label, tags.span(" (required)", class_="muted small")
                                   if required else "", for_=identifier)]
    control_attributes = dict(attributes)
    if required:
        control_attributes["required"] = "required"
    if kind == "textarea":
        control = tags.textarea(value, name=name, id=identifier, **control_attributes)
    else:
        control = tags.input(type=kind, name=name, id=identifier, value=value,
                             **control_attributes)
    parts.append(control)
    parts.extend(described_by(control, identifier, hint, problem))
    return tags.div(*parts, class_="field")


def described_by(control: Tag, identifier: str, hint: str | None, problem: str | None,
                 notes: tuple[Tag, ...] = ()) -> list[Tag]:
    """The hint and the error under a control, tied to it with ``aria-describedby`` (and
    ``aria-invalid`` when there is an error); ``notes`` are further such paragraphs."""
    parts = list(notes)
    if hint:
        parts.append(tags.p(hint, class_="hint", id=identifier + "-hint"))
    if problem:
        parts.append(tags.p(problem, class_="field-error", id=identifier + "-error"))
        control(**{"aria-invalid": "true"})
    if parts:
        control(**{"aria-describedby": " ".join(str(p.attributes["id"]) for p in parts)})
    return parts


def checkbox(label: str, name: str, checked: bool, *, value: str = "on",
             hint: str | None = None) -> Tag:
    identifier = field_id(name)
    box = tags.input(type="checkbox", name=name, id=identifier, value=value)
    if checked:
        box(checked="checked")
    parts: list[Any] = [tags.label(box, label, for_=identifier, class_="inline")]
    if hint:
        parts.append(tags.p(hint, class_="hint"))
    return tags.div(*parts, class_="field")


def error_box(message: str | None, fields: Mapping[str, str] | None = None) -> Tag | str:
    if not message and not fields:
        return ""
    items = [tags.li(tags.code(name), ": ", problem) for name, problem in (fields or {}).items()]
    return tags.div(tags.strong(message or "Please correct the following."),
                    tags.ul(*items) if items else "", class_="error-box", role="alert",
                    tabindex="-1", id="errors")


def notice(message: str | None) -> Tag | str:
    if not message:
        return ""
    return tags.div(message, class_="notice", role="status")


def snippet(identifier: str, text: str, label: str) -> Tag:
    """A block of text to copy (the button appears with JavaScript)."""
    return tags.div(
        tags.pre(tags.code(text, id=identifier)),
        tags.button("Copy", type="button", class_="copy secondary", hidden="hidden",
                    **{"data-copy": identifier, "aria-label": f"Copy {label}"}),
        class_="snippet")


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False)


def crumbs(*links: tuple[str, str]) -> Tag:
    parts: list[Any] = []
    for index, (label, href) in enumerate(links):
        if index:
            parts.append(" / ")
        parts.append(tags.a(label, href=href))
    return tags.nav(*parts, class_="crumbs", **{"aria-label": "Breadcrumb"})
