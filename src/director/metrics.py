"""Prometheus metrics of one ``DirectorService``: its registry, its instruments, its listener.

Each service owns one ``Metrics`` (its own ``CollectorRegistry``; nothing goes to
``prometheus_client``'s global one), so two services in one process count separately.

* Counters and histograms are written where things happen: ``DirectorSite.log`` (HTTP),
  ``DownstreamSession.handle`` (MCP, per playbook) and ``director.mcp.timing`` (per upstream
  server), ``McpEngine`` (sessions created and ended, upstream restarts),
  ``director.mcp.handshake`` (``initialize``),
  ``Authenticator`` (rate-limit refusals, authentication failures).
* Gauges are read from the service tree when scraped (``ServiceCollector``): nothing is kept
  up to date on the hot path for them.
* Labels are bounded: an HTTP route is the template of the route that matched
  (``/playbooks/{playbook_id}/mcp``; never the raw path, which holds ids and keys), ``other``
  when none did; methods (HTTP and JSON-RPC) outside the known set are ``other``, so a client
  cannot grow the number of series. Playbooks (by their internal id, ``pk``: never an owner,
  a name or anything a client sent) and their servers (by name) come and go: the first
  ``MAX_PLAYBOOK_SERIES`` playbooks and ``MAX_SERVER_SERIES`` (playbook, server) pairs used
  since start get series of their own, the rest share ``other``, and a playbook deleted (or a
  server removed from it) has its series removed and its place freed. Nothing is labelled by
  user, session or tool argument.

The endpoint is off unless ``METRICS_LISTEN`` is set, and then served on a listener of its own
that answers ``/metrics`` and nothing else — never on the gateway's port. On a loopback
address it also refuses ``Host`` headers that are not loopback names (DNS rebinding). With
neither ``METRICS_LISTEN`` nor telemetry (which reports the MCP counts), the service keeps no
``Metrics`` at all and this module is not imported.

``prometheus_client`` (rather than a hand-written registry): exposition escaping, histogram
series and ``process_*`` metrics are its job, and it costs about 10 ms and 0.6 MB of resident
memory to import on top of the rest of the daemon (this module, all told, about 1.3 MB).
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from uuid import UUID

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.process_collector import ProcessCollector
from twisted.web import http, server
from twisted.web.resource import Resource

from director import __version__
from director.mcp.upstream.base import LEGACY_VERSIONS
from director.web.hosts import host_name, is_loopback_name
from director.web.routes import OTHER, route_template

if TYPE_CHECKING:
    from director.accounts.cache import AccountCache
    from director.db.database import Database
    from director.mcp.engine import McpEngine
    from director.mcp.upstreams import Upstream
    from director.playbooks.cache import PlaybookCache
    from director.playbooks.store import Playbook

# ``*_created`` series double the series count and say nothing a restart counter does not.
prometheus_client.disable_created_metrics()

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: JSON-RPC methods a downstream session answers (``DownstreamSession._dispatch``).
MCP_METHODS = frozenset({
    "initialize", "ping", "tools/list", "tools/call", "prompts/list", "prompts/get",
    "resources/list", "resources/templates/list", "resources/read", "resources/subscribe",
    "resources/unsubscribe", "completion/complete", "logging/setLevel", "server/discover",
})
MCP_OUTCOMES = ("ok", "error", "timeout", "cancelled")
#: ``error``: the server answered with a JSON-RPC error; ``failed``: no answer (unreachable,
#: process exited, malformed reply).
UPSTREAM_OUTCOMES = ("ok", "error", "failed", "timeout", "cancelled")
SESSION_TRANSPORTS = ("streamable", "sse", "modern")
#: Why a session ended: closed by its client, idle expiry, the per-user cap, its credential
#: revoked, its playbook deleted, the daemon stopping.
SESSION_END_REASONS = ("client", "idle", "cap", "revoked", "deleted", "shutdown")
INITIALIZE_TRANSPORTS = ("streamable", "sse")
AUTH_FAILURE_REASONS = ("missing", "invalid_key", "revoked", "disabled", "expired_session",
                        "pending", "invalid_token")
MAX_PLAYBOOK_SERIES = 100
MAX_SERVER_SERIES = 300
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0, 60.0)
#: Tool calls run from sub-millisecond to the longest upstream timeouts (minutes).
MCP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
               10.0, 30.0, 60.0, 120.0, 300.0)
#: Per playbook and per server: fewer buckets, as there are many more of these label sets.
TARGET_BUCKETS = (0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 60.0, 300.0)
#: The gateway's own part of a request: budgets are 0.5 ms (p50) and 2 ms (p99).
GATEWAY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5)
UPSTREAM_TYPES = ("stdio", "http", "sse")
UPSTREAM_STATES = ("starting", "started", "restarting", "failed")
#: What ``generate_latest`` writes: the classic text format every scraper reads.
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The registry and the instruments of one service."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "director_http_requests", "HTTP requests answered on the gateway's port.",
            ("route", "method", "status"), registry=self.registry)
        self.http_seconds = Histogram(
            "director_http_request_seconds",
            "Time from request received to response finished (event streams excluded).",
            ("route", "method"), buckets=HTTP_BUCKETS, registry=self.registry)
        self.mcp_requests = Counter(
            "director_mcp_requests", "MCP (JSON-RPC) requests answered by a downstream session.",
            ("method", "outcome"), registry=self.registry)
        self.mcp_seconds = Histogram(
            "director_mcp_request_seconds", "Time to answer an MCP request.", ("method",),
            buckets=MCP_BUCKETS, registry=self.registry)
        self.mcp_gateway_seconds = Histogram(
            "director_mcp_gateway_seconds",
            "Time to answer an MCP request minus the time spent waiting for upstream answers.",
            ("method",), buckets=GATEWAY_BUCKETS, registry=self.registry)
        self.rate_limited = Counter(
            "director_rate_limited", "Requests refused (429) by a rate limit (an API key's or a user's).",
            registry=self.registry)
        self.auth_failures = Counter(
            "director_auth_failures", "Requests refused for their credentials, by reason.",
            ("reason",), registry=self.registry)
        self.sessions_created = Counter(
            "director_mcp_sessions_created", "Downstream MCP sessions opened.", ("transport",),
            registry=self.registry)
        self.sessions_ended = Counter(
            "director_mcp_sessions_ended", "Downstream MCP sessions ended, by reason.",
            ("transport", "reason"), registry=self.registry)
        self.initializations = Counter(
            "director_mcp_initialize", "MCP initialize requests answered (handshake era), by "
            "transport and negotiated protocol version.", ("transport", "version"),
            registry=self.registry)
        self.playbook_requests = Counter(
            "director_playbook_requests", "MCP requests answered, by playbook and outcome.",
            ("playbook", "outcome"), registry=self.registry)
        self.playbook_seconds = Histogram(
            "director_playbook_request_seconds", "Time to answer an MCP request, by playbook.",
            ("playbook",), buckets=TARGET_BUCKETS, registry=self.registry)
        self.upstream_requests = Counter(
            "director_upstream_requests", "Requests to upstream servers, by outcome.",
            ("playbook", "server", "outcome"), registry=self.registry)
        self.upstream_seconds = Histogram(
            "director_upstream_request_seconds", "Time waiting for an upstream server's answer.",
            ("playbook", "server"), buckets=TARGET_BUCKETS, registry=self.registry)
        self.upstream_restarts = Counter(
            "director_upstream_restarts", "Upstream sessions restarted (stdio: process respawned; "
            "HTTP: re-initialised after the server forgot it).", ("playbook", "server"),
            registry=self.registry)
        self.tracing_dropped = Counter(
            "director_tracing_spans_dropped", "Spans not exported (OTEL_* tracing): the batch "
            "queue was full, or the collector did not take their batch.", ("reason",),
            registry=self.registry)
        ProcessCollector(registry=self.registry)
        # Label children and route templates, looked up once each (labels() costs ~4 µs).
        self._http: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._mcp: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self._templates: dict[tuple[str, str], str] = {}
        # Per playbook pk: {outcome: children}; per playbook pk: {(server, outcome): children}.
        self._playbooks: dict[UUID, dict[str, tuple[Any, Any]]] = {}
        self._servers: dict[UUID, dict[tuple[str, str], tuple[Any, Any]]] = {}
        # Which playbooks and (playbook, server) pairs have series of their own.
        self._playbook_labels: dict[UUID, str] = {}
        self._server_labels: dict[tuple[UUID, str], tuple[str, str]] = {}
        self._fixed_sets()

    def _fixed_sets(self) -> None:
        """Series of the fixed label sets exist from the start, at 0 (``increase()`` then sees
        the first event, and a dashboard shows 0 rather than nothing)."""
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.labels(reason)
        for transport in SESSION_TRANSPORTS:
            self.sessions_created.labels(transport)
            for reason in SESSION_END_REASONS:
                self.sessions_ended.labels(transport, reason)
        for transport in INITIALIZE_TRANSPORTS:
            for version in LEGACY_VERSIONS:
                self.initializations.labels(transport, version)

    # --- instruments ----------------------------------------------------------------------

    def http_request(self, request: http.Request, seconds: float) -> None:
        """Count a finished request; time it unless it was an event stream."""
        method = request.method.decode("latin-1")
        if method not in HTTP_METHODS:
            method = OTHER
        key = (self.route(request), method, int(request.code))
        children = self._http.get(key)
        if children is None:
            children = self._http[key] = (
                self.http_requests.labels(key[0], method, str(key[2])),
                self.http_seconds.labels(key[0], method))
        children[0].inc()
        content_type = request.responseHeaders.getRawHeaders(b"content-type") or [b""]
        if not content_type[0].startswith(b"text/event-stream") or method != "GET":
            children[1].observe(seconds)

    def mcp_request(self, method: object, outcome: str, seconds: float,
                    playbook: UUID | None = None, upstream_seconds: float = 0.0) -> None:
        """One MCP request answered, ``upstream_seconds`` of its time spent waiting for
        upstream answers."""
        name = method if isinstance(method, str) and method in MCP_METHODS else OTHER
        key = (name, outcome)
        children = self._mcp.get(key)
        if children is None:
            children = self._mcp[key] = (self.mcp_requests.labels(name, outcome),
                                         self.mcp_seconds.labels(name),
                                         self.mcp_gateway_seconds.labels(name))
        children[0].inc()
        children[1].observe(seconds)
        children[2].observe(max(0.0, seconds - upstream_seconds))
        if playbook is None:
            return
        mine = self._playbooks.get(playbook)
        if mine is None:
            mine = self._playbooks[playbook] = {}
        found = mine.get(outcome)
        if found is None:
            label = self._playbook_label(playbook)
            found = mine[outcome] = (self.playbook_requests.labels(label, outcome),
                                     self.playbook_seconds.labels(label))
        found[0].inc()
        found[1].observe(seconds)

    def upstream_request(self, playbook: UUID, server: str, outcome: str,
                         seconds: float) -> None:
        """One request to an upstream server answered (or failed) after ``seconds``."""
        mine = self._servers.get(playbook)
        if mine is None:
            mine = self._servers[playbook] = {}
        found = mine.get((server, outcome))
        if found is None:
            labels = self._server_label(playbook, server)
            found = mine[(server, outcome)] = (self.upstream_requests.labels(*labels, outcome),
                                               self.upstream_seconds.labels(*labels))
        found[0].inc()
        found[1].observe(seconds)

    def upstream_restarted(self, playbook: UUID | None, server: str) -> None:
        labels = self._server_label(playbook, server) if playbook is not None else (OTHER, OTHER)
        self.upstream_restarts.labels(*labels).inc()

    def session_created(self, transport: str) -> None:
        self.sessions_created.labels(transport).inc()

    def session_ended(self, transport: str, reason: str) -> None:
        self.sessions_ended.labels(transport, reason).inc()

    def initialized(self, transport: str, version: str) -> None:
        self.initializations.labels(transport, version).inc()

    def auth_failure(self, reason: str) -> None:
        self.auth_failures.labels(reason).inc()

    # --- bounded playbook and server labels ----------------------------------------------

    def _playbook_label(self, playbook: UUID) -> str:
        label = self._playbook_labels.get(playbook)
        if label is None:
            if len(self._playbook_labels) >= MAX_PLAYBOOK_SERIES:
                return OTHER
            label = self._playbook_labels[playbook] = str(playbook)
        return label

    def _server_label(self, playbook: UUID, server: str) -> tuple[str, str]:
        labels = self._server_labels.get((playbook, server))
        if labels is None:
            if len(self._server_labels) >= MAX_SERVER_SERIES:
                return OTHER, OTHER
            labels = self._server_labels[(playbook, server)] = (str(playbook), server)
        return labels

    def playbook_changed(self, old: Playbook | None, new: Playbook | None) -> None:
        """A ``PlaybookCache`` listener: a deleted playbook's series, and those of servers
        removed from a playbook, are removed and their places freed."""
        if new is None:
            if old is not None:
                self._forget_playbook(old.pk)
            return
        if old is None or old.servers == new.servers:
            return
        kept = {server.name for server in new.servers}
        for pk, name in [pair for pair in self._server_labels
                         if pair[0] == new.pk and pair[1] not in kept]:
            self._forget_server(pk, name)
        mine = self._servers.get(new.pk, {})
        for key in [key for key in mine if key[0] not in kept]:
            del mine[key]

    def _forget_playbook(self, playbook: UUID) -> None:
        self._playbooks.pop(playbook, None)
        label = self._playbook_labels.pop(playbook, None)
        if label is not None:
            for outcome in MCP_OUTCOMES:
                _remove(self.playbook_requests, label, outcome)
            _remove(self.playbook_seconds, label)
        for pk, name in [pair for pair in self._server_labels if pair[0] == playbook]:
            self._forget_server(pk, name)
        self._servers.pop(playbook, None)

    def _forget_server(self, playbook: UUID, server: str) -> None:
        labels = self._server_labels.pop((playbook, server))
        for outcome in UPSTREAM_OUTCOMES:
            _remove(self.upstream_requests, *labels, outcome)
        _remove(self.upstream_seconds, *labels)
        _remove(self.upstream_restarts, *labels)

    def route(self, request: http.Request) -> str:
        """The template of the Klein route that answered (``director.web.routes``)."""
        return route_template(request, self._templates)

    # --- reading --------------------------------------------------------------------------

    def register(self, collector: Any) -> None:
        self.registry.register(collector)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def mcp_requests_by_method(self) -> dict[str, int]:
        """Requests answered since start, by method (all outcomes): what telemetry reports."""
        totals: dict[str, int] = {}
        for family in self.mcp_requests.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    method = sample.labels["method"]
                    totals[method] = totals.get(method, 0) + int(sample.value)
        return totals


def _remove(family: Any, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never observed
        family.remove(*labels)


def upstream_state(upstream: Upstream) -> str | None:
    """starting, started, restarting or failed; None for one closed or never used."""
    if upstream.closed:
        return None
    session = upstream.session
    if session is not None:
        state = getattr(session, "state", "ready")  # StdioUpstream reports its own
        if state == "closed":
            return None
        return "started" if state == "ready" else state
    if upstream.starting is not None:
        return "starting"
    if upstream.error is not None:
        return "failed"
    return None


class ServiceCollector:
    """Gauges read from the service tree at scrape time."""

    def __init__(self, engine: McpEngine, database: Database, accounts: AccountCache,
                 playbooks: PlaybookCache) -> None:
        self.engine = engine
        self.database = database
        self.accounts = accounts
        self.playbooks = playbooks

    def collect(self) -> Iterator[Metric]:
        build = GaugeMetricFamily("director_build_info", "Version of this Director (always 1).",
                                  labels=("version", "python"))
        build.add_metric((__version__, platform.python_version()), 1)
        yield build

        sessions = GaugeMetricFamily("director_mcp_sessions",
                                     "Open downstream MCP sessions, by transport.",
                                     labels=("transport",))
        by_transport = {"streamable": 0, "sse": 0}
        for session in self.engine.sessions.values():
            by_transport[session.transport] = by_transport.get(session.transport, 0) + 1
        for transport, count in by_transport.items():
            sessions.add_metric((transport,), count)
        yield sessions
        yield GaugeMetricFamily("director_mcp_streams",
                                "Open server-sent-event streams to MCP clients.",
                                value=len(self.engine.streams))

        upstreams = GaugeMetricFamily("director_upstreams",
                                      "Upstream MCP server sessions, by type and state.",
                                      labels=("type", "state"))
        counts = {(kind, state): 0 for kind in UPSTREAM_TYPES for state in UPSTREAM_STATES}
        for upstream in self._upstreams():
            state = upstream_state(upstream)
            if state is None:
                continue
            key = (upstream.server.type, state)
            counts[key] = counts.get(key, 0) + 1
        for (kind, state), count in counts.items():
            upstreams.add_metric((kind, state), count)
        yield upstreams

        yield GaugeMetricFamily("director_database_available",
                                "1 when the query pool and the LISTEN connection are both up.",
                                value=1 if self.database.available else 0)
        pool_up, pool_size, listening = self.database.connection_states()
        pool = GaugeMetricFamily("director_database_pool_connections",
                                 "Query pool connections, by state.", labels=("state",))
        pool.add_metric(("up",), pool_up)
        pool.add_metric(("down",), pool_size - pool_up)
        yield pool
        yield GaugeMetricFamily("director_database_listen_up",
                                "1 when the LISTEN connection (cache invalidation) is up.",
                                value=1 if listening else 0)

        caches = GaugeMetricFamily("director_cache_entries", "Entries in the in-memory caches.",
                                   labels=("cache",))
        caches.add_metric(("users",), len(self.accounts.users))
        caches.add_metric(("api_keys",), len(self.accounts.keys_by_id))
        caches.add_metric(("playbooks",), len(self.playbooks))
        yield caches

    def _upstreams(self) -> list[Upstream]:
        found = {id(u): u for u in self.engine.upstreams.shared_upstreams()}
        for session in self.engine.sessions.values():
            found.update((id(u), u) for u in session.upstreams.values())
        return list(found.values())


# --- the listener ---------------------------------------------------------------------------


def endpoint_description(listen: str) -> str:
    """The Twisted server endpoint for a ``METRICS_LISTEN`` value (as normalised by config)."""
    if listen.startswith("unix:"):
        # lockfile: a socket left by a killed daemon is replaced, a live one is not.
        return f"{listen}:mode=660:lockfile=1"
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if ":" in host:
        escaped = host.replace(":", "\\:")  # endpoint strings use ':' as their separator
        return f"tcp6:{port}:interface={escaped}"
    return f"tcp:{port}:interface={host}"


def _loopback_host(header: bytes | None) -> bool:
    return is_loopback_name(host_name((header or b"").decode("latin-1")))


class MetricsResource(Resource):
    """``/metrics`` and nothing else."""

    isLeaf = True

    def __init__(self, metrics: Metrics, check_host: bool) -> None:
        super().__init__()
        self.metrics = metrics
        self.check_host = check_host

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        if request.path != b"/metrics":
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"not found: metrics are at /metrics\n"
        if self.check_host and not _loopback_host(request.getHeader(b"host")):
            request.setResponseCode(403)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"forbidden: this listener answers loopback names only\n"
        request.setHeader(b"content-type", CONTENT_TYPE)
        return self.metrics.exposition()


class MetricsSite(server.Site):
    """The metrics listener's site: no access log (a scrape every few seconds is noise)."""

    def __init__(self, metrics: Metrics, listen: str) -> None:
        check_host = not listen.startswith("unix:")
        if check_host:
            from director.config import metrics_listen_is_loopback

            check_host = metrics_listen_is_loopback(listen)
        super().__init__(MetricsResource(metrics, check_host))
        self.noisy = False
        self.displayTracebacks = False

    def log(self, request: http.Request) -> None:
        pass
