"""Playbook storage: reads and writes as interactions (see ``director.db.interactions``).

Every write locks the playbook row, checks the caller's expected version (a stale one is a
``VersionConflict``, so two instances editing at once cannot lose an update), applies the
change, bumps the version, records an audit row, and notifies ``playbook:<pk>:<version>`` so
that every instance refreshes exactly that playbook.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable
from typing import Any
from uuid import UUID

import attrs
import psycopg2.errors

from director.crypto import SecretBox
from director.db.interactions import Interaction, Query, notify_change
from director.playbooks.model import (
    PlaybookFields,
    Prompt,
    PromptArgument,
    RegistrySource,
    SecretValue,
    Server,
)
from director.registry.install import materialize


class NoSuchPlaybook(Exception):
    """Unknown, deleted, or someone else's (callers answer 404 alike)."""


class NoSuchPart(Exception):
    """No server or prompt of that name in the playbook."""


class Duplicate(Exception):
    """The name (or playbook id) is taken."""


class VersionConflict(Exception):
    def __init__(self, current: int) -> None:
        super().__init__(f"the playbook changed meanwhile (now version {current})")
        self.current = current


@attrs.frozen
class Playbook:
    pk: UUID
    user_id: UUID
    id: str
    name: str
    description: str
    position: int
    version: int
    created_at: datetime.datetime
    updated_at: datetime.datetime
    servers: tuple[Server, ...] = ()
    prompts: tuple[Prompt, ...] = ()

    def server(self, name: str) -> Server | None:
        return next((s for s in self.servers if s.name == name), None)

    def prompt(self, name: str) -> Prompt | None:
        return next((p for p in self.prompts if p.name == name), None)

    @property
    def fields(self) -> PlaybookFields:
        return PlaybookFields(self.name, self.description, self.position)


# --- (de)serialising servers --------------------------------------------------------------


def _seal_map(box: SecretBox, items: Iterable[tuple[str, SecretValue]]) -> dict[str, Any]:
    return {key: ({"secret": True, "sealed": box.seal(item.value, key)} if item.secret
                  else {"value": item.value}) for key, item in items}


def _open_map(box: SecretBox, stored: dict[str, Any]) -> tuple[tuple[str, SecretValue], ...]:
    items = []
    for key, item in stored.items():
        if item.get("secret"):
            items.append((key, SecretValue(box.open(item["sealed"], key), True)))
        else:
            items.append((key, SecretValue(item["value"])))
    return tuple(sorted(items))


def _server_config(box: SecretBox, server: Server) -> str:
    source = server.registry
    if source is not None:  # the provenance and inputs only: the rest is derived at load
        return json.dumps({"registry": {"registry": source.registry, "name": source.name,
                                        "version": source.version, "recipe": source.recipe},
                           "inputs": _seal_map(box, source.inputs)})
    if server.type == "stdio":
        config = {"command": server.command, "args": list(server.args),
                  "env": _seal_map(box, server.env), "cwd": server.cwd}
    else:
        config = {"url": server.url, "headers": _seal_map(box, server.headers)}
    return json.dumps(config)


def _server(box: SecretBox, row: tuple[Any, ...]) -> Server:
    (_, name, _, kind, config, disabled, prefix, include, exclude, expose_prompts, timeout,
     isolate) = row
    common = {"name": name, "type": kind, "disabled": disabled, "prefix": prefix,
              "include": tuple(include) if include is not None else None,
              "exclude": tuple(exclude) if exclude is not None else None,
              "expose_prompts": expose_prompts, "timeout_seconds": timeout}
    if "registry" in config:
        stored = config["registry"]
        source = RegistrySource(stored["registry"], stored["name"], stored["version"],
                                stored["recipe"], _open_map(box, config.get("inputs", {})))
        derived = materialize(json.loads(source.recipe), source.inputs)
        return Server(registry=source, **(common | derived),
                      **({"isolate_sessions": isolate} if kind == "stdio" else {}))
    if kind == "stdio":
        return Server(command=config["command"], args=tuple(config.get("args", ())),
                      env=_open_map(box, config.get("env", {})), cwd=config.get("cwd"),
                      isolate_sessions=isolate, **common)
    return Server(url=config["url"], headers=_open_map(box, config.get("headers", {})), **common)


def _prompt(row: tuple[Any, ...]) -> Prompt:
    _, name, _, title, description, body, arguments = row
    return Prompt(name=name, body=body, title=title, description=description,
                  arguments=tuple(PromptArgument(**argument) for argument in arguments))


_PLAYBOOK_COLUMNS = ("pk, user_id, id, name, description, position, version, created_at, "
                     "updated_at")
_SERVER_COLUMNS = ("playbook_pk, name, position, type, config, disabled, prefix, tools_include, "
                   "tools_exclude, expose_prompts, timeout_seconds, isolate_sessions")
_PROMPT_COLUMNS = "playbook_pk, name, position, title, description, body, arguments"


def _assemble(box: SecretBox, playbook_rows: list[tuple[Any, ...]],
              server_rows: list[tuple[Any, ...]],
              prompt_rows: list[tuple[Any, ...]]) -> list[Playbook]:
    servers: dict[str, list[Server]] = {}
    for row in server_rows:
        servers.setdefault(str(row[0]), []).append(_server(box, row))
    prompts: dict[str, list[Prompt]] = {}
    for row in prompt_rows:
        prompts.setdefault(str(row[0]), []).append(_prompt(row))
    return [Playbook(UUID(str(pk)), UUID(str(user_id)), playbook_id, name, description,
                     position, version, created_at, updated_at,
                     tuple(servers.get(str(pk), ())), tuple(prompts.get(str(pk), ())))
            for (pk, user_id, playbook_id, name, description, position, version, created_at,
                 updated_at) in playbook_rows]


# --- reads --------------------------------------------------------------------------------


def load(box: SecretBox, pk: UUID) -> Interaction[Playbook | None]:
    rows = yield Query(f"SELECT {_PLAYBOOK_COLUMNS} FROM playbooks WHERE pk = %s", (str(pk),))
    if not rows:
        return None
    servers = yield Query(f"SELECT {_SERVER_COLUMNS} FROM playbook_servers "
                          "WHERE playbook_pk = %s ORDER BY position, name", (str(pk),))
    prompts = yield Query(f"SELECT {_PROMPT_COLUMNS} FROM playbook_prompts "
                          "WHERE playbook_pk = %s ORDER BY position, name", (str(pk),))
    return _assemble(box, rows, servers, prompts)[0]


def load_all(box: SecretBox) -> Interaction[list[Playbook]]:
    rows = yield Query(f"SELECT {_PLAYBOOK_COLUMNS} FROM playbooks")
    servers = yield Query(f"SELECT {_SERVER_COLUMNS} FROM playbook_servers "
                          "ORDER BY playbook_pk, position, name")
    prompts = yield Query(f"SELECT {_PROMPT_COLUMNS} FROM playbook_prompts "
                          "ORDER BY playbook_pk, position, name")
    return _assemble(box, rows, servers, prompts)


def find_pk(user_id: UUID, playbook_id: str) -> Interaction[UUID | None]:
    rows = yield Query("SELECT pk FROM playbooks WHERE user_id = %s AND id = %s",
                       (str(user_id), playbook_id))
    return UUID(str(rows[0][0])) if rows else None


def history(pk: UUID, limit: int, before: int | None = None) -> Interaction[list[dict[str, Any]]]:
    rows = yield Query(
        "SELECT seq, at, actor, action, detail, version FROM playbook_audit "
        "WHERE playbook_pk = %s AND (%s::bigint IS NULL OR seq < %s) "
        "ORDER BY seq DESC LIMIT %s", (str(pk), before, before, limit))
    return [{"seq": seq, "at": at.isoformat(), "actor": actor, "action": action,
             "detail": detail, "version": version}
            for seq, at, actor, action, detail, version in rows]


# --- writes -------------------------------------------------------------------------------


def _lock(pk: UUID, expected_version: int | None) -> Interaction[int]:
    rows = yield Query("SELECT version FROM playbooks WHERE pk = %s FOR UPDATE", (str(pk),))
    if not rows:
        raise NoSuchPlaybook(str(pk))
    if expected_version is not None and rows[0][0] != expected_version:
        raise VersionConflict(rows[0][0])
    return int(rows[0][0])


def _changed(pk: UUID, actor: str, action: str, detail: dict[str, Any]) -> Interaction[int]:
    rows = yield Query(
        "UPDATE playbooks SET version = version + 1, updated_at = now() WHERE pk = %s "
        "RETURNING version, user_id, id", (str(pk),))
    version, owner, playbook_id = rows[0]
    yield Query("INSERT INTO playbook_audit (playbook_pk, owner_id, playbook_id, actor, action, "
                "detail, version) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (str(pk), str(owner), playbook_id, actor, action, json.dumps(detail), version))
    yield notify_change("playbook", f"{pk}:{version}")
    return int(version)


def create(box: SecretBox, user_id: UUID, playbook_id: str, fields: PlaybookFields,
           actor: str) -> Interaction[UUID]:
    try:
        rows = yield Query(
            "INSERT INTO playbooks (user_id, id, name, description, position) "
            "VALUES (%s, %s, %s, %s, %s) RETURNING pk",
            (str(user_id), playbook_id, fields.name, fields.description, fields.position))
    except psycopg2.errors.UniqueViolation:
        raise Duplicate(playbook_id) from None
    pk = UUID(str(rows[0][0]))
    yield Query("INSERT INTO playbook_audit (playbook_pk, owner_id, playbook_id, actor, action, "
                "detail, version) VALUES (%s, %s, %s, %s, 'create', %s, 1)",
                (str(pk), str(user_id), playbook_id, actor,
                 json.dumps({"name": fields.name})))
    yield notify_change("playbook", f"{pk}:1")
    return pk


def update_fields(pk: UUID, fields: PlaybookFields, expected_version: int | None,
                  actor: str) -> Interaction[int]:
    yield from _lock(pk, expected_version)
    yield Query("UPDATE playbooks SET name = %s, description = %s, position = %s WHERE pk = %s",
                (fields.name, fields.description, fields.position, str(pk)))
    return (yield from _changed(pk, actor, "update", attrs.asdict(fields)))


def delete(pk: UUID, expected_version: int | None, actor: str) -> Interaction[None]:
    version = yield from _lock(pk, expected_version)
    rows = yield Query("DELETE FROM playbooks WHERE pk = %s RETURNING user_id, id", (str(pk),))
    owner, playbook_id = rows[0]
    yield Query("INSERT INTO playbook_audit (playbook_pk, owner_id, playbook_id, actor, action, "
                "version) VALUES (%s, %s, %s, %s, 'delete', %s)",
                (str(pk), str(owner), playbook_id, actor, version + 1))
    yield notify_change("playbook", f"{pk}:{version + 1}")


def _write_server(box: SecretBox, pk: UUID, server: Server, position: int) -> Interaction[None]:
    try:
        yield Query(
            f"INSERT INTO playbook_servers ({_SERVER_COLUMNS}) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (str(pk), server.name, position, server.type, _server_config(box, server),
             server.disabled, server.prefix,
             list(server.include) if server.include is not None else None,
             list(server.exclude) if server.exclude is not None else None,
             server.expose_prompts, server.timeout_seconds, server.isolate_sessions))
    except psycopg2.errors.UniqueViolation:
        raise Duplicate(server.name) from None


def _next_position(table: str, pk: UUID) -> Interaction[int]:
    rows = yield Query(f"SELECT coalesce(max(position) + 1, 0) FROM {table} "
                       "WHERE playbook_pk = %s", (str(pk),))
    return int(rows[0][0])


def add_server(box: SecretBox, pk: UUID, server: Server, expected_version: int | None,
               actor: str) -> Interaction[int]:
    yield from _lock(pk, expected_version)
    position = yield from _next_position("playbook_servers", pk)
    yield from _write_server(box, pk, server, position)
    return (yield from _changed(pk, actor, "add_server", {"server": server.name,
                                                          "type": server.type}))


def replace_servers(box: SecretBox, pk: UUID, replacements: list[tuple[str, Server]],
                    expected_version: int | None, actor: str,
                    action: str = "update_server") -> Interaction[int]:
    """Replace each server ``name`` with its new value (which may be renamed), in place, as
    one change (one version, one audit row)."""
    yield from _lock(pk, expected_version)
    positions = []
    for name, _ in replacements:
        rows = yield Query("DELETE FROM playbook_servers WHERE playbook_pk = %s AND name = %s "
                           "RETURNING position", (str(pk), name))
        if not rows:
            raise NoSuchPart(name)
        positions.append(rows[0][0])
    for (_, server), position in zip(replacements, positions, strict=True):
        yield from _write_server(box, pk, server, position)
    detail: dict[str, Any] = {"servers": [name for name, _ in replacements]}
    renamed = {name: server.name for name, server in replacements if name != server.name}
    if renamed:
        detail["renamed"] = renamed
    return (yield from _changed(pk, actor, action, detail))


def remove_server(pk: UUID, name: str, expected_version: int | None,
                  actor: str) -> Interaction[int]:
    yield from _lock(pk, expected_version)
    rows = yield Query("DELETE FROM playbook_servers WHERE playbook_pk = %s AND name = %s "
                       "RETURNING name", (str(pk), name))
    if not rows:
        raise NoSuchPart(name)
    return (yield from _changed(pk, actor, "remove_server", {"server": name}))


def _write_prompt(pk: UUID, prompt: Prompt, position: int) -> Interaction[None]:
    try:
        yield Query(
            f"INSERT INTO playbook_prompts ({_PROMPT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (str(pk), prompt.name, position, prompt.title, prompt.description, prompt.body,
             json.dumps([attrs.asdict(a) for a in prompt.arguments])))
    except psycopg2.errors.UniqueViolation:
        raise Duplicate(prompt.name) from None


def add_prompt(pk: UUID, prompt: Prompt, expected_version: int | None,
               actor: str) -> Interaction[int]:
    yield from _lock(pk, expected_version)
    position = yield from _next_position("playbook_prompts", pk)
    yield from _write_prompt(pk, prompt, position)
    return (yield from _changed(pk, actor, "add_prompt", {"prompt": prompt.name}))


def replace_prompt(pk: UUID, name: str, prompt: Prompt, expected_version: int | None,
                   actor: str) -> Interaction[int]:
    yield from _lock(pk, expected_version)
    rows = yield Query("DELETE FROM playbook_prompts WHERE playbook_pk = %s AND name = %s "
                       "RETURNING position", (str(pk), name))
    if not rows:
        raise NoSuchPart(name)
    yield from _write_prompt(pk, prompt, rows[0][0])
    detail = {"prompt": name} | ({"renamed_to": prompt.name} if prompt.name != name else {})
    return (yield from _changed(pk, actor, "update_prompt", detail))


def remove_prompt(pk: UUID, name: str, expected_version: int | None,
                  actor: str) -> Interaction[int]:
    yield from _lock(pk, expected_version)
    rows = yield Query("DELETE FROM playbook_prompts WHERE playbook_pk = %s AND name = %s "
                       "RETURNING name", (str(pk), name))
    if not rows:
        raise NoSuchPart(name)
    return (yield from _changed(pk, actor, "remove_prompt", {"prompt": name}))


def replace_contents(box: SecretBox, pk: UUID, fields: PlaybookFields,
                     servers: tuple[Server, ...], prompts: tuple[Prompt, ...],
                     expected_version: int | None, actor: str,
                     action: str = "import") -> Interaction[int | None]:
    """Make the playbook exactly this (YAML import). None when nothing differed: no write,
    no version bump, no audit row — re-importing the same file changes nothing."""
    yield from _lock(pk, expected_version)
    current = yield from load(box, pk)
    assert current is not None
    if (current.fields, current.servers, current.prompts) == (fields, servers, prompts):
        return None
    yield Query("UPDATE playbooks SET name = %s, description = %s, position = %s WHERE pk = %s",
                (fields.name, fields.description, fields.position, str(pk)))
    yield Query("DELETE FROM playbook_servers WHERE playbook_pk = %s", (str(pk),))
    yield Query("DELETE FROM playbook_prompts WHERE playbook_pk = %s", (str(pk),))
    for position, server in enumerate(servers):
        yield from _write_server(box, pk, server, position)
    for position, prompt in enumerate(prompts):
        yield from _write_prompt(pk, prompt, position)
    return (yield from _changed(pk, actor, action, {
        "servers": [s.name for s in servers], "prompts": [p.name for p in prompts]}))
