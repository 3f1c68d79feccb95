"""Building one node's server: create it, reach it, build its environment.

A worker's dask process starts here too, as soon as its environment is built and the
scheduler's address is known (even before the scheduler answers): see ``launch_worker``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from .. import early_start, environment, launch, layout, liveness, memory, privnet, remote, userdata
from ..aio import quietly
from ..cloud import LABEL_JOINED, LABEL_WORKER, CloudError, ServerInfo, cluster_labels
from ..payload import Snapshot
from ..security import HostKey, cloud_config
from .context import ClusterContext
from .servers import Reached

logger = logging.getLogger(__name__)


class BootstrapError(RuntimeError):
    """Building a server's environment failed; the message leads with the cause in one line,
    then quotes the end of its log. ``deterministic``: trying again cannot help."""

    def __init__(self, message: str, deterministic: bool = False) -> None:
        super().__init__(message)
        self.deterministic = deterministic


# uv's words for requirements that cannot be met: the same on every try and every server.
_UNSATISFIABLE = ("No solution found when resolving dependencies", "requirements are unsatisfiable")
_STAMP = re.compile(r"^\d{4}-\d\d-\d\dT[\d:]+[+-]\d{4} ")


def bootstrap_failure(server: str, status: int, log: str, log_name: str) -> BootstrapError:
    """The error for a failed bootstrap from its log: the last attempt's lines without
    timestamps and uv's warnings; its cause (uv's ``cause:`` or first ``error:``) first."""
    lines = [_STAMP.sub("", line) for line in log.splitlines()]
    starts = [i for i, line in enumerate(lines) if line.startswith("bootstrap ") and " on " in line]
    tail = [line for line in lines[starts[-1] if starts else 0 :] if not line.startswith("warning:")]
    causes = [line.strip().removeprefix("cause: ") for line in tail if line.strip().startswith("cause:")]
    causes += [line.removeprefix("error: ") for line in tail if line.startswith("error:")]
    deterministic = any(marker in log for marker in _UNSATISFIABLE)
    what = "the packages cannot be installed (not retried)" if deterministic else f"bootstrap failed (status {status})"
    cause = causes[0] if causes else "see the log below"
    quoted = "\n".join(tail[-15:])
    return BootstrapError(f"server {server}: {what}: {cause}\nlast lines of ~/{log_name}:\n{quoted}", deterministic)


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
        if ctx.settings.keep_paid_servers:
            reused = await _reuse_kept(ctx, name, labels, options)
            if reused is not None:
                return reused
    reached: Reached | None = None
    announce: asyncio.Future[None] | None = None
    try:
        ctx.report(name, "creating")
        if role == "worker" and ctx.settings.allow_fewer_workers:
            await _scheduler_first(ctx, name)

        async def created(new: ServerInfo) -> None:
            await ctx.pins.pin(new, host_key.public_openssh)
            timings["created"] = time.monotonic() - t0
            ctx.report(name, "booting")

        # Deletes its server itself on failure (and retries a create action that failed).
        reached = await ctx.factory.create_reachable(
            name=server_name(ctx.settings.name, name, role),
            server_types=ctx.settings.server_types(role),
            user_data=cloud_config(host_key, userdata.sshd_port(ctx.settings.ssh_port)),
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
        await _cloud_init_done(ctx, reached.conn, reached.server)
        snap = await ctx.payload.snapshot()  # the local code as it is now (scale-ups re-read it)
        await ctx.payload.put_wheels(reached.conn, snap)
        await _bootstrap_twice(ctx, reached.conn, role, reached.server, snap)
        await ctx.payload.put_files(reached.conn, snap, timeout=ctx.settings.timeouts["bootstrap"])
        timings["bootstrap"] = time.monotonic() - t0
        # Now with its private IP and status: what the cluster's repr shows.
        server = await reached.located()
        ctx.factory.record(server)
        await _private_address(ctx, reached.conn, server)
        if announce is not None:
            await announce
        prepared = Prepared(server, host_key.public_openssh, reached.conn, timings, started_at)
        if role == "worker":
            await launch_worker(ctx, prepared, name, options)
        return prepared
    except BaseException:
        await _undo(ctx, reached, announce)
        raise


async def _scheduler_first(ctx: ClusterContext, name: str) -> None:
    """With ``allow-fewer-workers``, the account's server limit must strike a worker, never
    the scheduler: workers' creates wait until the scheduler's server exists."""
    timeout = ctx.settings.timeouts["server-create"]
    try:
        await asyncio.wait_for(ctx.factory.scheduler_recorded.wait(), timeout)
    except asyncio.TimeoutError:
        raise TimeoutError(f"worker {name}: the scheduler's server was not created within {timeout:g} s") from None


async def _reuse_kept(
    ctx: ClusterContext, name: str, labels: dict[str, str], options: dict[str, Any]
) -> Prepared | None:
    """A kept server (paid, idle) restarted as worker ``name``: no create, boot or bootstrap.
    One that fails is deleted and the next tried; None when none is left."""
    while (entry := await ctx.kept.take(server_name(ctx.settings.name, name, "worker"), labels)) is not None:
        server = entry.server
        ctx.report(name, f"restarting kept server {server.name}")
        conn: remote.Remote | None = None
        try:
            assert server.public_ip, f"server {server.name} has no public IPv4"
            conn = await ctx.ssh(server.public_ip, entry.host_key_public, retry_for=ctx.settings.timeouts["ssh"])
            prepared = Prepared(server, entry.host_key_public, conn, {}, time.time())
            await launch_worker(ctx, prepared, name, options)
            return prepared
        except BaseException as e:
            if conn is not None:
                await quietly(conn.close())
            await asyncio.shield(ctx.factory.delete(server, wait=False))
            if not isinstance(e, Exception):
                raise
            logger.warning("worker %s: kept server %s could not be restarted (%s); deleted", name, server.name, e)
    return None


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


async def _private_address(ctx: ClusterContext, conn: remote.Remote, server: ServerInfo) -> None:
    """dask binds the private IP: it must be on the server's NIC, not only in the API."""
    assert server.private_ip, f"server {server.name} has no private network address"
    timeout = ctx.settings.timeouts["private-address"]
    if await privnet.wait_private_address(conn, server.name, server.private_ip, timeout):
        logger.warning("%s: its private address came only after a nudge of its network", server.name)


async def _cloud_init_done(ctx: ClusterContext, conn: remote.Remote, server: ServerInfo) -> None:
    """cloud-init goes on after sshd answers (its final modules, package locks): wait for it,
    bounded. Exit 2 is "done, with recoverable errors", usual on Hetzner (metadata timeouts)."""
    timeout = ctx.settings.timeouts["bootstrap"]
    result = await conn.run("cloud-init status --wait", check=False, timeout=timeout)
    if result.exit_status not in (0, 2):
        logger.warning(
            "%s: cloud-init status --wait exited %s: %s",
            server.name, result.exit_status, (result.stdout + result.stderr).strip()[-300:],
        )  # fmt: skip


async def _bootstrap_twice(
    ctx: ClusterContext, conn: remote.Remote, role: str, server: ServerInfo, snap: Snapshot
) -> None:
    try:
        await bootstrap(ctx, conn, role, server, snap)
    except BootstrapError as e:
        if e.deterministic:
            raise  # unsatisfiable requirements: the same answer every time
        # A mirror or DNS blip on one server; the script is idempotent: once more.
        # The whole message: it quotes the end of the log, the only record of the cause.
        logger.warning("%s: bootstrap failed, trying once more: %s", server.name, e)
        await bootstrap(ctx, conn, role, server, snap)


async def bootstrap(
    ctx: ClusterContext, conn: remote.Remote, role: str, server: ServerInfo, snap: Snapshot
) -> None:
    """Build the environment (idempotent) and refuse versions that differ from the client's."""
    await conn.put(layout.BOOTSTRAP_SCRIPT, ctx.bootstrap_script(role, snap), mode=0o700)
    result = await conn.run(
        f"bash {layout.BOOTSTRAP_SCRIPT}", check=False, timeout=ctx.settings.timeouts["bootstrap"]
    )
    if result.exit_status != 0:
        log = await conn.run(f"tail -n 60 {layout.BOOTSTRAP_LOG}", check=False, timeout=30)
        raise bootstrap_failure(server.name, result.exit_status, log.stdout, layout.BOOTSTRAP_LOG)
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
    # Threads and memory follow the type this server got (a preference list may mix sizes).
    server_type = (await ctx.cloud.server_types())[p.server.server_type]
    # What the server really has (MemTotal), unless the user chose: see memory.py.
    measured = {} if "memory_limit" in options else {"memory_limit": await memory.measured_limit(p.conn)}
    options = {**launch.worker_defaults(server_type), **measured, **options}
    ctx.report(name, "waiting for the scheduler")
    scheduler = await ctx.scheduler.wait(f"worker {name}")
    command = launch.worker_command(
        scheduler=scheduler, name=name, ip=ip, preload=preload, options=options,
        wait=ctx.settings.start_timeout,
    )
    p.mark("process")
    await p.conn.start_detached(command, log=layout.log("worker"), pidfile=layout.pidfile("worker"))
    # Not running until it listens: a worker that exited at once says why, here.
    await liveness.wait_listening(
        p.conn, pidfile=layout.pidfile("worker"), log=layout.log("worker"),
        what=f"dask worker {name} on server {p.server.name}", timeout=ctx.settings.timeouts["process-start"],
    )  # fmt: skip
    # Workers keep no SSH connection open: 200 idle sessions help nobody.
    await quietly(p.conn.close())
    await _mark_joined(ctx, p)


async def _mark_joined(ctx: ClusterContext, p: Prepared) -> None:
    """Label the server: its worker runs (``ls`` and reattaching tell it from a half-built one)."""
    labels = {**p.server.labels, LABEL_JOINED: "1"}
    try:
        p.server = await ctx.cloud.update_server(p.server.id, p.server.name, labels)
    except CloudError as e:  # the worker runs all the same; only ls will call it not joined
        logger.warning("%s: labelling it as joined failed: %s", p.server.name, e)

