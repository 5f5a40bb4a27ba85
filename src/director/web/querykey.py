"""The API key in a query string (``?key=dk_…``): which parameters carry it, and their redaction.

MCP clients that cannot set headers put the key in the URL, so it must never reach a log line
in any spelling the authenticator would read. Rather than recognising spellings with a pattern
over the raw URI (which missed ``%6Bey=``, ``;key=``, ``&amp;key=`` …), both sides use one
parse and one test:

* the parse is Twisted's own (``twisted.web.http.parse_qs``, which fills ``request.args``): the
  URI after its first ``?``, split on ``&`` and on ``;``; each item split at its first ``=``
  (an item without one is dropped); ``+`` and then %-escapes decoded in name and value;
* an item carries the key when its decoded name ``is_key_name``: ``key`` in any letter case,
  with surrounding whitespace ignored (``KEY=``, ``%6Bey=``, ``+key+=``).

The authenticator reads the values of exactly those items (``query_keys``, from
``request.args``), and ``redact`` replaces the raw value of exactly those items, found by the
same split. Hence every value the authenticator could read is redacted, however it is encoded
or separated, repeated ones included. A parameter of another name is never read as a key; a
key-shaped word anywhere else in the URI (``?token=dk_…``, a client's mistake) is redacted too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import unquote_to_bytes

REDACTED = b"[REDACTED]"
#: Twisted splits the query on both (``parse_qs``); the group keeps them for reassembly.
_SEPARATORS = re.compile(rb"([&;])")
#: What is left of a key once its parameter is redacted: a key-shaped word elsewhere in the URI.
_KEY_SHAPED = re.compile(rb"dk_[A-Za-z0-9]{8,}")


def is_key_name(decoded_name: bytes) -> bool:
    """Whether a query parameter, by its decoded name, carries the API key."""
    return decoded_name.strip().lower() == b"key"


def query_keys(args: Mapping[bytes, Sequence[bytes]]) -> list[str]:
    """The distinct values (surrounding whitespace dropped) of every key parameter of a parsed
    query string, in order; the authenticator accepts exactly one."""
    found: list[str] = []
    for name, values in args.items():
        if is_key_name(name):
            for value in values:
                key = value.decode("latin-1").strip()
                if key not in found:
                    found.append(key)
    return found


def redact_key_parameters(uri: bytes, secret: Callable[[bytes], bool] = is_key_name) -> bytes:
    """The URI with the raw value of every key parameter (every ``secret`` one) replaced by
    ``[REDACTED]``."""
    path, question, query = uri.partition(b"?")
    if not question:
        return uri
    parts = _SEPARATORS.split(query)  # items at even indexes, separators between them
    for index in range(0, len(parts), 2):
        name, equals, _ = parts[index].partition(b"=")
        if equals and secret(unquote_to_bytes(name.replace(b"+", b" "))):
            parts[index] = name + b"=" + REDACTED
    return path + b"?" + b"".join(parts)


#: An upstream OAuth callback (``director.oauth.client.routes``): its authorization code and
#: state are credentials of a flow under way, kept out of log lines too.
_OAUTH_CALLBACK = re.compile(rb"^/oauth/[^/?]+/[^/?]+/callback\?")


def _flow_parameter(decoded_name: bytes) -> bool:
    return decoded_name.strip().lower() in (b"code", b"state")


def redact(uri: bytes) -> str:
    """A request URI fit for a log line."""
    redacted = redact_key_parameters(uri)
    if _OAUTH_CALLBACK.match(redacted):
        redacted = redact_key_parameters(redacted, _flow_parameter)
    return _KEY_SHAPED.sub(b"dk_" + REDACTED, redacted).decode("latin-1")
