"""When each API key was last used, for the account page, without a write per request.

Each instance notes the time of a key's latest use in memory (``used``, a dictionary store
from the authenticator's ``key_observers``) and writes what it noted once every
``FLUSH_SECONDS`` in one statement, never moving a time backwards (another instance may have
written a later one). So "last used" is exact to the minute across instances, and exact on
this instance when read with ``last_used`` (which adds what is not written yet).
"""

from __future__ import annotations

import datetime
from typing import Any
from uuid import UUID

from twisted.internet import defer, task
from twisted.logger import Logger

from director.db.database import Database
from director.db.interactions import Interaction, Query

log = Logger(namespace="accounts")

FLUSH_SECONDS = 60.0


def write_uses(uses: dict[UUID, datetime.datetime]) -> Interaction[None]:
    ids = [str(key_id) for key_id in uses]
    yield Query(
        "UPDATE api_keys SET last_used_at = greatest(coalesce(last_used_at, used.at), used.at) "
        "FROM unnest(%s::uuid[], %s::timestamptz[]) AS used(id, at) WHERE api_keys.id = used.id",
        (ids, list(uses.values())))


def uses_of(user_id: UUID) -> Interaction[dict[UUID, datetime.datetime]]:
    rows = yield Query("SELECT id, last_used_at FROM api_keys WHERE user_id = %s "
                       "AND revoked_at IS NULL AND last_used_at IS NOT NULL", (str(user_id),))
    return {UUID(str(row[0])): row[1] for row in rows}


def _as_datetimes(uses: dict[UUID, float]) -> dict[UUID, datetime.datetime]:
    return {key_id: datetime.datetime.fromtimestamp(at, datetime.UTC) for key_id, at in uses.items()}


class KeyUsage:
    def __init__(self, database: Database, reactor: Any) -> None:
        self.database = database
        self.reactor = reactor
        # Clock seconds, made datetimes only when written or read: a request pays for a float.
        self._pending: dict[UUID, float] = {}
        self._loop: task.LoopingCall | None = None

    def used(self, key: Any) -> None:
        """An authenticated request with ``key`` (an ``ApiKey``): a dictionary store."""
        self._pending[key.id] = self.reactor.seconds()

    def start(self) -> None:
        self._loop = task.LoopingCall(self.flush)
        self._loop.clock = self.reactor
        self._loop.start(FLUSH_SECONDS, now=False)

    def stop(self) -> defer.Deferred[None]:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self.flush()

    def flush(self) -> defer.Deferred[None]:
        if not self._pending:
            return defer.succeed(None)
        uses, self._pending = self._pending, {}

        def failed(failure: Any) -> None:
            for key_id, at in uses.items():  # try again at the next flush
                if key_id not in self._pending or self._pending[key_id] < at:
                    self._pending[key_id] = at
            log.warn("recording API key uses failed: {error}", error=failure.getErrorMessage())

        d = self.database.run(write_uses(_as_datetimes(uses)))
        d.addCallbacks(lambda _: None, failed)
        return d

    async def last_used(self, user_id: UUID) -> dict[UUID, datetime.datetime]:
        written = await self.database.run(uses_of(user_id))
        for key_id, at in _as_datetimes(self._pending).items():
            if key_id not in written or written[key_id] < at:
                written[key_id] = at
        return written
