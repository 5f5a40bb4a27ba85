"""The daemon's PostgreSQL: a query pool and one LISTEN connection, both self-healing.

txpostgres leaves three traps (see the stack notes, Q2), each handled here:

* a lost connection is dead for good unless it carries a ``DeadConnectionDetector``; the stock
  pool cannot give its connections one, so ``_Pool`` builds them itself;
* every loss logs an "Unhandled Error" traceback from ``doRead``; ``_QuietConnection`` hands the
  error back to the reactor as a disconnect reason instead;
* notifications sent while the LISTEN connection was down are lost, so every recovery of it
  re-issues LISTEN and then calls the ``on_reconnect`` hooks, whose job is a full reload.

A first connection that fails (database down at start) enters the same retry loop: the daemon
serves, health reports 503 with the reason, and everything resumes when PostgreSQL answers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg2
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import reconnection, retrying, txpostgres

from director import tracing
from director.db.interactions import Interaction, run_in_cursor

T = TypeVar("T")

log = Logger(namespace="db")

NotifyCallback = Callable[[str, str], object]

#: TCP keepalives so that a peer that vanished without a FIN is noticed within ~25 s.
_CONNECT_OPTIONS = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "connect_timeout": 5,
    "application_name": "director",
}


class DatabaseUnavailable(Exception):
    """No live connection to PostgreSQL right now (the reconnect loop is running)."""


def _backoff() -> Any:
    return retrying.simpleBackoffIterator(
        initialDelay=0.2, maxDelay=2.0, factor=2.0, maxRetries=0, now=True
    )


class _QuietConnection(txpostgres.Connection):
    def doRead(self) -> object:
        try:
            super().doRead()
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as error:
            # Returned, not raised: the reactor then disconnects us without a traceback.
            return error
        return None


def _reconnecting_connection(reactor: Any, cooperator: Any, on_lost: Callable[[Failure], object],
                             on_recovered: Callable[[], object]) -> _QuietConnection:
    """A connection whose detector reconnects with backoff and reports each outage once."""
    detector = reconnection.DeadConnectionDetector(reconnectionIterator=_backoff,
                                                   reactor=reactor)
    connection = _QuietConnection(reactor, cooperator, detector=detector)
    detector.addRecoveryHandler(on_recovered)
    original = detector.checkForDeadConnection

    def check(failure: Failure) -> Failure:
        was_dead = detector.connectionIsDead
        result = original(failure)
        if detector.connectionIsDead and not was_dead:
            on_lost(failure)
        return result

    detector.checkForDeadConnection = check
    return connection


class _Pool(txpostgres.ConnectionPool):
    """The stock pool, but its connections reconnect, and a failed start retries forever."""

    def __init__(self, reactor: IReactorTime, size: int, dsn: str, on_state: Callable[..., None]):
        self.reactor = reactor
        self._on_state = on_state
        super().__init__(None, dsn, min=size, **_CONNECT_OPTIONS)

    def connectionFactory(self, reactor: Any, cooperator: Any) -> _QuietConnection:
        connection: _QuietConnection = _reconnecting_connection(
            reactor, cooperator,
            on_lost=lambda failure: self._on_state(connection, False, failure),
            on_recovered=lambda: self._on_state(connection, True))
        return connection

    def start(self) -> defer.Deferred[None]:
        for connection in self.connections:
            d = connection.connect(*self.connargs, **self.connkw)
            d.addCallback(lambda _, c=connection: self._on_state(c, True))
            d.addErrback(connection.detector.checkForDeadConnection)
            d.addErrback(lambda _: None)  # the detector now retries in the background
        return defer.succeed(None)

    def _runQuery(self, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return self._on_live_connection("runQuery", *args, **kwargs)

    def _runOperation(self, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return self._on_live_connection("runOperation", *args, **kwargs)

    def _runInteraction(self, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return self._on_live_connection("runInteraction", *args, **kwargs)

    def _on_live_connection(self, method: str, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        live = [c for c in self.connections if not c.detector.connectionIsDead]
        connection = live[0] if live else next(iter(self.connections))
        self.connections.remove(connection)
        d = getattr(connection, method)(*args, **kwargs)
        return d.addBoth(self._putBackAndPassthrough, connection)


def _traced(d: defer.Deferred[Any], args: tuple[Any, ...]) -> defer.Deferred[Any]:
    if tracing.TRACER is None:
        return d
    statement = args[0] if args and isinstance(args[0], str) else ""
    operation = statement.split(None, 1)[0].upper() if statement.strip() else "TRANSACTION"
    return tracing.child_of_deferred(f"db {operation}", d, {
        "db.system.name": "postgresql", "db.operation.name": operation})


class Database:
    """The query pool and the LISTEN connection; ``available`` is true when both are up."""

    def __init__(self, dsn: str, pool_size: int, reactor: Any) -> None:
        self.dsn = dsn
        self.reactor = reactor
        self._down: set[object] = set()
        self._last_error = "not connected yet"
        self._pool = _Pool(reactor, pool_size, dsn, self._connection_state)
        self._channels: dict[str, list[NotifyCallback]] = {}
        self._reconnect_hooks: list[Callable[[], object]] = []
        self._listener = self._make_listener()
        self._down.update(self._pool.connections)
        self._down.add(self._listener)
        self._outage_logged = False
        self._started = False

    # --- state ---------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        return self._started and not self._down

    @property
    def unavailable_reason(self) -> str:
        return self._last_error

    def _connection_state(self, connection: object, up: bool, failure: Failure | None = None) -> None:
        if up:
            self._down.discard(connection)
            if not self._down and self._outage_logged:
                log.info("database connection restored")
                self._outage_logged = False
            return
        self._down.add(connection)
        if failure is not None:
            self._last_error = " ".join(str(failure.value).split()) or repr(failure.value)
        if not self._outage_logged and self._started:
            self._outage_logged = True
            log.warn(
                "database unreachable: {reason}; retrying every 2 s at most",
                reason=self._last_error,
            )

    # --- LISTEN -------------------------------------------------------------------------

    def _make_listener(self) -> _QuietConnection:
        listener: _QuietConnection = _reconnecting_connection(
            self.reactor, None,
            on_lost=lambda failure: self._connection_state(listener, False, failure),
            on_recovered=self._listener_recovered)
        listener.addNotifyObserver(self._dispatch)
        return listener

    def _dispatch(self, notify: Any) -> None:
        for callback in list(self._channels.get(notify.channel, ())):
            try:
                callback(notify.channel, notify.payload)
            except Exception:
                log.failure("notification handler for {channel} failed", channel=notify.channel)

    @defer.inlineCallbacks
    def _listen_all(self) -> Any:
        for channel in self._channels:
            yield self._listener.runOperation(f'LISTEN "{channel}"')

    @defer.inlineCallbacks
    def _listener_recovered(self) -> Any:
        yield self._listen_all()
        self._connection_state(self._listener, True)
        # Notifications sent while we were away are lost: everyone reloads.
        for hook in list(self._reconnect_hooks):
            try:
                yield hook()
            except Exception:
                log.failure("reload after reconnect failed")

    def listen(self, channel: str, callback: NotifyCallback) -> defer.Deferred[None]:
        """Deliver ``(channel, payload)`` for every NOTIFY on ``channel``, across reconnects."""
        first = channel not in self._channels
        self._channels.setdefault(channel, []).append(callback)
        if first and self._listener_connected():
            return self._listener.runOperation(f'LISTEN "{channel}"')
        return defer.succeed(None)

    def on_reconnect(self, hook: Callable[[], object]) -> None:
        """``hook()`` runs after every recovery of the LISTEN connection (reload caches there)."""
        self._reconnect_hooks.append(hook)

    def _listener_connected(self) -> bool:
        return self._listener not in self._down

    def connection_states(self) -> tuple[int, int, bool]:
        """(pool connections up, pool size, LISTEN connection up), for metrics."""
        pool = list(self._pool.connections)
        up = sum(1 for connection in pool if connection not in self._down)
        return (up if self._started else 0), len(pool), self._started and \
            self._listener_connected()

    # --- lifecycle and queries --------------------------------------------------------------

    def start(self) -> None:
        self._started = True
        self._pool.start()
        d = self._listener.connect(self.dsn, **_CONNECT_OPTIONS)
        d.addCallback(lambda _: self._listen_all())
        d.addCallback(lambda _: self._connection_state(self._listener, True))
        d.addErrback(self._listener.detector.checkForDeadConnection)
        d.addErrback(lambda failure: self._connection_state(self._listener, False, failure))

    def stop(self) -> None:
        self._started = False
        for connection in [*self._pool.connections, self._listener]:
            with contextlib.suppress(Exception):  # it may never have opened
                connection.close()

    def _guard(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        def translate(failure: Failure) -> Failure:
            if failure.check(reconnection.ConnectionDead, psycopg2.InterfaceError):
                return Failure(DatabaseUnavailable(self._last_error))
            return failure

        return d.addErrback(translate)

    # With tracing on, each of these is a span when it serves a traced request (never the SQL
    # nor its parameters: the statement's first word only).

    def runQuery(self, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return _traced(self._guard(self._pool.runQuery(*args, **kwargs)), args)

    def runOperation(self, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return _traced(self._guard(self._pool.runOperation(*args, **kwargs)), args)

    def runInteraction(self, interaction: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """Run ``interaction(cursor, *args)`` in a transaction; coroutine functions are wrapped."""
        import inspect

        if inspect.iscoroutinefunction(interaction):
            coroutine_function = interaction

            def interaction(cursor: Any, *a: Any) -> Any:
                return defer.ensureDeferred(coroutine_function(cursor, *a))

        return _traced(self._guard(self._pool.runInteraction(interaction, *args)), ())

    def run(self, interaction: Interaction[T]) -> defer.Deferred[T]:
        """Run a shared interaction (see ``director.db.interactions``) in one transaction."""
        return self.runInteraction(run_in_cursor, interaction)

    def ping(self, timeout: float = 2.0) -> defer.Deferred[Any]:
        """``SELECT 1`` with a deadline: what the health endpoint asks."""
        if not self.available:
            return defer.fail(DatabaseUnavailable(self._last_error))
        d = self.runQuery("SELECT 1")
        d.addTimeout(timeout, self.reactor)
        # Whoever asked may go away (a probe that hangs up): the query must not be cancelled
        # half-way (txpostgres raises from its canceller), so the caller waits on a copy.
        waiter: defer.Deferred[Any] = defer.Deferred()
        d.addBoth(lambda result: waiter.callback(result) if not waiter.called else None)
        return waiter
