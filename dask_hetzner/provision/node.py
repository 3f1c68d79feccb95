"""Building one node's server: create it, reach it, build its environment.

A worker's dask process starts here too, as soon as its environment is built and the
scheduler's address is known (even before the scheduler answers): see ``launch_worker``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from .. import early_start, environment, launch, layout, remote
from ..aio import quietly
from ..cloud import LABEL_WORKER, ServerInfo, cluster_labels
from ..security import HostKey, cloud_config
from .context import ClusterContext
from .servers import Reached

logger = logging.getLogger(__name__)


class BootstrapError(RuntimeError):
    """Building a server's environment failed; the message quotes the end of its log."""


@dataclass
class Prepared:
    """A server that is running, reachable over SSH and has its environment built."""

    server: ServerInfo
    host_key_public: str
    conn: remote.Remote
    # Phase -> seconds since ``started_at`` (created, running, ssh, bootstrap, process, ready).
    timings: dict[str, float] = field(default_factory=dict)
    started_at: float = 0.0  # time.time() when provisioning began

    def mark(self, phase: str) -> None:
        self.timings[phase] = time.time() - self.started_at


def server_name(cluster: str, name: str, role: str) -> str:
    return f"{cluster}-{name}" if role == "worker" else f"{cluster}-scheduler"


async def provision(ctx: ClusterContext, name: str, role: str, options: dict[str, Any]) -> Prepared:
    """Create one server and make it ready to run ``role``; on any failure delete it."""
    t0, started_at = time.monotonic(), time.time()
    timings: dict[str, float] = {}
    host_key = HostKey.generate()
    labels = cluster_labels(ctx.settings.name, role, ctx.start)
    if role == "worker":
        labels[LABEL_WORKER] = name
    reached: Reached | None = None
    announce: asyncio.Future[None] | None = None
    try:
        ctx.report(name, "creating")

        async def created(new: ServerInfo) -> None:
            await ctx.pins.pin(new, host_key.public_openssh)
            timings["created"] = time.monotonic() - t0
            ctx.report(name, "booting")

        # Deletes its server itself on failure (and retries a create action that failed).
        reached = await ctx.factory.create_reachable(
            name=server_name(ctx.settings.name, name, role),
            server_type=ctx.settings.server_type(role),
            user_data=cloud_config(host_key),
            labels=labels,
            host_key=host_key.public_openssh,
            on_created=created,
        )
        timings["ssh"] = time.monotonic() - t0
        if role == "scheduler" and ctx.settings.scheduler_port:
            # A fixed port: workers know where to go before the scheduler runs, as soon as the
            # API shows its private IP (while this server's environment is being built).
            ctx.scheduler.expect(reached.hurry)  # a worker ready for the address hurries it
            announce = asyncio.ensure_future(_announce_scheduler(ctx, reached))
        ctx.report(name, "installing")
        await _bootstrap_twice(ctx, reached.conn, role, reached.server)
        timings["bootstrap"] = time.monotonic() - t0
        # Now with its private IP and status: what the cluster's repr shows.
        server = await reached.located()
        ctx.factory.record(server)
        if announce is not None:
            await announce
        prepared = Prepared(server, host_key.public_openssh, reached.conn, timings, started_at)
        if role == "worker":
            await launch_worker(ctx, prepared, name, options)
        return prepared
    except BaseException:
        await _undo(ctx, reached, announce)
        raise


async def _undo(ctx: ClusterContext, reached: Reached | None, announce: asyncio.Future[None] | None) -> None:
    if announce is not None:
        announce.cancel()
        with contextlib.suppress(BaseException):  # its failure is the caller's, raised there
            await announce
    if reached is not None:
        await quietly(reached.conn.close())
        await reached.abandon()
        # Shielded: a Ctrl-C while starting must still delete what was created.
        await asyncio.shield(ctx.factory.delete(reached.server))


async def _announce_scheduler(ctx: ClusterContext, reached: Reached) -> None:
    server = await reached.located(hurry=False)
    assert server.private_ip, f"server {server.name} has no private network address"
    ctx.scheduler.set(f"tls://{server.private_ip}:{ctx.settings.scheduler_port}")


async def _bootstrap_twice(ctx: ClusterContext, conn: remote.Remote, role: str, server: ServerInfo) -> None:
    try:
        await bootstrap(ctx, conn, role, server)
    except BootstrapError as e:
        # A mirror or DNS blip on one server; the script is idempotent: once more.
        # The whole message: it quotes the end of the log, the only record of the cause.
        logger.warning("%s: bootstrap failed, trying once more: %s", server.name, e)
        await bootstrap(ctx, conn, role, server)


async def bootstrap(ctx: ClusterContext, conn: remote.Remote, role: str, server: ServerInfo) -> None:
    """Build the environment (idempotent) and refuse versions that differ from the client's."""
    await conn.put(layout.BOOTSTRAP_SCRIPT, ctx.bootstrap_scripts[role], mode=0o700)
    result = await conn.run(
        f"bash {layout.BOOTSTRAP_SCRIPT}", check=False, timeout=ctx.settings.timeouts["bootstrap"]
    )
    if result.exit_status != 0:
        log = await conn.run(f"tail -n 25 {layout.BOOTSTRAP_LOG}", check=False, timeout=30)
        raise BootstrapError(
            f"bootstrap of server {server.name} ({server.public_ip}) failed with exit status "
            f"{result.exit_status}; last lines of ~/{layout.BOOTSTRAP_LOG}:\n{log.stdout.rstrip()}"
        )
    # The script's standard output is the environment's versions as JSON.
    environment.check_versions(ctx.versions, json.loads(result.stdout), where=server.name)


async def launch_worker(ctx: ClusterContext, p: Prepared, name: str, options: dict[str, Any]) -> None:
    """Start ``dask worker`` detached on a prepared server, then close its SSH connection.

    It starts as soon as the scheduler's address is known: with a fixed scheduler port that
    is when the scheduler's server runs, so the worker's own start (imports, fork server)
    overlaps the scheduler's, and a nanny preload waits until the scheduler answers.
    """
    ip = p.server.private_ip
    assert ip, f"server {p.server.name} has no private network address"
    await launch.write_tls(ctx.ca, p.conn, f"dask-worker-{name}", [ip])
    preload = await early_start.install(p.conn)
    server_type = (await ctx.cloud.server_types())[ctx.settings.worker_server_type]
    options = {**launch.worker_defaults(server_type), **options}
    ctx.report(name, "waiting for the scheduler")
    scheduler = await ctx.scheduler.wait(f"worker {name}")
    command = launch.worker_command(
        scheduler=scheduler, name=name, ip=ip, preload=preload, options=options,
        wait=ctx.settings.start_timeout,
    )
    p.mark("process")
    await p.conn.start_detached(command, log=layout.log("worker"), pidfile=layout.pidfile("worker"))
    # Workers keep no SSH connection open: 200 idle sessions help nobody.
    await quietly(p.conn.close())

