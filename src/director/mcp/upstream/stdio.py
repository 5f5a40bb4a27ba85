"""An upstream MCP server run as a child process, spoken to over stdin/stdout (``UpstreamSession``).

Newline-delimited JSON-RPC straight on a Twisted ``ProcessProtocol`` (no ``mcp`` SDK, no
asyncio): each line read is handed to the connection's ``peer.Peer``, which owns ids, pending
requests, timeouts, progress and cancellation, and each message it sends is written as one line.
See ``base.py`` for the contract; the choices made here:

**Process group, identity and parent-death signal.** ``spawnProcess`` has no pre-exec hook, so
the command is launched through programs that change the process and then ``exec`` in place
(same pid, no resident helper)::

    /usr/bin/setsid /usr/bin/setpriv [--reuid U --regid G --clear-groups] --pdeathsig KILL --
        /bin/sh -c '<check>' director-stdio <daemon pid> <cwd> <command> <args…>

``setsid`` gives the child its own session and process group (``close()`` and crash clean-up
signal the whole tree with ``killpg``); when the daemon runs as root, ``setpriv`` switches to
the ``StdioAccount`` (``account.py``: uid, primary gid, *no* supplementary groups) and only then
sets ``PR_SET_PDEATHSIG=SIGKILL`` (the kernel clears the death signal when the credentials
change, so the order matters; setpriv applies it last); the ``sh`` line, already unprivileged,
checks that its parent is still the daemon (a daemon death *before* ``prctl`` would otherwise
leave an orphan), changes directory (a cwd the account cannot enter fails the start with
sh's own "can't cd" line) and execs the resolved command. All three are Essential on Debian
(util-linux, dash); together they add 3 to 6 ms to a spawn, and they let Twisted keep using
``posix_spawn``: its own ``uid=``/``gid=`` (like a ``path=``) would make it fork the whole
daemon, and it calls ``initgroups``, which gives the child the account's supplementary groups
instead of none. Twisted's ``posix_spawn`` also resets the signals the daemon ignores (SIGPIPE)
to their defaults. Where util-linux is missing, a Python wrapper (``sys.executable -I -S -c
_WRAPPER``: ``setgroups([])``, ``setgid``, ``setuid``, then ``ctypes`` ``prctl``, the same
parent check, ``setsid``, ``chdir``, ``execv``) does the same in 20 to 35 ms. Either way the
death signal is lost if the command is set-user-ID or has file capabilities (the kernel clears
it on such an ``exec``). A daemon running as root without an account refuses to spawn at all.

The death signal reaches the *direct* child only. Grandchildren (``npx`` → ``sh`` → ``node``)
are killed with the group on ``close()`` and whenever the child exits, but when the daemon itself
is SIGKILLed they only see their stdin reach end-of-file and their stdout break (which makes a
well-behaved stdio server exit); under systemd the unit's cgroup (``KillMode=control-group``,
the default) takes them too.

**Sandbox.** What is spawned is the launcher's (``director.sandbox.launcher``: one call,
``launcher.spawn(Command) -> Spawn``, made before each spawn): in the systemd mode the chain
below runs ``client.py``, which hands the pipes to a sandboxed unit and exits as the server did;
in the account mode it runs the command as ``STDIO_USER`` under ``prlimit`` and ``nice``. The
chain itself lives in ``director.sandbox.chain``.

**Environment.** The child does not inherit the daemon's environment (which holds the
database URL, the secret key, ``NOTIFY_SOCKET``, …): it gets ``INHERITED_VARIABLES`` and any
variable starting with one of ``INHERITED_PREFIXES`` from the daemon (the locale, the
temporary directory, proxies and CA bundles, XDG directories, npm's and uv's cache settings —
what ``npx``/``uvx`` launchers need to work as they do in a shell), ``PATH`` defaulting to
``/usr/local/bin:/usr/bin:/bin`` and ``HOME`` to the account's home directory, and then the
server's configured ``env`` on top. A child given a ``StdioAccount`` gets none of the daemon's
identity variables (``HOME``, ``USER``, ``LOGNAME``, ``XDG_*``): its own ``HOME``, ``USER``
and ``LOGNAME`` instead. The command is looked up in the configured ``PATH`` first,
then in the daemon's, and run by absolute path.

**Framing.** Lines over ``max_line`` bytes (16 MiB) cannot be buffered safely: every pending
request fails with an ``UpstreamError`` naming the cause and the process is killed and, with
``restart=True``, restarted. In the other direction, a child that stops reading its stdin
(the pipe's buffer stays full) gets at most ``max_line`` bytes more queued for it; past that,
new requests fail at once ("not reading its input") until it reads again. Lines that are not
JSON-RPC are logged (rate-limited) and dropped. stderr goes to the log line by line
(``server=`` field), at most 20 lines a second per server, followed by a "suppressed N lines"
summary; the last few lines are kept to explain an early exit.

**Restarts.** An unexpected exit fails the pending requests, calls ``on_closed`` and, with
``restart=True``, respawns after 0.5 s, 1 s, 2 s … 30 s (back to 0.5 s once a process has run
for 60 s) and repeats the handshake; ``on_restored`` (``UpstreamSession``) is called after each
successful one. Requests made meanwhile wait for the restart within their own
timeout, or fail at once while the last attempt has failed (``state == "failed"``). ``state``
and ``restarts`` (respawn attempts) are there for metrics. Which of these may happen when is
decided by an explicit state machine (``stdio_lifecycle.py``); this class carries it out.

**Era.** A stdio connection is locked to one protocol era by its first request. Without
``prefer_modern`` it is ``initialize``, and ``server/discover`` follows only when that is
refused with a JSON-RPC error (a server of the stateless era only). With
``prefer_modern`` (the process serves clients of the stateless era) the first request is
``server/discover`` with the 2026-07-28 envelope: when the answer offers ``2026-07-28`` the
process speaks that era — every request carries the envelope in ``params._meta`` (``envelope.py``),
``logging/setLevel`` becomes the envelope's ``logLevel``, and ``input_required`` results are
resolved through ``on_request`` (or returned as they are with ``return_input_required=True``).
Any other answer (an error, no answer within ``DISCOVER_TIMEOUT``, other versions) is a verdict:
the handshake follows on the same process, and the verdict is remembered per command line
(``upstream.eras``, the service's) so that later processes skip the probe.

**Handshake timeout.** A start (and each restart) has one deadline, ``handshake_timeout``
after the spawn (by default the server's own timeout, ``timeout_default``), shared by the
probe and the handshake: the probe gets at most half of it (and at most ``DISCOVER_TIMEOUT``),
the handshake what is left, so that a silent probe still leaves the handshake time to answer
and a process that never answers fails after ``handshake_timeout`` whatever was tried.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
from collections.abc import Callable
from typing import Any, cast

from twisted.internet import defer, error, protocol, task
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from director import direct_send, tracing
from director.mcp import jsonrpc
from director.mcp.jsonrpc import Message, ProtocolError
from director.mcp.upstream.account import StdioAccount
from director.mcp.upstream.backoff import Backoff
from director.mcp.upstream.base import (
    LEGACY_VERSIONS,
    RequestHandler,
    UpstreamError,
    UpstreamRequestError,
    UpstreamTimeout,
    default_request_handler,
    encoded,
    initialize_params,
    run_hook,
)
from director.mcp.upstream.envelope import (
    LISTEN_TIMEOUT,
    ChangeListener,
    NotModern,
    answered_here,
    discovered,
    enveloped,
    listened,
    settle,
)
from director.mcp.upstream.eras import EraMemory, stdio_key
from director.mcp.upstream.peer import Peer, Timer
from director.mcp.upstream.stdio_lifecycle import REPORTED, StdioLifecycle, lifecycle
from director.sandbox.chain import (  # noqa: F401 - the launch chain's home used to be here
    DEFAULT_PATH,
    child_environment,
    launch_argv,
    resolve_command,
)
from director.sandbox.launcher import Command, Launcher, Limits, SandboxError, for_account

log = Logger(namespace="upstream.stdio")

DEFAULT_MAX_LINE = 16 * 1024 * 1024
STDERR_MAX_LINE = 16 * 1024
LOG_LINES_PER_SECOND = 20
STDERR_TAIL_LINES = 10
DISCOVER_TIMEOUT = 10.0
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
HEALTHY_AFTER = 60.0
STDIN_GRACE = 2.0
TERM_GRACE = 2.0
#: After the child exits, how long descendants may keep its stdout/stderr open before we close
#: our ends (the group has been SIGKILLed by then; this covers ones that left the group).
PIPES_GRACE = 1.0
KILL_WAIT = 5.0
#: The rlimits of a child made without a launcher (``Settings`` gives the service's).
DEFAULT_MEMORY_MAX = 1024 ** 3
DEFAULT_TASKS_MAX = 512



def describe_exit(reason: Failure | None) -> str:
    value = reason.value if reason is not None else None
    if isinstance(value, error.ProcessTerminated) and value.signal is not None:
        try:
            name = signal.Signals(value.signal).name
        except ValueError:
            name = "?"
        return f"killed by signal {value.signal} ({name})"
    if isinstance(value, error.ProcessTerminated | error.ProcessDone):
        return f"exit {value.exitCode}"
    return f"ended ({reason.getErrorMessage() if reason is not None else 'unknown'})"


def _ignore(*_: Any) -> None:
    return None


class _RateLimitedLog:
    """At most ``per_second`` lines a second, then one "suppressed N lines" line."""

    def __init__(self, reactor: Any, emit: Callable[[str], None], per_second: int,
                 what: str) -> None:
        self._reactor = reactor
        self._emit = emit
        self._per_second = per_second
        self._what = what
        self._window = -1.0
        self._count = 0
        self._suppressed = 0
        self._summary: Timer | None = None

    def __call__(self, text: str) -> None:
        now = self._reactor.seconds()
        if now - self._window >= 1.0:
            self.flush()
            self._window = now
            self._count = 0
        if self._count < self._per_second:
            self._count += 1
            self._emit(text)
            return
        self._suppressed += 1
        if self._summary is None:
            self._summary = self._reactor.callLater(
                max(self._window + 1.0 - now, 0.0), self.flush)

    def flush(self) -> None:
        if self._summary is not None:
            if self._summary.active():
                self._summary.cancel()
            self._summary = None
        if self._suppressed:
            suppressed, self._suppressed = self._suppressed, 0
            self._emit(f"(suppressed {suppressed} {self._what})")


@implementer(IPushProducer)
class _StdinPressure:
    """Told by the child's stdin pipe when its buffer fills (the child is not reading): what
    the gateway writes meanwhile is counted, so that a child that stopped reading its input
    makes new requests fail at once instead of growing the daemon's memory without bound."""

    def __init__(self) -> None:
        self.paused = False
        self.backlog = 0

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.backlog = 0

    def stopProducing(self) -> None:
        self.paused = True


class _Process(protocol.ProcessProtocol):
    """One spawned child; the upstream outlives it across restarts."""

    def __init__(self, owner: StdioUpstream) -> None:
        self.owner = owner
        self.pid: int | None = None
        self.handshaken = False
        self.exited = False
        self.ended = False
        self.discarding = False
        self.kill_reason: str | None = None
        self.exit_reason: Failure | None = None
        self.end_message = ""
        self._stdout: list[bytes] = []
        self._stdout_size = 0
        self._stderr = b""
        self._stderr_skipping = False
        self._pipes_timer: Timer | None = None
        self._exit_waiters: list[defer.Deferred[None]] = []
        self._end_waiters: list[defer.Deferred[None]] = []
        self.stdin = _StdinPressure()
        #: Twisted's writer of the child's stdin pipe (``direct_send.write_pipe``).
        self.stdin_pipe: Any = None

    def connectionMade(self) -> None:
        self.pid = cast(Any, self.transport).pid
        writer = getattr(self.transport, "pipes", {}).get(0)  # the child's stdin
        if writer is not None:
            writer.registerProducer(self.stdin, True)
            self.stdin_pipe = writer

    # --- output ------------------------------------------------------------------------------

    def outReceived(self, data: bytes) -> None:
        if self.discarding:
            return
        limit = self.owner.max_line
        start = 0
        while not self.discarding:
            newline = data.find(b"\n", start)
            if newline < 0:
                break
            if self._stdout:
                self._stdout.append(data[start:newline])
                line = b"".join(self._stdout)
                self._stdout, self._stdout_size = [], 0
            else:
                line = data[start:newline]
            start = newline + 1
            if len(line) > limit:
                self.owner._oversized(self)
                return
            if len(line) > 2 or line.strip():  # (no copy of a big line just to test it)
                self.owner._line_received(self, line)
        if self.discarding:
            return
        rest = data[start:]
        if rest:
            self._stdout.append(rest)
            self._stdout_size += len(rest)
            if self._stdout_size > limit:
                self._stdout, self._stdout_size = [], 0
                self.owner._oversized(self)

    def errReceived(self, data: bytes) -> None:
        buffered = self._stderr + data
        *lines, rest = buffered.split(b"\n")
        for line in lines:
            if self._stderr_skipping:
                self._stderr_skipping = False
                continue
            self.owner._stderr_line(line)
        if len(rest) > STDERR_MAX_LINE:
            if not self._stderr_skipping:
                self.owner._stderr_line(rest[:STDERR_MAX_LINE] + b" [truncated]")
            self._stderr_skipping = True
            rest = b""
        self._stderr = rest

    # --- lifetime ----------------------------------------------------------------------------

    def kill_group(self, signal_number: int) -> None:
        """Signal the child's process group (it is the group leader once the wrapper ran)."""
        if self.exited or self.pid is None:
            return  # reaped: the pid may belong to someone else by now
        self._signal_group(signal_number)

    def _signal_group(self, signal_number: int) -> None:
        assert self.pid is not None
        try:
            os.killpg(self.pid, signal_number)
        except ProcessLookupError:
            # Not yet a group leader (the wrapper has not run setsid): signal it alone.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal_number)
        except PermissionError as failure:
            log.warn("[{server}] cannot signal process group {pid}: {error}",
                     server=self.owner.name, pid=self.pid, error=failure)

    def processExited(self, reason: Failure) -> None:
        self.exited = True
        self.exit_reason = reason
        self.owner._going_down(self)
        # Descendants left behind (its group still exists while any of them live) go too.
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        _fire_all(self._exit_waiters)
        if not self.ended:
            self._pipes_timer = self.owner.reactor.callLater(PIPES_GRACE, self._close_pipes)

    def _close_pipes(self) -> None:
        self._pipes_timer = None
        if not self.ended and self.transport is not None:
            cast(Any, self.transport).loseConnection()

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        if self._pipes_timer is not None and self._pipes_timer.active():
            self._pipes_timer.cancel()
        self._pipes_timer = None
        if self._stderr:
            self.owner._stderr_line(self._stderr)
            self._stderr = b""
        if not self.exited:
            self.processExited(reason)
        self.owner._process_ended(self, self.exit_reason or reason)
        _fire_all(self._end_waiters)

    def wait_exited(self, timeout: float) -> defer.Deferred[bool]:
        return self._wait(self._exit_waiters, self.exited, timeout)

    def wait_ended(self, timeout: float) -> defer.Deferred[bool]:
        return self._wait(self._end_waiters, self.ended, timeout)

    def _wait(self, waiters: list[defer.Deferred[None]], done: bool,
              timeout: float) -> defer.Deferred[bool]:
        if done:
            return defer.succeed(True)
        waiter: defer.Deferred[None] = defer.Deferred()
        waiters.append(waiter)
        outcome: defer.Deferred[bool] = defer.Deferred()

        def timed_out() -> None:
            if not outcome.called:
                outcome.callback(False)

        timer = self.owner.reactor.callLater(timeout, timed_out)

        def fired(_: object) -> None:
            if timer.active():
                timer.cancel()
            if not outcome.called:
                outcome.callback(True)

        waiter.addCallback(fired)
        return outcome


def _fire_all(waiters: list[defer.Deferred[None]]) -> None:
    fired = list(waiters)
    waiters.clear()
    for waiter in fired:
        waiter.callback(None)


class StdioUpstream:
    """One MCP server run as a child process (see the module docstring)."""

    def __init__(self, name: str, command: str, args: list[str], env: dict[str, str],
                 cwd: str | None, reactor: Any, *, timeout_default: float = 60.0,
                 restart: bool = True, handshake_timeout: float | None = None,
                 max_line: int = DEFAULT_MAX_LINE,
                 client_capabilities: dict[str, Any] | None = None,
                 prefer_modern: bool = False, account: StdioAccount | None = None,
                 launcher: Launcher | None = None, owner: str = "",
                 eras: EraMemory | None = None) -> None:
        self.name = name
        self.command = command
        self.args = list(args)
        self.env = dict(env)
        self.cwd = cwd
        self.reactor = reactor
        self.timeout_default = timeout_default
        self.restart = restart
        #: The deadline of a start, from the spawn (module docstring).
        self.handshake_timeout = timeout_default if handshake_timeout is None else \
            handshake_timeout
        self.max_line = max_line
        self.client_capabilities = client_capabilities
        self.prefer_modern = prefer_modern
        #: What the probes of this and other command lines found (the service's).
        self.eras = eras if eras is not None else EraMemory(reactor)
        #: Who the child runs as (None: as the daemon, which must not then be root).
        self.account = account
        #: How the child is boxed (``director.sandbox``); by default as ``account``.
        self.launcher = launcher if launcher is not None else for_account(
            account, Limits(DEFAULT_MEMORY_MAX, DEFAULT_TASKS_MAX))
        #: Whose server this is (the playbook), for the launcher.
        self.owner = owner
        #: "modern" or "legacy" once the current process has answered its first request.
        self.era: str | None = None
        #: The modern era's ``logLevel`` (it has no ``logging/setLevel``).
        self.log_level: str | None = None
        #: The modern era's change notifications (``envelope.ChangeListener``).
        self.changes = ChangeListener(name, self._listen, reactor)
        self.initialize_result: dict[str, Any] = {}
        self.on_notification: Callable[[Message], object] = _ignore
        self.on_request: RequestHandler = default_request_handler
        self.on_closed: Callable[[str], object] = _ignore
        #: Not in the contract: called after a restart has completed its handshake (the
        #: upstream's tools, subscriptions, … may have changed).
        self.on_restored: Callable[[dict[str, Any]], object] = _ignore
        #: How many times the process was respawned after an unexpected exit.
        self.restarts = 0
        #: Where the lifecycle is (``stdio_lifecycle.py``): the machine's state, as it tells us.
        self._phase = "idle"
        self._lifecycle: StdioLifecycle = lifecycle(self)
        self._process: _Process | None = None
        #: The JSON-RPC conversation with the current process (``peer.py``).
        self._peer = Peer(name, self._transmit, reactor,
                          on_request=lambda method, params: self.on_request(method, params),
                          on_notification=self._notified)
        self._ready_waiters: list[defer.Deferred[None]] = []
        self._last_error: str | None = None
        self._backoff = Backoff(BACKOFF_INITIAL, BACKOFF_MAX, healthy_after=HEALTHY_AFTER,
                                clock=reactor)
        self._restart_call: Timer | None = None
        self._close_waiters: list[defer.Deferred[None]] = []
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._log_stderr = _RateLimitedLog(reactor, self._emit_stderr, LOG_LINES_PER_SECOND,
                                           "stderr lines")
        self._log_dropped = _RateLimitedLog(reactor, self._emit_dropped, LOG_LINES_PER_SECOND,
                                            "dropped stdout lines")

    @property
    def state(self) -> str:
        """"starting", "ready", "restarting", "failed" or "closed" (``stdio_lifecycle``)."""
        return REPORTED[self._phase]

    @property
    def pid(self) -> int | None:
        """The running child's pid (also its process group id), if any."""
        process = self._process
        return process.pid if process is not None and not process.exited else None

    @property
    def recent_stderr(self) -> tuple[str, ...]:
        """The current process's last lines on stderr (a server reports its own troubles
        there: a refused file, a failed fork), shown on its status."""
        return tuple(self._stderr_tail)

    # --- the contract ------------------------------------------------------------------------

    async def start(self) -> None:
        ready: defer.Deferred[None] = defer.Deferred(self._cancel_wait)
        self._lifecycle.start(ready, self.handshake_timeout)
        await ready

    async def request(self, method: str, params: dict[str, Any] | None = None, *,
                      timeout: float | None = None,
                      on_progress: Callable[[dict[str, Any]], object] | None = None,
                      return_input_required: bool = False) -> dict[str, Any]:
        timeout = self.timeout_default if timeout is None else timeout
        deadline = self.reactor.seconds() + timeout
        if self._phase != "ready":  # else the machine's answer is "go on": no Deferred for it
            ready: defer.Deferred[None] = defer.Deferred(self._cancel_wait)
            self._lifecycle.wait_ready(ready, timeout)
            await ready
        process = self._process
        if process is None:  # (ready means a child; kept for the type checker)
            raise UpstreamError(f"[{self.name}] not ready ({self.state})")
        remaining = deadline - self.reactor.seconds()
        if remaining <= 0:
            raise UpstreamTimeout(f"[{self.name}] no answer to {method} within {timeout:g} s")
        if self.era != "modern":
            return await self._call(method, params, timeout, on_progress, first=remaining)
        local = answered_here(self, method, params)
        if local is not None:
            return local

        async def send(sent: dict[str, Any] | None, first: float | None = None
                       ) -> dict[str, Any]:
            return await self._call(method, enveloped(
                sent, self.client_capabilities, self.log_level), timeout, on_progress,
                first=first)

        result = await send(params, remaining)
        if return_input_required:
            return result
        return await settle(self.name, method, params, result, send, self.on_request,
                            self._sleep)

    async def _listen(self, params: dict[str, Any]) -> dict[str, Any]:
        return await self.request("subscriptions/listen", params, timeout=LISTEN_TIMEOUT,
                                  return_input_required=True)

    def _sleep(self, seconds: float) -> defer.Deferred[None]:
        return task.deferLater(self.reactor, seconds, lambda: None)

    def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        self._lifecycle.notify(method, params)

    async def close(self) -> None:
        done: defer.Deferred[None] = defer.Deferred()
        self._lifecycle.close(done)
        await done

    # --- lifecycle ---------------------------------------------------------------------------

    async def _launch(self, deadline: float | None = None) -> None:
        """Spawn the child and run the handshake by ``deadline`` (reactor time; default:
        ``handshake_timeout`` from now); ``UpstreamError`` if that fails."""
        if deadline is None:
            deadline = self.reactor.seconds() + self.handshake_timeout
        try:
            spawn = self.launcher.spawn(Command(self.name, self.command, tuple(self.args),
                                                self.env, self.cwd, self.owner))
        except SandboxError as failure:
            raise UpstreamError(f"[{self.name}] {failure}") from None
        process = _Process(self)
        self._process = process
        self._stderr_tail.clear()
        try:
            transport = self.reactor.spawnProcess(process, spawn.argv[0], spawn.argv,
                                                  env=spawn.env, usePTY=False)
        except OSError as failure:
            self._process = None
            raise UpstreamError(f"[{self.name}] cannot start {self.command!r}: {failure}") \
                from None
        process.pid = transport.pid
        if process.ended:  # it ended while being spawned (Twisted may reap synchronously)
            raise UpstreamError(process.end_message)
        log.info("[{server}] started {command} (pid {pid}, sandbox: {sandbox})",
                 server=self.name, command=self.command, pid=process.pid,
                 sandbox=self.launcher.mode)
        self.era = None
        if self.prefer_modern:
            if await self._discovered(process, deadline):
                return
            if process.ended:  # it exited on the probe; the verdict skips it next time
                self._process = None
                await self._launch(deadline)
                return
        try:
            result = await self._call("initialize",
                                      initialize_params(self.client_capabilities),
                                      self.handshake_timeout, None, handshake=True,
                                      first=max(0.0, deadline - self.reactor.seconds()))
        except UpstreamRequestError as failure:
            # Refused: perhaps a server of the stateless era only (unless known otherwise).
            if not self.prefer_modern and not process.ended and \
                    await self._discovered(process, deadline):
                return
            await self._discard(process)
            raise UpstreamError(f"[{self.name}] initialize failed: "
                                f"{failure.error.get('message', failure.error)}") from None
        except UpstreamTimeout:
            await self._discard(process)
            raise UpstreamTimeout(f"[{self.name}] no answer to initialize within "
                                  f"{self.handshake_timeout:g} s") from None
        except (UpstreamError, defer.CancelledError):
            await self._discard(process)
            raise
        version = result.get("protocolVersion") if isinstance(result, dict) else None
        if version not in LEGACY_VERSIONS:
            await self._discard(process)
            raise UpstreamError(f"[{self.name}] unsupported protocol version {version!r} in the "
                                "initialize answer")
        process.handshaken = True
        self.initialize_result = result
        self.era = "legacy"
        self._peer.notify("notifications/initialized")

    async def _discovered(self, process: _Process, deadline: float) -> bool:
        """Probe ``server/discover``: True when the process now speaks the stateless era."""
        key = stdio_key(self.command, self.args, self.cwd)
        if self.eras.verdict(key) is False:
            return False
        left = max(0.0, deadline - self.reactor.seconds())
        try:
            answer = await self._call("server/discover",
                                      enveloped({}, self.client_capabilities, None),
                                      min(DISCOVER_TIMEOUT, self.handshake_timeout / 2, left),
                                      None, handshake=True)
            self.initialize_result = discovered(self.name, answer)
        except (UpstreamRequestError, NotModern, UpstreamTimeout) as refused:
            verdict = str(refused)
        except UpstreamError:
            # Some handshake-only servers exit on a request before ``initialize``: a verdict
            # too (``_launch`` then starts a fresh process for the handshake).
            if not await process.wait_ended(PIPES_GRACE):
                await self._discard(process)
                raise
            verdict = "the process exited on server/discover"
        except defer.CancelledError:
            await self._discard(process)
            raise
        else:
            self.eras.learnt(key, True)
            process.handshaken = True
            self.era = "modern"
            log.info("[{server}] speaks MCP 2026-07-28", server=self.name)
            return True
        self.eras.learnt(key, False)
        log.info("[{server}] no MCP 2026-07-28 ({error}); using the handshake",
                 server=self.name, error=verdict)
        return False

    # --- the lifecycle's outputs (``stdio_lifecycle.StdioCore``) ------------------------------

    def _entered(self, state: str) -> None:
        self._phase = state

    def _launch_first(self, ready: defer.Deferred[None]) -> None:
        launching = defer.ensureDeferred(self._launch())
        launching.addCallbacks(self._first_launched, self._first_failed)
        # start() waits on the launch itself: its exception, and its cancellation forwarded.
        ready.addCallback(lambda _: launching)
        ready.callback(None)

    def _first_launched(self, result: None) -> None:
        self._lifecycle.launched()
        if self.era == "modern":
            self.changes.start()

    def _first_failed(self, failure: Failure) -> Failure:
        if failure.check(UpstreamError):
            self._lifecycle.launch_failed(str(failure.value))
        elif failure.check(defer.CancelledError):
            self._lifecycle.launch_failed(f"[{self.name}] start cancelled")
        return failure

    def _cancel_wait(self, ready: defer.Deferred[None]) -> None:
        """A caller gave up waiting for a ready child."""
        if ready in self._ready_waiters:
            self._ready_waiters.remove(ready)

    def _became_ready(self) -> None:
        self._backoff.running()
        self._last_error = None
        _fire_all(self._ready_waiters)

    def _restored(self) -> None:
        log.info("[{server}] restarted", server=self.name)
        run_hook(self.name, "on_restored", self.on_restored, self.initialize_result)

    def _failed(self, message: str) -> None:
        self._last_error = message
        self._fail_waiters(message)

    def _restart_failed(self, message: str) -> None:
        log.warn("[{server}] restart failed: {error}", server=self.name, error=message)
        self._failed(message)

    def _exited_for_good(self, reason: str) -> None:
        self._last_error = reason

    def _lost(self, message: str) -> None:
        """The ready child is gone: ``on_closed``, and its requests fail."""
        log.warn("{message}", message=message, server=self.name)
        try:
            self.on_closed(message)
        except Exception:
            log.failure("[{server}] on_closed failed", server=self.name)
        self._peer.fail_all(UpstreamError(message))

    def _fail_pending(self, message: str) -> None:
        self._peer.fail_all(UpstreamError(message))

    def _answer(self, ready: defer.Deferred[None]) -> None:
        ready.callback(None)

    def _add_waiter(self, ready: defer.Deferred[None], timeout: float) -> None:
        self._ready_waiters.append(ready)
        state = self.state

        def timed_out() -> None:
            if ready in self._ready_waiters:
                self._ready_waiters.remove(ready)
                ready.errback(UpstreamTimeout(
                    f"[{self.name}] still {state} after {timeout:g} s"))

        timer = self.reactor.callLater(timeout, timed_out)

        def settled(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        ready.addBoth(settled)

    def _refuse(self, ready: defer.Deferred[None], message: str | None) -> None:
        """``message``, or (None) the last failure."""
        ready.errback(UpstreamError(message or self._last_error
                                    or f"[{self.name}] not ready ({self.state})"))

    def _send_notification(self, method: str, params: dict[str, Any] | None) -> None:
        self._peer.notify(method, params)

    def _drop_notification(self, method: str) -> None:
        log.debug("[{server}] not ready ({state}): dropped notification {method}",
                  server=self.name, state=self.state, method=method)

    def _shut_down(self, done: defer.Deferred[None]) -> None:
        self.changes.stop()
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        self._restart_call = None
        message = f"[{self.name}] closed"
        self._peer.fail_all(UpstreamError(message))
        self._fail_waiters(message)
        defer.ensureDeferred(self._reap_last()).chainDeferred(done)

    async def _reap_last(self) -> None:
        process = self._process
        try:
            if process is not None and not process.ended:
                await self._terminate(process)
        finally:
            self._log_stderr.flush()
            self._log_dropped.flush()
            self._lifecycle.reaped()

    def _join_shutdown(self, done: defer.Deferred[None]) -> None:
        self._close_waiters.append(done)

    def _closed(self) -> None:
        _fire_all(self._close_waiters)

    def _schedule_restart(self) -> None:
        delay = self._backoff.next_delay()
        log.info("[{server}] restarting in {delay:g} s", server=self.name, delay=delay)
        self._restart_call = self.reactor.callLater(delay, self._delay_elapsed)

    def _delay_elapsed(self) -> None:
        self._restart_call = None
        self._lifecycle.delay_elapsed()

    def _relaunch(self) -> None:
        self.restarts += 1
        defer.ensureDeferred(self._relaunched()).addErrback(
            lambda failure: log.failure("[{server}] restart failed", failure, server=self.name))

    async def _relaunched(self) -> None:
        try:
            if tracing.TRACER is None:
                await self._launch()
            else:  # a trace of its own: no request asked for it
                with tracing.span("upstream restart", attributes={
                        "director.server.name": self.name,
                        "director.upstream.transport": "stdio",
                        "director.upstream.restarts": self.restarts}):
                    await self._launch()
        except UpstreamError as failure:
            self._lifecycle.launch_failed(str(failure))
            return
        self._lifecycle.launched()

    def _fail_waiters(self, message: str) -> None:
        waiters = list(self._ready_waiters)
        self._ready_waiters.clear()
        for waiter in waiters:
            waiter.errback(UpstreamError(message))

    # --- the child ---------------------------------------------------------------------------

    async def _discard(self, process: _Process) -> None:
        """Kill a child that failed its handshake and wait until it is reaped."""
        process.kill_reason = process.kill_reason or "discarded"
        process.kill_group(signal.SIGKILL)
        if not await process.wait_ended(KILL_WAIT):
            log.warn("[{server}] pid {pid} did not end after SIGKILL", server=self.name,
                     pid=process.pid)
        if self._process is process:
            self._process = None

    async def _terminate(self, process: _Process) -> None:
        """close(): stdin closed, then SIGTERM to the group, then SIGKILL; waits for the reap."""
        if not process.exited and process.transport is not None:
            cast(Any, process.transport).closeStdin()
            if not await process.wait_exited(STDIN_GRACE):
                process.kill_group(signal.SIGTERM)
                if not await process.wait_exited(TERM_GRACE):
                    log.warn("[{server}] pid {pid} ignored SIGTERM; killing it",
                             server=self.name, pid=process.pid)
                    process.kill_group(signal.SIGKILL)
        if not await process.wait_ended(KILL_WAIT + PIPES_GRACE):
            log.warn("[{server}] pid {pid} did not end", server=self.name, pid=process.pid)
        if self._process is process:
            self._process = None

    def _process_ended(self, process: _Process, reason: Failure) -> None:
        tail = "\n".join(self._stderr_tail)
        if len(tail) > 2000:
            tail = "…" + tail[-2000:]
        self._log_stderr.flush()
        self._log_dropped.flush()
        description = describe_exit(reason)
        log.info("[{server}] pid {pid} {how}", server=self.name, pid=process.pid,
                 how=description)
        if not process.handshaken:
            process.end_message = (f"[{self.name}] failed to run {self.command!r}: "
                                   f"{description}" + (f": {tail}" if tail else ""))
        if self._process is not process:
            return  # discarded or replaced: whoever did that has dealt with it
        self._process = None
        message = process.end_message if not process.handshaken else process.kill_reason or (
            f"[{self.name}] process exited unexpectedly: {description}"
            + (f": {tail}" if tail else ""))
        self._lifecycle.ended(message)

    def _going_down(self, process: _Process) -> None:
        """The ready child is exiting: new requests wait for the restart (or fail) meanwhile."""
        if process is not self._process or not process.handshaken:
            return
        if self.restart:
            self._lifecycle.exiting()
        else:
            self._lifecycle.exiting_for_good(
                process.kill_reason or f"[{self.name}] process exited")

    # --- requests ----------------------------------------------------------------------------

    def _call(self, method: str, params: dict[str, Any] | None, timeout: float,
              on_progress: Callable[[dict[str, Any]], object] | None, *,
              handshake: bool = False,
              first: float | None = None) -> defer.Deferred[dict[str, Any]]:
        """Send a request; ``timeout`` is restarted by progress, ``first`` is what is left of
        it for the first wait (the caller may have waited for a restart)."""
        if tracing.TRACER is not None:  # the MCP conventions: trace context in params._meta
            params = tracing.params_with_context(params)
        return self._peer.request(method, params, timeout=timeout, on_progress=on_progress,
                                  handshake=handshake, first=first)

    def _transmit(self, message: Message) -> None:
        """The peer's ``send``: one line on the current child's stdin."""
        process = self._process
        if process is None or process.exited or process.transport is None:
            return
        if jsonrpc.is_request(message) and process.stdin.backlog > self.max_line:
            mebibytes = process.stdin.backlog / 1048576
            raise UpstreamError(
                f"[{self.name}] the server is not reading its input ({mebibytes:.0f} MiB "
                f"waiting for it): {message['method']} refused")
        data = encoded(self.name, message) + b"\n"
        if process.stdin.paused:
            process.stdin.backlog += len(data)
        if process.stdin_pipe is not None:
            direct_send.write_pipe(process.stdin_pipe, data)
        else:
            cast(Any, process.transport).write(data)

    # --- what the child says -----------------------------------------------------------------

    def _line_received(self, process: _Process, line: bytes) -> None:
        if process is not self._process:
            return
        try:
            message = jsonrpc.parse_message(line, repair=True)
        except ProtocolError as failure:
            self._log_dropped(f"{failure.message}: {line[:200]!r}"
                              + (f"… ({len(line)} bytes)" if len(line) > 200 else ""))
            return
        self._peer.received(message)

    def _notified(self, message: Message) -> None:
        if self.era == "modern":
            routed = listened(message)
            if routed is None:
                return
            message = routed
        self.on_notification(message)

    def _oversized(self, process: _Process) -> None:
        process.discarding = True
        if process is not self._process:
            return
        size = f"{self.max_line / 1048576:g} MiB" if self.max_line >= 1048576 else \
            f"{self.max_line} bytes"
        what = "restarting it" if self.restart and process.handshaken else "stopping it"
        message = f"[{self.name}] sent a line longer than {size} on stdout; {what}"
        log.warn("{message}", message=message, server=self.name)
        process.kill_reason = message
        self._going_down(process)
        self._peer.fail_all(UpstreamError(message))
        process.kill_group(signal.SIGKILL)

    def _stderr_line(self, raw: bytes) -> None:
        line = raw.rstrip(b"\r").decode("utf-8", "replace")
        if not line.strip():
            return
        self._stderr_tail.append(line)
        self._log_stderr(line)

    def _emit_stderr(self, line: str) -> None:
        log.info("[{server}] {line}", server=self.name, line=line)

    def _emit_dropped(self, text: str) -> None:
        log.warn("[{server}] dropped from stdout: {text}", server=self.name, text=text)
