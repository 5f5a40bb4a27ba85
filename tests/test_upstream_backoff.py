"""The one delay policy of the upstream transports (``director.mcp.upstream.backoff``), on
``task.Clock``."""

from __future__ import annotations

import pytest
from twisted.internet import task

from director.mcp.upstream.backoff import Backoff


def delays(backoff: Backoff, count: int) -> list[float]:
    return [backoff.next_delay() for _ in range(count)]


def test_delays_grow_by_the_factor_up_to_the_cap() -> None:
    assert delays(Backoff(0.5, 30.0), 9) == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert delays(Backoff(0.05, 0.25), 5) == [0.05, 0.1, 0.2, 0.25, 0.25]
    assert delays(Backoff(1.0, 100.0, factor=3), 4) == [1, 3, 9, 27]


def test_success_starts_again_from_the_initial_delay() -> None:
    backoff = Backoff(1.0, 30.0)
    assert delays(backoff, 3) == [1, 2, 4]
    backoff.succeeded()
    assert delays(backoff, 2) == [1, 2]


def test_running_counts_as_success_only_after_healthy_after() -> None:
    clock = task.Clock()
    backoff = Backoff(0.5, 30.0, healthy_after=60.0, clock=clock)
    assert delays(backoff, 3) == [0.5, 1, 2]
    backoff.running()
    clock.advance(59.9)  # died before it was healthy: the delays keep growing
    assert backoff.next_delay() == 4
    backoff.running()
    clock.advance(60.0)
    assert delays(backoff, 2) == [0.5, 1]
    clock.advance(1000)  # not running since the last failure: nothing resets it
    assert backoff.next_delay() == 2


def test_a_preferred_delay_is_the_next_and_grows_from_there() -> None:
    backoff = Backoff(1.0, 30.0)
    backoff.prefer(5.0)
    assert delays(backoff, 3) == [5, 10, 20]
    backoff.prefer(0.0)  # a server's retry: 0 is honoured once, then the growth restarts
    assert delays(backoff, 2) == [0, 2]
    backoff.prefer(45.0)  # the server's own delay is not capped ...
    assert delays(backoff, 2) == [45, 30]  # ... what follows is


def test_healthy_after_needs_a_clock() -> None:
    with pytest.raises(ValueError, match="healthy_after needs a clock"):
        Backoff(1.0, 2.0, healthy_after=5.0)
