"""The stateless era of MCP (2026-07-28) on ``/playbooks/{id}/mcp``, next to the handshake era.

A modern request is one self-contained POST: no ``initialize``, no ``Mcp-Session-Id``; every
request carries ``params._meta`` (``io.modelcontextprotocol/protocolVersion``,
``…/clientCapabilities``, optionally ``…/clientInfo`` and ``…/logLevel``) and the routing headers
``MCP-Protocol-Version``, ``Mcp-Method`` and, for ``tools/call``, ``prompts/get`` and
``resources/read``, ``Mcp-Name``. Any instance can answer any request.

Modules: ``envelope`` (which era a request is, the validation ladder, result shapes),
``exchange`` (one request's answer, and the bridging of an upstream's questions),
``listen`` (``subscriptions/listen``), ``context`` (what one credential's requests on one
playbook share) and ``gateway`` (the entry point).
"""
