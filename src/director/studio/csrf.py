"""Cross-site request forgery tokens for every state-changing Studio form.

A signed-in form carries ``HMAC-SHA256(key, "session:" + session id)``: it is the same for
every form of one session (so several tabs work), useless to anyone without the session, and
changes at every sign-in. Forms used before signing in (setup, login, sign-up) cannot tie the
token to a session, so they use a random value in a cookie of their own (``director_csrf``)
and carry ``HMAC(key, "anonymous:" + value)``: a cross-site page can neither read that cookie
nor set it (it is ``HttpOnly``, ``SameSite=Lax``, scoped to ``/studio``), which stops login
CSRF (signing a victim into the attacker's account).

The key is derived (HKDF) from the auth secret with a label of its own, so it is unrelated
to the key that seals secrets at rest. Comparisons are constant-time. This comes on top of
the edge's Origin check and the authenticator's "Origin or JSON" rule for cookie requests.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from uuid import UUID

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FIELD = "csrf_token"
ANONYMOUS_COOKIE = "director_csrf"
_INFO = b"director studio csrf v1"


class CsrfTokens:
    def __init__(self, auth_secret: str) -> None:
        self._key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                         info=_INFO).derive(auth_secret.encode())

    def _sign(self, message: str) -> str:
        return hmac.new(self._key, message.encode(), hashlib.sha256).hexdigest()

    def for_session(self, session_id: UUID) -> str:
        return self._sign(f"session:{session_id}")

    def for_anonymous(self, cookie_value: str) -> str:
        return self._sign(f"anonymous:{cookie_value}")

    def session_token_valid(self, session_id: UUID, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(
            self.for_session(session_id).encode(), presented.encode("utf-8", "replace"))

    def anonymous_token_valid(self, cookie_value: str | None, presented: str | None) -> bool:
        return bool(cookie_value) and presented is not None and hmac.compare_digest(
            self.for_anonymous(cookie_value or "").encode(),
            presented.encode("utf-8", "replace"))


def new_anonymous_value() -> str:
    return secrets.token_urlsafe(24)
