"""Which era a request belongs to, the modern validation ladder, and result shapes.

Which era (``is_modern_request``, following the SDK's serving logic, extended to the body):
a POST without ``Mcp-Session-Id`` is modern when its ``MCP-Protocol-Version`` header names a
version that is not a handshake version, or when its body carries the ``protocolVersion``
envelope key whatever the header says (a missing or handshake-era header then fails the header
check, which is the precise answer).
``initialize`` always opens a legacy session: it does not exist in the modern era. A request
with ``Mcp-Session-Id`` is always legacy. GET and DELETE without a session id but with a modern
``MCP-Protocol-Version`` header are answered 405 (``modern_method_not_allowed``).

The validation ladder mirrors the SDK's (``mcp.shared.inbound``), first failure wins: a
duplicated routing header or headers that disagree with the body → 400 ``-32020``; a missing
envelope → 400 ``-32602``; an unsupported version → 400 ``-32022`` whose ``data.supported`` lists
the modern version(s) first, then the handshake versions (served after ``initialize``), so that
a client can fall back as well as forward; an unknown method → 404 ``-32601``. Errors from
handling map to HTTP statuses through the same table (``HTTP_STATUS``). ``tools/call``'s
``Mcp-Param-*`` headers are checked against the called tool's ``x-mcp-header`` annotations
(fail-open when the schema cannot be found, like the SDK).

Every result carries ``resultType`` and the gateway's ``serverInfo`` in ``_meta`` (an upstream's
own value would win; handshake-era upstreams send none). Cacheable results (the lists,
``resources/read``, ``server/discover``) carry ``ttlMs`` (``LIST_TTL_MS``: 0, immediately stale —
the gateway cannot promise freshness of upstream data; change notifications come through
``subscriptions/listen``) and always ``cacheScope: private``: the gateway answers per user,
with that user's upstream credentials, whatever an upstream claims. Lists keep the router's
deterministic order.


The spec's string constants are defined here rather than imported from ``mcp_types`` (which
would add ~10 MB and half a second to every daemon's start); the tests check that they agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from director.mcp.fanout import LOG_LEVELS
from director.mcp.handshake import SERVER_CAPABILITIES, SERVER_INFO
from director.mcp.headers import decode_header_value
from director.mcp.jsonrpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    Message,
    ProtocolError,
)
from director.mcp.protocol import (
    CLIENT_CAPABILITIES_META,
    CLIENT_INFO_META,
    HEADER_MISMATCH,
    LOG_LEVEL_META,
    MISSING_REQUIRED_CLIENT_CAPABILITY,
    MODERN_VERSIONS,
    PROTOCOL_VERSION_META,
    RESOURCE_NOT_FOUND,
    SERVER_INFO_META,
    UNSUPPORTED_PROTOCOL_VERSION,
)
from director.mcp.upstream.base import LEGACY_VERSIONS, UpstreamRequestError
from director.playbooks.store import Playbook

#: What a -32022 answer lists: the stateless version(s), then those served after ``initialize``.
SUPPORTED_VERSIONS = (*MODERN_VERSIONS, *LEGACY_VERSIONS)

#: Request ``_meta`` keys of the modern envelope, removed before forwarding to an upstream.
ENVELOPE_KEYS = (PROTOCOL_VERSION_META, CLIENT_CAPABILITIES_META, CLIENT_INFO_META,
                 LOG_LEVEL_META)

#: JSON-RPC error code -> HTTP status for modern answers (unlisted codes: 200).
HTTP_STATUS = {PARSE_ERROR: 400, INVALID_REQUEST: 400, INVALID_PARAMS: 400, HEADER_MISMATCH: 400,
               MISSING_REQUIRED_CLIENT_CAPABILITY: 400, UNSUPPORTED_PROTOCOL_VERSION: 400,
               METHOD_NOT_FOUND: 404}

PROTOCOL_VERSION_HEADER = "mcp-protocol-version"
METHOD_HEADER = "mcp-method"
NAME_HEADER = "mcp-name"
ROUTING_HEADERS = (PROTOCOL_VERSION_HEADER, METHOD_HEADER, NAME_HEADER)
#: Method -> the params key mirrored in ``Mcp-Name``.
NAME_BEARING_METHODS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}

METHODS = frozenset({"server/discover", "subscriptions/listen", "tools/list", "tools/call",
                     "prompts/list", "prompts/get", "resources/list", "resources/read",
                     "resources/templates/list", "completion/complete"})
CACHEABLE_METHODS = frozenset({"server/discover", "tools/list", "prompts/list", "resources/list",
                               "resources/templates/list", "resources/read"})
LIST_TTL_MS = 0


class Rejection(ProtocolError):
    """A modern request refused before handling (answered with ``http_status(code)``)."""


def http_status(code: Any) -> int:
    return HTTP_STATUS.get(code, 200) if isinstance(code, int) else 200


@attrs.frozen
class Envelope:
    version: str
    client_capabilities: dict[str, Any]
    client_info: dict[str, Any] | None
    log_level: str | None


# --- era and envelope ---------------------------------------------------------------------


def header_value(request: Any, name: str) -> str | None:
    value = request.getHeader(name.encode())
    return value.decode("latin-1") if value is not None else None


def is_modern_request(request: Any, message: Message) -> bool:
    """Whether a POST to the MCP endpoint belongs to the stateless era."""
    version = header_value(request, PROTOCOL_VERSION_HEADER)
    if message.get("method") == "initialize":
        # initialize does not exist in the stateless era: under its version header it is an
        # unknown method (404 -32601), otherwise the start of a handshake-era session.
        return version in MODERN_VERSIONS
    if request.getHeader(b"mcp-session-id") is not None:
        return False
    if version is not None and version not in LEGACY_VERSIONS:
        return True
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    return isinstance(meta, dict) and PROTOCOL_VERSION_META in meta


def modern_method_not_allowed(request: Any) -> bool:
    """GET/DELETE: no session and a modern ``MCP-Protocol-Version`` → 405 (no GET stream,
    no session to end in the stateless era)."""
    version = header_value(request, PROTOCOL_VERSION_HEADER)
    return request.getHeader(b"mcp-session-id") is None and version is not None and \
        version not in LEGACY_VERSIONS


def unsupported(requested: Any) -> Rejection:
    return Rejection(UNSUPPORTED_PROTOCOL_VERSION,
                     f"Unsupported protocol version {requested!r}: this server speaks "
                     f"{', '.join(MODERN_VERSIONS)} statelessly and {', '.join(LEGACY_VERSIONS)} "
                     f"after initialize",
                     # Only what server/discover also lists (the handshake-era versions are
                     # reached through initialize, named in the message).
                     {"supported": list(MODERN_VERSIONS), "requested": str(requested or "")})


def duplicated_routing_header(request: Any) -> str | None:
    for name in ROUTING_HEADERS:
        values = request.requestHeaders.getRawHeaders(name.encode()) or []
        if len(values) > 1:
            return name
    return None


def _envelope_meta(params: Any) -> dict[str, Any]:
    """``params._meta``, once it is an object carrying both required envelope keys."""
    meta = params.get("_meta") if isinstance(params, dict) else None
    if not isinstance(meta, dict):
        raise Rejection(INVALID_PARAMS, f"params._meta must be an object carrying the required "
                                        f"{PROTOCOL_VERSION_META!r} and "
                                        f"{CLIENT_CAPABILITIES_META!r} envelope keys")
    missing = [key for key in (PROTOCOL_VERSION_META, CLIENT_CAPABILITIES_META) if key not in meta]
    if missing:
        raise Rejection(INVALID_PARAMS, f"params._meta is missing the required envelope key(s): "
                                        f"{', '.join(missing)}")
    return meta


def _check_headers(message: Message, params: dict[str, Any], version: Any,
                   header: Callable[[str], str | None]) -> None:
    """The routing headers repeat the body: version, then method, then the name it bears."""
    if header(PROTOCOL_VERSION_HEADER) != version:
        raise Rejection(HEADER_MISMATCH, "MCP-Protocol-Version header is missing or does not "
                                         "match the request envelope's protocol version")
    method = message.get("method")
    if header(METHOD_HEADER) != method:
        raise Rejection(HEADER_MISMATCH, "Mcp-Method header is missing or does not match the "
                                         "request body's method")
    name_key = NAME_BEARING_METHODS.get(str(method))
    if name_key is not None and params.get(name_key) is not None and \
            decode_header_value(header(NAME_HEADER)) != params[name_key]:
        raise Rejection(HEADER_MISMATCH, f"Mcp-Name header is missing or does not match the "
                                         f"request body's {name_key!r} parameter")


def _check_version(version: Any) -> str:
    if not isinstance(version, str):
        raise Rejection(INVALID_PARAMS, "the protocol-version envelope value must be a string")
    if version not in MODERN_VERSIONS:
        raise unsupported(version)
    return version


def _capabilities(meta: dict[str, Any]) -> dict[str, Any]:
    capabilities = meta[CLIENT_CAPABILITIES_META]
    if not isinstance(capabilities, dict):
        raise Rejection(INVALID_PARAMS, f"{CLIENT_CAPABILITIES_META} must be an object")
    return capabilities


def _client_info(meta: dict[str, Any]) -> Any:
    info = meta.get(CLIENT_INFO_META)
    if info is not None and not (isinstance(info, dict) and isinstance(info.get("name"), str)
                                 and isinstance(info.get("version"), str)):
        raise Rejection(INVALID_PARAMS, f"{CLIENT_INFO_META} must be an object with a name and "
                                        f"a version")
    return info


def _log_level(meta: dict[str, Any]) -> Any:
    level = meta.get(LOG_LEVEL_META)
    if level is not None and level not in LOG_LEVELS:
        raise Rejection(INVALID_PARAMS, f"{LOG_LEVEL_META} must be one of {', '.join(LOG_LEVELS)}")
    return level


def classify(message: Message, header: Callable[[str], str | None]) -> Envelope:
    """The request's envelope, or ``Rejection`` for the first rung of the ladder it fails.

    The rungs run in this order, each helper raising for its own: the envelope's presence,
    the routing headers, the version, then the capabilities, client info and log level.
    """
    params = message.get("params")
    meta = _envelope_meta(params)
    assert isinstance(params, dict)
    version = meta[PROTOCOL_VERSION_META]
    _check_headers(message, params, version, header)
    checked = _check_version(version)
    capabilities = _capabilities(meta)
    info = _client_info(meta)
    return Envelope(checked, capabilities, info, _log_level(meta))


def legacy_params(params: Any) -> dict[str, Any]:
    """The request's params as a handshake-era upstream accepts them: envelope keys removed."""
    if not isinstance(params, dict):
        return {}
    meta = params.get("_meta")
    if not isinstance(meta, dict):
        return params
    kept = {key: value for key, value in meta.items() if key not in ENVELOPE_KEYS}
    stripped = {key: value for key, value in params.items() if key != "_meta"}
    if kept:
        stripped["_meta"] = kept
    return stripped


def relayed(params: dict[str, Any], envelope: Envelope) -> dict[str, Any]:
    """A call for an upstream of this era, as the client made it: with its capabilities and
    log level, its ``inputResponses`` and ``requestState``; the upstream's ``input_required``
    then goes back to the client as it is (no ``Exchange``, nothing kept here)."""
    meta = dict(params.get("_meta") or {})
    meta[CLIENT_CAPABILITIES_META] = envelope.client_capabilities
    if envelope.log_level is not None:
        meta[LOG_LEVEL_META] = envelope.log_level
    return dict(params, _meta=meta)


def translated(method: str, failure: ProtocolError | UpstreamRequestError
               ) -> ProtocolError | None:
    """A handshake-era error as this era says it, None when it says it the same way:
    "resource not found" is -32002 there (the gateway's own for an unknown URI, or a
    handshake-era upstream's) and -32602 here (SEP-2164); the message and data are kept."""
    error = failure.error_object() if isinstance(failure, ProtocolError) else failure.error
    if method != "resources/read" or error.get("code") != RESOURCE_NOT_FOUND:
        return None
    return ProtocolError(INVALID_PARAMS, str(error.get("message", "")), error.get("data"))


# --- results ------------------------------------------------------------------------------


def server_info(playbook: Playbook) -> dict[str, Any]:
    return dict(SERVER_INFO, name=f"director/{playbook.id}")


def with_server_info(result: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    meta = result.get("_meta")
    if meta is None:
        result["_meta"] = {SERVER_INFO_META: info}
    elif isinstance(meta, dict) and meta.get(SERVER_INFO_META) is None:
        result["_meta"] = {**meta, SERVER_INFO_META: info}
    return result


def shape_result(method: str, value: Any, info: dict[str, Any]) -> dict[str, Any]:
    """A result as the modern era wants it: ``resultType``, cache hints, ``serverInfo``."""
    result = dict(value) if isinstance(value, dict) else {}
    if method in CACHEABLE_METHODS:
        ttl = result.get("ttlMs")
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 0:
            result["ttlMs"] = LIST_TTL_MS
        result["cacheScope"] = "private"
    result.setdefault("resultType", "complete")
    return with_server_info(result, info)


def discover_result(playbook: Playbook) -> dict[str, Any]:
    result: dict[str, Any] = {"supportedVersions": list(MODERN_VERSIONS),
                              "capabilities": {key: dict(value) for key, value
                                               in SERVER_CAPABILITIES.items()}}
    if playbook.description:
        result["instructions"] = playbook.description
    return result
