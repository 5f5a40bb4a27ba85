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

A handshake that succeeds after the first (from ``reinitialising`` or ``lost``) is a restore (the
session calls ``on_restored``); one that finishes after ``close()`` is refused. Which input is legal in which
state is the table below, so no path can, say, report a loss of a session never established or
restore a closed one.
"""

from __future__ import annotations

import enum
from typing import Protocol

from automat import TypeMachineBuilder


class Handshake(enum.Enum):
    """What a finished handshake means."""

    FIRST = "the session is established"
    RESTORED = "the session is established again: on_restored"
    TOO_LATE = "close() was called meanwhile: refused"


class SessionLifecycle(Protocol):
    """The inputs of the machine (what the session tells it, or asks it). Its answers say
    what the session does next (call ``on_restored``, ``on_closed``): no transition calls out,
    so that those callbacks may use the session (and so ask the machine) at once."""

    def established(self) -> bool:
        """Whether requests can go on the current session as it is."""

    def closed(self) -> bool:
        """Whether ``close()`` was called."""

    def handshake_succeeded(self) -> Handshake:
        """A handshake finished."""

    def forgotten(self) -> None:
        """The server forgot the session: the next request establishes a new one."""

    def lost(self, reason: str) -> bool:
        """The session ended by itself (a stream lost, re-initialising failed); True: it is to
        be reported (``on_closed``), which happens once per loss."""

    def close(self) -> bool:
        """``close()``; False if it was closed already."""


class Nothing:
    """The machine keeps no data: its state is all there is."""


_builder = TypeMachineBuilder(SessionLifecycle, Nothing)
fresh = _builder.state("fresh")
established = _builder.state("established")
reinitialising = _builder.state("reinitialising")
lost = _builder.state("lost")
closed = _builder.state("closed")

for _state in (fresh, established, reinitialising, lost, closed):
    _state.upon(SessionLifecycle.established).loop().returns(_state is established)
    _state.upon(SessionLifecycle.closed).loop().returns(_state is closed)
for _state in (fresh, established, reinitialising, lost):
    _state.upon(SessionLifecycle.close).to(closed).returns(True)
closed.upon(SessionLifecycle.close).loop().returns(False)

fresh.upon(SessionLifecycle.handshake_succeeded).to(established).returns(Handshake.FIRST)
reinitialising.upon(SessionLifecycle.handshake_succeeded).to(established).returns(
    Handshake.RESTORED)
lost.upon(SessionLifecycle.handshake_succeeded).to(established).returns(Handshake.RESTORED)
closed.upon(SessionLifecycle.handshake_succeeded).loop().returns(Handshake.TOO_LATE)
# (``established`` has no such transition: the session's handshakes run one at a time, and
# only when it is not established; automat raises ``NoTransition`` otherwise.)

established.upon(SessionLifecycle.forgotten).to(reinitialising).returns(None)
for _state in (fresh, reinitialising, lost, closed):
    _state.upon(SessionLifecycle.forgotten).loop().returns(None)

established.upon(SessionLifecycle.lost).to(lost).returns(True)
reinitialising.upon(SessionLifecycle.lost).to(lost).returns(True)
# Never established, reported already, or closed: nothing to tell.
for _state in (fresh, lost, closed):
    _state.upon(SessionLifecycle.lost).loop().returns(False)

session_lifecycle = _builder.build()
