"""The one page layout: head, top bar, main content, footer; and rendering to bytes."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.web.template import Tag, flatten, tags

DOCTYPE = b"<!DOCTYPE html>\n"


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


def render(node: Any) -> bytes:
    """Flatten synchronously: Studio templates hold no Deferreds."""
    parts: list[bytes] = [DOCTYPE]
    done = flatten(None, node, parts.append)
    failures: list[Any] = []
    done.addErrback(failures.append)
    if failures:
        failures[0].raiseException()
    return b"".join(parts)


def _nav(chrome: Chrome) -> Tag:
    links: list[Any] = []
    for section, href, label in (("playbooks", "/studio/", "Playbooks"),
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
