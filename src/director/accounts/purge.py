"""Expired login sessions deleted from the database, hourly, by one instance at a time.

An expired session is refused already (``store.session_by_token`` reads only live ones), so
deleting it changes nothing anyone sees: it only keeps the table from growing for ever. Every
instance runs the job, at its start and then every ``PURGE_INTERVAL_SECONDS``; a transaction
advisory lock (``store.PURGE_LOCK_KEY``) lets one of them delete while the others skip that
round, so several instances never scan the same rows at once.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from director.accounts.store import purge_expired_sessions
from director.clock import repeating, stop_repeating
from director.db.database import Database

log = Logger(namespace="accounts")

PURGE_INTERVAL_SECONDS = 3600.0


class SessionPurge:
    def __init__(self, database: Database, reactor: Any) -> None:
        self.database = database
        self.reactor = reactor
        self._loop: task.LoopingCall | None = None

    def start(self) -> None:
        self._loop = repeating(self.reactor, PURGE_INTERVAL_SECONDS, self.purge, now=True)

    def stop(self) -> None:
        stop_repeating(self._loop)

    def purge(self) -> defer.Deferred[None]:
        """One round; a failure is logged and the next round tries again (the loop goes on)."""

        def done(deleted: int | None) -> None:
            if deleted:
                log.info("deleted {count} expired login sessions", count=deleted)

        def failed(failure: Any) -> None:
            log.warn("deleting expired login sessions failed: {error}; trying again in an hour",
                     error=failure.getErrorMessage())

        return self.database.run(purge_expired_sessions()).addCallbacks(done, failed)
