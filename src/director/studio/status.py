"""A server's status as this instance's engine sees it, for the playbook page.

States: ``connected``, ``starting`` (not yet started, starting, or restarting after a crash),
``error`` (with the last error and when it happened), ``unauthorized`` (the server answered
401/403: its credentials are wrong or missing), ``refused`` (the configuration forbids it:
a stdio server without ``DANGEROUSLY_ALLOW_ARBITRARY_STDIO_SERVERS``, or the engine refused it
by configuration), ``disabled``. The view is the Studio session's: HTTP servers have one
upstream session per client session, so another client may see a different state; a stdio
server's process is shared by the playbook's clients, so its state is everyone's.
"""

from __future__ import annotations

import datetime

import attrs

from director.config import Settings
from director.mcp.upstreams import RETRY_AFTER_FAILURE_SECONDS, Upstream
from director.playbooks.model import Server
from director.playbooks.rails import STDIO_FLAG

LABELS = {"connected": "connected", "starting": "starting", "error": "error",
          "unauthorized": "unauthorized", "refused": "refused by configuration",
          "disabled": "disabled", "idle": "not started"}


@attrs.frozen
class ServerStatus:
    state: str
    detail: str = ""
    since: datetime.datetime | None = None
    transport: str | None = None
    era: str | None = None
    protocol: str | None = None
    stderr: tuple[str, ...] = ()  # a stdio server's last lines there, newest last

    @property
    def label(self) -> str:
        return LABELS[self.state]


def _wall(reactor_time: float) -> datetime.datetime:
    """A time of the reactor's clock (``IReactorTime.seconds``: the wall clock) as a date."""
    return datetime.datetime.fromtimestamp(reactor_time, datetime.UTC)


def server_status(settings: Settings, server: Server, upstream: Upstream | None) -> ServerStatus:
    if server.disabled:
        return ServerStatus("disabled", "disabled in this playbook: clients do not see it")
    if server.type == "stdio" and not settings.allow_arbitrary_stdio_servers:
        return ServerStatus("refused", f"stdio servers are refused by this daemon's "
                                       f"configuration ({STDIO_FLAG} is off)")
    if upstream is None or upstream.closed or upstream.server != server:
        return ServerStatus("idle", "starts when the playbook is used")
    session = upstream.session
    if session is not None:
        transport = getattr(session, "transport_name", None) or (
            "stdio" if server.type == "stdio" else server.type)
        era = getattr(session, "era", None) or "legacy"
        result = session.initialize_result or {}
        protocol = result.get("protocolVersion") or getattr(session, "protocol_version", None)
        state = getattr(session, "state", "ready")
        stderr = getattr(session, "recent_stderr", ())
        if state == "failed":
            return ServerStatus("error", str(getattr(session, "_last_error", "") or
                                             "the process failed"), transport=transport,
                                stderr=stderr)
        if state in ("starting", "restarting"):
            return ServerStatus("starting", f"{state} the process", transport=transport)
        return ServerStatus("connected", "", transport=transport, era=era,
                            protocol=str(protocol) if protocol else None, stderr=stderr)
    if upstream.starting is not None:
        return ServerStatus("starting", "connecting")
    if upstream.error is not None:
        since = _wall(upstream.retry_at - RETRY_AFTER_FAILURE_SECONDS)
        message = upstream.error
        lowered = message.lower()
        if "refused by configuration" in lowered:
            return ServerStatus("refused", message, since)
        if "http 401" in lowered or "http 403" in lowered:
            return ServerStatus("unauthorized", message, since)
        return ServerStatus("error", message, since)
    return ServerStatus("idle", "starts when the playbook is used")
