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


class ProvisioningCancelled(RuntimeError):
    """A node's provisioning was cancelled (the cluster closes) before it was ready."""


class Provisioner:
    """One provisioning task per node name, started early, taken by the node."""

    def __init__(self, ctx: ClusterContext) -> None:
        self.ctx = ctx
        self._tasks: dict[str, asyncio.Task[Prepared]] = {}
        self.failures: dict[str, Exception] = {}  # node name -> why its provisioning failed

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
        except asyncio.CancelledError:
            if not task.cancelled():
                raise  # the caller was cancelled, not the provisioning
            # Cancelled by a close: the node fails like any other (SpecCluster's batch then
            # ends instead of the close's cancellation escaping through it).
            raise ProvisioningCancelled(f"provisioning {name} was cancelled: the cluster is closing") from None
        except Exception as e:
            self.failures[name] = e
            raise
        finally:
            if task.done():
                self._tasks.pop(name, None)

    async def first_ready(self, names: list[str], n: int) -> tuple[list[str], list[BaseException]]:
        """Wait until ``n`` of ``names`` (begun with ``prestart``) are ready, whichever they
        are, or until that can no longer happen: (the ready ones, the failures so far).
        The others go on; a node still takes its own (or its failure) with ``take``."""
        pending = {self._tasks[name]: name for name in names}
        ready: list[str] = []
        failures: list[BaseException] = []
        while pending and len(ready) < n <= len(ready) + len(pending):
            done, _ = await asyncio.wait(set(pending), return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                name = pending.pop(task)
                if task.cancelled():
                    failures.append(asyncio.CancelledError(f"provisioning {name} was cancelled"))
                elif (error := task.exception()) is not None:
                    failures.append(error)
                else:
                    ready.append(name)
        return ready, failures

    async def outcome(self, name: str) -> BaseException | None:
        """Once ``name``'s provisioning (begun with ``prestart``) ended: its failure, or None.
        The task stays for the node's ``take``."""
        task = self._tasks[name]
        await asyncio.wait({task})
        return asyncio.CancelledError() if task.cancelled() else task.exception()

    def discard(self, name: str) -> None:
        """Forget a provisioning that ended (a failed one, whose node never comes)."""
        task = self._tasks.get(name)
        if task is not None and task.done():
            del self._tasks[name]

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
