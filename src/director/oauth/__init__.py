"""OAuth: the authorization server MCP clients sign in through (``server/``), and the client
side Director uses towards upstream servers (``client/``)."""
