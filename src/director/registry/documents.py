"""Registry servers in playbook documents (YAML): ``type: registry`` entries, and making them
servers again when a document is imported.

A registry server is written as its provenance and inputs, never as the command it runs::

    - name: weather
      type: registry
      registry:
        url: https://registry.modelcontextprotocol.io   # the registry it came from
        name: io.github.acme/weather                     # the entry
        version: 1.2.0                                   # always an exact version
        choice: package:0                                # optional: which package or remote
        inputs:                                          # optional: field id -> value
          env.API_KEY: {secret: true}                    # (secrets as env values are)
      prefix: w_                                         # and the usual common fields

Importing does not trust the document with what runs (``resolve``): the package, its
version and the command line come from the registry's own entry — the one the playbook already
holds when the server is unchanged (same name, registry, entry and version: no network), or
else the one fetched from ``REGISTRY_URL`` (a document naming another registry is refused).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

from director.accounts.validation import ValidationFailed
from director.playbooks import model
from director.playbooks.model import RegistrySource, SecretValue, Server
from director.registry import catalogue, install
from director.registry.catalogue import Entry

REGISTRY_FIELDS = ("url", "name", "version", "choice", "inputs")
#: The common fields a registry server takes besides its ``registry`` block.
COMMON_FIELDS = {"name", "type", "registry", "disabled", "prefix", "include", "exclude",
                 "expose_prompts", "timeout_seconds", "isolate_sessions"}
_INPUT_KEY = r"^[A-Za-z0-9_.-]{1,200}$"
UNRESOLVED = ""  # the recipe of a parsed server not yet checked against the registry


def parse_server(body: Mapping[str, Any], path: str) -> tuple[Server, str | None,
                                                              list[tuple[str, str]]]:
    """A ``type: registry`` entry (its nulls dropped): the server, unresolved (its recipe is
    ``UNRESOLVED``), the ``choice`` given, and the redacted inputs ``(key, path)``."""
    problems: dict[str, str] = {}
    unknown = sorted(set(body) - COMMON_FIELDS)
    problems.update({f"{path}{key}": "is not a known field of a registry server"
                     for key in unknown})
    block = body.get("registry")
    if not isinstance(block, dict):
        raise ValidationFailed({f"{path}registry": "must be a mapping with url, name, version "
                                                   "(and choice, inputs)"} | problems)
    problems.update({f"{path}registry.{key}": "is not a known field"
                     for key in sorted(set(block) - set(REGISTRY_FIELDS))})
    url, name, version = block.get("url"), block.get("name"), block.get("version")
    if not isinstance(url, str) or not url.startswith(("http://", "https://", "file:///")):
        problems[f"{path}registry.url"] = "must be the registry's URL"
    if not isinstance(name, str) or not catalogue.valid_name(name):
        problems[f"{path}registry.name"] = "must be a registry server name (namespace/name)"
    if not isinstance(version, str) or not version or len(version) > 255 or \
            version == "latest":
        problems[f"{path}registry.version"] = "must be the exact version installed"
    choice = block.get("choice")
    if choice is not None and not isinstance(choice, str):
        problems[f"{path}registry.choice"] = "must be package:N or remote:N"
    inputs, redacted = _inputs(block.get("inputs"), f"{path}registry.inputs", problems)
    common = {key: value for key, value in body.items()
              if key not in ("type", "registry") and key in COMMON_FIELDS}
    try:
        placeholder = model.parse_server({**common, "type": "stdio", "command": "-"},
                                         path=path)
    except ValidationFailed as failed:
        problems.update(failed.fields)
    if problems:
        raise ValidationFailed(problems)
    assert isinstance(url, str) and isinstance(name, str) and isinstance(version, str)
    source = RegistrySource(url, name, version, UNRESOLVED, inputs)
    return attrs.evolve(placeholder, command=None, registry=source), choice, redacted


def _inputs(value: Any, path: str, problems: dict[str, str],
            ) -> tuple[tuple[tuple[str, SecretValue], ...], list[tuple[str, str]]]:
    if value is None:
        return (), []
    if not isinstance(value, dict) or len(value) > install.MAX_INPUTS:
        problems[path] = f"must be a mapping of at most {install.MAX_INPUTS} field ids"
        return (), []
    items, redacted = [], []
    for key, item in value.items():
        where = f"{path}.{key}"
        if not isinstance(key, str) or not key or len(key) > 200 or \
                not all(c.isalnum() or c in "_.-" for c in key):
            problems[where] = "must be a field id such as env.API_KEY"
            continue
        if isinstance(item, dict):
            extra = set(item) - {"secret", "value"}
            if extra or item.get("secret") is not True:
                problems[where] = "must be a value or {secret: true, value: …}"
                continue
            if item.get("value") is None:
                redacted.append((key, where))
                items.append((key, SecretValue("", True)))
                continue
            item, secret = item["value"], True
        else:
            secret = False
        if not isinstance(item, str) or len(item) > install.MAX_VALUE or "\x00" in item:
            problems[where] = f"must be text of at most {install.MAX_VALUE} characters"
            continue
        items.append((key, SecretValue(item, secret)))
    return tuple(sorted(items)), redacted


def server_data(server: Server, include_secrets: bool) -> dict[str, Any]:
    """The ``registry`` block of an exported registry server."""
    source = server.registry
    assert source is not None
    block: dict[str, Any] = {"url": source.registry, "name": source.name,
                             "version": source.version}
    choice = _choice_of(source)
    if choice is not None:
        block["choice"] = choice
    if source.inputs:
        block["inputs"] = {key: item.value if not item.secret else
                           {"secret": True, "value": item.value} if include_secrets else
                           {"secret": True} for key, item in source.inputs}
    return block


def _choice_of(source: RegistrySource) -> str | None:
    """The recipe's kind, written so that an import from the registry picks the same option."""
    if source.recipe == UNRESOLVED:
        return None
    recipe = json.loads(source.recipe)
    return "remote" if recipe["kind"] == "remote" else None


# --- importing -----------------------------------------------------------------------------------


def _kept(server: Server, existing: Any) -> Server | None:
    """The stored registry server this document entry is, unchanged (no network needed)."""
    stored = existing.server(server.name) if existing is not None else None
    source, wanted = (stored.registry if stored is not None else None), server.registry
    if source is None or wanted is None:
        return None
    if (source.registry, source.name, source.version) != (wanted.registry, wanted.name,
                                                          wanted.version):
        return None
    return stored


def lookups(servers: tuple[Server, ...], existing: Any) -> list[tuple[str, str]]:
    """The ``(name, version)`` entries to fetch from the registry to import ``servers``."""
    return sorted({(server.registry.name, server.registry.version) for server in servers
                   if server.registry is not None and server.registry.recipe == UNRESOLVED
                   and _kept(server, existing) is None})


def resolve(servers: tuple[Server, ...], choices: Mapping[str, str | None], existing: Any,
            registry_url: str, entries: Mapping[tuple[str, str], Entry | str],
            path_of: Any) -> tuple[Server, ...]:
    """Every unresolved registry server made whole: its recipe from the stored server it is,
    or from ``entries`` (fetched; a text is why the registry could not give it). Problems
    raise ``ValidationFailed`` at the servers' paths."""
    problems: dict[str, str] = {}
    made = []
    for index, server in enumerate(servers):
        source = server.registry
        if source is None or source.recipe != UNRESOLVED:
            made.append(server)
            continue
        path = path_of(index)
        given = {key: item.value for key, item in source.inputs}
        try:
            kept = _kept(server, existing)
            if kept is not None:
                assert kept.registry is not None
                made.append(install.from_recipe(
                    kept.registry.registry, source.name, source.version,
                    json.loads(kept.registry.recipe), server, given))
                continue
            if source.registry != registry_url:
                raise install.InstallError({"registry.url": (
                    f"is not this daemon's REGISTRY_URL ({registry_url}): a new registry "
                    "server is installed from REGISTRY_URL only")})
            entry = entries[(source.name, source.version)]
            if isinstance(entry, str):
                raise install.InstallError({"registry.name": entry})
            choice = choices.get(server.name)
            if choice == "remote":
                choice = next((option.choice for option in install.options(entry)
                               if option.choice.startswith("remote:")), "remote:0")
            option = install.choose(entry, choice)
            assert option.recipe is not None
            made.append(install.from_recipe(registry_url, entry.name, entry.version,
                                            option.recipe, server, given))
        except ValidationFailed as failed:
            problems.update({f"{path}{key.replace('inputs.', 'registry.inputs.', 1)}"
                             if key.startswith("inputs.") else f"{path}{key}": message
                             for key, message in failed.fields.items()})
            made.append(server)
    if problems:
        raise ValidationFailed(problems)
    return tuple(made)


def unresolved(servers: tuple[Server, ...]) -> bool:
    return any(server.registry is not None and server.registry.recipe == UNRESOLVED
               for server in servers)


#: The JSON Schema of a ``type: registry`` server in a document.
def json_schema(common: Mapping[str, Any]) -> dict[str, Any]:
    secret = {"anyOf": [{"type": "string", "maxLength": install.MAX_VALUE},
                        {"type": "object", "additionalProperties": False,
                         "required": ["secret"],
                         "properties": {"secret": {"const": True},
                                        "value": {"type": ["string", "null"]}}}]}
    return {"type": "object", "additionalProperties": False,
            "required": ["name", "type", "registry"],
            "properties": {**common, "type": {"const": "registry"},
                           "isolate_sessions": {"type": ["boolean", "null"]},
                           "registry": {
                "type": "object", "additionalProperties": False,
                "required": ["url", "name", "version"],
                "properties": {"url": {"type": "string"},
                               "name": {"type": "string", "pattern": _NAME_PATTERN},
                               "version": {"type": "string", "minLength": 1,
                                           "maxLength": 255, "not": {"const": "latest"}},
                               "choice": {"type": ["string", "null"]},
                               "inputs": {"type": ["object", "null"],
                                          "maxProperties": install.MAX_INPUTS,
                                          "propertyNames": {"pattern": _INPUT_KEY},
                                          "additionalProperties": secret}}}}}


_NAME_PATTERN = "^[a-zA-Z0-9.-]{1,200}/[a-zA-Z0-9._-]{1,200}$"
