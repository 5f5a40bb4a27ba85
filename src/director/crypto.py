"""Secrets at rest: AES-256-GCM with a key derived (HKDF-SHA256) from BETTER_AUTH_SECRET.

Stored form: ``v1:<base64url(nonce || ciphertext+tag)>``. The version prefix leaves room for
rotating the derivation; losing or changing the secret makes stored secrets unreadable (the
deployment guide's warning), and ``open`` then fails loudly rather than returning garbage.
To change the secret without losing them, the old one is kept as BETTER_AUTH_SECRET_PREVIOUS
for a while: values sealed with it still open, and are sealed again with the new one.
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
    """Seals with the current secret; opens with it, or with the previous one during a
    rotation (``BETTER_AUTH_SECRET_PREVIOUS``): ``opened`` says which, so that a value still
    sealed with the previous secret can be sealed again (``director secrets rotate`` does it
    for everything at once)."""

    def __init__(self, auth_secret: str, previous: str | None = None) -> None:
        self._aead = _aead_for(auth_secret)
        self._previous = _aead_for(previous) if previous else None

    def seal(self, plaintext: str, context: str = "") -> str:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), context.encode())
        return f"{_VERSION}:" + base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")

    def open(self, stored: str, context: str = "") -> str:
        return self.opened(stored, context)[0]

    def opened(self, stored: str, context: str = "") -> tuple[str, bool]:
        """``(plaintext, stale)``: ``stale`` when only the previous secret opens it."""
        version, _, payload = stored.partition(":")
        if version != _VERSION:
            raise SecretUnreadable(f"unknown secret format {version!r}")
        try:
            raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        except ValueError as error:
            raise SecretUnreadable("a stored secret is damaged (not base64)") from error
        for aead, stale in ((self._aead, False), (self._previous, True)):
            if aead is None:
                continue
            try:
                return aead.decrypt(raw[:12], raw[12:], context.encode()).decode(), stale
            except (InvalidTag, ValueError):
                continue
        raise SecretUnreadable(
            "a stored secret cannot be decrypted: BETTER_AUTH_SECRET differs from the one "
            "it was stored with" + ("" if self._previous is None else
                                    " (and so does BETTER_AUTH_SECRET_PREVIOUS)"))


def _aead_for(auth_secret: str) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(
        auth_secret.encode())
    return AESGCM(key)
