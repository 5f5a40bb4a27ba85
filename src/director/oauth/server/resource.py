"""The resource side: what the MCP routes ask of a caller before serving a playbook.

* Every 401 of a playbook endpoint says where to sign in (RFC 9728 section 5.1): its
  ``WWW-Authenticate`` names the endpoint's protected-resource metadata and the scopes it
  needs, plus ``error="invalid_token"`` when a token was presented (RFC 6750 section 3.1; a
  request with no credential gets no error code).
* A token is good only on the playbook it was issued for (RFC 8707 audience): on another
  playbook it is *invalid for this resource*, so 401 ``invalid_token`` (MCP: "Invalid or
  expired tokens MUST receive a HTTP 401"), whose challenge sends the client to this
  playbook's metadata to ask for a token of its own — not 403, which would mean "this token,
  with more scope, could do it".
* A token without a scope an operation needs gets 403 ``insufficient_scope`` naming the
  scopes needed (MCP 2026-07-28, Scope Challenge Handling), so the client may step up.
"""

from __future__ import annotations

from director.config import Settings
from director.oauth.server.grants import AccessGrant
from director.oauth.server.metadata import challenge, scopes_needed
from director.playbooks.store import Playbook
from director.web.errors import Unauthorized


def challenged(settings: Settings, refusal: Unauthorized, playbook_id: str,
               transport: str) -> Unauthorized:
    """``refusal`` with the playbook endpoint's challenge."""
    error = "invalid_token" if refusal.code == "invalid_token" else None
    header = challenge(settings, playbook_id, transport, error=error,
                       description=refusal.message if error else None)
    return Unauthorized(refusal.message, code=refusal.code, details=refusal.details,
                        headers={**refusal.headers, "WWW-Authenticate": header})


def audience_refusal(settings: Settings, grant: AccessGrant, playbook: Playbook | None,
                     playbook_id: str, transport: str) -> Unauthorized | None:
    """The 401 of a token used on a playbook it was not issued for, or None."""
    if playbook is not None and playbook.pk == grant.playbook_pk:
        return None
    message = (f"this access token was issued for another playbook, not {playbook_id!r}; "
               "authorize this one")
    return Unauthorized(message, code="invalid_token", headers={
        "WWW-Authenticate": challenge(settings, playbook_id, transport, error="invalid_token",
                                      description=message)})


def missing_scopes(grant: AccessGrant, method: object) -> tuple[str, ...] | None:
    """The scopes ``method`` needs when the grant lacks some of them, else None."""
    needed = scopes_needed(method)
    return needed if not grant.scopes.issuperset(needed) else None


def scope_challenge(settings: Settings, playbook_id: str, transport: str,
                    needed: tuple[str, ...], method: object) -> tuple[str, str]:
    """The message and ``WWW-Authenticate`` of a 403 ``insufficient_scope``."""
    message = (f"{method} needs the scope {' '.join(needed)}; this token was granted less "
               "(authorize again asking for it)")
    return message, challenge(settings, playbook_id, transport, error="insufficient_scope",
                              description=message, scope=needed)
