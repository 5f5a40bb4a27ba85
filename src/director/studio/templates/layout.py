"""The one page layout: head, top bar, main content, footer; and rendering to bytes."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.web.template import Tag, tags

DOCTYPE = "<!DOCTYPE html>\n"


@attrs.frozen
class Chrome:
    """What the layout needs besides the content: assets, who is signed in, which page."""

    css: str
    js: str
    icon: str
    user_email: str | None = None
    csrf: str | None = None
    section: str = ""
    #: The playbook this page watches for live updates ("" for every playbook of the user).
    playbook: str | None = None
    live: bool = False


#: HTML's void elements (``<input />``), as ``twisted.web.template`` writes them.
VOID_ELEMENTS = frozenset(("img", "br", "hr", "base", "meta", "link", "param", "area", "input",
                           "col", "source", "track", "embed", "wbr"))


def render(node: Any) -> bytes:
    """The page as bytes: ``twisted.web.template`` tags written out synchronously.

    Twisted's own flattener accepts Deferreds, renderers and slots, which costs a generator
    step per node: about 5 µs each, so 0.25 s for the playbook page of 500 tools. Studio
    templates hold only tags, strings and lists, so this writes them directly (several times
    faster), escaping every string exactly as the flattener does (``&<>`` in text, and ``"``
    too in attributes); anything else is a programming error and raises ``TypeError``.
    """
    out: list[str] = [DOCTYPE]
    _write(node, out)
    return "".join(out).encode("utf-8")


def _text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _write(node: Any, out: list[str]) -> None:
    if isinstance(node, str):
        out.append(_text(node))
    elif isinstance(node, Tag):
        if node.render is not None or node.slotData:
            raise TypeError("Studio templates use neither renderers nor slots")
        name = node.tagName
        if not isinstance(name, str):
            raise TypeError(f"tag name {name!r} is not text")
        if not name:
            for child in node.children:
                _write(child, out)
            return
        out.append("<" + name)
        for key, value in node.attributes.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"attribute {key!r}={value!r} of <{name}> is not text")
            out.append(f' {key}="{_text(value).replace(chr(34), "&quot;")}"')
        if node.children or name not in VOID_ELEMENTS:
            out.append(">")
            for child in node.children:
                _write(child, out)
            out.append(f"</{name}>")
        else:
            out.append(" />")
    elif isinstance(node, list | tuple):
        for child in node:
            _write(child, out)
    else:
        raise TypeError(f"cannot write {type(node).__name__} into a page")


def _nav(chrome: Chrome) -> Tag:
    links: list[Any] = []
    for section, href, label in (("playbooks", "/studio/", "Playbooks"),
                                 ("registry", "/studio/registry", "Find a server"),
                                 ("import", "/studio/import", "Import"),
                                 ("account", "/studio/account", "Account")):
        link = tags.a(label, href=href)
        if chrome.section == section:
            link(**{"aria-current": "page"})
        links.append(link)
    links.append(tags.span(tags.span(class_="live-dot", id="live-dot", title="Live updates off"),
                           class_="small muted", **{"aria-hidden": "true"}))
    links.append(tags.form(
        tags.input(type="hidden", name="csrf_token", value=chrome.csrf or ""),
        tags.button("Sign out", type="submit", class_="link"),
        method="post", action="/studio/logout"))
    return tags.nav(*links, class_="main", **{"aria-label": "Main"})


def page(chrome: Chrome, title: str, *content: Any) -> Tag:
    body_attributes: dict[str, str] = {}
    if chrome.live and chrome.user_email is not None:
        body_attributes["data-events"] = "/studio/events"
        body_attributes["data-playbook"] = chrome.playbook or ""
    bar: list[Any] = [tags.a(tags.img(src=chrome.icon, alt=""), "Director Studio",
                             href="/studio/", class_="brand")]
    if chrome.user_email is not None:
        bar.append(_nav(chrome))
    return tags.html(
        tags.head(
            tags.meta(charset="utf-8"),
            tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
            tags.meta(name="color-scheme", content="light dark"),
            tags.title(f"{title} · Director Studio"),
            tags.link(rel="icon", href=chrome.icon, type="image/svg+xml"),
            tags.link(rel="stylesheet", href=chrome.css),
            tags.script(src=chrome.js, defer="defer"),
        ),
        tags.body(
            tags.a("Skip to content", href="#content", class_="skip"),
            tags.header(tags.div(*bar, class_="bar"), class_="top"),
            # twisted.web.template.tags has no <main> (it predates it): build the Tag.
            Tag("main")(*content, id="content", tabindex="-1"),
            tags.footer(
                "Signed in as ", chrome.user_email, class_="bottom",
            ) if chrome.user_email is not None else tags.footer(class_="bottom"),
            **body_attributes,
        ),
        lang="en",
    )
