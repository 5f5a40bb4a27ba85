"""The fastest useful MCP server: newline-delimited JSON-RPC on stdin/stdout, stdlib only.

``python -I -S bench/echo_server.py`` answers ``initialize``, ``ping``, ``tools/list`` (one
tool, ``echo``) and ``tools/call`` of ``echo`` (the ``text`` argument back as text content);
anything else that expects an answer gets "method not found". It keeps no state, so requests
before ``initialize`` are answered too. No ``mcp`` import, no asyncio, no threads, no argparse:
it starts in ~20 ms and costs a few microseconds per call, so that what the latency benchmark
measures is the gateway's own cost. It exits at end of input.

``--eras both`` makes it speak the stateless era (2026-07-28) as well, the way a dual-era
server does: it answers ``server/discover`` (``supportedVersions`` 2026-07-28 then the
handshake versions, ``capabilities``, ``serverInfo`` in ``_meta``), adds ``"resultType":
"complete"`` to the results of requests whose ``params._meta`` carries the 2026-07-28 envelope,
and answers ``subscriptions/listen`` with "method not found" (-32601), which tells a client not to
ask again. The default, ``--eras handshake``, answers ``server/discover`` with "method not
found" as a handshake-only server does.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

_TOOL = {
    "name": "echo",
    "description": "Return the text unchanged.",
    "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}},
                    "required": ["text"]},
}
_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
_SERVER_INFO = {"name": "bench-echo", "version": "1.0"}
MODERN_VERSION = "2026-07-28"
_PROTOCOL_VERSION_META = "io.modelcontextprotocol/protocolVersion"
_DISCOVERED = {"supportedVersions": [MODERN_VERSION, *_VERSIONS], "capabilities": {"tools": {}},
               "_meta": {"io.modelcontextprotocol/serverInfo": _SERVER_INFO}}


def answer(message: dict[str, object], modern: bool = False) -> dict[str, object] | None:
    """The response to one message (None for a notification or a response); ``modern``: also
    the stateless era (``--eras both``)."""
    if "id" not in message or "method" not in message:
        return None
    request_id, method = message["id"], message["method"]
    params = message.get("params")
    params = params if isinstance(params, dict) else {}
    response = _handshake_era(request_id, method, params)
    if not modern:
        return response
    if method == "server/discover":
        response = {"jsonrpc": "2.0", "id": request_id, "result": dict(_DISCOVERED)}
    meta = params.get("_meta")
    result = response.get("result")
    if isinstance(result, dict) and isinstance(meta, dict) \
            and meta.get(_PROTOCOL_VERSION_META) == MODERN_VERSION:
        result["resultType"] = "complete"
    return response


def _handshake_era(request_id: object, method: object,
                   params: dict[str, object]) -> dict[str, object]:
    if method == "tools/call":
        arguments = params.get("arguments")
        arguments = arguments if isinstance(arguments, dict) else {}
        if params.get("name") != "echo":
            return {"jsonrpc": "2.0", "id": request_id,
                    "result": {"content": [{"type": "text", "text": "unknown tool"}],
                               "isError": True}}
        return {"jsonrpc": "2.0", "id": request_id,
                "result": {"content": [{"type": "text", "text": str(arguments.get("text", ""))}]}}
    if method == "initialize":
        asked = params.get("protocolVersion")
        return {"jsonrpc": "2.0", "id": request_id, "result": {
            "protocolVersion": asked if asked in _VERSIONS else _VERSIONS[0],
            "capabilities": {"tools": {}}, "serverInfo": _SERVER_INFO}}
    if method == "tools/list":
        return {"jsonrpc": "2.0", "id": request_id, "result": {"tools": [_TOOL]}}
    if method == "ping":
        return {"jsonrpc": "2.0", "id": request_id, "result": {}}
    return {"jsonrpc": "2.0", "id": request_id,
            "error": {"code": -32601, "message": f"method not found: {method}"}}


def _eras(argv: list[str]) -> str:
    """``--eras handshake|both`` (or ``--eras=…``); anything else is a usage error."""
    if not argv:
        return "handshake"
    if len(argv) == 2 and argv[0] == "--eras" and argv[1] in ("handshake", "both"):
        return argv[1]
    if len(argv) == 1 and argv[0] in ("--eras=handshake", "--eras=both"):
        return argv[0].partition("=")[2]
    sys.exit("usage: echo_server.py [--eras handshake|both]")


def serve(respond: Callable[[dict[str, object]], dict[str, object] | None]) -> None:
    """Answer each line of standard input with ``respond(message)`` until it ends."""
    reader, writer = sys.stdin.buffer, sys.stdout.buffer
    for line in reader:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if not isinstance(message, dict):
            continue
        response = respond(message)
        if response is not None:
            writer.write(json.dumps(response, separators=(",", ":")).encode() + b"\n")
            writer.flush()


def main() -> None:
    modern = _eras(sys.argv[1:]) == "both"
    serve(lambda message: answer(message, modern))


if __name__ == "__main__":
    main()
