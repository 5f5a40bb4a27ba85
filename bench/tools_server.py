"""A stdio MCP server with N tools (default 10), stdlib only, for the Studio's figures.

``python -I -S bench/tools_server.py [N]``: ``tools/list`` gives ``tool_1`` … ``tool_N``, each
with a description and a small input schema (the size of a typical real tool's), and every
``tools/call`` echoes its ``text`` argument; the rest is ``bench.echo_server``'s.
"""

from __future__ import annotations

import sys
from pathlib import Path

# -I (isolated mode) leaves the script's folder off sys.path: the sibling is found here.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from echo_server import answer, serve


def tools(count: int) -> list[dict[str, object]]:
    return [{"name": f"tool_{index}",
             "description": f"Tool number {index}: does one useful thing with its arguments.",
             "inputSchema": {"type": "object", "properties": {
                 "text": {"type": "string", "description": "What to work on"},
                 "count": {"type": "integer", "description": "How many times"},
                 "mode": {"type": "string", "enum": ["fast", "careful"]},
                 "options": {"type": "object", "description": "Anything else"}},
                 "required": ["text"]}}
            for index in range(1, count + 1)]


def main() -> None:
    listed = tools(int(sys.argv[1]) if len(sys.argv) > 1 else 10)

    def respond(message: dict[str, object]) -> dict[str, object] | None:
        response = answer(message)
        if response is not None and message.get("method") == "tools/list":
            return {"jsonrpc": "2.0", "id": message["id"], "result": {"tools": listed}}
        if response is not None and message.get("method") == "tools/call":
            params = message.get("params")
            arguments = params.get("arguments") if isinstance(params, dict) else None
            text = arguments.get("text", "") if isinstance(arguments, dict) else ""
            return {"jsonrpc": "2.0", "id": message["id"],
                    "result": {"content": [{"type": "text", "text": str(text)}]}}
        return response

    serve(respond)


if __name__ == "__main__":
    main()
