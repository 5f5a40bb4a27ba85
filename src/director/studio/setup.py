"""First-run setup: the one-time token that lets someone create the first account.

Why a token and not "requests from loopback": behind nginx on the same host every request
arrives from loopback, so loopback proves nothing about who is at the keyboard. The token
proves access to the daemon's log (or to the host, through ``director setup-url``): while no
user exists, each instance creates one at start and logs ``open <BASE_URL>/studio/setup?token=…
to create the first account`` once; ``director setup-url`` prints a fresh one and invalidates
every older one. Only SHA-256 hashes are stored (``studio_setup_tokens``), so every instance
and the CLI agree on what is valid. A token lives ``TOKEN_LIFETIME``; creating the first
account consumes it, deletes every other one, and closes the setup page for good (it answers
404 once any user exists).
"""

from __future__ import annotations

import datetime
import secrets

from director.accounts import store
from director.accounts.credentials import hash_token
from director.db.interactions import Interaction, Query

TOKEN_LIFETIME = datetime.timedelta(hours=24)
#: Serialises first-account creation across instances (two tokens used at the same moment).
SETUP_LOCK_KEY = 0x0D12EC7015


class SetupClosed(Exception):
    """An account exists already: the setup page is closed."""


class TokenInvalid(Exception):
    """Unknown, used, replaced or expired token."""


def setup_url(base_url: str, token: str) -> str:
    return f"{base_url}/studio/setup?token={token}"


def any_user() -> Interaction[bool]:
    rows = yield Query("SELECT EXISTS (SELECT 1 FROM users)")
    return bool(rows[0][0])


def issue_token(replace_older: bool) -> Interaction[str | None]:
    """A new token while no user exists (None once one does). ``replace_older``: the CLI's
    ``setup-url`` invalidates every token issued before."""
    yield Query("SELECT pg_advisory_xact_lock(%s)", (SETUP_LOCK_KEY,))
    if (yield from any_user()):
        return None
    token = secrets.token_urlsafe(32)
    if replace_older:
        yield Query("DELETE FROM studio_setup_tokens")
    yield Query("DELETE FROM studio_setup_tokens WHERE expires_at <= now()")
    yield Query("INSERT INTO studio_setup_tokens (token_hash, expires_at) VALUES (%s, now() + %s)",
                (hash_token(token), TOKEN_LIFETIME))
    return token


def token_valid(token: str) -> Interaction[bool]:
    rows = yield Query("SELECT EXISTS (SELECT 1 FROM studio_setup_tokens WHERE token_hash = %s "
                       "AND expires_at > now())", (hash_token(token),))
    return bool(rows[0][0])


def create_first_user(token: str, email: str,
                      password_hash: str) -> Interaction[tuple[store.User, store.NewKey | None]]:
    """The first account (active, with its default key), if ``token`` is valid and no user
    exists; every setup token is gone afterwards."""
    yield Query("SELECT pg_advisory_xact_lock(%s)", (SETUP_LOCK_KEY,))
    if (yield from any_user()):
        raise SetupClosed()
    rows = yield Query("DELETE FROM studio_setup_tokens WHERE token_hash = %s "
                       "AND expires_at > now() RETURNING 1", (hash_token(token),))
    if not rows:
        raise TokenInvalid()
    yield Query("DELETE FROM studio_setup_tokens")
    return (yield from store.create_user(email, password_hash, "active"))
