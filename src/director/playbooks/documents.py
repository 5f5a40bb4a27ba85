"""Playbooks as YAML documents: what ``director playbooks export|import`` and
``/api/v1/playbooks/{id}/export|import`` read and write, so that playbooks can live in git.

The schema (version 1)::

    version: 1                      # required; the only version this code reads
    id: github-tools                # optional; else derived from the name (as the API does)
    name: GitHub tools              # required
    description: ...                # optional, default ""
    position: 0                     # optional, default 0 (order in lists)
    servers:                        # optional, default none
      - name: github                # required: 1-64 letters, digits, '.', '_', '-'
        type: stdio                 # required: stdio | http | sse
        command: npx                # stdio: required
        args: [-y, server-github]   # stdio: default []
        env:                        # stdio: default {}; a value is a string, or a secret:
          GITHUB_TOKEN: {secret: true, value: ghp_...}
        cwd: /srv/tools             # stdio: absolute path, default none
        isolate_sessions: false     # stdio: default false
        # url: https://...          # http/sse: required
        # headers: {...}            # http/sse: like env, default {}
        disabled: false             # default false
        prefix: ""                  # default "" (prepended to tool names)
        include: [a, b]             # default none (all tools); or exclude, never both
        exclude: [c]                # default none
        expose_prompts: false       # default false
        timeout_seconds: 60.0       # default 60 (0 < t <= 3600)
      - name: weather               # a server installed from the registry: its provenance
        type: registry              # and inputs, never its command (director.registry.
        registry:                   # documents: importing takes what runs from the
          url: https://registry.modelcontextprotocol.io   # registry's own entry)
          name: io.github.acme/weather
          version: 1.2.0
          inputs: {env.API_KEY: {secret: true}}
    prompts:                        # optional, default none
      - name: review                # required
        title: ...                  # default ""
        description: ...            # default ""
        body: |                     # required
          Review {pr}...
        arguments:                  # default []
          - {name: pr, description: ..., required: true}

``null`` for a known key means the same as leaving the key out. The defaults above are part of
version 1 and do not change within it, which is why ``export_document`` leaves out every field
at its default: the files stay short, and their meaning stable.

Secrets (env and header values marked ``secret: true``) are written only when asked for
(``include_secrets``); otherwise as ``{secret: true}`` with no value. Importing such a redacted
entry keeps the value stored for that server and key, and is refused (naming the path) when
there is none.

``parse_document`` validates the whole document with the same parsers as the REST API
(``director.playbooks.model``) before anything is written, and reports every problem with its
path (``servers[0].url``) and its line and column in the text. Only plain data is read (YAML's
safe loader; aliases, merge keys and tags beyond the standard ones are refused) and documents are
capped at ``MAX_DOCUMENT_BYTES``. The YAML text itself is read and written by
``director.playbooks.yaml_text``, imported only then.

Round trip: ``export_document`` is deterministic, and export → import → export gives the same
text and the same playbook.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar
from uuid import UUID

import attrs

from director.accounts.validation import ValidationFailed
from director.crypto import SecretBox
from director.db.interactions import Interaction
from director.playbooks import model, store
from director.playbooks.model import PlaybookFields, Prompt, SecretValue, Server
from director.playbooks.problems import ROOT, DocumentInvalid, Locator, child_path
from director.playbooks.store import Playbook
from director.registry import documents as registry_documents

DOCUMENT_VERSION = 1
MAX_DOCUMENT_BYTES = 1024 * 1024
MAX_SERVERS = 500
MAX_PROMPTS = 500
#: Version 1's default timeout, fixed here rather than taken from the model, so that a
#: document that leaves it out keeps its meaning whatever the model's default becomes.
DEFAULT_TIMEOUT_SECONDS = 60.0

TOP_FIELDS = ("version", "id", "name", "description", "position", "servers", "prompts")
SERVER_FIELDS = ("name", "type", "command", "args", "env", "cwd", "isolate_sessions", "url",
                 "headers", "disabled", "prefix", "include", "exclude", "expose_prompts",
                 "timeout_seconds")
PROMPT_FIELDS = ("name", "title", "description", "body", "arguments")
ARGUMENT_FIELDS = ("name", "description", "required")
SECRET_FIELDS = ("secret", "value")
_REDACTED = ""  # stands in for a redacted secret until with_stored_secrets fills it


# --- errors -------------------------------------------------------------------------------


class DocumentTooLarge(DocumentInvalid):
    def __init__(self, size: int) -> None:
        super().__init__({ROOT: f"the document is larger than {MAX_DOCUMENT_BYTES} bytes "
                                f"({size} bytes or more)"})


def _decode(document: str | bytes) -> str:
    if isinstance(document, str):
        if len(document) > MAX_DOCUMENT_BYTES:  # characters: at least as many bytes
            raise DocumentTooLarge(len(document))
        size = len(document.encode("utf-8", "surrogatepass"))
        if size > MAX_DOCUMENT_BYTES:
            raise DocumentTooLarge(size)
        return document
    if len(document) > MAX_DOCUMENT_BYTES:
        raise DocumentTooLarge(len(document))
    try:
        return document.decode("utf-8")
    except UnicodeDecodeError as error:
        before = document[:error.start].decode("utf-8", "replace")
        line = before.count("\n") + 1
        column = len(before) - (before.rfind("\n") + 1) + 1
        raise DocumentInvalid({ROOT: "is not valid UTF-8 text"}, {ROOT: (line, column)}) \
            from None


# --- parsing --------------------------------------------------------------------------------


@attrs.frozen
class RedactedSecret:
    """A secret written as ``{secret: true}``: its value is to be kept from the stored one."""

    server: str
    field: str  # "env" or "headers"
    key: str
    path: str


@attrs.frozen
class ParsedPlaybook:
    """A valid document, as values ready for ``store.replace_contents``."""

    id: str
    fields: PlaybookFields
    servers: tuple[Server, ...] = ()
    prompts: tuple[Prompt, ...] = ()
    redacted: tuple[RedactedSecret, ...] = ()
    locator: Locator = attrs.field(factory=Locator, eq=False, repr=False)
    #: Registry servers' ``choice`` by server name (used when they are fetched anew).
    registry_choices: Mapping[str, str | None] = attrs.field(factory=dict, eq=False,
                                                             repr=False)

    @property
    def name(self) -> str:
        return self.fields.name

    @property
    def description(self) -> str:
        return self.fields.description

    @property
    def position(self) -> int:
        return self.fields.position

    @staticmethod
    def server_path(index: int) -> str:
        """The prefix of server ``index``'s fields in error paths (rails use it too)."""
        return f"servers[{index}]."

    def invalid(self, fields: Mapping[str, str]) -> DocumentInvalid:
        """Problems found later (rails, missing stored secrets), located in the document."""
        return self.locator.invalid(fields)

    def same_as(self, playbook: Playbook | None) -> bool:
        return playbook is not None and (playbook.fields, playbook.servers, playbook.prompts) \
            == (self.fields, self.servers, self.prompts)

    def with_stored_secrets(self, existing: Playbook | None) -> ParsedPlaybook:
        """Fill each redacted secret with the value stored for that server and key (of the
        playbook this document replaces), or refuse the document naming every one missing."""
        if not self.redacted:
            return self
        missing: dict[str, str] = {}
        filled: dict[tuple[str, str, str], str] = {}
        for secret in self.redacted:
            stored = existing.server(secret.server) if existing is not None else None
            value = dict(_secret_items(stored, secret.field)).get(secret.key) \
                if stored is not None else None
            if value is None:
                why = (f"no playbook {self.id!r} exists yet" if existing is None
                       else f"playbook {self.id!r} has no {secret.field} {secret.key!r} for "
                            f"server {secret.server!r}")
                missing[secret.path] = (
                    "is a secret without a value ({secret: true}) and there is no stored value "
                    f"to keep ({why}); write the value, or import a document exported with "
                    "its secrets")
            else:
                filled[(secret.server, secret.field, secret.key)] = value.value
        if missing:
            raise self.invalid(missing)

        def fill(server: Server, field: str) -> tuple[tuple[str, SecretValue], ...]:
            return tuple((key, SecretValue(filled[(server.name, field, key)], True)
                          if (server.name, field, key) in filled else item)
                         for key, item in getattr(server, field))

        servers = tuple(attrs.evolve(s, env=fill(s, "env"), headers=fill(s, "headers"),
                                     registry=None if s.registry is None else attrs.evolve(
                                         s.registry, inputs=tuple(
                                             (key, SecretValue(filled[(s.name, "inputs", key)],
                                                               True)
                                              if (s.name, "inputs", key) in filled else item)
                                             for key, item in s.registry.inputs)))
                        for s in self.servers)
        return attrs.evolve(self, servers=servers, redacted=())

    def registry_lookups(self, existing: Playbook | None) -> list[tuple[str, str]]:
        """The registry entries ``(name, version)`` to fetch before ``with_registry``."""
        return registry_documents.lookups(self.servers, existing)

    def with_registry(self, existing: Playbook | None, registry_url: str,
                      entries: Mapping[tuple[str, str], Any]) -> ParsedPlaybook:
        """Registry servers made whole (``director.registry.documents.resolve``): after
        ``with_stored_secrets``, with the entries ``registry_lookups`` named (an ``Entry``,
        or the text of why the registry could not give it)."""
        if not registry_documents.unresolved(self.servers):
            return self
        try:
            servers = registry_documents.resolve(self.servers, self.registry_choices,
                                                 existing, registry_url, entries,
                                                 self.server_path)
        except ValidationFailed as failed:
            raise self.invalid(failed.fields) from None
        return attrs.evolve(self, servers=servers)


def _secret_items(server: Server, field: str) -> tuple[tuple[str, SecretValue], ...]:
    """A stored server's env or headers, or (``inputs``) its registry inputs."""
    if field == "inputs":
        return server.registry.inputs if server.registry is not None else ()
    items: tuple[tuple[str, SecretValue], ...] = getattr(server, field, ())
    return items


def _known(body: Mapping[str, Any], allowed: Sequence[str], path: str,
           problems: dict[str, str]) -> dict[str, Any]:
    """``body`` without null values of known keys (null means "not given"); unknown keys are
    problems."""
    kept = {}
    for key, value in body.items():
        if key not in allowed:
            problems[child_path(path, key)] = "is not a known field"
        elif value is not None:
            kept[key] = value
    return kept


def _attempt(problems: dict[str, str], parse: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return parse(*args, **kwargs)
    except ValidationFailed as failed:
        problems.update(failed.fields)
        return None


def _list(data: Mapping[str, Any], key: str, limit: int, problems: dict[str, str]) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        problems[key] = "must be a list"
        return []
    if len(value) > limit:
        problems[key] = f"must have at most {limit} items"
        return []
    return value


def _strict_names(server: Server, path: str, problems: dict[str, str]) -> None:
    """The model matches names with ``re.match`` and ``$``, which lets one trailing line break
    through; documents refuse it (a header name ending in a line break is an injection)."""
    for field in ("env", "headers"):
        for key, _ in getattr(server, field):
            if key.endswith("\n"):
                problems[f"{path}{field}.{key}"] = "the name must not end with a line break"
    if server.name.endswith("\n"):
        problems[f"{path}name"] = "must not end with a line break"


def _server(item: Any, index: int, problems: dict[str, str],
            redacted: list[RedactedSecret], choices: dict[str, str | None]) -> Server | None:
    path = ParsedPlaybook.server_path(index)
    if not isinstance(item, dict):
        problems[path.rstrip(".")] = "must be a mapping (a server)"
        return None
    if item.get("type") == "registry":
        try:
            server, choice, hidden = registry_documents.parse_server(
                {key: value for key, value in item.items() if value is not None}, path)
        except ValidationFailed as failed:
            problems.update(failed.fields)
            return None
        choices[server.name] = choice
        redacted.extend(RedactedSecret(server.name, "inputs", key, where)
                        for key, where in hidden)
        return server
    body = _known(item, SERVER_FIELDS, path.rstrip("."), problems)
    found: list[RedactedSecret] = []
    for field in ("env", "headers"):
        entries = body.get(field)
        if not isinstance(entries, dict):
            continue
        entries = dict(entries)
        for key, entry in entries.items():
            if not isinstance(entry, dict):
                continue
            entry = {k: v for k, v in entry.items() if not (v is None and k in SECRET_FIELDS)}
            if entry.get("secret") is True and "value" not in entry:
                entry["value"] = _REDACTED
                found.append(RedactedSecret(str(item.get("name")), field, key,
                                            f"{path}{field}.{key}"))
            entries[key] = entry
        body[field] = entries
    server = _attempt(problems, model.parse_server, body, path=path)
    if server is None:
        return None
    if "timeout_seconds" not in body:
        server = attrs.evolve(server, timeout_seconds=DEFAULT_TIMEOUT_SECONDS)
    _strict_names(server, path, problems)
    redacted.extend(found)
    return server


def _prompt(item: Any, index: int, problems: dict[str, str]) -> Prompt | None:
    path = f"prompts[{index}]"
    if not isinstance(item, dict):
        problems[path] = "must be a mapping (a prompt)"
        return None
    body = _known(item, PROMPT_FIELDS, path, problems)
    arguments = body.get("arguments")
    if isinstance(arguments, list):
        body["arguments"] = [
            _known(argument, ARGUMENT_FIELDS, f"{path}.arguments[{position}]", problems)
            if isinstance(argument, dict) else argument
            for position, argument in enumerate(arguments)]
    prompt = _attempt(problems, model.parse_prompt, body, path=f"{path}.")
    if prompt is not None:
        names = [(f"{path}.name", prompt.name)] + [
            (f"{path}.arguments[{index}].name", argument.name)
            for index, argument in enumerate(prompt.arguments)]
        for where, name in names:
            if name.endswith("\n"):
                problems[where] = "must not end with a line break"
    return prompt


def _unique(names: list[tuple[int, str]], what: str, problems: dict[str, str]) -> None:
    first: dict[str, int] = {}
    for index, name in names:
        if name in first:
            problems[f"{what}s[{index}].name"] = (f"repeats the {what} name {name!r} "
                                                  f"(also {what}s[{first[name]}])")
        else:
            first[name] = index


def parse_document(document: str | bytes) -> ParsedPlaybook:
    """A playbook document, validated in full, or ``DocumentInvalid`` naming every problem.

    Redacted secrets (``{secret: true}``) are still to be filled from the stored playbook:
    see ``ParsedPlaybook.with_stored_secrets``.
    """
    from director.playbooks import yaml_text  # PyYAML only when a document is read (idle RSS)

    data, locator = yaml_text.load(_decode(document))
    if not isinstance(data, dict):
        raise locator.invalid({ROOT: "must be a mapping with version, name, servers and "
                                     "prompts"})
    problems: dict[str, str] = {}
    version_problem = _version_problem(data)
    if version_problem is not None:  # another version's document: the rest would only be noise
        raise locator.invalid({"version": version_problem})
    top = _known(data, TOP_FIELDS, ROOT, problems)
    fields, playbook_id = _playbook_fields(top, problems)
    redacted: list[RedactedSecret] = []
    choices: dict[str, str | None] = {}
    servers = [_server(item, index, problems, redacted, choices)
               for index, item in enumerate(_list(top, "servers", MAX_SERVERS, problems))]
    prompts = [_prompt(item, index, problems)
               for index, item in enumerate(_list(top, "prompts", MAX_PROMPTS, problems))]
    _unique(_names(servers), "server", problems)
    _unique(_names(prompts), "prompt", problems)
    if problems:
        raise locator.invalid(problems)
    assert fields is not None and playbook_id is not None
    return ParsedPlaybook(playbook_id, fields, _present(servers), _present(prompts),
                          tuple(redacted), locator, choices)


def _version_problem(data: Mapping[str, Any]) -> str | None:
    version = data.get("version")
    if "version" not in data or version is None:
        return f"is required: write `version: {DOCUMENT_VERSION}` first"
    if isinstance(version, bool) or not isinstance(version, int) \
            or version != DOCUMENT_VERSION:
        return (f"must be {DOCUMENT_VERSION}: this Director reads version "
                f"{DOCUMENT_VERSION} playbook documents only")
    return None


def _playbook_fields(top: Mapping[str, Any], problems: dict[str, str]
                     ) -> tuple[PlaybookFields | None, str | None]:
    """The playbook's own fields and its id, each None when ``problems`` says why."""
    body = {key: top[key] for key in ("id", "name", "description", "position") if key in top}
    fields = _attempt(problems, model.parse_playbook_fields, body)
    playbook_id = None
    if fields is not None:
        playbook_id = _attempt(problems, model.playbook_id_from, body, fields.name)
    elif "id" in body:  # still check an explicit id
        _attempt(problems, model.playbook_id_from, body, "-")
    return fields, playbook_id


_Named = TypeVar("_Named", Server, Prompt)


def _names(items: list[_Named | None]) -> list[tuple[int, str]]:
    return [(index, item.name) for index, item in enumerate(items) if item is not None]


def _present(items: list[_Named | None]) -> tuple[_Named, ...]:
    return tuple(item for item in items if item is not None)


# --- exporting ------------------------------------------------------------------------------


class PlaybookLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def position(self) -> int: ...
    @property
    def servers(self) -> tuple[Server, ...]: ...
    @property
    def prompts(self) -> tuple[Prompt, ...]: ...


def _secret_map(items: tuple[tuple[str, SecretValue], ...], include_secrets: bool
                ) -> dict[str, Any]:
    rendered: dict[str, Any] = {}
    for key, item in items:
        if not item.secret:
            rendered[key] = item.value
        elif include_secrets:
            rendered[key] = {"secret": True, "value": item.value}
        else:
            rendered[key] = {"secret": True}
    return rendered


def _server_data(server: Server, include_secrets: bool) -> dict[str, Any]:
    data: dict[str, Any] = {"name": server.name, "type": server.type}
    if server.registry is not None:  # its provenance, never the command it derives
        data = {"name": server.name, "type": "registry",
                "registry": registry_documents.server_data(server, include_secrets)}
        if server.isolate_sessions:
            data["isolate_sessions"] = True
    elif server.type == "stdio":
        data["command"] = server.command
        if server.args:
            data["args"] = list(server.args)
        if server.env:
            data["env"] = _secret_map(server.env, include_secrets)
        if server.cwd is not None:
            data["cwd"] = server.cwd
        if server.isolate_sessions:
            data["isolate_sessions"] = True
    else:
        data["url"] = server.url
        if server.headers:
            data["headers"] = _secret_map(server.headers, include_secrets)
    if server.disabled:
        data["disabled"] = True
    if server.prefix:
        data["prefix"] = server.prefix
    if server.include is not None:
        data["include"] = list(server.include)
    if server.exclude is not None:
        data["exclude"] = list(server.exclude)
    if server.expose_prompts:
        data["expose_prompts"] = True
    if server.timeout_seconds != DEFAULT_TIMEOUT_SECONDS:
        data["timeout_seconds"] = server.timeout_seconds
    return data


def _prompt_data(prompt: Prompt) -> dict[str, Any]:
    data: dict[str, Any] = {"name": prompt.name}
    if prompt.title:
        data["title"] = prompt.title
    if prompt.description:
        data["description"] = prompt.description
    data["body"] = prompt.body
    if prompt.arguments:
        data["arguments"] = []
        for argument in prompt.arguments:
            entry: dict[str, Any] = {"name": argument.name}
            if argument.description:
                entry["description"] = argument.description
            if argument.required:
                entry["required"] = True
            data["arguments"].append(entry)
    return data


def document_data(playbook: PlaybookLike, include_secrets: bool = False) -> dict[str, Any]:
    """The document as plain data, keys in schema order, fields at their default left out."""
    data: dict[str, Any] = {"version": DOCUMENT_VERSION, "id": playbook.id,
                            "name": playbook.name}
    if playbook.description:
        data["description"] = playbook.description
    if playbook.position:
        data["position"] = playbook.position
    if playbook.servers:
        data["servers"] = [_server_data(s, include_secrets) for s in playbook.servers]
    if playbook.prompts:
        data["prompts"] = [_prompt_data(p) for p in playbook.prompts]
    return data


def export_document(playbook: PlaybookLike, include_secrets: bool = False) -> str:
    """The playbook as a version 1 YAML document (deterministic: same playbook, same text)."""
    from director.playbooks import yaml_text  # PyYAML only when a document is written

    return yaml_text.dump(document_data(playbook, include_secrets))


# --- importing ------------------------------------------------------------------------------


def describe_changes(existing: Playbook | None, parsed: ParsedPlaybook) -> dict[str, Any]:
    """What importing ``parsed`` changes: names only, never values."""
    before_fields = attrs.asdict(existing.fields) if existing is not None else {}
    after_fields = attrs.asdict(parsed.fields)
    changed = [name for name in ("name", "description", "position")
               if before_fields.get(name) != after_fields[name]]

    def parts(before: Sequence[Any], after: Sequence[Any]) -> dict[str, Any]:
        old = {part.name: part for part in before}
        new = {part.name: part for part in after}
        common_old = [name for name in old if name in new]
        common_new = [name for name in new if name in old]
        return {"added": [name for name in new if name not in old],
                "removed": [name for name in old if name not in new],
                "changed": [name for name in common_new if old[name] != new[name]],
                "reordered": common_old != common_new}

    return {"fields": changed,
            "servers": parts(existing.servers if existing else (), parsed.servers),
            "prompts": parts(existing.prompts if existing else (), parsed.prompts)}


def summarise_changes(changes: Mapping[str, Any]) -> str:
    """``servers added: a, b; prompts changed: c`` (or ``no changes``)."""
    said = []
    if changes["fields"]:
        said.append("fields changed: " + ", ".join(changes["fields"]))
    for part in ("servers", "prompts"):
        for kind in ("added", "removed", "changed"):
            if changes[part][kind]:
                said.append(f"{part} {kind}: " + ", ".join(changes[part][kind]))
        if changes[part]["reordered"]:
            said.append(f"{part} reordered")
    return "; ".join(said) or "no changes"


@attrs.frozen
class Imported:
    pk: UUID
    result: str  # "created", "updated" or "unchanged"
    version: int


def import_playbook(box: SecretBox, user_id: UUID, parsed: ParsedPlaybook,
                    expected_version: int | None, actor: str) -> Interaction[Imported]:
    """Create the user's playbook ``parsed.id`` or make it exactly ``parsed``, in one
    transaction. ``expected_version`` is the version the caller checked the document against
    (its redacted secrets were filled from it), or None when it found no such playbook: a
    playbook changed, created or deleted meanwhile raises ``store.VersionConflict``,
    ``store.Duplicate`` or ``store.NoSuchPlaybook``, and nothing is written."""
    assert not parsed.redacted, "fill redacted secrets first (with_stored_secrets)"
    assert not registry_documents.unresolved(parsed.servers), "resolve first (with_registry)"
    pk = yield from store.find_pk(user_id, parsed.id)
    if expected_version is None:
        if pk is not None:
            raise store.Duplicate(parsed.id)
        pk = yield from store.create(box, user_id, parsed.id, parsed.fields, actor)
        version = yield from store.replace_contents(box, pk, parsed.fields, parsed.servers,
                                                    parsed.prompts, 1, actor)
        return Imported(pk, "created", version or 1)
    if pk is None:
        raise store.NoSuchPlaybook(parsed.id)
    version = yield from store.replace_contents(box, pk, parsed.fields, parsed.servers,
                                                parsed.prompts, expected_version, actor)
    if version is None:
        return Imported(pk, "unchanged", expected_version)
    return Imported(pk, "updated", version)


def iter_rail_paths(parsed: ParsedPlaybook) -> Iterator[tuple[str, Server]]:
    """``(path prefix, server)`` for each server, to run the rails with."""
    for index, server in enumerate(parsed.servers):
        yield ParsedPlaybook.server_path(index), server


# --- the JSON Schema of a document (for the OpenAPI description) -----------------------------


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    kind = schema.get("type")
    if isinstance(kind, str):
        return {**schema, "type": [kind, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


_NAME = {"type": "string", "pattern": model.NAME_PATTERN.pattern}
_TEXT = {"type": "string", "maxLength": model.MAX_TEXT}
_STRINGS = {"type": "array", "maxItems": model.MAX_ITEMS * 5,
            "items": {"type": "string", "maxLength": 4096}}
_NULL = {"type": "null"}


def _secret_map_schema(key_pattern: str, description: str) -> dict[str, Any]:
    value = {"type": "string", "maxLength": 8192}
    return {
        "type": "object", "maxProperties": model.MAX_ITEMS, "description": description,
        "propertyNames": {"pattern": key_pattern},
        "additionalProperties": {"anyOf": [
            value,
            {"type": "object", "additionalProperties": False, "required": ["value"],
             "properties": {"value": value, "secret": {"type": ["boolean", "null"]}}},
            {"type": "object", "additionalProperties": False, "required": ["secret"],
             "description": "A redacted secret: importing keeps the stored value",
             "properties": {"secret": {"const": True}, "value": _NULL}},
        ]},
    }


_COMMON_SERVER = {
    "name": _NAME,
    "disabled": {"type": ["boolean", "null"]},
    "prefix": {"type": ["string", "null"], "maxLength": 64},
    "include": _nullable(_STRINGS),
    "exclude": _nullable(_STRINGS),
    "expose_prompts": {"type": ["boolean", "null"]},
    "timeout_seconds": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 3600,
                        "description": f"Default {DEFAULT_TIMEOUT_SECONDS:g}"},
}
_STDIO_ONLY = {
    "command": {"type": "string", "minLength": 1, "maxLength": 4096},
    "args": _nullable(_STRINGS),
    "env": _nullable(_secret_map_schema(model.ENV_NAME_PATTERN.pattern,
                                        "Environment variables")),
    "cwd": {"type": ["string", "null"], "pattern": "^/", "maxLength": 4096},
    "isolate_sessions": {"type": ["boolean", "null"]},
}
_HTTP_ONLY = {
    "url": {"type": "string", "minLength": 1, "maxLength": 2048,
            "description": "An http(s) URL"},
    "headers": _nullable(_secret_map_schema(model.HEADER_NAME_PATTERN.pattern,
                                            "HTTP headers sent upstream")),
}
_NOT_BOTH = {"not": {"required": ["include", "exclude"],
                     "properties": {"include": {"type": "array"},
                                    "exclude": {"type": "array"}}}}

JSON_SCHEMA: dict[str, Any] = {
    "title": "Director playbook document, version 1",
    "type": "object", "additionalProperties": False, "required": ["version", "name"],
    "properties": {
        "version": {"const": DOCUMENT_VERSION},
        "id": {"type": ["string", "null"],
               "pattern": "^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$",
               "description": "Default: derived from the name"},
        "name": {"type": "string", "minLength": 1, "maxLength": 200},
        "description": _nullable(_TEXT),
        "position": {"type": ["integer", "null"], "minimum": -1_000_000,
                     "maximum": 1_000_000},
        "servers": _nullable({"type": "array", "maxItems": MAX_SERVERS, "items": {"oneOf": [
            {"type": "object", "additionalProperties": False, "required": ["name", "type",
                                                                           "command"],
             "properties": {"type": {"const": "stdio"}, **_COMMON_SERVER, **_STDIO_ONLY,
                            **dict.fromkeys(_HTTP_ONLY, _NULL)},
             **_NOT_BOTH},
            {"type": "object", "additionalProperties": False, "required": ["name", "type", "url"],
             "properties": {"type": {"enum": ["http", "sse"]}, **_COMMON_SERVER, **_HTTP_ONLY,
                            **dict.fromkeys(_STDIO_ONLY, _NULL)},
             **_NOT_BOTH},
            {**registry_documents.json_schema(_COMMON_SERVER), **_NOT_BOTH},
        ]}}),
        "prompts": _nullable({"type": "array", "maxItems": MAX_PROMPTS, "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "body"],
            "properties": {
                "name": _NAME, "title": _nullable(_TEXT), "description": _nullable(_TEXT),
                "body": {"type": "string", "minLength": 1, "maxLength": model.MAX_BODY},
                "arguments": _nullable({"type": "array", "maxItems": 50, "items": {
                    "type": "object", "additionalProperties": False, "required": ["name"],
                    "properties": {"name": _NAME, "description": _nullable(_TEXT),
                                   "required": {"type": ["boolean", "null"]}}}}),
            }}}),
    },
}
