"""When an HTTP response ends, told without a Deferred (``DirectorRequest.when_done``).

Twisted's ``notifyFinish`` makes a Deferred per caller and fires it through its callback
chain; a proxied call asked for two (its handler is cancelled if the client goes away, and
its channel stops writing), which was 2 % of the call's CPU. A request of another kind (the
tests' ``DummyRequest``) is still told through ``notifyFinish``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.python.failure import Failure


def when_done(request: Any, call: Callable[[bool], object]) -> None:
    """``call(lost)`` once: when ``request``'s response is finished (``lost`` False), or when
    its connection is lost before that (True)."""
    hook = getattr(request, "when_done", None)
    if hook is not None:
        hook(call)
        return
    request.notifyFinish().addBoth(lambda outcome: call(isinstance(outcome, Failure)))
