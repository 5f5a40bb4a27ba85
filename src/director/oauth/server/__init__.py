"""The OAuth authorization server that lets MCP clients sign in to Director.

Director is both the protected resource (each playbook's MCP endpoint, RFC 9728 metadata) and
its authorization server (RFC 8414 metadata, ``BASE_URL`` is the issuer): authorization code
with PKCE and a consent page, refresh tokens that rotate, revocation (RFC 7009), clients
identified by a Client ID Metadata Document or registered dynamically (RFC 7591). Tokens are
opaque, bound to one playbook (RFC 8707), stored hashed, and resolved from memory on the MCP
hot path like API keys.

Modules: ``metadata`` (scopes, resources, the discovery documents and challenges),
``resource`` (what the MCP routes ask of a token), ``clients`` and ``documents`` (who the
client is), ``grants`` (codes, tokens, families), ``tokens`` (the in-memory cache), ``pages``
(authorize: login, consent), ``routes`` (the other HTTP endpoints), ``authority`` (the object
the service tree holds), ``connected`` and ``cli`` (Connected apps), ``organisation``
(signing people in through the organisation's OpenID Connect provider).
"""
