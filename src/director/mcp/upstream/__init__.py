"""Director as an MCP client of upstream servers: stdio child processes and HTTP servers."""
