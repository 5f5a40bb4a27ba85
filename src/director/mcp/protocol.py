"""The protocol's numbers and names, defined once: JSON-RPC and MCP error codes, the protocol
versions Director speaks in each era, and the ``_meta`` keys of the 2026-07-28 envelope.
Everything else imports them from here (``jsonrpc`` re-exports the JSON-RPC codes)."""

from __future__ import annotations

# --- JSON-RPC 2.0 -------------------------------------------------------------------------------
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

# --- MCP (the server-defined range) -------------------------------------------------------------
#: The code of the gateway's HTTP-level refusals (401, 403, 404, 409 …) and of a listen stream
#: ended because its credential was revoked (HTTP has said 200 there already).
SERVER_ERROR = -32000
#: A request that timed out, or whose upstream went away.
REQUEST_TIMEOUT = -32001
#: "Resource not found" in the handshake era (2026-07-28 uses INVALID_PARAMS, SEP-2164).
RESOURCE_NOT_FOUND = -32002
#: 2026-07-28: an ``Mcp-*`` header disagrees with the body.
HEADER_MISMATCH = -32020
#: 2026-07-28: the request needs a client capability the client did not declare.
MISSING_REQUIRED_CLIENT_CAPABILITY = -32021
#: 2026-07-28: the protocol version is not one the server speaks.
UNSUPPORTED_PROTOCOL_VERSION = -32022

# --- versions -----------------------------------------------------------------------------------
#: The handshake era's versions, newest first: ``initialize`` negotiates one of them.
LEGACY_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
LATEST_LEGACY_VERSION = LEGACY_VERSIONS[0]
#: The stateless era.
MODERN_VERSION = "2026-07-28"
MODERN_VERSIONS = (MODERN_VERSION,)

# --- the 2026-07-28 envelope (request and result ``_meta``) --------------------------------------
PROTOCOL_VERSION_META = "io.modelcontextprotocol/protocolVersion"
CLIENT_CAPABILITIES_META = "io.modelcontextprotocol/clientCapabilities"
CLIENT_INFO_META = "io.modelcontextprotocol/clientInfo"
LOG_LEVEL_META = "io.modelcontextprotocol/logLevel"
SERVER_INFO_META = "io.modelcontextprotocol/serverInfo"
SUBSCRIPTION_ID_META = "io.modelcontextprotocol/subscriptionId"
