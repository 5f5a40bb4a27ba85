"""Account storage: every read and write of users, sessions and API keys, as interactions.

Each function returns an interaction (see ``director.db.interactions``) so the daemon and the
admin commands share one implementation. Changes that other instances cache (users' status,
API keys) end with ``notify_change`` inside the same transaction.
"""

from __future__ import annotations

import datetime
from typing import Any
from uuid import UUID

import attrs
import psycopg2.errors

from director.accounts.credentials import KEY_VISIBLE_LENGTH, generate_api_key, hash_token
from director.db.interactions import Interaction, Query, notify_change

SESSION_LIFETIME = datetime.timedelta(days=7)
SESSION_RENEW_AFTER = datetime.timedelta(days=1)
DEFAULT_KEY_NAME = "default"


class EmailTaken(Exception):
    """Another account already uses this email."""


class NameTaken(Exception):
    """The user already has a live API key of this name."""


class NoSuchThing(Exception):
    """The object does not exist, or belongs to someone else (callers answer 404 either way)."""


@attrs.frozen
class User:
    id: UUID
    email: str
    status: str
    created_at: datetime.datetime
    password_hash: str = attrs.field(repr=False, default="")

    def public(self) -> dict[str, Any]:
        return {"id": str(self.id), "email": self.email, "status": self.status,
                "created_at": self.created_at.isoformat()}


@attrs.frozen
class ApiKey:
    id: UUID
    user_id: UUID
    name: str
    prefix: str
    created_at: datetime.datetime
    rate_limit_window_seconds: int | None = None
    rate_limit_max_requests: int | None = None
    key_hash: bytes = attrs.field(repr=False, default=b"")

    def public(self) -> dict[str, Any]:
        return {"id": str(self.id), "name": self.name, "prefix": self.prefix,
                "created_at": self.created_at.isoformat(),
                "rate_limit": {"window_seconds": self.rate_limit_window_seconds,
                               "max_requests": self.rate_limit_max_requests}}


@attrs.frozen
class NewKey:
    """A key just created: the only moment its full value exists outside the client."""

    record: ApiKey
    value: str

    def public(self) -> dict[str, Any]:
        return {**self.record.public(), "key": self.value}


@attrs.frozen
class Session:
    id: UUID
    user_id: UUID
    expires_at: datetime.datetime
    renewed_at: datetime.datetime


_USER_COLUMNS = "id, email, status, created_at, password_hash"
_KEY_COLUMNS = ("id, user_id, name, prefix, created_at, rate_limit_window_seconds, "
                "rate_limit_max_requests, key_hash")


def _user(row: tuple[Any, ...]) -> User:
    return User(UUID(str(row[0])), row[1], row[2], row[3], row[4])


def _key(row: tuple[Any, ...]) -> ApiKey:
    return ApiKey(UUID(str(row[0])), UUID(str(row[1])), row[2], row[3], row[4], row[5], row[6],
                  bytes(row[7]))


def _insert_key(user_id: UUID, name: str) -> Interaction[NewKey]:
    value = generate_api_key()
    try:
        rows = yield Query(
            f"INSERT INTO api_keys (user_id, name, prefix, key_hash) VALUES (%s, %s, %s, %s) "
            f"RETURNING {_KEY_COLUMNS}",
            (str(user_id), name, value[:KEY_VISIBLE_LENGTH], hash_token(value)),
        )
    except psycopg2.errors.UniqueViolation:
        raise NameTaken(name) from None
    record = _key(rows[0])
    yield notify_change("api_key", record.id)
    return NewKey(record, value)


# --- users ------------------------------------------------------------------------------


def create_user(email: str, password_hash: str, status: str,
                with_default_key: bool = True) -> Interaction[tuple[User, NewKey | None]]:
    """A user (and the ``default`` API key every account starts with)."""
    try:
        rows = yield Query(
            f"INSERT INTO users (email, password_hash, status) VALUES (%s, %s, %s) "
            f"RETURNING {_USER_COLUMNS}",
            (email, password_hash, status),
        )
    except psycopg2.errors.UniqueViolation:
        raise EmailTaken(email) from None
    user = _user(rows[0])
    yield notify_change("user", user.id)
    key = (yield from _insert_key(user.id, DEFAULT_KEY_NAME)) if with_default_key else None
    return user, key


def user_by_email(email: str) -> Interaction[User | None]:
    rows = yield Query(f"SELECT {_USER_COLUMNS} FROM users WHERE email = %s", (email,))
    return _user(rows[0]) if rows else None


def user_by_id(user_id: UUID) -> Interaction[User | None]:
    rows = yield Query(f"SELECT {_USER_COLUMNS} FROM users WHERE id = %s", (str(user_id),))
    return _user(rows[0]) if rows else None


def list_users(limit: int, after_email: str | None = None) -> Interaction[list[User]]:
    rows = yield Query(
        f"SELECT {_USER_COLUMNS} FROM users WHERE %s::text IS NULL OR email > %s "
        "ORDER BY email LIMIT %s",
        (after_email, after_email, limit),
    )
    return [_user(row) for row in rows]


def all_users() -> Interaction[list[User]]:
    rows = yield Query(f"SELECT {_USER_COLUMNS} FROM users")
    return [_user(row) for row in rows]


def set_status(email: str, status: str) -> Interaction[User]:
    rows = yield Query(
        f"UPDATE users SET status = %s, updated_at = now() WHERE email = %s "
        f"RETURNING {_USER_COLUMNS}",
        (status, email),
    )
    if not rows:
        raise NoSuchThing(email)
    user = _user(rows[0])
    if status == "disabled":
        yield Query("DELETE FROM sessions WHERE user_id = %s", (str(user.id),))
    yield notify_change("user", user.id)
    return user


def set_password(user_id: UUID, password_hash: str) -> Interaction[None]:
    """New password; every session of the user is revoked (the caller may start a new one)."""
    rows = yield Query(
        "UPDATE users SET password_hash = %s, updated_at = now() WHERE id = %s RETURNING id",
        (password_hash, str(user_id)),
    )
    if not rows:
        raise NoSuchThing(str(user_id))
    yield Query("DELETE FROM sessions WHERE user_id = %s", (str(user_id),))
    yield notify_change("sessions_of", user_id)


# --- sessions ---------------------------------------------------------------------------


def create_session(user_id: UUID, token: str, user_agent: str | None,
                   address: str | None) -> Interaction[Session]:
    rows = yield Query(
        "INSERT INTO sessions (user_id, token_hash, expires_at, user_agent, address) "
        "VALUES (%s, %s, now() + %s, %s, %s) RETURNING id, user_id, expires_at, renewed_at",
        (str(user_id), hash_token(token), SESSION_LIFETIME, (user_agent or "")[:500], address),
    )
    row = rows[0]
    return Session(UUID(str(row[0])), UUID(str(row[1])), row[2], row[3])


def session_by_token(token: str) -> Interaction[Session | None]:
    rows = yield Query(
        "SELECT id, user_id, expires_at, renewed_at FROM sessions "
        "WHERE token_hash = %s AND expires_at > now()",
        (hash_token(token),),
    )
    if not rows:
        return None
    row = rows[0]
    return Session(UUID(str(row[0])), UUID(str(row[1])), row[2], row[3])


def renew_session(session_id: UUID) -> Interaction[datetime.datetime | None]:
    """The session's new expiry; None when it no longer exists."""
    rows = yield Query(
        "UPDATE sessions SET renewed_at = now(), expires_at = now() + %s WHERE id = %s "
        "RETURNING expires_at",
        (SESSION_LIFETIME, str(session_id)),
    )
    return rows[0][0] if rows else None


def delete_session(token: str) -> Interaction[None]:
    rows = yield Query("DELETE FROM sessions WHERE token_hash = %s RETURNING id",
                       (hash_token(token),))
    if rows:
        yield notify_change("session", rows[0][0])


#: Held (for one transaction) by the instance deleting expired sessions: one at a time.
PURGE_LOCK_KEY = 0x0D12EC7016


def purge_expired_sessions() -> Interaction[int | None]:
    """Delete the sessions past their expiry (refused already, kept by nobody): how many, or
    None when another instance is purging at this moment (it deletes the same rows)."""
    rows = yield Query("SELECT pg_try_advisory_xact_lock(%s)", (PURGE_LOCK_KEY,))
    if not rows[0][0]:
        return None
    rows = yield Query("WITH gone AS (DELETE FROM sessions WHERE expires_at <= now() "
                       "RETURNING 1) SELECT count(*) FROM gone")
    return int(rows[0][0])


# --- API keys ---------------------------------------------------------------------------


def create_key(user_id: UUID, name: str) -> Interaction[NewKey]:
    return (yield from _insert_key(user_id, name))


def live_keys() -> Interaction[list[ApiKey]]:
    rows = yield Query(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE revoked_at IS NULL")
    return [_key(row) for row in rows]


def live_key(key_id: UUID) -> Interaction[ApiKey | None]:
    rows = yield Query(
        f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id = %s AND revoked_at IS NULL",
        (str(key_id),),
    )
    return _key(rows[0]) if rows else None


def keys_of(user_id: UUID, limit: int, after: tuple[str, str] | None = None
            ) -> Interaction[list[ApiKey]]:
    """Live keys of a user, by creation time then id (a stable cursor for pagination)."""
    after_time, after_id = after if after else (None, None)
    rows = yield Query(
        f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE user_id = %s AND revoked_at IS NULL "
        "AND (%s::timestamptz IS NULL OR (created_at, id) > (%s::timestamptz, %s::uuid)) "
        "ORDER BY created_at, id LIMIT %s",
        (str(user_id), after_time, after_time, after_id, limit),
    )
    return [_key(row) for row in rows]


def revoke_key(user_id: UUID, key_id: UUID) -> Interaction[ApiKey]:
    """Revoke one of *this user's* keys; anyone else's is reported as not existing."""
    rows = yield Query(
        f"UPDATE api_keys SET revoked_at = now() WHERE id = %s AND user_id = %s "
        f"AND revoked_at IS NULL RETURNING {_KEY_COLUMNS}",
        (str(key_id), str(user_id)),
    )
    if not rows:
        raise NoSuchThing(str(key_id))
    record = _key(rows[0])
    yield notify_change("api_key", record.id)
    return record


def regenerate_key(user_id: UUID, key_id: UUID) -> Interaction[NewKey]:
    """Revoke a key and create its replacement under the same name and limits, atomically."""
    old = yield from revoke_key(user_id, key_id)
    new = yield from _insert_key(user_id, old.name)
    if old.rate_limit_window_seconds or old.rate_limit_max_requests:
        rows = yield Query(
            f"UPDATE api_keys SET rate_limit_window_seconds = %s, rate_limit_max_requests = %s "
            f"WHERE id = %s RETURNING {_KEY_COLUMNS}",
            (old.rate_limit_window_seconds, old.rate_limit_max_requests, str(new.record.id)),
        )
        new = NewKey(_key(rows[0]), new.value)
    return new


def set_key_limits(user_id: UUID, key_id: UUID, window_seconds: int | None,
                   max_requests: int | None) -> Interaction[ApiKey]:
    rows = yield Query(
        f"UPDATE api_keys SET rate_limit_window_seconds = %s, rate_limit_max_requests = %s "
        f"WHERE id = %s AND user_id = %s AND revoked_at IS NULL RETURNING {_KEY_COLUMNS}",
        (window_seconds, max_requests, str(key_id), str(user_id)),
    )
    if not rows:
        raise NoSuchThing(str(key_id))
    record = _key(rows[0])
    yield notify_change("api_key", record.id)
    return record
