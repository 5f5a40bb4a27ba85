"""How the upstream lifecycle machines (automat) run their outputs: once the machine has
settled in its new state.

An output fires Deferreds and calls the session's hooks; their callers may read the session's
state or make another input at once (a failed start's caller, ``on_closed`` calling
``close()``), and must find the machine in its new state with nothing pending. Automat itself
runs outputs during the transition and queues a reentrant input until it is over (refusing
one that returns a value). So the machine is handed a core that only records its outputs
(``_entered``, which tells the core the new state's name, is the exception), and each input
is followed by the outputs it, and any input they make in turn, set off, in order.

``entering`` and ``unchanged`` are the transitions the machines declare with: the listen
stream's and the GET stream's name their outputs in a table this way.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

Inputs = TypeVar("Inputs")
Core = TypeVar("Core")

Queue = collections.deque[Callable[[], None]]


class _Recorded:
    """The core as the machine sees it: state changes at once, outputs queued."""

    def __init__(self, core: object, queue: Queue) -> None:
        self._core = core
        self._queue = queue

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._core, name)
        if name == "_entered" or not callable(value):
            return value
        return lambda *args: self._queue.append(functools.partial(value, *args))


class _Settling:
    """The machine's inputs, each followed by the outputs queued meanwhile."""

    def __init__(self, machine: object, queue: Queue) -> None:
        self._machine = machine
        self._queue = queue

    def __getattr__(self, name: str) -> Callable[..., None]:
        symbol = getattr(self._machine, name)

        def feed(*args: Any) -> None:
            symbol(*args)
            while self._queue:
                self._queue.popleft()()

        return feed


def entering(target: Any, *outputs: Callable[..., None]) -> Callable[..., None]:
    """A transition into ``target`` that tells the core its name, then runs the core's
    ``outputs`` (named by the core protocol's methods) in order, each with the input's
    arguments."""
    def transition(inputs: object, core: Any, *args: Any) -> None:
        core._entered(target.name)
        for output in outputs:
            getattr(core, output.__name__)(*args)

    return transition


def unchanged(inputs: object, core: object, *args: Any) -> None:
    """A transition that stays put and does nothing (an input that may come late)."""
    return None


def settled(machine: Callable[[Core], Inputs], core: Core) -> Inputs:
    """A new ``machine`` (an automat ``TypeMachine``) driving ``core``, settling as above."""
    queue: Queue = collections.deque()
    return cast(Inputs, _Settling(machine(cast(Core, _Recorded(core, queue))), queue))
