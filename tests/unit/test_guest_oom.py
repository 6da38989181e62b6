"""The guest's OOM-kill watch (carapace.guest.oom) on a temporary cgroup tree: inotify
and polling, one event per increase, no event lost to concurrent or cancelled callers."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from carapace.guest import oom
from carapace.guest.oom import IN_IGNORED, IN_MODIFY, OOMWatcher, parse_inotify_events

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 10))


def events_text(oom_kill: int, max_: int = 0) -> str:
    return f"low 0\nhigh 0\nmax {max_}\noom {oom_kill}\noom_kill {oom_kill}\noom_group_kill 0\n"


def make_cgroup(root: Path, name: str, oom_kill: int = 0) -> Path:
    d = root / name
    d.mkdir()
    (d / "memory.events").write_text(events_text(oom_kill))
    return d


def set_kills(d: Path, n: int, max_: int = 0) -> None:
    (d / "memory.events").write_text(events_text(n, max_))


def test_parse_inotify_events() -> None:
    buf = (
        struct.pack("iIII", 1, IN_MODIFY, 0, 0)
        + struct.pack("iIII", 2, IN_MODIFY, 0, 16)
        + b"memory.events\0\0\0"
        + struct.pack("iIII", 1, IN_IGNORED, 0, 0)
    )
    assert parse_inotify_events(buf) == [(1, IN_MODIFY), (2, IN_MODIFY), (1, IN_IGNORED)]
    assert parse_inotify_events(b"") == []
    assert parse_inotify_events(b"\0" * 7) == []  # a partial header is not an event


@pytest.mark.parametrize("use_inotify", [True, False], ids=["inotify", "polling"])
def test_an_increase_is_reported_once(tmp_path: Path, use_inotify: bool) -> None:
    async def go() -> None:
        w = OOMWatcher(poll_interval=0.01, use_inotify=use_inotify)
        d = make_cgroup(tmp_path, "c1", oom_kill=2)  # kills before the watch: not events
        w.watch("c1", str(d))
        assert (w._watches["c1"].wd >= 0) is use_inotify  # the path under test is taken
        assert (await _within(w.next_event(), 0.3)) is None
        set_kills(d, 3)
        assert await _within(w.next_event(), 5) == "c1"
        set_kills(d, 3, max_=50)  # another counter moved: no event
        assert (await _within(w.next_event(), 0.3)) is None
        set_kills(d, 4)
        assert await _within(w.next_event(), 5) == "c1"
        w.close()

    run(go())


async def _within(coro: Coroutine[Any, Any, str], seconds: float) -> str | None:
    try:
        return await asyncio.wait_for(coro, seconds)
    except TimeoutError:
        return None


def test_forget_reads_the_counter_a_last_time(tmp_path: Path) -> None:
    async def go() -> None:
        w = OOMWatcher(use_inotify=False, poll_interval=60)  # only explicit reads
        d = make_cgroup(tmp_path, "c1")
        token = w.watch("c1", str(d))
        set_kills(d, 1)  # killed just before init exited
        w.forget("c1", token)
        assert w.watched == set()
        assert w.pending() == 1
        assert await w.next_event() == "c1"
        w.forget("c1")  # idempotent
        w.close()

    run(go())


def test_a_stale_token_does_not_forget_a_new_container_of_the_same_id(tmp_path: Path) -> None:
    async def go() -> None:
        w = OOMWatcher(use_inotify=False, poll_interval=60)
        d = make_cgroup(tmp_path, "c1")
        old = w.watch("c1", str(d))
        w.forget("c1")
        w.watch("c1", str(d))
        w.forget("c1", old)  # the first container's init exit, reported late
        assert w.watched == {"c1"}
        w.close()

    run(go())


def test_a_removed_cgroup_does_not_report_old_kills_again(tmp_path: Path) -> None:
    async def go() -> None:
        w = OOMWatcher(use_inotify=False, poll_interval=60)
        d = make_cgroup(tmp_path, "c1", oom_kill=1)
        w.watch("c1", str(d))
        (d / "memory.events").unlink()
        w.check("c1")  # reads 0
        set_kills(d, 1)
        w.check("c1")
        assert w.pending() == 0
        w.close()

    run(go())


def test_concurrent_callers_each_take_one_event_and_cancelled_ones_take_none(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        w = OOMWatcher(poll_interval=0.01)
        dirs = {name: make_cgroup(tmp_path, name) for name in ("a", "b", "c")}
        for name, d in dirs.items():
            w.watch(name, str(d))
        waiters = [asyncio.ensure_future(w.next_event()) for _ in range(4)]
        await asyncio.sleep(0.05)
        waiters[0].cancel()  # a caller that gave up
        for d in dirs.values():
            set_kills(d, 1)
        done, pending = await asyncio.wait(waiters[1:], timeout=5)
        assert sorted(t.result() for t in done) == ["a", "b", "c"]
        assert not pending and waiters[0].cancelled()
        w.close()

    run(go())


def test_the_queue_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oom, "MAX_QUEUED", 2)

    async def go() -> None:
        w = OOMWatcher(use_inotify=False, poll_interval=60)
        for name in ("first", "second", "third"):
            d = make_cgroup(tmp_path, name)
            w.watch(name, str(d))
            set_kills(d, 1)
            w.check(name)
        assert w.pending() == 2  # the oldest was dropped
        assert [await w.next_event(), await w.next_event()] == ["second", "third"]
        w.close()

    run(go())
