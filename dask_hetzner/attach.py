"""Reattaching from another process: nodes that take over servers that already run.

``HetznerCluster.from_name`` finds the servers by label and builds its specs from these:
the scheduler logs in with the pinned host key, reads the scheduler file and reopens the
tunnel; a worker only remembers its server (it needs no connection until it is stopped).
Once attached, they close like any other node: stop the process, delete the server.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any, cast

from distributed.deploy.spec import ProcessInterface

from . import launch, layout, remote
from .aio import quietly
from .cloud import LABEL_JOINED, ServerInfo
from .nodes import SchedulerServer, WorkerServer
from .provision.context import ClusterContext
from .provision.node import Prepared
from .provision.tasks import Provisioner
from .state import ClusterState, Secrets


class AttachError(RuntimeError):
    """The cluster exists but cannot be reattached (its scheduler is gone or unreachable)."""


@dataclass
class Attachment:
    """What ``from_name`` read from the local state: where it is, and the cluster's keys."""

    state: ClusterState
    secrets: Secrets = field(repr=False)
    # False: a view (dask-ctl's listing): closing it, or exiting, only disconnects.
    take_over: bool = True
    start: str | None = None  # the start id in cluster.json (None: made before they existed)


class _NoConnection:
    """An adopted worker keeps no SSH connection: stopping it opens a fresh one."""

    async def close(self, timeout: float = 10.0) -> None:
        return None


class AttachedScheduler(SchedulerServer):
    def __init__(
        self,
        *,
        context: ClusterContext,
        provisioner: Provisioner,
        server: ServerInfo,
        host_key: str,
        name: str = "scheduler",
        **kwargs: Any,
    ) -> None:
        super().__init__(context=context, provisioner=provisioner, name=name, **kwargs)
        self._server = server
        self._host_key = host_key

    async def start(self) -> None:
        ctx = self.context
        server = self._server
        if server.status != "running" or not server.public_ip:
            raise AttachError(f"the scheduler's server {server.name} is {server.status}, not running")
        conn = await ctx.ssh(server.public_ip, self._host_key, retry_for=ctx.settings.timeouts["ssh"])
        try:
            pidfile = shlex.quote(layout.pidfile("scheduler"))
            alive = await conn.run(
                f'kill -0 -- "-$(cat {pidfile} 2>/dev/null)" 2>/dev/null', check=False, timeout=30
            )
            if alive.exit_status != 0:
                raise AttachError(
                    f"no dask scheduler runs on {server.name} (see dask-hetzner logs {ctx.settings.name})"
                )
            info = await launch.wait_for_file(
                conn,
                layout.SCHEDULER_FILE,
                timeout=10,
                what=f"scheduler file on {server.name}",
                log=layout.log("scheduler"),
            )
            self.prepared = p = Prepared(server, self._host_key, conn)
            await self._connect(p, info)
        except BaseException:
            # Not ours to delete: a failed reattach leaves the cluster as it was.
            self.prepared = None
            if self.tunnel is not None:
                await quietly(self.tunnel.close())
            await quietly(conn.close())
            raise
        await ProcessInterface.start(self)


class AttachedWorker(WorkerServer):
    def __init__(
        self,
        scheduler: str,
        *,
        context: ClusterContext,
        provisioner: Provisioner,
        name: str,
        server: ServerInfo,
        host_key: str,
        **kwargs: Any,
    ) -> None:
        super().__init__(scheduler, context=context, provisioner=provisioner, name=name, **kwargs)
        self._server = server
        self._host_key = host_key

    async def start(self) -> None:
        # The worker runs (or its server is deleted when it closes): nothing to do now.
        self.prepared = Prepared(self._server, self._host_key, cast(remote.Remote, _NoConnection()))
        await ProcessInterface.start(self)


async def half_built(ctx: ClusterContext, server: ServerInfo, host_key: str) -> bool:
    """Whether an adopted worker's server never got its dask worker running (its start was
    killed half-way): not labelled joined, no pinned key or address, or no live process group
    in its pidfile. A labelled server that cannot be asked now is not called half-built."""
    if LABEL_JOINED not in server.labels or not host_key or not server.public_ip:
        return True
    try:
        conn = await ctx.ssh(server.public_ip, host_key, retry_for=10)
    except remote.RemoteError:
        return False
    try:
        pidfile = shlex.quote(layout.pidfile("worker"))
        alive = await conn.run(f'kill -0 -- "-$(cat {pidfile} 2>/dev/null)" 2>/dev/null', check=False, timeout=30)
        return alive.exit_status != 0
    finally:
        await quietly(conn.close())
