"""The service tree: database (embedded or external), schema check, HTTP listener, systemd.

Start order, and why:

0. every dangerous setting in force is logged (one warning each, ``config.dangerous_settings``)
   and STDIO_USER is checked against the private cluster's account, before anything listens;
1. the HTTP port (and ``METRICS_LISTEN``) listens at once (``READY=1`` follows), so load
   balancers get an honest 503 with a reason instead of a refused connection while the database
   is still coming up; a port in use ends the start before ``READY=1`` with exit status 1 (a
   restart may find it free: the holder can be the previous instance, still draining);
2. the database: the private cluster is started when ``DATABASE_URL`` is unset; an external
   one is retried until it answers (``database unreachable … retrying`` is logged once);
3. the schema: migrated automatically for the embedded database, only *checked* for an external
   one (operators run ``director db upgrade``); an un-migrated or too-new schema stops the
   daemon with a FATAL line naming the command to run, and exit status 78 (``EX_CONFIG``:
   the units' ``RestartPreventExitStatus=78`` stops systemd from restarting it in a loop —
   only the operator can fix it);
4. the pool and the LISTEN connection; ``/api/health`` turns 200 when both are up.

Stop (SIGTERM/SIGINT): health turns 503, the port stops accepting, open connections are given
``SHUTDOWN_TIMEOUT_SECONDS`` to finish and are then cut, the database connections close, and the
private cluster is shut down.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.application.service import MultiService
from twisted.internet import defer, endpoints, task, threads
from twisted.logger import Logger

from director import __version__, state, systemd, tracing
from director.accounts.cache import AccountCache
from director.accounts.purge import SessionPurge
from director.accounts.ratelimit import RateLimiter
from director.collector import Collector, heap_trimmer
from director.config import Settings, dangerous_settings, host_is_loopback
from director.crypto import SecretBox, SecretUnreadable
from director.db import migrate
from director.db.database import Database
from director.db.embedded import EmbeddedDatabaseError, EmbeddedPostgres, ExitWatch
from director.mcp.clock import MonotonicClock
from director.mcp.engine import McpEngine
from director.mcp.factory import upstream_factory
from director.mcp.shared_sessions import SharedSessions
from director.mcp.upstream.account import clashes_with_database, stdio_account
from director.mcp.upstream.connect import CheckedEndpoints
from director.mcp.upstream.eras import EraMemory
from director.mcp.upstream.http_plumbing import new_pool
from director.mcp.upstreams import UpstreamManager
from director.oauth.client.routes import UpstreamOAuthPages
from director.oauth.client.service import UpstreamAuthorizations
from director.oauth.client.sessions import follow as follow_authorizations
from director.oauth.server.authority import AuthorizationServer
from director.oauth.server.tokens import TokenCache
from director.playbooks.cache import PlaybookCache
from director.registry.client import RegistryClient
from director.sandbox.launcher import Launcher, SandboxError, Unboxed, stdio_launcher
from director.studio.routes import Studio
from director.web.app import DirectorApp
from director.web.auth import Authenticator
from director.web.edge import DirectorSite, EdgeResource
from director.web.mcp_routes import McpRoutes
from director.web.v1 import ApiV1

if TYPE_CHECKING:
    from director.metrics import Metrics
    from director.telemetry import TelemetryService
    from director.tracing_export import TracingExport

log = Logger(namespace="gateway")

EX_CONFIG = 78  # sysexits.h: systemd units can use RestartPreventExitStatus= on it


class FatalStartupError(Exception):
    """The daemon cannot serve; the message says what to do. ``exit_code`` 78 when a restart
    cannot help (the operator must act), 1 otherwise."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class DirectorService(MultiService):
    """The whole daemon. Two of these can run in one process (tests do), sharing nothing."""

    def __init__(self, settings: Settings, reactor: Any, listen: str | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self.listen_description = listen or (
            f"tcp:{settings.port}:interface={settings.host}:backlog=1024"
        )
        self.auth_secret = state.auth_secret(settings)
        self.embedded: EmbeddedPostgres | None = None
        self.postmaster_watch: ExitWatch | None = None
        self.database_lost: str | None = None  # the private cluster ended under us
        if settings.embedded_database:
            self.embedded = EmbeddedPostgres(Path(settings.state_directory))
        dsn = settings.database_url if self.embedded is None else self.embedded.dsn()
        assert dsn is not None
        self.database = Database(dsn, settings.database_pool_size, reactor)
        self.accounts = AccountCache(self.database, reactor)
        self.rate_limiter = RateLimiter(self.database, reactor)
        self.session_purge = SessionPurge(self.database, reactor)
        # This service's own registry; only when something reads it (prometheus_client then
        # costs ~1 MB of resident memory, nothing otherwise; the instruments check for None).
        self.metrics: Metrics | None = None
        if settings.metrics_listen is not None or settings.telemetry_enabled:
            from director.metrics import Metrics

            self.metrics = Metrics()
        #: OpenTelemetry's provider and exporter when OTEL_* configure an endpoint.
        self.tracing: TracingExport | None = None
        if settings.tracing_endpoint is not None:
            from director.tracing_export import TracingExport

            self.tracing = TracingExport(settings, self.metrics, reactor)
            tracing.install(self.tracing.tracer)
        #: OAuth access tokens, resolved on the MCP hot path like API keys.
        self.oauth_tokens = TokenCache(self.database, reactor)
        self.authenticator = Authenticator(settings, self.database, self.accounts,
                                           self.rate_limiter, reactor, self.metrics,
                                           self.oauth_tokens)
        self.port: Any = None  # IListeningPort
        self.metrics_port: Any = None  # IListeningPort of METRICS_LISTEN
        self.site: DirectorSite | None = None
        self.secret_box = SecretBox(self.auth_secret, settings.auth_secret_previous)
        self.playbooks = PlaybookCache(self.database, self.secret_box)
        self.http_pool = new_pool(reactor, endpoints=CheckedEndpoints(
            reactor, allow_insecure=settings.allow_insecure_http_servers))
        #: Who stdio children run as: STDIO_USER when the daemon is root, else the daemon.
        self.stdio_account = stdio_account(settings.stdio_user)
        #: How stdio servers are boxed (director.sandbox); a mode that cannot work stops the
        #: start (``_check_stdio_account``).
        self.stdio_launcher: Launcher = Unboxed()
        self.stdio_sandbox_refused: str | None = None
        try:
            self.stdio_launcher = stdio_launcher(settings, self.stdio_account, self.auth_secret)
        except SandboxError as refused:
            self.stdio_sandbox_refused = str(refused)
        #: The users' upstream OAuth credentials (director.oauth.client).
        self.upstream_oauth = UpstreamAuthorizations(settings, self.database, self.secret_box,
                                                     reactor, self.http_pool)
        #: What the upstream sessions learn of which era each server speaks, shared by all.
        self.eras = EraMemory(reactor)
        factory = upstream_factory(reactor, self.http_pool, self.stdio_account,
                                   self.stdio_launcher,
                                   authorizations=self._upstream_authorization, eras=self.eras)
        self.mcp = McpEngine(settings, self.playbooks,
                             UpstreamManager(factory, settings, eras=self.eras), reactor,
                             clock=MonotonicClock(reactor),
                             max_sessions_per_user=settings.mcp_max_sessions_per_user,
                             idle_seconds=settings.mcp_session_idle_seconds,
                             metrics=self.metrics)
        self.collector = Collector(reactor, lambda: self.mcp.streams.slicer.running > 0,
                                   trim_heap=heap_trimmer())
        #: Handshake-era and /sse sessions served by any instance (issue 17).
        self.shared_sessions = SharedSessions(self.database, reactor, self.mcp,
                                              settings.mcp_event_log_events,
                                              settings.mcp_event_log_seconds)
        self.mcp.shared = self.shared_sessions
        self.mcp.instance_tag = "." + self.shared_sessions.tag
        self.accounts.watch(self.mcp)  # a revoked credential ends the sessions it opened
        self.oauth_tokens.watch(self.mcp)  # and so does a revoked OAuth grant
        follow_authorizations(self.mcp, self.upstream_oauth)
        if self.metrics is not None:
            from director.metrics import ServiceCollector

            self.metrics.register(ServiceCollector(self.mcp, self.database, self.accounts,
                                                   self.playbooks))
            self.playbooks.subscribe(self.metrics.playbook_changed)
        self.registry = RegistryClient(settings.registry_url, reactor)
        api_v1 = ApiV1(settings, self.database, self.authenticator, self.playbooks,
                       self.secret_box, self.registry, reactor, oauth=self.upstream_oauth)
        self.studio = Studio(settings, self.database, self.authenticator, self.playbooks,
                             self.mcp, api_v1, self.auth_secret, reactor,
                             oauth=self.upstream_oauth)
        self.oauth = AuthorizationServer(settings, self.database, self.authenticator,
                                         self.playbooks, self.studio, reactor, self.oauth_tokens)
        self.web = DirectorApp(
            self.health_reason, api_v1, McpRoutes(self.mcp, self.authenticator, self.playbooks),
            studio=self.studio, oauth=self.oauth, upstream_oauth=UpstreamOAuthPages(
                settings, self.upstream_oauth, self.authenticator, self.playbooks))
        self.schema_ready = False
        self.stopping = False
        self.exit_code = 0
        self.started_at = reactor.seconds()
        self.ready = defer.Deferred[None]()  # fires when healthy for the first time
        self.addService(systemd.WatchdogService())
        self.telemetry: TelemetryService | None = None
        if settings.telemetry_enabled and self.metrics is not None:
            from director.telemetry import TelemetryService

            self.telemetry = TelemetryService(settings.telemetry_url, self.database,
                                              self.metrics, reactor, self.started_at)
            self.addService(self.telemetry)

    def _upstream_authorization(self, playbook_pk: Any, server: Any) -> Any:
        """The OAuth provider of an HTTP server's upstream sessions: its playbook owner's."""
        playbook = self.playbooks.by_pk(playbook_pk) if playbook_pk is not None else None
        if playbook is None:
            return None
        return self.upstream_oauth.provider(playbook.user_id, server)

    # --- health ------------------------------------------------------------------------

    async def health_reason(self) -> str | None:
        if self.database_lost is not None:
            return f"database: {self.database_lost}"
        if self.stopping:
            return "shutting down"
        if not self.schema_ready or not self.accounts.loaded or not self.playbooks.loaded:
            return "database: not connected yet"
        if not self.ready.called:
            # The caches are loaded but the rest of the start (sessions, Studio, OAuth) is still
            # under way: a balancer must not send traffic, nor a supervisor call it started.
            return "starting"
        try:
            await self.database.ping()
        except Exception as error:
            return f"database: {' '.join(str(error).split()) or type(error).__name__}"
        return None

    # --- start -------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        d = defer.ensureDeferred(self._start())
        d.addErrback(self._fatal)

    async def _start(self) -> None:
        self._check_stdio_account()
        for warning in dangerous_settings(self.settings):
            log.warn("dangerous setting: {warning}", warning=warning)
        await self._listen()
        await self._listen_metrics()
        # Only once every listener is up: a start that cannot listen must never look ready.
        systemd.notify(f"READY=1\nSTATUS=listening on port {self.listening_port()}, "
                       f"connecting to the database\nMAINPID={os.getpid()}")
        dsn = await self._database_dsn()
        await self._check_schema(dsn)
        self.database.start()
        await self._wait_until_available()
        await self.accounts.start()
        await self.playbooks.start()
        await self.upstream_oauth.start()
        self.rate_limiter.start()
        self.session_purge.start()
        self.mcp.start()
        await self.shared_sessions.start()
        await self.studio.start()
        await self.oauth.start()
        elapsed = self.reactor.seconds() - self.started_at
        log.info("director is healthy ({elapsed:.2f} s after start)", elapsed=elapsed)
        systemd.notify("STATUS=serving")
        # Everything loaded so far lives as long as the process: keep it out of the collector's
        # full passes, which otherwise stall requests for tens of milliseconds (bench/).
        gc.collect()
        gc.freeze()
        self.collector.start()  # and from now on, the daemon decides the full passes
        self.ready.callback(None)
        if self.telemetry is not None:
            self.telemetry.begin()

    async def _listen(self) -> None:
        resource = EdgeResource(self.web.resource(), self.settings)
        self.site = DirectorSite(resource, self.settings, self.metrics, reactor=self.reactor)
        self.site.noisy = False
        endpoint = endpoints.serverFromString(self.reactor, self.listen_description)
        try:
            self.port = await endpoint.listen(self.site)
        except Exception as error:
            raise FatalStartupError(
                f"cannot listen on {self.listen_description}: {error}; is another process "
                "using the port? Set PORT to a free one"
            ) from error
        self._check_exposure(self.port.getHost())
        log.info("director gateway running on port {port}", port=self.listening_port(),
                 version=__version__)

    def listening_port(self) -> Any:
        bound = self.port.getHost()
        return getattr(bound, "port", bound)

    def _check_stdio_account(self) -> None:
        """STDIO_USER must not be the private cluster's account: that cluster trusts whoever
        reaches its socket, so a stdio server running as that account would have the whole
        database (``director.mcp.upstream.account``). The stdio sandbox's mode is logged, or
        the start stops when an explicit one cannot work."""
        if self.stdio_sandbox_refused is not None:
            raise FatalStartupError(self.stdio_sandbox_refused, EX_CONFIG)
        log.info("stdio sandbox: {sandbox}", sandbox=self.stdio_launcher.describe(),
                 mode=self.stdio_launcher.mode)
        if self.embedded is None or not self.settings.allow_arbitrary_stdio_servers:
            return
        try:
            database = self.embedded.server_account()
        except EmbeddedDatabaseError as error:
            raise FatalStartupError(str(error)) from error
        if clashes_with_database(self.stdio_account, None if database is None else
                                 database.pw_uid):
            raise FatalStartupError(
                f"STDIO_USER={self.settings.stdio_user} is also the account of the private "
                "PostgreSQL cluster, which trusts every connection on its socket: a stdio "
                "server would have the whole database. Set STDIO_USER to another unprivileged "
                "account (adduser --system --group mcp-stdio)", EX_CONFIG)

    def _check_exposure(self, bound: Any) -> None:
        """The server flags need a listener reachable from this host only unless sign-up is
        closed (``config.exposure_problem``); ``--listen`` (socket activation) bypasses HOST,
        so the address actually bound is checked too."""
        settings = self.settings
        flagged = settings.allow_arbitrary_stdio_servers or settings.allow_insecure_http_servers
        host = getattr(bound, "host", None)  # None: a unix socket, local by nature
        if flagged and not settings.waitlist_enabled and host is not None and \
                not host_is_loopback(host):
            raise FatalStartupError(
                f"the DANGEROUSLY_* server flags cannot be enabled on a listener that anyone "
                f"can sign up through ({self.listen_description} is bound to {host}): listen "
                "on a loopback address, or set WAITLIST_ENABLED=true", EX_CONFIG)

    async def _listen_metrics(self) -> None:
        """``/metrics`` on a listener of its own, before the database: it matters most when
        that is down."""
        listen = self.settings.metrics_listen
        if listen is None or self.metrics is None:
            return
        from director.metrics import MetricsSite, endpoint_description

        endpoint = endpoints.serverFromString(self.reactor, endpoint_description(listen))
        try:
            self.metrics_port = await endpoint.listen(MetricsSite(self.metrics, listen))
        except Exception as error:
            raise FatalStartupError(
                f"cannot listen on METRICS_LISTEN={listen}: {error}; set it to a free "
                "address and port"
            ) from error
        log.info("metrics at http://{listen}/metrics", listen=listen)

    async def _database_dsn(self) -> str:
        if self.embedded is None:
            assert self.settings.database_url is not None
            return self.settings.database_url
        embedded = self.embedded
        try:
            created = await threads.deferToThread(embedded.initialise)
            if created:
                log.info("created the private PostgreSQL cluster in {path}",
                         path=str(embedded.data_directory))
            # Launched from the reactor thread: the parent-death signal is tied to it.
            outcome = embedded.launch()
            self._watch_postmaster(embedded)
            while not embedded.poll_ready():
                await task.deferLater(self.reactor, 0.02, lambda: None)
            await threads.deferToThread(embedded.ensure_database)
        except EmbeddedDatabaseError as error:
            raise FatalStartupError(str(error)) from error
        log.info("private PostgreSQL {outcome} in {path}", outcome=outcome,
                 path=str(embedded.root))
        return embedded.dsn()

    def _watch_postmaster(self, embedded: EmbeddedPostgres) -> None:
        pid = embedded.owned_postmaster()
        if pid is not None:
            self.postmaster_watch = ExitWatch(self.reactor, pid, self._postmaster_exited)

    def _postmaster_exited(self) -> None:
        """The private cluster ended without us (``pg_ctl stop``, a signal, a crash).

        The daemon exits (status 1) rather than restart it: the private cluster exists only
        for the daemon, so stopping it alone is a mistake or a crash, and a restart of the
        whole service (systemd's ``Restart=on-failure``) starts both afresh, through the one
        start path that is tested, instead of a second one that would have to re-adopt,
        re-migrate and race the old backends still exiting."""
        if self.stopping or self.exit_code or self.embedded is None:
            return
        if self.postmaster_watch is not None:
            self.postmaster_watch.stop()
        self.database_lost = f"the private PostgreSQL exited ({self.embedded.reap()})"
        self._exit(f"{self.database_lost}; it was stopped from outside or crashed (see "
                   f"{self.embedded.log_file}). Exiting, so that the service manager restarts "
                   "Director and its database together; stop Director, not its database", 1)

    async def _check_schema(self, dsn: str) -> None:
        reported = False
        while True:
            try:
                if self.embedded is not None:
                    applied = await threads.deferToThread(migrate.upgrade, dsn)
                    for migration in applied:
                        log.info("applied migration {version:04d}_{migration}",
                                 version=migration.version, migration=migration.name)
                    self.schema_ready = True
                    return
                status = await threads.deferToThread(migrate.status, dsn)
                break
            except migrate.MigrationError as error:
                raise FatalStartupError(str(error)) from error
            except Exception as error:  # psycopg2.OperationalError: not reachable yet
                if not reported:
                    log.warn("database unreachable: {reason}; retrying until it answers",
                             reason=" ".join(str(error).split()))
                    reported = True
                await task.deferLater(self.reactor, 1.0, lambda: None)
                if self.stopping:
                    raise FatalStartupError("stopped before the database answered") from None
        if status.newer_than_code:
            raise FatalStartupError(migrate.newer_schema_message(status.current, status.latest),
                                    EX_CONFIG)
        if not status.up_to_date:
            raise FatalStartupError(migrate.outdated_schema_message(status.current, status.latest),
                                    EX_CONFIG)
        self.schema_ready = True

    async def _wait_until_available(self) -> None:
        while not self.database.available:
            await task.deferLater(self.reactor, 0.01, lambda: None)

    def _fatal(self, failure: Any) -> None:
        if self.stopping or self.exit_code:
            return
        if failure.check(FatalStartupError):
            self._exit(str(failure.value), failure.value.exit_code)
        elif failure.check(SecretUnreadable):  # only the operator can fix this: no restarts
            self._exit(f"SecretUnreadable: {failure.value}", EX_CONFIG)
        elif self._private_database_died():
            # What failed was talking to it: its exit is the cause, to be named (the watch on
            # it may not have fired yet).
            self._postmaster_exited()
        else:
            log.failure("FATAL: unexpected error while starting", failure)
            self._exit(None, 1)

    def _private_database_died(self) -> bool:
        """Whether the private cluster this start launched has exited."""
        return (self.postmaster_watch is not None and self.embedded is not None
                and self.embedded.owned_postmaster() is None)

    def _exit(self, reason: str | None, code: int) -> None:
        """Log ``FATAL: reason`` (once: nothing else is reported as fatal after it), stop
        everything the usual way, then exit with ``code``."""
        if self.exit_code:
            return
        if reason is not None:
            log.critical("FATAL: {reason}", reason=reason)
        self.exit_code = code
        exit_after_shutdown(self.reactor, self.exit_code)
        # twistd starts the service tree before the reactor runs: a listener that fails at once
        # fails here, synchronously, when ``reactor.stop()`` would raise ReactorNotRunning and
        # leave the process serving nothing for ever.
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    # --- stop --------------------------------------------------------------------------

    def stopService(self) -> defer.Deferred[None]:
        self.stopping = True
        systemd.notify("STOPPING=1\nSTATUS=draining")
        log.info("stopping: draining connections (at most {timeout} s)",
                 timeout=self.settings.shutdown_timeout_seconds)
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        await super().stopService()
        if self.port is not None:
            await self.port.stopListening()
        if self.metrics_port is not None:
            await self.metrics_port.stopListening()
        await self.studio.stop()
        self.oauth.stop()
        await self.mcp.stop()
        await self._drain_connections()
        await self.http_pool.closeCachedConnections()
        await self.registry.close()
        self.rate_limiter.stop()
        self.session_purge.stop()
        self.collector.stop()
        self.database.stop()
        if self.tracing is not None:
            await self._stop_tracing(self.tracing)
        if self.postmaster_watch is not None:
            self.postmaster_watch.stop()
        if self.embedded is not None:
            await threads.deferToThread(self.embedded.stop, self.settings.shutdown_timeout_seconds)
        log.info("stopped")

    async def _stop_tracing(self, export: TracingExport) -> None:
        """The spans still queued go out, within the shutdown timeout (a collector that does
        not answer holds the exporter's thread, never the stop)."""
        tracing.install(None)
        flushed = threads.deferToThread(export.shutdown)
        waited: defer.Deferred[None] = defer.Deferred()
        flushed.addBoth(lambda _: None if waited.called else waited.callback(None))
        timer = self.reactor.callLater(self.settings.shutdown_timeout_seconds,
                                       lambda: None if waited.called else waited.callback(None))
        await waited
        if timer.active():
            timer.cancel()

    async def _drain_connections(self) -> None:
        """Wait for in-flight responses, then cut what remains (idle keep-alives, streams)."""
        if self.site is None:
            return
        site = self.site
        deadline = self.reactor.seconds() + self.settings.shutdown_timeout_seconds
        busy = {request.channel.transport for request in site.in_flight}
        for channel in list(site.open_channels):
            if channel.transport not in busy:
                channel.transport.loseConnection()
        while site.in_flight and self.reactor.seconds() < deadline:
            await task.deferLater(self.reactor, 0.05, lambda: None)
        for channel in list(site.open_channels):
            channel.transport.abortConnection()


def exit_after_shutdown(reactor: Any, code: int) -> None:
    """twistd always exits 0 after ``reactor.stop()``; make a fatal start visible to systemd."""

    def leave() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    reactor.addSystemEventTrigger("after", "shutdown", leave)
