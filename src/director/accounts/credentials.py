"""Passwords (scrypt), API keys and session tokens: generation, hashing, verification.

Passwords get scrypt (n=2**15, r=8, p=1: ~50 ms and 32 MiB per hash here), always run in a
worker thread by the daemon. API keys and session tokens are 256+ bit random strings, so a
single SHA-256 is enough to store them: nobody can brute-force the preimage, and the hash is
an indexed equality lookup.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import string

SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024

KEY_PREFIX = "dk_"
KEY_BODY_LENGTH = 64
KEY_VISIBLE_LENGTH = 10  # "dk_" + 7 characters: enough to tell keys apart in a list
KEY_PATTERN = re.compile(r"^dk_[A-Za-z0-9]{64}$")
_KEY_ALPHABET = string.ascii_letters + string.digits


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str) -> str:
    """``scrypt$n$r$p$salt$digest`` for storage."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            maxmem=_SCRYPT_MAXMEM, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Constant-time comparison; a malformed stored hash never matches."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = _unb64(digest)
        actual = hashlib.scrypt(password.encode(), salt=_unb64(salt), n=int(n), r=int(r),
                                p=int(p), maxmem=_SCRYPT_MAXMEM, dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


#: Verified against when the email is unknown, so that "no such user" costs as much as
#: "wrong password" and timing does not reveal which accounts exist. A constant (the hash of
#: a random password nobody kept) rather than computed at import: that would cost a scrypt
#: run and 32 MiB on the main thread at every start.
DUMMY_PASSWORD_HASH = ("scrypt$32768$8$1$Mn3RJ7+K9glciOP7QCDYPw$"  # noqa: S105
                       "uvCxevJujqkNbKGkLFOlRy5NP5rwgdoXwLLHOrUDEOg")


def generate_api_key() -> str:
    return KEY_PREFIX + "".join(secrets.choice(_KEY_ALPHABET) for _ in range(KEY_BODY_LENGTH))


def looks_like_api_key(value: str) -> bool:
    return KEY_PATTERN.fullmatch(value) is not None


def hash_token(value: str) -> bytes:
    """Storage hash of an API key or a session token."""
    return hashlib.sha256(value.encode()).digest()


def generate_session_token() -> str:
    return secrets.token_urlsafe(32)
