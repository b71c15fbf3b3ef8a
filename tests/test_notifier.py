"""The per-run notifier that wakes log followers: no lost wake-ups, no leak."""

from __future__ import annotations

from contextlib import aclosing
from typing import Any

import trio
import trio.testing

from trioflow import Engine
from trioflow.stores.base import Notifier


def test_a_follower_leaving_does_not_orphan_another_followers_event() -> None:
    notifier = Notifier()
    first = notifier.watch("r")
    second = notifier.watch("r")  # a second follower, still reading the store
    assert first is second
    notifier.release("r", first)  # the first one leaves before waiting
    notifier.notify("r")  # a write lands
    assert second.is_set()  # the second follower still wakes
    notifier.release("r", second)
    assert notifier.watched() == 0


def test_events_are_forgotten_once_every_holder_released_them() -> None:
    notifier = Notifier()
    events = [notifier.watch(f"r{i}") for i in range(100)]
    assert notifier.watched() == 100
    for i, event in enumerate(events):
        notifier.release(f"r{i}", event)
    assert notifier.watched() == 0
    # A release after the event was notified (and replaced) is harmless.
    old = notifier.watch("r")
    notifier.notify("r")
    new = notifier.watch("r")
    notifier.release("r", old)
    assert notifier.watched() == 1 and not new.is_set()
    notifier.release("r", new)
    assert notifier.watched() == 0


async def test_following_finished_and_live_runs_leaves_nothing_behind(
    engine: Engine, spec_graph: dict[str, Any], autojump_clock: trio.testing.MockClock
) -> None:
    await engine.register_graph(spec_graph)
    sleepy = {"id": "sleepy", "start_node": "s", "nodes": [{"id": "s", "callable": "tools.sleep"}]}
    await engine.register_graph(sleepy)
    done = [await engine.start_run("code-review-a", {"issues_open": 1}) for _ in range(5)]
    for run in done:
        await engine.wait(run.run_id)
    live = await engine.start_run("sleepy", {"sleep_s": 5})
    seen: dict[str, int] = {}

    async def follow(run_id: str, key: str, stop_early: bool = False) -> None:
        async with aclosing(engine.follow(run_id)) as entries:
            async for entry in entries:
                seen[key] = entry.seq
                if stop_early and entry.seq >= 2:
                    return

    async with trio.open_nursery() as nursery:
        for i, run in enumerate(done):
            nursery.start_soon(follow, run.run_id, f"done{i}")
        for i in range(10):
            nursery.start_soon(follow, live.run_id, f"live{i}", i % 2 == 0)
    assert all(seen[f"done{i}"] == 29 for i in range(5))
    final = await engine.wait(live.run_id)
    assert all(seen[f"live{i}"] == (2 if i % 2 == 0 else final.last_seq) for i in range(10))
    assert engine.store.notifier.watched() == 0
