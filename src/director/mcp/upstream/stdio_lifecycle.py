"""The lifecycle of a stdio upstream as an explicit state machine (automat), after Twisted's
``ClientService``.

``StdioUpstream`` (``stdio.py``) owns the child processes, the peer and the timers; this module
owns *when* each of those may happen. The upstream feeds it inputs (a start was asked for, the
handshake succeeded or failed, the ready child is exiting, it has ended, the restart delay
elapsed, close) and implements its outputs (``StdioCore``). An input a state does not expect
has no transition: automat raises ``NoTransition``; inputs that may legitimately arrive late
(a handshake finishing after ``close()``, a second exit signal) are accepted and ignored.

States, with the name ``StdioUpstream.state`` reports (metrics and the studio read it)::

    idle        starting    nothing spawned yet
    starting    starting    first spawn + handshake, awaited by ``start()``
    ready       ready
    exiting     restarting  the ready child is exiting; a restart follows
    waiting     restarting  the restart delay (``Backoff``) is running
    relaunching restarting  respawn + handshake
    retrying    failed      a respawn failed; the next one is scheduled
    stopping    failed      the ready child is exiting and ``restart`` is off
    failed      failed      for good (the first start failed, or no restart)
    closing     closed      ``close()`` is waiting for the child to be reaped
    closed      closed

Outputs run once the machine has settled in its new state (``settling.py``); every input
returns None and hands an answer back through a Deferred.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.internet import defer

from director.mcp.upstream.settling import settled

#: What ``StdioUpstream.state`` says in each state of the machine.
REPORTED = {"idle": "starting", "starting": "starting", "ready": "ready",
            "exiting": "restarting", "waiting": "restarting", "relaunching": "restarting",
            "retrying": "failed", "stopping": "failed", "failed": "failed",
            "closing": "closed", "closed": "closed"}


class StdioLifecycle(Protocol):
    """The inputs."""

    def start(self, ready: defer.Deferred[None], timeout: float) -> None:
        """``start()``: spawn the first child, or wait up to ``timeout`` like ``wait_ready``."""

    def wait_ready(self, ready: defer.Deferred[None], timeout: float) -> None:
        """A request wants a ready child: ``ready`` fires once there is one, or fails."""

    def launched(self) -> None:
        """The spawn and handshake succeeded."""

    def launch_failed(self, message: str) -> None:
        """The spawn or handshake failed."""

    def exiting(self) -> None:
        """The ready child is exiting (or being killed) and will be restarted."""

    def exiting_for_good(self, reason: str) -> None:
        """The ready child is exiting and ``restart`` is off."""

    def ended(self, message: str) -> None:
        """The current child has ended (its pipes are closed)."""

    def delay_elapsed(self) -> None:
        """The restart delay is over."""

    def notify(self, method: str, params: dict[str, Any] | None) -> None:
        """Send a notification to the ready child (dropped in any other state)."""

    def close(self, done: defer.Deferred[None]) -> None:
        """``close()``: ``done`` fires once the child has been reaped."""

    def reaped(self) -> None:
        """``close()`` is done with the child."""


class StdioCore(Protocol):
    """The outputs (``StdioUpstream``)."""

    name: str

    def _entered(self, state: str) -> None: ...
    def _launch_first(self, ready: defer.Deferred[None]) -> None: ...
    def _relaunch(self) -> None: ...
    def _became_ready(self) -> None: ...
    def _restored(self) -> None: ...
    def _failed(self, message: str) -> None: ...
    def _restart_failed(self, message: str) -> None: ...
    def _exited_for_good(self, reason: str) -> None: ...
    def _lost(self, message: str) -> None: ...
    def _schedule_restart(self) -> None: ...
    def _fail_pending(self, message: str) -> None: ...
    def _answer(self, ready: defer.Deferred[None]) -> None: ...
    def _add_waiter(self, ready: defer.Deferred[None], timeout: float) -> None: ...
    def _refuse(self, ready: defer.Deferred[None], message: str | None) -> None: ...
    def _send_notification(self, method: str, params: dict[str, Any] | None) -> None: ...
    def _drop_notification(self, method: str) -> None: ...
    def _shut_down(self, done: defer.Deferred[None]) -> None: ...
    def _join_shutdown(self, done: defer.Deferred[None]) -> None: ...
    def _closed(self) -> None: ...


Transition = Callable[..., None]

# (the core is a protocol: the upstream implements it, a test may fake it)
builder = TypeMachineBuilder(StdioLifecycle, StdioCore)  # type: ignore[type-abstract]
idle = builder.state("idle")
starting = builder.state("starting")
ready = builder.state("ready")
exiting = builder.state("exiting")
waiting = builder.state("waiting")
relaunching = builder.state("relaunching")
retrying = builder.state("retrying")
stopping = builder.state("stopping")
failed = builder.state("failed")
closing = builder.state("closing")
closed = builder.state("closed")
EVERY_STATE = (idle, starting, ready, exiting, waiting, relaunching, retrying, stopping, failed,
               closing, closed)
#: Where ``close()`` has been called: inputs that arrive late are ignored there.
SHUT = (closing, closed)


def _moves(source: Any, symbol: Callable[..., None], target: Any,
           ) -> Callable[[Transition], Transition]:
    """Register ``source --symbol--> target``; the core learns the new state first."""
    def register(output: Transition) -> Transition:
        def transition(inputs: StdioLifecycle, core: StdioCore, *args: Any) -> None:
            core._entered(target.name)
            output(inputs, core, *args)

        source.upon(symbol).to(target)(transition)
        return output
    return register


def _nothing(inputs: StdioLifecycle, core: StdioCore, *args: Any, **kwargs: Any) -> None:
    return None


# --- start and wait_ready ----------------------------------------------------------------------

def _spawn_first(inputs: StdioLifecycle, core: StdioCore, ready: defer.Deferred[None],
                 timeout: float) -> None:
    core._launch_first(ready)


_moves(idle, StdioLifecycle.start, starting)(_spawn_first)


def _wait(inputs: StdioLifecycle, core: StdioCore, ready: defer.Deferred[None],
          timeout: float) -> None:
    core._add_waiter(ready, timeout)


def _answer(inputs: StdioLifecycle, core: StdioCore, ready: defer.Deferred[None],
            timeout: float) -> None:
    core._answer(ready)


def _refuse_failed(inputs: StdioLifecycle, core: StdioCore, ready: defer.Deferred[None],
                   timeout: float) -> None:
    core._refuse(ready, None)


def _refuse_closed(inputs: StdioLifecycle, core: StdioCore, ready: defer.Deferred[None],
                   timeout: float) -> None:
    core._refuse(ready, f"[{core.name}] closed")


def _refuse_unstarted(inputs: StdioLifecycle, core: StdioCore, ready: defer.Deferred[None],
                      timeout: float) -> None:
    core._refuse(ready, f"[{core.name}] not started")


idle.upon(StdioLifecycle.wait_ready).loop()(_refuse_unstarted)
for _state in (starting, exiting, waiting, relaunching):
    _state.upon(StdioLifecycle.start).loop()(_wait)
    _state.upon(StdioLifecycle.wait_ready).loop()(_wait)
for _state in (retrying, stopping, failed):
    _state.upon(StdioLifecycle.start).loop()(_refuse_failed)
    _state.upon(StdioLifecycle.wait_ready).loop()(_refuse_failed)
ready.upon(StdioLifecycle.start).loop()(_answer)
ready.upon(StdioLifecycle.wait_ready).loop()(_answer)
for _state in SHUT:
    _state.upon(StdioLifecycle.start).loop()(_refuse_closed)
    _state.upon(StdioLifecycle.wait_ready).loop()(_refuse_closed)


# --- the handshake's outcome -------------------------------------------------------------------

def _started(inputs: StdioLifecycle, core: StdioCore) -> None:
    core._became_ready()


_moves(starting, StdioLifecycle.launched, ready)(_started)


def _restarted(inputs: StdioLifecycle, core: StdioCore) -> None:
    core._became_ready()
    core._restored()


_moves(relaunching, StdioLifecycle.launched, ready)(_restarted)


def _start_failed(inputs: StdioLifecycle, core: StdioCore, message: str) -> None:
    core._failed(message)


_moves(starting, StdioLifecycle.launch_failed, failed)(_start_failed)


def _restart_failed(inputs: StdioLifecycle, core: StdioCore, message: str) -> None:
    core._restart_failed(message)
    core._schedule_restart()


_moves(relaunching, StdioLifecycle.launch_failed, retrying)(_restart_failed)


# A handshake that ends after close() changes nothing.
for _state in SHUT:
    _state.upon(StdioLifecycle.launched).loop()(_nothing)
    _state.upon(StdioLifecycle.launch_failed).loop()(_nothing)


# --- the child exits ---------------------------------------------------------------------------

_moves(ready, StdioLifecycle.exiting, exiting)(_nothing)


def _stopping(inputs: StdioLifecycle, core: StdioCore, reason: str) -> None:
    core._exited_for_good(reason)


_moves(ready, StdioLifecycle.exiting_for_good, stopping)(_stopping)


# Told twice (an oversized line kills the child, which then exits), or by a child that was
# not ready yet (its handshake fails by itself), or after close(): nothing more to do.
for _state in (starting, relaunching, exiting, stopping, *SHUT):
    _state.upon(StdioLifecycle.exiting).loop()(_nothing)
    _state.upon(StdioLifecycle.exiting_for_good).loop()(_nothing)


def _lost_restarting(inputs: StdioLifecycle, core: StdioCore, message: str) -> None:
    core._lost(message)
    core._schedule_restart()


_moves(exiting, StdioLifecycle.ended, waiting)(_lost_restarting)


def _lost_for_good(inputs: StdioLifecycle, core: StdioCore, message: str) -> None:
    core._lost(message)
    core._failed(message)


_moves(stopping, StdioLifecycle.ended, failed)(_lost_for_good)


def _fail_pending(inputs: StdioLifecycle, core: StdioCore, message: str) -> None:
    core._fail_pending(message)


def _fail_pending_closed(inputs: StdioLifecycle, core: StdioCore, message: str) -> None:
    core._fail_pending(f"[{core.name}] closed")


# A child that had not finished its handshake: its requests fail, and so does the handshake.
starting.upon(StdioLifecycle.ended).loop()(_fail_pending)
relaunching.upon(StdioLifecycle.ended).loop()(_fail_pending)
for _state in SHUT:
    _state.upon(StdioLifecycle.ended).loop()(_fail_pending_closed)


# --- restarts ----------------------------------------------------------------------------------

def _respawn(inputs: StdioLifecycle, core: StdioCore) -> None:
    core._relaunch()


_moves(waiting, StdioLifecycle.delay_elapsed, relaunching)(_respawn)
_moves(retrying, StdioLifecycle.delay_elapsed, relaunching)(_respawn)
for _state in SHUT:
    _state.upon(StdioLifecycle.delay_elapsed).loop()(_nothing)  # a timer close() raced


# --- notifications -----------------------------------------------------------------------------

def _send(inputs: StdioLifecycle, core: StdioCore, method: str,
          params: dict[str, Any] | None) -> None:
    core._send_notification(method, params)


ready.upon(StdioLifecycle.notify).loop()(_send)


def _drop(inputs: StdioLifecycle, core: StdioCore, method: str,
          params: dict[str, Any] | None) -> None:
    core._drop_notification(method)


for _state in EVERY_STATE:
    if _state is not ready:
        _state.upon(StdioLifecycle.notify).loop()(_drop)


# --- close -------------------------------------------------------------------------------------

def _shut_down(inputs: StdioLifecycle, core: StdioCore, done: defer.Deferred[None]) -> None:
    core._shut_down(done)


for _state in EVERY_STATE:
    if _state not in SHUT:
        _moves(_state, StdioLifecycle.close, closing)(_shut_down)


def _join_shutdown(inputs: StdioLifecycle, core: StdioCore,
                   done: defer.Deferred[None]) -> None:
    core._join_shutdown(done)


closing.upon(StdioLifecycle.close).loop()(_join_shutdown)


def _closed(inputs: StdioLifecycle, core: StdioCore) -> None:
    core._closed()


_moves(closing, StdioLifecycle.reaped, closed)(_closed)


def _already_closed(inputs: StdioLifecycle, core: StdioCore,
                    done: defer.Deferred[None]) -> None:
    core._answer(done)


closed.upon(StdioLifecycle.close).loop()(_already_closed)


StdioMachine = builder.build()



def lifecycle(core: StdioCore) -> StdioLifecycle:
    """A new machine, in ``idle``, driving ``core`` (its outputs run as ``settling`` says)."""
    return settled(StdioMachine, core)
