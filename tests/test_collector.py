"""``director.collector`` on ``task.Clock`` with a recording stand-in for the ``gc`` module:
CPython's own full passes are off, young survivors are collected and frozen each turn, a
sweep of everything comes once the frozen population has doubled, nothing runs while a write
to every stream is under way, and stopping gives CPython its thresholds back. Then the same
policy on the real ``gc`` module: garbage among frozen objects is reclaimed by the sweep."""

from __future__ import annotations

import gc
from typing import Any

from twisted.internet import task

from director import collector as collector_module
from director.collector import NEVER, SWEEP_MINIMUM_GROWTH, YOUNG_SECONDS, Collector


class RecordingGc:
    """The part of ``gc`` the collector uses; ``young`` objects are frozen by ``freeze``."""

    def __init__(self, frozen: int) -> None:
        self.thresholds: tuple[int, ...] = (700, 10, 10)
        self.frozen, self.young = frozen, 0
        self.calls: list[str] = []

    def get_threshold(self) -> tuple[int, ...]:
        return self.thresholds

    def set_threshold(self, *thresholds: int) -> None:
        self.thresholds = thresholds

    def get_freeze_count(self) -> int:
        return self.frozen

    def freeze(self) -> None:
        self.calls.append("freeze")
        self.frozen, self.young = self.frozen + self.young, 0

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")
        self.young, self.frozen = self.young + self.frozen, 0

    def collect(self) -> int:
        self.calls.append("collect")
        return 0


def started(frozen: int = 1_000_000, busy: list[bool] | None = None
            ) -> tuple[Collector, RecordingGc, task.Clock]:
    clock, recording = task.Clock(), RecordingGc(frozen)
    collector = Collector(clock, lambda: bool(busy), recording)
    collector.start()
    return collector, recording, clock


def turns(clock: task.Clock, count: int) -> None:
    for _ in range(count):
        clock.advance(YOUNG_SECONDS)


def test_cpython_starts_no_full_pass_and_gets_its_thresholds_back_at_stop() -> None:
    collector, recording, _ = started()
    assert recording.thresholds == (700, 10, NEVER)
    collector.stop()
    assert recording.thresholds == (700, 10, 10)


def test_each_turn_collects_the_young_and_freezes_the_survivors() -> None:
    _, recording, clock = started()
    clock.advance(YOUNG_SECONDS - 0.001)
    assert recording.calls == []
    recording.young = 5_000
    clock.advance(0.001)
    assert recording.calls == ["collect", "freeze"]
    assert (recording.frozen, recording.young) == (1_005_000, 0)


def test_a_sweep_comes_once_the_frozen_population_has_doubled() -> None:
    collector, recording, clock = started(frozen=1_000_000)
    recording.young = 999_999
    clock.advance(YOUNG_SECONDS)  # frozen now 1,999,999: not yet
    recording.calls.clear()
    recording.young = 1
    clock.advance(YOUNG_SECONDS)  # frozen reaches 2,000,000 with this turn's survivors
    assert collector.sweeps == 0 and recording.calls == ["collect", "freeze"]
    recording.calls.clear()
    clock.advance(YOUNG_SECONDS)
    assert collector.sweeps == 1 and recording.calls == ["unfreeze", "collect", "freeze"]
    assert collector.swept_at == 2_000_000


def test_a_small_process_sweeps_only_after_a_minimum_growth() -> None:
    collector, recording, clock = started(frozen=10_000)
    recording.young = SWEEP_MINIMUM_GROWTH - 1
    turns(clock, 2)
    assert collector.sweeps == 0
    recording.young = 1
    turns(clock, 2)
    assert collector.sweeps == 1


def test_nothing_runs_while_every_stream_is_being_written() -> None:
    busy = [True]
    collector, recording, clock = started(frozen=1, busy=busy)
    recording.young = 10 * SWEEP_MINIMUM_GROWTH
    turns(clock, 3)
    assert recording.calls == [] and collector.sweeps == 0
    busy.clear()
    clock.advance(YOUNG_SECONDS)
    assert recording.calls == ["collect", "freeze"]


class Cycle:
    def __init__(self) -> None:
        self.me: Any = self


def test_on_the_real_gc_a_sweep_reclaims_garbage_that_was_frozen(monkeypatch: Any) -> None:
    monkeypatch.setattr(collector_module, "SWEEP_MINIMUM_GROWTH", 0)  # a test process is small
    clock = task.Clock()
    thresholds = gc.get_threshold()
    collector = Collector(clock, lambda: False)
    gc.freeze()
    try:
        collector.start()
        assert gc.get_threshold()[2] == NEVER
        cycles = [Cycle() for _ in range(1000)]
        clock.advance(YOUNG_SECONDS)  # young survivors frozen
        assert gc.get_freeze_count() >= collector.swept_at + 1000
        del cycles  # garbage now, but frozen: no ordinary pass sees it
        assert not any(isinstance(o, Cycle) for o in gc.get_objects())  # frozen: not listed
        gc.collect()
        collector.swept_at = 0  # as if the population had doubled
        clock.advance(YOUNG_SECONDS)
        assert collector.sweeps == 1
        gc.unfreeze()
        assert not any(isinstance(o, Cycle) for o in gc.get_objects())
    finally:
        collector.stop()
        gc.unfreeze()
        assert gc.get_threshold() == thresholds


def test_the_free_heap_goes_back_to_the_system_at_start_and_after_each_sweep_only() -> None:
    clock, recording, trims = task.Clock(), RecordingGc(1_000_000), []
    collector = Collector(clock, lambda: False, recording, trim_heap=lambda: trims.append(1))
    collector.start()
    assert len(trims) == 1
    recording.young = 5_000
    clock.advance(YOUNG_SECONDS)  # a young turn: nothing given back
    assert len(trims) == 1
    recording.young = 1_000_000
    turns(clock, 2)  # frozen doubled on the first, swept on the second
    assert collector.sweeps == 1 and len(trims) == 2


def test_the_daemon_finds_malloc_trim_in_the_c_library() -> None:
    """Debian and Ubuntu run glibc: the daemon must not silently lose the trim there."""
    trim = collector_module.heap_trimmer()
    assert trim is not None
    assert trim() in (0, 1)  # glibc: 1 if memory was given back, else 0
