"""Director: an MCP gateway daemon on Twisted."""

__version__ = "0.1.0"
