"""Playbooks as values: parsing and validating the JSON (or YAML) form, and rendering it.

A playbook bundles upstream servers and prompts. Everything here is pure: ``parse_*``
functions take decoded JSON, raise ``ValidationFailed`` naming every bad field (with a
JSON-pointer-ish path such as ``servers.github.url``), and return frozen values; ``*_json``
functions render them back. The same parsers serve the REST API and YAML import, so both
accept exactly the same documents.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs

from director.accounts.validation import ValidationFailed

SERVER_TYPES = ("stdio", "http", "sse")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
HEADER_NAME_PATTERN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
MAX_TEXT = 10_000
MAX_BODY = 100_000
MAX_ITEMS = 200
DEFAULT_TIMEOUT_SECONDS = 60.0


@attrs.frozen
class SecretValue:
    """A value the API shows only to its owner on request (env values, header values)."""

    value: str
    secret: bool = False


@attrs.frozen
class RegistrySource:
    """Where a server installed from an MCP Registry comes from, and the user's inputs.

    Only ``director.registry`` makes one (from an entry it fetched itself); no request body
    or document can hold one. The server's command, arguments, environment, URL and headers
    are computed from ``recipe`` and ``inputs`` (``director.registry.install.materialize``).
    """

    #: The ``REGISTRY_URL`` it was installed from.
    registry: str
    #: The entry's name (``io.github.acme/weather``) and version.
    name: str
    version: str
    #: The option installed, normalised (``install.recipe_text``: canonical JSON).
    recipe: str
    #: Field id → value (``env.API_KEY``, ``arg.path``, ...); secret ones sealed at rest.
    inputs: tuple[tuple[str, SecretValue], ...] = ()


@attrs.frozen
class Server:
    name: str
    type: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, SecretValue], ...] = ()
    cwd: str | None = None
    url: str | None = None
    headers: tuple[tuple[str, SecretValue], ...] = ()
    disabled: bool = False
    prefix: str = ""
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    expose_prompts: bool = False
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    isolate_sessions: bool = False
    #: Set for a server installed from a registry (its command, args, env, url and headers
    #: are then derived from it, never written directly).
    registry: RegistrySource | None = None


@attrs.frozen
class PromptArgument:
    name: str
    description: str = ""
    required: bool = False


@attrs.frozen
class Prompt:
    name: str
    body: str
    title: str = ""
    description: str = ""
    arguments: tuple[PromptArgument, ...] = ()


@attrs.frozen
class PlaybookFields:
    name: str
    description: str = ""
    position: int = 0


# --- small checkers -----------------------------------------------------------------------


def _text(value: Any, path: str, *, required: bool = False, limit: int = MAX_TEXT,
          allow_empty: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ValidationFailed({path: "must be a string"})
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise ValidationFailed({path: "must be valid Unicode text"})
    if "\x00" in value:
        raise ValidationFailed({path: "must not contain NUL characters"})
    if len(value) > limit:
        raise ValidationFailed({path: f"must be at most {limit} characters"})
    if not allow_empty and not value.strip():
        raise ValidationFailed({path: "must not be empty"})
    return value


def _name(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise ValidationFailed({path: "must be a string"})
    if not NAME_PATTERN.fullmatch(value):
        raise ValidationFailed({path: "must be 1-64 letters, digits, '.', '_' or '-', starting "
                                      "with a letter or digit"})
    return value


def server_name(value: Any, path: str) -> str:
    """A server's name (the rule ``parse_server`` applies), or ValidationFailed at ``path``."""
    return _name(value, path)


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ValidationFailed({path: "must be true or false"})
    return value


def _string_list(value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValidationFailed({path: "must be a list of strings"})
    if len(value) > MAX_ITEMS * 5:
        raise ValidationFailed({path: f"must have at most {MAX_ITEMS * 5} items"})
    return tuple(_text(item, f"{path}[{index}]", required=True, limit=4096)
                 for index, item in enumerate(value))


def _secret_map(value: Any, path: str, key_pattern: re.Pattern[str],
                key_rule: str) -> tuple[tuple[str, SecretValue], ...]:
    """``{"NAME": "value"}`` or ``{"NAME": {"value": "…", "secret": true}}``."""
    if not isinstance(value, dict):
        raise ValidationFailed({path: "must be an object"})
    if len(value) > MAX_ITEMS:
        raise ValidationFailed({path: f"must have at most {MAX_ITEMS} entries"})
    items = []
    for key, item in value.items():
        if not isinstance(key, str) or not key_pattern.fullmatch(key):
            raise ValidationFailed({f"{path}.{key}": key_rule})
        if isinstance(item, dict):
            unknown = set(item) - {"value", "secret"}
            if unknown:
                raise ValidationFailed({f"{path}.{key}.{sorted(unknown)[0]}": "is not a known "
                                                                             "field"})
            items.append((key, SecretValue(
                _text(item.get("value"), f"{path}.{key}.value", required=True, limit=8192),
                _bool(item.get("secret", False), f"{path}.{key}.secret"))))
        else:
            items.append((key, SecretValue(_text(item, f"{path}.{key}", required=True,
                                                 limit=8192))))
    return tuple(sorted(items))


def reject_unknown(body: Mapping[str, Any], allowed: set[str], path: str = "") -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ValidationFailed({f"{path}{name}": "is not a known field" for name in unknown})


def _refuse(fields: dict[str, str]) -> None:
    raise ValidationFailed(fields)


def _collect(checks: list[tuple[str, Any]]) -> None:
    """Run several independent checks and report every failure at once."""
    problems: dict[str, str] = {}
    for _, check in checks:
        try:
            check()
        except ValidationFailed as failed:
            problems.update(failed.fields)
    if problems:
        raise ValidationFailed(problems)


# --- playbooks ----------------------------------------------------------------------------


def slugify(name: str) -> str:
    """``My GitHub Tools!`` -> ``my-github-tools``; what the URLs use."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")
    return slug[:64].strip("-")


PLAYBOOK_FIELDS = {"name", "description", "position", "id"}


def parse_playbook_fields(body: Mapping[str, Any], base: PlaybookFields | None = None,
                          partial: bool = False) -> PlaybookFields:
    reject_unknown(body, PLAYBOOK_FIELDS | ({"version"} if partial else set()))
    fields = attrs.asdict(base) if base is not None else {"name": None, "description": "",
                                                          "position": 0}
    if "name" in body or not partial:
        fields["name"] = _text(body.get("name"), "name", required=True, limit=200,
                               allow_empty=False).strip()
    if "description" in body:
        fields["description"] = _text(body["description"], "description")
    if "position" in body:
        position = body["position"]
        if isinstance(position, float) and position.is_integer():
            position = int(position)  # JSON does not tell 2 from 2.0
        if not isinstance(position, int) or isinstance(position, bool) or not (
                -1_000_000 <= position <= 1_000_000):
            raise ValidationFailed({"position": "must be a whole number"})
        fields["position"] = position
    return PlaybookFields(**fields)


def playbook_id_from(body: Mapping[str, Any], name: str) -> str:
    """An explicit ``id`` (a slug), else one derived from the name."""
    if "id" in body and body["id"] is not None:
        value = body["id"]
        if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?",
                                                          value):
            raise ValidationFailed({"id": "must be 1-64 lower-case letters, digits and '-'"})
        return value
    slug = slugify(name)
    if not slug:
        raise ValidationFailed({"name": "must contain a letter or digit (it names the URL)"})
    return slug


# --- servers ------------------------------------------------------------------------------

SERVER_FIELDS = {"name", "type", "command", "args", "env", "cwd", "url", "headers", "disabled",
                 "prefix", "include", "exclude", "expose_prompts", "timeout_seconds",
                 "isolate_sessions"}


#: What a registry server's recipe and inputs decide: never edited directly.
REGISTRY_DERIVED = {"command", "args", "env", "cwd", "url", "headers"}


def parse_server(body: Mapping[str, Any], base: Server | None = None, path: str = "") -> Server:
    """A whole server (``base`` None) or ``base`` with ``body``'s fields changed."""
    if not isinstance(body, Mapping):
        raise ValidationFailed({path.rstrip(".") or "body": "must be an object"})
    reject_unknown(body, SERVER_FIELDS, path)
    values: dict[str, Any] = attrs.asdict(base, recurse=False) if base is not None else {}
    server_type = _server_type(body, base, values.get("type"), path)
    values["type"] = server_type
    _collect(_server_checks(body, base, values, path, server_type))
    if values.get("include") is not None and values.get("exclude") is not None:
        raise ValidationFailed({f"{path}include": "cannot be combined with exclude; use one"})
    return Server(**values)


def _server_type(body: Mapping[str, Any], base: Server | None, current: Any, path: str) -> Any:
    """The server's type, once ``body`` changes nothing a registry entry or the type fixes."""
    server_type = body.get("type", current)
    if base is not None and base.registry is not None:
        _refuse_registry_derived(body, base.registry, path)
    if base is not None and "type" in body and body["type"] != base.type:
        raise ValidationFailed({f"{path}type": "cannot change; remove the server and add it "
                                               "again"})
    if server_type not in SERVER_TYPES:
        raise ValidationFailed({f"{path}type": "must be one of stdio, http, sse"})
    return server_type


def _refuse_registry_derived(body: Mapping[str, Any], registry: RegistrySource,
                             path: str) -> None:
    derived = sorted(REGISTRY_DERIVED & {key for key in body if body[key] is not None})
    if derived:
        raise ValidationFailed({f"{path}{key}": (
            f"comes from the registry entry {registry.name} {registry.version}; "
            "change its inputs by updating it from the registry") for key in derived})


Check = tuple[str, Callable[[], None]]
Parsers = tuple[tuple[str, Callable[[Any, str], Any]], ...]


def _assign(values: dict[str, Any], name: str, parse: Callable[[], Any]) -> Check:
    """A check for ``_collect`` that stores what ``parse`` returns as ``values[name]``."""
    return name, lambda: values.__setitem__(name, parse())


def _given(body: Mapping[str, Any], values: dict[str, Any], path: str, parsers: Parsers
           ) -> list[Check]:
    """A check for each of ``parsers``' fields that ``body`` has, in the table's order."""
    return [_field(body, values, path, name, parse) for name, parse in parsers if name in body]


def _field(body: Mapping[str, Any], values: dict[str, Any], path: str, name: str,
           parse: Callable[[Any, str], Any]) -> Check:
    return _assign(values, name, lambda: parse(body[name], f"{path}{name}"))


def _server_checks(body: Mapping[str, Any], base: Server | None, values: dict[str, Any],
                   path: str, server_type: str) -> list[Check]:
    """Every field's check, in the order the problems are reported."""
    checks: list[Check] = []
    if base is None or "name" in body:
        checks.append(_assign(values, "name", lambda: _name(body.get("name"), f"{path}name")))
    checks += _inapplicable(body, path, server_type)
    if server_type == "stdio":
        if base is None or "command" in body:
            checks.append(_assign(values, "command", lambda: _text(
                body.get("command"), f"{path}command", required=True, limit=4096,
                allow_empty=False)))
        checks += _given(body, values, path, _STDIO_PARSERS)
    else:
        if base is None or "url" in body:
            checks.append(_assign(values, "url", lambda: _url(body.get("url"), f"{path}url")))
        checks += _given(body, values, path, _HTTP_PARSERS)
    return checks + _given(body, values, path, _COMMON_PARSERS)


def _inapplicable(body: Mapping[str, Any], path: str, server_type: str) -> list[Check]:
    """A refusal for each field given that belongs to the other kind of server."""
    stdio_only, http_only = ("command", "args", "env", "cwd", "isolate_sessions"), ("url",
                                                                                     "headers")
    return [_refusal(name, f"{path}{name}", f"does not apply to a {server_type} server")
            for name in (stdio_only if server_type != "stdio" else http_only)
            if name in body and body[name] is not None]


def _refusal(name: str, where: str, problem: str) -> Check:
    return name, lambda: _refuse({where: problem})


def _url(value: Any, path: str) -> str:
    url = _text(value, path, required=True, limit=2048, allow_empty=False).strip()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not 0-65535
    except ValueError:
        raise ValidationFailed({path: "must be an http(s) URL with a valid host and port"}) \
            from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationFailed({path: "must be an http(s) URL"})
    return url


def _cwd(value: Any, path: str) -> str | None:
    if value is None:
        return None
    text = _text(value, path, limit=4096)
    if not text.startswith("/"):
        raise ValidationFailed({path: "must be an absolute path"})
    return text


def _timeout(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 3600:
        raise ValidationFailed({path: "must be a number of seconds from 0 to 3600"})
    return float(value)


def _env(value: Any, path: str) -> tuple[tuple[str, SecretValue], ...]:
    return _secret_map(value, path, ENV_NAME_PATTERN, "must be an environment variable name")


def _headers(value: Any, path: str) -> tuple[tuple[str, SecretValue], ...]:
    return _secret_map(value, path, HEADER_NAME_PATTERN, "must be an HTTP header name")


def _prefix(value: Any, path: str) -> str:
    return _text(value, path, limit=64)


def _optional_list(value: Any, path: str) -> tuple[str, ...] | None:
    return None if value is None else _string_list(value, path)


#: How each optional field is parsed, in the order its problems are reported.
_STDIO_PARSERS: Parsers = (
    ("args", _string_list), ("env", _env), ("cwd", _cwd), ("isolate_sessions", _bool))
_HTTP_PARSERS: Parsers = (("headers", _headers),)
_COMMON_PARSERS: Parsers = (
    ("disabled", _bool), ("expose_prompts", _bool), ("prefix", _prefix),
    ("include", _optional_list), ("exclude", _optional_list), ("timeout_seconds", _timeout))


# --- prompts ------------------------------------------------------------------------------

PROMPT_FIELDS = {"name", "title", "description", "body", "arguments"}


def parse_prompt(body: Mapping[str, Any], base: Prompt | None = None, path: str = "") -> Prompt:
    if not isinstance(body, Mapping):
        raise ValidationFailed({path.rstrip(".") or "body": "must be an object"})
    reject_unknown(body, PROMPT_FIELDS, path)
    values: dict[str, Any] = attrs.asdict(base, recurse=False) if base is not None else {}
    checks: list[tuple[str, Any]] = []
    if base is None or "name" in body:
        checks.append(("name", lambda: values.__setitem__("name", _name(body.get("name"),
                                                                        f"{path}name"))))
    if base is None or "body" in body:
        checks.append(("body", lambda: values.__setitem__("body", _text(
            body.get("body"), f"{path}body", required=True, limit=MAX_BODY,
            allow_empty=False))))
    for name in ("title", "description"):
        if name in body:
            checks.append((name, lambda n=name: values.__setitem__(n, _text(body[n],
                                                                            f"{path}{n}"))))
    if "arguments" in body:
        checks.append(("arguments", lambda: values.__setitem__("arguments", _arguments(
            body["arguments"], f"{path}arguments"))))
    _collect(checks)
    return Prompt(**values)


def _arguments(value: Any, path: str) -> tuple[PromptArgument, ...]:
    if not isinstance(value, list) or len(value) > 50:
        raise ValidationFailed({path: "must be a list of at most 50 arguments"})
    arguments, seen = [], set()
    for index, item in enumerate(value):
        where = f"{path}[{index}]"
        if not isinstance(item, dict):
            raise ValidationFailed({where: "must be an object"})
        reject_unknown(item, {"name", "description", "required"}, f"{where}.")
        name = _name(item.get("name"), f"{where}.name")
        if name in seen:
            raise ValidationFailed({f"{where}.name": f"repeats the argument {name!r}"})
        seen.add(name)
        arguments.append(PromptArgument(name, _text(item.get("description"),
                                                    f"{where}.description"),
                                        _bool(item.get("required", False), f"{where}.required")))
    return tuple(arguments)


# --- rendering ----------------------------------------------------------------------------


def _render_map(items: tuple[tuple[str, SecretValue], ...], reveal: bool) -> dict[str, Any]:
    rendered: dict[str, Any] = {}
    for key, item in items:
        if not item.secret:
            rendered[key] = item.value
        else:
            rendered[key] = {"secret": True, "value": item.value if reveal else None}
    return rendered


def server_json(server: Server, reveal_secrets: bool = False) -> dict[str, Any]:
    data: dict[str, Any] = {"name": server.name, "type": server.type}
    if server.type == "stdio":
        data |= {"command": server.command, "args": list(server.args),
                 "env": _render_map(server.env, reveal_secrets), "cwd": server.cwd,
                 "isolate_sessions": server.isolate_sessions}
    else:
        data |= {"url": server.url, "headers": _render_map(server.headers, reveal_secrets)}
    data |= {"disabled": server.disabled, "prefix": server.prefix,
             "include": list(server.include) if server.include is not None else None,
             "exclude": list(server.exclude) if server.exclude is not None else None,
             "expose_prompts": server.expose_prompts,
             "timeout_seconds": server.timeout_seconds}
    if server.registry is not None:
        data["registry"] = registry_json(server.registry, reveal_secrets)
    return data


def registry_json(source: RegistrySource, reveal_secrets: bool = False) -> dict[str, Any]:
    """A registry server's provenance and inputs, as the API shows them."""
    return {"registry": source.registry, "name": source.name, "version": source.version,
            "inputs": _render_map(source.inputs, reveal_secrets)}


def prompt_json(prompt: Prompt) -> dict[str, Any]:
    return {"name": prompt.name, "title": prompt.title, "description": prompt.description,
            "body": prompt.body,
            "arguments": [attrs.asdict(argument) for argument in prompt.arguments]}
