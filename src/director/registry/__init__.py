"""MCP Registry: finding servers in a registry (``client``), the registry's documents as values
(``catalogue``), turning an entry into a playbook server (``install``) and what the operator
trusts (``trust``)."""
