"""The life of an HTTP upstream session object, as a state machine (automat).

An ``HttpSession`` (``http_session.py``) outlives the MCP sessions it makes with its server:
the server may forget one (Streamable HTTP: 404 on its session id), its stream may end
(HTTP+SSE), and the next request makes a new one. The states:

* ``fresh``: never established; a failure to establish is the caller's failure alone;
* ``established``: the handshake succeeded;
* ``reinitialising``: the server forgot the session (or the session must probe its era
  again, ``upstream.modern``); the next handshake makes a new one, silently;
* ``lost``: the session ended and ``on_closed`` was called, once for this loss;
* ``closed``: ``close()`` was called; nothing leaves this state.

A handshake that succeeds after the first (from ``reinitialising`` or ``lost``) calls
``on_restored``; one that finishes after ``close()`` is refused. Which input is legal in which
state is the table below, so no path can, say, report a loss of a session never established or
restore a closed one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import attrs
from automat import TypeMachineBuilder


class SessionLifecycle(Protocol):
    """The inputs of the machine (what the session tells it, or asks it)."""

    def established(self) -> bool:
        """Whether requests can go on the current session as it is."""

    def closed(self) -> bool:
        """Whether ``close()`` was called."""

    def handshake_succeeded(self) -> bool:
        """A handshake finished; False: the session was closed meanwhile (it is refused)."""

    def forgotten(self) -> None:
        """The server forgot the session: the next request establishes a new one."""

    def lost(self, reason: str) -> None:
        """The session ended by itself (a stream lost, re-initialising failed)."""

    def close(self) -> bool:
        """``close()``; False if it was closed already."""


@attrs.define
class LifecycleHooks:
    """What the machine's transitions call: the session's own reactions."""

    #: The session was re-established by itself (``on_restored``).
    restored: Callable[[], None]
    #: The session was lost (logged, ``on_closed``), once per loss.
    reported_lost: Callable[[str], None]


_builder = TypeMachineBuilder(SessionLifecycle, LifecycleHooks)
fresh = _builder.state("fresh")
established = _builder.state("established")
reinitialising = _builder.state("reinitialising")
lost = _builder.state("lost")
closed = _builder.state("closed")

for _state, _answer in ((fresh, False), (established, True), (reinitialising, False),
                        (lost, False), (closed, False)):
    _state.upon(SessionLifecycle.established).loop().returns(_answer)
    _state.upon(SessionLifecycle.closed).loop().returns(_state is closed)
for _state in (fresh, established, reinitialising, lost):
    _state.upon(SessionLifecycle.close).to(closed).returns(True)
closed.upon(SessionLifecycle.close).loop().returns(False)

fresh.upon(SessionLifecycle.handshake_succeeded).to(established).returns(True)
closed.upon(SessionLifecycle.handshake_succeeded).loop().returns(False)


@reinitialising.upon(SessionLifecycle.handshake_succeeded).to(established)
@lost.upon(SessionLifecycle.handshake_succeeded).to(established)
def _restored(_lifecycle: SessionLifecycle, hooks: LifecycleHooks) -> bool:
    hooks.restored()
    return True


established.upon(SessionLifecycle.forgotten).to(reinitialising).returns(None)
for _state in (fresh, reinitialising, lost, closed):
    _state.upon(SessionLifecycle.forgotten).loop().returns(None)


@established.upon(SessionLifecycle.lost).to(lost)
@reinitialising.upon(SessionLifecycle.lost).to(lost)
def _report(_lifecycle: SessionLifecycle, hooks: LifecycleHooks, reason: str) -> None:
    hooks.reported_lost(reason)


# Never established, reported already, or closed: nothing to tell.
for _state in (fresh, lost, closed):
    _state.upon(SessionLifecycle.lost).loop().returns(None)

session_lifecycle = _builder.build()
