"""Provisioning ahead of ``SpecCluster``, and the teardown of everything provisioned.

The initial workers' servers are created and bootstrapped while the scheduler starts; a
node takes its ready server from here instead of waiting for its own.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .. import gcfreeze
from .context import ClusterContext
from .node import Prepared, provision


class Provisioner:
    """One provisioning task per node name, started early, taken by the node."""

    def __init__(self, ctx: ClusterContext) -> None:
        self.ctx = ctx
        self._tasks: dict[str, asyncio.Task[Prepared]] = {}

    def prestart(self, name: str, role: str, options: dict[str, Any]) -> None:
        """Begin provisioning ``name`` now (a worker's process starts with ``options``)."""
        if name not in self._tasks:
            task = asyncio.ensure_future(provision(self.ctx, name, role, options))
            # Full collections meanwhile walk only new objects (see gcfreeze).
            gcfreeze.HEAP.hold()
            task.add_done_callback(lambda _: gcfreeze.HEAP.release())
            self._tasks[name] = task

    async def take(self, name: str, role: str, options: dict[str, Any]) -> Prepared:
        """The node's prepared server: the early task's, or one provisioned now."""
        self.prestart(name, role, options)
        task = self._tasks[name]
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._tasks.pop(name, None)

    async def cancel(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is None:
            return
        task.cancel()
        try:
            prepared = await task
        except BaseException:
            return  # provision() deletes its own server when it fails or is cancelled
        # It finished just before the cancel arrived.
        await prepared.conn.close()
        await self.ctx.factory.delete(prepared.server, wait=True)

    async def cancel_all(self) -> None:
        await asyncio.gather(*(self.cancel(n) for n in list(self._tasks)), return_exceptions=True)

    async def teardown(self) -> None:
        """Delete everything carrying this cluster's labels (its start id among them: never
        what a concurrent start of the same name made) and wait until the API confirms."""
        ctx = self.ctx
        await self.cancel_all()
        await ctx.kept.clear()  # kept servers carry the label: deleted below
        await ctx.factory.stop_confirming()  # the listing below covers them
        ctx.watcher.stop()
        await ctx.cloud.delete_cluster(ctx.settings.name, timeout=ctx.settings.timeouts["close"], start=ctx.start)
        ctx.factory.forget_all()
