"""MCP 2026-07-28 routing headers (SEP-2243), for both sides of the gateway.

A header value that is not visible ASCII without surrounding spaces travels as the sentinel
``=?base64?<base64 of its UTF-8>?=`` (``encode_header_value`` / ``decode_header_value``). A tool
argument whose schema position carries ``x-mcp-header: Token`` is copied into the request's
``Mcp-Param-Token`` header by the client (``param_headers``), and the server checks that both
agree (``param_header_mismatch``): the gateway checks what its modern clients send and, as a
client itself, adds the headers its modern upstreams check.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator, Mapping
from typing import Any

PARAM_HEADER_PREFIX = "mcp-param-"

_B64_SENTINEL = re.compile(r"^=\?base64\?(?P<payload>.*)\?=$")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_CANONICAL_DECIMAL = re.compile(r"^-?[0-9]+(\.[0-9]+)?$")
_HEADER_TYPES = frozenset({"string", "integer", "boolean"})
# JSON Schema 2020-12 keywords whose values are schemas (by shape); only ``properties`` keeps
# the static path from the root that an ``x-mcp-header`` annotation needs.
_SUBSCHEMA = frozenset({"items", "contains", "unevaluatedItems", "additionalProperties",
                        "propertyNames", "unevaluatedProperties", "not", "if", "then", "else",
                        "contentSchema"})
_SUBSCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_SUBSCHEMA_MAPS = frozenset({"patternProperties", "dependentSchemas", "$defs", "definitions"})


def decode_header_value(value: str | None) -> str | None:
    """A header value, unwrapping the ``=?base64?…?=`` sentinel (None when malformed)."""
    if value is None:
        return None
    match = _B64_SENTINEL.fullmatch(value)
    if match is None:
        return value
    payload = match["payload"]
    try:
        decoded = base64.b64decode(payload, validate=True)
        if base64.b64encode(decoded).decode("ascii") != payload:
            return None
        return decoded.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def _schema_positions(root: Any) -> Iterator[tuple[tuple[str, ...] | None, dict[str, Any]]]:
    stack: list[tuple[tuple[str, ...] | None, Any]] = [((), root)]
    while stack:
        path, node = stack.pop()
        if not isinstance(node, dict):
            continue
        yield path, node
        for keyword, value in node.items():
            if keyword == "properties" and isinstance(value, dict):
                stack.extend(((*path, name) if path is not None else None, sub)
                             for name, sub in value.items())
            elif keyword in _SUBSCHEMA:
                stack.append((None, value))
            elif keyword in _SUBSCHEMA_LISTS and isinstance(value, list):
                stack.extend((None, sub) for sub in value)
            elif keyword in _SUBSCHEMA_MAPS and isinstance(value, dict):
                stack.extend((None, sub) for sub in value.values())


def header_annotations(schema: Any) -> list[tuple[tuple[str, ...], str, dict[str, Any]]] | None:
    """``(property path, header token, property schema)`` of each ``x-mcp-header``; None when
    an annotation is invalid (then clients send no header and nothing is checked)."""
    found: list[tuple[tuple[str, ...], str, dict[str, Any]]] = []
    seen: set[str] = set()
    for path, node in _schema_positions(schema):
        if "x-mcp-header" not in node:
            continue
        token = node["x-mcp-header"]
        if not path or not isinstance(token, str) or not _TOKEN.fullmatch(token) or \
                node.get("type") not in _HEADER_TYPES or token.lower() in seen:
            return None
        seen.add(token.lower())
        found.append((path, token, node))
    return found


def _rendered(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        try:
            return str(value)
        except ValueError:
            return None
    return None


def _matches(kind: Any, value: Any, rendered: str, decoded: str) -> bool:
    if kind == "integer" and not isinstance(value, bool) and \
            (isinstance(value, int) or (isinstance(value, float) and value.is_integer())) and \
            _CANONICAL_DECIMAL.fullmatch(decoded):
        whole, _, fraction = decoded.partition(".")
        try:
            return not (fraction and set(fraction) != {"0"}) and int(whole) == int(value)
        except ValueError:  # more digits than ``int`` reads (4,300): no argument has them
            return False
    return decoded == rendered


def param_header_mismatch(schema: Any, arguments: Mapping[str, Any],
                          headers: Mapping[str, list[str]]) -> str | None:
    """Why the ``Mcp-Param-*`` headers (lower-case name -> values) disagree with the tool's
    arguments, or None when they agree."""
    for path, token, node in header_annotations(schema) or ():
        name = f"Mcp-Param-{token}"
        values = headers.get(name.lower(), [])
        value: Any = arguments
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        argument = ".".join(path)
        if len(values) > 1:
            return f"{name} header appears more than once"
        raw = values[0] if values else None
        rendered = _rendered(value) if value is not None else None
        if rendered is None:
            if raw is not None:
                return f"{name} header is present but the {argument!r} argument is absent"
            continue
        if raw is None:
            return f"{name} header is missing but the {argument!r} argument is present"
        decoded = decode_header_value(raw)
        if decoded is None:
            return f"{name} header carries a malformed base64 value"
        if not _matches(node.get("type"), value, rendered, decoded):
            return f"{name} header does not match the {argument!r} argument"
    return None


def encode_header_value(value: str) -> str:
    """``value`` as is when it is visible ASCII without surrounding spaces (and not itself
    shaped like the sentinel), else the base64 sentinel."""
    if value == value.strip() and all(0x20 <= ord(c) <= 0x7E for c in value) \
            and not _B64_SENTINEL.fullmatch(value):  # a literal sentinel must round-trip too
        return value
    return "=?base64?" + base64.b64encode(value.encode()).decode() + "?="


Annotations = list[tuple[tuple[str, ...], str, dict[str, Any]]]


def param_headers(schema: Any, arguments: Any) -> dict[str, str]:
    """The ``Mcp-Param-*`` headers a client sends for a ``tools/call`` with ``arguments`` of a
    tool whose input schema is ``schema`` (none when an annotation is invalid)."""
    return mirrored(header_annotations(schema) or [], arguments)


def mirrored(annotations: Annotations, arguments: Any) -> dict[str, str]:
    """``param_headers`` from the schema's ``header_annotations``, computed beforehand."""
    headers: dict[str, str] = {}
    if not isinstance(arguments, Mapping):
        return headers
    for path, token, _ in annotations:
        value: Any = arguments
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        rendered = _rendered(value) if value is not None else None
        if rendered is not None:
            headers[f"Mcp-Param-{token}"] = encode_header_value(rendered)
    return headers
