"""The server watcher's polling policy (one list request per interval for a whole cluster).

A stand-in cloud answers the lists, and the watcher's pauses are recorded instead of
slept, so the policy is checked exactly, without waiting real seconds. One test lets the
pauses run, to check that a waiter in a hurry cuts a long one short.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence

import pytest

from dask_hetzner.cloud import LABEL_WORKER, LAZY_POLLS, ServerInfo, ServerWatcher

PRIVATE = "127.128.0.2"


class ListingCloud:
    """Lists one worker following a script: a status, or (status, private IP), or None (gone)."""

    def __init__(self, script: Sequence[str | tuple[str, str | None] | None]) -> None:
        self._script: Iterator[str | tuple[str, str | None] | None] = iter(script)
        self.lists = 0

    async def servers(self, label_selector: str) -> list[ServerInfo]:
        self.lists += 1
        step = next(self._script)
        if step is None:
            return []
        status, private = step if isinstance(step, tuple) else (step, PRIVATE)
        return [
            ServerInfo(
                id=1,
                name="c-worker-0",
                status=status,
                labels={LABEL_WORKER: "worker-0"},
                server_type="cx23",
                location="fsn1",
                public_ip="127.64.0.2",
                private_ip=private,
                created="2026-11-24T00:00:00+00:00",
            )
        ]


Hook = Callable[[ServerWatcher, int], None]


@pytest.fixture
def paused(monkeypatch: pytest.MonkeyPatch) -> tuple[list[float], list[Hook]]:
    """The watcher's pauses, recorded; hooks run at each pause (with its index)."""
    intervals: list[float] = []
    hooks: list[Hook] = []

    async def record(self: ServerWatcher, interval: float) -> None:
        for hook in hooks:
            hook(self, len(intervals))
        intervals.append(interval)
        await asyncio.sleep(0)

    monkeypatch.setattr(ServerWatcher, "_pause", record)
    return intervals, hooks


async def test_a_waiter_polls_every_interval(paused: tuple[list[float], list[Hook]]) -> None:
    slept, _ = paused
    cloud = ListingCloud(["initializing"] * 3 + ["starting", "running"])
    watcher = ServerWatcher(cloud, "cluster=c", interval=1.0)  # type: ignore[arg-type]
    info = await watcher.wait(1, {"running"}, timeout=30, what="creating", worker="worker-0")
    assert info.status == "running" and cloud.lists == 5
    # No poll after the answer.
    assert slept == [1.0] * 4


async def test_a_lazy_waiter_polls_every_few_intervals_until_hurried(
    paused: tuple[list[float], list[Hook]],
) -> None:
    slept, hooks = paused
    cloud = ListingCloud(["initializing"] * 4 + ["running"])
    watcher = ServerWatcher(cloud, "cluster=c", interval=1.0)  # type: ignore[arg-type]
    # Its answer is needed during the third pause (which a real pause then cuts short: see
    # the last test); from then on, every interval.
    hooks.append(lambda w, i: w.hurry(1) if i == 2 else None)
    info = await watcher.wait(
        1, {"running"}, timeout=30, what="creating", worker="worker-0", lazy=True
    )
    assert info.status == "running" and cloud.lists == 5
    assert slept == [LAZY_POLLS * 1.0] * 3 + [1.0]


async def test_running_without_its_private_ip_is_not_the_answer(
    paused: tuple[list[float], list[Hook]],
) -> None:
    # attach_to_network finishes after create_server: the IP shows a poll or two later.
    cloud = ListingCloud([("running", None), ("running", None), "running"])
    watcher = ServerWatcher(cloud, "cluster=c", interval=1.0)  # type: ignore[arg-type]
    info = await watcher.wait(
        1, {"running"}, timeout=30, what="creating", worker="worker-0", private_ip=True
    )
    assert info.private_ip == PRIVATE and cloud.lists == 3


async def test_deletions_are_polled_less_and_less_often(
    paused: tuple[list[float], list[Hook]],
) -> None:
    slept, _ = paused
    cloud = ListingCloud(["deleting"] * 3 + [None])
    watcher = ServerWatcher(cloud, "cluster=c", interval=1.0)  # type: ignore[arg-type]
    await watcher.wait_gone(1, timeout=30, worker="worker-0")
    assert cloud.lists == 4 and slept == [1.5, 2.25, 3.375]


async def test_hurry_cuts_a_lazy_pause_short() -> None:
    # Real pauses: a lazy one would last 5 s; hurried, the next poll comes one interval
    # (1 s) after the last. The bound below is far from both.
    cloud = ListingCloud(["initializing", "running"])
    watcher = ServerWatcher(cloud, "cluster=c", interval=1.0)  # type: ignore[arg-type]
    pausing = asyncio.Event()
    pauses: list[float] = []
    real_pause = watcher._pause

    async def pause(interval: float) -> None:
        pauses.append(interval)
        pausing.set()
        await real_pause(interval)

    watcher._pause = pause  # type: ignore[method-assign]
    wait = asyncio.ensure_future(
        watcher.wait(1, {"running"}, timeout=30, what="creating", worker="worker-0", lazy=True)
    )
    await pausing.wait()
    assert pauses == [LAZY_POLLS * 1.0]
    watcher.hurry(1)
    info = await asyncio.wait_for(wait, LAZY_POLLS * 1.0 - 1.5)
    assert info.status == "running" and cloud.lists == 2
