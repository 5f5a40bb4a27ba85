"""What the gateway learns of its upstreams' eras: the service's one memory, bounded and
forgetting, on an injected clock (twisted's ``task.Clock``: no sleeping)."""

from __future__ import annotations

from twisted.internet import task

from director.mcp.upstream.eras import EraMemory, http_key, stdio_key


def test_a_verdict_holds_for_its_lifetime_then_is_forgotten() -> None:
    clock = task.Clock()
    eras = EraMemory(clock, lifetime=3600)
    key = http_key("https://mcp.example.com/mcp", "modern")
    assert eras.verdict(key) is None
    eras.learnt(key, False)
    clock.advance(3600)
    assert eras.verdict(key) is False
    clock.advance(0.001)
    assert eras.verdict(key) is None and len(eras) == 0  # probed again: servers get upgraded


def test_the_oldest_verdicts_make_room() -> None:
    clock = task.Clock()
    eras = EraMemory(clock, limit=3)
    keys = [stdio_key("npx", ["-y", f"server-{n}"], None) for n in range(4)]
    for key in keys[:3]:
        eras.learnt(key, True)
    eras.learnt(keys[0], False)  # learnt again: the newest now
    eras.learnt(keys[3], True)
    assert len(eras) == 3
    assert [eras.verdict(key) for key in keys] == [False, None, True, True]


def test_forgetting_one_server_leaves_the_others() -> None:
    eras = EraMemory(task.Clock())
    url = "https://a.example/mcp"
    eras.learnt(http_key(url, "modern"), True)
    eras.learnt(http_key(url, "legacy"), False)
    eras.learnt(http_key("https://b.example/mcp", "modern"), True)
    eras.forget(http_key(url, "modern"), http_key(url, "legacy"))
    assert eras.verdict(http_key(url, "modern")) is None
    assert eras.verdict(http_key("https://b.example/mcp", "modern")) is True
