"""Validation of account input: normalised emails, password rules, key names.

Every problem is reported per field, so the API can answer 400 with all of them at once.
"""

from __future__ import annotations

import unicodedata
from typing import Any

MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 256
MAX_EMAIL_LENGTH = 254
MAX_NAME_LENGTH = 100


class ValidationFailed(Exception):
    """Input that fails validation; ``fields`` maps each field to what is wrong with it."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__("; ".join(f"{name}: {problem}" for name, problem in fields.items()))
        self.fields = fields


def normalise_email(value: Any) -> str:
    """NFKC, trimmed, lower-cased; one ``@`` with a non-empty local part and a dotted domain."""
    if not isinstance(value, str):
        raise ValidationFailed({"email": "must be a string"})
    email = unicodedata.normalize("NFKC", value).strip().lower()
    if not email:
        raise ValidationFailed({"email": "is required"})
    if len(email) > MAX_EMAIL_LENGTH:
        raise ValidationFailed({"email": f"must be at most {MAX_EMAIL_LENGTH} characters"})
    local, at, domain = email.rpartition("@")
    if (not at or not local or "@" in local or "." not in domain.strip(".")
            or domain.startswith(".") or domain.endswith(".") or ".." in domain
            or any(c.isspace() or unicodedata.category(c)[0] == "C" for c in email)):
        raise ValidationFailed({"email": "is not a valid email address"})
    return email


def check_password(value: Any, field: str = "password") -> str:
    if not isinstance(value, str):
        raise ValidationFailed({field: "must be a string"})
    if len(value) < MIN_PASSWORD_LENGTH:
        raise ValidationFailed({field: f"must be at least {MIN_PASSWORD_LENGTH} characters"})
    if len(value) > MAX_PASSWORD_LENGTH:
        raise ValidationFailed({field: f"must be at most {MAX_PASSWORD_LENGTH} characters"})
    if "\x00" in value:
        raise ValidationFailed({field: "must not contain NUL characters"})
    if _has_lone_surrogate(value):
        raise ValidationFailed({field: "must be valid Unicode text"})
    return value


def _has_lone_surrogate(value: str) -> bool:
    # JSON can carry "\ud800" alone; it has no UTF-8 form, so it could be neither hashed nor stored.
    return any(0xD800 <= ord(c) <= 0xDFFF for c in value)


def check_name(value: Any, field: str = "name") -> str:
    if not isinstance(value, str):
        raise ValidationFailed({field: "must be a string"})
    if len(value) > MAX_NAME_LENGTH:
        raise ValidationFailed({field: f"must be at most {MAX_NAME_LENGTH} characters"})
    if _has_lone_surrogate(value):
        raise ValidationFailed({field: "must be valid Unicode text"})
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise ValidationFailed({field: "must not contain control characters"})
    name = unicodedata.normalize("NFKC", value).strip()
    if not name:
        raise ValidationFailed({field: "must not be empty"})
    return name
