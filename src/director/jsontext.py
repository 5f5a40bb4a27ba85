"""JSON text at the daemon's edges: what it reads (``loads``) and how it writes (``dumps``).

Python's ``json`` accepts more than interoperable JSON (RFC 8259), and what it lets in fails
later, far from where it came in: a lone surrogate escape (``"\\ud800"``) becomes a ``str``
that no UTF-8 encoder accepts, so the answer, an upstream's pipe or PostgreSQL is where it
breaks (a 500, or a call left pending); ``NaN``, ``Infinity`` and ``1e999`` are read and written
back as tokens that no strict peer parses; and a structure that was parsed near the recursion
limit may not encode again from a deeper stack. So every JSON text that enters goes through
``loads``, which decides once, at the edge, in one of two ways:

* **strict** (what clients send: MCP bodies, the REST API): anything beyond interoperable JSON
  is refused with ``JsonTextError`` — bytes that are not UTF-8 (§8.1), a string that is not
  valid Unicode (a lone surrogate, §8.2), a number that is not finite (§6), nesting deeper than
  ``MAX_DEPTH``. The caller answers a precise 400 before anything else sees the text: the
  client can fix its request, and nothing half-valid travels on.
* **repair** (what upstream servers send): a JavaScript server that cuts a string in the
  middle of an emoji sends a lone surrogate, a Python one that ``json.dumps`` a NaN sends
  ``NaN``; refusing such an answer would leave the client's call waiting until its timeout for
  a fault it cannot fix. So invalid UTF-8 and lone surrogates become U+FFFD and non-finite
  numbers become ``null`` (what ``JSON.stringify`` and pydantic write for them); only what
  cannot be repaired (a syntax error, too deep) is refused.

Both are cheap when there is nothing to find: the walk over the parsed value happens only when
the text holds a surrogate escape, or more brackets than ``MAX_DEPTH``.
"""

from __future__ import annotations

import json
import json.encoder
import math
import re
from codecs import BOM_UTF8
from collections.abc import Callable
from typing import Any

#: Deepest nesting of arrays and objects accepted. Real MCP messages (schemas included) stay
#: far below it; it leaves the encoder ample stack wherever it later runs.
MAX_DEPTH = 128

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_REPLACEMENT = "\ufffd"


class JsonTextError(ValueError):
    """The text is not JSON this daemon accepts; the message says why."""


def loads(raw: bytes | str, *, repair: bool = False) -> Any:
    """The value of one JSON text, strict unless ``repair`` (module docstring)."""
    text = _text(raw, repair)
    if text.startswith("\ufeff"):  # what json.loads says of it; bytes had theirs dropped
        raise JsonTextError("Unexpected UTF-8 BOM (decode using utf-8-sig): line 1 column 1 "
                            "(char 0)")
    try:
        value = (_REPAIRING if repair else _STRICT).decode(text)
    except RecursionError:
        raise JsonTextError(f"nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as failure:
        raise JsonTextError(str(failure)) from None
    if text.count("[") + text.count("{") > MAX_DEPTH and _deeper_than(value, MAX_DEPTH):
        raise JsonTextError(f"nested more than {MAX_DEPTH} levels deep")
    if _SURROGATE_ESCAPE.search(text) and _has_surrogate(value):
        if not repair:
            raise JsonTextError("a string holds a lone surrogate (a \\uD800-\\uDFFF escape "
                                "without its pair): JSON text must be valid Unicode")
        value = _replace_surrogates(value)
    return value


def _compact_encoder() -> Callable[[Any], str]:
    """``json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)``.

    ``json.dumps`` with options builds a ``JSONEncoder``, which builds the C encoder, for each
    value: 2.2 µs of its 3.7 µs, twice a proxied call. The C encoder keeps nothing between
    calls, so one serves them all. It skips the check for a value that contains itself
    (nothing parsed from JSON can): such a value ends in ``RecursionError``, as one nested too
    deeply does, which ``dumps`` refuses alike.
    """
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if c_make_encoder is None:  # a Python built without the json accelerator
        encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return encoder.encode
    encode_chunks = c_make_encoder(
        None, json.JSONEncoder().default, json.encoder.encode_basestring, None, ":", ",",
        False, False, False)  # markers, default, …, sort_keys, skipkeys, allow_nan
    return lambda value: "".join(encode_chunks(value, 0))


_encode = _compact_encoder()


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON; ``JsonTextError`` for what has no interoperable JSON form."""
    try:
        return _encode(value).encode()
    except RecursionError:
        raise JsonTextError("nested too deeply to encode") from None
    except UnicodeEncodeError:
        raise JsonTextError("a string holds a lone surrogate, which UTF-8 cannot encode") \
            from None
    except (TypeError, ValueError) as failure:
        raise JsonTextError(str(failure)) from None


def _text(raw: bytes | str, repair: bool) -> str:
    if isinstance(raw, str):
        if _SURROGATE.search(raw):
            if not repair:
                raise JsonTextError("the text holds a lone surrogate: it is not valid Unicode")
            return _SURROGATE.sub(_REPLACEMENT, raw)
        return raw
    if raw[:3] == BOM_UTF8:  # a byte order mark is ignored (RFC 8259 §8.1)
        raw = raw[3:]
    # (not the "utf-8-sig" codec: its Python-level decode costs ~1 µs more, twice a call)
    if repair:
        return raw.decode(errors="replace")
    try:
        return raw.decode()
    except UnicodeDecodeError as failure:
        raise JsonTextError(f"not UTF-8: {failure.reason} at byte {failure.start}") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _nothing(name: str) -> None:
    return None


def _finite(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        raise ValueError(f"the number {literal[:40]} is out of range")
    return value


def _finite_or_none(literal: str) -> float | None:
    value = float(literal)
    return None if math.isinf(value) else value


# One decoder each, made once: ``json.loads`` with any option builds a new one per call.
_STRICT = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite)
_REPAIRING = json.JSONDecoder(parse_constant=_nothing, parse_float=_finite_or_none)


def _deeper_than(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list))
    return False


def _has_surrogate(value: Any) -> bool:
    """Whether any string (key or value) holds a surrogate: the decoder joins every escaped
    pair into one character, so any surrogate left is a lone one."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if _SURROGATE.search(node):
                return True
        elif isinstance(node, dict):
            stack.extend(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def _replace_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return _SURROGATE.sub(_REPLACEMENT, value)
    if isinstance(value, dict):
        return {_SURROGATE.sub(_REPLACEMENT, key): _replace_surrogates(item)
                for key, item in value.items()}
    if isinstance(value, list):
        return [_replace_surrogates(item) for item in value]
    return value
