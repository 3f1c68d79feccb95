"""Paid hours reused: a retired worker's server waits for the next scale-up.

Hetzner bills every started hour of a server (docs.hetzner.com/cloud/billing/faq), so a
server deleted mid-hour has paid for the rest of it. With ``keep_paid_servers``, a retired
worker's server is kept instead, dask stopped, relabelled ``role=kept`` (so reattaching never
takes it for a worker) with the time it will go, and renamed ``<cluster>-kept-<id>`` (dask
names a new worker like a retired one, and server names are unique in a project), until
``keep_margin`` before its next started hour; then deleted. A new worker takes a kept server first: renamed and relabelled, dask
started again, with no create, boot or bootstrap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from ..aio import cancelled
from ..cloud import LABEL_KEPT_UNTIL, LABEL_ROLE, LABEL_WORKER, ServerInfo
from .servers import ServerFactory

logger = logging.getLogger(__name__)


@dataclass
class Kept:
    server: ServerInfo
    host_key_public: str
    until: float  # time.time() when it is deleted
    timer: asyncio.Future[None] | None = None


class KeptServers:
    """The kept servers of one cluster and their deletion timers."""

    def __init__(self, factory: ServerFactory, margin: float) -> None:
        self.factory = factory
        self.margin = margin
        self.kept: dict[int, Kept] = {}

    def deadline(self, server: ServerInfo) -> float | None:
        """When a server kept now would have to go; None if not worth keeping (not ours, or
        its paid hour ends within the margin)."""
        paid = self.factory.bill.paid_until(server.id)
        if paid is None or paid - self.margin <= time.time():
            return None
        return paid - self.margin

    async def keep(self, server: ServerInfo, host_key_public: str, until: float) -> None:
        """Keep a retired worker's server (its dask process stopped) until ``until``."""
        labels = {k: v for k, v in server.labels.items() if k != LABEL_WORKER}
        labels.update({LABEL_ROLE: "kept", LABEL_KEPT_UNTIL: str(int(until))})
        old = server
        server = await self.factory.cloud.update_server(server.id, f"{self.factory.settings.name}-kept-{server.id}", labels)
        self.factory.servers.pop(old.name, None)
        self.factory.record(server)
        await self.factory.pins.forget(old)
        await self.factory.pins.pin(server, host_key_public)
        self._hold(Kept(server, host_key_public, until))
        logger.info("server %s (%s) kept (paid, idle) until %s", old.name, server.name, time.strftime("%H:%M", time.localtime(until)))

    def adopt(self, server: ServerInfo, host_key_public: str) -> None:
        """A kept server found when reattaching (another process kept it): taken by the next
        new worker here, and deleted here at the time on its label. One without a readable
        label is not taken: it goes with the cluster (close, nuke, the watchdog)."""
        try:
            until = float(server.labels[LABEL_KEPT_UNTIL])
        except (KeyError, ValueError):
            return
        self._hold(Kept(server, host_key_public, until))

    def _hold(self, entry: Kept) -> None:
        entry.timer = asyncio.ensure_future(self._expire(entry))
        self.kept[entry.server.id] = entry

    async def _expire(self, entry: Kept) -> None:
        await asyncio.sleep(max(0.0, entry.until - time.time()))  # the timer itself
        if self.kept.pop(entry.server.id, None) is not None:
            logger.info("server %s: its paid hour ends; deleting it", entry.server.name)
            await self.factory.delete(entry.server, wait=False)

    async def take(self, name: str, labels: dict[str, str]) -> Kept | None:
        """A kept server renamed ``name`` with ``labels`` (a new worker's), or None."""
        # The one whose paid time lasts longest: the others may go at their time.
        for entry in sorted(self.kept.values(), key=lambda k: -k.until):
            if self.kept.pop(entry.server.id, None) is None:
                continue  # taken by another new worker meanwhile
            if entry.timer is not None:
                await cancelled(entry.timer)
            old = entry.server
            try:
                entry.server = await self.factory.cloud.update_server(old.id, name, labels)
            except Exception as e:
                logger.warning("taking kept server %s failed (%s); deleting it", old.name, e)
                await self.factory.delete(old, wait=False)
                continue
            self.factory.servers.pop(old.name, None)
            self.factory.record(entry.server)
            await self.factory.pins.forget(old)
            await self.factory.pins.pin(entry.server, entry.host_key_public)
            return entry
        return None

    def until(self, server_id: int) -> float | None:
        entry = self.kept.get(server_id)
        return entry.until if entry else None

    async def clear(self) -> None:
        """The cluster is deleted as a whole: the timers stop (teardown deletes the servers)."""
        for entry in list(self.kept.values()):
            if entry.timer is not None:
                await cancelled(entry.timer)
        self.kept.clear()
