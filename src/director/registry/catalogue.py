"""The MCP Registry's documents as values: server entries (``server.json``) and list pages.

The registry (official v0.1 API, or a ``file://`` catalogue in the same format) is a third
party: whatever it answers is read defensively. A page's entry that is not a server (no name,
no version, a name outside the registry's pattern) is skipped and counted, never fatal; a
description is cut to ``MAX_DESCRIPTION`` characters; the packages and remotes are kept as the
registry wrote them and judged only when someone installs them (``director.registry.install``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs

#: The registry's own pattern for names (``io.github.user/weather``): one slash.
NAME_PATTERN = re.compile(r"[a-zA-Z0-9.-]{1,200}/[a-zA-Z0-9._-]{1,200}")
MAX_NAME = 200
MAX_VERSION = 255
MAX_DESCRIPTION = 1000
MAX_PACKAGES = 20
OFFICIAL_META = "io.modelcontextprotocol.registry/official"


class CatalogueError(Exception):
    """The registry answered something that is not what the MCP Registry API describes."""


@attrs.frozen
class Entry:
    """One version of one server, as the registry describes it."""

    name: str
    version: str
    description: str = ""
    title: str = ""
    website_url: str | None = None
    repository_url: str | None = None
    packages: tuple[Mapping[str, Any], ...] = ()
    remotes: tuple[Mapping[str, Any], ...] = ()
    #: From the official metadata when the registry gives it (None: not said).
    is_latest: bool | None = None
    status: str | None = None
    published_at: str | None = None


@attrs.frozen
class Page:
    entries: tuple[Entry, ...]
    next_cursor: str | None
    #: Entries of the answer that were not servers and were left out.
    skipped: int = 0


def valid_name(name: Any) -> bool:
    return isinstance(name, str) and len(name) <= MAX_NAME and bool(NAME_PATTERN.fullmatch(name))


def _short_text(value: Any, limit: int) -> str:
    if not isinstance(value, str):
        return ""
    text = "".join(c for c in value if c.isprintable() or c in "\n\t")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _url(value: Any) -> str | None:
    if isinstance(value, str) and len(value) <= 2048 and value.startswith(("https://",
                                                                            "http://")):
        return value
    return None


def _objects(value: Any, what: str) -> tuple[Mapping[str, Any], ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_PACKAGES or \
            not all(isinstance(item, dict) for item in value):
        raise CatalogueError(f"its {what} are not a list of at most {MAX_PACKAGES} objects")
    return tuple(value)


def parse_entry(item: Any) -> Entry:
    """One ``{"server": {...}, "_meta": {...}}`` of an answer, or a bare ``server.json``."""
    if not isinstance(item, dict):
        raise CatalogueError("an entry is not an object")
    server = item.get("server", item)
    if not isinstance(server, dict):
        raise CatalogueError("an entry's server is not an object")
    name, version = server.get("name"), server.get("version")
    if not isinstance(name, str) or not valid_name(name):
        raise CatalogueError("an entry has no valid name (namespace/name)")
    if not isinstance(version, str) or not version.strip() or len(version) > MAX_VERSION \
            or not version.isprintable():
        raise CatalogueError(f"{name} has no valid version")
    meta: dict[str, Any] = item["_meta"] if isinstance(item.get("_meta"), dict) else {}
    official: dict[str, Any] = meta[OFFICIAL_META] \
        if isinstance(meta.get(OFFICIAL_META), dict) else {}
    repository = server.get("repository")
    return Entry(
        name=name, version=version,
        description=_short_text(server.get("description"), MAX_DESCRIPTION),
        title=_short_text(server.get("title"), 200),
        website_url=_url(server.get("websiteUrl")),
        repository_url=_url(repository.get("url")) if isinstance(repository, dict) else None,
        packages=_objects(server.get("packages"), "packages"),
        remotes=_objects(server.get("remotes"), "remotes"),
        is_latest=official.get("isLatest") if isinstance(official.get("isLatest"), bool)
        else None,
        status=official.get("status") if isinstance(official.get("status"), str) else None,
        published_at=_short_text(official.get("publishedAt"), 64) or None)


def parse_page(data: Any) -> Page:
    """A ``/v0.1/servers`` (or ``…/versions``) answer: its servers and next cursor."""
    if not isinstance(data, dict) or not isinstance(data.get("servers"), list):
        raise CatalogueError("the answer has no list of servers")
    entries, skipped = [], 0
    for item in data["servers"]:
        try:
            entries.append(parse_entry(item))
        except CatalogueError:
            skipped += 1
    metadata: dict[str, Any] = data["metadata"] if isinstance(data.get("metadata"), dict) \
        else {}
    cursor = metadata.get("nextCursor", metadata.get("next_cursor"))
    if cursor is not None and (not isinstance(cursor, str) or len(cursor) > 1024):
        raise CatalogueError("the answer's next cursor is not text")
    return Page(tuple(entries), cursor or None, skipped)


def entry_json(entry: Entry) -> dict[str, Any]:
    """An entry as Director's API shows it."""
    return {"name": entry.name, "version": entry.version, "title": entry.title,
            "description": entry.description, "website_url": entry.website_url,
            "repository_url": entry.repository_url, "is_latest": entry.is_latest,
            "status": entry.status, "published_at": entry.published_at}


_NUMBERS = re.compile(r"\d+|[^\d]+")


def version_key(version: str) -> tuple[Any, ...]:
    """Sorts semantic versions (and most others) oldest first; a pre-release before its
    release (``1.0.0-rc.1`` < ``1.0.0``)."""
    core, _, pre = version.partition("-")
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in _NUMBERS.findall(core))
    return (parts, 0 if pre else 1, pre)


def latest_of(entries: tuple[Entry, ...] | list[Entry]) -> Entry | None:
    """The entry the registry marks latest, else the highest version."""
    if not entries:
        return None
    marked = [entry for entry in entries if entry.is_latest]
    if marked:
        return marked[-1]
    return max(entries, key=lambda entry: version_key(entry.version))
