"""Secrets at rest: AES-256-GCM with a key derived (HKDF-SHA256) from BETTER_AUTH_SECRET.

Stored form: ``v1:<base64url(nonce || ciphertext+tag)>``. The version prefix leaves room for
rotating the derivation; losing or changing the secret makes stored secrets unreadable (the
deployment guide's warning), and ``open`` then fails loudly rather than returning garbage.
"""

from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_VERSION = "v1"
_INFO = b"director secrets at rest v1"


class SecretUnreadable(Exception):
    """Stored with another BETTER_AUTH_SECRET, or damaged."""


class SecretBox:
    def __init__(self, auth_secret: str) -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(
            auth_secret.encode())
        self._aead = AESGCM(key)

    def seal(self, plaintext: str, context: str = "") -> str:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), context.encode())
        return f"{_VERSION}:" + base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")

    def open(self, stored: str, context: str = "") -> str:
        version, _, payload = stored.partition(":")
        if version != _VERSION:
            raise SecretUnreadable(f"unknown secret format {version!r}")
        try:
            raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
            return self._aead.decrypt(raw[:12], raw[12:], context.encode()).decode()
        except (InvalidTag, ValueError) as error:
            raise SecretUnreadable(
                "a stored secret cannot be decrypted: BETTER_AUTH_SECRET differs from the one "
                "it was stored with") from error
