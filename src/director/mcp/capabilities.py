"""Client capabilities: those the gateway relays, what upstreams are told, what a request needs.

A server→client request of an upstream (``sampling/createMessage``, ``elicitation/create`` in
form or URL mode, ``roots/list``) is relayed to a client, so what an upstream is told its
client can do (``initialize``'s ``capabilities``, the stateless envelope's
``clientCapabilities``) is decided by who will answer:

* an upstream session of one downstream session (HTTP and SSE servers, stdio servers with
  ``isolate_sessions``) is told what that client declared, of what the gateway relays
  (``relayed``): the server then offers exactly what its client can answer —
  server-everything registers ``trigger-url-elicitation`` only for a client that declared
  ``elicitation.url``, and a client that cannot answer URL elicitation never sees it;
* a shared stdio process serves every handshake-era session of its playbook, clients that
  declare different things and come and go while it runs, and it is initialised once: it is
  told everything the gateway relays (``GATEWAY``). Telling it only what the clients of the
  moment have in common would hide tools from clients that can use them, for the life of the
  process. Its requests reach the session that used it last, which is refused there
  (``missing``: the error that client would give) when it did not declare what is asked;
* a 2026-07-28 request carries its own ``clientCapabilities``, so the upstreams of a modern
  context are told the gateway's whole set too, and each request's own declaration is checked
  when an upstream asks (``modern.exchange.Exchange``: -32021 naming what is missing).
"""

from __future__ import annotations

from typing import Any

#: The capabilities whose server→client requests the gateway relays.
RELAYED = ("sampling", "elicitation", "roots")
#: Everything the gateway can relay (2025-11-25 shapes; a client's roots list changes are
#: forwarded upstream, hence ``listChanged``).
GATEWAY: dict[str, Any] = {"roots": {"listChanged": True}, "sampling": {},
                           "elicitation": {"form": {}, "url": {}}}
#: Which client capability each server→client request needs.
ASKED = {"sampling/createMessage": "sampling", "elicitation/create": "elicitation",
         "roots/list": "roots"}


def relayed(declared: dict[str, Any]) -> dict[str, Any]:
    """What a client declared (its ``capabilities``) that the gateway relays, as declared."""
    return {name: value for name, value in declared.items()
            if name in RELAYED and isinstance(value, dict)}


def missing(method: str, params: dict[str, Any], declared: dict[str, Any]
            ) -> dict[str, Any] | None:
    """The capability ``method`` (with ``params``) needs and ``declared`` lacks, in the shape
    a -32021 error's ``requiredCapabilities`` names it (``{"elicitation": {"url": {}}}``), or
    None. An ``elicitation`` declared empty means form mode only (2025-06-18's shape)."""
    capability = ASKED.get(method)
    if capability is None:
        return None
    offered = declared.get(capability)
    if not isinstance(offered, dict):
        return {capability: {}}
    if capability == "elicitation":
        mode = "url" if params.get("mode") == "url" else "form"
        modes = offered or {"form": {}}
        if mode not in modes:
            return {capability: {mode: {}}}
    return None


def describe(required: dict[str, Any]) -> str:
    """``elicitation.url`` for ``{"elicitation": {"url": {}}}``."""
    ((capability, detail),) = required.items()
    return ".".join([capability, *detail])
