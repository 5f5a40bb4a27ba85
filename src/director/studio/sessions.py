"""The cookie sessions of a user, for the account page: list them, end one, end the others.

Ending sessions notifies ``session:<id>`` / ``sessions_of:<user id>`` like every other
account change, so every instance drops them from its cache at once.
"""

from __future__ import annotations

import datetime
from typing import Any
from uuid import UUID

import attrs

from director.db.interactions import Interaction, Query, notify_change


@attrs.frozen
class SessionInfo:
    id: UUID
    created_at: datetime.datetime
    renewed_at: datetime.datetime
    expires_at: datetime.datetime
    user_agent: str
    address: str


def sessions_of(user_id: UUID) -> Interaction[list[SessionInfo]]:
    rows = yield Query(
        "SELECT id, created_at, renewed_at, expires_at, coalesce(user_agent, ''), "
        "coalesce(address, '') FROM sessions WHERE user_id = %s AND expires_at > now() "
        "ORDER BY renewed_at DESC, created_at DESC LIMIT 200", (str(user_id),))
    return [SessionInfo(UUID(str(row[0])), *row[1:]) for row in rows]


def end_session(user_id: UUID, session_id: UUID) -> Interaction[bool]:
    rows: list[Any] = yield Query(
        "DELETE FROM sessions WHERE id = %s AND user_id = %s RETURNING id",
        (str(session_id), str(user_id)))
    if rows:
        yield notify_change("session", session_id)
    return bool(rows)


def end_other_sessions(user_id: UUID, keep: UUID) -> Interaction[int]:
    rows: list[Any] = yield Query(
        "DELETE FROM sessions WHERE user_id = %s AND id <> %s RETURNING id",
        (str(user_id), str(keep)))
    if rows:
        yield notify_change("sessions_of", user_id)
    return len(rows)
