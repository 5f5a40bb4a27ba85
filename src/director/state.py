"""Files the daemon keeps in its state directory (besides the embedded database)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from director.config import MIN_SECRET_LENGTH, Settings

AUTH_SECRET_FILE = "auth-secret"  # noqa: S105 - a file name, not a secret


def auth_secret(settings: Settings) -> str:
    """``BETTER_AUTH_SECRET``, or outside production one generated once and kept 0600.

    Production requires the variable (the configuration refuses to start without it), so a
    generated secret can never silently replace the operator's.
    """
    if settings.auth_secret is not None:
        return settings.auth_secret
    if settings.production:
        raise RuntimeError("BETTER_AUTH_SECRET is required in production")
    directory = Path(settings.state_directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / AUTH_SECRET_FILE
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if len(existing) >= MIN_SECRET_LENGTH:
        return existing
    generated = secrets.token_urlsafe(48)
    # O_EXCL: two processes racing to create it keep the first one's secret.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(generated + "\n")
    return generated
