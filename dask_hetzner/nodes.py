"""The scheduler and workers as ``ProcessInterface`` objects: one Hetzner server each.

A node takes its server from provisioning (created, reached over SSH with its pinned host
key, environment built; a worker's process already started) and starts the dask process
detached from the SSH session. ``close`` stops the process explicitly and deletes the
server, returning once the API has accepted the delete (a lazy poll confirms it later).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from distributed.core import Status
from distributed.deploy.spec import ProcessInterface

from . import idle, launch, layout, remote
from .aio import quietly
from .cloud import ServerInfo
from .provision.context import ClusterContext
from .provision.node import Prepared
from .provision.tasks import Provisioner

logger = logging.getLogger(__name__)

# Spec options that are not the user's (SpecCluster passes them to every node).
SHARED_OPTIONS = ("context", "provisioner")


class SchedulerUnreachable(ConnectionError):
    """This process can no longer reach its scheduler, and trying again cannot help."""


def user_options(options: dict[str, Any]) -> dict[str, Any]:
    """A node spec's options as the user gave them (without what the cluster shares)."""
    return {k: v for k, v in options.items() if k not in SHARED_OPTIONS}


class HetznerNode(ProcessInterface):
    role = ""

    def __init__(self, *, context: ClusterContext, provisioner: Provisioner, name: str) -> None:
        super().__init__()
        self.context = context
        self.provisioner = provisioner
        self.name = name
        self.prepared: Prepared | None = None
        self._close_task: asyncio.Future[None] | None = None

    @property
    def server(self) -> ServerInfo | None:
        return self.prepared.server if self.prepared else None

    async def _stop_process(self) -> None:
        if self.prepared is not None:
            stop = self.prepared.conn.stop(layout.pidfile(self.role), timeout=10)
            await quietly(asyncio.wait_for(stop, 20))

    async def close(self) -> None:
        if self.status == Status.closed:
            return
        # SpecCluster asks again (a lost worker's timer) while a close runs: wait for that one,
        # instead of a second stop over SSH to a server being deleted.
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close_once())
        await asyncio.shield(self._close_task)

    async def _close_once(self) -> None:
        self.status = Status.closing
        try:
            await self._stop_process()
            if self.prepared is not None:
                await quietly(self.prepared.conn.close())
                await self._release(self.prepared)
            else:
                # Closed before start finished: whatever was being provisioned goes too.
                await self.provisioner.cancel(self.name)
        finally:
            await super().close()

    async def _release(self, p: Prepared) -> None:
        """Its server goes. Not waiting for it: the DELETE was accepted, and the factory
        confirms it in the background (or the teardown deletes what is left)."""
        await self.context.factory.delete(p.server, wait=False)

    def __repr__(self) -> str:
        where = f" {self.server.name} {self.server.public_ip}" if self.server else ""
        return f"<{type(self).__name__} {self.name}{where}: status={self.status.name}>"


class SchedulerServer(HetznerNode):
    role = "scheduler"

    def __init__(
        self, *, context: ClusterContext, provisioner: Provisioner, name: str = "scheduler", **kwargs: Any
    ) -> None:
        super().__init__(context=context, provisioner=provisioner, name=name)
        self.options = kwargs
        self.contact_address: str | None = None
        self.dashboard_port: int | None = None
        self.dashboard_link: str | None = None
        self.tunnel: remote.Tunnel | None = None

    async def start(self) -> None:
        ctx = self.context
        self.prepared = p = await self.provisioner.take(self.name, self.role, {})
        try:
            info = await self._launch(p)
            p.mark("ready")
            await self._connect(p, info)
            ctx.report(self.name, "running")
        except BaseException:
            await asyncio.shield(self._fail())
            raise
        await super().start()

    async def _launch(self, p: Prepared) -> dict[str, Any]:
        """Start ``dask scheduler`` detached; its scheduler file once it is written."""
        ctx, s = self.context, self.context.settings
        ip = p.server.private_ip
        assert ip, f"server {p.server.name} has no private network address"
        await launch.write_tls(ctx.ca, p.conn, "dask-scheduler", [ip])
        preload = None
        if ctx.idle is not None:
            # Only the scheduler's server gets the token, and only with idle_timeout on.
            preload = await idle.install(p.conn, ctx.idle, cluster=s.name, server_id=p.server.id)
        command = launch.scheduler_command(
            # Public: also reachable on the public address (the firewall limits who may).
            host="0.0.0.0" if s.connect == "public" else ip,
            port=s.scheduler_port,
            dashboard=f"{ip}:{s.dashboard_port}",
            options=self.options,
            preload=preload,
        )
        p.mark("process")
        await p.conn.run(f"rm -f {layout.SCHEDULER_FILE}", timeout=30)
        await p.conn.start_detached(command, log=layout.log("scheduler"), pidfile=layout.pidfile("scheduler"))
        return await launch.wait_for_file(
            p.conn,
            layout.SCHEDULER_FILE,
            timeout=s.timeouts["process-start"],
            what=f"dask scheduler on {p.server.name}",
            log=layout.log("scheduler"),
        )

    async def _connect(self, p: Prepared, info: dict[str, Any]) -> None:
        """Addresses and tunnels to a running scheduler (``info``: its scheduler file).

        Also used when reattaching from another process to a scheduler already running.
        """
        ctx = self.context
        ip = p.server.private_ip
        assert ip, f"server {p.server.name} has no private network address"
        port = int(info["address"].rsplit(":", 1)[1])
        # Workers always reach the scheduler over the private network.
        self.contact_address = f"tls://{ip}:{port}"
        self.dashboard_port = info.get("services", {}).get("dashboard")
        ctx.scheduler.set(self.contact_address)
        reconnect = lambda: ctx.ssh(p.server.public_ip or "", p.host_key_public)  # noqa: E731
        # The dashboard is never opened to the internet: it goes through SSH.
        if ctx.settings.connect == "tunnel" or self.dashboard_port:
            self.tunnel = remote.Tunnel(p.conn, reconnect)
        if ctx.settings.connect == "tunnel":
            assert self.tunnel is not None
            self.address = f"tls://127.0.0.1:{await self.tunnel.forward(ip, port)}"
        else:
            self.address = f"tls://{p.server.public_ip}:{port}"
        if self.dashboard_port and self.tunnel is not None:
            # The same port here as there where it is free: a Client connected by address
            # (the panel's snippet) builds its dashboard link from the scheduler's port.
            dash = await self.tunnel.forward(ip, self.dashboard_port, same_port=True)
            self.dashboard_link = f"http://127.0.0.1:{dash}/status"
        self.external_address = self.address

    @property
    def unreachable(self) -> str | None:
        """Why this process can no longer reach the scheduler (None: it can, or may again).

        A changed host key: the tunnel stopped for good (another machine answers at the
        server's address, or someone in between), and the Client sees only timeouts.
        """
        failure = self.tunnel.failure if self.tunnel is not None else None
        if failure is None:
            return None
        where = self.server.name if self.server is not None else "?"
        return (
            f"the host key of the scheduler's server {where} changed ({failure}); the SSH "
            "tunnel is not reopened: close() still deletes the cluster's servers through the API"
        )

    async def _stop_process(self) -> None:
        if self.prepared is not None and self.context.idle is not None:
            # First the watchdog: an orderly close must not race a self-deletion.
            await quietly(asyncio.wait_for(idle.stop(self.prepared.conn), 20))
        await super()._stop_process()

    async def _fail(self) -> None:
        if self.prepared is not None:
            await quietly(self.prepared.conn.close())
            await self.context.factory.delete(self.prepared.server, wait=False)

    async def disconnect(self) -> None:
        """Close this process's tunnel and SSH connection; the scheduler keeps running."""
        if self.tunnel is not None:
            await quietly(self.tunnel.close())
        if self.prepared is not None:
            await quietly(self.prepared.conn.close())

    async def close(self) -> None:
        if self.tunnel is not None:
            await quietly(self.tunnel.close())
        await super().close()


class WorkerServer(HetznerNode):
    role = "worker"

    def __init__(
        self, scheduler: str, *, context: ClusterContext, provisioner: Provisioner, name: str, **kwargs: Any
    ) -> None:
        # ``scheduler`` (SpecCluster's address for it, the tunnel's) is not where a worker
        # goes: it gets the scheduler's private address from the context.
        super().__init__(context=context, provisioner=provisioner, name=name)
        self.options = kwargs
        self._stopped = False

    async def _release(self, p: Prepared) -> None:
        """A retired worker whose dask stopped cleanly keeps its server while its started
        hour is paid (``keep_paid_servers``, provision/kept.py); otherwise it goes."""
        ctx = self.context
        until = ctx.kept.deadline(p.server) if ctx.settings.keep_paid_servers else None
        if until is None or not self._stopped or ctx.factory.closing:
            await super()._release(p)
            return
        try:
            await ctx.kept.keep(p.server, p.host_key_public, until)
        except Exception as e:
            logger.warning("keeping server %s failed (%s); deleting it", p.server.name, e)
            await super()._release(p)

    async def start(self) -> None:
        # Its process was started with its server (see provision.node.launch_worker).
        self.prepared = await self.provisioner.take(self.name, self.role, self.options)
        self.context.report(self.name, "running")
        await super().start()

    async def _stop_process(self) -> None:
        p = self.prepared
        if p is None or self.context.factory.closing:
            return  # closing the cluster: its server is deleted, no need to log in first
        # The worker's connection was closed after start: a short one to stop it explicitly.
        try:
            conn = await self.context.ssh(p.server.public_ip or "", p.host_key_public, retry_for=10)
        except Exception as e:
            logger.debug("worker %s unreachable for a clean stop: %r", self.name, e)
            return
        try:
            await asyncio.wait_for(conn.stop(layout.pidfile("worker"), timeout=10), 20)
            self._stopped = True  # nothing of it runs: the server may be kept
        except Exception as e:
            logger.debug("stopping worker %s: %r", self.name, e)
        finally:
            await quietly(conn.close())
