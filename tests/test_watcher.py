"""The server watcher's polling policy (one list request per interval for a whole cluster).

A stand-in cloud answers the lists, and the watcher's sleeps are recorded instead of
slept, so the policy is checked exactly, without waiting real seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from dask_hetzner.cloud import LABEL_WORKER, ServerInfo, ServerWatcher


class ListingCloud:
    """Lists one worker whose status follows a script, one status a list (None: gone)."""

    def __init__(self, statuses: list[str | None]) -> None:
        self._statuses: Iterator[str | None] = iter(statuses)
        self.lists = 0

    async def servers(self, label_selector: str) -> list[ServerInfo]:
        self.lists += 1
        status = next(self._statuses)
        if status is None:
            return []
        return [
            ServerInfo(
                id=1,
                name="c-worker-0",
                status=status,
                labels={LABEL_WORKER: "worker-0"},
                server_type="cx23",
                location="fsn1",
                public_ip="127.64.0.2",
                private_ip="127.128.0.2",
                created="2026-11-24T00:00:00+00:00",
            )
        ]


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    intervals: list[float] = []
    real_sleep = asyncio.sleep

    async def record(delay: float, *args: object) -> None:
        intervals.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", record)
    return intervals


async def test_polls_half_as_often_while_every_awaited_server_initializes(
    slept: list[float],
) -> None:
    cloud = ListingCloud(["initializing"] * 3 + ["starting"] * 2 + ["running"])
    watcher = ServerWatcher(cloud, "cluster=c", interval=1.0)  # type: ignore[arg-type]
    info = await watcher.wait(1, {"running"}, timeout=30, what="creating", worker="worker-0")
    assert info.status == "running" and cloud.lists == 6
    # Once starting, every interval again: running is seen as soon as before.
    assert slept == [2.0, 2.0, 2.0, 1.0, 1.0]


async def test_deletions_are_polled_less_and_less_often(slept: list[float]) -> None:
    cloud = ListingCloud(["deleting"] * 3 + [None])
    watcher = ServerWatcher(cloud, "cluster=c", interval=1.0)  # type: ignore[arg-type]
    await watcher.wait_gone(1, timeout=30, worker="worker-0")
    assert cloud.lists == 4 and slept == [1.5, 2.25, 3.375]
