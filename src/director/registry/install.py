"""Turning a registry entry into a playbook server: which of its packages and remotes Director
can run, the inputs they need, and the server they make.

What is supported (``SUPPORTED``):

* ``npm`` packages with the stdio transport: ``npx -y -- NAME@VERSION ARGS…`` (the ``--`` ends
  npx's own options, so no argument, however written, is read by npx);
* ``pypi`` packages with the stdio transport: ``uvx NAME==VERSION ARGS…`` (uvx reads no option
  after the package);
* remotes over ``streamable-http`` (an ``http`` server) and ``sse``, with URL variables and
  headers.

Everything else is refused with the reason: ``oci`` (needs a container runtime), ``nuget``
(``dnx``), ``mcpb`` (bundles downloaded by URL), packages served over HTTP, packages from another
package registry than npm's or PyPI's, and ``runtimeArguments`` (options for npx or uvx
themselves, which could point them at another package or registry). Versions are always
exact: ``latest``, ranges (``^1.2``, ``1.x``) and anything that is not a plain version are
refused, so a server runs the same code at every start.

An option's *recipe* is the normalised, checked part of the entry that Director keeps
(``recipe_of``). The server's command, arguments, environment, URL and headers are computed
from the recipe and the user's inputs by ``materialize`` — when the server is installed and
again each time it is loaded from the database — and never stored or accepted free-form (see
``director.playbooks.rails``: this is what makes the provenance hold).

Inputs are named by field ids, the same in the API, the CLI and the Studio's form:
``env.NAME`` (environment variable), ``header.NAME``, ``arg.KEY`` (a package argument: its
``valueHint`` or its name without dashes), ``url.NAME`` (a remote's URL variable); an input
whose fixed value holds ``{variables}`` asks for each variable as ``ID.VARIABLE``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import attrs

from director.accounts.validation import ValidationFailed
from director.playbooks.model import (
    ENV_NAME_PATTERN,
    HEADER_NAME_PATTERN,
    RegistrySource,
    SecretValue,
    Server,
    parse_server,
)
from director.registry.catalogue import Entry

SUPPORTED = ("npm packages (run with npx), PyPI packages (run with uvx) and remote servers "
             "over streamable-http or sse")
_WHY_NOT = {
    "oci": "oci (container) packages need a container runtime, which Director does not run",
    "nuget": "nuget packages need dnx, which Director does not run",
    "mcpb": "mcpb bundles are downloaded by URL and unpacked, which Director does not do",
}
DEFAULT_PACKAGE_REGISTRIES = {"npm": "https://registry.npmjs.org", "pypi": "https://pypi.org"}
RUNTIMES = {"npm": "npx", "pypi": "uvx"}
_NPM_NAME = re.compile(r"(@[a-z0-9][a-z0-9._~-]{0,213}/)?[a-z0-9][a-z0-9._~-]{0,213}")
_PYPI_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,200}[A-Za-z0-9])?")
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+_-]{0,127}")
_WILDCARD = re.compile(r"(^|[.])[xX*]([.]|$)")
_FLAG = re.compile(r"-{1,2}[A-Za-z0-9][A-Za-z0-9_.-]{0,100}")
_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_BRACES = re.compile(r"\{([A-Za-z0-9_.-]{1,64})\}")
FORMATS = ("string", "number", "boolean", "filepath")
MAX_VALUE = 8192
MAX_INPUTS = 100


class InstallError(ValidationFailed):
    """An entry, option or input that cannot be installed; ``fields`` names each problem."""


class _Unsupported(Exception):
    """Why one option of an entry cannot be installed."""


@attrs.frozen
class Field:
    """One input the user gives (or may give)."""

    id: str
    label: str
    description: str = ""
    required: bool = False
    secret: bool = False
    default: str | None = None
    choices: tuple[str, ...] = ()
    format: str = "string"
    placeholder: str = ""
    #: Where the value goes: "env", "header", "arg" or "url" (headers refuse line breaks).
    target: str = "arg"


@attrs.frozen
class Option:
    """A package or remote of an entry: installable (``recipe``) or not (``problem``)."""

    choice: str  # "package:0", "remote:1"
    label: str
    recipe: Mapping[str, Any] | None
    problem: str | None = None

    @property
    def fields(self) -> tuple[Field, ...]:
        return fields_of(self.recipe) if self.recipe is not None else ()


# --- reading an entry's option (the registry is untrusted) ----------------------------------


def _string(value: Any, what: str, limit: int = MAX_VALUE) -> str:
    if not isinstance(value, str) or len(value) > limit or "\x00" in value or \
            any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise _Unsupported(f"{what} is not text of at most {limit} characters")
    return value


def _spec(raw: Any, what: str, nested: bool = True) -> dict[str, Any]:
    """An ``Input`` of server.json, checked and with its defaults filled in."""
    if not isinstance(raw, dict):
        raise _Unsupported(f"{what} is not an object")
    spec: dict[str, Any] = {
        "description": _string(raw.get("description", ""), f"{what}'s description")[:1000],
        "isRequired": raw.get("isRequired") is True, "isSecret": raw.get("isSecret") is True,
        "format": raw.get("format") if raw.get("format") in FORMATS else "string",
        "placeholder": _string(raw.get("placeholder", ""), f"{what}'s placeholder")[:200]}
    for key in ("default", "value"):
        if raw.get(key) is not None:
            spec[key] = _string(raw[key], f"{what}'s {key}")
    choices = raw.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or len(choices) > 100:
            raise _Unsupported(f"{what}'s choices are not a list of at most 100 values")
        spec["choices"] = [_string(choice, f"{what}'s choice", 1000) for choice in choices]
    variables = raw.get("variables")
    if variables is not None and nested:
        if not isinstance(variables, dict) or len(variables) > 20:
            raise _Unsupported(f"{what}'s variables are not an object of at most 20 inputs")
        spec["variables"] = {}
        for name, variable in variables.items():
            if not _KEY.fullmatch(name):
                raise _Unsupported(f"{what} has a variable named {name[:64]!r}")
            spec["variables"][name] = _spec(variable, f"{what}'s variable {name}", False)
    return spec


def _named_inputs(raw: Any, what: str, pattern: re.Pattern[str]) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > MAX_INPUTS:
        raise _Unsupported(f"its {what} are not a list of at most {MAX_INPUTS}")
    items, seen = [], set()
    for index, item in enumerate(raw):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not pattern.fullmatch(name) or name in seen:
            shown = name[:64] if isinstance(name, str) else name
            raise _Unsupported(f"its {what} [{index}] has an invalid or repeated name "
                               f"{shown!r}")
        seen.add(name)
        items.append({"name": name, "input": _spec(item, f"{what} {name}")})
    return items


def _arguments(raw: Any) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > MAX_INPUTS:
        raise _Unsupported(f"its packageArguments are not a list of at most {MAX_INPUTS}")
    arguments, keys = [], set()
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or item.get("type") not in ("positional", "named"):
            raise _Unsupported(f"packageArguments[{index}] is neither positional nor named")
        name = None
        if item["type"] == "named":
            name = item.get("name")
            if not isinstance(name, str) or not _FLAG.fullmatch(name):
                raise _Unsupported(f"packageArguments[{index}] has no flag name like --port "
                                   f"({str(name)[:64]!r})")
            key = name.lstrip("-")
        else:
            hint = item.get("valueHint")
            key = hint if isinstance(hint, str) and _KEY.fullmatch(hint) else str(index)
        if key in keys:
            key = f"{key}.{index}"
        keys.add(key)
        arguments.append({"type": item["type"], "name": name, "key": key,
                          "input": _spec(item, f"packageArguments[{index}]")})
    return arguments


def _package_recipe(package: Mapping[str, Any]) -> dict[str, Any]:
    kind = package.get("registryType")
    if kind not in RUNTIMES:
        shown = str(kind)[:40] if kind is not None else "no registryType"
        raise _Unsupported(_WHY_NOT.get(str(kind), f"{shown!r} packages are not supported")
                           + f"; Director installs {SUPPORTED}")
    base = package.get("registryBaseUrl")
    if base is not None and str(base).rstrip("/") != DEFAULT_PACKAGE_REGISTRIES[kind]:
        raise _Unsupported(f"the package comes from {str(base)[:100]}; Director installs "
                           f"{kind} packages from {DEFAULT_PACKAGE_REGISTRIES[kind]} only")
    identifier = package.get("identifier")
    pattern = _NPM_NAME if kind == "npm" else _PYPI_NAME
    if not isinstance(identifier, str) or not pattern.fullmatch(identifier):
        raise _Unsupported(f"{str(identifier)[:100]!r} is not a valid {kind} package name")
    version = package.get("version")
    if not isinstance(version, str) or not _VERSION.fullmatch(version) or \
            version.lower() == "latest" or _WILDCARD.search(version):
        raise _Unsupported(f"the package's version {str(version)[:40]!r} is not an exact "
                           "version (Director never runs 'latest' or a range)")
    transport = package.get("transport")
    kind_of_transport = transport.get("type") if isinstance(transport, dict) else None
    if kind_of_transport != "stdio":
        raise _Unsupported(f"the package's transport is {str(kind_of_transport)[:40]!r}; "
                           "Director starts packages over stdio only")
    if package.get("runtimeArguments"):
        raise _Unsupported("the package needs runtimeArguments (options for npx or uvx "
                           "themselves), which Director does not pass")
    return {"kind": kind, "transport": "stdio", "identifier": identifier, "version": version,
            "arguments": _arguments(package.get("packageArguments")),
            "environment": _named_inputs(package.get("environmentVariables"),
                                         "environmentVariables", ENV_NAME_PATTERN)}


def _remote_recipe(remote: Mapping[str, Any]) -> dict[str, Any]:
    kind = remote.get("type")
    if kind not in ("streamable-http", "sse"):
        raise _Unsupported(f"the remote's type {str(kind)[:40]!r} is neither streamable-http "
                           "nor sse")
    url = _string(remote.get("url"), "the remote's url", 2048)
    if not url.startswith(("https://", "http://")):
        raise _Unsupported("the remote's url is not an http(s) URL")
    variables = remote.get("variables") or {}
    if not isinstance(variables, dict) or len(variables) > 20:
        raise _Unsupported("the remote's variables are not an object of at most 20 inputs")
    checked = {}
    for name, variable in variables.items():
        if not _KEY.fullmatch(name):
            raise _Unsupported(f"the remote has a URL variable named {name[:64]!r}")
        checked[name] = _spec(variable, f"URL variable {name}", False)
    return {"kind": "remote", "transport": kind, "url": url, "variables": checked,
            "headers": _named_inputs(remote.get("headers"), "headers", HEADER_NAME_PATTERN)}


def options(entry: Entry) -> list[Option]:
    """Every package and remote of ``entry``, installable or with the reason it is not."""
    found = []
    for kind, items, reader in (("package", entry.packages, _package_recipe),
                                ("remote", entry.remotes, _remote_recipe)):
        for index, item in enumerate(items):
            label = _label(kind, item)
            try:
                found.append(Option(f"{kind}:{index}", label, reader(item)))
            except _Unsupported as why:
                found.append(Option(f"{kind}:{index}", label, None, str(why)))
    return found


def _label(kind: str, item: Mapping[str, Any]) -> str:
    if kind == "package":
        return (f"{str(item.get('registryType'))[:20]} package "
                f"{str(item.get('identifier'))[:100]} {str(item.get('version'))[:40]}")
    return f"{str(item.get('type'))[:20]} remote {str(item.get('url'))[:200]}"


def choose(entry: Entry, choice: str | None) -> Option:
    """The option ``choice`` names ("package:0", "remote:0"), or the first installable one."""
    found = options(entry)
    if choice is not None:
        chosen = next((option for option in found if option.choice == choice), None)
        if chosen is None:
            offered = ", ".join(option.choice for option in found) or "none"
            raise InstallError({"choice": f"{entry.name} {entry.version} has no {choice!r} "
                                          f"(it offers: {offered})"})
    else:
        chosen = next((option for option in found if option.recipe is not None), None)
        if chosen is None:
            reasons = "; ".join(f"{o.choice}: {o.problem}" for o in found) or \
                "it lists no packages and no remotes"
            raise InstallError({"name": f"{entry.name} {entry.version} cannot be installed: "
                                        f"{reasons}"})
    if chosen.problem is not None:
        raise InstallError({"choice": f"{chosen.choice} of {entry.name} cannot be installed: "
                                      f"{chosen.problem}"})
    return chosen


# --- the inputs --------------------------------------------------------------------------


def _fields_of(field_id: str, label: str, spec: Mapping[str, Any], target: str,
               required: bool | None = None) -> list[Field]:
    if "value" in spec:  # fixed by the publisher: only its variables are asked
        return [field for name, variable in spec.get("variables", {}).items()
                if "{" + name + "}" in spec["value"]
                for field in _fields_of(f"{field_id}.{name}", f"{label} ({name})", variable,
                                        target)]
    return [Field(field_id, label, spec["description"],
                  spec["isRequired"] if required is None else required, spec["isSecret"],
                  spec.get("default"), tuple(spec.get("choices", ())), spec["format"],
                  spec["placeholder"], target)]


def fields_of(recipe: Mapping[str, Any]) -> tuple[Field, ...]:
    found: list[Field] = []
    for variable, spec in recipe.get("variables", {}).items():
        if "{" + variable + "}" in recipe["url"]:
            found += _fields_of(f"url.{variable}", f"URL variable {variable}", spec, "url",
                                required=True)
    for item in recipe.get("environment", ()):
        found += _fields_of(f"env.{item['name']}", item["name"], item["input"], "env")
    for item in recipe.get("headers", ()):
        found += _fields_of(f"header.{item['name']}", f"Header {item['name']}", item["input"],
                            "header")
    for item in recipe.get("arguments", ()):
        label = item["name"] or f"Argument {item['key']}"
        found += _fields_of(f"arg.{item['key']}", label, item["input"], "arg")
    return tuple(found)


def _checked_value(field: Field, value: Any) -> str:
    if not isinstance(value, str):
        raise InstallError({f"inputs.{field.id}": "must be a string"})
    if len(value) > MAX_VALUE or "\x00" in value or \
            any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise InstallError({f"inputs.{field.id}": f"must be text of at most {MAX_VALUE} "
                                                  "characters"})
    if field.target == "header" and ("\r" in value or "\n" in value):
        raise InstallError({f"inputs.{field.id}": "must not contain line breaks"})
    if field.choices and value not in field.choices:
        raise InstallError({f"inputs.{field.id}": "must be one of " + ", ".join(field.choices)})
    if field.format == "boolean" and value not in ("true", "false"):
        raise InstallError({f"inputs.{field.id}": "must be true or false"})
    if field.format == "number":
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise InstallError({f"inputs.{field.id}": "must be a number"})
    if field.format == "filepath" and not value.startswith("/"):
        raise InstallError({f"inputs.{field.id}": "must be an absolute path on the gateway "
                                                  "host"})
    return value


def check_inputs(recipe: Mapping[str, Any], given: Any,
                 kept: Mapping[str, SecretValue] | None = None,
                 ) -> tuple[tuple[str, SecretValue], ...]:
    """The inputs to store: ``given`` (field id → text) over ``kept`` (an update keeps the
    values whose field the new version still has), each checked against its field; every
    problem reported at once. A field left out takes its default when it has one."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise InstallError({"inputs": "must be an object of field ids and values"})
    fields = {field.id: field for field in fields_of(recipe)}
    problems = {f"inputs.{key}": "is not an input of this server (its inputs: "
                f"{', '.join(fields) or 'none'})" for key in given if key not in fields}
    values: list[tuple[str, SecretValue]] = []
    for field in fields.values():
        try:
            if field.id in given and given[field.id] not in (None, ""):
                value = _checked_value(field, given[field.id])
            elif kept is not None and field.id in kept:
                value = _checked_value(field, kept[field.id].value)
            elif field.default is not None:
                value = field.default
            elif field.required:
                raise InstallError({f"inputs.{field.id}": "is required"
                                    + (f" ({field.description[:200]})"
                                       if field.description else "")})
            else:
                continue
        except InstallError as problem:
            problems.update(problem.fields)
            continue
        values.append((field.id, SecretValue(value, field.secret)))
    if problems:
        raise InstallError(problems)
    return tuple(sorted(values))


# --- the server a recipe and its inputs make ----------------------------------------------


def _value(field_id: str, spec: Mapping[str, Any], inputs: Mapping[str, SecretValue],
           encode: Any = None) -> SecretValue | None:
    if "value" in spec:
        text, secret = spec["value"], bool(spec["isSecret"])
        for name, variable in spec.get("variables", {}).items():
            given = inputs.get(f"{field_id}.{name}")
            if given is None:
                continue  # the spec: an unknown {variable} stays as written
            replacement = encode(given.value) if encode is not None else given.value
            text = text.replace("{" + name + "}", replacement)
            secret = secret or given.secret or bool(variable["isSecret"])
        return SecretValue(text, secret)
    given = inputs.get(field_id)
    if given is None:
        return None
    return SecretValue(given.value, given.secret or bool(spec["isSecret"]))


def materialize(recipe: Mapping[str, Any], inputs: tuple[tuple[str, SecretValue], ...],
                ) -> dict[str, Any]:
    """The server fields (``type``, ``command``/``args``/``env`` or ``url``/``headers``) that
    ``recipe`` with ``inputs`` makes; pure, so the same at install and at every load."""
    given = dict(inputs)
    if recipe["kind"] == "remote":
        url = recipe["url"]
        for variable in recipe.get("variables", {}):
            value = given.get(f"url.{variable}")
            if value is not None:
                url = url.replace("{" + variable + "}", quote(value.value, safe=""))
        headers = [(item["name"], value) for item in recipe.get("headers", ())
                   if (value := _value(f"header.{item['name']}", item["input"], given))
                   is not None]
        return {"type": "http" if recipe["transport"] == "streamable-http" else "sse",
                "url": url, "headers": tuple(sorted(headers))}
    args: list[str] = []
    for item in recipe.get("arguments", ()):
        value = _value(f"arg.{item['key']}", item["input"], given)
        if value is None:
            continue
        args += [item["name"], value.value] if item["type"] == "named" else [value.value]
    env = [(item["name"], value) for item in recipe.get("environment", ())
           if (value := _value(f"env.{item['name']}", item["input"], given)) is not None]
    if recipe["kind"] == "npm":
        command, head = "npx", ["-y", "--", f"{recipe['identifier']}@{recipe['version']}"]
    else:
        command, head = "uvx", [f"{recipe['identifier']}=={recipe['version']}"]
    return {"type": "stdio", "command": command, "args": tuple(head + args),
            "env": tuple(sorted(env))}


def recipe_text(recipe: Mapping[str, Any]) -> str:
    """The recipe as stored: canonical JSON (the same recipe, the same text)."""
    return json.dumps(recipe, sort_keys=True, separators=(",", ":"))


def suggested_name(entry_name: str) -> str:
    """A playbook server name from a registry name: ``io.github.acme/weather`` → ``weather``."""
    tail = entry_name.rsplit("/", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", tail).lstrip("._-")[:64]
    return name or "server"


# --- a whole server ----------------------------------------------------------------------


def build_server(registry: str, entry: Entry, option: Option, name: str, inputs: Any,
                 kept: Mapping[str, SecretValue] | None = None,
                 base: Server | None = None) -> Server:
    """The playbook server ``option`` of ``entry`` makes with ``inputs``; ``base`` (an update)
    gives the settings the user chose (name, prefix, tool filters, ...), ``kept`` its inputs."""
    assert option.recipe is not None
    return from_recipe(registry, entry.name, entry.version, option.recipe,
                       base if base is not None else Server(name, "stdio"), inputs, kept)


def from_recipe(registry: str, name: str, version: str, recipe: Mapping[str, Any],
                base: Server, inputs: Any, kept: Mapping[str, SecretValue] | None = None,
                ) -> Server:
    """The server ``recipe`` (of entry ``name`` ``version``) makes with ``inputs``, with the
    name and common settings (prefix, tool filters, ...) of ``base``."""
    values = check_inputs(recipe, inputs, kept)
    source = RegistrySource(registry, name, version, recipe_text(recipe), values)
    derived = materialize(recipe, values)
    if "url" in derived:  # the URL the variables made must still be an http(s) URL
        try:
            parse_server({"name": base.name, "type": derived["type"], "url": derived["url"]})
        except ValidationFailed as problem:
            raise InstallError({"inputs": f"the URL {derived['url'][:200]!r} the inputs make "
                                          f"{problem.fields['url']}"}) from None
    common = attrs.asdict(base, recurse=False)
    for field in ("command", "args", "env", "cwd", "url", "headers", "registry", "type"):
        common.pop(field)
    if derived["type"] != "stdio":
        common.pop("isolate_sessions")
    return Server(registry=source, **common, **derived)


def installed(registry: str, entry: Entry, choice: str | None, server_name: str,
              inputs: Any) -> Server:
    """The server installing ``entry`` (option ``choice``, else the first installable) makes."""
    return build_server(registry, entry, choose(entry, choice), server_name, inputs)


def updated(registry: str, entry: Entry, current: Server, inputs: Any) -> Server:
    """``current`` (a registry server) moved to ``entry``, another version of its entry: the
    same package (or a remote of the same transport), its inputs kept unless given anew."""
    source = current.registry
    if source is None:
        raise InstallError({"name": f"{current.name} was not installed from a registry"})
    choice = same_option(entry, json.loads(source.recipe))
    if choice is None:
        raise InstallError({"version": f"{entry.name} {entry.version} no longer offers what "
                                       "was installed; remove the server and install it "
                                       "again"})
    return build_server(registry, entry, choose(entry, choice), current.name, inputs,
                        dict(source.inputs), base=current)


def same_option(entry: Entry, previous: Mapping[str, Any]) -> str | None:
    """The choice of ``entry`` that installs what ``previous`` (a recipe) installed: the same
    package, or a remote of the same transport; None when there is none."""
    for option in options(entry):
        recipe = option.recipe
        if recipe is None or recipe["kind"] != previous["kind"]:
            continue
        if recipe["kind"] == "remote" and recipe["transport"] == previous["transport"]:
            return option.choice
        if recipe["kind"] != "remote" and recipe["identifier"] == previous["identifier"]:
            return option.choice
    return None


def field_json(field: Field) -> dict[str, Any]:
    return {"id": field.id, "label": field.label, "description": field.description,
            "required": field.required, "secret": field.secret, "default": field.default,
            "choices": list(field.choices) or None, "format": field.format,
            "placeholder": field.placeholder or None}


def option_json(option: Option) -> dict[str, Any]:
    recipe = option.recipe
    data: dict[str, Any] = {"choice": option.choice, "label": option.label,
                            "installable": recipe is not None, "problem": option.problem}
    if recipe is not None:
        data["runtime"] = RUNTIMES.get(recipe["kind"])
        data["fields"] = [field_json(field) for field in option.fields]
    return data
