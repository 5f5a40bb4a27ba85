"""The lifecycle of a Streamable HTTP session's GET stream (server→client messages of the
handshake era, ``get_stream.GetStream``) as an explicit state machine (automat).

States::

    idle        no stream wanted: before the first handshake, while the session is being
                re-initialised (or its era probed), after the server forgot the session
    connecting  a GET is on its way
    open        the server answered with an event stream: its messages flow
    waiting     the GET failed or the stream ended: the next GET follows a backoff
    refused     the server answered 405 (it offers no GET stream): it is not asked again,
                not even by a later session of the same upstream
    closed      ``close()``; nothing leaves it

A new session (``start``) drops the stream of the previous one and opens its own, with a
fresh backoff and no ``Last-Event-ID``; a reconnection after ``waiting`` keeps both. The
stream feeds the outcomes of its *current* GET only (one that was dropped is not heard from
again); a state that expects no such outcome has no transition for it (automat raises
``NoTransition``), nor has any state but ``waiting`` for the end of the delay, whose timer
every way out of ``waiting`` cancels. ``start``, ``stop`` and ``close`` are legal everywhere.
Outputs run once the machine has settled (``settling.py``).
"""

from __future__ import annotations

from typing import Protocol

from automat import TypeMachineBuilder

from director.mcp.upstream.settling import entering, settled, unchanged


class GetStreamLifecycle(Protocol):
    """The inputs."""

    def start(self) -> None:
        """A handshake established a session: open its stream."""

    def stop(self) -> None:
        """The session is being re-initialised (or its era probed): its stream is dropped."""

    def connected(self) -> None:
        """The current GET was answered with an event stream."""

    def failed(self, problem: str) -> None:
        """The current GET failed: no answer in time, a connection error, an HTTP error."""

    def ended(self, problem: str | None) -> None:
        """The open stream ended: by the server (``problem`` None) or not."""

    def refused(self) -> None:
        """The current GET was answered 405."""

    def expired(self, session_id: str | None) -> None:
        """The current GET says the server forgot session ``session_id`` (404, or a 400
        about the session)."""

    def delay_elapsed(self) -> None:
        """The backoff after a failure or an end is over."""

    def close(self) -> None:
        """The session closes."""


class GetStreamCore(Protocol):
    """The outputs (``get_stream.GetStream``)."""

    def _entered(self, state: str) -> None: ...
    def _begin(self) -> None: ...
    def _connect(self) -> None: ...
    def _opened(self) -> None: ...
    def _drop(self) -> None: ...
    def _schedule_reconnect(self, problem: str | None) -> None: ...
    def _cancel_reconnect(self) -> None: ...
    def _unsupported(self) -> None: ...
    def _renew_session(self, session_id: str | None) -> None: ...


# (the core is a protocol: the stream implements it, a test may fake it)
builder = TypeMachineBuilder(GetStreamLifecycle, GetStreamCore)  # type: ignore[type-abstract]
idle, connecting, open_, waiting, refused, closed = (
    builder.state(name) for name in ("idle", "connecting", "open", "waiting", "refused",
                                     "closed"))
Inputs, Core = GetStreamLifecycle, GetStreamCore

for _state in (idle, refused, closed):
    _state.upon(Inputs.stop).loop()(unchanged)
for _state in (refused, closed):
    _state.upon(Inputs.start).loop()(unchanged)
closed.upon(Inputs.close).loop()(unchanged)
idle.upon(Inputs.start).to(connecting)(entering(connecting, Core._begin, Core._connect))
idle.upon(Inputs.close).to(closed)(entering(closed))
refused.upon(Inputs.close).to(closed)(entering(closed))

# A GET, or its stream, in flight: a new session replaces it, stop and close drop it.
for _state in (connecting, open_):
    _state.upon(Inputs.start).to(connecting)(
        entering(connecting, Core._drop, Core._begin, Core._connect))
    _state.upon(Inputs.stop).to(idle)(entering(idle, Core._drop))
    _state.upon(Inputs.close).to(closed)(entering(closed, Core._drop))

connecting.upon(Inputs.connected).to(open_)(entering(open_, Core._opened))
connecting.upon(Inputs.failed).to(waiting)(entering(waiting, Core._schedule_reconnect))
connecting.upon(Inputs.refused).to(refused)(entering(refused, Core._unsupported))
connecting.upon(Inputs.expired).to(idle)(entering(idle, Core._renew_session))
open_.upon(Inputs.ended).to(waiting)(entering(waiting, Core._schedule_reconnect))

waiting.upon(Inputs.delay_elapsed).to(connecting)(entering(connecting, Core._connect))
waiting.upon(Inputs.start).to(connecting)(
    entering(connecting, Core._cancel_reconnect, Core._begin, Core._connect))
waiting.upon(Inputs.stop).to(idle)(entering(idle, Core._cancel_reconnect))
waiting.upon(Inputs.close).to(closed)(entering(closed, Core._cancel_reconnect))

GetStreamMachine = builder.build()


def lifecycle(core: GetStreamCore) -> GetStreamLifecycle:
    """A new machine, in ``idle``, driving ``core``."""
    return settled(GetStreamMachine, core)
