"""MCP: JSON-RPC framing, upstream clients, the playbook router and downstream sessions."""
