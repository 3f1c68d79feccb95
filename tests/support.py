"""Helpers the end-to-end tests share: a bounded wait, and the official SDK on a test's simulator."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

import hcloud

from dask_hetzner.cloud import LABEL_CLUSTER


def wait_until(cond: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.2) -> None:
    """Poll a condition with a bound; the failure says what was awaited."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(interval)  # polling interval of a bounded wait, not synchronisation


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago ("0.0.0.0": free on every address)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def sdk(sim: Any) -> hcloud.Client:
    return hcloud.Client(token=sim.token, api_endpoint=sim.endpoint)


def servers_of(sim: Any, name: str) -> list:
    """The servers carrying cluster ``name``'s label, as the API lists them."""
    return sdk(sim).servers.get_all(label_selector=f"{LABEL_CLUSTER}={name}")


class StallProbe:
    """``async with StallProbe() as probe:``: ``probe.worst`` is the event loop's longest stall
    in the block, the lateness of a 10 ms sleep's wake-up."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            before = loop.time()
            await asyncio.sleep(0.01)  # the probe itself: lateness of this wake-up is the stall
            self.worst = max(self.worst, loop.time() - before - 0.01)

    async def __aenter__(self) -> StallProbe:
        self._task = asyncio.create_task(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


def processes_showing(secret: str) -> list[str]:
    """Command lines of every process on this machine (simulated servers included) with ``secret``."""
    from pathlib import Path

    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if secret in args:
            found.append(f"{entry.name}: {args[:200]}")
    return found


# Retries in milliseconds and short bounds: production keeps 1 s / 30 s backoff and minutes.
FAST = {
    "hetzner.api.backoff-base": "20ms",
    "hetzner.api.backoff-max": "500ms",
    "hetzner.timeouts.api-request": "10s",
    "hetzner.timeouts.server-create": "20s",
    "hetzner.timeouts.ssh": "20s",
    "hetzner.timeouts.process-start": "60s",
    "hetzner.timeouts.close": "30s",
}
