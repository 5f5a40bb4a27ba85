"""Anonymous usage reports (``TELEMETRY_ENABLED``, off by default): what, when, and nothing else.

One JSON object is POSTed to ``TELEMETRY_URL`` when the daemon is first healthy, then every
24 hours give or take an hour (random, so that instances started together do not report
together). Its fields are exactly those of ``REPORT_FIELDS``; README.rst, Telemetry, documents
each one, and tests/test_telemetry.py checks the two agree. Counts come from the database
(deployment-wide); ``uptime_seconds`` and ``mcp_requests`` are this instance's. No email,
name, URL, key, playbook content or tool argument is ever read for it.

A report that cannot be sent is logged at debug level and dropped; its MCP counts are carried
into the next one. Nothing here can delay or fail a request: the report is built from one
short database transaction and the POST has a 10 s deadline.
"""

from __future__ import annotations

import json
import random
from typing import TYPE_CHECKING, Any

import treq
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers

from director import __version__
from director.db.database import Database
from director.db.interactions import Interaction, Query

if TYPE_CHECKING:
    from director.metrics import Metrics

log = Logger(namespace="telemetry")

INTERVAL_SECONDS = 24 * 3600.0
JITTER_SECONDS = 3600.0
TIMEOUT_SECONDS = 10.0
REPORT_FIELDS = ("deployment_id", "version", "uptime_seconds", "users", "playbooks", "servers",
                 "mcp_requests")
SERVER_TYPES = ("stdio", "http", "sse")


def deployment_counts() -> Interaction[dict[str, Any]]:
    """The deployment's id and how many users, playbooks and servers (by type) it has."""
    rows = yield Query("SELECT id FROM deployment")
    deployment_id = str(rows[0][0]) if rows else None
    rows = yield Query("SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM playbooks)")
    users, playbooks = rows[0]
    rows = yield Query("SELECT type, count(*) FROM playbook_servers GROUP BY type")
    servers = dict.fromkeys(SERVER_TYPES, 0)
    servers.update({str(kind): int(count) for kind, count in rows})
    return {"deployment_id": deployment_id, "users": int(users), "playbooks": int(playbooks),
            "servers": servers}


class TelemetryService(Service):
    """Sends the reports; started by ``DirectorService`` once healthy, only when enabled."""

    name = "telemetry"

    def __init__(self, url: str, database: Database, metrics: Metrics, reactor: Any,
                 started_at: float) -> None:
        self.url = url
        self.database = database
        self.metrics = metrics
        self.reactor = reactor
        self.started_at = started_at  # reactor.seconds() at the daemon's start
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        #: MCP requests by method already reported (cumulative counts at the last delivery).
        self.reported: dict[str, int] = {}
        self._call: Any = None  # IDelayedCall of the next report
        self._sending: defer.Deferred[bool] | None = None

    def begin(self) -> None:
        """The daemon is healthy: report now, then about once a day."""
        if self.running and self._call is None and self._sending is None:
            self._call = self.reactor.callLater(0, self._fire)

    def stopService(self) -> Any:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._sending is not None:
            self._sending.cancel()

    def _fire(self) -> None:
        self._call = None
        self._sending = defer.ensureDeferred(self.send())

        def next_one(_: object) -> None:
            self._sending = None
            if self.running:
                delay = INTERVAL_SECONDS + random.uniform(-JITTER_SECONDS, JITTER_SECONDS)  # noqa: S311
                self._call = self.reactor.callLater(delay, self._fire)

        self._sending.addBoth(next_one)

    async def report(self, totals: dict[str, int] | None = None) -> dict[str, Any]:
        """The report as it would be sent now (``REPORT_FIELDS``, in that order); ``totals``:
        the MCP request counts since start to report against (default: the current ones)."""
        if totals is None:
            totals = self.metrics.mcp_requests_by_method()
        counts = await self.database.run(deployment_counts())
        since = {method: count - self.reported.get(method, 0) for method, count in totals.items()}
        return {
            "deployment_id": counts["deployment_id"],
            "version": __version__,
            "uptime_seconds": int(self.reactor.seconds() - self.started_at),
            "users": counts["users"],
            "playbooks": counts["playbooks"],
            "servers": counts["servers"],
            "mcp_requests": {method: count for method, count in sorted(since.items()) if count},
        }

    async def send(self) -> bool:
        """Build and POST one report; True when the receiver accepted it. Never raises."""
        try:
            totals = self.metrics.mcp_requests_by_method()
            body = await self.report(totals)
            posting = defer.ensureDeferred(self._post(json.dumps(body).encode()))
            status = await posting.addTimeout(TIMEOUT_SECONDS, self.reactor)
        except defer.CancelledError:
            return False
        except Exception as error:
            log.debug("telemetry report not sent: {error}", error=str(error) or repr(error))
            return False
        if not 200 <= status < 300:
            log.debug("telemetry report refused: HTTP {status}", status=status)
            return False
        self.reported = totals
        log.debug("telemetry report sent")
        return True

    async def _post(self, body: bytes) -> int:
        response = await treq.post(
            self.url, data=body, pool=self.pool, reactor=self.reactor, unbuffered=True,
            headers=Headers({"content-type": ["application/json"],
                             "user-agent": [f"director/{__version__}"]}))
        await treq.collect(response, lambda _: None)  # read and drop: never buffer a reply
        return int(response.code)
