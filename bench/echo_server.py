"""The fastest useful MCP server: newline-delimited JSON-RPC on stdin/stdout, stdlib only.

``python -I -S bench/echo_server.py`` answers ``initialize``, ``ping``, ``tools/list`` (one
tool, ``echo``) and ``tools/call`` of ``echo`` (the ``text`` argument back as text content);
anything else that expects an answer gets "method not found". No ``mcp`` import, no asyncio,
no threads: it starts in ~20 ms and costs a few microseconds per call, so that what the
latency benchmark measures is the gateway's own cost. It exits at end of input.
"""

from __future__ import annotations

import json
import sys

_TOOL = {
    "name": "echo",
    "description": "Return the text unchanged.",
    "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}},
                    "required": ["text"]},
}
_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")


def answer(message: dict[str, object]) -> dict[str, object] | None:
    """The response to one message (None for a notification or a response)."""
    if "id" not in message or "method" not in message:
        return None
    request_id, method = message["id"], message["method"]
    params = message.get("params")
    params = params if isinstance(params, dict) else {}
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
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "bench-echo", "version": "1.0"}}}
    if method == "tools/list":
        return {"jsonrpc": "2.0", "id": request_id, "result": {"tools": [_TOOL]}}
    if method == "ping":
        return {"jsonrpc": "2.0", "id": request_id, "result": {}}
    return {"jsonrpc": "2.0", "id": request_id,
            "error": {"code": -32601, "message": f"method not found: {method}"}}


def main() -> None:
    reader, writer = sys.stdin.buffer, sys.stdout.buffer
    for line in reader:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if not isinstance(message, dict):
            continue
        response = answer(message)
        if response is not None:
            writer.write(json.dumps(response, separators=(",", ":")).encode() + b"\n")
            writer.flush()


if __name__ == "__main__":
    main()
