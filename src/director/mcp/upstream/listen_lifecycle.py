"""The lifecycle of a stateless-era ``subscriptions/listen`` stream (``envelope.ChangeListener``)
as an explicit state machine (automat).

States::

    idle         not asked to listen yet
    listening    one listen request is open
    waiting      the stream ended; it is opened again after a backoff
    unsupported  the server has no such method (-32601): it is not asked again
    stopped      the session is closing

The listener feeds it inputs (start, the subscribed URIs changed, the stream ended, it was
refused, the delay elapsed, stop) and implements its outputs (``ListenCore``); an end of a
stream that was replaced or cancelled is the listener's to ignore (it is not the current one).
Inputs a state does not expect have no transition (automat raises ``NoTransition``); those
that may come late (a start after stop, a new subscription on a server without the method)
are accepted and change nothing. Outputs run once the machine has settled (``settling.py``).
"""

from __future__ import annotations

from typing import Protocol

from automat import TypeMachineBuilder

from director.mcp.upstream.settling import entering as _entering
from director.mcp.upstream.settling import settled
from director.mcp.upstream.settling import unchanged as _nothing


class ListenLifecycle(Protocol):
    """The inputs."""

    def start(self) -> None:
        """The session is established in the stateless era: listen."""

    def resubscribe(self) -> None:
        """The subscribed resources changed: the stream is opened again with the new filter."""

    def ended(self) -> None:
        """The current stream ended (an answer, an error, a dropped connection)."""

    def refused(self) -> None:
        """The server answered the listen request with -32601."""

    def delay_elapsed(self) -> None:
        """The backoff after an end is over."""

    def stop(self) -> None:
        """The session closes."""


class ListenCore(Protocol):
    """The outputs (``envelope.ChangeListener``)."""

    def _entered(self, state: str) -> None: ...
    def _open(self) -> None: ...
    def _drop_stream(self) -> None: ...
    def _schedule_retry(self) -> None: ...
    def _cancel_retry(self) -> None: ...


# (the core is a protocol: the listener implements it, a test may fake it)
builder = TypeMachineBuilder(ListenLifecycle, ListenCore)  # type: ignore[type-abstract]
idle, listening, waiting, unsupported, stopped = (
    builder.state(name) for name in ("idle", "listening", "waiting", "unsupported", "stopped"))


idle.upon(ListenLifecycle.start).to(listening)(_entering(listening, ListenCore._open))
idle.upon(ListenLifecycle.resubscribe).to(listening)(_entering(listening, ListenCore._open))
idle.upon(ListenLifecycle.stop).to(stopped)(_entering(stopped))

listening.upon(ListenLifecycle.start).loop()(_nothing)
listening.upon(ListenLifecycle.resubscribe).loop()(
    _entering(listening, ListenCore._drop_stream, ListenCore._open))
listening.upon(ListenLifecycle.ended).to(waiting)(_entering(waiting, ListenCore._schedule_retry))
listening.upon(ListenLifecycle.refused).to(unsupported)(_entering(unsupported))
listening.upon(ListenLifecycle.stop).to(stopped)(_entering(stopped, ListenCore._drop_stream))

waiting.upon(ListenLifecycle.start).loop()(_nothing)
waiting.upon(ListenLifecycle.resubscribe).to(listening)(
    _entering(listening, ListenCore._cancel_retry, ListenCore._open))
waiting.upon(ListenLifecycle.delay_elapsed).to(listening)(_entering(listening, ListenCore._open))
waiting.upon(ListenLifecycle.stop).to(stopped)(_entering(stopped, ListenCore._cancel_retry))

unsupported.upon(ListenLifecycle.start).loop()(_nothing)
unsupported.upon(ListenLifecycle.resubscribe).loop()(_nothing)
unsupported.upon(ListenLifecycle.stop).to(stopped)(_entering(stopped))

stopped.upon(ListenLifecycle.start).loop()(_nothing)
stopped.upon(ListenLifecycle.resubscribe).loop()(_nothing)
stopped.upon(ListenLifecycle.stop).loop()(_nothing)

ListenMachine = builder.build()


def lifecycle(core: ListenCore) -> ListenLifecycle:
    """A new machine, in ``idle``, driving ``core``."""
    return settled(ListenMachine, core)
