"""OAuth: the client side (upstream servers) and the authorization server (MCP clients)."""
